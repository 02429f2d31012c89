"""Deterministic, patient-disjoint train/val/test splits.

A dataset's official split is used where it has one (MIMIC-CXR ``split.csv``, NIH
``test_list.txt``, CheXpert ``valid.csv``, VinDr-CXR test set). Everything else is assigned
from a hash of ``(dataset, patient_id)``: sha256 of ``"{salt}{dataset}\\0{patient_id}"`` read as
a number in [0, 1) and cut at the cumulative fractions. The same patient therefore always lands
in the same split, on every machine and rerun, independently of row order or of which other
patients are present — adding patients never moves existing ones.

When only part of a dataset has an official split (NIH's official test list; CheXpert's
official validation set) the remaining rows are hashed over the *other* splits with their
fractions renormalised (:func:`remaining_fractions`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping

from cxrfoundry import schema

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}

#: Official split spellings → our split names.
OFFICIAL_SPLIT_NAMES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validate": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Validate split fractions (keys among train/val/test, non-negative, summing to 1)."""
    out = {str(k): float(v) for k, v in fractions.items()}
    bad = set(out) - set(schema.SPLITS)
    if bad:
        raise ValueError(f"split fractions: unknown splits {sorted(bad)}; use {schema.SPLITS}")
    if any(v < 0 for v in out.values()):
        raise ValueError(f"split fractions must be non-negative, got {out}")
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {total} ({out})")
    return out


def remaining_fractions(fractions: Mapping[str, float], taken: Iterable[str]) -> dict[str, float]:
    """Renormalise ``fractions`` over the splits not in ``taken`` (those set officially)."""
    rest = {k: v for k, v in fractions.items() if k not in set(taken)}
    total = sum(rest.values())
    if total <= 0:
        raise ValueError(
            f"no split left for hashed assignment: fractions {dict(fractions)}, "
            f"official splits {sorted(set(taken))}"
        )
    return {k: v / total for k, v in rest.items()}


def hash_unit(dataset: str, patient_id: str, salt: str = "") -> float:
    """A stable number in [0, 1) from ``(dataset, patient_id)`` (and an optional salt)."""
    digest = hashlib.sha256(f"{salt}{dataset}\0{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(
    dataset: str,
    patient_id: str,
    fractions: Mapping[str, float] | None = None,
    salt: str = "",
) -> str:
    """The hashed split of one patient: train/val/test by cumulative ``fractions``."""
    fractions = check_fractions(fractions or DEFAULT_FRACTIONS)
    u = hash_unit(dataset, patient_id, salt)
    cumulative = 0.0
    last = ""
    for name in schema.SPLITS:  # fixed order so the cut points never depend on dict order
        share = fractions.get(name, 0.0)
        if share <= 0:
            continue
        cumulative += share
        last = name
        if u < cumulative:
            return name
    return last


def official_split(value: str | None) -> str | None:
    """Map an official split spelling ("validate", "valid", ...) to ours; None when empty."""
    if value is None or str(value).strip() == "":
        return None
    key = str(value).strip().lower()
    if key not in OFFICIAL_SPLIT_NAMES:
        raise ValueError(f"unknown official split value {value!r}")
    return OFFICIAL_SPLIT_NAMES[key]


def patients_in_several_splits(
    patient_ids: Iterable[str], splits: Iterable[str]
) -> dict[str, list[str]]:
    """Patients that appear in more than one split (empty for a patient-disjoint split)."""
    seen: dict[str, set[str]] = defaultdict(set)
    for patient, split in zip(patient_ids, splits, strict=True):
        seen[patient].add(split)
    return {p: sorted(s) for p, s in sorted(seen.items()) if len(s) > 1}


def assign_splits(
    dataset: str,
    patient_ids: list[str],
    allowed: list[frozenset[str] | None],
    fractions: Mapping[str, float] | None = None,
    salt: str = "",
) -> tuple[list[str], dict[str, int]]:
    """Assign a split to every row, patient-disjoint, within the official split where possible.

    Args:
        dataset: the dataset name (part of the hash).
        patient_ids: one per row.
        allowed: one per row: the splits the official split permits (``{"test"}`` for an
            official test row, ``{"train", "val"}`` for NIH's train_val list) or None (any).
        fractions: hashed split fractions (default :data:`DEFAULT_FRACTIONS`).
        salt: optional salt to draw a different (still deterministic) split.

    All rows of a patient get the same split: the patient's allowed set is the intersection of
    its rows' sets, and the patient is hashed over that set with renormalised fractions. When
    an official split itself puts one patient in several splits (one patient id in two split
    files) the intersection is empty; the patient then goes, whole, to the most held-out split
    (:data:`HELD_OUT_ORDER`: test, then val, then train) among those its rows are officially in
    (one-split sets; wider sets only when there are none), so the split stays patient-disjoint
    and no image of an official test patient is trained on. Such patients and the rows moved
    away from their official split are counted.

    Returns:
        ``(splits, stats)`` with stats ``patients``, ``patients_official_conflict``,
        ``rows_moved_from_official_split``.
    """
    fractions = check_fractions(fractions or DEFAULT_FRACTIONS)
    every = frozenset(schema.SPLITS)
    per_patient: dict[str, frozenset[str]] = {}
    for patient, allow in zip(patient_ids, allowed, strict=True):
        allow = every if allow is None else allow
        per_patient[patient] = per_patient.get(patient, every) & allow
    # For a conflicting patient: the splits its rows are officially *in* (one-split sets; a
    # wider set such as CheXpert's train rows' {train, test} is only a hashing domain), else
    # every split its rows allow.
    fixed: dict[str, set[str]] = defaultdict(set)
    domain: dict[str, set[str]] = defaultdict(set)
    for patient, allow in zip(patient_ids, allowed, strict=True):
        if allow is not None and not per_patient[patient]:
            (fixed if len(allow) == 1 else domain)[patient].update(allow)
    conflicts = {p: _most_held_out(fixed[p] or domain[p]) for p, s in per_patient.items() if not s}
    cache: dict[tuple[str, frozenset[str]], str] = {}

    def pick(patient: str, allow: frozenset[str]) -> str:
        key = (patient, allow)
        if key not in cache:
            if len(allow) == 1:
                cache[key] = next(iter(allow))
            else:
                sub = remaining_fractions(fractions, every - allow)
                cache[key] = assign_split(dataset, patient, _pad(sub), salt)
        return cache[key]

    out = []
    moved = 0
    for patient, allow in zip(patient_ids, allowed, strict=True):
        if patient in conflicts:
            out.append(conflicts[patient])
            moved += int(allow is not None and conflicts[patient] not in allow)
        else:
            out.append(pick(patient, per_patient[patient]))
    if conflicts:
        logger.warning(
            "%s: %d patients are in several official splits; each goes whole to the most "
            "held-out of them (%d rows moved from their official split)",
            dataset,
            len(conflicts),
            moved,
        )
    return out, {
        "patients": len(per_patient),
        "patients_official_conflict": len(conflicts),
        "rows_moved_from_official_split": moved,
    }


#: Conflict resolution order for a patient in several official splits: most held-out first.
HELD_OUT_ORDER: tuple[str, ...] = ("test", "val", "train")


def _most_held_out(splits: set[str]) -> str:
    return next(s for s in HELD_OUT_ORDER if s in splits)


def _pad(fractions: Mapping[str, float]) -> dict[str, float]:
    """Fill absent splits with 0 so :func:`check_fractions` accepts a renormalised subset."""
    return {name: fractions.get(name, 0.0) for name in schema.SPLITS}
