"""Deterministic report checker: finding mentions with negation/uncertainty, compared with labels.

The extractor is a small NegEx-style rule system written for chest radiograph reports:

1. the text is split into sentences and each sentence into clauses at scope terminators
   ("but", "however", "except", "aside from", ";", "there is" ...), because a negation cue
   in NegEx only reaches to the end of its clause;
2. fixed "normal" phrases ("heart size is normal", "no acute cardiopulmonary abnormality")
   are read first and blanked, so the "no" inside them cannot negate anything else;
3. pseudo-negations ("no change in", "no interval change") are blanked;
4. every synonym of a CheXpert finding (``SYNONYMS``) is located; a mention is *uncertain* if an
   uncertainty cue precedes it in its clause ("possible", "may represent", "likely") or follows
   it ("cannot be excluded"), else *negative* if a negation cue precedes ("no", "without",
   "negative for", "free of") or follows it ("is not seen", "has resolved"), else *positive*;
5. per finding the mentions are aggregated like the CheXpert labeler: positive beats uncertain
   beats negative.

:func:`check_report` compares the extraction with a row's labels and demographics and returns
flags: ``missing_positive:<finding>``, ``contradicts_negative:<finding>``,
``unsupported:<finding>``, ``sex_mismatch``, ``age_mismatch``, ``view_mismatch``.
Precision/recall on real Open-I reports and on template reports are in docs/reports.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cxrfoundry.schema import FINDING_COLUMN_BY_NAME, FINDING_NAMES, NEGATIVE, POSITIVE, UNCERTAIN

NO_FINDING = "No Finding"

#: Regular expressions (lower-case text) that name each finding when affirmed.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        r"widen(?:ed|ing) (?:of the )?(?:superior )?mediastin\w*",
        r"mediastin\w* (?:contours? |silhouette )?(?:is |are |appears |may be )?"
        r"(?:(?!not\b)\w+ ){0,2}(?:widened|widening|enlarged|enlargement)",
        r"enlarged (?:cardio)?mediastin\w*(?: (?:silhouette|contours?))?",
        r"cardiomediastinal (?:silhouette|contours?) (?:is |are |appears? )?(?:(?!not\b)\w+ )?"
        r"(?:enlarged|widened|prominent)",
        r"enlarged cardiomediastinal",
        r"enlarged cardiomediastinum",
    ),
    "Cardiomegaly": (
        r"cardiomegaly",
        r"enlarged (?:heart|cardiac (?:silhouette|shadow|size))",
        r"heart (?:size )?(?:is |appears |remains |may be )?(?:(?!not\b)\w+ ){0,2}enlarged",
        r"cardiac (?:silhouette|shadow|size) (?:is |appears |remains )?(?:(?!not\b)\w+ )?enlarged",
        r"cardiac enlargement",
        r"enlargement of the (?:heart|cardiac (?:silhouette|shadow))",
        r"heart size (?:is )?(?:(?!not\b)\w+ )?(?:increased|large)",
        r"(?:heart|cardiac silhouette) (?:size )?(?:is )?borderline(?: in size| enlarged)?",
    ),
    "Lung Opacity": (
        r"opacit(?:y|ies)",
        r"opacification",
        r"infiltrat(?:e|es|ion|ive)",
        r"airspace (?:disease|process)",
        r"air-space (?:disease|process)",
    ),
    "Lung Lesion": (
        r"nodul(?:e|es|ar)",
        r"(?<!soft tissue )mass(?:es)?",
        r"(?:lung|pulmonary|cavitary) lesions?",
        r"neoplasm",
        r"tumou?r",
        r"carcinoma",
    ),
    "Edema": (
        r"o?edema",
        r"vascular congestion",
        r"pulmonary congestion",
        r"congestive (?:heart )?failure",
        r"\bchf\b",
        r"kerley",
        r"cephalization",
    ),
    "Consolidation": (r"consolidat(?:ion|ions|ive|ed)",),
    "Pneumonia": (r"pneumonias?", r"bronchopneumonia", r"infect(?:ion|ious)"),
    "Atelectasis": (r"atelecta\w*", r"(?:lobar|lung|segmental|lobe) collapse"),
    "Pneumothorax": (r"pneumothora(?:x|ces)", r"hydropneumothorax"),
    "Pleural Effusion": (
        r"(?<!pericardial )effusions?",
        r"pleural fluid",
        r"hydrothorax",
        r"hydropneumothorax",
        r"blunting of the (?:\w+ )?costophrenic",
        r"costophrenic (?:angle )?blunting",
    ),
    "Pleural Other": (
        r"pleural (?:thickening|plaques?|scar\w*|calcifications?)",
        r"pleuro-?parenchymal (?:scar\w*|thickening)",
        r"pleural-parenchymal (?:scar\w*|thickening)",
        r"fibrothorax",
        r"apical (?:pleural )?(?:cap|thickening)",
    ),
    "Fracture": (r"fractur\w*",),
    "Support Devices": (
        r"support devices?",
        r"(?:medical|implanted|cardiac) devices?",
        r"pacemaker",
        r"pacer",
        r"\bpicc\b",
        r"catheters?",
        r"(?:endotracheal|tracheostomy|nasogastric|orogastric|enteric|feeding|chest|et|ng|og) "
        r"tubes?",
        r"(?:central|venous|arterial|picc|port|swan[- ]ganz|dialysis) lines?",
        r"lines? and tubes?",
        r"tubes? and lines?",
        r"port-?a-?cath",
        r"mediport",
        r"defibrillator",
        r"\ba?icd\b",
        r"stents?",
        r"sternotomy wires?",
        r"(?:surgical|chest) drains?",
        r"(?:orthopedic|spinal|fixation) hardware",
        r"(?:pacing|pacer|pacemaker|cardiac|monitoring|ecg|ekg) leads?",
    ),
}

#: Phrases that state a finding is absent without a negation cue ("heart size is normal").
NORMAL_PHRASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        r"(?:heart|cardiac) and mediastin\w* (?:contours? )?(?:are |is )?(?:within normal limits"
        r"|normal|unremarkable|stable)",
        ("Cardiomegaly", "Enlarged Cardiomediastinum"),
    ),
    (
        r"(?:normal|unremarkable) cardiomediastinal (?:silhouette|contours?)"
        r"|cardiomediastinal (?:silhouette|contours?) (?:is |are )?(?:within normal limits|normal"
        r"|unremarkable|stable|not enlarged)",
        ("Cardiomegaly", "Enlarged Cardiomediastinum"),
    ),
    (
        r"(?:normal|unremarkable) (?:mediastin\w*|mediastinal (?:silhouette|contours?))"
        r"|mediastin\w* (?:contours? |silhouette )?(?:is |are |appears )?(?:within normal limits"
        r"|normal|unremarkable|not widened)",
        ("Enlarged Cardiomediastinum",),
    ),
    (
        r"normal (?:heart|cardiac) (?:size|silhouette)"
        r"|(?:heart|cardiac) (?:size|silhouette) (?:is |appears |remains )?(?:within normal limits"
        r"|normal|unremarkable|upper limits? of normal|stable|not enlarged)"
        r"|heart (?:is |appears )?(?:normal in size|of normal size|not enlarged|normal)",
        ("Cardiomegaly",),
    ),
    (r"no acute (?:osseous|bony) (?:abnormalit(?:y|ies)|findings?|injury)", ("Fracture",)),
)

#: Phrases that affirm a normal study (CheXpert "No Finding").
NO_FINDING_PHRASES: tuple[str, ...] = (
    r"no acute (?:cardiopulmonary|cardiothoracic|intrathoracic|pulmonary|chest|radiographic|"
    r"osseous or cardiopulmonary|cardiopulmonary or osseous) (?:abnormalit(?:y|ies)|process"
    r"|disease|findings?|pathology|change)",
    r"no acute (?:abnormalit(?:y|ies)|process|disease|findings?)",
    r"no active (?:cardiopulmonary )?(?:disease|process)",
    r"normal (?:chest|study|examination|exam|radiograph|chest radiograph|chest x-ray)",
    r"no (?:radiographic )?evidence of (?:acute|active) (?:cardiopulmonary )?(?:disease|process)",
)

PSEUDO_NEGATIONS = (
    r"no (?:significant |interval |substantial )?change",
    r"without (?:significant |interval )?change",
    r"no (?:significant )?increase",
    r"not only",
    r"gram[- ]negative",
    r"no longer in place",
)

NEG_PRE = (
    r"\bno\b",
    r"\bwithout\b",
    r"\bnegative for\b",
    r"\bfree of\b",
    r"\babsence of\b",
    r"\babsent\b",
    r"\bnot\b",
    r"\bclear of\b",
    r"\bresolution of\b",
    r"\bresolved\b",
    r"\bremoval of\b",
    r"\bruled out\b",
    r"\bnor\b",
)
NEG_POST = (
    r"\b(?:is |are |was |were )?not (?:seen|identified|present|visualized|evident|appreciated"
    r"|demonstrated|noted|detected)\b",
    r"\b(?:has |have )?resolved\b",
    r"\b(?:is |are )?absent\b",
    r"\bno longer (?:seen|visible|present|visualized|evident)\b",
    r"\bhas been removed\b|\bhave been removed\b|\bremoved\b",
)
UNC_PRE = (
    r"\bpossibl[ey]\b",
    r"\bmay (?:represent|be|reflect|indicate|have)\b",
    r"\bcould (?:represent|be|reflect|indicate)\b",
    r"\bmight\b",
    r"\bprobabl[ey]\b",
    r"\blikely\b",
    r"\bsuspicious for\b",
    r"\bsuspect(?:ed)?\b",
    r"\bsuggest(?:s|ive of|ing)?\b",
    r"\bquestion(?:able)? (?:of )?\b",
    r"\bconcern(?:ing)? for\b",
    r"\bversus\b|\bvs\.?\b",
    r"\bcannot (?:be )?(?:excluded?|ruled out)\b|\bcannot rule out\b|\bcan't exclude\b",
    r"\brule out\b",
    r"\bevaluate for\b",
    r"\bborderline\b",
    r"\bequivocal\b",
    r"\bindeterminate\b",
    r"\bdifferential\b",
    r"\bworrisome for\b",
    r"\bpresumed\b",
)
UNC_POST = (
    r"\bcan ?not (?:be )?(?:excluded|ruled out)\b",
    r"\b(?:is |are )?not (?:be )?excluded\b",
    r"\b(?:is |are )?(?:possible|suspected|questioned|likely|probable)\b",
    r"\bversus\b|\bvs\.?\b",
    r"\bnot (?:entirely )?(?:excluded|ruled out)\b",
)
TERMINATORS = (
    r"\bbut\b",
    r"\bhowever\b",
    r"\balthough\b",
    r"\bthough\b",
    r"\bexcept\b",
    r"\baside from\b",
    r"\bapart from\b",
    r"\bwhich\b",
    r"\bwhereas\b",
    r"\bthere (?:is|are)\b",
    r";",
    r":",
)


def _compile(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


_SYNONYM_RE = {name: _compile(tuple(rf"\b{p}\b" for p in pats)) for name, pats in SYNONYMS.items()}
_NORMAL_RE = [(re.compile(p), names) for p, names in NORMAL_PHRASES]
_NO_FINDING_RE = _compile(NO_FINDING_PHRASES)
_PSEUDO_RE = _compile(PSEUDO_NEGATIONS)
_NEG_PRE_RE = _compile(NEG_PRE)
_NEG_POST_RE = _compile(NEG_POST)
_UNC_PRE_RE = _compile(UNC_PRE)
_UNC_POST_RE = _compile(UNC_POST)
_TERMINATOR_RE = _compile(TERMINATORS)
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+|\n+")

_MALE_RE = re.compile(r"\b(?:male|man|gentleman|boy)\b")
_FEMALE_RE = re.compile(r"\b(?:female|woman|lady|girl)\b")
_AGE_RE = re.compile(r"\b(\d{1,3})[- ](?:years?|yrs?|yo)(?:[- ]old)?\b|\baged? (\d{1,3})\b")
_VIEW_RES = (
    ("PA", re.compile(r"\bPA\b|posteroanterior|postero-anterior", re.IGNORECASE)),
    ("AP", re.compile(r"\bAP\b|anteroposterior|antero-posterior|\bsupine\b|\bportable\b", re.I)),
)


@dataclass
class Extraction:
    """What a report says: finding -> 1 / 0 / -1, plus demographics and views it mentions."""

    findings: dict[str, int] = field(default_factory=dict)
    sexes: set[str] = field(default_factory=set)
    ages: set[int] = field(default_factory=set)
    views: set[str] = field(default_factory=set)


def _blank(text: str, start: int, end: int) -> str:
    return text[:start] + " " * (end - start) + text[end:]


def _clauses(text: str) -> list[str]:
    clauses: list[str] = []
    for sentence in _SENTENCE_RE.split(text):
        pieces = _TERMINATOR_RE.split(sentence)
        clauses.extend(p for p in pieces if p and p.strip())
    return clauses


def _clause_mentions(clause: str) -> list[tuple[str, int]]:
    """Return (finding, status) for every finding mention in one clause."""
    found: list[tuple[str, int]] = []
    for match in _NO_FINDING_RE.finditer(clause):
        found.append((NO_FINDING, POSITIVE))
        clause = _blank(clause, *match.span())
    for pattern, names in _NORMAL_RE:
        for match in pattern.finditer(clause):
            found.extend((name, NEGATIVE) for name in names)
            clause = _blank(clause, *match.span())
    for match in _PSEUDO_RE.finditer(clause):
        clause = _blank(clause, *match.span())

    spans: list[tuple[int, int, str]] = []
    for name, pattern in _SYNONYM_RE.items():
        spans.extend((m.start(), m.end(), name) for m in pattern.finditer(clause))
    if not spans:
        return found
    neg_pre = [m.end() for m in _NEG_PRE_RE.finditer(clause)]
    neg_post = [m.start() for m in _NEG_POST_RE.finditer(clause)]
    unc_pre = [m.end() for m in _UNC_PRE_RE.finditer(clause)]
    unc_post = [m.start() for m in _UNC_POST_RE.finditer(clause)]
    for start, end, name in spans:
        # An uncertainty cue inside the mention ("heart is borderline in size") counts too.
        if any(p <= end for p in unc_pre) or any(p >= end for p in unc_post):
            status = UNCERTAIN
        elif any(p <= start for p in neg_pre) or any(p >= end for p in neg_post):
            status = NEGATIVE
        else:
            status = POSITIVE
        found.append((name, status))
    return found


_RANK = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}


def extract(text: str | None) -> Extraction:
    """Extract finding mentions (aggregated per finding), sexes, ages and frontal views."""
    result = Extraction()
    if not text:
        return result
    lower = text.lower()
    for clause in _clauses(lower):
        for name, status in _clause_mentions(clause):
            old = result.findings.get(name)
            if old is None or _RANK[status] > _RANK[old]:
                result.findings[name] = status
    # CheXpert-style No Finding: a normal statement (or only negations) and nothing abnormal.
    abnormal = any(
        status in (POSITIVE, UNCERTAIN)
        for name, status in result.findings.items()
        if name not in (NO_FINDING, "Support Devices")
    )
    if abnormal:
        result.findings.pop(NO_FINDING, None)
    elif any(s == NEGATIVE for s in result.findings.values()):
        result.findings[NO_FINDING] = POSITIVE
    if _MALE_RE.search(lower):
        result.sexes.add("M")
    if _FEMALE_RE.search(lower):
        result.sexes.add("F")
    for match in _AGE_RE.finditer(lower):
        result.ages.add(int(match.group(1) or match.group(2)))
    for view, pattern in _VIEW_RES:
        if pattern.search(text):
            result.views.add(view)
    return result


# CheXpert hierarchy: a child finding supports (and satisfies) its parent.
_CHILDREN = {
    "Lung Opacity": ("Consolidation", "Pneumonia", "Edema", "Atelectasis", "Lung Lesion"),
    "Enlarged Cardiomediastinum": ("Cardiomegaly",),
}
_PARENT = {child: parent for parent, kids in _CHILDREN.items() for child in kids}


def row_labels(row: Mapping[str, Any]) -> dict[str, int | None]:
    """The 14 finding labels of a manifest row, keyed by display name (None = unmentioned)."""
    labels: dict[str, int | None] = {}
    for name in FINDING_NAMES:
        value = row.get(FINDING_COLUMN_BY_NAME[name])
        labels[name] = None if value is None else int(value)
    return labels


def compare(
    extraction: Extraction, row: Mapping[str, Any], *, age_tolerance: float = 1.0
) -> list[str]:
    """Flags for disagreements between an extraction and a row's labels and demographics."""
    labels = row_labels(row)
    said = extraction.findings
    flags: list[str] = []
    for name in FINDING_NAMES:
        if name == NO_FINDING:
            continue
        label = labels[name]
        status = said.get(name)
        kids_positive = any(said.get(k) == POSITIVE for k in _CHILDREN.get(name, ()))
        kids_labelled = any(labels[k] in (POSITIVE, UNCERTAIN) for k in _CHILDREN.get(name, ()))
        parent_labelled = name in _PARENT and labels[_PARENT[name]] in (POSITIVE, UNCERTAIN)
        if label == POSITIVE:
            if status != POSITIVE and not kids_positive:
                flags.append(f"missing_positive:{name}")
        elif label == NEGATIVE:
            if status in (POSITIVE, UNCERTAIN):
                flags.append(f"contradicts_negative:{name}")
        elif label == UNCERTAIN:
            if status == POSITIVE:
                flags.append(f"unsupported:{name}")
        elif (
            status in (POSITIVE, UNCERTAIN)
            and not kids_labelled
            and not (parent_labelled and status == UNCERTAIN)
        ):
            # An unlabelled parent named for a labelled child is fine ("opacity" for
            # consolidation) and so is a child hedged under an uncertain parent label.
            flags.append(f"unsupported:{name}")
    sex = row.get("sex")
    if sex in ("M", "F") and extraction.sexes and sex not in extraction.sexes:
        flags.append("sex_mismatch")
    age = row.get("age")
    known_age = age is not None and not (isinstance(age, float) and math.isnan(age))
    if (
        known_age
        and extraction.ages
        and all(abs(a - float(age)) > age_tolerance for a in extraction.ages)
    ):
        flags.append("age_mismatch")
    view = row.get("view")
    family = {"PA": "PA", "AP": "AP", "AP_SUPINE": "AP"}.get(view or "")
    if family and extraction.views and family not in extraction.views:
        flags.append("view_mismatch")
    return flags


def check_report(text: str | None, row: Mapping[str, Any]) -> list[str]:
    """Check one report against its row: ``extract`` then ``compare``; empty text is flagged."""
    if not text or not text.strip():
        return ["empty_report"]
    return compare(extract(text), row)


def flag_kind(flag: str) -> str:
    """A flag without its finding, for counting.

    ``missing_positive:Edema`` -> ``missing_positive``; ``repaired:unsupported:Edema`` ->
    ``repaired:unsupported``; ``llm_error:writer:timeout`` stays as it is.
    """
    parts = flag.split(":")
    if parts[0] == "llm_error":
        return flag
    if parts[0] in ("repaired", "rejected"):
        return ":".join(parts[:2])
    return parts[0]
