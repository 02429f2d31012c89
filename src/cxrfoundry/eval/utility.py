"""Synthetic-data utility: ChexGen's augmentation and synthetic-pretraining experiments.

Both take real shards (train/test splits) and a synthetic cohort (a folder of Parquet shards in
the shard schema, e.g. ``results/cohorts/{cohort}``, generated to match the real training
labels) and train the same classifier (:class:`cxrfoundry.eval.probe.Classifier`) under
different training sets, always scoring the *real* test split.

* :func:`augmentation_experiment` — real vs real + k× synthetic (``multiples``, default 1 and
  2) for each of ``seeds`` (default 5). The synthetic subset of size k × n_real is drawn per
  seed. For each multiple: the per-seed macro AUROC differences to real-only, their mean, a
  paired t-test and a Wilcoxon signed-rank test (scipy) over seeds, and the patient-bootstrap
  CI of every run.
* :func:`pretraining_experiment` — supervised pretraining on N× synthetic, then fine-tuning on
  ``fractions`` (1%, 10%, 100%) of the real training patients, vs fine-tuning the same
  initial backbone on the same real subsets without synthetic pretraining.

:func:`run_augmentation` / :func:`run_pretraining` wrap them for the workflow: they write a
metrics JSON each (``value`` = the headline difference with its CI) with the full tables as
extra keys.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cxrfoundry.eval import metrics as M
from cxrfoundry.eval import probe
from cxrfoundry.schema import FINDING_COLUMNS

log = logging.getLogger(__name__)

UTILITY_DEFAULTS: dict[str, Any] = {
    "multiples": [1, 2],  # augmentation: real + k x synthetic
    "seeds": 5,  # number of seeds (seed, seed + 1, ...)
    "fractions": [0.01, 0.1, 1.0],  # pretraining: share of real training patients
    "pretrain_multiple": 1,  # pretraining: N x (real training set size) synthetic images
    "pretrain": {},  # classifier overrides for the synthetic pretraining fit
    "probe": {"mode": "finetune"},  # classifier settings (probe.PROBE_DEFAULTS)
}


def resolve_config(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults updated with ``cfg`` (unknown keys raise ``ValueError``)."""
    out = probe.resolve_config(cfg, UTILITY_DEFAULTS, "utility")
    out["probe"] = {**UTILITY_DEFAULTS["probe"], **dict(out["probe"] or {})}
    if int(out["seeds"]) < 1:
        raise ValueError(f"utility: seeds must be >= 1, got {out['seeds']}")
    if any(float(m) <= 0 for m in out["multiples"]):
        raise ValueError(f"utility: multiples must be > 0, got {out['multiples']}")
    return out


def synthetic_subset(pool: probe.Cohort, n: int, seed: int) -> probe.Cohort:
    """``n`` synthetic images drawn without replacement (seeded); all when the pool is smaller
    (logged: the experiment then uses fewer than asked)."""
    if n >= len(pool):
        if n > len(pool):
            log.warning("synthetic pool has %d images, %d asked: using all", len(pool), n)
        return pool
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xA06]))
    return pool.subset(np.sort(rng.choice(len(pool), size=n, replace=False)))


def _run(
    backbone: str | Path | Mapping[str, Any],
    pcfg: Mapping[str, Any],
    train: probe.Cohort,
    test: probe.Cohort,
    seed: int,
    backbone_seed: int,
    init: Mapping[str, Any] | None = None,
) -> tuple[M.ClassificationResult, np.ndarray, int]:
    """Train one classifier (from ``init`` weights when given) and score the real test set."""
    clf = probe.Classifier(backbone, pcfg, seed=seed, backbone_seed=backbone_seed)
    if init is not None:
        clf.load_state(init)
    clf.fit(train, seed=seed)
    scores = clf.predict(test)
    result = probe.score_cohort(scores, test, clf.columns, clf.cfg, seed=backbone_seed)
    return result, scores, clf.samples_seen


def attach_features(
    backbone: str | Path | Mapping[str, Any],
    pcfg: Mapping[str, Any],
    cohorts: list[probe.Cohort],
    seed: int,
) -> None:
    """Embed each cohort once with the frozen backbone (linear probes only; else no-op)."""
    clf = probe.Classifier(backbone, pcfg, seed=seed, backbone_seed=seed)
    if clf.frozen:
        for cohort in cohorts:
            clf.with_features(cohort)


def _paired_tests(diffs: np.ndarray) -> dict[str, Any]:
    from scipy import stats

    out: dict[str, Any] = {
        "mean_diff": float(diffs.mean()),
        "sd_diff": float(diffs.std(ddof=1)) if diffs.size > 1 else None,
        "n_seeds": int(diffs.size),
        "t_stat": None,
        "t_pvalue": None,
        "wilcoxon_pvalue": None,
    }
    if diffs.size > 1 and np.ptp(diffs) > 0:
        t = stats.ttest_1samp(diffs, 0.0)  # == ttest_rel(augmented, real)
        out.update(t_stat=float(t.statistic), t_pvalue=float(t.pvalue))
        # Exact two-sided signed-rank test; with 5 seeds its smallest p is 0.0625.
        out["wilcoxon_pvalue"] = float(stats.wilcoxon(diffs).pvalue)
    return out


