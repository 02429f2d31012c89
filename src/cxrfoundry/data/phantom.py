"""CXR phantom: seeded synthetic chest radiographs with known ground truth.

The demo data of CXR Foundry is drawn here. A case is made in two steps:

1. :func:`sample_case` draws a :class:`CaseSpec` from a seeded ``numpy.random.Generator`` and a
   config mapping: view, demographics, the 14 CheXpert labels and every geometric parameter of
   the anatomy and of each finding. All randomness that shapes the case lives in the spec.
2. :func:`render_case` turns a spec into a :class:`PhantomCase` (image, masks, boxes, labels) at
   a given size for a given acquisition *site*. Rendering is a pure function of (spec, size,
   site): texture noise comes from ``spec.seed``, so the same spec renders the same pixels.

Image model: each anatomical structure adds to a projected attenuation map (soft tissue, bone,
metal) or removes from it (air in lungs, trachea, stomach, pneumothorax); the display value is
``1 - exp(-k * attenuation)`` (bright = attenuating, as on a radiograph), followed by the site's
window, contrast, gamma, blur, noise and collimation border. Shapes are implicit functions with
soft (anti-aliased) edges, so 64 px and 512 px renders show the same anatomy.

Coordinates are normalised to [-1, 1] (x to the image right, y down). Frontal views are drawn
as viewed from the front: the patient's right is on the image left, so the heart bulges to the
image right. Lateral views face the image left (anterior = image left, spine on the right).

Findings and their signatures (CheXpert display names, :data:`cxrfoundry.schema.FINDINGS`):

- Cardiomegaly: wider heart (cardiothoracic ratio ~0.45 -> ~0.6); heart mask grows.
- Enlarged Cardiomediastinum: wide upper mediastinum and aortic knob.
- Pleural Effusion: basal fluid with a lateral meniscus, blunted costophrenic angle.
- Pneumothorax: apical/lateral lucent rim without lung markings, thin pleural line.
- Consolidation / Pneumonia: patchy dense airspace opacity (pneumonia renders like
  consolidation); Lung Opacity alone: a fainter patch.
- Lung Lesion: 1-3 round dense nodules or masses (one box each, lesion mask).
- Edema: bilateral perihilar ("bat-wing") haze, engorged upper-zone vessels.
- Atelectasis: basal plate-like band opacity with volume loss (raised hemidiaphragm).
- Fracture: a rib with a gap and step-off.
- Support Devices: tubes, lines, ECG leads, pacemaker (thin bright curves, rings, a box).
- Pleural Other: pleural thickening along the lateral chest wall / apex.

Label rules: Lung Opacity is positive whenever Consolidation, Pneumonia, Edema, Atelectasis or
Lung Lesion is (its own prevalence is the rate of an *extra* stand-alone opacity); No Finding is
positive exactly when no pathology is (Support Devices may coexist with No Finding, as in
CheXpert). ``PhantomCase.labels`` holds the truth (0/1); ``reported_labels`` is what a source
would record, with a configurable fraction of true positives reported as uncertain (-1).

Mask choice: ``lungs`` is the *aerated* lung field visible on the image: it excludes the heart,
pleural fluid (effusion), the pleural air space of a pneumothorax and pleural thickening, and
includes parenchymal opacities (consolidation, nodules, edema) since those lie inside the lung.
``heart`` is the cardiac silhouette above the diaphragm; ``lesion`` is the union of Lung Lesion
nodules/masses. Masks are uint8 arrays of 0/1; :meth:`PhantomCase.mask_bits` packs them with
:data:`cxrfoundry.schema.MASK_BITS`. Boxes are ``{"label", "x", "y", "w", "h"}`` in pixels
(top-left corner, inclusive extent) for localised findings: Lung Lesion (one per nodule),
Cardiomegaly, Pleural Effusion, Pneumothorax, Consolidation, Pneumonia, Lung Opacity,
Atelectasis, Fracture, Pleural Other.

Config keys for :func:`sample_case` (all optional; defaults in :data:`DEFAULT_CONFIG`):

- ``prevalence``: {finding display name: probability}; see :data:`DEFAULT_PREVALENCE`.
- ``view_mix``: {"PA"|"AP"|"LATERAL": weight}.
- ``demographics``: ``female_fraction`` (0.5), ``race`` ({race: weight} over :data:`RACES`),
  ``age`` ({"mean", "sd", "min", "max"}).
- ``bias``: ``{"signal_strength": {"sex"|"race"|"age_group": {group: factor}}}``: finding
  signal (size and density) is multiplied by the product of the factors of the case's groups,
  e.g. ``{"race": {"Black": 0.5}}`` makes findings fainter for that group. Age groups:
  :data:`AGE_GROUPS`.
- ``signal_strength``: global finding signal multiplier (1.0).
- ``race_effects``: {race: {"habitus": soft-tissue thickness factor, "density": offset}}.
- ``uncertain_fraction``: share of true positive pathologies reported as -1 (0.03).
- ``age_effects``: ``cardiomegaly_per_decade`` (relative prevalence change per decade from 60).
"""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

from cxrfoundry.schema import FINDING_NAMES, MASK_BITS

log = logging.getLogger(__name__)

#: Views the phantom draws.
PHANTOM_VIEWS: tuple[str, ...] = ("PA", "AP", "LATERAL")
#: Race groups (canonical names used in ground truth; sources map them to their vocabularies).
RACES: tuple[str, ...] = ("White", "Black", "Asian", "Hispanic", "Other")
#: Age groups used by the bias knob.
AGE_GROUPS: tuple[tuple[str, float, float], ...] = (
    ("18-39", 0, 40),
    ("40-59", 40, 60),
    ("60-79", 60, 80),
    ("80+", 80, 200),
)
#: Findings that are pathologies (everything except No Finding and Support Devices).
PATHOLOGIES: tuple[str, ...] = tuple(
    n for n in FINDING_NAMES if n not in ("No Finding", "Support Devices")
)
#: Findings that imply Lung Opacity.
OPACITY_CHILDREN: tuple[str, ...] = (
    "Consolidation",
    "Pneumonia",
    "Edema",
    "Atelectasis",
    "Lung Lesion",
)

DEFAULT_PREVALENCE: dict[str, float] = {
    "Enlarged Cardiomediastinum": 0.08,
    "Cardiomegaly": 0.15,
    "Lung Opacity": 0.05,  # extra stand-alone opacity; also implied by its children
    "Lung Lesion": 0.08,
    "Edema": 0.10,
    "Consolidation": 0.08,
    "Pneumonia": 0.06,
    "Atelectasis": 0.12,
    "Pneumothorax": 0.06,
    "Pleural Effusion": 0.15,
    "Pleural Other": 0.04,
    "Fracture": 0.05,
    "Support Devices": 0.20,
}

DEFAULT_CONFIG: dict[str, Any] = {
    "prevalence": DEFAULT_PREVALENCE,
    "view_mix": {"PA": 0.55, "AP": 0.30, "LATERAL": 0.15},
    "demographics": {
        "female_fraction": 0.5,
        "race": {"White": 0.6, "Black": 0.15, "Asian": 0.1, "Hispanic": 0.1, "Other": 0.05},
        "age": {"mean": 58.0, "sd": 18.0, "min": 18.0, "max": 95.0},
    },
    "bias": {"signal_strength": {}},
    "signal_strength": 1.0,
    "race_effects": {
        "White": {"habitus": 1.0, "density": 0.0},
        "Black": {"habitus": 1.06, "density": 0.03},
        "Asian": {"habitus": 0.94, "density": -0.02},
        "Hispanic": {"habitus": 1.03, "density": 0.01},
        "Other": {"habitus": 1.0, "density": 0.0},
    },
    "uncertain_fraction": 0.03,
    "age_effects": {"cardiomegaly_per_decade": 0.35},
}

#: Acquisition defaults; ``render_case(site=...)`` overrides any key.
DEFAULT_SITE: dict[str, Any] = {
    "gamma": 1.0,  # display curve exponent (>1 darker mid-tones)
    "contrast": 1.0,  # contrast around mid-grey
    "brightness": 0.0,  # additive offset after the curve
    "noise": 0.015,  # sd of (slightly correlated) detector noise, in [0, 1] display units
    "blur": 0.4,  # gaussian blur sigma in pixels at 128 px (scaled with size)
    "border": 0.0,  # collimation border width as a fraction of the image side
    "border_value": 1.0,  # display value of the collimated border (1 = white)
    "bits": 8,  # 8 -> uint8 image; 10..16 -> uint16 image with that many bits used
    "marker": True,  # draw a small bright side marker in a top corner
    "ap_contrast": 0.85,  # AP (portable) contrast multiplier
    "ap_noise": 1.4,  # AP (portable) noise multiplier
}

