"""Generic DICOM folder adapter (``dicom_folder``).

Walks raw_root for files whose names end in one of ``suffixes`` (default ``.dcm``, ``.dicom``;
case-insensitive), in sorted path order, and reads each header (tags only):

* patient_id = ``PatientID``; study_id = ``StudyInstanceUID``;
* image_id = ``{dataset}/{SOPInstanceUID}`` (``id_from: sop``, default) or the path relative to
  raw_root without its suffix (``id_from: path``). Two files with one SOPInstanceUID are the same
  instance: the second is rejected as ``duplicate image id``;
* sex = ``PatientSex``; race = ``EthnicGroup``; age = ``PatientAge`` (``045Y``, ``018M``,
  ``003W``, ``010D``, or a bare number read as years), else from ``PatientBirthDate`` and the
  study date;
* view = :func:`cxrfoundry.data.dicom.view_from_tags` (ViewPosition → ViewCodeSequence → series
  / protocol / study / procedure descriptions), view_source ``dicom``.

A file whose header cannot be read is rejected as ``corrupt DICOM: <error>``.

Optional labels: ``labels_csv`` (default None) joined on ``labels_key`` (its column, default
``image_id``) = the DICOM's ``dicom_key`` (``sop`` (default), ``path`` (relative path), ``stem``
(file name without suffix), ``PatientID`` or ``StudyInstanceUID``). Its CheXpert-named columns
(1/0/-1/blank) give the findings, ``extra_columns`` (list) go to labels_extra, ``report_col``
(default None) to report. Files without a labels row get null labels (counted).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cxrfoundry import schema
from cxrfoundry.data import dicom as dicom_tags
from cxrfoundry.data import labels as lab
from cxrfoundry.data.ingest._core import (
    Candidate,
    Context,
    check_age,
    extra_json,
    norm_sex,
    read_csv,
    records,
    rel_path,
    resolve_file,
    text_or_none,
    wrap_row_errors,
)
from cxrfoundry.io import walk_files

logger = logging.getLogger(__name__)

OPTIONS: dict[str, Any] = {
    "suffixes": [".dcm", ".dicom"],
    "id_from": "sop",
    "labels_csv": None,
    "labels_key": "image_id",
    "dicom_key": "sop",
    "extra_columns": [],
    "report_col": None,
}

DICOM_KEYS = ("sop", "path", "stem", "PatientID", "StudyInstanceUID")


def find_dicoms(raw_root: Path, suffixes: list[str]) -> list[Path]:
    """Every file under ``raw_root`` ending in one of ``suffixes``, in sorted path order.

    Symlinked folders are followed, each real folder once (:func:`cxrfoundry.io.walk_files`).
    """
    return sorted(walk_files(raw_root, suffixes))


def _labels(raw_root: Path, options: dict[str, Any]) -> tuple[dict[str, dict[str, str]], str]:
    path = resolve_file(raw_root, options["labels_csv"], "dicom_folder labels_csv")
    frame = read_csv(path, required=(options["labels_key"],))
    table: dict[str, dict[str, str]] = {}
    for row in records(frame):
        key = row[options["labels_key"]].strip()
        if key in table:
            raise ValueError(f"{path}: key {key!r} in column {options['labels_key']!r} repeats")
        table[key] = row
    return table, path.name


def read(raw_root: Path, options: dict[str, Any], ctx: Context) -> list[Candidate]:
    """Read every DICOM header under raw_root into candidates (see the module docstring)."""
    if options["id_from"] not in ("sop", "path"):
        raise ValueError(
            f"dicom_folder id_from must be 'sop' or 'path', got {options['id_from']!r}"
        )
    if options["dicom_key"] not in DICOM_KEYS:
        raise ValueError(f"dicom_folder dicom_key must be one of {DICOM_KEYS}")
    labels: dict[str, dict[str, str]] = {}
    if options["labels_csv"]:
        labels, labels_name = _labels(raw_root, options)
        ctx.stats["labels_file"] = labels_name
    out = []
    for i, path in enumerate(
        tqdm(find_dicoms(raw_root, options["suffixes"]), desc="dicom headers", disable=None)
    ):
        rel = rel_path(path, raw_root)
        stem = rel.rsplit(".", 1)[0]
        cand = Candidate(native_id=stem, source_file=rel, source_row=i, raw={"path": rel})
        try:
            header = dicom_tags.header_fields(dicom_tags.read_header(path))
        except dicom_tags.DicomHeaderError as exc:
            cand.error = f"corrupt DICOM: {exc.problem}"
            out.append(cand)
            continue
        cand.raw = {"path": rel, **header}
        if options["id_from"] == "sop":
            cand.native_id = header["sop_uid"] or None

        def build(header: dict[str, Any] = header, rel: str = rel, stem: str = stem) -> dict:
            keys = {
                "sop": header["sop_uid"],
                "path": rel,
                "stem": Path(rel).name.rsplit(".", 1)[0],
                "PatientID": header["patient_id"],
                "StudyInstanceUID": header["study_id"],
            }
            label_row = labels.get(keys[options["dicom_key"]]) if labels else None
            if labels and label_row is None:
                ctx.bump("without_labels_row")
            findings = (
                lab.chexpert_columns(label_row)
                if label_row
                else dict.fromkeys(schema.FINDING_COLUMNS)
            )
            extra = {c: label_row.get(c) for c in options["extra_columns"]} if label_row else {}
            age = check_age(header["age_raw"]) if header["age_raw"] else header["age_from_dates"]
            if age is not None:
                age = check_age(age)
            view = header["view"]
            return {
                "patient_id": header["patient_id"] or None,
                "study_id": header["study_id"] or None,
                "image_path": rel,
                "view_raw": header["view_raw"],
                "view": view,
                "view_source": "dicom" if view != "UNKNOWN" else "none",
                "sex": norm_sex(header["sex"]),
                "race": header["race"] or None,
                "age": age,
                **findings,
                "labels_extra": extra_json(extra),
                "report": text_or_none(label_row.get(options["report_col"]))
                if label_row and options["report_col"]
                else None,
            }

        out.append(wrap_row_errors(cand, build))
    ctx.stats["dicom_files"] = len(out)
    return out
