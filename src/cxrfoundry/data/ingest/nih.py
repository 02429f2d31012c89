"""NIH ChestX-ray14 adapter (``nih``).

Files (relative to raw_root unless absolute):

``data_entry`` (default ``auto``: ``Data_Entry_2017_v2020.csv``, else ``Data_Entry_2017.csv``)
    columns used: ``Image Index``, ``Finding Labels`` (pipe-separated), ``Patient ID``,
    ``Patient Age`` (years; ``058Y`` accepted), ``Patient Gender`` (M/F), ``View Position``
    (PA/AP), ``Follow-up #``.
``bbox`` (default ``BBox_List_2017.csv``; used when present)
    ``Image Index``, ``Finding Label``, then x, y, w, h → ``boxes`` (pixel coordinates of the
    1024×1024 release images, as published).
``train_val_list`` / ``test_list`` (defaults ``train_val_list.txt`` / ``test_list.txt``)
    the official split, each list used when present (one alone is enough): test → ``test``;
    train_val → hashed (per patient) into train/val; images in no list → hashed over all splits.
images
    every ``*.png`` under raw_root is indexed once (``images/``, the release's
    ``images_001/images/`` folders, ...); ``Image Index`` is looked up by file name.

Labels: ``Finding Labels`` terms map by :data:`labels.NIH_TO_CHEXPERT` (Effusion → Pleural
Effusion, Mass/Nodule → Lung Lesion, Infiltration → Lung Opacity, Pleural_Thickening → Pleural
Other; Emphysema/Fibrosis/Hernia → labels_extra only). NIH's labels are exhaustive for its 14
terms, so findings not listed are 0 (``unmentioned``: ``negative``; ``null`` to leave them
unknown); Enlarged Cardiomediastinum, Fracture and Support Devices are not in NIH's vocabulary
and stay null. ``labels_extra`` holds all 14 NIH labels as 0/1 (the NIH benchmark's classes).
A term outside the vocabulary rejects the row (``unparseable label value``).

image_id = ``nih/{Image Index without .png}``; study_id = the same (NIH has one image per
follow-up); patient_id = ``Patient ID``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from cxrfoundry.data import labels as lab
from cxrfoundry.data.ingest._core import (
    Candidate,
    Context,
    RowError,
    check_age,
    extra_json,
    index_files,
    metadata_view,
    norm_sex,
    optional_file,
    read_csv,
    records,
    resolve_file,
    text_or_none,
    wrap_row_errors,
)

logger = logging.getLogger(__name__)

OPTIONS: dict[str, Any] = {
    "data_entry": "auto",
    "bbox": "BBox_List_2017.csv",
    "train_val_list": "train_val_list.txt",
    "test_list": "test_list.txt",
    "unmentioned": "negative",
}

REQUIRED = ("Image Index", "Finding Labels", "Patient ID", "View Position")


def _read_list(path: Path) -> set[str]:
    # utf-8-sig: a list saved with a byte-order mark must not hide its first image name
    text = path.read_text(encoding="utf-8-sig")
    return {line.strip() for line in text.splitlines() if line.strip()}


def read_boxes(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Read ``BBox_List_2017.csv`` (its header has a broken ``Bbox [x,y,w,h]`` cell; positional)."""
    import csv

    boxes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        for line_no, cells in enumerate(reader, start=2):
            if not cells or not any(c.strip() for c in cells):
                continue
            try:
                name, label = cells[0].strip(), cells[1].strip()
                x, y, w, h = (float(c) for c in cells[2:6])
            except (ValueError, IndexError) as exc:
                raise ValueError(f"{path}:{line_no}: bad bounding-box row {cells!r}") from exc
            boxes[name].append({"label": label, "x": x, "y": y, "w": w, "h": h})
    return boxes


def read(raw_root: Path, options: dict[str, Any], ctx: Context) -> list[Candidate]:
    """Read NIH ChestX-ray14 into candidates (see the module docstring)."""
    if options["data_entry"] == "auto":
        path = optional_file(raw_root, "Data_Entry_2017_v2020.csv", "data_entry") or resolve_file(
            raw_root, "Data_Entry_2017.csv", "nih data_entry (Data_Entry_2017[_v2020].csv)"
        )
    else:
        path = resolve_file(raw_root, options["data_entry"], "nih data_entry")
    frame = read_csv(path, required=REQUIRED)
    bbox_path = optional_file(raw_root, options["bbox"], "bbox")
    boxes = read_boxes(bbox_path) if bbox_path else {}
    tv_path = optional_file(raw_root, options["train_val_list"], "train_val_list")
    test_path = optional_file(raw_root, options["test_list"], "test_list")
    # Each list counts on its own: a lone test_list.txt still keeps its images out of training.
    train_val = _read_list(tv_path) if tv_path else set()
    test = _read_list(test_path) if test_path else set()
    ctx.stats["official_split"] = bool(tv_path or test_path)
    ctx.stats["official_lists"] = [p.name for p in (tv_path, test_path) if p]
    index = index_files(raw_root, (".png",))
    ctx.stats["png_files_found"] = len(index)
    unmentioned = options["unmentioned"]
    out = []
    for i, row in enumerate(records(frame)):
        name = row["Image Index"].strip()
        cand = Candidate(
            native_id=name.rsplit(".", 1)[0] if name else None,
            source_file=path.name,
            source_row=i,
            raw=row,
        )
        if name in test:
            cand.allowed = frozenset({"test"})
        elif name in train_val:
            cand.allowed = frozenset({"train", "val"})

        def build(row: dict[str, str] = row, name: str = name) -> dict[str, Any]:
            terms = [t.strip() for t in row["Finding Labels"].split("|") if t.strip()]
            bad = lab.unknown_terms(terms, lab.NIH_TO_CHEXPERT)
            if bad:
                raise RowError(f"unparseable label value {bad[0]!r} in column 'Finding Labels'")
            findings = lab.labels_from_terms(terms, lab.NIH_TO_CHEXPERT, unmentioned=unmentioned)
            for col in ("enlarged_cardiomediastinum", "fracture", "support_devices"):
                findings[col] = None  # not in NIH's vocabulary: unknown, not negative
            view_raw, view, view_source = metadata_view(row["View Position"], options)
            return {
                "patient_id": text_or_none(row["Patient ID"]),
                "study_id": name.rsplit(".", 1)[0],
                "image_path": index.get(name, f"images/{name}"),
                "view_raw": view_raw,
                "view": view,
                "view_source": view_source,
                "sex": norm_sex(row.get("Patient Gender")),
                "age": check_age(row.get("Patient Age")),
                **findings,
                "labels_extra": extra_json({t: int(t in terms) for t in lab.NIH_FINDINGS}),
                "report": None,
                "boxes": boxes.get(name) or None,
            }

        out.append(wrap_row_errors(cand, build))
    return out