#: Per-source site presets (the demo sources use them; configs may override).
SITE_PRESETS: dict[str, dict[str, Any]] = {
    "mimic": {"gamma": 0.95, "noise": 0.02, "blur": 0.5, "border": 0.02, "border_value": 0.0},
    "chexpert": {"gamma": 1.12, "noise": 0.012, "blur": 0.8, "contrast": 0.95},
    "nih": {"gamma": 1.0, "noise": 0.01, "blur": 0.3, "contrast": 1.1, "border": 0.03},
    "dicom": {"gamma": 0.9, "noise": 0.018, "blur": 0.4, "bits": 12, "marker": False},
}

_ATTEN_K = 1.15  # display = 1 - exp(-k * attenuation)
_WINDOW = (0.0, 0.86)  # display values mapped to 0 and 1 before the site curve


@dataclass
class CaseSpec:
    """Everything that defines one phantom case; rendering is a pure function of it."""

    seed: int
    view: str
    sex: str
    age: float
    race: str
    labels: dict[str, int]
    reported_labels: dict[str, int]
    signal: float
    anatomy: dict[str, float]
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class PhantomCase:
    """One rendered case: pixels plus ground truth."""

    image: np.ndarray  # HxW uint8 (8-bit site) or uint16 (deeper sites)
    masks: dict[str, np.ndarray]  # "lungs", "heart", "lesion": HxW uint8 0/1
    boxes: list[dict[str, Any]]  # {"label", "x", "y", "w", "h"} in pixels
    labels: dict[str, int]  # truth by CheXpert display name, 0/1
    reported_labels: dict[str, int]  # as a source would record them, 1/0/-1
    view: str
    sex: str
    age: float
    race: str
    spec: CaseSpec

    def mask_bits(self) -> np.ndarray:
        """Pack the masks into one uint8 array with :data:`cxrfoundry.schema.MASK_BITS`."""
        out = np.zeros(self.image.shape, dtype=np.uint8)
        for name, bit in MASK_BITS.items():
            if name in self.masks:
                out |= (self.masks[name].astype(bool) * bit).astype(np.uint8)
        return out


# --------------------------------------------------------------------------- config helpers


#: Config mappings that are distributions: an override replaces them instead of merging.
_REPLACED_KEYS = frozenset({"race", "view_mix"})


