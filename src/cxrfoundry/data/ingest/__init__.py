"""Ingest: one dataset's native files → a manifest (+ rejects) in the shared schema.

``ingest(dataset, adapter, raw_root, options)`` runs an adapter (one module per source format,
see :data:`ADAPTERS`), then the checks every source shares, in this order (a row is rejected
for the first that fails, so each rejected row has exactly one reason):

1. the adapter's own reasons (``impossible age: <value>``, ``unparseable label value ...``,
   ``corrupt DICOM: <error>``, ...);
2. ``missing patient id``; ``missing image id``;
3. ``duplicate image id`` (the first occurrence in source order is kept);
4. ``unparseable boxes: ...`` from the ``annotations`` file;
5. the image file: ``image missing``, ``image empty``, and by ``verify_images``: ``header``
   (default) checks magic bytes, the PNG chunk walk, the JPEG end-of-image marker and DICOM
   headers (``image truncated: ...``, ``image unreadable: ...``, ``corrupt DICOM: ...``);
   ``decode`` also decodes every image fully in a process pool; ``exists`` only checks the file
   is there and non-empty; ``none`` checks nothing.

Options every adapter accepts (besides its own, documented in its module):

``verify_images``
    ``none`` | ``exists`` | ``header`` | ``decode`` (default ``header``).
``workers``
    processes for ``decode`` (default 1).
``split_fractions``
    hashed split fractions (default train 0.8 / val 0.1 / test 0.1); official splits win.
``split_salt``
    text mixed into the split hash to draw another deterministic split (default '').
``annotations``
    a CSV (relative to raw_root or absolute) with ``image_path`` and any of ``mask_path``,
    ``boxes`` (JSON list of {label,x,y,w,h}); joined on image_path (the demo's
    ``phantom_truth.csv``, CheXmask-derived files, ...). Non-null values override the
    adapter's own boxes.
``include_decubitus``
    map decubitus views to their frontal projection at ingest (default False → ``OTHER``).

``rows_in`` counts images as the adapter sees them (one per image row; VinDr's reader rows are
first united per image, see its module). ``rows_in == rows_kept + rows_rejected`` is asserted.
``rejects_by_reason`` groups by the reason's text before its first ``:`` ("impossible age");
the rejects table keeps the full reason and the input row as JSON; ``source_row`` is the
0-based data-row index in ``source_file`` (the file's sorted position for DICOM folders).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from cxrfoundry import schema
from cxrfoundry.data import splits as split_mod
from cxrfoundry.data.ingest import (
    brax,
    chexpert,
    dicom_folder,
    generic_csv,
    mimic_cxr_jpg,
    nih,
    padchest,
    vindr_cxr,
)
from cxrfoundry.data.ingest._core import (
    VERIFY_MODES,
    Candidate,
    Context,
    RowError,
    check_image,
    decode_reason,
    normalise_boxes,
    read_csv,
    resolve_file,
    text_or_none,
)
from cxrfoundry.io import write_json, write_parquet

logger = logging.getLogger(__name__)

STAGE = "ingest"

#: Adapter name → module (each has ``OPTIONS`` defaults and ``read(raw_root, options, ctx)``).
ADAPTERS: dict[str, ModuleType] = {
    "mimic_cxr_jpg": mimic_cxr_jpg,
    "chexpert": chexpert,
    "nih": nih,
    "padchest": padchest,
    "brax": brax,
    "vindr_cxr": vindr_cxr,
    "dicom_folder": dicom_folder,
    "generic_csv": generic_csv,
}

#: Options every adapter accepts, with defaults.
COMMON_OPTIONS: dict[str, Any] = {
    "verify_images": "header",
    "workers": 1,
    "split_fractions": dict(split_mod.DEFAULT_FRACTIONS),
    "split_salt": "",
    "annotations": None,
    "include_decubitus": False,
}


@dataclass
class IngestResult:
    """Output of :func:`ingest`: manifest (MANIFEST_SCHEMA), rejects (REJECTS_SCHEMA), counts."""

    manifest: pa.Table
    rejects: pa.Table
    counts: dict[str, Any]
    options: dict[str, Any]
    dataset: str
    adapter: str


def resolve_options(adapter: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge ``options`` over the common and the adapter's defaults; unknown keys are errors."""
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown ingest adapter {adapter!r}; choose from {sorted(ADAPTERS)}")
    defaults = {**COMMON_OPTIONS, **ADAPTERS[adapter].OPTIONS}
    given = dict(options or {})
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(
            f"ingest adapter {adapter!r}: unknown options {sorted(unknown)}; "
            f"known: {sorted(defaults)}"
        )
    out = {**defaults, **given}
    if out["verify_images"] not in VERIFY_MODES:
        raise ValueError(
            f"verify_images must be one of {VERIFY_MODES}, got {out['verify_images']!r}"
        )
    out["split_fractions"] = split_mod.check_fractions(out["split_fractions"])
    return out


