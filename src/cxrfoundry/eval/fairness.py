"""Fairness audit: subgroup performance, real vs synthetic agreement, and mitigation.

ChexGen's bias experiments, on any classifier this package trains:

1. **Subgroup metrics** (:func:`subgroup_audit`): macro AUROC (or AUPRC) per subgroup of sex,
   age (19-40 / 41-65 / 66+, :data:`AGE_BINS`), race where known, and their intersections,
   with patient-bootstrap CIs. All subgroups of a cohort share the cohort's bootstrap
   replicates, so the best-worst gap of an attribute gets its own CI.
2. **Does the synthetic cohort reveal the same bias?** (:func:`correlate_audits`): Pearson
   (and Spearman) correlation of subgroup values between the real test split and a synthetic
   test cohort matched on demographics and findings.
3. **Mitigation** (:func:`balance_plan`, :func:`select_balancing`, :func:`mitigation_summary`):
   add synthetic images of under-represented subgroups until every subgroup of an attribute has
   as many training images as the largest, retrain, and compare worst-group metric and
   best-worst gap before and after.

:func:`run_fairness` runs the three on shard folders and writes one metrics JSON whose
``value`` is the best-worst gap of the primary attribute on the real test split.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrfoundry.eval import metrics as M
from cxrfoundry.eval import probe
from cxrfoundry.schema import FINDING_NAME_BY_COLUMN

log = logging.getLogger(__name__)

#: Age groups of the audit: (name, first year, last year or None = open).
AGE_BINS: tuple[tuple[str, float, float | None], ...] = (
    ("19-40", 19, 40),
    ("41-65", 41, 65),
    ("66+", 66, None),
)
ATTRIBUTES: tuple[str, ...] = ("sex", "age", "race")
INTERSECTIONS: tuple[tuple[str, str], ...] = (("sex", "age"), ("sex", "race"), ("race", "age"))
#: Separator of intersection names (``sex&age``) and their group names (``F&66+``).
JOIN = "&"

FAIRNESS_DEFAULTS: dict[str, Any] = {
    "attributes": list(ATTRIBUTES),
    "intersections": [list(p) for p in INTERSECTIONS],
    "age_bins": [list(b) for b in AGE_BINS],
    "metric": "auroc",  # auroc | auprc (macro over findings)
    "min_patients": 10,  # smaller subgroups are listed without a value
    "primary": "sex",  # the attribute whose gap is the record's value
    "balance": ["sex", "age", "race"],  # attributes to balance with synthetic images
    "balance_target": "max",  # every subgroup up to the largest one's count
    "probe": {},  # classifier settings (see probe.PROBE_DEFAULTS)
}


def resolve_config(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults updated with ``cfg``; unknown keys and bad values raise ``ValueError``."""
    out = probe.resolve_config(
        {k: v for k, v in (cfg or {}).items()}, FAIRNESS_DEFAULTS, "fairness"
    )
    if out["metric"] not in ("auroc", "auprc"):
        raise ValueError(f"fairness: metric must be 'auroc' or 'auprc', got {out['metric']!r}")
    for attr in [*out["attributes"], *out["balance"], out["primary"]]:
        if attr not in ATTRIBUTES:
            raise ValueError(f"fairness: unknown attribute {attr!r}; expected one of {ATTRIBUTES}")
    return out


#: Race groups by keyword: sources spell them differently (MIMIC "BLACK/AFRICAN AMERICAN",
#: CheXpert-style "Black"); one subgroup per group, whatever the source vocabulary.
RACE_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("white", "White"),
    ("black", "Black"),
    ("african", "Black"),
    ("asian", "Asian"),
    ("hispanic", "Hispanic"),
    ("latino", "Hispanic"),
    ("native", "Native"),
    ("pacific", "Pacific Islander"),
    ("other", "Other"),
)
#: Values that mean "race not known" (left out of race subgroups).
RACE_UNKNOWN: frozenset[str] = frozenset(
    {"", "unknown", "other/unknown", "nan", "none", "unable to obtain", "patient declined",
     "declined to answer"}
)  # fmt: skip