def merge_config(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base`` (mappings merge, other values replace).

    Weight tables that are distributions (``race``, ``view_mix``) are replaced whole, so an
    override such as ``{"race": {"White": 0.9, "Asian": 0.1}}`` means exactly those groups.
    """
    out = copy.deepcopy(dict(base))
    for key, value in (override or {}).items():
        if key in _REPLACED_KEYS:
            out[key] = copy.deepcopy(dict(value))
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def age_group(age: float) -> str:
    """Return the :data:`AGE_GROUPS` name for ``age``."""
    for name, lo, hi in AGE_GROUPS:
        if lo <= age < hi:
            return name
    return AGE_GROUPS[-1][0]


def choose_weighted(rng: np.random.Generator, weights: Mapping[str, float], what: str) -> str:
    """Draw one key of ``weights`` with probability proportional to its weight."""
    keys = list(weights)
    p = np.array([float(weights[k]) for k in keys], dtype=float)
    if not keys or p.sum() <= 0 or (p < 0).any():
        raise ValueError(
            f"phantom config: {what} weights must be non-negative, not all 0: {weights}"
        )
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def subgroup_signal(cfg: Mapping[str, Any], sex: str, race: str, age: float) -> float:
    """Finding signal multiplier for a case's subgroups (the bias knob)."""
    factors = (cfg.get("bias") or {}).get("signal_strength") or {}
    signal = float(cfg.get("signal_strength", 1.0))
    groups = {"sex": sex, "race": race, "age_group": age_group(age)}
    for attr, table in factors.items():
        if attr not in groups:
            raise ValueError(
                f"phantom config: bias.signal_strength key {attr!r} is not one of {sorted(groups)}"
            )
        signal *= float(table.get(groups[attr], 1.0))
    return signal


# --------------------------------------------------------------------------- sampling


def sample_demographics(rng: np.random.Generator, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Draw sex, age (integer years) and race from ``cfg['demographics']``."""
    demo = merge_config(DEFAULT_CONFIG["demographics"], cfg.get("demographics"))
    sex = "F" if rng.random() < float(demo["female_fraction"]) else "M"
    a = demo["age"]
    age = float(np.clip(round(rng.normal(a["mean"], a["sd"])), a["min"], a["max"]))
    race = choose_weighted(rng, demo["race"], "demographics.race")
    return {"sex": sex, "age": age, "race": race}


def sample_labels(
    rng: np.random.Generator, cfg: Mapping[str, Any], *, view: str, age: float
) -> dict[str, int]:
    """Draw the 14 true labels (0/1) with the co-occurrence rules of the module docstring."""
    prev = {**DEFAULT_PREVALENCE, **(cfg.get("prevalence") or {})}
    unknown = set(prev) - set(FINDING_NAMES)
    if unknown:
        raise ValueError(f"phantom config: unknown findings in prevalence: {sorted(unknown)}")
    per_decade = float((cfg.get("age_effects") or {}).get("cardiomegaly_per_decade", 0.35))
    mult = {name: 1.0 for name in FINDING_NAMES}
    # Cardiomegaly is more common in the elderly; portable AP films are sicker patients.
    mult["Cardiomegaly"] = max(0.1, 1.0 + per_decade * (age - 60.0) / 10.0)
    if view == "AP":
        mult.update({"Support Devices": 2.5, "Edema": 1.5, "Pleural Effusion": 1.3})
    elif view == "PA":
        mult["Support Devices"] = 0.5
    labels = {name: 0 for name in FINDING_NAMES}
    for name in (*PATHOLOGIES, "Support Devices"):
        p = min(0.95, float(prev.get(name, 0.0)) * mult[name])
        labels[name] = int(rng.random() < p)
    if any(labels[c] for c in OPACITY_CHILDREN):
        labels["Lung Opacity"] = 1
    labels["No Finding"] = int(not any(labels[n] for n in PATHOLOGIES))
    return labels


def _sample_anatomy(
    rng: np.random.Generator, cfg: Mapping[str, Any], view: str, sex: str, age: float, race: str
) -> dict[str, float]:
    effects = merge_config(DEFAULT_CONFIG["race_effects"], cfg.get("race_effects")).get(race, {})
    habitus = float(effects.get("habitus", 1.0))
    n = rng.normal
    return {
        "width": (0.86 if sex == "M" else 0.80) * n(1, 0.03) * (0.97 + 0.03 * habitus),
        "thick": n(1.0, 0.06) * habitus * (1.0 if sex == "M" else 0.95),
        "density": float(effects.get("density", 0.0)),
        "lung_h": n(1.0, 0.04) * (0.93 if view == "AP" else 1.0),
        "heart_w": n(1.0, 0.05) * (0.96 if age < 35 else 1.0),
        "heart_y": n(0.0, 0.02),
        "med_w": n(1.0, 0.06),
        "rib_phase": n(0.0, 0.012),
        "rib_tilt": n(0.0, 0.03),
        "bone": float(np.clip(1.18 - 0.0075 * (age - 30.0), 0.55, 1.25) * n(1.0, 0.05)),
        "aorta": 1.0 + max(0.0, age - 50.0) * 0.006,
        "rotation": n(0.0, 3.0 if view == "AP" else 1.2),
        "shift_x": n(0.0, 0.02),
        "shift_y": n(0.0, 0.02),
        "breast": rng.uniform(0.6, 1.3) if sex == "F" else 0.0,
        "dome_r": n(0.0, 0.015),
        "dome_l": n(0.0, 0.015),
        "vessels": n(1.0, 0.1),
    }


def _side(rng: np.random.Generator) -> int:
    # -1 = patient's right (image left in frontal views), +1 = patient's left.
    return -1 if rng.random() < 0.5 else 1


def _sample_findings(
    rng: np.random.Generator, labels: Mapping[str, int], view: str
) -> dict[str, dict[str, Any]]:
    f: dict[str, dict[str, Any]] = {}
    u = rng.uniform
    if labels["Cardiomegaly"]:
        f["Cardiomegaly"] = {"scale": u(0.28, 0.42)}
    if labels["Enlarged Cardiomediastinum"]:
        f["Enlarged Cardiomediastinum"] = {"scale": u(0.6, 0.9)}
    if labels["Pleural Effusion"]:
        sides = [-1, 1] if rng.random() < 0.35 else [_side(rng)]
        f["Pleural Effusion"] = {"sides": sides, "height": [u(0.18, 0.42) for _ in sides]}
    if labels["Pneumothorax"]:
        f["Pneumothorax"] = {"side": _side(rng), "size": u(0.18, 0.32)}
    for name, density in (("Consolidation", 0.45), ("Pneumonia", 0.42), ("Lung Opacity", 0.3)):
        standalone_opacity = name == "Lung Opacity" and not any(labels[c] for c in OPACITY_CHILDREN)
        if labels[name] and (name != "Lung Opacity" or standalone_opacity):
            f[name] = {
                "side": _side(rng),
                "u": u(0.3, 0.75),
                "v": u(0.35, 0.85),
                "radius": u(0.12, 0.22),
                "density": density,
                "texture_seed": int(rng.integers(2**31)),
            }
    if labels["Lung Lesion"]:
        n = int(rng.choice([1, 1, 1, 2, 3]))
        lesions = []
        for _ in range(n):
            mass = rng.random() < 0.35
            lesions.append(
                {
                    "side": _side(rng),
                    "u": u(0.25, 0.8),
                    "v": u(0.2, 0.8),
                    "radius": u(0.09, 0.14) if mass else u(0.04, 0.07),
                    "kind": "mass" if mass else "nodule",
                    "lobes": [u(-0.15, 0.15) for _ in range(3)],
                }
            )
        f["Lung Lesion"] = {"lesions": lesions}
    if labels["Edema"]:
        f["Edema"] = {"extent": u(0.8, 1.2), "kerley": int(rng.integers(3, 7))}
    if labels["Atelectasis"]:
        f["Atelectasis"] = {"side": _side(rng), "v": u(0.7, 0.88), "tilt": u(-0.15, 0.05)}
    if labels["Pleural Other"]:
        f["Pleural Other"] = {"side": _side(rng), "thickness": u(0.035, 0.06), "apical": u() < 0.5}
    if labels["Fracture"]:
        f["Fracture"] = {
            "side": _side(rng),
            "rib": int(rng.integers(3, 8)),
            "u": u(0.5, 0.8),
            "step": u(0.02, 0.035) * (1 if rng.random() < 0.5 else -1),
        }
    if labels["Support Devices"]:
        kinds = ["ett", "cvc", "ngt", "ecg", "pacer"]
        weights = np.array([0.3, 0.35, 0.2, 0.4, 0.12])
        if view == "AP":
            weights[[0, 1, 3]] *= 1.8
        chosen = [k for k, w in zip(kinds, weights, strict=True) if rng.random() < min(0.9, w)]
        if not chosen:
            chosen = [kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]]
        f["Support Devices"] = {
            "devices": chosen,
            "cvc_side": _side(rng),
            "ett_tip": u(-0.45, -0.3),
            "ecg": [(u(-0.7, 0.7), u(-0.75, 0.2)) for _ in range(int(rng.integers(2, 5)))],
        }
    return f


def report_labels(
    rng: np.random.Generator, labels: Mapping[str, int], uncertain_fraction: float
) -> dict[str, int]:
    """Labels as a source records them: each true positive pathology becomes -1 (uncertain)
    with probability ``uncertain_fraction``; everything else is copied."""
    reported = {n: int(labels[n]) for n in FINDING_NAMES}
    for name in PATHOLOGIES:
        # Draw for every pathology so the stream does not depend on which ones are positive.
        draw = rng.random()
        if reported[name] == 1 and draw < uncertain_fraction:
            reported[name] = -1
    return reported


def sample_case(
    rng: np.random.Generator,
    cfg: Mapping[str, Any] | None = None,
    *,
    view: str | None = None,
    demographics: Mapping[str, Any] | None = None,
    labels: Mapping[str, int] | None = None,
) -> CaseSpec:
    """Draw one :class:`CaseSpec` from ``rng`` and the config (module docstring lists its keys).

    ``view``, ``demographics`` (``sex``, ``age``, ``race``) and ``labels`` (truth, 0/1 by display
    name) may be fixed by the caller, e.g. to keep one patient's images consistent; whatever is
    not fixed is drawn. The same generator state always yields the same spec.
    """
    cfg = merge_config(DEFAULT_CONFIG, cfg)
    if view is None:
        view = choose_weighted(rng, cfg["view_mix"], "view_mix")
    if view not in PHANTOM_VIEWS:
        raise ValueError(f"phantom: view must be one of {PHANTOM_VIEWS}, got {view!r}")
    demo = dict(demographics) if demographics else sample_demographics(rng, cfg)
    sex, age, race = demo["sex"], float(demo["age"]), demo["race"]
    if labels is None:
        labels = sample_labels(rng, cfg, view=view, age=age)
    else:
        missing = set(FINDING_NAMES) - set(labels)
        if missing:
            raise ValueError(f"phantom: labels lack {sorted(missing)}")
        labels = {n: int(labels[n]) for n in FINDING_NAMES}
    reported = report_labels(rng, labels, float(cfg.get("uncertain_fraction", 0.0)))
    return CaseSpec(
        seed=int(rng.integers(2**31)),
        view=view,
        sex=sex,
        age=age,
        race=race,
        labels=dict(labels),
        reported_labels=reported,
        signal=subgroup_signal(cfg, sex, race, age),
        anatomy=_sample_anatomy(rng, cfg, view, sex, age, race),
        findings=_sample_findings(rng, labels, view),
    )


# --------------------------------------------------------------------------- drawing helpers


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    y.setflags(write=False)
    x.setflags(write=False)
    return x, y


def _soft(d: np.ndarray, eps: float) -> np.ndarray:
    """Soft inside-indicator of a signed distance ``d`` (negative inside).

    A smoothstep ramp over ``4 * eps`` around the boundary: it looks like a logistic edge of
    scale ``eps`` but is several times cheaper to evaluate than ``expit``.
    """
    t = np.clip(0.5 - d * np.float32(0.25 / eps), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32, copy=False)


def _ellipse(x, y, cx, cy, rx, ry, angle=0.0):
    """Approximate signed distance to an (optionally rotated) ellipse."""
    dx, dy = x - cx, y - cy
    if angle:
        ca, sa = math.cos(angle), math.sin(angle)
        dx, dy = ca * dx + sa * dy, -sa * dx + ca * dy
    return (np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2) - 1.0) * min(rx, ry)


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _band(dist, half):
    """Gaussian profile of a band whose centre line is at ``dist == 0``."""
    return np.exp(-((dist / half) ** 2))


def _bezier(points: Sequence[tuple[float, float]], n: int) -> np.ndarray:
    """Sample a Bezier curve through control ``points`` at ``n`` parameters (de Casteljau)."""
    p = np.asarray(points, dtype=np.float64)
    t = np.linspace(0.0, 1.0, n)[:, None, None]
    pts = np.broadcast_to(p, (n, *p.shape)).copy()
    while pts.shape[1] > 1:
        pts = (1 - t) * pts[:, :-1] + t * pts[:, 1:]
    return pts[:, 0]


def _splat(
    size: int,
    pts: np.ndarray,
    weight: np.ndarray,
    rot: tuple[float, float, float, float],
) -> np.ndarray:
    """Bilinearly splat points (normalised patient coordinates) into a new ``size``² array."""
    cos_a, sin_a, sx, sy = rot
    # Invert the patient->image transform used for the grids.
    px = pts[:, 0] - sx
    py = pts[:, 1] - sy
    fx = (cos_a * px - sin_a * py + 1.0) / 2.0 * size - 0.5
    fy = (sin_a * px + cos_a * py + 1.0) / 2.0 * size - 0.5
    x0 = np.floor(fx).astype(np.int64)
    y0 = np.floor(fy).astype(np.int64)
    wx = fx - x0
    wy = fy - y0
    idx, wts = [], []
    for dx, dy, w in (
        (0, 0, (1 - wx) * (1 - wy)),
        (1, 0, wx * (1 - wy)),
        (0, 1, (1 - wx) * wy),
        (1, 1, wx * wy),
    ):
        xx, yy = x0 + dx, y0 + dy
        ok = (xx >= 0) & (xx < size) & (yy >= 0) & (yy < size)
        idx.append(yy[ok] * size + xx[ok])
        wts.append(weight[ok] * w[ok])
    flat = np.bincount(np.concatenate(idx), np.concatenate(wts), minlength=size * size)
    return flat.reshape(size, size)


def _curve_density(size: int, n_per_unit: float = 1.0) -> int:
    return max(32, int(size * 3 * n_per_unit))


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _box(label: str, mask: np.ndarray, min_pixels: int = 2) -> dict[str, Any] | None:
    if int(mask.sum()) < min_pixels:
        return None
    x, y, w, h = _bbox(mask)  # type: ignore[misc]
    return {"label": label, "x": x, "y": y, "w": w, "h": h}


def _smooth_noise(rng: np.random.Generator, size: int, sigma_norm: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit sd; sigma given in normalised units."""
    sigma_px = max(0.5, sigma_norm * size / 2.0)
    field_ = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma_px)
    sd = float(field_.std()) or 1.0
    return field_ / sd


class _Canvas:
    """Shared state while one case is drawn: grids, attenuation layers and masks."""

    def __init__(self, spec: CaseSpec, size: int):
        self.spec = spec
        self.size = size
        self.px = 2.0 / size
        self.eps = 0.6 * self.px
        a = spec.anatomy
        gx, gy = _grid(size)
        rot = math.radians(a["rotation"])
        self.rot = (math.cos(rot), math.sin(rot), a["shift_x"], a["shift_y"])
        c, s = self.rot[0], self.rot[1]
        # Patient coordinates of each pixel (the patient is rotated/shifted in the field).
        self.x = (c * gx + s * gy + a["shift_x"]).astype(np.float32)
        self.y = (-s * gx + c * gy + a["shift_y"]).astype(np.float32)
        self.rng = np.random.default_rng(spec.seed)
        self.sig = float(spec.signal)
        self.boxes: list[dict[str, Any]] = []
        self.lesion = np.zeros((size, size), dtype=bool)
        # Thin structures (metal wires, ribs, vessels) are collected as sampled curves, then
        # splatted once per layer and blurred.
        self.layers: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def add_box(self, label: str, mask: np.ndarray) -> None:
        box = _box(label, mask)
        if box is not None:
            self.boxes.append(box)

    def polyline(self, pts: np.ndarray, weight: float | np.ndarray, layer: str = "wires") -> None:
        """Add a sampled curve; ``weight`` (scalar or per point) is its peak amplitude."""
        step = float(np.mean(np.hypot(*np.diff(pts, axis=0).T))) if len(pts) > 1 else 0.0
        # Weight per unit length, so the result does not depend on the sampling density.
        w = np.broadcast_to(np.asarray(weight, dtype=np.float64) * step * self.size / 2.0, len(pts))
        self.layers.setdefault(layer, []).append((pts, w))

    def curve(self, points, weight: float, layer: str = "wires", n: int | None = None) -> None:
        self.polyline(_bezier(points, n or _curve_density(self.size)), weight, layer)

    def ring(self, cx: float, cy: float, r: float, weight: float) -> None:
        t = np.linspace(0, 2 * np.pi, _curve_density(self.size, 0.5))
        self.polyline(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1), weight)

    def blurred(self, layer: str, half_width: float) -> np.ndarray:
        """A splatted layer as bands of gaussian profile ``exp(-(d / half_width)^2)``.

        Below ~1 px the band keeps its integral (partial volume): it gets fainter, not wider.
        """
        parts = self.layers.get(layer)
        if not parts:
            return np.zeros((self.size, self.size), dtype=np.float32)
        pts = np.concatenate([p for p, _ in parts])
        acc = _splat(self.size, pts, np.concatenate([w for _, w in parts]), self.rot)
        sigma_phys = half_width / math.sqrt(2.0) * self.size / 2.0
        sigma = max(0.45, sigma_phys)
        out = ndimage.gaussian_filter(acc, sigma) * (math.sqrt(2.0 * math.pi) * sigma_phys)
        return out.astype(np.float32)


