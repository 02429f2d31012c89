"""View-position normalisation and the frontal-view filter.

Two parts:

* :func:`normalize_view` maps the raw view vocabularies of the public CXR datasets onto the
  six normalised views of :data:`cxrfoundry.schema.VIEWS` (``PA``, ``AP``, ``AP_SUPINE``,
  ``LATERAL``, ``OTHER``, ``UNKNOWN``). :func:`view_from_text` reads free-text descriptions
  ("CHEST (PORTABLE AP)") and refuses to guess when a text names more than one view.
* :func:`filter_frontal` keeps the frontal images of a manifest. Its decision order is:
  the manifest's view (its ``view_source`` — metadata, DICOM tags read at ingest, or a
  classifier the dataset's authors ran, as PadChest's ``resnet-50.t7`` projections — is kept
  in the audit) → DICOM tags for DICOM files still ``UNKNOWN`` → an image-based
  frontal/lateral classifier (scikit-learn, trained on this dataset's rows whose view metadata
  or DICOM tags decided — never on another classifier's calls — used only when its held-out
  accuracy and each prediction's confidence pass configured thresholds) → the
  ``unknown_policy`` for what remains. Every row ends in exactly one output, with a reason,
  and the audit counts add up.

  A *frontal of unknown side* — metadata that says ``Frontal`` without AP/PA (CheXpert's
  ``Frontal/Lateral`` with an empty ``AP/PA`` cell, Open-I's projection), or the classifier's
  "frontal", which cannot tell PA from AP — keeps view ``UNKNOWN`` and is decided frontal (by
  ``metadata`` or ``classifier``) only when ``frontal_views`` holds every frontal view (PA, AP,
  AP_SUPINE, the default). With a narrower ``frontal_views`` (e.g. PA only) such rows are not
  let in as frontal: they go on to the next fallback and finally to ``unknown_policy``.

Normalisation tables (keys are compared after upper-casing and collapsing ``_``/``-``/spaces):

=====================  ==========================================================================
normalised view        raw values
=====================  ==========================================================================
``PA``                 PA, POSTEROANTERIOR, POSTERO-ANTERIOR, POSTERIOR ANTERIOR
``AP``                 AP, ANTEROPOSTERIOR, ANTERO-POSTERIOR, AP ERECT, AP UPRIGHT, PORTABLE AP
``AP_SUPINE``          AP SUPINE, SUPINE, AP_horizontal (PadChest: supine, horizontal beam)
``LATERAL``            LATERAL, LAT, L (PadChest/BRAX), LL (MIMIC/CheXpert left lateral),
                       RL (right lateral), LEFT LATERAL, RIGHT LATERAL, XTABLE LATERAL,
                       CROSS-TABLE LATERAL, LATERAL DECUBITUS (a true lateral projection)
``OTHER``              AP AXIAL, AP LORDOTIC, LORDOTIC, LAO, RAO, LPO, RPO, OBLIQUE, RLO, LLO,
                       SWIMMERS, COSTAL (PadChest rib series), EXCLUDE (PadChest)
decubitus (see below)  AP LLD, AP RLD, PA LLD, PA RLD, LT-DECUB, RT-DECUB, LLD, RLD, DECUBITUS
``UNKNOWN``            empty, None, NaN, UNK, UNKNOWN, FRONTAL (no AP/PA side), anything else
=====================  ==========================================================================

Decubitus films (patient on one side, horizontal beam) are frontal projections. They map to
``OTHER`` by default and to their projection (``AP`` for ``AP LLD``/``LT-DECUB``, ``PA`` for
``PA LLD``) when ``decubitus_as_frontal=True`` — the ``include_decubitus`` policy key. Unknown
strings are never rejects: they become ``UNKNOWN`` and are decided later by the filter.

``dataset_vocab`` selects per-dataset overrides where one code means different things in
different sources (so far only ``chexpert``, whose ``Frontal/Lateral`` column reads ``Frontal``
without an AP/PA side for a few rows).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from cxrfoundry import schema

logger = logging.getLogger(__name__)

FRONTAL = "frontal"
NON_FRONTAL = "lateral"

_PA = ("PA", "POSTEROANTERIOR", "POSTERO ANTERIOR", "POSTERIOR ANTERIOR", "PA ERECT", "PA CHEST")
_AP = (
    "AP",
    "ANTEROPOSTERIOR",
    "ANTERO POSTERIOR",
    "ANTERIOR POSTERIOR",
    "AP ERECT",
    "AP UPRIGHT",
    "PORTABLE AP",
    "AP PORTABLE",
    "AP CHEST",
)
_AP_SUPINE = ("AP SUPINE", "SUPINE", "AP HORIZONTAL", "SUPINE AP", "AP SUPINE PORTABLE")
_LATERAL = (
    "LATERAL",
    "LAT",
    "L",
    "LL",
    "RL",
    "LEFT LATERAL",
    "RIGHT LATERAL",
    "LATERAL LEFT",
    "LATERAL RIGHT",
    "LEFT LAT",
    "RIGHT LAT",
    "XTABLE LATERAL",
    "X TABLE LATERAL",
    "CROSS TABLE LATERAL",
    "CROSSTABLE LATERAL",
    "LATERAL DECUBITUS",
)
_OTHER = (
    "AP AXIAL",
    "PA AXIAL",
    "AP LORDOTIC",
    "PA LORDOTIC",
    "LORDOTIC",
    "LAO",
    "RAO",
    "LPO",
    "RPO",
    "OBLIQUE",
    "RLO",
    "LLO",
    "SWIMMERS",
    "SWIMMER",
    "COSTAL",
    "EXCLUDE",
)
#: Decubitus codes → the projection they are when decubitus counts as frontal.
DECUBITUS: dict[str, str] = {
    "AP LLD": "AP",
    "AP RLD": "AP",
    "PA LLD": "PA",
    "PA RLD": "PA",
    "LLD": "AP",
    "RLD": "AP",
    "LT DECUB": "AP",
    "RT DECUB": "AP",
    "LEFT DECUBITUS": "AP",
    "RIGHT DECUBITUS": "AP",
    "DECUBITUS": "AP",
    "AP DECUBITUS": "AP",
    "PA DECUBITUS": "PA",
}
_UNKNOWN = ("", "NONE", "NAN", "NULL", "UNK", "UNKNOWN", "FRONTAL", "N/A", "NA")
#: Raw values that say "frontal" without saying which side (CheXpert ``Frontal`` with an empty
#: AP/PA cell, Open-I's ``Frontal`` projection): normalised ``UNKNOWN`` (the side is unknown),
#: but the filter decides them frontal from metadata (see :func:`filter_frontal`).
_FRONTAL_UNSIDED = ("FRONTAL", "FRONT", "FRONTAL VIEW")

#: The generic table: canonical key → normalised view.
VIEW_TABLE: dict[str, str] = {
    **{k: "PA" for k in _PA},
    **{k: "AP" for k in _AP},
    **{k: "AP_SUPINE" for k in _AP_SUPINE},
    **{k: "LATERAL" for k in _LATERAL},
    **{k: "OTHER" for k in _OTHER},
    **{k: "UNKNOWN" for k in _UNKNOWN},
}

#: Per-dataset overrides of :data:`VIEW_TABLE` (canonical key → view).
DATASET_VIEW_TABLES: dict[str, dict[str, str]] = {
    # CheXpert: "Frontal" alone (no AP/PA side) is frontal of unknown side; kept UNKNOWN so the
    # filter's later steps decide, never silently assigned AP or PA.
    "chexpert": {"FRONTAL": "UNKNOWN"},
    # PadChest's "UNK" is their explicit "unknown projection".
    "padchest": {"UNK": "UNKNOWN"},
}

#: ViewCodeSequence CodeMeaning values (DICOM CID 4010) → view.
CODE_MEANINGS: dict[str, str] = {
    "POSTERO ANTERIOR": "PA",
    "POSTEROANTERIOR": "PA",
    "ANTERO POSTERIOR": "AP",
    "ANTEROPOSTERIOR": "AP",
    "LATERAL": "LATERAL",
    "LEFT LATERAL": "LATERAL",
    "RIGHT LATERAL": "LATERAL",
    "LATERO MEDIAL": "LATERAL",
    "MEDIO LATERAL": "LATERAL",
    "LEFT ANTERIOR OBLIQUE": "OTHER",
    "RIGHT ANTERIOR OBLIQUE": "OTHER",
    "LEFT POSTERIOR OBLIQUE": "OTHER",
    "RIGHT POSTERIOR OBLIQUE": "OTHER",
    "AXIAL": "OTHER",
    "LORDOTIC": "OTHER",
}


def canonical(raw: Any) -> str:
    """Upper-case ``raw`` and collapse ``_``, ``-``, ``/`` and runs of spaces to one space."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return ""
    text = str(raw).strip().upper()
    text = re.sub(r"[_\-/]+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def is_frontal_unsided(raw: Any) -> bool:
    """Whether ``raw`` says frontal without a side ("Frontal"; not "Frontal/LL", a conflict)."""
    return canonical(raw) in _FRONTAL_UNSIDED


def is_decubitus(raw: Any) -> bool:
    """Whether ``raw`` is a decubitus view code (``AP LLD``, ``LT-DECUB``, ...)."""
    return canonical(raw) in DECUBITUS


def normalize_view(
    raw: Any, dataset_vocab: str | None = None, *, decubitus_as_frontal: bool = False
) -> str:
    """Map a raw view value to one of :data:`cxrfoundry.schema.VIEWS`.

    Args:
        raw: the source value (any type; None/NaN/empty → ``UNKNOWN``).
        dataset_vocab: a key of :data:`DATASET_VIEW_TABLES` whose overrides apply first.
        decubitus_as_frontal: map decubitus codes to their projection instead of ``OTHER``.

    Returns:
        The normalised view; unrecognised values give ``UNKNOWN`` (never an error).
    """
    key = canonical(raw)
    if dataset_vocab is not None:
        override = DATASET_VIEW_TABLES.get(dataset_vocab.lower(), {})
        if key in override:
            return override[key]
    if key in DECUBITUS:
        return DECUBITUS[key] if decubitus_as_frontal else "OTHER"
    if key in VIEW_TABLE:
        return VIEW_TABLE[key]
    if key in CODE_MEANINGS:
        return CODE_MEANINGS[key]
    return "UNKNOWN"


def view_from_code_meaning(meaning: Any) -> str:
    """Map a ViewCodeSequence CodeMeaning ("postero-anterior", "left lateral") to a view."""
    key = canonical(meaning)
    if key in CODE_MEANINGS:
        return CODE_MEANINGS[key]
    return normalize_view(meaning)


# Word patterns found in procedure/series descriptions. Order matters only for readability:
# every pattern is tested and the text is decided only when exactly one view class matches.
_TEXT_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("AP_SUPINE", re.compile(r"\bSUPINE\b|\bAP HORIZONTAL\b")),
    ("OTHER", re.compile(r"\bDECUB\w*|\bLLD\b|\bRLD\b|\bOBLIQUE\b|\bLORDOTIC\b|\bSWIMMER")),
    ("PA", re.compile(r"\bPA\b|\bPOSTERO ?ANTERIOR\b")),
    ("AP", re.compile(r"\bAP\b|\bANTERO ?POSTERIOR\b")),
    ("LATERAL", re.compile(r"\bLAT\b|\bLATERAL\b|\bLATERALS\b")),
)


