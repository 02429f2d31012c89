"""CheXpert / CheXpert-Plus adapter (``chexpert``).

Files (relative to raw_root unless absolute):

``train_csv``, ``valid_csv`` (default ``auto``: ``train.csv`` / ``valid.csv`` at raw_root, else
in a ``CheXpert-v1.0-small/`` or ``CheXpert-v1.0/`` folder below it; None to skip ``valid_csv``)
    CheXpert columns: ``Path``, ``Sex`` (Male/Female/Unknown), ``Age``, ``Frontal/Lateral``,
    ``AP/PA`` (AP, PA, LL, RL, empty) and the 14 finding columns (1/0/-1/blank). CheXpert-Plus
    spellings are accepted too: ``path_to_image``, ``sex``, ``age``, ``race``,
    ``frontal_lateral``, ``ap_pa``, ``deid_patient_id``, ``report``, ``split``; absent finding
    columns give null labels.

Image paths: the ``Path`` column starts with the release folder (``CheXpert-v1.0-small/``).
Each row tries ``raw_root/Path`` and then ``raw_root/Path-without-its-first-folder``, so a
raw_root that is the release folder itself or its parent both work; the manifest keeps the form
that exists (the stripped one when neither exists, which then rejects as ``image missing``).

Splits: ``valid_csv`` rows → ``valid_as`` (default ``val``). ``train_csv`` rows: by default
(``train_rows``: ``hash``) hashed per patient over the splits the official split does not
already provide (train and test when valid.csv is the val set — CheXpert's official test set is
not in the release); ``train_rows: train`` keeps them all in train. A CheXpert-Plus ``split``
column overrides both.

Views: ``Frontal/Lateral`` = Lateral → ``LATERAL``; Frontal → the ``AP/PA`` value (AP, PA);
Frontal with an empty or contradictory side (LL/RL) → ``UNKNOWN``. view_raw is
``"Frontal/AP"``-style text, just ``"Frontal"`` when the side is empty: the filter takes that as
a frontal of unknown side from metadata (:func:`views.filter_frontal`); a contradictory
``"Frontal/LL"`` is left to its fallbacks.

image_id = ``{dataset}/{path without release folder and extension}`` (e.g.
``chexpert/train/patient00001/study1/view1_frontal``); patient_id = ``patientNNNNN`` from the
path (or ``deid_patient_id``); study_id = ``patientNNNNN/studyN``.
"""

from __future__ import annotations

import logging
import re
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
    norm_sex,
    read_csv,
    records,
    resolve_file,
    text_or_none,
    wrap_row_errors,
)
from cxrfoundry.data.splits import official_split
from cxrfoundry.data.views import normalize_view

logger = logging.getLogger(__name__)

OPTIONS: dict[str, Any] = {
    "train_csv": "auto",
    "valid_csv": "auto",
    "valid_as": "val",
    "train_rows": "hash",
}

ALIASES: dict[str, tuple[str, ...]] = {
    "path": ("Path", "path_to_image"),
    "sex": ("Sex", "sex"),
    "age": ("Age", "age"),
    "race": ("race", "Race"),
    "frontal_lateral": ("Frontal/Lateral", "frontal_lateral"),
    "ap_pa": ("AP/PA", "ap_pa"),
    "patient": ("deid_patient_id",),
    "report": ("report", "Report"),
    "split": ("split",),
}

_PATIENT = re.compile(r"(patient\d+)/(study\d+)/")


def _col(columns: list[str], key: str) -> str | None:
    return next((c for c in ALIASES[key] if c in columns), None)


def _resolve_path(raw_root: Path, value: str) -> str:
    path = value.strip().lstrip("/")
    parts = path.split("/", 1)
    stripped = parts[1] if len(parts) == 2 else path
    if (raw_root / path).is_file():
        return path
    if (raw_root / stripped).is_file():
        return stripped
    return stripped if parts[0].lower().startswith("chexpert") else path


def _release_relative(path: str) -> str:
    """``path`` without a leading ``CheXpert-v1.0*`` release folder (the id is layout-free)."""
    parts = path.split("/", 1)
    return parts[1] if len(parts) == 2 and parts[0].lower().startswith("chexpert") else path


