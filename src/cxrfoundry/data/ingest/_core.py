"""Shared machinery of the ingest adapters: candidate rows, parsing helpers and image checks.

An adapter turns a dataset's native files into :class:`Candidate` rows (one per image); the
driver in :mod:`cxrfoundry.data.ingest` applies the checks every dataset shares (patient id,
duplicates, annotations, image files) and the split, so that the adapters stay small and the
reject reasons are the same everywhere.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cxrfoundry.data import dicom as dicom_tags
from cxrfoundry.data.labels import LabelError
from cxrfoundry.io import walk_files

logger = logging.getLogger(__name__)

MAX_AGE = 120.0

#: Sex spellings → M/F (anything else → null; not a reject).
SEX_TABLE: dict[str, str] = {
    "M": "M",
    "MALE": "M",
    "MAN": "M",
    "H": "M",  # Spanish "hombre" (PadChest free text sometimes)
    "F": "F",
    "FEMALE": "F",
    "WOMAN": "F",
}


class RowError(ValueError):
    """A row that cannot be used; the message is the reject reason."""


@dataclass
class Candidate:
    """One input image before the shared checks.

    ``fields`` holds manifest columns (without ``image_id``/``dataset``/``split``); ``allowed``
    the official split constraint (None = any split); ``error`` an adapter-level reject reason.
    """

    native_id: str | None
    source_file: str
    source_row: int | None
    raw: Mapping[str, Any]
    fields: dict[str, Any] = field(default_factory=dict)
    allowed: frozenset[str] | None = None
    error: str | None = None


@dataclass
class Context:
    """What an adapter may use besides its options: the dataset name and a stats sink."""

    dataset: str
    stats: dict[str, Any] = field(default_factory=dict)

    def bump(self, key: str, n: int = 1) -> None:
        """Add ``n`` to the adapter statistic ``key`` (reported in the ingest counts)."""
        self.stats[key] = self.stats.get(key, 0) + n


def is_blank(value: Any) -> bool:
    """True for None, NaN and whitespace-only text."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).strip() == ""


def text_or_none(value: Any) -> str | None:
    """Stripped text, or None when blank."""
    return None if is_blank(value) else str(value).strip()


def resolve_file(raw_root: Path, name: str | Path, what: str) -> Path:
    """Resolve a configured file: absolute, or relative to ``raw_root``; ``.gz`` optional.

    Raises:
        FileNotFoundError: naming the option (``what``) and every path tried.
    """
    base = Path(name)
    base = base if base.is_absolute() else raw_root / base
    tried = [base]
    if base.suffix == ".gz":
        tried.append(base.with_suffix(""))
    else:
        tried.append(base.with_name(base.name + ".gz"))
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{what}: none of {[str(p) for p in tried]} exists")


def optional_file(raw_root: Path, name: str | Path | None, what: str) -> Path | None:
    """Like :func:`resolve_file`, but None when ``name`` is None or the file is absent."""
    if name is None:
        return None
    try:
        return resolve_file(raw_root, name, what)
    except FileNotFoundError:
        return None


def read_csv(path: Path, *, sep: str = ",", required: Iterable[str] = ()) -> pd.DataFrame:
    """Read a CSV (optionally gzipped) with every cell as text ('' for blanks).

    Raises:
        ValueError: naming the file when it cannot be parsed or lacks ``required`` columns.
    """
    try:
        frame = pd.read_csv(
            path, sep=sep, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8"
        )
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{path}: cannot parse as CSV ({exc})") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; found {list(frame.columns)}")
    return frame


def records(frame: pd.DataFrame) -> list[dict[str, str]]:
    """Rows of ``frame`` as dicts (column → text)."""
    return frame.to_dict(orient="records")


#: Age groups of de-identified releases (BRAX: 5-year groups, the oldest "85 or more"):
#: open-ended "85 or more" / "85 or older" / "85+" / ">=85", and ranges "40 - 44" / "40 to 44".
_AGE_OPEN = re.compile(r"^(?:>=?\s*(\d+)|(\d+)\s*(?:\+|or more|or older|and over))$", re.I)
_AGE_RANGE = re.compile(r"^(\d+)\s*(?:-|\u2013|to)\s*(\d+)$", re.I)