def augmentation_experiment(
    real_train: probe.Cohort,
    real_test: probe.Cohort,
    synthetic: probe.Cohort,
    backbone: str | Path | Mapping[str, Any],
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
) -> dict[str, Any]:
    """Real vs real + k× synthetic over seeds; returns runs, per-multiple tests and summary."""
    cfg = resolve_config(cfg)
    pcfg = probe.resolve_config(cfg["probe"])
    seeds = [seed + i for i in range(int(cfg["seeds"]))]
    arms: list[tuple[str, float]] = [("real", 0.0)] + [
        (f"real+{float(m):g}x", float(m)) for m in cfg["multiples"]
    ]
    # One backbone for every run (a linear probe embeds each cohort once); seeds vary the
    # head's init, the shuffles and the synthetic draw.
    attach_features(backbone, pcfg, [real_train, real_test, synthetic], seed)
    runs: list[dict[str, Any]] = []
    for s in tqdm(seeds, desc="augmentation seeds"):
        for arm, multiple in arms:
            train = real_train
            n_synth = 0
            if multiple > 0:
                extra = synthetic_subset(synthetic, round(multiple * len(real_train)), s)
                n_synth = len(extra)
                train = probe.concat_cohorts([real_train, extra], name=f"{arm}@{s}")
            result, _, seen = _run(backbone, pcfg, train, real_test, s, seed)
            runs.append(
                {
                    "arm": arm,
                    "multiple": multiple,
                    "seed": s,
                    "n_real": len(real_train),
                    "n_synthetic": n_synth,
                    "samples_seen": seen,
                    "auroc": result.macro_auroc.as_dict(),
                    "auprc": result.macro_auprc.as_dict(),
                }
            )
    base = {r["seed"]: r["auroc"]["value"] for r in runs if r["arm"] == "real"}
    comparisons = {}
    for arm, multiple in arms[1:]:
        diffs = np.array(
            [r["auroc"]["value"] - base[r["seed"]] for r in runs if r["arm"] == arm], dtype=float
        )
        comparisons[arm] = {"multiple": multiple, "diffs": diffs.tolist(), **_paired_tests(diffs)}
    summary = {
        arm: {
            "mean_auroc": float(np.mean([r["auroc"]["value"] for r in runs if r["arm"] == arm])),
            "sd_auroc": float(np.std([r["auroc"]["value"] for r in runs if r["arm"] == arm])),
        }
        for arm, _ in arms
    }
    return {"runs": runs, "comparisons": comparisons, "summary": summary, "seeds": seeds}


def pretraining_experiment(
    real_train: probe.Cohort,
    real_test: probe.Cohort,
    synthetic: probe.Cohort,
    backbone: str | Path | Mapping[str, Any],
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
) -> dict[str, Any]:
    """Fine-tune on fractions of real patients with and without synthetic pretraining."""
    cfg = resolve_config(cfg)
    pcfg = probe.resolve_config(cfg["probe"])
    n_synth = round(float(cfg["pretrain_multiple"]) * len(real_train))
    pretrain_set = synthetic_subset(synthetic, n_synth, seed)
    attach_features(backbone, pcfg, [real_train, real_test, pretrain_set], seed)
    # Pretrain once on the synthetic images; every fraction fine-tunes a copy of those weights.
    pre = probe.Classifier(backbone, pcfg, seed=seed + 7919, backbone_seed=seed)
    pre.fit(pretrain_set, overrides=cfg["pretrain"])
    pretrained, pretrain_seen = pre.state(), pre.samples_seen
    rows = []
    for fraction in tqdm([float(f) for f in cfg["fractions"]], desc="real fractions"):
        subset = probe.sample_patients(real_train, fraction, seed)
        for arm, init in (("real only", None), ("synthetic pretrain", pretrained)):
            result, scores, seen = _run(backbone, pcfg, subset, real_test, seed, seed, init)
            rows.append(
                {
                    "fraction": fraction,
                    "arm": arm,
                    "n_real": len(subset),
                    "n_synthetic_pretrain": 0 if init is None else len(pretrain_set),
                    "samples_seen": seen + (0 if init is None else pretrain_seen),
                    "auroc": result.macro_auroc.as_dict(),
                    "auprc": result.macro_auprc.as_dict(),
                    "_scores": scores,
                }
            )
    # Paired patient-bootstrap CI of the difference at each fraction (same test replicates).
    cols = probe.finding_columns(pcfg)
    idx = [FINDING_COLUMNS.index(c) for c in cols]
    labels = real_test.labels[:, idx].numpy()
    valid = real_test.valid[:, idx].numpy()
    diffs = {}
    for fraction in sorted({r["fraction"] for r in rows}):
        pair = {r["arm"]: r for r in rows if r["fraction"] == fraction}
        diffs[f"{fraction:g}"] = M.paired_difference(
            pair["synthetic pretrain"]["_scores"],
            pair["real only"]["_scores"],
            labels,
            real_test.patient_ids,
            valid=valid,
            n_boot=int(pcfg["bootstrap"]),
            seed=seed,
            alpha=float(pcfg["alpha"]),
        )
    for r in rows:
        del r["_scores"]
    return {"runs": rows, "differences": diffs, "n_synthetic_pretrain": len(pretrain_set)}


