"""Deterministic template report writer (the default backend and the LLM fallback).

A report is written from structured metadata only (age, sex, race, view, the 14 CheXpert
labels), in the five-part structure of the ChexGen method: patient information, technique,
one findings paragraph naming every given finding with its typical appearance (uncertain ones
hedged, negative ones denied, unmentioned ones left out), an impression, and no speculation
(nothing is said that the metadata does not support). Phrasings are drawn per row from a
generator seeded by (seed, image_id), so a rerun is bit-identical and rows differ in wording.
Every phrasing is parsed back correctly by :mod:`cxrfoundry.reports.checker` (tested).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from typing import Any

from cxrfoundry.schema import FINDING_COLUMN_BY_NAME, FINDING_NAMES, NEGATIVE, POSITIVE, UNCERTAIN

# Per finding: positive (with typical appearance), negative, uncertain phrasings, impression noun.
PHRASES: dict[str, dict[str, tuple[str, ...] | str]] = {
    "Enlarged Cardiomediastinum": {
        "pos": (
            "The mediastinum is widened, with broadening of the superior mediastinal contour.",
            "The cardiomediastinal silhouette is enlarged.",
            "Widening of the mediastinum is noted.",
        ),
        "neg": ("The mediastinum is not widened.", "No mediastinal widening."),
        "unc": (
            "Possible widening of the mediastinum.",
            "A widened mediastinum cannot be excluded.",
        ),
        "noun": "enlarged cardiomediastinum",
    },
    "Cardiomegaly": {
        "pos": (
            "The heart is enlarged, with an increased cardiothoracic ratio.",
            "Cardiomegaly is present.",
            "The cardiac silhouette is enlarged.",
        ),
        "neg": ("The heart size is normal.", "No cardiomegaly.", "The heart is not enlarged."),
        "unc": (
            "Possible mild cardiomegaly.",
            "Borderline cardiomegaly.",
            "Cardiomegaly cannot be excluded.",
        ),
        "noun": "cardiomegaly",
    },
    "Lung Opacity": {
        "pos": (
            "There is a hazy opacity in the lung parenchyma.",
            "Patchy airspace opacity is seen.",
            "An area of increased lung opacity is present.",
        ),
        "neg": ("No focal lung opacity.", "There is no parenchymal opacity."),
        "unc": ("Possible faint lung opacity.", "A subtle opacity cannot be excluded."),
        "noun": "lung opacity",
    },
    "Lung Lesion": {
        "pos": (
            "A well-circumscribed pulmonary nodule is seen.",
            "A rounded lung mass is present.",
            "There is a nodule with smooth margins in the lung.",
        ),
        "neg": ("No pulmonary nodule or mass.", "There is no lung nodule."),
        "unc": ("Possible small pulmonary nodule.", "A lung nodule cannot be excluded."),
        "noun": "lung lesion",
    },
    "Edema": {
        "pos": (
            "Pulmonary edema is present, with interstitial markings and vascular congestion.",
            "There is interstitial pulmonary edema.",
            "Diffuse edema of the lungs is seen.",
        ),
        "neg": ("No pulmonary edema.", "There is no vascular congestion or edema."),
        "unc": ("Possible mild pulmonary edema.", "Pulmonary edema cannot be excluded."),
        "noun": "pulmonary edema",
    },
    "Consolidation": {
        "pos": (
            "There is focal consolidation with air bronchograms.",
            "Consolidation is present.",
            "A dense area of consolidation is seen.",
        ),
        "neg": ("No focal consolidation.", "There is no consolidation."),
        "unc": ("Possible early consolidation.", "Consolidation cannot be excluded."),
        "noun": "consolidation",
    },
    "Pneumonia": {
        "pos": (
            "Pneumonia is present.",
            "The appearance is typical of pneumonia.",
            "There is pneumonia.",
        ),
        "neg": ("No evidence of pneumonia.", "There is no pneumonia."),
        "unc": ("Pneumonia cannot be excluded.", "Possible early pneumonia."),
        "noun": "pneumonia",
    },
    "Atelectasis": {
        "pos": (
            "There is linear atelectasis.",
            "Atelectasis is present, with volume loss.",
            "Subsegmental atelectasis is seen.",
        ),
        "neg": ("No atelectasis.", "There is no atelectasis."),
        "unc": ("Possible subsegmental atelectasis.", "Atelectasis cannot be excluded."),
        "noun": "atelectasis",
    },
    "Pneumothorax": {
        "pos": (
            "A pneumothorax is present, with a visible visceral pleural line.",
            "There is a pneumothorax.",
            "A pneumothorax is seen at the lung apex.",
        ),
        "neg": ("No pneumothorax.", "There is no pneumothorax."),
        "unc": ("Possible small pneumothorax.", "A small pneumothorax cannot be excluded."),
        "noun": "pneumothorax",
    },
    "Pleural Effusion": {
        "pos": (
            "A pleural effusion is present, with blunting of the costophrenic angle.",
            "There is a pleural effusion layering at the lung base.",
            "Pleural effusion is seen, with a meniscus at the lung base.",
        ),
        "neg": ("No pleural effusion.", "There is no pleural effusion."),
        "unc": ("Possible small pleural effusion.", "A small pleural effusion cannot be excluded."),
        "noun": "pleural effusion",
    },
    "Pleural Other": {
        "pos": (
            "Pleural thickening is present along the chest wall.",
            "There is pleural thickening.",
            "Smooth pleural thickening is seen.",
        ),
        "neg": ("No pleural thickening.", "There is no pleural thickening."),
        "unc": ("Possible mild pleural thickening.", "Pleural thickening cannot be excluded."),
        "noun": "pleural thickening",
    },
    "Fracture": {
        "pos": (
            "A rib fracture is seen, with a cortical step.",
            "There is a displaced rib fracture.",
            "A fracture of a rib is present.",
        ),
        "neg": ("No displaced rib fracture.", "There is no fracture."),
        "unc": ("Possible rib fracture.", "A subtle rib fracture cannot be excluded."),
        "noun": "fracture",
    },
    "Support Devices": {
        "pos": (
            "Support devices are in place.",
            "A support device projects over the chest.",
            "Lines and tubes are present.",
        ),
        "neg": ("No support devices.", "No support devices are seen."),
        "unc": ("Possible support device over the chest.",),
        "noun": "support devices",
    },
}

NORMAL_IMPRESSION = "No acute cardiopulmonary abnormality."
_TECHNIQUE = {
    "PA": ("Single frontal posteroanterior (PA) view of the chest.", "PA chest radiograph."),
    "AP": ("Frontal anteroposterior (AP) view of the chest.", "Portable AP chest radiograph."),
    "AP_SUPINE": ("Supine anteroposterior (AP) view of the chest.", "Supine AP chest radiograph."),
    "LATERAL": ("Lateral view of the chest.",),
}
_SEX_WORDS = {"M": ("male", "man"), "F": ("female", "woman")}


def row_rng(seed: int, image_id: str) -> random.Random:
    """A generator seeded from (seed, image_id) only, independent of row order."""
    digest = hashlib.sha256(f"{seed}\0{image_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _age(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def patient_sentence(row: Mapping[str, Any], rng: random.Random) -> str:
    """Patient information: age, sex and (when known) race, with no invented detail."""
    age = _age(row.get("age"))
    sex = row.get("sex")
    noun = rng.choice(_SEX_WORDS[sex]) if sex in _SEX_WORDS else "patient"
    if age is not None and rng.random() < 0.5:
        text = f"{age}-year-old {noun}."
    elif age is not None:
        text = f"{noun.capitalize()}, {age} years old."
    else:
        text = f"{noun.capitalize()} of unknown age."
    race = row.get("race")
    if race:
        text += f" Race: {race}."
    return text


def _join(nouns: list[str]) -> str:
    return nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + " and " + nouns[-1]


def template_report(row: Mapping[str, Any], *, seed: int) -> str:
    """Write the template report for one manifest row (needs ``image_id``; labels may be null)."""
    rng = row_rng(seed, str(row["image_id"]))
    by_status: dict[int, list[str]] = {POSITIVE: [], UNCERTAIN: [], NEGATIVE: []}
    for name in FINDING_NAMES[1:]:
        value = row.get(FINDING_COLUMN_BY_NAME[name])
        if value is not None and int(value) in by_status:
            by_status[int(value)].append(name)
    sentences: list[str] = []
    for status, key in ((POSITIVE, "pos"), (UNCERTAIN, "unc"), (NEGATIVE, "neg")):
        names = list(by_status[status])
        rng.shuffle(names)
        sentences += [rng.choice(PHRASES[name][key]) for name in names]
    if not sentences:
        sentences.append("No specific findings are reported.")

    abnormal = [n for n in by_status[POSITIVE] + by_status[UNCERTAIN] if n != "Support Devices"]
    impression: list[str] = []
    if by_status[POSITIVE]:
        nouns = [str(PHRASES[n]["noun"]) for n in by_status[POSITIVE]]
        impression.append(_join(nouns)[0].upper() + _join(nouns)[1:] + ".")
    if by_status[UNCERTAIN]:
        impression.append(
            "Possible " + _join([str(PHRASES[n]["noun"]) for n in by_status[UNCERTAIN]]) + "."
        )
    if not abnormal:
        impression.append(NORMAL_IMPRESSION)

    view = row.get("view") or "UNKNOWN"
    technique = rng.choice(_TECHNIQUE.get(view, ("Frontal view of the chest.",)))
    return (
        f"PATIENT INFORMATION: {patient_sentence(row, rng)}\n"
        f"TECHNIQUE: {technique}\n"
        f"FINDINGS: {' '.join(sentences)}\n"
        f"IMPRESSION: {' '.join(impression)}\n"
    )