def _age_group(value: Any) -> float | None:
    """The lower bound of an age-group text ("85 or more" → 85, "40 - 44" → 40), else None."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    match = _AGE_RANGE.match(text)
    if match:
        low, high = int(match.group(1)), int(match.group(2))
        return float(low) if low <= high else None
    match = _AGE_OPEN.match(text)
    if match:
        return float(match.group(1) or match.group(2))
    return None


def check_age(value: Any) -> float | None:
    """Parse an age (years, DICOM AS, or an age group); None when blank.

    Age groups (BRAX publishes 5-year groups and "85 or more") give the group's lower bound.

    Raises:
        RowError: ``impossible age: <value>`` when not a number or outside [0, 120].
    """
    group = _age_group(value)
    try:
        age = group if group is not None else dicom_tags.parse_age(value)
    except ValueError as exc:
        raise RowError(f"impossible age: {value}") from exc
    if age is None:
        return None
    if not math.isfinite(age) or age < 0 or age > MAX_AGE:
        raise RowError(f"impossible age: {value}")
    return age


def norm_sex(value: Any, sex_map: Mapping[str, str] | None = None) -> str | None:
    """Normalise a sex value to M/F/None, trying ``sex_map`` (exact raw value) first."""
    if is_blank(value):
        return None
    raw = str(value).strip()
    if sex_map and raw in sex_map:
        mapped = sex_map[raw]
        return mapped if mapped in ("M", "F") else None
    return SEX_TABLE.get(raw.upper())


def rel_path(path: Path, raw_root: Path) -> str:
    """``path`` relative to ``raw_root`` in POSIX form (the manifest's image_path)."""
    return path.relative_to(raw_root).as_posix()


def normalise_boxes(value: Any) -> str | None:
    """Validate boxes (JSON text or a list of {label,x,y,w,h}) → canonical JSON text or None.

    Raises:
        RowError: ``unparseable boxes: ...`` for anything else.
    """
    if value is None or (isinstance(value, str) and value.strip() in ("", "[]", "null")):
        return None
    try:
        boxes = json.loads(value) if isinstance(value, str) else value
        if not isinstance(boxes, list):
            raise TypeError("not a list")
        out = []
        for box in boxes:
            entry = {"label": str(box["label"])}
            for key in ("x", "y", "w", "h"):
                number = float(box[key])
                if not math.isfinite(number):
                    raise ValueError(f"{key} is not finite")
                entry[key] = number
            out.append(entry)
    except (ValueError, TypeError, KeyError) as exc:
        raise RowError(f"unparseable boxes: {exc}") from exc
    if not out:
        return None
    return json.dumps(out, sort_keys=True)


def extra_json(extra: Mapping[str, Any]) -> str:
    """``labels_extra`` text: JSON with sorted keys ('{}' when empty)."""
    return json.dumps(dict(extra), sort_keys=True)


def wrap_row_errors(cand: Candidate, build: Any) -> Candidate:
    """Run ``build()`` → fields; a RowError/LabelError becomes the candidate's reject reason."""
    try:
        cand.fields = build()
    except (RowError, LabelError) as exc:
        cand.error = str(exc)
    return cand


# --------------------------------------------------------------------------------------------
# Image checks
# --------------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
VERIFY_MODES: tuple[str, ...] = ("none", "exists", "header", "decode")


def _sniff(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(132)
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom", ".dic"):
        return "dicom"
    return "other"


def check_image(path: Path, mode: str) -> str | None:
    """Cheap checks of one image file; returns a reject reason or None.

    Modes: ``none`` (no check at all), ``exists`` (present and non-empty), ``header``
    (+ magic bytes; PNG chunk/CRC walk with PIL ``verify``; JPEG end-of-image marker 0xFFD9;
    DICOM header parse and pixel-data length, :func:`dicom.pixel_data_problem`), ``decode``
    (the header checks here; the full decode runs in :func:`decode_reason`).
    """
    if mode == "none":
        return None
    if not path.is_file():
        return "image missing"
    if path.stat().st_size == 0:
        return "image empty"
    if mode == "exists":
        return None
    kind = _sniff(path)
    if kind == "jpeg":
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 64))
            tail = handle.read().rstrip(b"\x00")
        return None if tail.endswith(JPEG_EOI) else "image truncated: no JPEG end-of-image marker"
    if kind == "dicom":
        try:
            header = dicom_tags.read_header(path)
        except dicom_tags.DicomHeaderError as exc:
            return f"corrupt DICOM: {exc.problem}"
        problem = dicom_tags.pixel_data_problem(header, path)
        return f"corrupt DICOM: {problem}" if problem else None
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:
        return f"image unreadable: {type(exc).__name__}: {exc}"
    return None


def decode_reason(path_str: str) -> str | None:
    """Fully decode an image (pool worker); returns a reject reason or None."""
    from cxrfoundry.data.imaging import load_image

    path = Path(path_str)
    try:
        load_image(path)
    except Exception as exc:
        kind = _sniff(path) if path.is_file() else "other"
        prefix = "corrupt DICOM" if kind == "dicom" else "image unreadable"
        return f"{prefix}: {exc}"
    return None


def metadata_view(
    raw: Any, options: Mapping[str, Any], vocab: str | None = None
) -> tuple[str | None, str, str]:
    """Normalise a metadata view value → ``(view_raw, view, view_source)``."""
    from cxrfoundry.data.views import normalize_view

    view_raw = text_or_none(raw)
    view = normalize_view(
        view_raw, vocab, decubitus_as_frontal=bool(options.get("include_decubitus"))
    )
    return view_raw, view, "metadata" if view != "UNKNOWN" else "none"


def index_files(root: Path, suffixes: Iterable[str]) -> dict[str, str]:
    """Walk ``root`` once (:func:`cxrfoundry.io.walk_files`, symlinked folders followed): file
    name → path relative to root.

    Names found twice keep the first in walk order (logged), so reruns agree.
    """
    found: dict[str, str] = {}
    dupes = 0
    for path in walk_files(root, suffixes):
        name = path.name
        if name in found:
            dupes += 1
            continue
        found[name] = path.relative_to(root).as_posix()
    if dupes:
        logger.warning("%s: %d file names occur in more than one folder; first kept", root, dupes)
    return found
