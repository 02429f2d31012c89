"""DICOM header (tag-level) reading for ingest and the view filter.

Only headers are read here (``stop_before_pixels=True``): identifiers, demographics and the
view. Pixel decoding lives in :mod:`cxrfoundry.data.imaging`.

View fallbacks of :func:`view_from_tags`, in order:

1. ``ViewPosition`` (0018,5101) — "PA", "AP", "LL", "LATERAL", ... (:func:`views.normalize_view`);
2. ``ViewCodeSequence`` (0054,0220) ``CodeMeaning`` — "postero-anterior", "left lateral", ...;
3. free text: ``SeriesDescription``, ``ProtocolName``, ``StudyDescription``,
   ``PerformedProcedureStepDescription`` — "PA", "PORTABLE AP", "LAT" — used only when the text
   names exactly one view (:func:`views.view_from_text`), so "CHEST (PA AND LAT)" stays unknown.
"""

from __future__ import annotations

import logging
import re
from datetime import date
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from cxrfoundry.data.views import normalize_view, view_from_code_meaning, view_from_text

logger = logging.getLogger(__name__)

#: The free-text tags tried (in order) after ViewPosition and ViewCodeSequence.
TEXT_VIEW_TAGS: tuple[str, ...] = (
    "SeriesDescription",
    "ProtocolName",
    "StudyDescription",
    "PerformedProcedureStepDescription",
)


class DicomHeaderError(ValueError):
    """A DICOM file whose header cannot be read; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def read_header(path: Path | str) -> Dataset:
    """Read a DICOM file's tags without its pixel data.

    Raises:
        DicomHeaderError: the file is missing, not DICOM (no preamble/``DICM`` and no valid
            implicit dataset) or truncated inside the header.
    """
    path = Path(path)
    if not path.is_file():
        raise DicomHeaderError(path, "file not found")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        # Touch the elements: pydicom parses lazily, and a truncated header only fails here.
        for elem in ds.iterall():
            _ = elem.value
    except Exception as exc:
        # Garbage bytes reach pydicom's parser in arbitrary states (InvalidDicomError, EOFError,
        # BytesLengthException, struct errors, ...): any of them means a corrupt header.
        raise DicomHeaderError(path, f"{type(exc).__name__}: {exc}") from exc
    if len(ds) == 0:
        raise DicomHeaderError(path, "no DICOM elements in file")
    return ds


#: Sequence Delimitation Item: the last 8 bytes of encapsulated (compressed) pixel data.
_SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_TAIL_BYTES = 4096


def pixel_data_problem(ds: Dataset, path: Path | str) -> str | None:
    """Cheap truncation check of a file's pixel data, from its header and size (no decoding).

    Native (uncompressed) pixel data must fit in the file: rows × columns × samples × bytes
    per sample × frames ≤ file size. Encapsulated (compressed) pixel data must end with the
    Sequence Delimitation Item, looked for in the file's last 4 KiB. Returns a problem text or
    None; files without pixel-describing tags, and deflated transfer syntaxes, are not judged.
    """
    path = Path(path)
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    size = path.stat().st_size
    if syntax is not None and syntax.is_deflated:
        return None
    if syntax is not None and syntax.is_encapsulated:
        with open(path, "rb") as handle:
            handle.seek(max(0, size - _TAIL_BYTES))
            tail = handle.read()
        if _SEQ_DELIMITER not in tail:
            return "pixel data truncated: no end of encapsulated pixel data"
        return None
    expected = (rows * cols * samples * frames * bits + 7) // 8
    if size < expected:
        return f"pixel data truncated: file has {size} bytes, pixel data needs {expected}"
    return None


def tag_text(ds: Dataset, keyword: str) -> str:
    """A tag's value as stripped text ('' when absent or empty; multi-values joined by '\\')."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


_AS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMWD])?\s*$", re.IGNORECASE)
_UNIT_YEARS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}


def parse_age(value: Any) -> float | None:
    """Parse an age: numbers in years, or DICOM AS strings ("045Y", "018M", "003W", "010D").

    Returns None for empty/missing values. Raises ``ValueError`` for anything else ("abc",
    "45 years old"); range checks are the caller's.
    """
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value != value:  # NaN
            return None
        return float(value)
    text = str(value).strip()
    if text.lower() in ("", "nan", "none", "null"):
        return None
    match = _AS.match(text)
    if not match:
        raise ValueError(f"not an age: {text!r}")
    number = float(match.group(1))
    unit = (match.group(2) or "Y").upper()
    return round(number * _UNIT_YEARS[unit], 4)


def _parse_da(text: str) -> date | None:
    text = text.strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def age_from_dates(birth: str, study: str) -> float | None:
    """Age in years at ``study`` from DICOM DA dates (YYYYMMDD); None if either is unusable."""
    b, s = _parse_da(birth), _parse_da(study)
    if b is None or s is None:
        return None
    return round((s - b).days / 365.25, 4)


def view_from_tags(ds: Dataset) -> tuple[str | None, str, str]:
    """Read the view from a DICOM header.

    Returns:
        ``(view_raw, view, how)``: the raw text used (None if no tag had any), the normalised
        view (``UNKNOWN`` if nothing decided it) and which tag decided (``ViewPosition``,
        ``ViewCodeSequence``, one of :data:`TEXT_VIEW_TAGS`, or ``none``).
    """
    first_raw: str | None = None
    position = tag_text(ds, "ViewPosition")
    if position:
        first_raw = position
        view = normalize_view(position)
        if view != "UNKNOWN":
            return position, view, "ViewPosition"
    seq = ds.get("ViewCodeSequence")
    if seq:
        for item in seq:
            meaning = tag_text(item, "CodeMeaning")
            if meaning:
                first_raw = first_raw or meaning
                view = view_from_code_meaning(meaning)
                if view != "UNKNOWN":
                    return meaning, view, "ViewCodeSequence"
    for keyword in TEXT_VIEW_TAGS:
        text = tag_text(ds, keyword)
        if text:
            first_raw = first_raw or text
            view = view_from_text(text)
            if view != "UNKNOWN":
                return text, view, keyword
    return first_raw, "UNKNOWN", "none"


def header_fields(ds: Dataset) -> dict[str, Any]:
    """The ingest-relevant fields of a header.

    Returns a dict with ``patient_id``, ``study_id`` (StudyInstanceUID), ``sop_uid``, ``sex``
    (raw PatientSex text), ``race`` (EthnicGroup text or ''), ``age_raw`` (PatientAge text or
    ''), ``age_from_dates`` (from PatientBirthDate and StudyDate/AcquisitionDate/ContentDate,
    or None), ``view_raw``, ``view``, ``view_how``.
    """
    view_raw, view, how = view_from_tags(ds)
    study_date = (
        tag_text(ds, "StudyDate") or tag_text(ds, "AcquisitionDate") or tag_text(ds, "ContentDate")
    )
    return {
        "patient_id": tag_text(ds, "PatientID"),
        "study_id": tag_text(ds, "StudyInstanceUID"),
        "sop_uid": tag_text(ds, "SOPInstanceUID"),
        "sex": tag_text(ds, "PatientSex"),
        "race": tag_text(ds, "EthnicGroup"),
        "age_raw": tag_text(ds, "PatientAge"),
        "age_from_dates": age_from_dates(tag_text(ds, "PatientBirthDate"), study_date),
        "view_raw": view_raw,
        "view": view,
        "view_how": how,
    }
