"""Data contracts shared by every stage: vocabularies and Arrow schemas.

The manifest is the unit every stage after ingest reads (DESIGN.md section 3). Columns are
defined once here; stages build tables with :func:`empty_table` / :func:`conform` so that a
column added in one place appears everywhere with the same type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

#: The 14 CheXpert findings: (display name, column name).
FINDINGS: tuple[tuple[str, str], ...] = (
    ("No Finding", "no_finding"),
    ("Enlarged Cardiomediastinum", "enlarged_cardiomediastinum"),
    ("Cardiomegaly", "cardiomegaly"),
    ("Lung Opacity", "lung_opacity"),
    ("Lung Lesion", "lung_lesion"),
    ("Edema", "edema"),
    ("Consolidation", "consolidation"),
    ("Pneumonia", "pneumonia"),
    ("Atelectasis", "atelectasis"),
    ("Pneumothorax", "pneumothorax"),
    ("Pleural Effusion", "pleural_effusion"),
    ("Pleural Other", "pleural_other"),
    ("Fracture", "fracture"),
    ("Support Devices", "support_devices"),
)
FINDING_NAMES: tuple[str, ...] = tuple(name for name, _ in FINDINGS)
FINDING_COLUMNS: tuple[str, ...] = tuple(col for _, col in FINDINGS)
FINDING_COLUMN_BY_NAME: dict[str, str] = dict(FINDINGS)
FINDING_NAME_BY_COLUMN: dict[str, str] = {col: name for name, col in FINDINGS}

#: Label values in finding columns (null = not mentioned).
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1

#: Normalised views.
VIEWS: tuple[str, ...] = ("PA", "AP", "AP_SUPINE", "LATERAL", "OTHER", "UNKNOWN")
FRONTAL_VIEWS: frozenset[str] = frozenset({"PA", "AP", "AP_SUPINE"})
VIEW_SOURCES: tuple[str, ...] = ("metadata", "dicom", "classifier", "none")
SEXES: tuple[str, ...] = ("M", "F")
SPLITS: tuple[str, ...] = ("train", "val", "test")

REPORT_SOURCES: tuple[str, ...] = ("original", "llm", "template")
QC_STATUSES: tuple[str, ...] = ("pass", "repaired", "fallback")

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("study_id", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("view", pa.string(), nullable=False),
        pa.field("view_raw", pa.string()),
        pa.field("view_source", pa.string(), nullable=False),
        pa.field("sex", pa.string()),
        pa.field("age", pa.float64()),
        pa.field("race", pa.string()),
        *[pa.field(col, pa.int8()) for col in FINDING_COLUMNS],
        pa.field("labels_extra", pa.string(), nullable=False),
        pa.field("report", pa.string()),
        pa.field("split", pa.string(), nullable=False),
        # Ground truth where a dataset has it (phantom masks, NIH/VinDr boxes); null otherwise.
        pa.field("mask_path", pa.string()),
        pa.field("boxes", pa.string()),
    ]
)

#: Reports = manifest + the report stage's columns (``report`` then holds the final text).
REPORTS_SCHEMA = pa.schema(
    [
        *MANIFEST_SCHEMA,
        pa.field("report_original", pa.string()),
        pa.field("report_source", pa.string(), nullable=False),
        pa.field("qc_status", pa.string(), nullable=False),
        pa.field("qc_flags", pa.string(), nullable=False),
        pa.field("llm_model", pa.string()),
        pa.field("prompt_sha256", pa.string()),
    ]
)

#: Shards = reports + decoded, resized and re-encoded pixels.
SHARD_SCHEMA = pa.schema(
    [
        *REPORTS_SCHEMA,
        pa.field("image", pa.binary(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        # PNG, bit 0 = lungs, bit 1 = heart, bit 2 = lesion; null where no mask exists.
        pa.field("mask", pa.binary()),
    ]
)

#: Every unusable input row lands here with a reason; nothing is dropped silently.
REJECTS_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64()),
        pa.field("image_id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("row", pa.string(), nullable=False),  # the input row as JSON text
    ]
)

MASK_BITS: dict[str, int] = {"lungs": 1, "heart": 2, "lesion": 4}


def empty_table(schema: pa.Schema) -> pa.Table:
    """Return a zero-row table with ``schema``."""
    return schema.empty_table()


def conform(rows: Iterable[Mapping[str, Any]] | pa.Table, schema: pa.Schema) -> pa.Table:
    """Build a table with exactly ``schema``'s columns, in order, from rows or a wider table.

    Missing nullable columns are filled with nulls; extra columns are dropped; a missing
    non-nullable column raises ``ValueError`` naming it.
    """
    if isinstance(rows, pa.Table):
        table = rows
    else:
        rows = list(rows)
        table = pa.Table.from_pylist(rows) if rows else None
    columns = []
    n = 0 if table is None else table.num_rows
    for field in schema:
        if table is not None and field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.nullable or n == 0:
            columns.append(pa.nulls(n, field.type))
        else:
            raise ValueError(f"required column {field.name!r} is missing")
    return pa.Table.from_arrays(columns, schema=schema)


def reject_row(
    *,
    dataset: str,
    stage: str,
    source_file: str,
    reason: str,
    row: Mapping[str, Any],
    source_row: int | None = None,
    image_id: str | None = None,
) -> dict[str, Any]:
    """Build one rejects-table row; ``row`` is serialised to JSON text (non-JSON values as str)."""
    import json

    return {
        "dataset": dataset,
        "stage": stage,
        "source_file": source_file,
        "source_row": source_row,
        "image_id": image_id,
        "reason": reason,
        "row": json.dumps(dict(row), default=str, sort_keys=True),
    }
