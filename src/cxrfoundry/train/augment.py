"""Chest X-ray augmentations and multi-crop for DINO, in pure torch (no torchvision).

Every random draw comes from a ``torch.Generator`` passed in by the caller, so a crop set is a
pure function of (image, seed): data loading is reproducible, rank-independent under DDP and
exactly resumable.

The pipeline for one image (CXformer recipe): histogram equalisation of the grayscale image, then
per crop one ``grid_sample`` that applies random resized crop, horizontal flip and an affine
transform (rotation ±20°, translation ±10 %, scale 0.8–1.2) together; then brightness/contrast
jitter, Gaussian blur and solarisation; finally replication to three channels and normalisation.
iBOT block masks are drawn per global crop with :class:`BlockMasking`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cxrfoundry.data import imaging

#: Per-channel normalisation (ImageNet statistics, as the DINOv2 checkpoints expect).
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


def decode_image(data: bytes, *, name: str = "<bytes>") -> torch.Tensor:
    """Decode PNG/JPEG bytes to a ``(H, W)`` integer tensor (uint8, or int32 for 16-bit)."""
    array = imaging.decode_image(data, name=name)
    if array.dtype == np.uint8:
        return torch.from_numpy(array.copy())
    return torch.from_numpy(array.astype(np.int32))


def equalize_histogram(image: torch.Tensor, levels: int | None = None) -> torch.Tensor:
    """Histogram-equalise an integer grayscale image; returns float values in [0, 1].

    ``levels`` defaults to 256 for uint8 input and 65536 otherwise (16-bit images).
    """
    if image.is_floating_point():
        raise TypeError("equalize_histogram expects integer pixel values")
    if levels is None:
        levels = 256 if image.dtype == torch.uint8 else 65536
    flat = image.reshape(-1).long().clamp_(0, levels - 1)
    cdf = torch.bincount(flat, minlength=levels).cumsum(0).double()
    first = cdf[cdf > 0][0]
    span = cdf[-1] - first
    if span <= 0:  # a constant image has nothing to equalise
        return torch.zeros(image.shape, dtype=torch.float32)
    lut = ((cdf - first) / span).clamp_(0, 1).float()
    return lut[flat].reshape(image.shape)


def to_unit_float(image: torch.Tensor) -> torch.Tensor:
    """Integer pixels to float in [0, 1] by the dtype's range (8- or 16-bit)."""
    if image.is_floating_point():
        return image.float()
    top = 255.0 if image.dtype == torch.uint8 else 65535.0
    return image.float() / top


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _chance(generator: torch.Generator, p: float) -> bool:
    return p > 0 and torch.rand((), generator=generator).item() < p


