"""BRAX adapter (``brax``).

``csv`` (default ``master_spreadsheet_update.csv``). Assumed columns (each name is an option, so
a differently spelled release can be mapped without code changes):

=================  =========================  =============================================
option             default column             use
=================  =========================  =============================================
``image_col``      ``PngPath``                image path relative to raw_root (``DicomPath``
                                              is used when the PNG column is absent)
``patient_col``    ``PatientID``              patient_id (required)
``study_col``      ``AccessionNumber``        study_id (also tried: ``Accession Number``,
                                              ``StudyID``; patient_id when none exists)
``view_col``       ``ViewPosition``           PA, AP, AP LLD, L, RL, RLO, LT-DECUB, empty
``sex_col``        ``PatientSex``             M/F (O and blanks → null)
``age_col``        ``PatientAge``             years, DICOM AS (``045Y``) or an age group:
                                              BRAX publishes 5-year groups, the oldest
                                              ``85 or more`` → 85 (a range → its lower
                                              bound)
=================  =========================  =============================================

The 14 CheXpert columns (``No Finding`` … ``Support Devices``, values 1/0/-1/blank) are read
when present. View mapping: L/RL → ``LATERAL``; AP LLD / LT-DECUB are decubitus (``OTHER``
unless ``include_decubitus``); RLO (right lateral oblique) → ``OTHER``. Splits are hashed (BRAX
has no official split). image_id = ``{dataset}/{image path without extension}``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cxrfoundry.data import labels as lab
from cxrfoundry.data.ingest._core import (
    Candidate,
    Context,
    check_age,
    metadata_view,
    norm_sex,
    read_csv,
    records,
    resolve_file,
    text_or_none,
    wrap_row_errors,
)

logger = logging.getLogger(__name__)

OPTIONS: dict[str, Any] = {
    "csv": "master_spreadsheet_update.csv",
    "image_col": "PngPath",
    "patient_col": "PatientID",
    "study_col": "AccessionNumber",
    "view_col": "ViewPosition",
    "sex_col": "PatientSex",
    "age_col": "PatientAge",
}

STUDY_FALLBACKS = ("Accession Number", "StudyID", "StudyInstanceUID")


def read(raw_root: Path, options: dict[str, Any], ctx: Context) -> list[Candidate]:
    """Read the BRAX spreadsheet into candidates (see the module docstring)."""
    path = resolve_file(raw_root, options["csv"], "brax csv")
    frame = read_csv(path)
    columns = list(frame.columns)
    image_col = options["image_col"]
    if image_col not in columns and "DicomPath" in columns:
        image_col = "DicomPath"
    for key, col in (("image_col", image_col), ("patient_col", options["patient_col"])):
        if col not in columns:
            raise ValueError(f"{path}: {key} column {col!r} missing; found {columns}")
    study_col = next((c for c in (options["study_col"], *STUDY_FALLBACKS) if c in columns), None)
    ctx.stats["image_column"] = image_col
    out = []
    for i, row in enumerate(tqdm(records(frame), desc="brax rows", disable=None)):
        image_path = row[image_col].strip().lstrip("/")
        cand = Candidate(
            native_id=image_path.rsplit(".", 1)[0] or None,
            source_file=path.name,
            source_row=i,
            raw=row,
        )

        def build(row: dict[str, str] = row, image_path: str = image_path) -> dict[str, Any]:
            view_raw, view, view_source = metadata_view(row.get(options["view_col"]), options)
            return {
                "patient_id": text_or_none(row[options["patient_col"]]),
                "study_id": text_or_none(row[study_col]) if study_col else None,
                "image_path": image_path,
                "view_raw": view_raw,
                "view": view,
                "view_source": view_source,
                "sex": norm_sex(row.get(options["sex_col"])),
                "age": check_age(row.get(options["age_col"])),
                **lab.chexpert_columns(row),
                "labels_extra": "{}",
                "report": None,
            }

        out.append(wrap_row_errors(cand, build))
    return out
