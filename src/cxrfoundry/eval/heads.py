"""Downstream heads on any ViT backbone the pipeline produces, their metrics and mask readers.

* :func:`load_backbone` — a Hugging Face folder / hub id (DINO backbone, CLIP image tower: any
  ``AutoModel`` ViT such as ``Dinov2WithRegistersModel``, ``Dinov2Model``, ``ViTModel``,
  ``CLIPVisionModel``) or a config mapping for a randomly initialised DINO backbone (the
  baseline with the same architecture).
* :class:`BackboneFeatures` — CLS tokens of the last blocks (layer-normed) and the last block's
  patch tokens on their grid; registers are skipped.
* :class:`ClassificationModel` — CXformer's head: concat(CLS of the last 4 blocks, mean of the
  last block's patch tokens) → one linear layer; trained with BCE.
* :class:`SegmentationModel` — a linear 1×1 layer on the patch grid, bilinearly upsampled; one
  channel per structure (structures may overlap, as lungs and heart do in CheXmask), trained with
  per-structure binary cross-entropy + soft Dice.
* Metrics: per-finding AUROC and per-structure Dice with bootstrap confidence intervals.
* :func:`decode_rle` / :func:`encode_rle` — CheXmask-style run-length masks.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def load_backbone(source: str | Path | Mapping[str, Any], *, seed: int | None = None) -> nn.Module:
    """A ViT backbone: ``AutoModel.from_pretrained(source)`` or a random DINO backbone.

    A mapping is a :func:`cxrfoundry.models.dino.build_backbone` config (random init when it has
    no ``pretrained``). A full CLIP model folder is refused with a hint to pass its vision tower.
    """
    if isinstance(source, Mapping):
        from cxrfoundry.models.dino import build_backbone

        return build_backbone(source, seed=seed)
    from transformers import AutoConfig, AutoModel

    path = str(source)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "vision_config") and not hasattr(config, "hidden_size"):
        raise ValueError(f"{path}: a two-tower model; pass the folder of its image tower instead")
    if seed is not None:
        torch.manual_seed(int(seed))
    try:
        return AutoModel.from_pretrained(path, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_pretrained(path)


def _as_int(value: Any) -> int:
    return int(value[0] if isinstance(value, Sequence) else value)


class BackboneFeatures(nn.Module):
    """Uniform feature access over Hugging Face ViTs (DINOv2 ± registers, ViT, CLIP vision)."""

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 4) -> None:
        super().__init__()
        self.backbone = backbone
        config = backbone.config
        self.hidden_size = int(config.hidden_size)
        self.patch_size = _as_int(config.patch_size)
        self.n_prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.n_last_blocks = min(int(n_last_blocks), int(config.num_hidden_layers))
        vision = getattr(backbone, "vision_model", backbone)
        norm = getattr(backbone, "layernorm", None) or getattr(vision, "post_layernorm", None)
        self.final_norm: nn.Module = norm if norm is not None else nn.Identity()
        params = inspect.signature(backbone.forward).parameters
        self._extra = (
            {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in params else {}
        )

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``(cls (B, n_last, D), patches (B, h*w, D), (h, w))``, all layer-normed."""
        out = self.backbone(pixel_values=pixels, output_hidden_states=True, **self._extra)
        blocks = [self.final_norm(h) for h in out.hidden_states[-self.n_last_blocks :]]
        cls = torch.stack([h[:, 0] for h in blocks], dim=1)
        patches = blocks[-1][:, self.n_prefix :]
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        if patches.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                f"backbone returned {patches.shape[1]} patch tokens for a {grid} grid "
                f"(input {tuple(pixels.shape[-2:])}, patch {self.patch_size})"
            )
        return cls, patches, grid