def normalize_race(value: Any) -> str:
    """Canonical race group of a source value; ``""`` when unknown."""
    if value is None:
        return ""
    text = str(value).strip()
    if text.lower() in RACE_UNKNOWN:
        return ""
    words = text.lower().replace("/", " ").replace("-", " ").split()
    for keyword, group in RACE_KEYWORDS:
        if keyword in words:
            return group
    return text


def age_groups(age: np.ndarray, bins: Sequence[Sequence[Any]] = AGE_BINS) -> np.ndarray:
    """Age group name per age; ``""`` where age is unknown or outside every bin."""
    age = np.asarray(age, dtype=np.float64)
    out = np.full(age.shape, "", dtype=object)
    for name, low, high in bins:
        inside = np.isfinite(age) & (age >= float(low))
        if high is not None:
            inside &= age < float(high) + 1  # whole years: 40.5 is still "19-40"
        out[inside] = str(name)
    return out


def subgroup_labels(
    meta: Mapping[str, np.ndarray],
    attributes: Sequence[str] = ATTRIBUTES,
    intersections: Sequence[Sequence[str]] = INTERSECTIONS,
    age_bins: Sequence[Sequence[Any]] = AGE_BINS,
) -> dict[str, np.ndarray]:
    """Group name per image for each attribute and intersection (``""`` = unknown).

    ``meta`` has ``sex``, ``age`` (years) and ``race`` arrays. Race values are mapped to one
    group per race across source vocabularies (:func:`normalize_race`); "Unknown" or empty
    count as unknown ("race where known").
    """
    base = {
        "sex": np.asarray([s if s in ("M", "F") else "" for s in meta["sex"]], dtype=object),
        "age": age_groups(meta["age"], age_bins),
        "race": np.asarray([normalize_race(r) for r in meta["race"]], dtype=object),
    }
    out = {a: base[a] for a in attributes}
    for pair in intersections:
        a, b = pair
        both = (base[a] != "") & (base[b] != "")
        joined = np.where(both, base[a].astype(str) + JOIN + base[b].astype(str), "")
        out[f"{a}{JOIN}{b}"] = joined.astype(object)
    return out


def cohort_groups(cohort: probe.Cohort, cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """:func:`subgroup_labels` of a cohort under a fairness config."""
    return subgroup_labels(
        {"sex": cohort.sex, "age": cohort.age, "race": cohort.race},
        cfg["attributes"],
        cfg["intersections"],
        cfg["age_bins"],
    )


@dataclass
class SubgroupAudit:
    """Subgroup rows of one cohort and the per-attribute best-worst gaps."""

    rows: list[dict[str, Any]]
    gaps: dict[str, dict[str, Any]]
    overall: M.Estimate
    metric: str
    replicates: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, repr=False)

    def value(self, attribute: str, group: str) -> float | None:
        """The point value of one subgroup (None when not scored)."""
        for row in self.rows:
            if row["attribute"] == attribute and row["group"] == group:
                return row["value"]
        return None