@dataclass(frozen=True)
class CropSpec:
    """How one kind of crop (global or local) is made."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0


@dataclass(frozen=True)
class AugmentConfig:
    """Multi-crop and augmentation settings (config block ``dino.augment``)."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    affine_p: float = 0.8
    rotate_deg: float = 20.0
    translate: float = 0.1
    affine_scale: tuple[float, float] = (0.8, 1.2)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    # Blur probabilities: first global crop, second global crop, local crops (DINO defaults).
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # Solarisation on the second global crop only, as in DINO.
    solarize_p: float = 0.2
    solarize_threshold: float = 0.5
    equalize: bool = True
    mean: tuple[float, float, float] = DEFAULT_MEAN
    std: tuple[float, float, float] = DEFAULT_STD

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> AugmentConfig:
        """Build from a config mapping; unknown keys raise ``ValueError`` naming them."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown augment keys {unknown}; expected some of {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def crop_specs(self) -> list[CropSpec]:
        """Specs of the two global crops followed by the ``n_local`` local crops."""
        first = CropSpec(self.global_size, self.global_scale, self.blur_p[0])
        second = CropSpec(self.global_size, self.global_scale, self.blur_p[1], self.solarize_p)
        local = CropSpec(self.local_size, self.local_scale, self.blur_p[2])
        return [first, second] + [local] * self.n_local


def crop_affine(
    generator: torch.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    cfg: AugmentConfig,
) -> torch.Tensor:
    """The ``(2, 3)`` ``affine_grid`` matrix of one random resized crop + flip + affine.

    Works in pixel units centred on the image so rotation keeps angles on non-square images,
    then converts to the normalised [-1, 1] coordinates ``grid_sample`` uses.
    """
    area = height * width
    crop_w, crop_h = float(width), float(height)
    for _ in range(10):  # torchvision's rejection sampling of the crop box
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, math.log(ratio[0]), math.log(ratio[1])))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            crop_w, crop_h = w, h
            break
    cx = _uniform(generator, -(width - crop_w) / 2, (width - crop_w) / 2)
    cy = _uniform(generator, -(height - crop_h) / 2, (height - crop_h) / 2)
    flip = -1.0 if _chance(generator, cfg.flip_p) else 1.0
    # Output pixel (u in [-1, 1]) -> point of the augmented full image, in centred pixels.
    crop = torch.tensor(
        [[flip * crop_w / 2, 0.0, cx], [0.0, crop_h / 2, cy], [0.0, 0.0, 1.0]], dtype=torch.float64
    )
    if _chance(generator, cfg.affine_p):
        angle = math.radians(_uniform(generator, -cfg.rotate_deg, cfg.rotate_deg))
        zoom = _uniform(generator, *cfg.affine_scale)
        tx = _uniform(generator, -cfg.translate, cfg.translate) * width
        ty = _uniform(generator, -cfg.translate, cfg.translate) * height
        # The augmented image is I'(p) = I(A^-1 (p - t)) with A = zoom * R(angle).
        cos, sin = math.cos(angle), math.sin(angle)
        forward = torch.tensor(
            [[zoom * cos, -zoom * sin, tx], [zoom * sin, zoom * cos, ty], [0.0, 0.0, 1.0]],
            dtype=torch.float64,
        )
        crop = torch.linalg.inv(forward) @ crop
    to_unit = torch.diag(torch.tensor([2.0 / width, 2.0 / height, 1.0], dtype=torch.float64))
    return (to_unit @ crop)[:2].float()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``(C, H, W)`` image (reflect padding)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = image.shape[0]
    radius = min(radius, image.shape[-1] - 1, image.shape[-2] - 1)
    kernel = kernel[kernel.numel() // 2 - radius : kernel.numel() // 2 + radius + 1]
    kernel = kernel / kernel.sum()
    batch = image.unsqueeze(0)
    batch = F.pad(batch, (radius, radius, 0, 0), mode="reflect")
    batch = F.conv2d(batch, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    batch = F.pad(batch, (0, 0, radius, radius), mode="reflect")
    batch = F.conv2d(batch, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return batch[0]


def normalize(image: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Grayscale ``(1, H, W)`` or ``(H, W)`` in [0, 1] → normalised ``(3, H, W)``."""
    if image.dim() == 2:
        image = image.unsqueeze(0)
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)
    return (image.expand(3, -1, -1) - mean) / std


