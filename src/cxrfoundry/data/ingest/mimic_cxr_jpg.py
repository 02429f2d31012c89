"""MIMIC-CXR-JPG 2.x adapter (``mimic_cxr_jpg``).

Files (relative to raw_root unless absolute; ``.csv`` and ``.csv.gz`` both accepted):

``metadata`` (default ``mimic-cxr-2.0.0-metadata.csv.gz``)
    one row per image: ``dicom_id``, ``subject_id``, ``study_id``, ``ViewPosition``, and where
    present ``ViewCodeSequence_CodeMeaning``, ``PerformedProcedureStepDescription``,
    ``StudyDate``.
``labels`` (default ``mimic-cxr-2.0.0-chexpert.csv.gz``; None to skip)
    the 14 CheXpert columns per (subject_id, study_id), values 1/0/-1/blank; studies without a
    row get null labels.
``split`` (default ``mimic-cxr-2.0.0-split.csv.gz``; None for hashed splits)
    ``dicom_id`` → ``split`` (train/validate/test; ``validate`` → val).
``images_dir`` (default ``files``), ``image_ext`` (default ``.jpg``)
    image path = ``{images_dir}/p{subject[:2]}/p{subject}/s{study}/{dicom_id}{image_ext}``.
``reports_dir`` (default ``files``; None to skip)
    report text = ``{reports_dir}/p{subject[:2]}/p{subject}/s{study}.txt`` (the extracted
    ``mimic-cxr-reports.zip``), kept verbatim (stripped); absent files → report null.
``demographics`` (default None)
    a CSV, or a list of CSVs, keyed by ``subject_id``: MIMIC-IV ``patients.csv.gz`` (gender,
    anchor_age, anchor_year) and ``admissions.csv.gz`` (race). ``demographics_columns``
    (default {sex: gender, age: anchor_age, anchor_year: anchor_year, race: race}) names the
    columns; missing ones are skipped. Age at the study is
    ``anchor_age + (study year − anchor_year)`` when both years are known (MIMIC shifts dates
    consistently), else ``anchor_age``. Multiple rows per subject: the first non-blank value of
    each column in file order wins.

Views: ``ViewPosition`` first. When it is empty (~15.7 K images), ``ViewCodeSequence_CodeMeaning``
("postero-anterior", "antero-posterior", "lateral", "left lateral", ...), which describes this
image, is safe. ``PerformedProcedureStepDescription`` describes the whole study: "CHEST (PA AND
LAT)" covers two images of different views and is never used; a description naming exactly
one view ("CHEST (PORTABLE AP)") is used, since every image of such a study has that view.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cxrfoundry import schema
from cxrfoundry.data import labels as lab
from cxrfoundry.data.ingest._core import (
    Candidate,
    Context,
    RowError,
    check_age,
    is_blank,
    metadata_view,
    norm_sex,
    read_csv,
    records,
    resolve_file,
    text_or_none,
    wrap_row_errors,
)
from cxrfoundry.data.splits import official_split
from cxrfoundry.data.views import view_from_code_meaning, view_from_text

logger = logging.getLogger(__name__)

OPTIONS: dict[str, Any] = {
    "metadata": "mimic-cxr-2.0.0-metadata.csv.gz",
    "labels": "mimic-cxr-2.0.0-chexpert.csv.gz",
    "split": "mimic-cxr-2.0.0-split.csv.gz",
    "images_dir": "files",
    "image_ext": ".jpg",
    "reports_dir": "files",
    "demographics": None,
    "demographics_columns": {
        "sex": "gender",
        "age": "anchor_age",
        "anchor_year": "anchor_year",
        "race": "race",
    },
}


def _ids(row: dict[str, str]) -> tuple[str, str]:
    # subject/study ids are integers; "10000032.0" from a float-writing tool still means the same
    def clean(value: str) -> str:
        text = value.strip()
        return text[:-2] if text.endswith(".0") else text

    return clean(row["subject_id"]), clean(row["study_id"])


def _view(row: dict[str, str], options: dict[str, Any]) -> tuple[str | None, str, str, str]:
    """(view_raw, view, view_source, which column decided)."""
    view_raw, view, source = metadata_view(row.get("ViewPosition"), options)
    if view_raw is not None:
        return view_raw, view, source, "ViewPosition"
    meaning = text_or_none(row.get("ViewCodeSequence_CodeMeaning"))
    if meaning is not None:
        view = view_from_code_meaning(meaning)
        if view != "UNKNOWN":
            return meaning, view, "metadata", "ViewCodeSequence_CodeMeaning"
    procedure = text_or_none(row.get("PerformedProcedureStepDescription"))
    if procedure is not None:
        view = view_from_text(procedure)
        if view != "UNKNOWN":
            return procedure, view, "metadata", "PerformedProcedureStepDescription"
    return meaning or procedure, "UNKNOWN", "none", "none"


def _demographics(raw_root: Path, options: dict[str, Any]) -> dict[str, dict[str, str]]:
    names = options["demographics"]
    if not names:
        return {}
    out: dict[str, dict[str, str]] = {}
    for name in [names] if isinstance(names, str | Path) else list(names):
        path = resolve_file(raw_root, name, "mimic demographics")
        frame = read_csv(path, required=("subject_id",))
        cols = {
            k: v for k, v in dict(options["demographics_columns"]).items() if v in frame.columns
        }
        for row in records(frame):
            entry = out.setdefault(row["subject_id"].strip(), {})
            for key, col in cols.items():
                if key not in entry and not is_blank(row[col]):
                    entry[key] = row[col].strip()
    return out


def read(raw_root: Path, options: dict[str, Any], ctx: Context) -> list[Candidate]:
    """Read MIMIC-CXR-JPG into candidates (see the module docstring)."""
    meta_path = resolve_file(raw_root, options["metadata"], "mimic metadata")
    meta = read_csv(meta_path, required=("dicom_id", "subject_id", "study_id", "ViewPosition"))
    labels: dict[tuple[str, str], dict[str, str]] = {}
    if options["labels"]:
        lab_path = resolve_file(raw_root, options["labels"], "mimic labels")
        for row in records(read_csv(lab_path, required=("subject_id", "study_id"))):
            labels[_ids(row)] = row
    split_of: dict[str, str] = {}
    if options["split"]:
        split_path = resolve_file(raw_root, options["split"], "mimic split")
        for row in records(read_csv(split_path, required=("dicom_id", "split"))):
            split_of[row["dicom_id"].strip()] = row["split"]
    demo = _demographics(raw_root, options)
    reports_dir = options["reports_dir"]
    report_cache: dict[str, str | None] = {}
    out = []
    for i, row in enumerate(tqdm(records(meta), desc="mimic rows", disable=None)):
        dicom_id = row["dicom_id"].strip()
        cand = Candidate(
            native_id=dicom_id or None, source_file=meta_path.name, source_row=i, raw=row
        )

        def build(
            row: dict[str, str] = row, dicom_id: str = dicom_id, cand: Candidate = cand
        ) -> dict[str, Any]:
            subject, study = _ids(row)
            if not subject:
                return {"patient_id": None}
            group = f"p{subject[:2]}/p{subject}"
            view_raw, view, view_source, how = _view(row, options)
            ctx.bump(f"view_from_{how}")
            label_row = labels.get((subject, study))
            if label_row is None:
                findings = dict.fromkeys(schema.FINDING_COLUMNS)
                if labels:
                    ctx.bump("studies_without_labels")
            else:
                findings = lab.chexpert_columns(label_row)
            report = None
            if reports_dir:
                if study not in report_cache:
                    report_path = raw_root / reports_dir / group / f"s{study}.txt"
                    report_cache[study] = (
                        report_path.read_text(encoding="utf-8", errors="replace").strip()
                        if report_path.is_file()
                        else None
                    )
                report = report_cache[study]
                if report is None:
                    ctx.bump("images_without_report")
            info = demo.get(subject, {})
            age = check_age(info.get("age"))
            if age is not None and "anchor_year" in info:
                year = (row.get("StudyDate") or "").strip()[:4]
                if year.isdigit() and info["anchor_year"].isdigit():
                    age = check_age(age + int(year) - int(info["anchor_year"]))
            if split_of and dicom_id not in split_of:
                ctx.bump("not_in_split_file")
            try:
                official = official_split(split_of.get(dicom_id))
            except ValueError as exc:
                raise RowError(str(exc)) from exc
            cand.allowed = frozenset({official}) if official else None
            return {
                "patient_id": subject,
                "study_id": study,
                "image_path": f"{options['images_dir']}/{group}/s{study}/{dicom_id}"
                f"{options['image_ext']}",
                "view_raw": view_raw,
                "view": view,
                "view_source": view_source,
                "sex": norm_sex(info.get("sex")),
                "age": age,
                "race": info.get("race"),
                **findings,
                "labels_extra": "{}",
                "report": report or None,
            }

        out.append(wrap_row_errors(cand, build))
    return out