class ClassificationModel(nn.Module):
    """concat(CLS of the last ``n_last_blocks`` blocks, mean patch token) → linear logits."""

    def __init__(self, backbone: nn.Module, n_classes: int, n_last_blocks: int = 4) -> None:
        super().__init__()
        self.features = BackboneFeatures(backbone, n_last_blocks)
        width = self.features.hidden_size * (self.features.n_last_blocks + 1)
        self.head = nn.Linear(width, n_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The head's input ``(B, (n_last + 1) * D)``."""
        cls, patches, _ = self.features(pixels)
        return torch.cat([cls.flatten(1), patches.mean(dim=1)], dim=1)

    def decode(self, embedding: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits ``(B, n_classes)`` from :meth:`embed` output (``size`` is unused)."""
        return self.head(embedding)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)``."""
        return self.decode(self.embed(pixels))


class SegmentationModel(nn.Module):
    """Linear 1×1 layer on the last block's patch grid, upsampled to the input size."""

    def __init__(self, backbone: nn.Module, n_structures: int) -> None:
        super().__init__()
        self.features = BackboneFeatures(backbone, n_last_blocks=1)
        self.head = nn.Conv2d(self.features.hidden_size, n_structures, kernel_size=1)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch features on their grid ``(B, D, h, w)``."""
        _, patches, (h, w) = self.features(pixels)
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)

    def decode(self, embedding: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits ``(B, n_structures, *size)`` from :meth:`embed` output."""
        logits = self.head(embedding)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_structures, H, W)``."""
        return self.decode(self.embed(pixels), tuple(pixels.shape[-2:]))


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0, eps: float = 1.0
) -> torch.Tensor:
    """Per-structure BCE + ``dice_weight`` × (1 - soft Dice), averaged over structures."""
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), target)
    probs = torch.sigmoid(logits.float())
    inter = (probs * target).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3))
    dice = (2 * inter + eps) / (total + eps)
    return bce + dice_weight * (1 - dice).mean()


def dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice ``(B, S)`` of bool masks ``(B, S, H, W)``; 1 where both are empty."""
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).sum(dim=(2, 3)).double()
    total = pred.sum(dim=(2, 3)).double() + target.sum(dim=(2, 3)).double()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def auroc_per_class(
    scores: np.ndarray, labels: np.ndarray, valid: np.ndarray | None = None
) -> list[float | None]:
    """AUROC of each column; None where the valid labels are all one class."""
    from sklearn.metrics import roc_auc_score

    valid = np.ones_like(labels, dtype=bool) if valid is None else valid.astype(bool)
    out: list[float | None] = []
    for j in range(labels.shape[1]):
        y, s = labels[valid[:, j], j], scores[valid[:, j], j]
        out.append(float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else None)
    return out


def mean_auroc(scores: np.ndarray, labels: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Mean AUROC over the classes where it is defined (nan if none is)."""
    values = [v for v in auroc_per_class(scores, labels, valid) if v is not None]
    return float(np.mean(values)) if values else float("nan")


def bootstrap_replicates(statistic, n: int, *, n_boot: int = 200, seed: int = 0) -> list:
    """``statistic(indices)`` on ``n_boot`` resamples of ``range(n)`` (None where not finite).

    The resamples depend only on ``(n, n_boot, seed)``: two models scored on the same test set
    with the same seed get the same resamples, so their replicates pair up (:func:`paired_ci`).
    """
    if n_boot <= 0 or n < 2:
        return []
    rng = np.random.default_rng(seed)
    out: list[float | None] = []
    for _ in range(n_boot):
        value = statistic(rng.integers(0, n, n))
        out.append(float(value) if value is not None and np.isfinite(value) else None)
    return out


def percentile_ci(
    replicates: Sequence[float | None], alpha: float = 0.05
) -> tuple[float | None, float | None]:
    """Percentile CI of bootstrap replicates, skipping None; (None, None) without any."""
    values = [v for v in replicates if v is not None]
    if not values:
        return None, None
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    statistic, n: int, *, n_boot: int = 200, seed: int = 0, alpha: float = 0.05
) -> tuple[float | None, float | None]:
    """Percentile CI of ``statistic(indices)`` over ``n_boot`` resamples of ``range(n)``."""
    return percentile_ci(bootstrap_replicates(statistic, n, n_boot=n_boot, seed=seed), alpha)


def paired_ci(
    a: Sequence[float | None], b: Sequence[float | None], alpha: float = 0.05
) -> tuple[float | None, float | None]:
    """Percentile CI of ``a - b`` over paired bootstrap replicates (same resamples, same order).

    Pairing removes the test-set sampling noise the two models share, so a consistent gain shows
    even where the two unpaired CIs overlap. Raises ``ValueError`` if the lengths differ.
    """
    if len(a) != len(b):
        raise ValueError(f"unpaired bootstrap replicates: {len(a)} vs {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    return percentile_ci(diffs, alpha)


def decode_rle(rle: str, height: int, width: int) -> np.ndarray:
    """CheXmask run-length encoding → uint8 0/1 mask ``(height, width)``.

    ``rle`` is ``"start length start length ..."`` with 1-based starts over the row-major
    flattened image. Raises ``ValueError`` for odd token counts or runs outside the image.
    """
    tokens = rle.split()
    if len(tokens) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(tokens)})")
    try:
        runs = np.asarray(tokens, dtype=np.int64).reshape(-1, 2)
    except ValueError as exc:
        raise ValueError(f"RLE has a non-integer value ({exc})") from exc
    flat = np.zeros(height * width, dtype=np.uint8)
    for start, length in runs:
        if start < 1 or length < 0 or start - 1 + length > flat.size:
            raise ValueError(f"RLE run ({start}, {length}) is outside a {height}x{width} image")
        flat[start - 1 : start - 1 + length] = 1
    return flat.reshape(height, width)


def encode_rle(mask: np.ndarray) -> str:
    """Inverse of :func:`decode_rle` for a 2-D 0/1 mask."""
    flat = np.concatenate([[0], mask.reshape(-1).astype(bool).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[::2], edges[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts, ends, strict=True))