def make_crop(
    image: torch.Tensor, spec: CropSpec, cfg: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """One augmented crop ``(3, size, size)`` of a float ``(H, W)`` image in [0, 1]."""
    height, width = image.shape
    theta = crop_affine(generator, height, width, spec.scale, cfg.ratio, cfg)
    grid = F.affine_grid(theta.unsqueeze(0), [1, 1, spec.size, spec.size], align_corners=False)
    crop = F.grid_sample(
        image.view(1, 1, height, width), grid, mode="bilinear", align_corners=False
    )[0]
    if _chance(generator, cfg.jitter_p):
        b = _uniform(generator, 1 - cfg.brightness, 1 + cfg.brightness)
        c = _uniform(generator, 1 - cfg.contrast, 1 + cfg.contrast)
        # Random order of the two adjustments, as torchvision's ColorJitter does.
        if _chance(generator, 0.5):
            crop = (crop * b).clamp(0, 1)
            crop = ((crop - crop.mean()) * c + crop.mean()).clamp(0, 1)
        else:
            crop = ((crop - crop.mean()) * c + crop.mean()).clamp(0, 1)
            crop = (crop * b).clamp(0, 1)
    if _chance(generator, spec.blur_p):
        # Sigma range is set for 224-px crops; scale it so small demo crops blur alike.
        sigma = _uniform(generator, *cfg.blur_sigma) * spec.size / 224
        if sigma > 0.05:
            crop = gaussian_blur(crop, sigma)
    if _chance(generator, spec.solarize_p):
        crop = torch.where(crop >= cfg.solarize_threshold, 1 - crop, crop)
    return normalize(crop, cfg)


def prepare(image: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Integer ``(H, W)`` image → float [0, 1], histogram-equalised when ``cfg.equalize``."""
    return equalize_histogram(image) if cfg.equalize else to_unit_float(image)


def multi_crop(
    image: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global crops ``(2, 3, G, G)`` and local crops ``(n_local, 3, L, L)`` of one image."""
    base = prepare(image, cfg)
    crops = [make_crop(base, spec, cfg, generator) for spec in cfg.crop_specs()]
    local = (
        torch.stack(crops[2:]) if cfg.n_local else torch.empty(0, 3, cfg.local_size, cfg.local_size)
    )
    return torch.stack(crops[:2]), local


@dataclass(frozen=True)
class BlockMasking:
    """iBOT/BEiT block-wise masking of a ``grid`` of patches.

    With probability ``probability`` an image is masked; its target ratio is drawn from
    ``ratio``; rectangles with aspect in ``[aspect, 1/aspect]`` and at least ``min_patches``
    patches are added until the target is reached (or no block fits).
    """

    grid: tuple[int, int]
    probability: float = 0.5
    ratio: tuple[float, float] = (0.1, 0.5)
    min_patches: int = 4
    aspect: float = 0.3
    max_tries: int = 10

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        """A bool mask of shape ``(h * w,)``."""
        h, w = self.grid
        mask = torch.zeros(h, w, dtype=torch.bool)
        if not _chance(generator, self.probability):
            return mask.reshape(-1)
        target = round(_uniform(generator, *self.ratio) * h * w)
        target = min(target, h * w)
        log_aspect = (math.log(self.aspect), math.log(1 / self.aspect))
        while int(mask.sum()) < target:
            added = False
            for _ in range(self.max_tries):
                remaining = target - int(mask.sum())
                low = min(self.min_patches, remaining)
                area = _uniform(generator, low, remaining)
                aspect = math.exp(_uniform(generator, *log_aspect))
                bh = round(math.sqrt(area * aspect))
                bw = round(math.sqrt(area / aspect))
                if not (1 <= bh <= h and 1 <= bw <= w):
                    continue
                top = int(torch.randint(0, h - bh + 1, (), generator=generator))
                left = int(torch.randint(0, w - bw + 1, (), generator=generator))
                block = mask[top : top + bh, left : left + bw]
                new = int((~block).sum())
                if 0 < new <= remaining:
                    block.fill_(True)
                    added = True
                    break
            if not added:
                break
        return mask.reshape(-1)


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A ``torch.Generator`` seeded from ``seed`` and integer ``keys`` (e.g. epoch, index)."""
    entropy = np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(entropy[0] >> np.uint64(1)))


@dataclass
class DinoTransform:
    """Image bytes + (epoch, index) → multi-crop views and iBOT masks (deterministic)."""

    cfg: AugmentConfig
    patch_size: int
    seed: int
    masking: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        side = self.cfg.global_size // self.patch_size
        self.mask_generator = BlockMasking(grid=(side, side), **self.masking)

    @property
    def n_patches(self) -> int:
        """Patches per global crop."""
        return (self.cfg.global_size // self.patch_size) ** 2

    def __call__(
        self, data: bytes, epoch: int, index: int, name: str = "<bytes>"
    ) -> dict[str, torch.Tensor]:
        """Crops and masks of one sample, from its own seeded generator."""
        generator = sample_generator(self.seed, epoch, index)
        global_crops, local_crops = multi_crop(decode_image(data, name=name), self.cfg, generator)
        masks = torch.stack([self.mask_generator(generator) for _ in range(2)])
        return {"global_crops": global_crops, "local_crops": local_crops, "masks": masks}


def collate_crops(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples crop-major: ``(n_crops * B, ...)`` with crop 0 of every sample first."""
    out = {}
    for key in ("global_crops", "local_crops", "masks"):
        stacked = torch.stack([s[key] for s in samples])  # (B, n_crops, ...)
        out[key] = stacked.transpose(0, 1).reshape(-1, *stacked.shape[2:])
    return out