def _macro(
    scores: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray,
    weights: np.ndarray,
    classes: np.ndarray,
    metric: str,
) -> np.ndarray:
    """Macro metric over ``classes`` for each weight row (nan-mean over defined classes)."""
    fn = M.weighted_auroc if metric == "auroc" else M.weighted_ap
    values = np.stack(
        [fn(scores[:, j], labels[:, j], weights * valid[:, j]) for j in classes], axis=1
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replicate may score no class
        return np.nanmean(values, axis=1)


def subgroup_audit(
    scores: np.ndarray,
    labels: np.ndarray,
    patient_ids: Sequence[Any] | np.ndarray,
    groups: Mapping[str, np.ndarray],
    *,
    valid: np.ndarray | None = None,
    metric: str = "auroc",
    min_patients: int = 10,
    n_boot: int = M.DEFAULT_N_BOOT,
    seed: int = 0,
    alpha: float = 0.05,
) -> SubgroupAudit:
    """Macro ``metric`` per subgroup with patient-bootstrap CIs, and best-worst gaps.

    The macro mean runs over the findings with both classes among the whole cohort's valid
    labels (and, per subgroup and replicate, those defined there). Subgroups with fewer than
    ``min_patients`` patients are listed with ``value`` None. The gap of an attribute is best
    minus worst scored subgroup; its CI is that of the signed difference between those two
    groups over the shared replicates (a CI above 0 = a detected gap).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0
    valid = np.ones(labels.shape, bool) if valid is None else np.asarray(valid, bool)
    n = len(scores)
    codes, _ = M.patient_codes(patient_ids)
    ones = np.ones((1, n))
    defined = [
        j
        for j in range(labels.shape[1])
        if labels[valid[:, j], j].any() and (~labels[valid[:, j], j]).any()
    ]
    classes = np.asarray(defined, dtype=np.int64)
    if classes.size == 0:
        raise ValueError("no finding has both classes in this cohort; nothing to audit")
    overall_boot: list[np.ndarray] = []
    cells: list[tuple[str, str, np.ndarray]] = []
    for attribute, names in groups.items():
        names = np.asarray(names, dtype=object)
        if names.shape != (n,):
            raise ValueError(f"groups[{attribute!r}] has shape {names.shape}, expected ({n},)")
        for group in sorted({g for g in names if g}):
            cells.append((attribute, group, np.flatnonzero(names == group)))
    boot: dict[tuple[str, str], list[np.ndarray]] = {(a, g): [] for a, g, _ in cells}
    eligible = {(a, g): len(np.unique(codes[idx])) >= min_patients for a, g, idx in cells}
    if n_boot > 0:
        for weights in M.patient_weights(patient_ids, n_boot, seed):
            overall_boot.append(_macro(scores, labels, valid, weights, classes, metric))
            for a, g, idx in cells:
                if eligible[(a, g)]:
                    boot[(a, g)].append(
                        _macro(
                            scores[idx], labels[idx], valid[idx], weights[:, idx], classes, metric
                        )
                    )
    reps = {k: np.concatenate(v) if v else np.empty(0) for k, v in boot.items()}
    rows = []
    for a, g, idx in cells:
        n_pat = len(np.unique(codes[idx]))
        row: dict[str, Any] = {
            "attribute": a,
            "group": g,
            "n": int(idx.size),
            "n_patients": int(n_pat),
            "n_positive": int((labels[idx][:, classes] & valid[idx][:, classes]).sum()),
            "value": None,
            "ci_low": None,
            "ci_high": None,
        }
        if eligible[(a, g)]:
            point = _macro(scores[idx], labels[idx], valid[idx], ones[:, idx], classes, metric)[0]
            low, high = M.percentile_ci(reps[(a, g)], alpha) if n_boot > 0 else (None, None)
            row.update(value=M.finite_or_none(point), ci_low=low, ci_high=high)
        else:
            row["note"] = f"fewer than {min_patients} patients"
        rows.append(row)
    gaps: dict[str, dict[str, Any]] = {}
    for attribute in groups:
        scored = [r for r in rows if r["attribute"] == attribute and r["value"] is not None]
        if len(scored) < 2:
            continue
        best = max(scored, key=lambda r: r["value"])
        worst = min(scored, key=lambda r: r["value"])
        gap_ci: tuple[float | None, float | None] = (None, None)
        if n_boot > 0:
            # Signed difference of the two named groups on shared replicates: a CI above 0
            # says the ranking is not a resampling accident (max - min would always be >= 0).
            diff = reps[(attribute, best["group"])] - reps[(attribute, worst["group"])]
            gap_ci = M.percentile_ci(diff, alpha)
        gaps[attribute] = {
            "best_group": best["group"],
            "best": best["value"],
            "worst_group": worst["group"],
            "worst": worst["value"],
            "gap": best["value"] - worst["value"],
            "gap_ci": list(gap_ci),
            "n_groups": len(scored),
        }
    overall_point = _macro(scores, labels, valid, ones, classes, metric)[0]
    overall_reps = np.concatenate(overall_boot) if overall_boot else np.empty(0)
    low, high = M.percentile_ci(overall_reps, alpha) if overall_reps.size else (None, None)
    return SubgroupAudit(
        rows, gaps, M.Estimate(M.finite_or_none(overall_point), low, high), metric, reps
    )


def correlate_audits(real: SubgroupAudit, synthetic: SubgroupAudit) -> dict[str, Any]:
    """Pearson r (and Spearman rho) of subgroup values, real vs synthetic.

    Pairs are the (attribute, group) cells scored in both audits; ``per_attribute`` repeats the
    correlation within each attribute that has at least 3 shared groups, and
    ``same_worst_group`` tells whether both cohorts name the same worst subgroup.
    """
    from scipy import stats

    def values(audit: SubgroupAudit) -> dict[tuple[str, str], float]:
        return {
            (r["attribute"], r["group"]): r["value"] for r in audit.rows if r["value"] is not None
        }

    a, b = values(real), values(synthetic)
    keys = sorted(set(a) & set(b))

    def corr(pairs: list[tuple[str, str]]) -> dict[str, Any]:
        x = np.array([a[k] for k in pairs])
        y = np.array([b[k] for k in pairs])
        out: dict[str, Any] = {"n_groups": len(pairs)}
        if len(pairs) >= 3 and np.std(x) > 0 and np.std(y) > 0:
            r, p = stats.pearsonr(x, y)
            rho, _ = stats.spearmanr(x, y)
            out.update(pearson_r=float(r), p_value=float(p), spearman_rho=float(rho))
        else:
            out.update(pearson_r=None, p_value=None, spearman_rho=None)
        return out

    result = corr(keys)
    result["per_attribute"] = {
        attr: corr([k for k in keys if k[0] == attr]) for attr in sorted({k[0] for k in keys})
    }
    result["same_worst_group"] = {
        attr: real.gaps[attr]["worst_group"] == synthetic.gaps[attr]["worst_group"]
        for attr in real.gaps
        if attr in synthetic.gaps
    }
    result["pairs"] = [
        {"attribute": k[0], "group": k[1], "real": a[k], "synthetic": b[k]} for k in keys
    ]
    return result


def balance_plan(groups: np.ndarray, target: str | int = "max") -> dict[str, int]:
    """Synthetic images to add per subgroup so each reaches ``target`` training images.

    ``target``: ``"max"`` (the largest subgroup's count) or an integer. Unknown (``""``) rows
    are ignored.
    """
    names, counts = np.unique(
        np.asarray([g for g in groups if g], dtype=object), return_counts=True
    )
    if names.size == 0:
        return {}
    goal = int(counts.max()) if target == "max" else int(target)
    return {str(g): max(0, goal - int(c)) for g, c in zip(names, counts, strict=True)}


def select_balancing(
    synthetic_groups: np.ndarray, plan: Mapping[str, int], seed: int
) -> tuple[np.ndarray, dict[str, dict[str, int]]]:
    """Indices of synthetic images filling ``plan`` (seeded, without replacement), and a
    ``{group: {wanted, available, taken}}`` report (a shortfall is taken as far as possible)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xBA1]))
    synthetic_groups = np.asarray(synthetic_groups, dtype=object)
    chosen, report = [], {}
    for group, wanted in sorted(plan.items()):
        pool = np.flatnonzero(synthetic_groups == group)
        take = min(int(wanted), pool.size)
        if take:
            chosen.append(np.sort(rng.choice(pool, size=take, replace=False)))
        report[group] = {"wanted": int(wanted), "available": int(pool.size), "taken": int(take)}
        if take < wanted:
            log.warning(
                "balancing %s: wanted %d synthetic images, %d available", group, wanted, pool.size
            )
    idx = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    return idx.astype(np.int64), report


