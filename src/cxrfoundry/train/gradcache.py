"""Embedding accumulation (GradCache): a large contrastive batch in small activation memory.

A contrastive loss couples every pair in the batch, so plain gradient accumulation over
micro-batches changes the loss (fewer negatives). GradCache (Gao et al., 2021) keeps the full
batch loss exact:

1. encode every micro-batch *without a graph* and cache the embeddings (RNG state saved);
2. compute the loss on the full cached batch and back-propagate to the embeddings only, giving
   d(loss)/d(embedding) for every sample (the logit scale gets its gradient here directly);
3. re-encode each micro-batch *with* a graph (RNG state restored, so dropout masks match) and
   back-propagate the cached embedding gradients through it.

Peak activation memory is that of one micro-batch; parameter gradients equal the full-batch
gradients up to float summation order (tested in tests/unit/test_clip_gradcache.py).

Under DDP the re-encoding runs inside ``no_sync()`` and the gradients are averaged across ranks
once at the end (DDP's hooks cannot span the two backward phases).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cxrfoundry.models.losses import is_distributed

#: loss_fn(image_embeddings, text_embeddings, logit_scale) -> scalar loss (local rows; it gathers).
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def average_gradients(model: nn.Module) -> None:
    """All-reduce and average the gradients of ``model`` across ranks (no-op single-process)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for p in unwrap(model).parameters():
        if p.requires_grad and p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _full(x: torch.Tensor) -> torch.Tensor:
    """Undo autocast's half precision (the loss runs in float32); float64 passes through."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _split(batch: Mapping[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def contrastive_backward(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    *,
    micro_batch_size: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward + backward of one contrastive batch; returns (loss, image emb, text emb), detached.

    ``model(pixel_values, input_ids, attention_mask)`` must return ``(image, text, scale)``.
    With ``micro_batch_size`` smaller than the batch, GradCache is used (module docstring);
    otherwise one ordinary forward/backward (DDP reduces gradients as usual).
    """
    n = batch["pixel_values"].shape[0]
    if not micro_batch_size or micro_batch_size >= n:
        with autocast():
            image, text, scale = model(**batch)
            loss = loss_fn(_full(image), _full(text), _full(scale))
        loss.backward()
        return loss.detach(), _full(image.detach()), _full(text.detach())

    chunks = _split(batch, micro_batch_size)
    sync_off = model.no_sync if isinstance(model, nn.parallel.DistributedDataParallel) else None
    states, images, texts = [], [], []
    # Phase 1: embeddings without graph.
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state())
            with autocast():
                image, text, _ = model(**chunk)
            images.append(_full(image))
            texts.append(_full(text))
    after = _rng_state()
    image_all = torch.cat(images).requires_grad_(True)
    text_all = torch.cat(texts).requires_grad_(True)
    # Phase 2: full-batch loss; gradients reach the cached embeddings and the logit scale.
    scale = _full(unwrap(model).scale())
    loss = loss_fn(image_all, text_all, scale)
    loss.backward()
    grad_i = image_all.grad.split(micro_batch_size)
    grad_t = text_all.grad.split(micro_batch_size)
    # Phase 3: re-encode with graph and push the cached gradients through.
    with sync_off() if sync_off else contextlib.nullcontext():
        for chunk, state, gi, gt in zip(chunks, states, grad_i, grad_t, strict=True):
            _set_rng_state(state)
            with autocast():
                image, text, _ = model(**chunk)
            pairs = [(e, g) for e, g in ((image, gi), (text, gt)) if e.requires_grad]
            if pairs:
                torch.autograd.backward([_full(e) for e, _ in pairs], [g for _, g in pairs])
    _set_rng_state(after)
    if sync_off:
        average_gradients(model)
    return loss.detach(), image_all.detach(), text_all.detach()