def _load_annotations(raw_root: Path, name: str) -> dict[str, dict[str, Any]]:
    path = resolve_file(raw_root, name, "annotations")
    frame = read_csv(path, required=("image_path",))
    table: dict[str, dict[str, Any]] = {}
    for row in frame.to_dict(orient="records"):
        key = Path(row["image_path"]).as_posix()
        if key in table:
            raise ValueError(f"{path}: image_path {key!r} appears twice")
        table[key] = {"mask_path": text_or_none(row.get("mask_path")), "boxes": row.get("boxes")}
    return table


def ingest(
    dataset: str, adapter: str, raw_root: Path | str, options: Mapping[str, Any] | None = None
) -> IngestResult:
    """Ingest one dataset.

    Args:
        dataset: the dataset name (the ``image_id`` prefix, the split hash key).
        adapter: a key of :data:`ADAPTERS`.
        raw_root: the dataset's raw folder; manifest ``image_path`` values are relative to it.
        options: common options (module docstring) and the adapter's (its module docstring).

    Returns:
        :class:`IngestResult` whose counts hold rows_in, rows_kept, rows_rejected,
        rejects_by_reason, views, splits, patients and adapter statistics.

    Raises:
        ValueError / FileNotFoundError: unusable configuration or metadata files, naming them.
    """
    raw_root = Path(raw_root)
    if not raw_root.is_dir():
        raise FileNotFoundError(f"ingest {dataset}: raw root {raw_root} is not a folder")
    opts = resolve_options(adapter, options)
    ctx = Context(dataset=dataset)
    logger.info("ingest %s with adapter %s from %s", dataset, adapter, raw_root)
    candidates: list[Candidate] = list(ADAPTERS[adapter].read(raw_root, opts, ctx))

    annotations: dict[str, dict[str, Any]] = {}
    if opts["annotations"]:
        annotations = _load_annotations(raw_root, opts["annotations"])
        ctx.stats["annotations_file"] = str(opts["annotations"])

    reasons: list[str | None] = [c.error for c in candidates]
    seen: set[str] = set()
    for i, cand in enumerate(candidates):
        if reasons[i]:
            continue
        if not text_or_none(cand.fields.get("patient_id")):
            reasons[i] = "missing patient id"
            continue
        if not text_or_none(cand.native_id) or not text_or_none(cand.fields.get("image_path")):
            reasons[i] = "missing image id"
            continue
        image_id = f"{dataset}/{cand.native_id}"
        if image_id in seen:
            reasons[i] = "duplicate image id"
            continue
        seen.add(image_id)
        ann = annotations.get(cand.fields["image_path"])
        try:
            boxes = normalise_boxes(cand.fields.get("boxes"))
            if ann is not None:
                ann_boxes = normalise_boxes(ann["boxes"])
                boxes = ann_boxes if ann_boxes is not None else boxes
                if ann["mask_path"]:
                    cand.fields["mask_path"] = ann["mask_path"]
        except RowError as exc:
            reasons[i] = str(exc)
            continue
        cand.fields["boxes"] = boxes
    ctx.stats["annotations_matched"] = sum(
        1 for c in candidates if annotations and c.fields.get("image_path") in annotations
    )

    mode = opts["verify_images"]
    todo = [i for i in range(len(candidates)) if not reasons[i]]
    for i in tqdm(todo, desc=f"check images ({mode})", disable=None):
        cand = candidates[i]
        reasons[i] = check_image(raw_root / cand.fields["image_path"], mode)
    if mode == "decode":
        todo = [i for i in todo if not reasons[i]]
        paths = [str(raw_root / candidates[i].fields["image_path"]) for i in todo]
        workers = max(1, int(opts["workers"]))
        if workers > 1 and len(paths) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = list(
                    tqdm(
                        pool.map(decode_reason, paths, chunksize=16),
                        total=len(paths),
                        desc="decode images",
                        disable=None,
                    )
                )
        else:
            results = [decode_reason(p) for p in tqdm(paths, desc="decode images", disable=None)]
        for i, reason in zip(todo, results, strict=True):
            reasons[i] = reason

    kept = [c for c, r in zip(candidates, reasons, strict=True) if not r]
    assigned, split_stats = split_mod.assign_splits(
        dataset,
        [str(c.fields["patient_id"]).strip() for c in kept],
        [c.allowed for c in kept],
        opts["split_fractions"],
        str(opts["split_salt"]),
    )
    manifest_rows = []
    for cand, split in zip(kept, assigned, strict=True):
        row = dict(cand.fields)
        row["image_id"] = f"{dataset}/{cand.native_id}"
        row["dataset"] = dataset
        row["patient_id"] = str(row["patient_id"]).strip()
        row["study_id"] = text_or_none(row.get("study_id")) or row["patient_id"]
        row["split"] = split
        if row.get("view", "UNKNOWN") == "UNKNOWN":
            row["view"], row["view_source"] = "UNKNOWN", "none"
        row.setdefault("labels_extra", "{}")
        manifest_rows.append(row)
    manifest_rows.sort(key=lambda r: r["image_id"])
    reject_rows = [
        schema.reject_row(
            dataset=dataset,
            stage=STAGE,
            source_file=cand.source_file,
            source_row=cand.source_row,
            image_id=f"{dataset}/{cand.native_id}" if text_or_none(cand.native_id) else None,
            reason=reason,
            row=cand.raw,
        )
        for cand, reason in zip(candidates, reasons, strict=True)
        if reason
    ]
    reject_rows.sort(key=lambda r: (r["source_file"], r["source_row"] or -1, r["image_id"] or ""))
    manifest = schema.conform(manifest_rows, schema.MANIFEST_SCHEMA)
    rejects = schema.conform(reject_rows, schema.REJECTS_SCHEMA)

    by_reason = Counter(r["reason"].split(":")[0] for r in reject_rows)
    counts: dict[str, Any] = {
        "rows_in": len(candidates),
        "rows_kept": manifest.num_rows,
        "rows_rejected": rejects.num_rows,
        "rejects_by_reason": dict(sorted(by_reason.items())),
        "views": dict(sorted(Counter(r["view"] for r in manifest_rows).items())),
        "view_sources": dict(sorted(Counter(r["view_source"] for r in manifest_rows).items())),
        "view_raw_to_view": _raw_view_counts(manifest_rows),
        "splits": dict(sorted(Counter(r["split"] for r in manifest_rows).items())),
        "patients": split_stats["patients"],
        "patients_official_conflict": split_stats["patients_official_conflict"],
        "rows_moved_from_official_split": split_stats["rows_moved_from_official_split"],
        "adapter": dict(sorted(ctx.stats.items())),
    }
    if counts["rows_in"] != counts["rows_kept"] + counts["rows_rejected"]:
        raise AssertionError(f"ingest {dataset}: rows_in != rows_kept + rows_rejected ({counts})")
    logger.info(
        "ingest %s: %d in, %d kept, %d rejected %s",
        dataset,
        counts["rows_in"],
        counts["rows_kept"],
        counts["rows_rejected"],
        counts["rejects_by_reason"],
    )
    return IngestResult(
        manifest=manifest,
        rejects=rejects,
        counts=counts,
        options=opts,
        dataset=dataset,
        adapter=adapter,
    )


