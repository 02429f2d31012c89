"""Demo source datasets: phantom radiographs written in the native layouts of real datasets.

:func:`write_demo_source` writes one source folder that a real adapter can read as if it were
the real download, plus ground truth the real datasets lack. Kinds and their layouts:

``mimic`` (MIMIC-CXR-JPG 2.0.0):
    ``files/pXX/p{subject_id}/s{study_id}/{dicom_id}.jpg``;
    ``mimic-cxr-2.0.0-metadata.csv.gz`` (dicom_id, subject_id, study_id,
    PerformedProcedureStepDescription, ViewPosition, Rows, Columns, StudyDate, StudyTime,
    ProcedureCodeSequence_CodeMeaning, ViewCodeSequence_CodeMeaning,
    PatientOrientationCodeSequence_CodeMeaning); ``ViewPosition`` holds PA, AP, LATERAL, LL or
    is empty: for ``empty_view_fraction`` of images it is blank and either the
    ``ViewCodeSequence_CodeMeaning`` ("postero-anterior", "antero-posterior", "lateral") or the
    procedure ("CHEST (PORTABLE AP)") still tells the view, or (``unknown_view_share`` of the
    blanks) nothing does (procedure "CHEST (PA AND LAT)", no view code);
    ``mimic-cxr-2.0.0-chexpert.csv.gz`` (subject_id, study_id, the 14 findings in the real
    file's alphabetical order; 1.0 / 0.0 / -1.0 / blank); ``mimic-cxr-2.0.0-split.csv.gz``
    (dicom_id, study_id, subject_id, split in train/validate/test, by subject);
    free-text reports ``files/pXX/p{subject_id}/s{study_id}.txt`` (FINDINGS / IMPRESSION);
    demographics modelled on MIMIC-IV ``hosp``: ``patients.csv.gz`` (subject_id, gender,
    anchor_age, anchor_year, anchor_year_group, dod) and ``admissions.csv.gz`` (subject_id,
    hadm_id, admittime, race), both at the source root. Age at a study is
    ``anchor_age + (study year - anchor_year)``.
``chexpert`` (CheXpert-v1.0-small):
    ``CheXpert-v1.0-small/{train,valid}.csv`` (Path, Sex, Age, Frontal/Lateral, AP/PA, the 14
    findings) with ``Path`` = ``CheXpert-v1.0-small/{train|valid}/patientNNNNN/studyN/
    viewN_{frontal|lateral}.jpg`` relative to the source root, as in the real download.
    ``valid.csv`` has only 0.0/1.0 labels (as the real one); ``train.csv`` has blanks and -1.0.
    In ``phantom_truth.csv`` its ``view_raw`` is ``"{Frontal/Lateral}/{AP/PA}"``.
``nih`` (ChestX-ray14):
    ``images/NNNNNNNN_NNN.png``; ``Data_Entry_2017.csv`` with the real v2020 header
    (``OriginalImage[Width,Height]`` and ``OriginalImagePixelSpacing[x,y]`` split into two
    columns each by the unquoted comma); ``Finding Labels`` pipe-separated in NIH's vocabulary
    (:data:`NIH_FROM_CHEXPERT`); ``View Position`` PA/AP only; ``BBox_List_2017.csv`` with the
    real header ``Image Index,Finding Label,Bbox [x,y,w,h],,,`` for ``bbox_fraction`` of the
    images that have a box-able finding (labels Atelectasis, Cardiomegaly, Effusion,
    Infiltrate, Mass, Nodule, Pneumonia, Pneumothorax).
``dicom`` (VinDr-CXR-like):
    ``train/{image_id}.dicom`` (CR or DX, valid file meta, 12-bit), some MONOCHROME1 (pixels
    inverted), some RLE Lossless, some JPEG Baseline (8-bit); ``ViewPosition`` present for most,
    absent for ``missing_view_fraction`` but told by ``SeriesDescription`` or
    ``ViewCodeSequence``, absent with nothing else for ``no_view_fraction``; PatientID,
    PatientSex, PatientAge ("045Y"), EthnicGroup (race), StudyInstanceUID.
    Labels follow VinDr-CXR: ``annotations/image_labels_train.csv`` (image_id, rad_id and
    VinDr's 28 labels as 0/1, three readers per image; the union over readers equals the truth)
    and ``annotations/annotations_train.csv`` (image_id, rad_id, class_name, x_min, y_min,
    x_max, y_max; "No finding" rows have empty coordinates).

Every source also gets ``phantom_truth.csv`` at its root: image_id, patient_id, study_id,
image_path (relative to the root, as the native metadata refers to it), mask_path (relative;
``masks/<image_path>.png``, bit 0 lungs, bit 1 heart, bit 2 lesion, see
:data:`cxrfoundry.schema.MASK_BITS`), boxes (JSON list of {"label","x","y","w","h"}), view
(true), view_raw (what the metadata says), sex, age, race (true), the 14 true labels by display
name, and bad_input (its kind, or empty).

Deliberately bad inputs (``bad_fraction`` of images, and at least one of each kind when the
source has at least ``bad_min_images`` images), each on a different image:
``truncated_image`` (file cut short), ``zero_byte_image``, ``missing_file`` (metadata row,
no file), ``unknown_view`` (view code "XTABLE" or "FOO"), ``impossible_age`` (-3, 250 or
"abc"), and for ``dicom`` also ``corrupt_dicom`` (garbage bytes or a header cut short).
They are listed in the returned summary and in ``phantom_bad_inputs.json`` at the root as
records ``{"kind", "file", "row_id", "image_path", "value"}`` (``image_paths`` lists every image
a per-subject record touches).

Config keys (a Mapping; defaults in :data:`DEFAULT_SOURCE_CONFIG`, then per kind in
:data:`KIND_DEFAULTS`):

- ``n_images`` (600): images to write (the last patient may overshoot by a few).
- ``image_size`` (128): square image side in pixels.
- ``studies_per_patient`` ([1, 3]) and ``images_per_study`` ([1, 2]): inclusive ranges. A study
  has one frontal image; with a probability set so that laterals make up about
  ``view_mix['LATERAL']`` of all images it also has lateral(s) (1 to ``hi - 1`` of them).
- ``view_mix``: {"PA","AP","LATERAL": weight}; frontal views are drawn per study from PA/AP.
- ``prevalence``, ``demographics``, ``bias``, ``signal_strength``, ``race_effects``: passed to
  the phantom (:mod:`cxrfoundry.data.phantom`).
- ``site``: overrides of the kind's :data:`phantom.SITE_PRESETS` entry.
- ``bad_fraction`` (0.015), ``bad_min_images`` (20).
- ``uncertain_fraction`` (0.03): share of true positives reported as -1 (mimic, chexpert).
- ``explicit_negative_fraction`` (0.35): share of negatives written as 0.0 rather than blank.
- ``jpeg_quality`` (92).
- mimic: ``empty_view_fraction`` (0.06), ``unknown_view_share`` (0.35), ``split``
  ({"train": 0.9, "validate": 0.05, "test": 0.05}).
- chexpert: ``valid_fraction`` (0.1, of patients).
- nih: ``bbox_fraction`` (0.5).
- dicom: ``monochrome1_fraction`` (0.2), ``rle_fraction`` (0.2), ``jpeg_fraction`` (0.15),
  ``missing_view_fraction`` (0.12), ``no_view_fraction`` (0.05).

Same seed and config -> byte-identical files (fixed JPEG quality, PNGs without metadata, DICOM
UIDs derived from the seed, no timestamps, gzip with mtime 0). The folder is built in a
temporary sibling and renamed into place at the end, so a killed run leaves nothing half done.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from cxrfoundry.data import phantom
from cxrfoundry.io import atomic_dir, dumps_json
from cxrfoundry.schema import FINDING_NAMES

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("mimic", "chexpert", "nih", "dicom")
BAD_KINDS: tuple[str, ...] = (
    "truncated_image",
    "zero_byte_image",
    "missing_file",
    "unknown_view",
    "impossible_age",
)
UNKNOWN_VIEW_CODES: tuple[str, ...] = ("XTABLE", "FOO")
IMPOSSIBLE_AGES: tuple[Any, ...] = (-3, 250, "abc")

DEFAULT_SOURCE_CONFIG: dict[str, Any] = {
    "n_images": 600,
    "image_size": 128,
    "studies_per_patient": [1, 3],
    "images_per_study": [1, 2],
    "view_mix": {"PA": 0.55, "AP": 0.30, "LATERAL": 0.15},
    "prevalence": {},
    "demographics": {},
    "bias": {"signal_strength": {}},
    "signal_strength": 1.0,
    "race_effects": {},
    "site": {},
    "bad_fraction": 0.015,
    "bad_min_images": 20,
    "uncertain_fraction": 0.03,
    "explicit_negative_fraction": 0.35,
    "jpeg_quality": 92,
}

KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "mimic": {
        "view_mix": {"PA": 0.45, "AP": 0.30, "LATERAL": 0.25},
        "empty_view_fraction": 0.06,
        "unknown_view_share": 0.35,
        "split": {"train": 0.9, "validate": 0.05, "test": 0.05},
    },
    "chexpert": {
        "view_mix": {"PA": 0.25, "AP": 0.6, "LATERAL": 0.15},
        "valid_fraction": 0.1,
    },
    "nih": {
        "view_mix": {"PA": 0.6, "AP": 0.4, "LATERAL": 0.0},
        "images_per_study": [1, 1],
        "studies_per_patient": [1, 4],
        # NIH has no label for these: keep them rare so "No Finding" stays mostly true.
        "prevalence": {"Enlarged Cardiomediastinum": 0.0, "Fracture": 0.0, "Support Devices": 0.1},
        "bbox_fraction": 0.5,
    },
    "dicom": {
        "view_mix": {"PA": 0.7, "AP": 0.22, "LATERAL": 0.08},
        "prevalence": {"Support Devices": 0.05},
        "monochrome1_fraction": 0.2,
        "rle_fraction": 0.2,
        "jpeg_fraction": 0.15,
        "missing_view_fraction": 0.12,
        "no_view_fraction": 0.05,
    },
}

#: MIMIC-CXR CheXpert label file column order (alphabetical, as in the real file).
MIMIC_LABEL_ORDER: tuple[str, ...] = tuple(sorted(FINDING_NAMES))

#: CheXpert finding -> NIH ChestX-ray14 label(s); Lung Lesion becomes Nodule or Mass by size,
#: a stand-alone Lung Opacity becomes Infiltration. Findings absent here have no NIH label.
NIH_FROM_CHEXPERT: dict[str, str] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Pleural Effusion": "Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Pleural Other": "Pleural_Thickening",
    "Lung Opacity": "Infiltration",
}
#: Box labels of NIH's BBox_List_2017.csv by CheXpert finding.
NIH_BOX_LABELS: dict[str, str] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Pleural Effusion": "Effusion",
    "Lung Opacity": "Infiltrate",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
NIH_BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"

#: VinDr-CXR's 28 image-level labels (image_labels_train.csv order).
VINDR_LABELS: tuple[str, ...] = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Clavicle fracture",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged PA",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Lung cavity",
    "Lung cyst",
    "Mediastinal shift",
    "Nodule/Mass",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "Rib fracture",
    "Other lesion",
    "COPD",
    "Lung tumor",
    "Pneumonia",
    "Tuberculosis",
    "Other diseases",
    "No finding",
)
#: CheXpert finding -> VinDr label (Support Devices has none in VinDr).
VINDR_FROM_CHEXPERT: dict[str, str] = {
    "Enlarged Cardiomediastinum": "Aortic enlargement",
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Lung Opacity": "Lung Opacity",
    "Lung Lesion": "Nodule/Mass",
    "Pleural Effusion": "Pleural effusion",
    "Pleural Other": "Pleural thickening",
    "Pneumothorax": "Pneumothorax",
    "Fracture": "Rib fracture",
    "Pneumonia": "Pneumonia",
    "No Finding": "No finding",
}
MIMIC_RACE: dict[str, str] = {
    "White": "WHITE",
    "Black": "BLACK/AFRICAN AMERICAN",
    "Asian": "ASIAN",
    "Hispanic": "HISPANIC/LATINO",
    "Other": "OTHER",
}
MIMIC_VIEW_CODE: dict[str, str] = {
    "PA": "postero-anterior",
    "AP": "antero-posterior",
    "LATERAL": "lateral",
}
# DICOM view codes (CID 4010, SNOMED-RT designators as in many archives).
DICOM_VIEW_CODE: dict[str, tuple[str, str]] = {
    "PA": ("R-10214", "postero-anterior"),
    "AP": ("R-10206", "antero-posterior"),
    "LATERAL": ("R-10236", "left lateral"),
}
SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}
# Lesions wider than ~3 cm (image side ~36 cm) are masses in NIH's vocabulary.
_MASS_FRACTION = 3.0 / 36.0


# --------------------------------------------------------------------------- planning


@dataclass
class _Image:
    index: int
    patient: int
    study: int
    view: str
    case: phantom.PhantomCase
    image_path: str = ""
    image_id: str = ""
    view_raw: str = ""
    bad: str = ""
    bad_value: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Study:
    index: int
    patient: int
    year_offset: int
    labels: dict[str, int]
    reported: dict[str, int]
    images: list[_Image] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Patient:
    index: int
    sex: str
    age: float
    race: str
    studies: list[_Study] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _resolve_config(kind: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"demo source kind must be one of {KINDS}, got {kind!r}")
    merged = phantom.merge_config(DEFAULT_SOURCE_CONFIG, KIND_DEFAULTS[kind])
    merged = phantom.merge_config(merged, cfg)
    if int(merged["n_images"]) < 1:
        raise ValueError(f"demo source {kind}: n_images must be >= 1, got {merged['n_images']}")
    for key in ("studies_per_patient", "images_per_study"):
        lo, hi = merged[key]
        if not 1 <= int(lo) <= int(hi):
            raise ValueError(f"demo source {kind}: {key} must be [lo, hi] with 1 <= lo <= hi")
    return merged


def _phantom_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("prevalence", "demographics", "bias", "signal_strength", "race_effects")
    out = {k: cfg[k] for k in keys if k in cfg}
    out["uncertain_fraction"] = 0.0  # sources report uncertainty per study, below
    return out


def _plan(kind: str, cfg: Mapping[str, Any], rng: np.random.Generator) -> list[_Patient]:
    """Draw patients, studies and views, and render every image."""
    pcfg = phantom.merge_config(phantom.DEFAULT_CONFIG, _phantom_cfg(cfg))
    size = int(cfg["image_size"])
    site = {**phantom.SITE_PRESETS[kind], **(cfg.get("site") or {})}
    mix = {v: float(cfg["view_mix"].get(v, 0.0)) for v in phantom.PHANTOM_VIEWS}
    frontal = {v: mix[v] for v in ("PA", "AP")}
    if sum(frontal.values()) <= 0:
        raise ValueError(f"demo source {kind}: view_mix needs a positive PA or AP weight")
    lat_share = mix["LATERAL"] / max(1e-9, sum(mix.values()))
    # A study adds a lateral with probability q so laterals are ~lat_share of all images.
    p_lateral = min(1.0, lat_share / max(1e-9, 1.0 - lat_share))
    n_target = int(cfg["n_images"])
    s_lo, s_hi = (int(v) for v in cfg["studies_per_patient"])
    i_lo, i_hi = (int(v) for v in cfg["images_per_study"])
    uncertain = float(cfg["uncertain_fraction"])

    patients: list[_Patient] = []
    n_images = n_studies = 0
    bar = tqdm(total=n_target, desc=f"render {kind}", unit="img", leave=False, disable=None)
    while n_images < n_target:
        demo = phantom.sample_demographics(rng, pcfg)
        pat = _Patient(len(patients), demo["sex"], demo["age"], demo["race"])
        patients.append(pat)
        for j in range(int(rng.integers(s_lo, s_hi + 1))):
            if n_images >= n_target:
                break
            front_view = phantom.choose_weighted(rng, frontal, "view_mix")
            offset = j + int(rng.integers(0, 2))
            age = min(float(pcfg["demographics"]["age"]["max"]), pat.age + offset)
            labels = phantom.sample_labels(rng, pcfg, view=front_view, age=age)
            study = _Study(
                n_studies, pat.index, offset, labels, phantom.report_labels(rng, labels, uncertain)
            )
            n_studies += 1
            pat.studies.append(study)
            views = [front_view]
            if i_hi > 1 and mix["LATERAL"] > 0 and rng.random() < p_lateral:
                views += ["LATERAL"] * max(1, int(rng.integers(i_lo, i_hi + 1)) - 1)
            for view in views:
                if n_images >= n_target:
                    break
                demo_now = {"sex": pat.sex, "age": age, "race": pat.race}
                spec = phantom.sample_case(
                    rng, pcfg, view=view, demographics=demo_now, labels=labels
                )
                case = phantom.render_case(spec, size, site)
                study.images.append(_Image(n_images, pat.index, study.index, view, case))
                n_images += 1
                bar.update(1)
    bar.close()
    return patients


def _all_images(patients: Sequence[_Patient]) -> list[_Image]:
    return [im for p in patients for s in p.studies for im in s.images]


def _assign_bad(
    images: Sequence[_Image], kinds: Sequence[str], cfg: Mapping[str, Any], rng: np.random.Generator
) -> None:
    """Mark distinct images with bad-input kinds (at least one each for non-tiny sources)."""
    n = len(images)
    per_kind = round(float(cfg["bad_fraction"]) * n / max(1, len(kinds)))
    if n >= int(cfg["bad_min_images"]):
        per_kind = max(1, per_kind)
    total = min(n, per_kind * len(kinds))
    if total == 0:
        return
    chosen = rng.choice(n, size=total, replace=False)
    for j, idx in enumerate(chosen):
        im = images[int(idx)]
        im.bad = kinds[j % len(kinds)]
        if im.bad == "unknown_view":
            im.bad_value = UNKNOWN_VIEW_CODES[int(rng.integers(len(UNKNOWN_VIEW_CODES)))]
        elif im.bad == "impossible_age":
            im.bad_value = IMPOSSIBLE_AGES[int(rng.integers(len(IMPOSSIBLE_AGES)))]


# --------------------------------------------------------------------------- writing helpers


def _jpeg(array: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=int(quality), optimize=False)
    return buf.getvalue()


def _write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_image_file(root: Path, im: _Image, data: bytes, rng: np.random.Generator) -> None:
    """Write the encoded image, damaged as its bad-input kind says."""
    if im.bad == "missing_file":
        return
    if im.bad == "zero_byte_image":
        data = b""
    elif im.bad == "truncated_image":
        data = data[: max(8, int(len(data) * rng.uniform(0.3, 0.7)))]
    elif im.bad == "corrupt_dicom":
        if rng.random() < 0.5:
            data = rng.integers(0, 256, 2048, dtype=np.uint8).tobytes()
        else:
            data = data[: int(rng.integers(90, 200))]  # cut inside the preamble/file meta
    _write(root, im.image_path, data)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _gzip(text: str) -> bytes:
    return gzip.compress(text.encode("utf-8"), compresslevel=6, mtime=0)


def _label_value(v: int, rng: np.random.Generator, explicit_neg: float, *, nofinding: bool) -> str:
    if v == 1:
        return "1.0"
    if v == -1:
        return "-1.0"
    if nofinding:
        return ""  # CheXpert-style labellers leave No Finding blank when something is found
    return "0.0" if rng.random() < explicit_neg else ""


def _study_label_strings(
    study: _Study, rng: np.random.Generator, explicit_neg: float, *, all_explicit: bool = False
) -> dict[str, str]:
    out = {}
    for name in FINDING_NAMES:
        v = study.reported[name]
        if all_explicit:
            out[name] = "1.0" if study.labels[name] == 1 else "0.0"
        else:
            out[name] = _label_value(v, rng, explicit_neg, nofinding=name == "No Finding")
    return out


def _mask_rel(image_path: str) -> str:
    return f"masks/{image_path}.png"


def _truth_rows(root: Path, images: Sequence[_Image], patients: Sequence[_Patient]) -> str:
    header = [
        "image_id",
        "patient_id",
        "study_id",
        "image_path",
        "mask_path",
        "boxes",
        "view",
        "view_raw",
        "sex",
        "age",
        "race",
        *FINDING_NAMES,
        "bad_input",
    ]
    rows = []
    for im in images:
        c = im.case
        mask_rel = _mask_rel(im.image_path)
        _write(root, mask_rel, phantom.encode_png(c.mask_bits()))
        rows.append(
            [
                im.image_id,
                im.extra.get("patient_id", ""),
                im.extra.get("study_id", ""),
                im.image_path,
                mask_rel,
                json.dumps(c.boxes, sort_keys=True),
                im.view,
                im.view_raw,
                c.sex,
                f"{c.age:g}",
                c.race,
                *[c.labels[n] for n in FINDING_NAMES],
                im.bad,
            ]
        )
    return _csv_text(header, rows)


def _bad_records(images: Sequence[_Image], metadata_file: str) -> list[dict[str, Any]]:
    records = []
    for im in images:
        if not im.bad:
            continue
        # Damaged files are named by their path; metadata problems by the metadata file.
        damaged = im.bad in ("truncated_image", "zero_byte_image", "corrupt_dicom")
        records.append(
            {
                "kind": im.bad,
                "file": im.image_path if damaged else metadata_file,
                "row_id": im.image_id,
                "image_path": im.image_path,
                "value": im.bad_value,
            }
        )
    return records


def _date(rng: np.random.Generator, year: int) -> str:
    return f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"


def _id_hex(rng: np.random.Generator, n_bytes: int) -> str:
    return rng.integers(0, 256, n_bytes, dtype=np.uint8).tobytes().hex()


# --------------------------------------------------------------------------- reports (MIMIC)

_SIDE = {-1: "right", 1: "left"}

_POS: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": (
        "The heart is enlarged.",
        "Moderate cardiomegaly.",
        "Cardiac silhouette is enlarged.",
    ),
    "Enlarged Cardiomediastinum": (
        "The cardiomediastinal silhouette is widened.",
        "Mediastinal contours are widened.",
    ),
    "Pleural Effusion": (
        "{size} {side} pleural effusion with blunting of the costophrenic angle.",
        "There is a {size} {side} pleural effusion.",
    ),
    "Pneumothorax": (
        "There is a {size} {side} apical pneumothorax with a visible pleural line.",
        "{size} {side} pneumothorax.",
    ),
    "Consolidation": (
        "Focal consolidation in the {side} {zone} lung.",
        "Airspace consolidation is seen in the {side} {zone} zone.",
    ),
    "Pneumonia": (
        "Patchy opacity in the {side} {zone} lung concerning for pneumonia.",
        "Findings compatible with {side} {zone} pneumonia.",
    ),
    "Lung Opacity": ("Patchy opacity in the {side} {zone} lung.", "Hazy {side} {zone} opacity."),
    "Lung Lesion": (
        "A {kind} is seen in the {side} lung.",
        "There is a {kind} projecting over the {side} {zone} zone.",
    ),
    "Edema": (
        "Perihilar haziness and vascular congestion consistent with pulmonary edema.",
        "Mild interstitial pulmonary edema.",
    ),
    "Atelectasis": (
        "Linear opacity at the {side} base compatible with atelectasis.",
        "Bibasilar atelectasis, {side} greater than the other side.",
    ),
    "Fracture": ("Fracture of a {side} rib is noted.", "There is a {side} rib fracture."),
    "Pleural Other": (
        "Pleural thickening along the {side} chest wall.",
        "{side} pleural thickening is noted.",
    ),
    "Support Devices": (
        "Support devices are in place.",
        "Lines and tubes are in standard position.",
        "Monitoring leads overlie the chest.",
    ),
}
_UNC: dict[str, str] = {
    "Cardiomegaly": "The heart is possibly mildly enlarged.",
    "Enlarged Cardiomediastinum": "The mediastinum may be slightly widened.",
    "Pleural Effusion": "A small {side} pleural effusion cannot be excluded.",
    "Pneumothorax": "Possible small {side} pneumothorax.",
    "Consolidation": "Possible early consolidation at the {side} {zone} zone.",
    "Pneumonia": "Opacity in the {side} {zone} zone may reflect pneumonia.",
    "Lung Opacity": "Questionable opacity in the {side} {zone} lung.",
    "Lung Lesion": "A possible {kind} in the {side} lung.",
    "Edema": "Possible mild pulmonary vascular congestion.",
    "Atelectasis": "Possible {side} basilar atelectasis.",
    "Fracture": "Possible {side} rib fracture.",
    "Pleural Other": "Possible {side} pleural thickening.",
}
_NEG: dict[str, str] = {
    "Cardiomegaly": "Heart size is normal.",
    "Enlarged Cardiomediastinum": "The mediastinal contours are normal.",
    "Pleural Effusion": "No pleural effusion.",
    "Pneumothorax": "No pneumothorax.",
    "Consolidation": "No focal consolidation.",
    "Pneumonia": "No evidence of pneumonia.",
    "Lung Opacity": "Lungs are clear.",
    "Lung Lesion": "No suspicious pulmonary nodule.",
    "Edema": "No pulmonary edema.",
    "Atelectasis": "No atelectasis.",
    "Fracture": "No acute osseous abnormality.",
    "Pleural Other": "No pleural thickening.",
}
_INDICATIONS = (
    "___ with cough.",
    "___ year old with shortness of breath.",
    "Evaluate for pneumonia.",
    "Chest pain, rule out acute process.",
    "Line placement.",
    "Follow-up.",
)


def _finding_words(case: phantom.PhantomCase, name: str, rng: np.random.Generator) -> dict:
    f = case.spec.findings.get(name, {})
    side = f.get("side")
    if side is None and "sides" in f:
        side = 0 if len(f["sides"]) == 2 else f["sides"][0]
    if side is None and "lesions" in f:
        side = f["lesions"][0]["side"]
    words = {
        "side": _SIDE.get(side, "bilateral") if side is not None else "right",
        "size": ("small", "moderate", "large")[int(rng.integers(3))],
        "zone": "lower" if f.get("v", 0.5) > 0.55 else "upper",
        "kind": f.get("lesions", [{}])[0].get("kind", "nodule"),
    }
    return words


def _report(study: _Study, rng: np.random.Generator, procedure: str) -> str:
    """A MIMIC-style free-text report consistent with the study's reported labels."""
    case = study.images[0].case
    findings, impression = [], []
    for name in FINDING_NAMES:
        if name == "No Finding":
            continue
        v = study.reported[name]
        words = _finding_words(case, name, rng)
        if v == 1:
            opts = _POS[name]
            sentence = opts[int(rng.integers(len(opts)))].format(**words)
            findings.append(sentence[0].upper() + sentence[1:])
            if name != "Support Devices":
                impression.append(sentence)
        elif v == -1:
            sentence = _UNC[name].format(**words)
            findings.append(sentence[0].upper() + sentence[1:])
            impression.append(sentence)
        elif name in _NEG and rng.random() < 0.35:
            findings.append(_NEG[name])
    if study.reported["No Finding"] == 1 or not impression:
        impression = [
            ("No acute cardiopulmonary process.", "No acute intrathoracic abnormality.")[
                int(rng.integers(2))
            ]
        ]
        if not findings:
            findings = ["The lungs are clear. Heart size is normal. No effusion or pneumothorax."]
    lines = [
        "                                 FINAL REPORT",
        f" EXAMINATION:  {procedure or 'CHEST RADIOGRAPH'}",
        "",
        f" INDICATION:  {_INDICATIONS[int(rng.integers(len(_INDICATIONS)))]}",
        "",
        " COMPARISON:  None.",
        "",
        " FINDINGS: ",
        " ",
        " " + " ".join(findings),
        " ",
        " IMPRESSION: ",
        " ",
        " " + " ".join(s[0].upper() + s[1:] for s in impression),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- kinds


def _write_mimic(root: Path, patients: list[_Patient], cfg: Mapping[str, Any], rng) -> dict:
    size = int(cfg["image_size"])
    images = _all_images(patients)
    subject_ids = np.sort(rng.choice(9_000_000, len(patients), replace=False) + 10_000_000)
    n_studies = sum(len(p.studies) for p in patients)
    study_ids = rng.choice(9_000_000, n_studies, replace=False) + 50_000_000
    split_cfg = cfg["split"]
    split_names = list(split_cfg)
    split_p = np.array([float(split_cfg[k]) for k in split_names])
    meta_rows, label_rows, split_rows, pat_rows, adm_rows = [], [], [], [], []
    _assign_bad(images, BAD_KINDS, cfg, rng)
    view_counts: Counter[str] = Counter()
    for p in patients:
        sid = int(subject_ids[p.index])
        anchor_year = int(rng.integers(2110, 2190))
        p.extra["split"] = split_names[int(rng.choice(len(split_names), p=split_p / split_p.sum()))]
        age_value: Any = int(p.age)
        for s in p.studies:
            for im in s.images:
                if im.bad == "impossible_age":
                    age_value = im.bad_value
        pat_rows.append(
            [sid, p.sex, age_value, anchor_year, f"{anchor_year - 1} - {anchor_year + 1}", ""]
        )
        adm_rows.append(
            [
                sid,
                20_000_000 + sid % 10_000_000,
                f"{anchor_year}-01-01 00:00:00",
                MIMIC_RACE[p.race],
            ]
        )
        p.extra["patient_id"] = str(sid)
        for s in p.studies:
            st_id = int(study_ids[s.index])
            folder = f"files/p{str(sid)[:2]}/p{sid}"
            has_lat = any(im.view == "LATERAL" for im in s.images)
            front = s.images[0].view
            if front == "AP":
                procedure = "CHEST (PORTABLE AP)"
            else:
                procedure = "CHEST (PA AND LAT)" if has_lat or rng.random() < 0.5 else "CHEST (PA)"
            date = _date(rng, anchor_year + s.year_offset)
            hhmmss = int(rng.integers(0, 24)) * 10000 + int(rng.integers(0, 60)) * 100
            # MIMIC writes StudyTime as a number (leading zeros dropped) with milliseconds.
            time = f"{hhmmss + int(rng.integers(0, 60))}.{int(rng.integers(0, 1000)):03d}"
            for im in s.images:
                dicom_id = "-".join(_id_hex(rng, 4) for _ in range(5))
                im.image_id = dicom_id
                im.image_path = f"{folder}/s{st_id}/{dicom_id}.jpg"
                im.extra.update(patient_id=str(sid), study_id=str(st_id))
                view_pos = (
                    im.view if im.view != "LATERAL" else ("LL" if rng.random() < 0.3 else "LATERAL")
                )
                view_code = MIMIC_VIEW_CODE[im.view] if rng.random() < 0.9 else ""
                proc = procedure
                if im.bad == "unknown_view":
                    view_pos, view_code = im.bad_value, ""
                elif rng.random() < float(cfg["empty_view_fraction"]):
                    view_pos = ""
                    if rng.random() < float(cfg["unknown_view_share"]):
                        view_code, proc = "", "CHEST (PA AND LAT)"
                        view_counts["empty_unknown"] += 1
                    else:
                        view_code = MIMIC_VIEW_CODE[im.view]
                        view_counts["empty_recoverable"] += 1
                im.view_raw = view_pos
                orient = (
                    "Erect" if im.view != "AP" else ("Recumbent" if rng.random() < 0.5 else "Erect")
                )
                if rng.random() < 0.05:
                    orient = ""
                meta_rows.append(
                    [
                        dicom_id,
                        sid,
                        st_id,
                        proc,
                        view_pos,
                        size,
                        size,
                        date,
                        time,
                        proc,
                        view_code,
                        orient,
                    ]
                )
                split_rows.append([dicom_id, st_id, sid, p.extra["split"]])
                _write_image_file(root, im, _jpeg(im.case.image, cfg["jpeg_quality"]), rng)
            labels = _study_label_strings(s, rng, float(cfg["explicit_negative_fraction"]))
            label_rows.append([sid, st_id, *[labels[n] for n in MIMIC_LABEL_ORDER]])
            _write(root, f"{folder}/s{st_id}.txt", _report(s, rng, procedure).encode())
    meta_header = [
        "dicom_id",
        "subject_id",
        "study_id",
        "PerformedProcedureStepDescription",
        "ViewPosition",
        "Rows",
        "Columns",
        "StudyDate",
        "StudyTime",
        "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ]
    _write(root, "mimic-cxr-2.0.0-metadata.csv.gz", _gzip(_csv_text(meta_header, meta_rows)))
    _write(
        root,
        "mimic-cxr-2.0.0-chexpert.csv.gz",
        _gzip(_csv_text(["subject_id", "study_id", *MIMIC_LABEL_ORDER], label_rows)),
    )
    _write(
        root,
        "mimic-cxr-2.0.0-split.csv.gz",
        _gzip(_csv_text(["dicom_id", "study_id", "subject_id", "split"], split_rows)),
    )
    _write(
        root,
        "patients.csv.gz",
        _gzip(
            _csv_text(
                ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
                pat_rows,
            )
        ),
    )
    _write(
        root,
        "admissions.csv.gz",
        _gzip(_csv_text(["subject_id", "hadm_id", "admittime", "race"], adm_rows)),
    )
    records = _bad_records(images, "mimic-cxr-2.0.0-metadata.csv.gz")
    for rec in records:
        if rec["kind"] == "impossible_age":
            im = next(i for i in images if i.image_id == rec["row_id"])
            pid = im.extra["patient_id"]
            rec.update(file="patients.csv.gz", row_id=f"subject_id={pid}")
            rec["image_paths"] = [i.image_path for i in images if i.extra["patient_id"] == pid]
    return {
        "records": records,
        "empty_views": dict(view_counts),
        "files": [
            "mimic-cxr-2.0.0-metadata.csv.gz",
            "mimic-cxr-2.0.0-chexpert.csv.gz",
            "mimic-cxr-2.0.0-split.csv.gz",
            "patients.csv.gz",
            "admissions.csv.gz",
        ],
    }


def _write_chexpert(root: Path, patients: list[_Patient], cfg: Mapping[str, Any], rng) -> dict:
    images = _all_images(patients)
    _assign_bad(images, BAD_KINDS, cfg, rng)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDING_NAMES]
    rows: dict[str, list] = {"train": [], "valid": []}
    base = "CheXpert-v1.0-small"
    explicit = float(cfg["explicit_negative_fraction"])
    for p in patients:
        split = "valid" if rng.random() < float(cfg["valid_fraction"]) else "train"
        pid = f"patient{p.index + 1:05d}"
        for k, s in enumerate(p.studies, start=1):
            labels = _study_label_strings(s, rng, explicit, all_explicit=split == "valid")
            for v, im in enumerate(s.images, start=1):
                fl = "lateral" if im.view == "LATERAL" else "frontal"
                im.image_path = f"{base}/{split}/{pid}/study{k}/view{v}_{fl}.jpg"
                im.image_id = im.image_path
                im.extra.update(patient_id=pid, study_id=f"{pid}/study{k}")
                frontal_lateral = "Lateral" if im.view == "LATERAL" else "Frontal"
                appa = im.view if im.view != "LATERAL" else ("" if rng.random() < 0.9 else "LL")
                if im.bad == "unknown_view":
                    frontal_lateral, appa = im.bad_value, ""
                im.view_raw = f"{frontal_lateral}/{appa}"
                age: Any = int(im.case.age) if im.bad != "impossible_age" else im.bad_value
                sex = {"M": "Male", "F": "Female"}[p.sex]
                rows[split].append(
                    [
                        im.image_path,
                        sex,
                        age,
                        frontal_lateral,
                        appa,
                        *[labels[n] for n in FINDING_NAMES],
                    ]
                )
                _write_image_file(root, im, _jpeg(im.case.image, cfg["jpeg_quality"]), rng)
    for split in ("train", "valid"):
        _write(root, f"{base}/{split}.csv", _csv_text(header, rows[split]).encode())
    return {
        "records": _bad_records(images, f"{base}/train.csv"),
        "files": [f"{base}/train.csv", f"{base}/valid.csv"],
        "rows": {k: len(v) for k, v in rows.items()},
    }


def _nih_labels(case: phantom.PhantomCase, size: int) -> list[str]:
    out = set()
    for name, nih in NIH_FROM_CHEXPERT.items():
        if case.labels[name] == 1:
            out.add(nih)
    if case.labels["Lung Opacity"] and any(case.labels[c] for c in phantom.OPACITY_CHILDREN):
        out.discard("Infiltration")  # opacity is implied by a more specific finding
    if case.labels["Lung Lesion"]:
        for b in case.boxes:
            if b["label"] == "Lung Lesion":
                big = max(b["w"], b["h"]) > _MASS_FRACTION * size
                out.add("Mass" if big else "Nodule")
    return sorted(out) or ["No Finding"]


def _write_nih(root: Path, patients: list[_Patient], cfg: Mapping[str, Any], rng) -> dict:
    size = int(cfg["image_size"])
    images = _all_images(patients)
    _assign_bad(images, BAD_KINDS, cfg, rng)
    lines = [NIH_HEADER]
    bbox_rows = []
    spacing = round(400.0 / size, 6)
    for p in patients:
        pid = p.index + 1
        follow = 0
        for s in p.studies:
            for im in s.images:
                im.image_path = f"images/{pid:08d}_{follow:03d}.png"
                im.image_id = f"{pid:08d}_{follow:03d}.png"
                im.extra.update(patient_id=str(pid), study_id=im.image_id)
                view = im.view if im.bad != "unknown_view" else im.bad_value
                im.view_raw = view
                age: Any = int(im.case.age) if im.bad != "impossible_age" else im.bad_value
                labels = "|".join(_nih_labels(im.case, size))
                row = [
                    im.image_id,
                    labels,
                    follow,
                    pid,
                    age,
                    p.sex,
                    view,
                    size,
                    size,
                    spacing,
                    spacing,
                ]
                lines.append(_row(row))
                if rng.random() < float(cfg["bbox_fraction"]):
                    for b in im.case.boxes:
                        label = NIH_BOX_LABELS.get(b["label"])
                        if b["label"] == "Lung Lesion":
                            big = max(b["w"], b["h"]) > _MASS_FRACTION * size
                            label = "Mass" if big else "Nodule"
                        if label:
                            bbox_rows.append(
                                _row(
                                    [
                                        im.image_id,
                                        label,
                                        float(b["x"]),
                                        float(b["y"]),
                                        float(b["w"]),
                                        float(b["h"]),
                                    ]
                                )
                            )
                _write_image_file(root, im, phantom.encode_png(im.case.image), rng)
                follow += 1
    _write(root, "Data_Entry_2017.csv", ("\n".join(lines) + "\n").encode())
    _write(root, "BBox_List_2017.csv", ("\n".join([NIH_BBOX_HEADER, *bbox_rows]) + "\n").encode())
    return {
        "records": _bad_records(images, "Data_Entry_2017.csv"),
        "files": ["Data_Entry_2017.csv", "BBox_List_2017.csv"],
        "boxes": len(bbox_rows),
    }


def _row(values: Sequence[Any]) -> str:
    """One CSV line (no newline) for files whose header is written by hand."""
    return _csv_text(values, []).rstrip("\n")


def _dicom_bytes(
    im: _Image, p: _Patient, cfg: Mapping[str, Any], rng, seed: int, view_kind: str
) -> bytes:
    """Encode one phantom image as a DICOM file (pydicom 3), deterministic for a seed."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence as DSequence
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        ExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        RLELossless,
        generate_uid,
    )

    def uid(tag: str) -> str:
        return generate_uid(entropy_srcs=[str(seed), im.image_id, tag])

    modality = "DX" if rng.random() < 0.5 else "CR"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SOP_CLASS[modality]
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = _date(rng, 2010 + int(rng.integers(0, 12)))
    ds.Modality = modality
    ds.PatientID = im.extra["patient_id"]
    ds.PatientName = ""
    ds.PatientSex = p.sex
    age_value = im.bad_value if im.bad == "impossible_age" else int(im.case.age)
    ds.PatientAge = (
        f"{age_value:03d}Y" if isinstance(age_value, int) and age_value >= 0 else f"{age_value}Y"
    )
    ds.EthnicGroup = im.case.race
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(seed), im.extra["study_id"], "study"])
    ds.SeriesInstanceUID = uid("series")
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    view_value = {"PA": "PA", "AP": "AP", "LATERAL": "LL" if rng.random() < 0.5 else "LATERAL"}[
        im.view
    ]
    if im.bad == "unknown_view":
        ds.ViewPosition = im.bad_value
        im.view_raw = im.bad_value
    elif view_kind == "missing":
        im.view_raw = ""
        if rng.random() < 0.5:
            ds.SeriesDescription = {"PA": "PA", "AP": "AP PORTABLE", "LATERAL": "LAT"}[im.view]
        else:
            code = pydicom.Dataset()
            code.CodeValue, code.CodeMeaning = DICOM_VIEW_CODE[im.view]
            code.CodingSchemeDesignator = "SRT"
            ds.ViewCodeSequence = DSequence([code])
    elif view_kind == "none":
        im.view_raw = ""
    else:
        ds.ViewPosition = view_value
        im.view_raw = view_value
    img = im.case.image.astype(np.uint16)
    bits = 12
    mono1 = rng.random() < float(cfg["monochrome1_fraction"])
    compression = rng.random()
    jpeg = compression < float(cfg["jpeg_fraction"])
    rle = not jpeg and compression < float(cfg["jpeg_fraction"]) + float(cfg["rle_fraction"])
    if jpeg:
        bits = 8
        img = (img >> 4).astype(np.uint8)
    maxval = (1 << bits) - 1
    if mono1:
        img = (maxval - img).astype(img.dtype)  # stored inverted; a reader must flip it back
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated = 8 if jpeg else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [f"{400.0 / img.shape[0]:.4f}"] * 2
    ds.WindowCenter = str(maxval // 2 + 1)
    ds.WindowWidth = str(maxval + 1)
    if jpeg:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(cfg["jpeg_quality"]))
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        im.extra["encoding"] = "jpeg_baseline"
    else:
        ds.PixelData = img.astype("<u2").tobytes()
        ds["PixelData"].VR = "OW"
        im.extra["encoding"] = "explicit_vr_le"
        if rle:
            # Keep the seeded SOP Instance UID (compress() would draw a random one).
            ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
            im.extra["encoding"] = "rle_lossless"
    im.extra["photometric"] = ds.PhotometricInterpretation
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _write_dicom(
    root: Path, patients: list[_Patient], cfg: Mapping[str, Any], rng, seed: int
) -> dict:
    import warnings

    images = _all_images(patients)
    _assign_bad(images, (*BAD_KINDS, "corrupt_dicom"), cfg, rng)
    rad_pool = [f"R{i}" for i in range(1, 18)]
    label_rows, ann_rows = [], []
    counts: Counter[str] = Counter()
    for p in patients:
        pid = _id_hex(rng, 16)
        for s in p.studies:
            for im in s.images:
                im.image_id = _id_hex(rng, 16)
                im.image_path = f"train/{im.image_id}.dicom"
                im.extra.update(patient_id=pid, study_id=f"{pid}/{s.index}")
                r = rng.random()
                view_kind = (
                    "missing"
                    if r < float(cfg["missing_view_fraction"])
                    else (
                        "none"
                        if r < float(cfg["missing_view_fraction"]) + float(cfg["no_view_fraction"])
                        else "present"
                    )
                )
                with warnings.catch_warnings():
                    # Impossible ages are deliberate: silence pydicom's value validation.
                    warnings.simplefilter("ignore")
                    data = _dicom_bytes(im, p, cfg, rng, seed, view_kind)
                counts[f"view_{view_kind}"] += 1
                counts[im.extra["encoding"]] += 1
                counts[im.extra["photometric"]] += 1
                _write_image_file(root, im, data, rng)
                readers = rng.choice(len(rad_pool), 3, replace=False)
                truth = {VINDR_FROM_CHEXPERT[n]: im.case.labels[n] for n in VINDR_FROM_CHEXPERT}
                miss = rng.integers(0, 3)  # one reader may miss findings; the union stays true
                for j, ridx in enumerate(readers):
                    vals = {lab: 0 for lab in VINDR_LABELS}
                    for lab, v in truth.items():
                        vals[lab] = int(v)
                    found = [k for k, v in vals.items() if v and k != "No finding"]
                    # A reader may miss one of several findings; the union stays the truth.
                    draw = rng.random()
                    if j == miss and len(found) > 1 and draw < float(cfg["uncertain_fraction"]) * 5:
                        vals[found[0]] = 0
                    if not any(v for k, v in vals.items() if k != "No finding"):
                        vals["No finding"] = 1
                    label_rows.append(
                        [im.image_id, rad_pool[ridx], *[vals[k] for k in VINDR_LABELS]]
                    )
                    for b in im.case.boxes:
                        lab = VINDR_FROM_CHEXPERT.get(b["label"])
                        if lab and vals.get(lab):
                            ann_rows.append(
                                [
                                    im.image_id,
                                    rad_pool[ridx],
                                    lab,
                                    float(b["x"]),
                                    float(b["y"]),
                                    float(b["x"] + b["w"]),
                                    float(b["y"] + b["h"]),
                                ]
                            )
                    if vals["No finding"]:
                        ann_rows.append([im.image_id, rad_pool[ridx], "No finding", "", "", "", ""])
    _write(
        root,
        "annotations/image_labels_train.csv",
        _csv_text(["image_id", "rad_id", *VINDR_LABELS], label_rows).encode(),
    )
    _write(
        root,
        "annotations/annotations_train.csv",
        _csv_text(
            ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"], ann_rows
        ).encode(),
    )
    return {
        "records": _bad_records(images, "annotations/image_labels_train.csv"),
        "files": ["annotations/image_labels_train.csv", "annotations/annotations_train.csv"],
        "dicom": dict(counts),
    }


# --------------------------------------------------------------------------- entry point


def write_demo_source(kind: str, root: Path, cfg: Mapping[str, Any], *, seed: int) -> dict:
    """Write one demo source dataset of ``kind`` at ``root`` (replacing it) and describe it.

    ``cfg`` keys are listed in the module docstring. Returns a summary dict: ``kind``,
    ``seed``, ``n_patients``, ``n_studies``, ``n_images`` (rows in the native metadata),
    ``n_image_files`` (image files on disk), ``views`` (true view counts), ``bad_inputs``
    (count by kind), ``bad_input_records`` (as in ``phantom_bad_inputs.json``), ``files`` (the
    native metadata files) and kind-specific extras.
    """
    root = Path(root)
    cfg = _resolve_config(kind, cfg)
    # One stream per kind so each source is independent of the others for the same seed.
    rng = np.random.default_rng([int(seed), KINDS.index(kind)])
    patients = _plan(kind, cfg, rng)
    images = _all_images(patients)
    with atomic_dir(root) as tmp:
        if kind == "mimic":
            extra = _write_mimic(tmp, patients, cfg, rng)
        elif kind == "chexpert":
            extra = _write_chexpert(tmp, patients, cfg, rng)
        elif kind == "nih":
            extra = _write_nih(tmp, patients, cfg, rng)
        else:
            extra = _write_dicom(tmp, patients, cfg, rng, int(seed))
        records = extra.pop("records")
        (tmp / "phantom_truth.csv").write_text(_truth_rows(tmp, images, patients), encoding="utf-8")
        bad_counts = dict(sorted(Counter(r["kind"] for r in records).items()))
        (tmp / "phantom_bad_inputs.json").write_text(
            dumps_json(
                {"kind": kind, "seed": int(seed), "counts": bad_counts, "bad_inputs": records}
            ),
            encoding="utf-8",
        )
        n_files = sum(1 for im in images if im.bad != "missing_file")
    summary = {
        "kind": kind,
        "seed": int(seed),
        "root": str(root),
        "n_patients": len(patients),
        "n_studies": sum(len(p.studies) for p in patients),
        "n_images": len(images),
        "n_image_files": n_files,
        "views": dict(sorted(Counter(im.view for im in images).items())),
        "labels_positive": {n: sum(im.case.labels[n] for im in images) for n in FINDING_NAMES},
        "bad_inputs": bad_counts,
        "bad_input_records": records,
        **extra,
    }
    log.info(
        "wrote demo source %s at %s: %d images, bad inputs %s", kind, root, len(images), bad_counts
    )
    return summary
