"""Generic CSV adapter (``generic_csv``): the user maps a CSV's columns in the options.

Options (``csv``, ``image_col`` and ``patient_col`` are required; the rest default to None):

``csv``, ``sep`` (``,``)
    the table (relative to raw_root or absolute; ``.gz`` accepted).
``image_col``, ``image_prefix`` (``""``), ``image_ext`` (``""``)
    image path = ``image_prefix + value + image_ext``, relative to raw_root (a leading ``./``
    or ``/`` is dropped).
``id_col``
    native id (default: the image path without its extension).
``patient_col``, ``study_col`` (default: patient), ``view_col``, ``sex_col``, ``age_col``,
``race_col``, ``report_col``, ``split_col``
    the corresponding manifest fields; ``split_col`` values train/val/valid/validate/test are an
    official split, blanks are hashed.
``sex_map`` ({raw: "M"|"F"})
    tried before the built-in M/MALE/F/FEMALE table.
``view_map`` ({raw: view})
    tried before :func:`cxrfoundry.data.views.normalize_view`.
``labels`` ({CheXpert name: column})
    CheXpert-style cells (1/0/-1/blank).
``findings_col``, ``findings_sep`` (``|``), ``findings_map`` ({term: CheXpert name, list of names
or null}), ``unmentioned`` (``null`` | ``negative``; default ``null``)
    a term-list column; terms map through ``findings_map`` (null or unlisted → labels_extra
    only); every term is kept in labels_extra as ``{term: 1}``. Used when ``labels`` is unset.
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
    extra_json,
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
    "csv": None,
    "sep": ",",
    "image_col": None,
    "image_prefix": "",
    "image_ext": "",
    "id_col": None,
    "patient_col": None,
    "study_col": None,
    "view_col": None,
    "sex_col": None,
    "age_col": None,
    "race_col": None,
    "report_col": None,
    "split_col": None,
    "sex_map": None,
    "view_map": None,
    "labels": None,
    "findings_col": None,
    "findings_sep": "|",
    "findings_map": None,
    "unmentioned": "null",
}

_COLUMN_OPTIONS = (
    "image_col",
    "id_col",
    "patient_col",
    "study_col",
    "view_col",
    "sex_col",
    "age_col",
    "race_col",
    "report_col",
    "split_col",
    "findings_col",
)


def _check(options: dict[str, Any], columns: list[str], path: Path) -> None:
    for key in ("csv", "image_col", "patient_col"):
        if not options[key]:
            raise ValueError(f"generic_csv: option {key!r} is required")
    for key in _COLUMN_OPTIONS:
        if options[key] and options[key] not in columns:
            raise ValueError(f"{path}: {key} column {options[key]!r} missing; found {columns}")
    for name, col in dict(options["labels"] or {}).items():
        if name not in schema.FINDING_NAMES:
            raise ValueError(f"generic_csv labels: {name!r} is not a CheXpert finding")
        if col not in columns:
            raise ValueError(f"{path}: label column {col!r} (for {name!r}) missing")
    for value in dict(options["view_map"] or {}).values():
        if value not in schema.VIEWS:
            raise ValueError(f"generic_csv view_map: {value!r} is not one of {schema.VIEWS}")
    for term, target in dict(options["findings_map"] or {}).items():
        names = [] if target is None else [target] if isinstance(target, str) else list(target)
        bad = [n for n in names if n not in schema.FINDING_NAMES]
        if bad:
            raise ValueError(f"generic_csv findings_map[{term!r}]: {bad} not CheXpert findings")


def _image_path(value: str, options: dict[str, Any]) -> str:
    text = value.strip()
    while text.startswith(("./", "/")):
        text = text[2:] if text.startswith("./") else text[1:]
    return f"{options['image_prefix']}{text}{options['image_ext']}" if text else ""


def read(raw_root: Path, options: dict[str, Any], ctx: Context) -> list[Candidate]:
    """Read a user-mapped CSV into candidates (see the module docstring)."""
    if not options["csv"]:
        raise ValueError("generic_csv: option 'csv' is required")
    path = resolve_file(raw_root, options["csv"], "generic_csv csv")
    frame = read_csv(path, sep=options["sep"])
    _check(options, list(frame.columns), path)
    view_map = dict(options["view_map"] or {})
    findings_map = {
        k: (tuple(v) if isinstance(v, list) else v)
        for k, v in dict(options["findings_map"] or {}).items()
    }
    decub = bool(options["include_decubitus"])
    out = []
    for i, row in enumerate(tqdm(records(frame), desc=path.name, disable=None)):
        image_path = _image_path(row[options["image_col"]], options)
        native = (
            text_or_none(row[options["id_col"]])
            if options["id_col"]
            else (image_path.rsplit(".", 1)[0] if image_path else None)
        )
        cand = Candidate(native_id=native, source_file=path.name, source_row=i, raw=row)

        def get(key: str, row: dict[str, str] = row) -> str | None:
            return text_or_none(row[options[key]]) if options[key] else None

        def build(
            row: dict[str, str] = row, image_path: str = image_path, cand: Candidate = cand
        ) -> dict[str, Any]:
            view_raw = get("view_col", row)
            if view_raw is not None and view_raw in view_map:
                view = view_map[view_raw]
            else:
                view = normalize_view(view_raw, decubitus_as_frontal=decub)
            extra: dict[str, Any] = {}
            if options["labels"]:
                findings = lab.chexpert_columns(row, dict(options["labels"]))
            elif options["findings_col"]:
                terms = [
                    t.strip()
                    for t in (row[options["findings_col"]] or "").split(options["findings_sep"])
                    if t.strip()
                ]
                findings = lab.labels_from_terms(
                    terms, findings_map, unmentioned=options["unmentioned"]
                )
                extra = dict.fromkeys(terms, 1)
            else:
                findings = dict.fromkeys(schema.FINDING_COLUMNS)
            split = get("split_col", row)
            if split is not None:
                try:
                    cand.allowed = frozenset({official_split(split)})
                except ValueError as exc:
                    raise RowError(str(exc)) from exc
            return {
                "patient_id": get("patient_col", row),
                "study_id": get("study_col", row),
                "image_path": image_path,
                "view_raw": view_raw,
                "view": view,
                "view_source": "metadata" if view != "UNKNOWN" else "none",
                "sex": norm_sex(get("sex_col", row), options["sex_map"]),
                "age": check_age(get("age_col", row)),
                "race": get("race_col", row),
                **findings,
                "labels_extra": extra_json(extra),
                "report": get("report_col", row),
            }

        out.append(wrap_row_errors(cand, build))
    return out