def mitigation_summary(
    before: SubgroupAudit, after: SubgroupAudit, attribute: str
) -> dict[str, Any]:
    """Worst-group value and best-worst gap of ``attribute`` before and after balancing."""
    b, a = before.gaps.get(attribute), after.gaps.get(attribute)
    if b is None or a is None:
        return {"attribute": attribute, "note": "fewer than two scored subgroups"}
    reduction = (b["gap"] - a["gap"]) / b["gap"] if b["gap"] > 0 else None
    return {
        "attribute": attribute,
        "worst_before": b["worst"],
        "worst_group_before": b["worst_group"],
        "worst_after": a["worst"],
        "worst_group_after": a["worst_group"],
        "gap_before": b["gap"],
        "gap_before_ci": b["gap_ci"],
        "gap_after": a["gap"],
        "gap_after_ci": a["gap_ci"],
        "gap_reduction": reduction,
        "overall_before": before.overall.value,
        "overall_after": after.overall.value,
    }


def gap_change_ci(
    before: SubgroupAudit, after: SubgroupAudit, attribute: str, alpha: float = 0.05
) -> list[float | None]:
    """CI of gap(before) - gap(after) of ``attribute`` over shared bootstrap replicates.

    Both audits score the same real test images with the same seed, so their replicates pair
    up; each side's gap is its own best minus worst group. A CI above 0 = the gap narrowed.
    """
    b, a = before.gaps.get(attribute), after.gaps.get(attribute)
    if b is None or a is None:
        return [None, None]

    def reps(audit: SubgroupAudit, gap: Mapping[str, Any]) -> np.ndarray:
        best = audit.replicates.get((attribute, gap["best_group"]), np.empty(0))
        worst = audit.replicates.get((attribute, gap["worst_group"]), np.empty(0))
        return best - worst if best.size and best.size == worst.size else np.empty(0)

    rb, ra = reps(before, b), reps(after, a)
    if not rb.size or rb.size != ra.size:
        return [None, None]
    return list(M.percentile_ci(rb - ra, alpha))