def _raw_view_counts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    combos = Counter((str(r.get("view_raw")), r["view"], r["view_source"]) for r in rows)
    return [
        {"view_raw": raw, "view": view, "view_source": src, "count": n}
        for (raw, view, src), n in sorted(combos.items())
    ]


def write_ingest(
    result: IngestResult,
    manifest_path: Path | str,
    rejects_path: Path | str,
    audit_path: Path | str,
) -> None:
    """Write the manifest and rejects Parquet files and the audit JSON, each atomically.

    The audit holds dataset, adapter, resolved options and the counts; all three files are
    byte-identical on rerun with the same inputs.
    """
    write_parquet(manifest_path, result.manifest)
    write_parquet(rejects_path, result.rejects)
    audit = {
        "stage": STAGE,
        "dataset": result.dataset,
        "adapter": result.adapter,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in result.options.items()},
        **result.counts,
    }
    write_json(audit_path, audit)


def ingest_to_files(
    dataset: str,
    adapter: str,
    raw_root: Path | str,
    options: Mapping[str, Any] | None,
    *,
    manifest_path: Path | str,
    rejects_path: Path | str,
    audit_path: Path | str,
) -> dict[str, Any]:
    """Ingest one dataset and write its manifest, rejects and audit; return the numeric counts."""
    result = ingest(dataset, adapter, raw_root, options)
    write_ingest(result, manifest_path, rejects_path, audit_path)
    return {k: v for k, v in result.counts.items() if isinstance(v, int | float)}


__all__ = [
    "ADAPTERS",
    "COMMON_OPTIONS",
    "IngestResult",
    "ingest",
    "ingest_to_files",
    "resolve_options",
    "write_ingest",
]