def view_of(frontal_lateral: str | None, ap_pa: str | None, options: dict[str, Any]) -> tuple:
    """CheXpert's two view columns → ``(view_raw, view, view_source)``."""
    fl = (frontal_lateral or "").strip()
    side = (ap_pa or "").strip()
    raw = f"{fl}/{side}" if side else fl
    if not raw:
        return None, "UNKNOWN", "none"
    decub = bool(options.get("include_decubitus"))
    if fl.lower() == "lateral":
        return raw, "LATERAL", "metadata"
    if fl.lower() == "frontal":
        view = normalize_view(side, "chexpert", decubitus_as_frontal=decub)
        if view in ("LATERAL", "UNKNOWN"):
            return raw, "UNKNOWN", "none"
        return raw, view, "metadata"
    view = normalize_view(side or fl, "chexpert", decubitus_as_frontal=decub)
    return raw, view, "metadata" if view != "UNKNOWN" else "none"


def _read_one(
    raw_root: Path,
    path: Path,
    official: str | None,
    options: dict[str, Any],
    ctx: Context,
) -> list[Candidate]:
    frame = read_csv(path)
    columns = list(frame.columns)
    names = {key: _col(columns, key) for key in ALIASES}
    if names["path"] is None:
        raise ValueError(f"{path}: no image path column (one of {ALIASES['path']})")
    out = []
    for i, row in enumerate(tqdm(records(frame), desc=path.name, disable=None)):
        image_path = _resolve_path(raw_root, row[names["path"]]) if row[names["path"]] else ""
        native = _release_relative(image_path).rsplit(".", 1)[0] if image_path else None
        cand = Candidate(native_id=native, source_file=path.name, source_row=i, raw=row)

        def build(
            row: dict[str, str] = row, image_path: str = image_path, cand: Candidate = cand
        ) -> dict[str, Any]:
            match = _PATIENT.search(image_path + "/")
            patient = text_or_none(row.get(names["patient"] or "")) or (
                match.group(1) if match else None
            )
            study = f"{match.group(1)}/{match.group(2)}" if match else None
            view_raw, view, view_source = view_of(
                row.get(names["frontal_lateral"] or ""), row.get(names["ap_pa"] or ""), options
            )
            split = official
            if names["split"] and text_or_none(row[names["split"]]):
                try:
                    split = official_split(row[names["split"]])
                except ValueError as exc:
                    raise RowError(str(exc)) from exc
            if split is not None:
                cand.allowed = frozenset({split})
            elif options["train_rows"] == "train":
                cand.allowed = frozenset({"train"})
            elif ctx.stats.get("valid_loaded"):
                cand.allowed = frozenset(schema.SPLITS) - {options["valid_as"]}
            return {
                "patient_id": patient,
                "study_id": study,
                "image_path": image_path,
                "view_raw": view_raw,
                "view": view,
                "view_source": view_source,
                "sex": norm_sex(row.get(names["sex"] or "")),
                "age": check_age(row.get(names["age"] or "")),
                "race": text_or_none(row.get(names["race"] or "")),
                **lab.chexpert_columns(row),
                "labels_extra": "{}",
                "report": text_or_none(row.get(names["report"] or "")),
            }

        out.append(wrap_row_errors(cand, build))
    return out


RELEASE_FOLDERS = ("", "CheXpert-v1.0-small/", "CheXpert-v1.0/")


def _find(raw_root: Path, value: Any, name: str, what: str) -> Path | None:
    if not value:
        return None
    if value != "auto":
        return resolve_file(raw_root, value, what)
    for folder in RELEASE_FOLDERS:
        if (raw_root / folder / name).is_file():
            return raw_root / folder / name
    if name == "valid.csv":
        return None  # a train-only copy is usable; valid rows then hash like the rest
    raise FileNotFoundError(f"{what}: no {name} in {raw_root} or its {RELEASE_FOLDERS[1:]} folders")


def read(raw_root: Path, options: dict[str, Any], ctx: Context) -> list[Candidate]:
    """Read CheXpert (or CheXpert-Plus) CSVs into candidates (see the module docstring)."""
    if options["valid_as"] not in ("val", "test"):
        raise ValueError(f"chexpert valid_as must be 'val' or 'test', got {options['valid_as']!r}")
    if options["train_rows"] not in ("hash", "train"):
        raise ValueError(
            f"chexpert train_rows must be 'hash' or 'train', got {options['train_rows']!r}"
        )
    if not options["train_csv"] and not options["valid_csv"]:
        raise ValueError("chexpert: neither train_csv nor valid_csv is set")
    out: list[Candidate] = []
    valid = _find(raw_root, options["valid_csv"], "valid.csv", "chexpert valid_csv")
    if valid is not None:
        ctx.stats["valid_loaded"] = True
        out += _read_one(raw_root, valid, options["valid_as"], options, ctx)
    train = _find(raw_root, options["train_csv"], "train.csv", "chexpert train_csv")
    if train is not None:
        out += _read_one(raw_root, train, None, options, ctx)
    return out
