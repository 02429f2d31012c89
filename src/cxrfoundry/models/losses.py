"""Contrastive losses with features gathered across ranks.

Every rank gathers the image and text embeddings of the whole global batch with
``torch.distributed.nn.functional.all_gather`` (whose backward sums the incoming gradients and
returns each rank its own slice) and computes the *same* full-batch loss. Each rank's backward
then yields ``world_size`` times the gradient of the global loss with respect to its local
embeddings, and DDP's gradient averaging divides that factor away: parameter gradients equal
those of one process on the whole batch (tested in tests/unit/test_clip_ddp.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank in rank order, keeping gradients to the local slice."""
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (no gradient); for indices, weights and bookkeeping."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over already-gathered, L2-normalised ``image``/``text`` (N, D) pairs.

    ``weights`` (N,), optional: per-pair weights of the cross-entropy terms (a 0/1 mask keeps
    only the selected pairs *as anchors*; use :func:`select` to also drop them as negatives).
    The loss is the weighted mean of the image->text and text->image cross-entropies.
    """
    if image.shape != text.shape:
        raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} differ")
    logits = scale * image @ text.t()
    target = torch.arange(image.shape[0], device=image.device)
    per_i = F.cross_entropy(logits, target, reduction="none")
    per_t = F.cross_entropy(logits.t(), target, reduction="none")
    per_pair = 0.5 * (per_i + per_t)
    if weights is None:
        return per_pair.mean()
    weights = weights.to(per_pair.dtype)
    total = weights.sum()
    if total <= 0:
        raise ValueError("clip_loss: every weight is zero")
    return (per_pair * weights).sum() / total


def gathered_clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    keep: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather local embeddings across ranks and apply :func:`clip_loss`.

    ``keep`` (global N, bool) drops pairs entirely (neither anchors nor negatives: the curator's
    "loss on kept samples only"); ``weights`` (global N) weights the remaining pairs.
    """
    image_all, text_all = gather_with_grad(image), gather_with_grad(text)
    if keep is not None:
        idx = keep.nonzero().squeeze(1)
        image_all, text_all = image_all[idx], text_all[idx]
        weights = None if weights is None else weights[idx]
    return clip_loss(image_all, text_all, scale, weights)
