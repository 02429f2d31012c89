"""VinDr-CXR adapter (``vindr_cxr``), also reading the Kaggle VinBigData ``train.csv``.

Label files (relative to raw_root unless absolute; ``auto`` tries the release layout):

``labels_csv`` (default ``auto``: ``annotations/image_labels_train.csv``,
``image_labels_train.csv``, then Kaggle's ``train.csv``)
    either *wide* (``image_id``, ``rad_ID``/``rad_id``, one 0/1 column per label — the
    PhysioNet release) or *long* (``image_id``, ``rad_id``, ``class_name``, ``x_min``,
    ``y_min``, ``x_max``, ``y_max`` — ``annotations_train.csv`` / Kaggle), detected by columns.
``test_labels_csv`` (default ``auto``: ``annotations/image_labels_test.csv`` or
``image_labels_test.csv`` when present; None to skip) — the official test set (→ ``test``).
``boxes_csv`` / ``test_boxes_csv`` (default ``auto``: ``annotations/annotations_{train,test}.csv``
when present; None to skip) — long-format boxes for wide label files.
``train_dir`` / ``test_dir`` (defaults ``train`` / ``test``), ``image_ext`` (``.dicom``):
image path = ``{dir}/{image_id}{image_ext}``.

Readers: each training image has rows from 3 radiologists; they are united per image before
anything else (a label is 1 when any reader marked it; boxes of all readers are kept), so one
candidate row = one image and ``rows_in`` counts images (``source_rows`` in the adapter stats
counts the CSV rows). ``No Finding`` is 1 only when no reader marked any finding.

Labels map by :data:`labels.VINDR_TO_CHEXPERT`; the vocabulary is exhaustive, so unmentioned
findings are 0; Enlarged Cardiomediastinum (VinDr has no such label; "Aortic enlargement" is kept
apart) and Support Devices stay null. All VinDr labels are kept 0/1 in ``labels_extra``.
A class name outside the vocabulary rejects the image (``unparseable label value``); unknown
wide columns are kept in ``labels_extra`` with a warning. Spellings are normalised on reading
(:data:`labels.VINDR_ALIASES`: the test files' ``Other disease`` is the train files'
``Other diseases``), in label columns, class names and box labels alike, so ``labels_extra``
has one key per label.

DICOM headers are read for every present image (tags only): patient_id = ``PatientID`` (the
image_id when the tag is empty — VinDr removes it in many files; counted as
``patient_id_from_image_id``), sex, race (``EthnicGroup``), age (``PatientAge`` AS or
birth/study dates) and the view
(ViewPosition → ViewCodeSequence → descriptions, view_source ``dicom``). VinDr-CXR is all
frontal, but the tags are often empty; such rows stay ``UNKNOWN`` for the filter to decide,
unless ``default_view`` (default None) names a view to assume (view_source ``metadata``, view_raw
``"default_view option"``). An unreadable header rejects the image (``corrupt DICOM: ...``).
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
    RowError,
    check_age,
    extra_json,
    is_blank,
    norm_sex,
    optional_file,
    read_csv,
    records,
    resolve_file,
    wrap_row_errors,
)

logger = logging.getLogger(__name__)

OPTIONS: dict[str, Any] = {
    "labels_csv": "auto",
    "test_labels_csv": "auto",
    "boxes_csv": "auto",
    "test_boxes_csv": "auto",
    "train_dir": "train",
    "test_dir": "test",
    "image_ext": ".dicom",
    "default_view": None,
}

ID_COLUMNS = frozenset({"image_id", "rad_id", "rad_ID", "class_id"})
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")


def _auto(raw_root: Path, value: Any, names: tuple[str, ...], what: str) -> Path | None:
    if value is None:
        return None
    if value != "auto":
        return resolve_file(raw_root, value, what)
    for name in names:
        found = optional_file(raw_root, name, what)
        if found:
            return found
    return None


class _Image:
    """Accumulates one image's reader rows."""

    def __init__(self, first_row: int) -> None:
        self.first_row = first_row
        self.rows: list[dict[str, str]] = []
        self.positives: set[str] = set()
        self.readers: set[str] = set()
        self.boxes: list[dict[str, Any]] = []
        self.error: str | None = None


def _box(row: dict[str, str], label: str) -> dict[str, Any] | None:
    if any(is_blank(row.get(c)) for c in BOX_COLUMNS):
        return None
    try:
        x0, y0, x1, y1 = (float(row[c]) for c in BOX_COLUMNS)
    except ValueError as exc:
        raise RowError(f"unparseable boxes: {exc}") from exc
    return {"label": label, "x": x0, "y": y0, "w": x1 - x0, "h": y1 - y0}