def audit_cohort(
    clf: probe.Classifier,
    cohort: probe.Cohort,
    cfg: Mapping[str, Any],
    *,
    seed: int,
) -> SubgroupAudit:
    """Score ``cohort`` with ``clf`` and audit its subgroups."""
    pcfg = clf.cfg
    scores = clf.predict(cohort)
    return subgroup_audit(
        scores,
        cohort.labels[:, clf.cols].numpy(),
        cohort.patient_ids,
        cohort_groups(cohort, cfg),
        valid=cohort.valid[:, clf.cols].numpy(),
        metric=cfg["metric"],
        min_patients=int(cfg["min_patients"]),
        n_boot=int(pcfg["bootstrap"]),
        seed=seed,
        alpha=float(pcfg["alpha"]),
    )


def run_fairness(
    shards: str | Path,
    backbone: str | Path | Mapping[str, Any],
    out_json: str | Path,
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
    model_name: str,
    dataset: str | None = None,
    synthetic_test: str | Path | None = None,
    synthetic_train: str | Path | None = None,
    log_metrics: Callable[[Mapping[str, float], int], None] | None = None,
) -> dict[str, Any]:
    """The full audit; writes the metrics JSON and returns it.

    Trains the probe classifier on the real train split, audits the real test split and, when
    given, the ``synthetic_test`` cohort (correlation); with ``synthetic_train`` it retrains once
    per ``balance`` attribute on real + synthetic images of under-represented subgroups and
    audits the real test split again (mitigation). ``value`` = best-worst gap of ``primary`` on
    real test (CI from shared replicates); ``per_class`` = real subgroup values by
    ``attribute=group``; extra keys ``subgroups``, ``gaps``, ``synthetic``, ``correlation``,
    ``mitigation``.
    """
    cfg = resolve_config(cfg)
    pcfg = probe.resolve_config(cfg["probe"])
    train = probe.load_cohort(shards, pcfg["train_split"], pcfg, max_rows=pcfg["max_train_rows"])
    test = probe.load_cohort(shards, pcfg["test_split"], pcfg)
    clf = probe.Classifier(backbone, pcfg, seed=seed)
    cache = clf.with_features if clf.frozen else (lambda cohort: cohort)
    cache(train)
    cache(test)
    clf.fit(train, log_metrics=log_metrics)
    real = audit_cohort(clf, test, cfg, seed=seed)
    extra: dict[str, Any] = {
        "subgroups": real.rows,
        "gaps": real.gaps,
        "overall": real.overall.as_dict(),
        "synthetic": None,
        "correlation": None,
        "mitigation": None,
    }
    if synthetic_test is not None:
        synth = cache(probe.load_cohort(synthetic_test, None, pcfg, source="synthetic"))
        synth_audit = audit_cohort(clf, synth, cfg, seed=seed)
        extra["synthetic"] = {
            "n": len(synth),
            "subgroups": synth_audit.rows,
            "gaps": synth_audit.gaps,
            "overall": synth_audit.overall.as_dict(),
        }
        extra["correlation"] = correlate_audits(real, synth_audit)
    if synthetic_train is not None:
        pool = cache(probe.load_cohort(synthetic_train, None, pcfg, source="synthetic"))
        train_groups = cohort_groups(train, cfg)
        pool_groups = cohort_groups(pool, cfg)
        extra["mitigation"] = {}
        for attribute in cfg["balance"]:
            plan = balance_plan(train_groups[attribute], cfg["balance_target"])
            idx, report = select_balancing(pool_groups[attribute], plan, seed)
            balanced = probe.concat_cohorts(
                [train, pool.subset(idx)], name=f"train+synthetic[{attribute}]"
            )
            # Same seed: the same backbone (cached features) and head init as before balancing.
            clf_after = probe.Classifier(backbone, pcfg, seed=seed)
            clf_after.fit(balanced)
            after = audit_cohort(clf_after, test, cfg, seed=seed)
            extra["mitigation"][attribute] = {
                **mitigation_summary(real, after, attribute),
                "gap_change_ci": gap_change_ci(real, after, attribute, float(pcfg["alpha"])),
                "added": report,
                "n_train_after": len(balanced),
                "subgroups_after": [r for r in after.rows if r["attribute"] == attribute],
            }
    primary = real.gaps.get(cfg["primary"])
    estimate = (
        M.Estimate(primary["gap"], *primary["gap_ci"]) if primary else M.Estimate(None, None, None)
    )
    record = M.metrics_record(
        task="fairness",
        model=model_name,
        dataset=dataset or Path(shards).name,
        metric=f"{cfg['metric']}_gap_{cfg['primary']}",
        estimate=estimate,
        n=len(test),
        per_class={
            f"{r['attribute']}={r['group']}": {
                "value": r["value"],
                "ci": [r["ci_low"], r["ci_high"]],
                "n": r["n"],
            }
            for r in real.rows
        },
        findings=[FINDING_NAME_BY_COLUMN[c] for c in clf.columns],
        **extra,
        details={
            "backbone": probe.backbone_name(backbone),
            "n_train": len(train),
            "config": cfg,
            "seed": seed,
        },
    )
    M.write_metrics(out_json, record)
    corr = extra["correlation"] or {}
    log.info(
        "fairness %s: %s gap %s; real-vs-synthetic r=%s",
        model_name,
        cfg["primary"],
        record["value"],
        corr.get("pearson_r"),
    )
    return record