def view_from_text(text: Any) -> str:
    """Read a view from free text (procedure, series, protocol or study description).

    Returns a view only when the text names exactly one view class: "PORTABLE AP" → ``AP``,
    "view: PA" → ``PA``, "CHEST LAT" → ``LATERAL``; "CHEST (PA AND LAT)" describes a two-view
    study, not this image, so it gives ``UNKNOWN`` — as does text naming no view ("THORAX").
    A supine AP reads as ``AP_SUPINE`` (its AP match is the same projection, not a conflict).
    """
    key = canonical(text)
    if not key:
        return "UNKNOWN"
    key = re.sub(r"[(),.:;]", " ", key)
    hits = {view for view, pattern in _TEXT_PATTERNS if pattern.search(key)}
    if hits == {"AP_SUPINE", "AP"}:
        hits = {"AP_SUPINE"}
    if len(hits) == 1:
        return hits.pop()
    return "UNKNOWN"


# --------------------------------------------------------------------------------------------
# The frontal filter
# --------------------------------------------------------------------------------------------

STAGE = "filter_frontal"
UNKNOWN_POLICIES: tuple[str, ...] = ("exclude", "include", "keep_apart")
#: Manifest view sources the filter reports as they are (any other known view: ``metadata``).
MANIFEST_SOURCES: tuple[str, ...] = ("metadata", "dicom", "classifier")
#: Sources of known views the view classifier may learn from (not another classifier's calls).
TRAINING_SOURCES: tuple[str, ...] = ("metadata", "dicom")