def _collect(path: Path, images: dict[str, _Image], ctx: Context, *, boxes_only: bool) -> None:
    frame = read_csv(path, required=("image_id",))
    columns = list(frame.columns)
    long_format = "class_name" in columns
    if boxes_only and not long_format:
        raise ValueError(f"{path}: a boxes file needs class_name and {BOX_COLUMNS} columns")
    label_cols = [c for c in columns if c not in ID_COLUMNS and c not in BOX_COLUMNS]
    if not long_format:
        unknown = [c for c in label_cols if lab.vindr_label(c) not in lab.VINDR_TO_CHEXPERT]
        if unknown:
            logger.warning(
                "%s: columns %s are not VinDr labels; kept in labels_extra", path, unknown
            )
    reader_col = "rad_id" if "rad_id" in columns else ("rad_ID" if "rad_ID" in columns else None)
    for i, row in enumerate(records(frame)):
        image_id = row["image_id"].strip()
        if boxes_only and image_id not in images:
            continue  # boxes of images without a label row add nothing
        ctx.bump("source_rows" if not boxes_only else "box_rows")
        image = images.setdefault(image_id, _Image(i))
        if not boxes_only:
            image.rows.append(row)
        if reader_col:
            image.readers.add(row[reader_col])
        try:
            if long_format:
                raw_name = row["class_name"].strip()
                name = lab.vindr_label(raw_name)
                if name not in lab.VINDR_TO_CHEXPERT:
                    raise RowError(f"unparseable label value {raw_name!r} in column 'class_name'")
                if not boxes_only:
                    image.positives.add(name)
                box = _box(row, name)
                if box is not None:
                    image.boxes.append(box)
            else:
                for col in label_cols:
                    value = lab.parse_chexpert_value(row[col], col)
                    if value not in (None, 0, 1):
                        raise RowError(f"unparseable label value {row[col]!r} in column {col!r}")
                    if value == 1:
                        image.positives.add(lab.vindr_label(col))
        except (RowError, lab.LabelError) as exc:
            image.error = image.error or str(exc)


def read(raw_root: Path, options: dict[str, Any], ctx: Context) -> list[Candidate]:
    """Read VinDr-CXR labels (+ DICOM headers) into one candidate per image."""
    train = _auto(
        raw_root,
        options["labels_csv"],
        ("annotations/image_labels_train.csv", "image_labels_train.csv", "train.csv"),
        "vindr labels_csv",
    )
    if train is None:
        raise FileNotFoundError(
            f"vindr_cxr: no label file under {raw_root} (image_labels_train.csv or train.csv)"
        )
    test = _auto(
        raw_root,
        options["test_labels_csv"],
        ("annotations/image_labels_test.csv", "image_labels_test.csv"),
        "vindr test_labels_csv",
    )
    parts: list[tuple[Path, str, frozenset[str] | None, Path | None]] = []
    train_boxes = _auto(
        raw_root, options["boxes_csv"], ("annotations/annotations_train.csv",), "vindr boxes_csv"
    )
    parts.append(
        (
            train,
            options["train_dir"],
            frozenset({"train", "val"}) if test else None,
            train_boxes if train_boxes != train else None,
        )
    )
    if test:
        test_boxes = _auto(
            raw_root,
            options["test_boxes_csv"],
            ("annotations/annotations_test.csv",),
            "vindr test_boxes_csv",
        )
        parts.append((test, options["test_dir"], frozenset({"test"}), test_boxes))
    out: list[Candidate] = []
    for labels_path, folder, allowed, boxes_path in parts:
        images: dict[str, _Image] = {}
        _collect(labels_path, images, ctx, boxes_only=False)
        if boxes_path is not None:
            _collect(boxes_path, images, ctx, boxes_only=True)
        for image_id, image in tqdm(images.items(), desc=labels_path.name, disable=None):
            cand = Candidate(
                native_id=image_id or None,
                source_file=labels_path.name,
                source_row=image.first_row,
                raw={"image_id": image_id, "reader_rows": image.rows},
                allowed=allowed,
                error=image.error,
            )
            if cand.error:
                out.append(cand)
                continue
            rel = f"{folder}/{image_id}{options['image_ext']}"
            out.append(
                wrap_row_errors(
                    cand, lambda c=cand, i=image, r=rel: _fields(raw_root, r, c, i, options, ctx)
                )
            )
    return out


def _fields(
    raw_root: Path,
    rel: str,
    cand: Candidate,
    image: _Image,
    options: dict[str, Any],
    ctx: Context,
) -> dict[str, Any]:
    findings = lab.labels_from_terms(sorted(image.positives), lab.VINDR_TO_CHEXPERT)
    findings["enlarged_cardiomediastinum"] = None
    findings["support_devices"] = None
    extra = {name: int(name in image.positives) for name in lab.VINDR_LABELS}
    extra.update(dict.fromkeys(image.positives, 1))
    fields: dict[str, Any] = {
        "patient_id": cand.native_id,
        "study_id": cand.native_id,
        "image_path": rel,
        "view_raw": None,
        "view": "UNKNOWN",
        "view_source": "none",
        "sex": None,
        "age": None,
        **{col: findings[col] for col in schema.FINDING_COLUMNS},
        "labels_extra": extra_json(extra),
        "report": None,
        "boxes": image.boxes or None,
    }
    path = raw_root / rel
    patient = None
    if path.is_file() and path.stat().st_size > 0:
        try:
            header = dicom_tags.header_fields(dicom_tags.read_header(path))
        except dicom_tags.DicomHeaderError as exc:
            raise RowError(f"corrupt DICOM: {exc.problem}") from exc
        patient = header["patient_id"] or None
        fields["study_id"] = header["study_id"] or cand.native_id
        fields["sex"] = norm_sex(header["sex"])
        fields["race"] = header["race"] or None
        fields["age"] = (
            check_age(header["age_raw"]) if header["age_raw"] else header["age_from_dates"]
        )
        if header["view"] != "UNKNOWN":
            fields.update(view_raw=header["view_raw"], view=header["view"], view_source="dicom")
        else:
            fields["view_raw"] = header["view_raw"]
    if patient is None:
        ctx.bump("patient_id_from_image_id")
    else:
        fields["patient_id"] = patient
    if fields["view"] == "UNKNOWN" and options["default_view"]:
        if options["default_view"] not in schema.VIEWS:
            raise ValueError(
                f"vindr default_view {options['default_view']!r} not in {schema.VIEWS}"
            )
        fields.update(
            view=options["default_view"], view_raw="default_view option", view_source="metadata"
        )
    ctx.bump(f"view_source_{fields['view_source']}")
    return fields
