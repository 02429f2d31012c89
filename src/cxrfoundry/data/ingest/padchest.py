"""PadChest adapter (``padchest``).

``csv`` (default ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``; ``.gz`` accepted):
columns used ``ImageID``, ``ImageDir``, ``PatientID``, ``StudyID``, ``PatientSex_DICOM``,
``PatientBirth`` (year), ``StudyDate_DICOM`` (YYYYMMDD), ``Projection``, ``MethodProjection``
(optional), ``Labels``, ``Report``.

* image path = ``image_path_template`` (default ``{ImageDir}/{ImageID}``, the BIMCV folders
  ``0``…``54``) — any column may be named in the template.
* view: ``Projection`` (PA, AP, AP_horizontal → ``AP_SUPINE``, L → ``LATERAL``, COSTAL and
  EXCLUDE → ``OTHER``, UNK → ``UNKNOWN``). ``MethodProjection`` says who set ``Projection``:
  ``Manual review of DICOM fields`` (view_source ``metadata``, as is a blank or missing value)
  or anything else — the authors' CNN, ``resnet-50.t7``, ~13 % of rows. Such model-predicted
  views are counted (adapter stat ``n_view_predicted_by_dataset``) and handled by
  ``predicted_projection``: ``accept`` (default) keeps the view with view_source
  ``classifier``; ``reclassify`` sets it ``UNKNOWN`` (view_source ``none``, ``view_raw`` kept)
  so that the frontal filter decides it (DICOM tags, then its own image classifier).
* age = year of StudyDate − PatientBirth (PadChest publishes only the birth year, so ages are
  whole years, ±1); a blank, ``None`` or ``nan`` birth year or study date → null age.
* labels: ``Labels`` is a Python-list string (``"['normal']"``) read with ``ast.literal_eval``;
  a value that is not a list of strings rejects the row (``unparseable label value``); a blank
  cell (or the CSV's missing-value text ``None`` / ``nan``) gives null labels. Terms map by
  :data:`labels.PADCHEST_TO_CHEXPERT`; PadChest labels cover the whole report, so unmentioned
  findings are 0 (``unmentioned``: ``negative``, or ``null``). Every positive term is kept in
  ``labels_extra`` as ``{term: 1}``.
* report: the (Spanish, preprocessed) ``Report`` text, verbatim.
"""

from __future__ import annotations

import ast
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
    is_blank,
    metadata_view,
    norm_sex,
    read_csv,
    records,
    resolve_file,
    text_or_none,
    wrap_row_errors,
)

logger = logging.getLogger(__name__)

OPTIONS: dict[str, Any] = {
    "csv": "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
    "image_path_template": "{ImageDir}/{ImageID}",
    "unmentioned": "negative",
    "predicted_projection": "accept",
}

PREDICTED_PROJECTION: tuple[str, ...] = ("accept", "reclassify")

REQUIRED = ("ImageID", "PatientID", "Projection", "Labels")


#: How the PadChest CSV writes a missing value besides an empty cell ("None", "nan": see its
#: ViewPosition_DICOM and PixelAspectRatio_DICOM columns).
MISSING_TOKENS = frozenset({"none", "nan", "null"})


def _missing(value: str | None) -> bool:
    return is_blank(value) or str(value).strip().lower() in MISSING_TOKENS


def parse_terms(value: str) -> list[str] | None:
    """``"['a', 'b']"`` → ['a', 'b']; blank/missing → None; raises RowError when unparseable."""
    if _missing(value):
        return None
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError) as exc:
        raise RowError(f"unparseable label value {value!r} in column 'Labels'") from exc
    if not isinstance(parsed, list | tuple) or not all(isinstance(t, str) for t in parsed):
        raise RowError(f"unparseable label value {value!r} in column 'Labels'")
    return [t.strip() for t in parsed if t.strip()]


def projection_predicted(method: str | None) -> bool:
    """Whether a ``MethodProjection`` value names a model rather than the manual DICOM review.

    Blank or missing values count as manual: nothing says a model was involved.
    """
    if _missing(method):
        return False
    return not str(method).strip().lower().startswith("manual")


def _age(row: dict[str, str]) -> float | None:
    birth = (row.get("PatientBirth") or "").strip()
    study = (row.get("StudyDate_DICOM") or "").strip()
    if _missing(birth) or _missing(study):
        return None
    try:
        birth_year = float(birth)
        study_year = int(study[:4])
    except ValueError as exc:
        raise RowError(f"impossible age: birth {birth!r}, study date {study!r}") from exc
    return check_age(study_year - birth_year)


def read(raw_root: Path, options: dict[str, Any], ctx: Context) -> list[Candidate]:
    """Read the PadChest labels CSV into candidates (see the module docstring)."""
    predicted_policy = options["predicted_projection"]
    if predicted_policy not in PREDICTED_PROJECTION:
        raise ValueError(
            f"padchest predicted_projection must be one of {PREDICTED_PROJECTION}, "
            f"got {predicted_policy!r}"
        )
    path = resolve_file(raw_root, options["csv"], "padchest csv")
    frame = read_csv(path, required=REQUIRED)
    template = options["image_path_template"]
    out = []
    for i, row in enumerate(tqdm(records(frame), desc="padchest rows", disable=None)):
        image = row["ImageID"].strip()
        cand = Candidate(
            native_id=image.rsplit(".", 1)[0] or None, source_file=path.name, source_row=i, raw=row
        )

        def build(row: dict[str, str] = row) -> dict[str, Any]:
            try:
                image_path = template.format(**{k: v.strip() for k, v in row.items()})
            except KeyError as exc:
                raise ValueError(f"padchest image_path_template: no column {exc}") from exc
            terms = parse_terms(row["Labels"])
            if terms is None:
                findings = dict.fromkeys(schema.FINDING_COLUMNS)
                extra: dict[str, int] = {}
            else:
                findings = lab.labels_from_terms(
                    terms, lab.PADCHEST_TO_CHEXPERT, unmentioned=options["unmentioned"]
                )
                extra = dict.fromkeys(terms, 1)
            view_raw, view, view_source = metadata_view(row["Projection"], options, "padchest")
            predicted = view != "UNKNOWN" and projection_predicted(row.get("MethodProjection"))
            if predicted:
                if predicted_policy == "accept":
                    view_source = "classifier"
                else:
                    view, view_source = "UNKNOWN", "none"
            fields = {
                "patient_id": text_or_none(row["PatientID"]),
                "study_id": text_or_none(row.get("StudyID")),
                "image_path": image_path,
                "view_raw": view_raw,
                "view": view,
                "view_source": view_source,
                "sex": norm_sex(row.get("PatientSex_DICOM")),
                "age": _age(row),
                **findings,
                "labels_extra": extra_json(extra),
                "report": text_or_none(row.get("Report")),
            }
            # counted only once the row parsed, so adapter-rejected rows are not in the count
            if predicted:
                ctx.bump("n_view_predicted_by_dataset")
            return fields

        out.append(wrap_row_errors(cand, build))
    return out