#: Defaults of the ``policy`` mapping of :func:`filter_frontal`.
DEFAULT_POLICY: dict[str, Any] = {
    "frontal_views": ["PA", "AP", "AP_SUPINE"],
    "include_decubitus": False,
    "unknown_policy": "exclude",
    "use_dicom": True,
    "classifier": {
        "enabled": True,
        "min_accuracy": 0.95,
        "min_confidence": 0.9,
        "image_size": 32,
        "holdout_fraction": 0.25,
        "min_per_class": 10,
        "max_train_per_class": 2000,
        "pretrained": None,
        "seed": 0,
        "workers": 1,
    },
}


@dataclass
class FilterResult:
    """Output of :func:`filter_frontal`.

    ``frontal`` has the manifest schema; ``excluded`` the rejects schema (stage
    ``filter_frontal``); ``kept_apart`` (manifest schema) repeats the rows excluded under
    ``unknown_policy: keep_apart`` so they can be written for review; ``audit`` is JSON-ready.
    """

    frontal: pa.Table
    excluded: pa.Table
    audit: dict[str, Any]
    kept_apart: pa.Table = field(default_factory=lambda: schema.empty_table(schema.MANIFEST_SCHEMA))


def resolve_policy(policy: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge ``policy`` over :data:`DEFAULT_POLICY`, rejecting unknown keys and bad values."""
    policy = dict(policy or {})
    unknown = set(policy) - set(DEFAULT_POLICY)
    if unknown:
        raise ValueError(f"filter_frontal: unknown policy keys {sorted(unknown)}")
    out: dict[str, Any] = {**DEFAULT_POLICY, **policy}
    clf = dict(policy.get("classifier") or {})
    bad = set(clf) - set(DEFAULT_POLICY["classifier"])
    if bad:
        raise ValueError(f"filter_frontal: unknown classifier keys {sorted(bad)}")
    out["classifier"] = {**DEFAULT_POLICY["classifier"], **clf}
    views = [str(v) for v in out["frontal_views"]]
    bad_views = [v for v in views if v not in schema.VIEWS]
    if bad_views:
        raise ValueError(f"filter_frontal: frontal_views {bad_views} not in {schema.VIEWS}")
    out["frontal_views"] = sorted(set(views))
    if out["unknown_policy"] not in UNKNOWN_POLICIES:
        raise ValueError(
            f"filter_frontal: unknown_policy {out['unknown_policy']!r} not in {UNKNOWN_POLICIES}"
        )
    return out


def _is_dicom_path(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".dic"):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _load_gray(path: Path) -> np.ndarray:
    """Decode an image to a 2-D array (imaging.load_image: PIL / pydicom, MONOCHROME1 inverted)."""
    from cxrfoundry.data.imaging import load_image

    return load_image(path)


def image_features(path: Path | str, size: int = 32) -> np.ndarray:
    """Classifier features of one image: ``size``² pixels (stretched, z-scored) + log aspect."""
    from cxrfoundry.data.imaging import resize

    img = _load_gray(Path(path))
    height, width = img.shape
    small = resize(img, size, "stretch").astype(np.float32)
    small = (small - small.mean()) / (small.std() + 1e-6)
    return np.concatenate([small.ravel(), [math.log(height / width)]]).astype(np.float32)


def _features_or_none(args: tuple[str, int]) -> np.ndarray | None:
    try:
        return image_features(args[0], args[1])
    except Exception as exc:
        logger.warning("view classifier: cannot read %s (%s)", args[0], exc)
        return None


def _compute_features(paths: list[Path], size: int, workers: int) -> list[np.ndarray | None]:
    jobs = [(str(p), size) for p in paths]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(
                tqdm(
                    pool.map(_features_or_none, jobs, chunksize=32),
                    total=len(jobs),
                    desc="view features",
                    disable=None,
                )
            )
    return [_features_or_none(j) for j in tqdm(jobs, desc="view features", disable=None)]


def _make_model(seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=seed)
    )


def _train_classifier(
    paths: list[Path], labels: list[int], cfg: Mapping[str, Any]
) -> tuple[Any | None, dict[str, Any]]:
    """Fit frontal(1)/lateral(0) on known rows; returns (model or None, stats)."""
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(int(cfg["seed"]))
    idx = np.arange(len(paths))
    chosen: list[int] = []
    for cls in (0, 1):
        members = idx[np.asarray(labels) == cls] if len(labels) else idx[:0]
        if len(members) > cfg["max_train_per_class"]:
            members = np.sort(rng.choice(members, cfg["max_train_per_class"], replace=False))
        chosen.extend(int(i) for i in members)
    chosen.sort()
    feats = _compute_features([paths[i] for i in chosen], cfg["image_size"], cfg["workers"])
    x_rows, y = [], []
    for i, feat in zip(chosen, feats, strict=True):
        if feat is not None:
            x_rows.append(feat)
            y.append(labels[i])
    stats: dict[str, Any] = {
        "source": "trained",
        "n_labelled": len(y),
        "n_frontal": int(sum(y)),
        "n_lateral": len(y) - int(sum(y)),
    }
    if min(stats["n_frontal"], stats["n_lateral"]) < cfg["min_per_class"]:
        stats["reason"] = (
            f"too few labelled images per class (frontal {stats['n_frontal']}, lateral "
            f"{stats['n_lateral']}; need {cfg['min_per_class']})"
        )
        return None, stats
    x = np.stack(x_rows)
    y_arr = np.asarray(y)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x,
        y_arr,
        test_size=cfg["holdout_fraction"],
        stratify=y_arr,
        random_state=int(cfg["seed"]),
    )
    model = _make_model(int(cfg["seed"]))
    model.fit(x_tr, y_tr)
    accuracy = float((model.predict(x_te) == y_te).mean())
    stats.update({"n_train": len(y_tr), "n_holdout": len(y_te), "accuracy": accuracy})
    # Refit on everything once the held-out estimate is recorded: more data, same recipe.
    model = _make_model(int(cfg["seed"]))
    model.fit(x, y_arr)
    return model, stats


def _load_pretrained(
    path: str, paths: list[Path], labels: list[int], cfg: Mapping[str, Any]
) -> tuple[Any | None, dict[str, Any]]:
    """Load a classifier saved by :func:`save_view_classifier`; evaluate it on known rows."""
    import joblib

    from cxrfoundry.io import sha256_file

    bundle = joblib.load(path)  # a trusted file named in config, never fetched
    if not isinstance(bundle, dict) or "model" not in bundle or "image_size" not in bundle:
        raise ValueError(f"{path}: not a view classifier saved by save_view_classifier")
    stats: dict[str, Any] = {"source": "pretrained", "path": str(path), "sha256": sha256_file(path)}
    if bundle["image_size"] != cfg["image_size"]:
        stats["note"] = f"using the file's image_size {bundle['image_size']}"
    feats = _compute_features(paths, int(bundle["image_size"]), cfg["workers"])
    keep = [i for i, f in enumerate(feats) if f is not None]
    if keep:
        x = np.stack([feats[i] for i in keep])
        y = np.asarray([labels[i] for i in keep])
        stats.update(
            {"n_holdout": len(keep), "accuracy": float((bundle["model"].predict(x) == y).mean())}
        )
    else:
        stats.update({"n_holdout": 0, "accuracy": bundle.get("accuracy"), "accuracy_from": "file"})
    bundle["model"].image_size = int(bundle["image_size"])
    return bundle["model"], stats


def save_view_classifier(path: Path | str, model: Any, image_size: int, accuracy: float) -> None:
    """Save a frontal/lateral classifier for the ``classifier.pretrained`` policy key."""
    import joblib

    from cxrfoundry.io import atomic_path

    with atomic_path(path) as tmp:
        joblib.dump(
            {"model": model, "image_size": int(image_size), "accuracy": float(accuracy)}, tmp
        )


def train_view_classifier(
    manifest: pa.Table, raw_root: Path, classifier: Mapping[str, Any] | None = None
) -> tuple[Any | None, dict[str, Any]]:
    """Train the frontal/lateral classifier on a manifest's rows of known view.

    Rows whose view another classifier set (view_source ``classifier``) are left out, as in
    :func:`filter_frontal`.

    Uses the same recipe and ``classifier`` keys as :func:`filter_frontal`; returns
    ``(model or None, stats)`` — save a model with :func:`save_view_classifier` to use it as
    ``classifier.pretrained`` for datasets without enough labelled views of their own.
    """
    cfg = resolve_policy({"classifier": dict(classifier or {})})
    frontal_views = set(cfg["frontal_views"])
    table = schema.conform(manifest, schema.MANIFEST_SCHEMA)
    rows = table.select(["image_path", "view", "view_source"]).to_pylist()
    known = [
        r
        for r in rows
        if r["view"] in frontal_views | {"LATERAL"} and r["view_source"] in TRAINING_SOURCES
    ]
    return _train_classifier(
        [Path(raw_root) / r["image_path"] for r in known],
        [int(r["view"] != "LATERAL") for r in known],
        cfg["classifier"],
    )


def _reason_not_frontal(view: str, raw: Any) -> str:
    return f"view {view} is not frontal" + (f" (raw {raw!r})" if view == "OTHER" else "")


def filter_frontal(
    manifest: pa.Table, raw_root: Path, policy: Mapping[str, Any] | None = None
) -> FilterResult:
    """Split a manifest into frontal rows and excluded rows, deciding unknown views.

    Args:
        manifest: a table with :data:`schema.MANIFEST_SCHEMA` (extra columns are dropped).
        raw_root: the dataset's raw root; ``image_path`` is relative to it.
        policy: keys ``frontal_views`` (default PA, AP, AP_SUPINE), ``include_decubitus``
            (False), ``unknown_policy`` (``exclude`` | ``include`` | ``keep_apart``; default
            ``exclude``), ``use_dicom`` (True) and ``classifier``: {``enabled`` (True),
            ``min_accuracy`` (0.95), ``min_confidence`` (0.9), ``image_size`` (32),
            ``holdout_fraction`` (0.25), ``min_per_class`` (10), ``max_train_per_class``
            (2000), ``pretrained`` (path or None), ``seed`` (0), ``workers`` (1)}.

    Returns:
        :class:`FilterResult`; ``audit`` holds rows_in/rows_frontal/rows_excluded (which add up),
        rows_kept_apart, per (raw view, view, decision, source) counts, counts by decision
        source and the classifier's statistics.
    """
    from cxrfoundry.data.dicom import DicomHeaderError, read_header, view_from_tags

    cfg = resolve_policy(policy)
    raw_root = Path(raw_root)
    table = schema.conform(manifest, schema.MANIFEST_SCHEMA)
    rows = table.to_pylist()
    frontal_views = set(cfg["frontal_views"])
    # A frontal of unknown side (metadata "Frontal", or the classifier's call, which cannot tell
    # PA from AP) may be any frontal view: it is accepted only when every frontal view is.
    unsided_ok = frontal_views >= schema.FRONTAL_VIEWS
    n = len(rows)

    # Per row: (decision: frontal|excluded|unknown, source, reason)
    decision: list[str] = [""] * n
    source: list[str] = [""] * n
    reasons: list[str | None] = [None] * n

    def decide_known(i: int, view: str, src: str) -> None:
        row = rows[i]
        if cfg["include_decubitus"] and is_decubitus(row["view_raw"]):
            view = normalize_view(row["view_raw"], decubitus_as_frontal=True)
            row["view"] = view
        source[i] = src
        if view in frontal_views:
            decision[i] = "frontal"
        else:
            decision[i] = "excluded"
            reasons[i] = _reason_not_frontal(view, row["view_raw"])

    # 1. the manifest's own view: from metadata, DICOM tags read at ingest, or a classifier the
    # dataset's authors ran (PadChest); its source is kept so the audit says who decided
    for i, row in enumerate(rows):
        if row["view"] != "UNKNOWN":
            src = row["view_source"] if row["view_source"] in MANIFEST_SOURCES else "metadata"
            decide_known(i, row["view"], src)
        elif unsided_ok and is_frontal_unsided(row["view_raw"]):
            # metadata says frontal, side unknown: frontal; the view stays UNKNOWN
            decision[i], source[i] = "frontal", "metadata"
            row["view_source"] = "metadata"

    # 2. DICOM tags for DICOM files still unknown (ingest may not have looked, e.g. CSV sources)
    n_dicom_tried = 0
    if cfg["use_dicom"]:
        for i in tqdm([i for i in range(n) if not decision[i]], desc="dicom views", disable=None):
            path = raw_root / rows[i]["image_path"]
            if not path.is_file() or not _is_dicom_path(path):
                continue
            n_dicom_tried += 1
            try:
                view_raw, view, _how = view_from_tags(read_header(path))
            except DicomHeaderError as exc:
                logger.warning("filter_frontal: %s", exc)
                continue
            if view != "UNKNOWN":
                rows[i]["view"], rows[i]["view_source"] = view, "dicom"
                if view_raw:
                    rows[i]["view_raw"] = view_raw
                decide_known(i, view, "dicom")

    # 3. image classifier for what is still unknown
    clf_cfg = cfg["classifier"]
    unknown_idx = [i for i in range(n) if not decision[i]]
    clf_stats: dict[str, Any] = {
        "enabled": bool(clf_cfg["enabled"]),
        "min_accuracy": clf_cfg["min_accuracy"],
        "min_confidence": clf_cfg["min_confidence"],
        "image_size": clf_cfg["image_size"],
        "used": False,
        "n_unknown": len(unknown_idx),
        "n_predicted": 0,
        "n_decided": 0,
        "n_frontal_side_unknown": 0,
        "n_known_view_from_classifier": sum(1 for s in source if s == "classifier"),
    }
    if clf_cfg["enabled"] and unknown_idx:
        # Another model's calls are not ground truth: training on them would copy its errors
        # and let the held-out accuracy gate measure agreement with it instead of correctness.
        known_idx = [
            i
            for i in range(n)
            if source[i] in TRAINING_SOURCES and rows[i]["view"] in (frontal_views | {"LATERAL"})
        ]
        known_paths = [raw_root / rows[i]["image_path"] for i in known_idx]
        known_labels = [int(rows[i]["view"] != "LATERAL") for i in known_idx]
        model, stats = _train_classifier(known_paths, known_labels, clf_cfg)
        if model is None and clf_cfg["pretrained"]:
            trained_stats = stats
            model, stats = _load_pretrained(
                str(clf_cfg["pretrained"]), known_paths, known_labels, clf_cfg
            )
            stats["trained_attempt"] = trained_stats
        clf_stats.update(stats)
        accuracy = stats.get("accuracy")
        if model is None:
            pass
        elif accuracy is None or accuracy < clf_cfg["min_accuracy"]:
            clf_stats["reason"] = (
                f"held-out accuracy {accuracy} below min_accuracy {clf_cfg['min_accuracy']}"
            )
        else:
            clf_stats["used"] = True
            size = int(getattr(model, "image_size", clf_cfg["image_size"]))
            feats = _compute_features(
                [raw_root / rows[i]["image_path"] for i in unknown_idx], size, clf_cfg["workers"]
            )
            ok = [(i, f) for i, f in zip(unknown_idx, feats, strict=True) if f is not None]
            clf_stats["n_unreadable"] = len(unknown_idx) - len(ok)
            if ok:
                proba = model.predict_proba(np.stack([f for _, f in ok]))
                classes = list(model.classes_)
                p_frontal = proba[:, classes.index(1)]
                clf_stats["n_predicted"] = len(ok)
                for (i, _), pf in zip(ok, p_frontal, strict=True):
                    conf = max(pf, 1.0 - pf)
                    if conf < clf_cfg["min_confidence"]:
                        continue
                    if pf >= 0.5 and not unsided_ok:
                        # frontal, but PA vs AP unknown and not every frontal view is wanted
                        clf_stats["n_frontal_side_unknown"] += 1
                        continue
                    clf_stats["n_decided"] += 1
                    rows[i]["view_source"] = "classifier"
                    source[i] = "classifier"
                    if pf >= 0.5:
                        # Frontal of unknown side: the view stays UNKNOWN (AP vs PA is not
                        # something 32x32 pixels can tell), view_source records who decided.
                        decision[i] = "frontal"
                    else:
                        rows[i]["view"] = "LATERAL"
                        decision[i] = "excluded"
                        reasons[i] = f"view LATERAL is not frontal (classifier p_frontal={pf:.3f})"
    elif not clf_cfg["enabled"]:
        clf_stats["reason"] = "disabled by policy"
    else:
        clf_stats["reason"] = "no unknown views"

    # 4. the unknown policy for what remains
    kept_apart: list[dict[str, Any]] = []
    for i in range(n):
        if decision[i]:
            continue
        row = rows[i]
        source[i] = "none"
        row["view_source"] = "none"
        why = f"view unknown after all fallbacks (raw {row['view_raw']!r})"
        if cfg["unknown_policy"] == "include":
            decision[i] = "frontal"
        else:
            decision[i] = "excluded"
            reasons[i] = f"{why}: policy {cfg['unknown_policy']}"
            if cfg["unknown_policy"] == "keep_apart":
                kept_apart.append(row)

    frontal_rows = [rows[i] for i in range(n) if decision[i] == "frontal"]
    excluded_rows = [
        schema.reject_row(
            dataset=rows[i]["dataset"],
            stage=STAGE,
            source_file=rows[i]["image_path"],
            reason=reasons[i] or "excluded",
            row=rows[i],
            image_id=rows[i]["image_id"],
        )
        for i in range(n)
        if decision[i] == "excluded"
    ]
    combos: Counter[tuple[str, str, str, str]] = Counter(
        (str(rows[i]["view_raw"]), rows[i]["view"], decision[i], source[i]) for i in range(n)
    )
    audit = {
        "stage": STAGE,
        "policy": cfg,
        "rows_in": n,
        "rows_frontal": len(frontal_rows),
        "rows_excluded": len(excluded_rows),
        "rows_kept_apart": len(kept_apart),
        "by_source": {s: source.count(s) for s in schema.VIEW_SOURCES},
        "by_decision_source": {
            f"{d}/{s}": c
            for (d, s), c in sorted(Counter(zip(decision, source, strict=True)).items())
        },
        "views": [
            {"view_raw": raw, "view": view, "decision": dec, "source": src, "count": cnt}
            for (raw, view, dec, src), cnt in sorted(combos.items())
        ],
        "excluded_by_reason": dict(
            sorted(Counter(r["reason"].split(" (")[0] for r in excluded_rows).items())
        ),
        "dicom_headers_read": n_dicom_tried,
        "classifier": clf_stats,
    }
    if audit["rows_in"] != audit["rows_frontal"] + audit["rows_excluded"]:
        raise AssertionError("filter_frontal: rows_in != rows_frontal + rows_excluded")
    json.dumps(audit, allow_nan=False)  # fail here, not later in write_json
    frontal = schema.conform(frontal_rows, schema.MANIFEST_SCHEMA)
    excluded = schema.conform(excluded_rows, schema.REJECTS_SCHEMA)
    apart = schema.conform(kept_apart, schema.MANIFEST_SCHEMA)
    logger.info(
        "filter_frontal: %d in, %d frontal, %d excluded (%d kept apart)",
        n,
        len(frontal_rows),
        len(excluded_rows),
        len(kept_apart),
    )
    return FilterResult(frontal=frontal, excluded=excluded, audit=audit, kept_apart=apart)


def filter_frontal_files(
    manifest_path: Path,
    raw_root: Path,
    policy: Mapping[str, Any] | None,
    *,
    frontal_path: Path,
    excluded_path: Path,
    kept_apart_path: Path,
    audit_path: Path,
    seed: int,
) -> dict[str, Any]:
    """Run :func:`filter_frontal` on a manifest file and write its four outputs atomically.

    ``seed`` seeds the view classifier unless the policy sets its own. Returns the audit's
    numeric counts.
    """
    import pyarrow.parquet as pq

    from cxrfoundry.io import write_json, write_parquet

    policy = dict(policy or {})
    policy["classifier"] = {"seed": seed, **(policy.get("classifier") or {})}
    result = filter_frontal(pq.read_table(manifest_path), raw_root, policy)
    write_parquet(frontal_path, result.frontal)
    write_parquet(excluded_path, result.excluded)
    write_parquet(kept_apart_path, result.kept_apart)
    write_json(audit_path, result.audit)
    return {k: v for k, v in result.audit.items() if isinstance(v, int | float)}
