"""Benchmark metrics with patient-level bootstrap confidence intervals, and the metrics JSON.

Images of one patient are not independent (same anatomy, often the same finding on follow-up
films), so confidence intervals resample *patients*: each bootstrap replicate draws the test
set's patients with replacement and every image of a drawn patient enters with the patient's
multiplicity. That is the same as weighting each image by how often its patient was drawn,
which is how this module computes replicates: one ``(n_boot, n_images)`` weight matrix, and
weighted AUROC / average precision / means evaluated for all replicates at once in numpy
(ties handled exactly like scikit-learn; :func:`weighted_auroc` and :func:`weighted_ap` match
``roc_auc_score`` / ``average_precision_score`` with ``sample_weight``).

* :func:`patient_weights` — the bootstrap multiplicity matrix (seeded, chunked).
* :func:`classification_metrics` — per-finding AUROC and AUPRC, macro means, percentile CIs.
* :func:`dice_metrics` — per-structure Dice means with CIs from per-image Dice.
* :func:`paired_difference` — CI of metric(A) - metric(B) on the same test set and replicates.
* :func:`metrics_record` / :func:`write_metrics` / :func:`read_metrics` — the metrics JSON of
  DESIGN.md section 3: ``{task, model, dataset, metric, value, ci_low, ci_high, n, per_class}``
  (extra keys such as ``compute``, ``samples_seen``, ``subgroups`` allowed).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrfoundry import io as cio

log = logging.getLogger(__name__)

#: Keys every metrics JSON has at top level (DESIGN.md section 3).
REQUIRED_KEYS: tuple[str, ...] = (
    "task",
    "model",
    "dataset",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "per_class",
)
#: Default number of bootstrap replicates (the issue asks for at least 500).
DEFAULT_N_BOOT = 1000
#: Replicates evaluated per numpy pass: bounds memory at chunk x n_images float64.
_CHUNK_CELLS = 4_000_000


# --------------------------------------------------------------------------- resampling


def patient_codes(patient_ids: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, int]:
    """Integer code per row (0..P-1, in order of first appearance) and the patient count P."""
    ids = np.asarray(patient_ids, dtype=object)
    if ids.ndim != 1:
        raise ValueError(f"patient_ids must be 1-D, got shape {ids.shape}")
    if len(ids) and any(p is None or (isinstance(p, float) and math.isnan(p)) for p in ids):
        raise ValueError("patient_ids contain missing values; every image needs a patient")
    _, first, codes = np.unique(ids.astype(str), return_index=True, return_inverse=True)
    # Relabel by first appearance so codes do not depend on the ids' sort order.
    order = np.argsort(first, kind="stable")
    relabel = np.empty_like(order)
    relabel[order] = np.arange(len(order))
    return relabel[codes].astype(np.int64), len(first)


def patient_weights(
    patient_ids: Sequence[Any] | np.ndarray,
    n_boot: int,
    seed: int,
    *,
    chunk: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield float64 ``(b, n_images)`` blocks of bootstrap multiplicities, ``n_boot`` rows in all.

    Replicate ``r`` draws P patients with replacement; row ``r`` holds, for every image, how
    many times its patient was drawn. Blocks are deterministic for ``(patient_ids, n_boot,
    seed)`` whatever ``chunk`` is (all draws come from one generator, in replicate order).
    """
    codes, n_patients = patient_codes(patient_ids)
    if n_patients == 0:
        raise ValueError("cannot bootstrap an empty test set")
    n = len(codes)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    chunk = chunk or max(1, min(n_boot, _CHUNK_CELLS // max(n, n_patients, 1)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        draws = rng.integers(0, n_patients, size=(b, n_patients))
        # Counts per (replicate, patient) in one bincount over offset codes.
        flat = (draws + np.arange(b)[:, None] * n_patients).ravel()
        counts = np.bincount(flat, minlength=b * n_patients).reshape(b, n_patients)
        yield counts[:, codes].astype(np.float64)
        done += b


# --------------------------------------------------------------------------- weighted metrics


def _prepare(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Descending score order, tie-block starts (in sorted order) and sorted labels."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
    return order, starts, labels[order].astype(bool)


def _blocks(
    weights: np.ndarray, order: np.ndarray, starts: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per tie-block positive and negative weight sums, ``(B, n_blocks)`` each."""
    w = weights[:, order]
    pos = np.add.reduceat(np.where(y, w, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(y, 0.0, w), starts, axis=1)
    return pos, neg


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC for each row of ``weights`` ``(B, n)``; nan where a class has zero weight.

    Mann-Whitney form: P(score_pos > score_neg) + 0.5 P(tie), with rows weighted.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order, starts, y = _prepare(scores, labels)
    pos, neg = _blocks(weights, order, starts, y)
    # Blocks are in descending score order: negatives strictly below a block are the reverse
    # cumulative sum past it.
    neg_below = neg.sum(axis=1, keepdims=True) - np.cumsum(neg, axis=1)
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_ap(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision (area under the PR curve, step-wise as scikit-learn) per weight row."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order, starts, y = _prepare(scores, labels)
    pos, neg = _blocks(weights, order, starts, y)
    tp = np.cumsum(pos, axis=1)
    fp = np.cumsum(neg, axis=1)
    total_pos = tp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1.0), 0.0)
        ap = (pos * precision).sum(axis=1) / np.where(total_pos > 0, total_pos, 1.0)
    has_both = (total_pos > 0) & (fp[:, -1] > 0)
    return np.where(has_both, ap, np.nan)


def percentile_ci(values: np.ndarray, alpha: float) -> tuple[float | None, float | None]:
    """``(alpha/2, 1-alpha/2)`` quantiles of the finite replicates; None with fewer than 2."""
    finite = values[np.isfinite(values)]
    if finite.size < 2:
        return None, None
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def finite_or_none(value: float | None) -> float | None:
    """``float(value)`` when finite, else None (JSON has no nan)."""
    return float(value) if value is not None and np.isfinite(value) else None


@dataclass
class Estimate:
    """A point estimate with its percentile bootstrap CI (``None`` where undefined)."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    n_boot_valid: int = 0

    def as_dict(self) -> dict[str, Any]:
        """``{"value", "ci_low", "ci_high"}``."""
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high}


@dataclass
class ClassificationResult:
    """Output of :func:`classification_metrics`."""

    class_names: list[str]
    auroc: dict[str, Estimate]
    auprc: dict[str, Estimate]
    macro_auroc: Estimate
    macro_auprc: Estimate
    n: int
    n_patients: int
    n_positive: dict[str, int]
    n_boot: int
    seed: int
    #: Bootstrap replicates of the macro AUROC (for paired comparisons and plots).
    replicates: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def per_class(self) -> dict[str, dict[str, Any]]:
        """``{class: {auroc, auroc_ci, auprc, auprc_ci, n_pos}}`` for the metrics JSON."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.class_names:
            a, p = self.auroc[name], self.auprc[name]
            out[name] = {
                "auroc": a.value,
                "auroc_ci": [a.ci_low, a.ci_high],
                "auprc": p.value,
                "auprc_ci": [p.ci_low, p.ci_high],
                "n_pos": self.n_positive[name],
            }
        return out


def _check_matrix(name: str, array: np.ndarray, n: int, k: int) -> None:
    if array.shape != (n, k):
        raise ValueError(f"{name} has shape {array.shape}, expected {(n, k)}")


def classification_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    patient_ids: Sequence[Any] | np.ndarray,
    *,
    valid: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    alpha: float = 0.05,
) -> ClassificationResult:
    """Per-class AUROC and AUPRC, their macro means and patient-bootstrap percentile CIs.

    ``scores``/``labels`` are ``(n, k)``; ``valid`` (bool, default all True) masks labels that
    do not count (uncertain/unmentioned under an "ignore" policy). A class is scored only when
    its valid labels hold both values; macro means average the scored classes (per replicate,
    over the classes defined in that replicate). ``n_boot`` >= 1 replicates (0 = no CI).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim == 1:
        scores, labels = scores[:, None], labels.reshape(-1, 1)
    n, k = scores.shape
    _check_matrix("labels", labels, n, k)
    valid = np.ones((n, k), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    _check_matrix("valid", valid, n, k)
    if len(patient_ids) != n:
        raise ValueError(f"{len(patient_ids)} patient ids for {n} rows")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain nan or inf")
    names = list(class_names) if class_names is not None else [f"class_{j}" for j in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} score columns")
    binary = labels > 0
    _, n_patients = patient_codes(patient_ids)

    def evaluate(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        au = np.empty((weights.shape[0], k))
        ap = np.empty((weights.shape[0], k))
        for j in range(k):
            w = weights * valid[:, j]
            au[:, j] = weighted_auroc(scores[:, j], binary[:, j], w)
            ap[:, j] = weighted_ap(scores[:, j], binary[:, j], w)
        return au, ap

    point_au, point_ap = (a[0] for a in evaluate(np.ones((1, n))))
    scored = np.isfinite(point_au)
    boot_au, boot_ap = np.empty((0, k)), np.empty((0, k))
    if n_boot > 0:
        parts = [evaluate(w) for w in patient_weights(patient_ids, n_boot, seed)]
        boot_au = np.concatenate([p[0] for p in parts])
        boot_ap = np.concatenate([p[1] for p in parts])

    def macro(values: np.ndarray) -> np.ndarray:
        sub = values[:, scored]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-nan replicate is expected
            return np.nanmean(sub, axis=1) if sub.shape[1] else np.full(len(values), np.nan)

    def estimate(point: float, boot: np.ndarray) -> Estimate:
        low, high = percentile_ci(boot, alpha) if boot.size else (None, None)
        return Estimate(finite_or_none(point), low, high, int(np.isfinite(boot).sum()))

    macro_au_boot, macro_ap_boot = macro(boot_au), macro(boot_ap)
    result = ClassificationResult(
        class_names=names,
        auroc={nm: estimate(point_au[j], boot_au[:, j]) for j, nm in enumerate(names)},
        auprc={nm: estimate(point_ap[j], boot_ap[:, j]) for j, nm in enumerate(names)},
        macro_auroc=estimate(macro(point_au[None])[0], macro_au_boot),
        macro_auprc=estimate(macro(point_ap[None])[0], macro_ap_boot),
        n=n,
        n_patients=n_patients,
        n_positive={nm: int((binary[:, j] & valid[:, j]).sum()) for j, nm in enumerate(names)},
        n_boot=int(n_boot),
        seed=int(seed),
        replicates={"macro_auroc": macro_au_boot, "macro_auprc": macro_ap_boot},
    )
    return result


def bootstrap_statistic(
    statistic: Callable[[np.ndarray], np.ndarray],
    patient_ids: Sequence[Any] | np.ndarray,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[Estimate, np.ndarray]:
    """Estimate + CI of a vectorised weighted statistic; also returns the replicates.

    ``statistic(weights)`` takes ``(B, n)`` row weights and returns ``(B,)`` values; it is
    called once with all-ones weights for the point estimate.
    """
    n = len(patient_ids)
    point = float(np.asarray(statistic(np.ones((1, n))))[0])
    boot = (
        np.concatenate(
            [
                np.asarray(statistic(w), dtype=np.float64)
                for w in patient_weights(patient_ids, n_boot, seed)
            ]
        )
        if n_boot > 0
        else np.empty(0)
    )
    low, high = percentile_ci(boot, alpha) if boot.size else (None, None)
    return Estimate(finite_or_none(point), low, high, int(np.isfinite(boot).sum())), boot


def weighted_mean_statistic(values: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A :func:`bootstrap_statistic` statistic: the weighted mean of per-row ``values``."""
    values = np.asarray(values, dtype=np.float64)

    def stat(weights: np.ndarray) -> np.ndarray:
        total = weights.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, weights @ values / np.where(total > 0, total, 1), np.nan)

    return stat


@dataclass
class DiceResult:
    """Output of :func:`dice_metrics`."""

    structures: list[str]
    per_structure: dict[str, Estimate]
    mean: Estimate
    n: int
    n_patients: int
    #: Bootstrap replicates of the mean Dice over structures (for paired comparisons).
    replicates: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)

    def per_class(self) -> dict[str, dict[str, Any]]:
        """``{structure: {dice, dice_ci}}`` for the metrics JSON."""
        return {
            s: {"dice": e.value, "dice_ci": [e.ci_low, e.ci_high]}
            for s, e in self.per_structure.items()
        }


def dice_metrics(
    dice: np.ndarray,
    patient_ids: Sequence[Any] | np.ndarray,
    structures: Sequence[str],
    *,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    alpha: float = 0.05,
) -> DiceResult:
    """Mean Dice per structure and over structures from per-image Dice ``(n, S)``, with CIs."""
    dice = np.asarray(dice, dtype=np.float64)
    if dice.ndim != 2 or dice.shape[1] != len(structures):
        raise ValueError(f"dice has shape {dice.shape}, expected (n, {len(structures)})")
    if len(patient_ids) != dice.shape[0]:
        raise ValueError(f"{len(patient_ids)} patient ids for {dice.shape[0]} rows")
    per = {
        s: bootstrap_statistic(
            weighted_mean_statistic(dice[:, j]), patient_ids, n_boot=n_boot, seed=seed, alpha=alpha
        )[0]
        for j, s in enumerate(structures)
    }
    mean, boot = bootstrap_statistic(
        weighted_mean_statistic(dice.mean(axis=1)),
        patient_ids,
        n_boot=n_boot,
        seed=seed,
        alpha=alpha,
    )
    return DiceResult(
        list(structures), per, mean, dice.shape[0], patient_codes(patient_ids)[1], boot
    )


def paired_difference(
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    labels: np.ndarray,
    patient_ids: Sequence[Any] | np.ndarray,
    *,
    valid: np.ndarray | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Macro AUROC of A minus B on the same images, with a paired patient-bootstrap CI.

    Both models are scored on the *same* replicates, so the CI reflects the difference's own
    variability (narrower than comparing two separate CIs). ``p_boot`` is the two-sided
    bootstrap share of replicates on the other side of zero.
    """
    a = classification_metrics(scores_a, labels, patient_ids, valid=valid, n_boot=n_boot, seed=seed)
    b = classification_metrics(scores_b, labels, patient_ids, valid=valid, n_boot=n_boot, seed=seed)
    diff = a.replicates["macro_auroc"] - b.replicates["macro_auroc"]
    low, high = percentile_ci(diff, alpha)
    finite = diff[np.isfinite(diff)]
    p = (
        float(min(1.0, 2 * min((finite <= 0).mean(), (finite >= 0).mean())))
        if finite.size
        else None
    )
    value = None
    if a.macro_auroc.value is not None and b.macro_auroc.value is not None:
        value = a.macro_auroc.value - b.macro_auroc.value
    return {"value": value, "ci_low": low, "ci_high": high, "p_boot": p, "n_boot": n_boot}


# --------------------------------------------------------------------------- metrics JSON


def metrics_record(
    *,
    task: str,
    model: str,
    dataset: str,
    metric: str,
    estimate: Estimate,
    n: int,
    per_class: Mapping[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """The metrics JSON dict: the contract keys first, then ``extra`` (``compute``, …)."""
    clash = sorted(set(extra) & set(REQUIRED_KEYS))
    if clash:
        raise ValueError(f"extra keys {clash} would replace contract keys")
    record = {
        "task": str(task),
        "model": str(model),
        "dataset": str(dataset),
        "metric": str(metric),
        "value": estimate.value,
        "ci_low": estimate.ci_low,
        "ci_high": estimate.ci_high,
        "n": int(n),
        "per_class": dict(per_class),
        **extra,
    }
    validate_record(record)
    return record


def validate_record(record: Mapping[str, Any], *, source: str = "metrics record") -> None:
    """Raise ``ValueError`` naming ``source`` when ``record`` breaks the metrics contract."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"{source}: missing keys {missing}")
    for key in ("task", "model", "dataset", "metric"):
        if not isinstance(record[key], str) or not record[key]:
            raise ValueError(f"{source}: {key!r} must be a non-empty string")
    for key in ("value", "ci_low", "ci_high"):
        value = record[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{source}: {key!r} must be a number or null, got {value!r}")
    if isinstance(record["n"], bool) or not isinstance(record["n"], int) or record["n"] < 0:
        raise ValueError(f"{source}: 'n' must be a non-negative integer, got {record['n']!r}")
    if not isinstance(record["per_class"], Mapping):
        raise ValueError(f"{source}: 'per_class' must be an object")
    low, high, value = record["ci_low"], record["ci_high"], record["value"]
    if None not in (low, high) and low > high:
        raise ValueError(f"{source}: ci_low {low} > ci_high {high}")


def write_metrics(path: str | Path, record: Mapping[str, Any]) -> None:
    """Validate and atomically write one metrics JSON (deterministic key order and format)."""
    validate_record(record, source=str(path))
    cio.write_json(path, jsonable(record))


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Read and validate one metrics JSON; errors name the file."""
    path = Path(path)
    try:
        record = cio.read_json(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable metrics JSON ({exc})") from exc
    validate_record(record, source=str(path))
    return record


def jsonable(value: Any) -> Any:
    """numpy scalars/arrays and non-finite floats → plain JSON values (nan → null)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    return value
