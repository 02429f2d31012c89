"""Label mapping tables: each dataset's findings → the 14 CheXpert findings.

CheXpert-style sources (CheXpert, MIMIC-CXR-JPG, BRAX) already have the 14 columns with values
1 / 0 / -1 / blank; :func:`parse_chexpert_value` reads them and refuses anything else.

Term-list sources (NIH, PadChest, VinDr-CXR) are mapped with the tables below by
:func:`labels_from_terms`: a mapped term sets its CheXpert finding to 1; findings no term
mentions become 0 (``unmentioned="negative"``, the default for these sources, whose labels are
exhaustive for their vocabulary) or null (``unmentioned="null"``). Two consistency rules apply:

* ``No Finding`` is 1 only when the source says "normal"/"No Finding"/"No finding" and no
  mapped pathology is positive (``Support Devices`` does not count as a pathology), else 0;
* ``Lung Opacity`` is the parent of Edema, Consolidation, Pneumonia, Lung Lesion and
  Atelectasis in CheXpert's hierarchy; a source that flags a child but has no opacity term
  gets Lung Opacity null (unknown), never a contradicting 0.

The original terms are always kept in ``labels_extra`` (NIH and VinDr: every vocabulary term as
0/1; PadChest: every positive term as 1), so no information is lost by the mapping. The tables
are documented for users in docs/label-mapping.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from cxrfoundry import schema

#: CheXpert value spellings → int (blank → None).
_CHEXPERT_VALUES: dict[str, int | None] = {
    "": None,
    "1": 1,
    "1.0": 1,
    "0": 0,
    "0.0": 0,
    "-1": -1,
    "-1.0": -1,
    "nan": None,
}

NO_FINDING = "No Finding"
LUNG_OPACITY = "Lung Opacity"
#: CheXpert's hierarchy: findings that are kinds of lung opacity.
LUNG_OPACITY_CHILDREN: frozenset[str] = frozenset(
    {"Edema", "Consolidation", "Pneumonia", "Lung Lesion", "Atelectasis"}
)
#: Findings that do not make an image abnormal for the No Finding rule.
NOT_PATHOLOGY: frozenset[str] = frozenset({"No Finding", "Support Devices"})

#: NIH ChestX-ray14 "Finding Labels" terms → CheXpert finding (None: labels_extra only).
NIH_TO_CHEXPERT: dict[str, str | None] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Emphysema": None,
    "Fibrosis": None,
    "Hernia": None,
    # NIH "Infiltration" is a radiological opacity term; CheXpert's closest class is Lung Opacity.
    "Infiltration": "Lung Opacity",
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    "Pleural_Thickening": "Pleural Other",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "No Finding": "No Finding",
}
#: NIH's 14 disease labels (the NIH benchmark's classes), kept 0/1 in labels_extra.
NIH_FINDINGS: tuple[str, ...] = tuple(t for t in NIH_TO_CHEXPERT if t != "No Finding")

#: VinDr-CXR labels → CheXpert finding (None: labels_extra only).
VINDR_TO_CHEXPERT: dict[str, str | None] = {
    "Aortic enlargement": None,
    "Atelectasis": "Atelectasis",
    "Calcification": None,
    "Cardiomegaly": "Cardiomegaly",
    "Clavicle fracture": "Fracture",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Emphysema": None,
    "Enlarged PA": None,
    "ILD": None,
    "Infiltration": "Lung Opacity",
    "Lung Opacity": "Lung Opacity",
    "Lung cavity": None,
    "Lung cyst": None,
    "Mediastinal shift": None,
    "Nodule/Mass": "Lung Lesion",
    "Pleural effusion": "Pleural Effusion",
    "Pleural thickening": "Pleural Other",
    "Pneumothorax": "Pneumothorax",
    "Pulmonary fibrosis": None,
    "Rib fracture": "Fracture",
    "Other lesion": None,
    "COPD": None,
    "Lung tumor": "Lung Lesion",
    "Pneumonia": "Pneumonia",
    "Tuberculosis": None,
    "Other diseases": None,
    "No finding": "No Finding",
}

#: Other spellings of VinDr-CXR labels → the canonical one (the test files write
#: "Other disease", the train files "Other diseases").
VINDR_ALIASES: dict[str, str] = {"Other disease": "Other diseases"}

#: VinDr-CXR's label vocabulary (one spelling each), kept 0/1 in labels_extra.
VINDR_LABELS: tuple[str, ...] = tuple(VINDR_TO_CHEXPERT)


def vindr_label(name: str) -> str:
    """The canonical spelling of a VinDr-CXR label name (stripped; aliases resolved)."""
    name = name.strip()
    return VINDR_ALIASES.get(name, name)


#: PadChest label terms → CheXpert finding(s). Terms not listed go to labels_extra only.
PADCHEST_TO_CHEXPERT: dict[str, tuple[str, ...]] = {
    "normal": ("No Finding",),
    "mediastinal enlargement": ("Enlarged Cardiomediastinum",),
    "superior mediastinal enlargement": ("Enlarged Cardiomediastinum",),
    "mediastinal mass": ("Enlarged Cardiomediastinum",),
    "cardiomegaly": ("Cardiomegaly",),
    "infiltrates": ("Lung Opacity",),
    "alveolar pattern": ("Lung Opacity",),
    "interstitial pattern": ("Lung Opacity",),
    "reticular interstitial pattern": ("Lung Opacity",),
    "reticulonodular interstitial pattern": ("Lung Opacity",),
    "ground glass pattern": ("Lung Opacity",),
    "increased density": ("Lung Opacity",),
    "miliary opacities": ("Lung Opacity",),
    "nodule": ("Lung Lesion",),
    "multiple nodules": ("Lung Lesion",),
    "pulmonary mass": ("Lung Lesion",),
    "mass": ("Lung Lesion",),
    "lung metastasis": ("Lung Lesion",),
    "cavitation": ("Lung Lesion",),
    "pulmonary edema": ("Edema",),
    "consolidation": ("Consolidation",),
    "pneumonia": ("Pneumonia",),
    "atypical pneumonia": ("Pneumonia",),
    "atelectasis": ("Atelectasis",),
    "lobar atelectasis": ("Atelectasis",),
    "segmental atelectasis": ("Atelectasis",),
    "laminar atelectasis": ("Atelectasis",),
    "round atelectasis": ("Atelectasis",),
    "total atelectasis": ("Atelectasis",),
    "atelectasis basal": ("Atelectasis",),
    "pneumothorax": ("Pneumothorax",),
    "hydropneumothorax": ("Pneumothorax", "Pleural Effusion"),
    "pleural effusion": ("Pleural Effusion",),
    "loculated pleural effusion": ("Pleural Effusion",),
    "loculated fissural effusion": ("Pleural Effusion",),
    "costophrenic angle blunting": ("Pleural Effusion",),
    "pleural thickening": ("Pleural Other",),
    "apical pleural thickening": ("Pleural Other",),
    "calcified pleural thickening": ("Pleural Other",),
    "pleural plaques": ("Pleural Other",),
    "calcified pleural plaques": ("Pleural Other",),
    "rib fracture": ("Fracture",),
    "callus rib fracture": ("Fracture",),
    "clavicle fracture": ("Fracture",),
    "humeral fracture": ("Fracture",),
    "vertebral fracture": ("Fracture",),
    "pacemaker": ("Support Devices",),
    "dual chamber device": ("Support Devices",),
    "single chamber device": ("Support Devices",),
    "electrical device": ("Support Devices",),
    "tracheostomy tube": ("Support Devices",),
    "endotracheal tube": ("Support Devices",),
    "NSG tube": ("Support Devices",),
    "chest drain tube": ("Support Devices",),
    "ventriculoperitoneal drain tube": ("Support Devices",),
    "central venous catheter": ("Support Devices",),
    "central venous catheter via subclavian vein": ("Support Devices",),
    "central venous catheter via jugular vein": ("Support Devices",),
    "central venous catheter via umbilical vein": ("Support Devices",),
    "reservoir central venous catheter": ("Support Devices",),
    "PICC": ("Support Devices",),
    "artificial heart valve": ("Support Devices",),
    "artificial mitral heart valve": ("Support Devices",),
    "artificial aortic heart valve": ("Support Devices",),
}


class LabelError(ValueError):
    """A label value that cannot be parsed (the row goes to rejects with this message)."""


def parse_chexpert_value(value: Any, column: str) -> int | None:
    """Parse one CheXpert-style cell: 1/0/-1 (as int, float or text) or blank → None.

    Raises:
        LabelError: for anything else, naming the column and the value.
    """
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    key = str(value).strip().lower()
    if key in _CHEXPERT_VALUES:
        return _CHEXPERT_VALUES[key]
    raise LabelError(f"unparseable label value {value!r} in column {column!r}")


def chexpert_columns(
    row: Mapping[str, Any], columns: Mapping[str, str] | None = None
) -> dict[str, int | None]:
    """Read CheXpert-style finding cells of ``row`` → {finding column: 1 | 0 | -1 | None}.

    ``columns`` maps a CheXpert display name to the source column holding it (default: the
    display names themselves). A finding whose column is absent from ``row`` is null.
    """
    if columns is not None:
        unknown = set(columns) - set(schema.FINDING_NAMES)
        if unknown:
            raise ValueError(f"unknown CheXpert findings {sorted(unknown)}")
    out: dict[str, int | None] = {}
    for name, col in schema.FINDINGS:
        source = name if columns is None else columns.get(name)
        out[col] = parse_chexpert_value(row[source], source) if source in row else None
    return out


def labels_from_terms(
    terms: Iterable[str],
    table: Mapping[str, Any],
    *,
    unmentioned: str = "negative",
    normal_terms: Iterable[str] = ("No Finding", "No finding", "normal"),
) -> dict[str, int | None]:
    """Map positive source terms to the 14 finding columns (see the module docstring rules).

    Args:
        terms: the positive terms of one image.
        table: term → CheXpert name, tuple of names, or None (extra only).
        unmentioned: ``negative`` (0) or ``null`` for findings no term mentions.
        normal_terms: terms meaning "no finding".

    Returns:
        {finding column: 1 | 0 | None}.
    """
    if unmentioned not in ("negative", "null"):
        raise ValueError(f"unmentioned must be 'negative' or 'null', got {unmentioned!r}")
    positives: set[str] = set()
    normal = False
    for term in terms:
        if term in normal_terms:
            normal = True
            continue
        target = table.get(term)
        if target is None:
            continue
        for name in (target,) if isinstance(target, str) else target:
            if name == NO_FINDING:
                normal = True
            else:
                positives.add(name)
    default = 0 if unmentioned == "negative" else None
    out: dict[str, int | None] = {}
    for name, col in schema.FINDINGS:
        out[col] = 1 if name in positives else default
    pathology = positives - NOT_PATHOLOGY
    if pathology:
        out["no_finding"] = 0
    elif normal:
        out["no_finding"] = 1
    else:
        out["no_finding"] = default
    if LUNG_OPACITY not in positives and positives & LUNG_OPACITY_CHILDREN:
        out["lung_opacity"] = None
    return out


def unknown_terms(terms: Iterable[str], table: Mapping[str, Any]) -> list[str]:
    """Terms of a closed vocabulary (NIH, VinDr) that ``table`` does not know."""
    return sorted({t for t in terms if t not in table})