def _vessel_tree(cv: _Canvas, rng, hx: float, hy: float, ux, uy, scale: float) -> None:
    """Splat tapering, gently bent vessel branches (with side branches) from a hilum."""
    n = _curve_density(cv.size, 0.3)
    t = np.linspace(0.0, 1.0, n)
    taper = (1.0 - t) ** 0.7
    for dx, dy in zip(ux, uy, strict=True):
        length = rng.uniform(0.25, 0.55) * scale
        bend = rng.normal(0.0, 0.05)
        px, py = -dy, dx  # perpendicular, for the bend
        # Start a little out from the hilum so the branches do not pile up in one point.
        start = rng.uniform(0.03, 0.1)
        sx, sy = hx + dx * start + px * rng.normal(0, 0.02), hy + dy * start
        pts = _bezier(
            [
                (sx, sy),
                (hx + dx * length / 2 + px * bend, hy + dy * length / 2 + py * bend),
                (hx + dx * length, hy + dy * length),
            ],
            n,
        )
        cv.polyline(pts, taper, "vessels")
        for _ in range(2):
            j = int(rng.integers(n // 4, 3 * n // 4))
            turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.8)
            c, s_ = math.cos(turn), math.sin(turn)
            bx, by = c * dx - s_ * dy, s_ * dx + c * dy
            sub = 0.4 * length * (1 - t[j])
            seg = np.stack([pts[j, 0] + bx * sub * t, pts[j, 1] + by * sub * t], axis=1)
            cv.polyline(seg, 0.7 * taper[j] * taper, "vessels")


# --------------------------------------------------------------------------- frontal view


def _render_frontal(spec: CaseSpec, size: int) -> tuple[np.ndarray, dict[str, np.ndarray], list]:
    cv = _Canvas(spec, size)
    a, F, sig, eps, rng = spec.anatomy, spec.findings, cv.sig, cv.eps, cv.rng
    x, y = cv.x, cv.y
    ap = spec.view == "AP"
    W = a["width"]
    L = a["lung_h"]
    bone = a["bone"]

    # --- body outline: neck, shoulders (arms run off the field), chest wall.
    neck, shoulder, chest = 0.27 * W, 1.18 * W, 0.95 * W
    w_body = (
        neck
        + (shoulder - neck) * _smoothstep((y + 0.98) / 0.3)
        + (chest - shoulder) * _smoothstep((y + 0.62) / 0.3)
    ) * (1.0 + 0.03 * np.clip(y, -1, 1))
    body = _soft(np.abs(x) - w_body, eps * 2)
    prof = np.sqrt(np.clip(1.0 - (x / (w_body + 1e-3)) ** 2, 0.0, 1.0))
    atten = (0.42 + 0.58 * prof) * body * a["thick"] * (1.0 + a["density"])
    arms = _soft(np.abs(np.abs(x) - 1.12 * W) - 0.12 * W, eps * 3) * _smoothstep((y + 0.8) / 0.3)
    atten += 0.55 * arms * (1 - body)

    # --- diaphragm domes (patient right higher: liver); atelectasis raises one side.
    top = {-1: 0.40 + a["dome_r"], 1: 0.46 + a["dome_l"]}
    atel = F.get("Atelectasis")
    if atel:
        top[atel["side"]] -= 0.07 * min(sig, 1.5)
    top = {s: -0.74 + (t + 0.74) * L for s, t in top.items()}
    dome_cx = {s: s * 0.42 * W for s in (-1, 1)}
    dia_side = np.where(x < 0.05 * W, -1, 1)
    ydia = np.where(
        dia_side < 0,
        top[-1] + 0.17 * ((x - dome_cx[-1]) / (0.40 * W)) ** 2,
        top[1] + 0.17 * ((x - dome_cx[1]) / (0.40 * W)) ** 2,
    )
    above = _soft(y - ydia, eps)
    abdomen = 1.0 - above

    # --- heart (apex to the image right) and mediastinum.
    hw = 0.38 * W * a["heart_w"] * (1.1 if ap else 1.0)
    hh = 0.26 * (1.06 if ap else 1.0)
    hcx = 0.10 * W
    if "Cardiomegaly" in F:
        grow = F["Cardiomegaly"]["scale"] * sig
        hcx += 0.35 * grow * hw
        hw *= 1.0 + grow
        hh *= 1.0 + 0.35 * grow
    hcy = top[1] - 0.2 * L + a["heart_y"]
    heart_d = _ellipse(x, y, hcx, hcy, hw, hh, angle=-0.3)
    heart = _soft(heart_d, eps) * above

    med_w = 0.115 * W * a["med_w"]
    knob_r = 0.06 * a["aorta"]
    if "Enlarged Cardiomediastinum" in F:
        grow = F["Enlarged Cardiomediastinum"]["scale"] * sig
        med_w *= 1.0 + grow
        knob_r *= 1.0 + 0.6 * grow
    mshift = 0.0
    if atel:
        mshift = atel["side"] * 0.03 * min(sig, 1.5) * W
    med_x = 0.015 * W + mshift
    med_width = med_w * (1.0 + 0.5 * _smoothstep((y + 0.2) / 0.5))
    med = _soft(np.abs(x - med_x) - med_width, eps) * _soft(y - hcy, eps * 4)
    knob = _soft(_ellipse(x, y, med_x + med_width * 0.9, -0.38 * L, knob_r, knob_r * 1.1), eps)
    mediast = np.maximum(np.maximum(med, knob), heart) * (1 - abdomen * 0.0)

    # --- lungs: boxy superellipses with rounded apices, cut by diaphragm and mediastinum.
    apex = -0.76
    lung_outer, pleural, lung_depth = {}, {}, {}
    for s in (-1, 1):
        cx = s * (0.44 if s < 0 else 0.45) * W + mshift * 0.5
        rx = (0.36 if s < 0 else 0.34) * W
        cy = apex + 0.5 * L
        dx = np.abs(x - cx) / rx
        dy = np.where(y < cy, (cy - y) / (0.5 * L), (y - cy) / (0.95 * L))
        q = np.where(y < cy, 2.0, 4.0)
        g = dx**2.6 + dy**q
        dist = (g ** (1 / 2.6) - 1.0) * rx
        outer = _soft(dist, eps) * above
        lung_outer[s] = outer
        pleural[s] = outer * (1 - med)
        # Lungs are thin at the edges, thickest mid-field: air depth rises inwards.
        lung_depth[s] = np.clip(-dist / (0.25 * rx), 0, 1) ** 0.5
    lungs_soft = {s: pleural[s] * (1 - heart) * (1 - knob) for s in (-1, 1)}

    # --- findings that change what is air in the pleural space.
    fluid = {s: np.zeros_like(x) for s in (-1, 1)}
    eff = F.get("Pleural Effusion")
    if eff:
        for s, h in zip(eff["sides"], eff["height"], strict=True):
            h = h * min(1.6, 0.4 + 0.6 * sig)
            level = top[s] - h * L * 0.9
            lateral = np.clip((s * x - 0.15 * W) / (0.65 * W), 0, 1)
            surface = level - 0.14 * lateral**2
            f = _soft(surface - y, 0.02) * pleural[s]
            fluid[s] = f
            cv.add_box("Pleural Effusion", (f > 0.5) & (above > 0.5))
    ptx_space = {s: np.zeros_like(x) for s in (-1, 1)}
    collapsed_edge = None
    ptx = F.get("Pneumothorax")
    if ptx:
        s = ptx["side"]
        c = ptx["size"] * min(1.6, sig)
        # Shrink the lung towards a hilar anchor: the gap is apical and lateral.
        ax_, ay_ = s * 0.2 * W, 0.05
        sx, sy = ax_ + (x - ax_) / (1 - c), ay_ + (y - ay_) / (1 - 0.7 * c)
        cx = s * (0.44 if s < 0 else 0.45) * W
        rx = (0.36 if s < 0 else 0.34) * W
        cy = apex + 0.5 * L
        dx = np.abs(sx - cx) / rx
        dy = np.where(sy < cy, (cy - sy) / (0.5 * L), (sy - cy) / (0.95 * L))
        q = np.where(sy < cy, 2.0, 4.0)
        dist_c = ((dx**2.6 + dy**q) ** (1 / 2.6) - 1.0) * rx * (1 - c)
        collapsed = _soft(dist_c, eps)
        ptx_space[s] = pleural[s] * (1 - collapsed) * (1 - heart)
        collapsed_edge = _band(dist_c, 0.7 * cv.px) * pleural[s] * (1 - heart)
        cv.add_box("Pneumothorax", ptx_space[s] > 0.5)
    thick = {s: np.zeros_like(x) for s in (-1, 1)}
    po = F.get("Pleural Other")
    if po:
        s = po["side"]
        t = po["thickness"] * min(1.5, 0.5 + 0.5 * sig)
        cx = s * 0.44 * W
        rx = 0.35 * W
        cy = apex + 0.5 * L
        dx = np.abs(x - cx) / rx
        dy = np.where(y < cy, (cy - y) / (0.5 * L), (y - cy) / (0.95 * L))
        q = np.where(y < cy, 2.0, 4.0)
        dist = ((dx**2.6 + dy**q) ** (1 / 2.6) - 1.0) * rx
        rim = _soft(dist, eps) * _soft(-dist - t, eps)
        lateral = _smoothstep((s * (x - cx)) / (0.3 * rx) + 0.3)
        if po["apical"]:
            lateral = np.maximum(lateral, _smoothstep((cy - 0.25 * L - y) / 0.1))
        thick[s] = rim * lateral * pleural[s]
        cv.add_box("Pleural Other", thick[s] > 0.5)

    # Air removed from the body by the lungs (less where fluid/thickening fills the space).
    air = np.zeros_like(x)
    for s in (-1, 1):
        filled = np.clip(fluid[s] + thick[s], 0, 1)
        air += 0.72 * lungs_soft[s] * lung_depth[s] * (1 - filled)
        air += 0.80 * ptx_space[s] * lung_depth[s] * (1 - filled)
    atten -= air * body

    # --- vessels (lung markings) radiating from the hila; edema engorges upper-zone vessels.
    edema = F.get("Edema")
    for s in (-1, 1):
        # Branches fan out over the lateral half-plane from the hilum.
        ang = rng.uniform(-1.35, 1.35, 12)
        _vessel_tree(cv, rng, s * 0.2 * W, -0.12 * L, s * np.sin(ang), -np.cos(ang) * 0.9, W)
    vessels = cv.blurred("vessels", 0.012)
    vessels = vessels / (1.0 + vessels)  # overlapping branches saturate instead of piling up
    fine = _smooth_noise(rng, size, 0.015)
    vessels = vessels + 0.15 * np.clip(fine, 0, None)
    upper = _smoothstep((-0.1 - y) / 0.4)
    vessel_gain = a["vessels"] * (1.0 + (0.8 * upper * min(sig, 1.5) if edema else 0.0))
    hila = sum(_soft(_ellipse(x, y, s * 0.19 * W, -0.1 * L, 0.07, 0.1), 0.03) for s in (-1, 1))
    lung_now = sum(lungs_soft[s] * (1 - fluid[s]) for s in (-1, 1))
    if ptx:
        lung_now = lung_now - ptx_space[ptx["side"]]
    atten += (0.3 * vessels * vessel_gain + 0.14 * hila) * np.clip(lung_now, 0, 1)

    # --- mediastinum, heart and abdomen densities; trachea and stomach air.
    atten += 0.12 * mediast + 0.10 * abdomen * body
    trachea = _soft(np.abs(x - med_x * 0.5) - 0.036, eps) * _soft(y + 0.4 * L, 0.02) * body
    atten -= 0.28 * trachea
    for s in (-1, 1):
        bron = _band(y - (-0.4 * L + 0.5 * np.abs(x - med_x * 0.5)), 0.022) * (s * x > 0)
        atten -= 0.08 * bron * (np.abs(x) < 0.16 * W) * (y > -0.45 * L)
    stomach = _soft(_ellipse(x, y, 0.38 * W, top[1] + 0.14, 0.1, 0.06), 0.015)
    atten -= 0.35 * stomach * abdomen

    # --- breast shadows (F): soft tissue over the lower zones with a curved lower margin.
    if a["breast"] > 0:
        b = a["breast"]
        for s in (-1, 1):
            d = _ellipse(x, y, s * 0.5 * W, top[s] - 0.02, 0.3 * W * b**0.5, 0.22 * b**0.5)
            dome = np.clip(-d / (0.15 * b**0.5), 0, 1) ** 0.6
            atten += 0.20 * b * dome * body

    # --- bones: spine, ribs, clavicles, scapulae (bone density falls with age).
    lvl = 0.118 * L
    phase = a["rib_phase"]
    vert = 0.75 + 0.25 * np.cos(2 * np.pi * (y - phase) / lvl) ** 2
    spine = _soft(np.abs(x - med_x * 0.3) - 0.065 * W, eps) * vert
    ped = _band(np.abs(x - med_x * 0.3) - 0.05 * W, 0.012) * (
        np.cos(2 * np.pi * (y - phase - 0.25 * lvl) / lvl) > 0.4
    )
    atten += bone * (0.30 * spine + 0.12 * ped)

    frac = F.get("Fracture")
    fracture_mask = None
    uu = np.linspace(0.0, 0.9, _curve_density(size, 0.6))
    ends = _smoothstep(uu / 0.06) * _smoothstep((0.9 - uu) / 0.06)
    ua = uu[uu > 0.35]
    for s in (-1, 1):
        for k in range(1, 11):
            yk = apex - 0.08 + (k - 1) * lvl + phase
            # Posterior rib: leaves the spine, rises slightly, then sweeps down laterally.
            yc = yk - 0.10 * uu + (0.62 + a["rib_tilt"]) * uu**2
            w = ends
            if frac and frac["side"] == s and frac["rib"] == k:
                uf = frac["u"]
                step = frac["step"] * min(sig, 1.5)
                yc = yc + step * (uu > uf)
                w = ends * (np.abs(uu - uf) > 0.015)
                u_img = (s * x - 0.06 * W) / W
                d = y - (yk - 0.10 * u_img + (0.62 + a["rib_tilt"]) * u_img**2)
                fracture_mask = (np.abs(u_img - uf) < 0.05) & (np.abs(d - step / 2) < 0.05)
            cv.polyline(np.stack([s * (0.06 * W + uu * W), yc], axis=1), w, "ribs")
            # Anterior rib: fainter, runs from the lateral wall down towards the sternum.
            ya = yk + 0.25 + 0.32 * (0.9 - ua)
            wa = 0.45 * _smoothstep((ua - 0.35) / 0.2) * _smoothstep((0.9 - ua) / 0.06)
            cv.polyline(np.stack([s * (0.06 * W + ua * W), ya], axis=1), wa, "ribs")
    ribs = cv.blurred("ribs", 0.03)
    atten += 0.11 * bone * ribs * (0.6 + 0.4 * body)
    if frac and fracture_mask is not None:
        cv.add_box("Fracture", fracture_mask)

    yc_cl = (-0.8 if ap else -0.7) * L + 0.0
    for s in (-1, 1):
        u = (s * x - 0.05 * W) / W
        ycl = yc_cl + 0.06 - 0.17 * u + (0.1 if ap else 0.16) * u**2
        clav = _band(y - ycl, 0.032) * _soft(u - 0.78, 0.02) * _soft(-u, 0.01)
        atten += 0.40 * bone * clav
        scx = s * (0.68 if ap else 0.84) * W
        scap = _soft(_ellipse(x, y, scx, -0.42 * L, 0.18 * W, 0.32, angle=s * 0.25), 0.02)
        atten += 0.10 * bone * scap * body

    # --- parenchymal findings.
    lung_mask_soft = np.clip(sum(lungs_soft.values()), 0, 1)
    for name in ("Consolidation", "Pneumonia", "Lung Opacity"):
        p = F.get(name)
        if not p:
            continue
        s = p["side"]
        cx = s * (0.12 + 0.62 * p["u"]) * W
        cy = apex + (top[s] - apex) * p["v"]
        r = p["radius"] * min(1.4, 0.6 + 0.4 * sig)
        tex = _smooth_noise(np.random.default_rng(p["texture_seed"]), size, 0.05)
        env = 1.0 - np.sqrt((x - cx) ** 2 + ((y - cy) * 0.9) ** 2) / r
        patch = _soft(-(env * 2.0 + 0.6 * tex - 0.5), 0.1) * lungs_soft[s]
        dens = p["density"] * min(sig, 1.5)
        if name != "Lung Opacity":
            # Air bronchograms: darker branching lines through the consolidated lobe.
            br = _band((x - cx) * 0.8 - (y - cy) * 0.35 * s, 0.012) * (env > 0.2)
            patch_air = 0.25 * br
        else:
            patch_air = 0.0
        atten += dens * patch * (1.0 - patch_air)
        cv.add_box(name, patch > 0.5)

    if edema:
        e = edema["extent"] * min(1.3, 0.5 + 0.5 * sig)
        haze = np.zeros_like(x)
        for s in (-1, 1):
            haze += np.exp(
                -(((x - s * 0.22 * W) / (0.24 * W * e)) ** 2) - ((y + 0.05) / (0.32 * e)) ** 2
            )
            for j in range(edema["kerley"]):
                ky = top[s] - 0.05 - 0.045 * j
                kx = s * (0.78 - 0.02 * j) * W
                haze += 0.6 * _band(y - ky, 0.008) * (np.abs(x - kx) < 0.06 * W)
        atten += 0.32 * min(sig, 1.5) * haze * lung_mask_soft

    if atel:
        s = atel["side"]
        cy = apex + (top[s] - apex) * atel["v"]
        u = (s * x) / W
        line = y - (cy + atel["tilt"] * (u - 0.45))
        band = _band(line, 0.035) * _soft(np.abs(u - 0.45) - 0.3, 0.03) * lungs_soft[s]
        wedge = _soft(_ellipse(x, y, s * 0.2 * W, top[s] - 0.06, 0.12 * W, 0.07), 0.02)
        opac = np.maximum(band, wedge * lungs_soft[s])
        atten += 0.5 * min(sig, 1.5) * opac
        cv.add_box("Atelectasis", opac > 0.5)

    les = F.get("Lung Lesion")
    if les:
        for item in les["lesions"]:
            s = item["side"]
            cx = s * (0.12 + 0.62 * item["u"]) * W
            cy = apex + 0.1 + (top[s] - apex - 0.15) * item["v"]
            r = item["radius"] * min(1.3, 0.7 + 0.3 * sig)
            ang = np.arctan2(y - cy, x - cx)
            lobe = 1.0 + sum(amp * np.cos((j + 2) * ang + j) for j, amp in enumerate(item["lobes"]))
            rr = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / (r * lobe)
            blob = _soft((rr - 1.0) * r, eps)
            dome = np.sqrt(np.clip(1.0 - rr**2, 0, 1))
            atten += 0.45 * min(sig, 1.5) * (0.5 * blob + 0.5 * dome)
            m = (blob > 0.5) & (body > 0.5)
            cv.lesion |= m
            cv.add_box("Lung Lesion", m)

    if ptx and collapsed_edge is not None:
        atten += 0.22 * min(sig, 1.5) * collapsed_edge

    # --- support devices (metal: very bright thin structures).
    dev = F.get("Support Devices")
    if dev:
        _frontal_devices(cv, dev, W, L, med_x, hcx, hcy, hw)
    atten += 0.9 * cv.blurred("wires", 0.006)

    atten = np.clip(atten, 0.0, None)
    lungs = np.zeros_like(x, dtype=bool)
    for s in (-1, 1):
        aerated = (lungs_soft[s] > 0.5) & (fluid[s] < 0.5) & (thick[s] < 0.5)
        aerated &= ptx_space[s] < 0.5
        lungs |= aerated
    heart_mask = (heart > 0.5) & (above > 0.5)
    if "Cardiomegaly" in F:
        cv.add_box("Cardiomegaly", heart_mask)
    masks = {
        "lungs": lungs.astype(np.uint8),
        "heart": heart_mask.astype(np.uint8),
        "lesion": cv.lesion.astype(np.uint8),
    }
    return atten, masks, cv.boxes


def _frontal_devices(cv: _Canvas, dev, W, L, med_x, hcx, hcy, hw) -> None:
    kinds = dev["devices"]
    if "ett" in kinds:
        tip = dev["ett_tip"] * L
        cv.curve(
            [(med_x * 0.5, -1.1), (med_x * 0.5 + 0.01, (tip - 1.1) / 2), (med_x * 0.5, tip)], 1.0
        )
        cv.curve([(med_x * 0.5 + 0.02, -1.1), (med_x * 0.5 + 0.025, tip)], 0.4)
    if "cvc" in kinds:
        s = dev["cvc_side"]
        cv.curve(
            [(s * 0.75 * W, -0.72 * L), (s * 0.3 * W, -0.62 * L), (0.02, -0.5), (-0.02, -0.22 * L)],
            0.8,
        )
    if "ngt" in kinds:
        cv.curve([(0.0, -1.1), (0.02, -0.2), (0.05, 0.3), (0.32 * W, 0.72)], 0.8)
    if "ecg" in kinds:
        for ex, ey in dev["ecg"]:
            px, py = ex * W, ey
            cv.ring(px, py, 0.035, 1.2)
            cv.curve([(px, py), (px * 1.3, py - 0.3), (np.sign(px) * 1.3, py - 0.5)], 0.35)
    if "pacer" in kinds:
        gx, gy = 0.55 * W, -0.62 * L
        xs = np.linspace(gx - 0.08, gx + 0.08, 24)
        for yy in np.linspace(gy - 0.05, gy + 0.05, 10):
            pts = np.stack([xs, np.full_like(xs, yy)], axis=1)
            cv.polyline(pts, 1.0)
        cv.curve(
            [
                (gx, gy),
                (0.15, -0.7),
                (-0.05, -0.3),
                (hcx - 0.2 * hw, hcy),
                (hcx + 0.5 * hw, hcy + 0.12),
            ],
            0.9,
        )


# --------------------------------------------------------------------------- lateral view


def _render_lateral(spec: CaseSpec, size: int) -> tuple[np.ndarray, dict[str, np.ndarray], list]:
    cv = _Canvas(spec, size)
    a, F, sig, eps, rng = spec.anatomy, spec.findings, cv.sig, cv.eps, cv.rng
    x, y = cv.x, cv.y
    D = a["width"] / 0.86  # antero-posterior depth follows body size
    L = a["lung_h"]
    bone = a["bone"]

    # Body: deeper than wide; anterior wall left, back right; neck at the top.
    front = -0.68 * D + 0.14 * _smoothstep((-0.55 - y) / 0.4)
    back = 0.86 * D - 0.12 * _smoothstep((-0.6 - y) / 0.4)
    if a["breast"] > 0:
        front = front - 0.12 * a["breast"] * np.exp(-(((y - 0.15) / 0.22) ** 2))
    mid = (front + back) / 2
    half = (back - front) / 2
    body = _soft(np.abs(x - mid) - half, eps * 2)
    prof = np.sqrt(np.clip(1.0 - ((x - mid) / (half + 1e-3)) ** 2, 0, 1))
    atten = (0.6 + 0.65 * prof) * body * a["thick"] * (1.0 + a["density"])
    # Raised arms project over the upper anterior chest.
    arms = _soft(_ellipse(x, y, -0.15 * D, -0.85, 0.45 * D, 0.28, angle=-0.4), 0.04)
    atten += 0.35 * arms

    # Diaphragm: domes lowest posteriorly (posterior costophrenic sulcus).
    dtop = -0.78 + (0.42 + a["dome_r"] + 0.78) * L
    atel = F.get("Atelectasis")
    if atel:
        dtop -= 0.05 * min(sig, 1.5)
    ydia = dtop + 0.22 * ((x + 0.1 * D) / (0.55 * D)) ** 2 + 0.08 * np.clip(x / D, 0, None)
    ydia2 = ydia + 0.05 + a["dome_l"]
    above = _soft(y - ydia, eps)
    abdomen = 1 - above

    # Heart anterior-inferior, sitting on the diaphragm.
    hw, hh = 0.33 * D * a["heart_w"], 0.27
    hcx, hcy = -0.22 * D, dtop - 0.08 * L
    if "Cardiomegaly" in F:
        grow = F["Cardiomegaly"]["scale"] * sig
        hw *= 1.0 + grow
        hh *= 1.0 + 0.3 * grow
        hcx += 0.4 * grow * 0.3 * D
    heart = _soft(_ellipse(x, y, hcx, hcy, hw, hh, angle=-0.6), eps) * above

    # Single lung field: both lungs superimposed.
    cx, cy = 0.06 * D, -0.76 + 0.5 * L
    rx = 0.60 * D
    dx = np.abs(x - cx) / rx
    dy = np.where(y < cy, (cy - y) / (0.5 * L), (y - cy) / (0.9 * L))
    q = np.where(y < cy, 2.0, 4.0)
    dist = ((dx**2.6 + dy**q) ** (1 / 2.6) - 1.0) * rx
    outer = _soft(dist, eps) * above
    depth = np.clip(-dist / (0.25 * rx), 0, 1) ** 0.5
    spine_x = 0.55 * D
    spine = _soft(np.abs(x - spine_x) - 0.09 * D, eps)
    lung = outer * (1 - heart)

    fluid = np.zeros_like(x)
    eff = F.get("Pleural Effusion")
    if eff:
        h = max(eff["height"]) * min(1.6, 0.4 + 0.6 * sig)
        surface = dtop + 0.05 - h * 0.7 * L - 0.18 * np.clip(x / rx, 0, 1) ** 2
        fluid = _soft(surface - y, 0.02) * outer * (1 - spine)
        cv.add_box("Pleural Effusion", (fluid > 0.5) & (above > 0.5))
    ptx_space = np.zeros_like(x)
    ptx = F.get("Pneumothorax")
    if ptx:
        c = ptx["size"] * min(1.6, sig)
        ptx_space = outer * _soft(y - (cy - 0.5 * L + c * 0.9 * L), 0.02) * (1 - heart)
        cv.add_box("Pneumothorax", ptx_space > 0.5)
    thick = np.zeros_like(x)
    po = F.get("Pleural Other")
    if po:
        t = po["thickness"] * min(1.5, 0.5 + 0.5 * sig)
        thick = outer * _soft(-dist - t, eps) * _smoothstep((x - cx) / (0.3 * rx))
        cv.add_box("Pleural Other", thick > 0.5)

    filled = np.clip(fluid + thick, 0, 1)
    air = 0.8 * lung * depth * (1 - filled) + 0.25 * ptx_space * depth * (1 - filled)
    atten -= air * body

    # Markings around the hilum; trachea; aorta; sternum; retrosternal space.
    hx, hy = 0.05 * D, -0.12 * L
    ang = rng.uniform(0, 2 * np.pi, 14)
    _vessel_tree(cv, rng, hx, hy, np.cos(ang), np.sin(ang), 0.9)
    vessels = cv.blurred("vessels", 0.014)
    vessels = vessels / (1.0 + vessels) + 0.15 * np.clip(_smooth_noise(rng, size, 0.02), 0, None)
    hilum = _soft(_ellipse(x, y, hx, hy, 0.1, 0.12), 0.03)
    lung_now = np.clip(lung * (1 - fluid) - ptx_space, 0, 1)
    edema = F.get("Edema")
    gain = a["vessels"] * (1.5 if edema else 1.0)
    atten += (0.2 * vessels * gain + 0.14 * hilum) * lung_now

    trachea_x = -0.05 * D + 0.12 * (y + 1.0) * D * 0.5
    trachea = _soft(np.abs(x - trachea_x) - 0.035, eps) * _soft(y - hy, 0.03) * body
    atten -= 0.16 * trachea
    cv_aorta = np.zeros_like(x)
    pts = _bezier([(-0.1 * D, hcy - hh), (-0.05 * D, -0.75), (0.45 * D, -0.6), (0.42 * D, 0.6)], 80)
    for px_, py_ in pts[::4]:
        cv_aorta = np.maximum(cv_aorta, _soft(np.hypot(x - px_, y - py_) - 0.06 * a["aorta"], 0.02))
    atten += 0.10 * cv_aorta * above

    retro = _soft(_ellipse(x, y, -0.45 * D, -0.3, 0.14 * D, 0.25), 0.03) * above
    if "Enlarged Cardiomediastinum" in F:
        grow = F["Enlarged Cardiomediastinum"]["scale"] * sig
        atten += 0.35 * min(grow, 1.2) * retro
    atten += 0.12 * heart + 0.10 * abdomen * body
    sternum_x = front + 0.04
    sternum = _band(x - sternum_x, 0.022) * _soft(np.abs(y + 0.2) - 0.45, 0.02)
    atten += 0.25 * bone * sternum

    # Spine: vertebral bodies with disc spaces; posterior elements behind.
    lvl = 0.12 * L
    vert = _soft(np.abs(((y - a["rib_phase"]) % lvl) - lvl / 2) - 0.42 * lvl, 0.006)
    atten += bone * (0.34 * spine * vert + 0.08 * spine)
    post = _soft(np.abs(x - (spine_x + 0.15 * D)) - 0.04 * D, 0.01) * body
    atten += 0.10 * bone * post

    # Posterior ribs: oblique bands near the back, two sides slightly offset (magnification).
    ribs = np.zeros_like(x)
    frac = F.get("Fracture")
    for side_off in (0.0, 0.025):
        for k in range(10):
            yk = -0.7 + k * lvl + side_off + a["rib_phase"]
            d = y - (yk + 0.5 * (x - 0.55 * D) ** 2 - 0.25 * (x - 0.55 * D))
            span = _soft(np.abs(x - 0.35 * D) - 0.4 * D, 0.03)
            gap = 1.0
            if frac and side_off == 0.0 and frac["rib"] == k:
                xf = 0.55 * D - frac["u"] * 0.6 * D
                gap = 1.0 - np.exp(-(((x - xf) / 0.025) ** 2))
                m = (np.abs(x - xf) < 0.05) & (np.abs(d) < 0.04) & (span > 0.5)
                cv.add_box("Fracture", m)
            ribs += _band(d, 0.022) * span * gap
    atten += 0.07 * bone * ribs

    # Parenchymal findings inside the single lung field.
    for name in ("Consolidation", "Pneumonia", "Lung Opacity"):
        p = F.get(name)
        if not p:
            continue
        pcx = cx + (p["u"] - 0.5) * 1.2 * rx
        pcy = -0.6 + (dtop + 0.6) * p["v"]
        r = p["radius"] * min(1.4, 0.6 + 0.4 * sig)
        tex = _smooth_noise(np.random.default_rng(p["texture_seed"]), size, 0.05)
        env = 1.0 - np.hypot(x - pcx, y - pcy) / r
        patch = _soft(-(env * 2.0 + 0.6 * tex - 0.5), 0.1) * lung
        atten += p["density"] * min(sig, 1.5) * patch
        cv.add_box(name, patch > 0.5)
    if edema:
        haze = np.exp(-(((x - hx) / 0.35) ** 2) - ((y - hy) / 0.4) ** 2)
        atten += 0.3 * min(sig, 1.5) * edema["extent"] * haze * lung
    if atel:
        band = _band(y - (dtop - 0.12 + 0.2 * (x - cx)), 0.03) * lung
        atten += 0.45 * min(sig, 1.5) * band
        cv.add_box("Atelectasis", band > 0.5)
    les = F.get("Lung Lesion")
    if les:
        for item in les["lesions"]:
            lcx = cx + (item["u"] - 0.5) * 1.2 * rx
            lcy = -0.55 + (dtop + 0.45) * item["v"]
            r = item["radius"] * min(1.3, 0.7 + 0.3 * sig)
            rr = np.hypot(x - lcx, y - lcy) / r
            blob = _soft((rr - 1.0) * r, eps)
            atten += 0.45 * min(sig, 1.5) * (0.5 * blob + 0.5 * np.sqrt(np.clip(1 - rr**2, 0, 1)))
            m = (blob > 0.5) & (body > 0.5)
            cv.lesion |= m
            cv.add_box("Lung Lesion", m)

    dev = F.get("Support Devices")
    if dev:
        kinds = dev["devices"]
        if "ett" in kinds or "ngt" in kinds:
            tx = float(-0.05 * D + 0.12 * 0.6 * D * 0.5)
            cv.curve([(-0.1 * D, -1.1), (tx, -0.7), (tx + 0.05, dev["ett_tip"] * L)], 1.0)
        if "cvc" in kinds:
            cv.curve([(-0.3 * D, -0.9), (-0.15 * D, -0.6), (-0.05 * D, -0.3 * L)], 0.8)
        if "ecg" in kinds:
            for ex, ey in dev["ecg"]:
                cv.ring(float(front.mean()) + 0.05 + 0.1 * abs(ex), ey, 0.035, 1.2)
        if "pacer" in kinds:
            cv.curve([(-0.5 * D, -0.6), (-0.3 * D, -0.3), (hcx, hcy + 0.1)], 0.9)
    atten += 0.9 * cv.blurred("wires", 0.006)
    atten = np.clip(atten, 0.0, None)

    lungs = (lung > 0.5) & (fluid < 0.5) & (thick < 0.5) & (ptx_space < 0.5)
    heart_mask = (heart > 0.5) & (above > 0.5)
    if "Cardiomegaly" in F:
        cv.add_box("Cardiomegaly", heart_mask)
    # Second dome edge: a faint line where the other hemidiaphragm lies.
    atten += 0.05 * _band(y - ydia2, 0.01) * body * (x > -0.3 * D)
    masks = {
        "lungs": lungs.astype(np.uint8),
        "heart": heart_mask.astype(np.uint8),
        "lesion": cv.lesion.astype(np.uint8),
    }
    return atten, masks, cv.boxes


# --------------------------------------------------------------------------- exposure


def _expose(atten: np.ndarray, spec: CaseSpec, size: int, site: Mapping[str, Any]) -> np.ndarray:
    """Map attenuation to display values in [0, 1] with the site's acquisition effects."""
    rng = np.random.default_rng([spec.seed, 1])
    img = 1.0 - np.exp(-_ATTEN_K * atten)
    lo, hi = _WINDOW
    img = (img - lo) / (hi - lo)
    contrast = float(site["contrast"]) * (float(site["ap_contrast"]) if spec.view == "AP" else 1.0)
    img = 0.5 + (img - 0.5) * contrast + float(site["brightness"])
    img = np.clip(img, 0.0, 1.0) ** float(site["gamma"])
    blur = float(site["blur"]) * size / 128.0
    if blur > 0.05:
        img = ndimage.gaussian_filter(img, blur)
    noise = float(site["noise"]) * (float(site["ap_noise"]) if spec.view == "AP" else 1.0)
    if noise > 0:
        grain = ndimage.gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), 0.6)
        grain /= float(grain.std()) or 1.0
        # Quantum noise is stronger where fewer photons arrive (bright, attenuating regions).
        img = img + noise * (0.5 + img) * grain
    if site.get("marker", True):
        m = max(2, size // 24)
        r0, c0 = max(1, size // 20), size - max(1, size // 20) - 2 * m
        glyph = np.zeros((2 * m, 2 * m), dtype=bool)
        glyph[:, : max(1, m // 2)] = True  # an "L"-shaped side marker
        glyph[-max(1, m // 2) :, :] = True
        img[r0 : r0 + 2 * m, c0 : c0 + 2 * m][glyph] = 0.97
    border = float(site["border"])
    if border > 0:
        b = max(1, round(border * size))
        value = float(site["border_value"])
        img[:b, :] = value
        img[-b:, :] = value
        img[:, :b] = value
        img[:, -b:] = value
    return np.clip(img, 0.0, 1.0)


def _quantise(img: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return np.round(img * 255.0).astype(np.uint8)
    if not 8 < bits <= 16:
        raise ValueError(f"phantom site: bits must be 8..16, got {bits}")
    return np.round(img * float(2**bits - 1)).astype(np.uint16)


def render_case(
    spec: CaseSpec, size: int = 128, site: Mapping[str, Any] | None = None
) -> PhantomCase:
    """Render ``spec`` as a ``size`` x ``size`` radiograph for acquisition ``site``.

    ``site`` overrides :data:`DEFAULT_SITE` keys (see there); a source's preset is in
    :data:`SITE_PRESETS`. Returns a :class:`PhantomCase`; the image is uint8 for ``bits == 8``
    and uint16 otherwise. Same (spec, size, site) -> identical arrays.
    """
    if size < 16:
        raise ValueError(f"phantom: size must be at least 16 px, got {size}")
    site_cfg = {**DEFAULT_SITE, **(site or {})}
    unknown = set(site_cfg) - set(DEFAULT_SITE)
    if unknown:
        raise ValueError(f"phantom site: unknown keys {sorted(unknown)}")
    if spec.view == "LATERAL":
        atten, masks, boxes = _render_lateral(spec, size)
    elif spec.view in ("PA", "AP"):
        atten, masks, boxes = _render_frontal(spec, size)
    else:
        raise ValueError(f"phantom: cannot render view {spec.view!r}")
    img = _expose(atten.astype(np.float32), spec, size, site_cfg)
    return PhantomCase(
        image=_quantise(img, int(site_cfg["bits"])),
        masks=masks,
        boxes=boxes,
        labels=dict(spec.labels),
        reported_labels=dict(spec.reported_labels),
        view=spec.view,
        sex=spec.sex,
        age=spec.age,
        race=spec.race,
        spec=spec,
    )


def generate_cases(
    n: int,
    *,
    seed: int,
    cfg: Mapping[str, Any] | None = None,
    size: int = 128,
    site: Mapping[str, Any] | None = None,
) -> list[PhantomCase]:
    """Sample and render ``n`` independent cases from one seed (handy for tests and grids)."""
    rng = np.random.default_rng(seed)
    return [render_case(sample_case(rng, cfg), size, site) for _ in range(n)]


def contact_sheet(images: Sequence[np.ndarray], ncols: int = 4, pad: int = 2) -> np.ndarray:
    """Tile equally sized 2-D images (uint8 or uint16) into one uint8 grid for viewing."""
    if not images:
        raise ValueError("contact_sheet: no images")
    h, w = images[0].shape
    nrows = math.ceil(len(images) / ncols)
    sheet = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad), dtype=np.uint8)
    for i, im in enumerate(images):
        if im.shape != (h, w):
            raise ValueError(f"contact_sheet: image {i} has shape {im.shape}, expected {(h, w)}")
        im8 = (
            im
            if im.dtype == np.uint8
            else (im.astype(np.float64) / im.max() * 255).astype(np.uint8)
        )
        r, c = divmod(i, ncols)
        sheet[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + c * (w + pad) : pad + c * (w + pad) + w,
        ] = im8
    return sheet


def encode_png(array: np.ndarray) -> bytes:
    """Encode a 2-D uint8/uint16 array as PNG bytes (no metadata, so bytes are reproducible)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