def _load(shards: str | Path, synthetic: str | Path, pcfg: Mapping[str, Any]):
    train = probe.load_cohort(shards, pcfg["train_split"], pcfg, max_rows=pcfg["max_train_rows"])
    test = probe.load_cohort(shards, pcfg["test_split"], pcfg)
    pool = probe.load_cohort(synthetic, None, pcfg, source="synthetic")
    return train, test, pool


def run_augmentation(
    shards: str | Path,
    synthetic: str | Path,
    backbone: str | Path | Mapping[str, Any],
    out_json: str | Path,
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
    model_name: str,
    dataset: str | None = None,
) -> dict[str, Any]:
    """:func:`augmentation_experiment` on shard folders; writes and returns the metrics JSON.

    ``value`` = mean over seeds of AUROC(real + largest multiple) - AUROC(real), CI = the
    2.5-97.5 percentiles of the per-seed differences (few seeds: read the tests' p-values).
    """
    cfg = resolve_config(cfg)
    pcfg = probe.resolve_config(cfg["probe"])
    train, test, pool = _load(shards, synthetic, pcfg)
    result = augmentation_experiment(train, test, pool, backbone, cfg, seed=seed)
    top = max(result["comparisons"], key=lambda a: result["comparisons"][a]["multiple"])
    comp = result["comparisons"][top]
    low, high = M.percentile_ci(np.asarray(comp["diffs"]), 0.05)
    record = M.metrics_record(
        task="augment",
        model=model_name,
        dataset=dataset or Path(shards).name,
        metric=f"auroc_diff_{top}_vs_real",
        estimate=M.Estimate(comp["mean_diff"], low, high),
        n=len(test),
        per_class={arm: result["summary"][arm] for arm in result["summary"]},
        # Classifier training samples over all runs (samples_seen is the backbone's pretraining).
        train_samples_seen=int(sum(r["samples_seen"] for r in result["runs"])),
        synthetic_cohort=str(synthetic),
        **result,
        details={"backbone": probe.backbone_name(backbone), "config": cfg, "seed": seed},
    )
    M.write_metrics(out_json, record)
    log.info(
        "augmentation %s: %s",
        model_name,
        {a: c["mean_diff"] for a, c in result["comparisons"].items()},
    )
    return record


def run_pretraining(
    shards: str | Path,
    synthetic: str | Path,
    backbone: str | Path | Mapping[str, Any],
    out_json: str | Path,
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
    model_name: str,
    dataset: str | None = None,
) -> dict[str, Any]:
    """:func:`pretraining_experiment` on shard folders; writes and returns the metrics JSON.

    ``value`` = AUROC(synthetic pretrain) - AUROC(real only) at the smallest real fraction,
    with its paired patient-bootstrap CI.
    """
    cfg = resolve_config(cfg)
    pcfg = probe.resolve_config(cfg["probe"])
    train, test, pool = _load(shards, synthetic, pcfg)
    result = pretraining_experiment(train, test, pool, backbone, cfg, seed=seed)
    smallest = min(result["differences"], key=float)
    diff = result["differences"][smallest]
    record = M.metrics_record(
        task="synth_pretrain",
        model=model_name,
        dataset=dataset or Path(shards).name,
        metric=f"auroc_diff_pretrain_at_{smallest}",
        estimate=M.Estimate(diff["value"], diff["ci_low"], diff["ci_high"]),
        n=len(test),
        per_class={f"{r['arm']}@{r['fraction']:g}": r["auroc"] for r in result["runs"]},
        # Classifier training samples over all runs (samples_seen is the backbone's pretraining).
        train_samples_seen=int(sum(r["samples_seen"] for r in result["runs"])),
        synthetic_cohort=str(synthetic),
        **result,
        details={"backbone": probe.backbone_name(backbone), "config": cfg, "seed": seed},
    )
    M.write_metrics(out_json, record)
    log.info("synthetic pretraining %s: %s", model_name, result["differences"])
    return record
