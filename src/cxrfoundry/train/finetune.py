"""Fine-tune classification and segmentation heads on any backbone; write benchmark metrics.

Both tasks train on the ``train`` split of a shard folder and report on the ``test`` split, in
the benchmark format of DESIGN.md section 3::

    {task, model, dataset, metric, value, ci_low, ci_high, n, per_class, details}

``value`` is the mean AUROC over findings (classification) or the mean Dice over structures
(segmentation); the CI is a percentile bootstrap over test *patients*. The backbone and the head
get separate learning rates (CXformer: head 5e-5, backbone 5e-7); a backbone lr of 0 freezes
the backbone (linear probing).

This module holds the training loop (:func:`fit`, :func:`predict`, :func:`load_split`) that
every head in the project uses. The benchmark itself (data, model, scoring) is implemented
once, in :mod:`cxrfoundry.eval.probe`; :func:`finetune_classification` and
:func:`finetune_segmentation` (the DINO stage's ``finetune_cls`` / ``finetune_seg`` rules) call
it and keep the DINO stage's record format (see docs/benchmarks.md, "One implementation").

Images are decoded once into memory (uint8, at ``image_size``): right for the demo and for
evaluation-sized test sets; fine-tuning on a full cluster corpus would stream from
:class:`cxrfoundry.data.dataset.ShardIterableDataset` instead.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cxrfoundry import io as cio
from cxrfoundry.data import imaging
from cxrfoundry.data.dataset import ShardDataset
from cxrfoundry.schema import FINDING_NAME_BY_COLUMN
from cxrfoundry.train import engine
from cxrfoundry.train.augment import DEFAULT_MEAN, DEFAULT_STD, decode_image, equalize_histogram

log = logging.getLogger(__name__)

COMMON_DEFAULTS: dict[str, Any] = {
    "train_split": "train",
    "test_split": "test",
    "image_size": None,  # default: the shard image size
    "equalize": True,
    "mean": list(DEFAULT_MEAN),
    "std": list(DEFAULT_STD),
    "epochs": 10,
    "batch_size": 32,
    "head_lr": 5e-5,
    "backbone_lr": 5e-7,
    "weight_decay": 1e-4,
    "warmup_fraction": 0.05,
    "bootstrap": 200,
    "precision": "bf16",
    "device": "auto",
    "max_train_rows": None,  # cap for quick runs
}
CLS_DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS,
    "n_last_blocks": 4,
    "findings": None,  # default: all 14 CheXpert columns
    "uncertain": "negative",
    "unmentioned": "negative",
}
SEG_DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS,
    "structures": ["lungs", "heart"],
    "dice_weight": 1.0,
}


def _resolve(cfg: Mapping[str, Any] | None, defaults: Mapping[str, Any], what: str) -> dict:
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown {what} config keys {unknown}; expected some of {sorted(defaults)}"
        )
    return {**copy.deepcopy(dict(defaults)), **cfg}


def load_split(
    shards_dir: str | Path,
    split: str,
    *,
    image_size: int | None,
    equalize: bool,
    with_masks: bool = False,
    uncertain: str = "negative",
    unmentioned: str = "negative",
    max_rows: int | None = None,
) -> dict[str, Any]:
    """Decode one split into memory.

    Returns ``images`` (uint8 ``(N, S, S)``, equalised when asked), ``labels`` (float32
    ``(N, 14)``), ``valid`` (bool ``(N, 14)``, per the label policies), ``image_ids`` and, with
    ``with_masks``, ``masks`` (uint8 bit masks ``(N, S, S)``) and ``has_mask`` (bool ``(N,)``).
    """
    dataset = ShardDataset(
        shards_dir, split, uncertain=uncertain, unmentioned=unmentioned, include_mask=with_masks
    )
    n = len(dataset) if max_rows is None else min(len(dataset), int(max_rows))
    if n == 0:
        raise ValueError(f"{shards_dir}: split {split!r} has no rows")
    images, masks, labels, valid, ids, has_mask = [], [], [], [], [], []
    for i in tqdm(range(n), desc=f"load {split}", leave=False):
        row = dataset.row(i)
        pixels = decode_image(row["image"], name=row["image_id"])
        image = (
            equalize_histogram(pixels)
            if equalize
            else pixels.float() / (255.0 if pixels.dtype == torch.uint8 else 65535.0)
        )
        size = image_size or image.shape[-1]
        if image.shape != (size, size):
            image = F.interpolate(
                image[None, None], size=(size, size), mode="bilinear", antialias=True
            )[0, 0]
        images.append((image.clamp(0, 1) * 255).round().to(torch.uint8))
        y, m = dataset.decoder.labels(row)
        labels.append(y)
        valid.append(m)
        ids.append(row["image_id"])
        if with_masks:
            data = row.get("mask")
            if data is None:
                mask = torch.zeros(size, size, dtype=torch.uint8)
            else:
                mask = torch.from_numpy(imaging.decode_image(data, name=f"{row['image_id']} mask"))
                if mask.shape != (size, size):
                    mask = F.interpolate(mask[None, None].float(), size=(size, size))[0, 0]
                mask = mask.to(torch.uint8)
            masks.append(mask)
            has_mask.append(data is not None)
    out: dict[str, Any] = {
        "images": torch.stack(images),
        "labels": torch.stack(labels),
        "valid": torch.stack(valid),
        "image_ids": ids,
    }
    if with_masks:
        out["masks"] = torch.stack(masks)
        out["has_mask"] = torch.tensor(has_mask, dtype=torch.bool)
    return out


def to_pixels(images: torch.Tensor, cfg: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """uint8 ``(B, S, S)`` → normalised float ``(B, 3, S, S)`` on ``device``."""
    x = images.to(device, non_blocking=True).float().div_(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def _optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.AdamW:
    backbone = [p for n, p in model.named_parameters() if n.startswith("features.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("features.")]
    groups = [{"params": head, "lr": cfg["head_lr"], "base_lr": cfg["head_lr"]}]
    if cfg["backbone_lr"] > 0:
        groups.append({"params": backbone, "lr": cfg["backbone_lr"], "base_lr": cfg["backbone_lr"]})
    else:
        for p in backbone:
            p.requires_grad_(False)
    return torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])


@torch.no_grad()
def embed_all(
    model: nn.Module, images: torch.Tensor, cfg: Mapping[str, Any], device: torch.device
) -> torch.Tensor:
    """``model.embed`` over ``images`` in batches (frozen backbone: computed once, kept on CPU)."""
    model.eval()
    autocast = engine.autocast_factory(device, cfg["precision"])
    size = int(cfg["batch_size"])
    outs = []
    for start in tqdm(range(0, images.shape[0], size), desc="embed", leave=False):
        with autocast():
            outs.append(model.embed(to_pixels(images[start : start + size], cfg, device)).float())
    return torch.cat(outs).cpu()


def fit(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    targets: torch.Tensor,
    cfg: Mapping[str, Any],
    *,
    seed: int,
    device: torch.device,
    log_metrics: Callable[[Mapping[str, float], int], None] | None = None,
    desc: str = "finetune",
    embeddings: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Train ``model`` on (images, targets) for ``cfg["epochs"]``; seeded shuffles, cosine lr.

    With ``backbone_lr == 0`` the backbone is frozen: its embeddings are computed once and only
    the head trains on them (same result as re-running the frozen backbone, far cheaper).
    ``embeddings`` passes them precomputed (:func:`embed_all` of this backbone on ``images``).
    """
    optimizer = _optimizer(model, cfg)
    autocast = engine.autocast_factory(device, cfg["precision"])
    frozen = cfg["backbone_lr"] <= 0
    size = tuple(images.shape[-2:])
    if embeddings is not None and (not frozen or embeddings.shape[0] != images.shape[0]):
        raise ValueError(f"{desc}: precomputed embeddings need a frozen backbone, one per image")
    if frozen:
        inputs = embed_all(model, images, cfg, device) if embeddings is None else embeddings
    else:
        inputs = images
    n = images.shape[0]
    batch = min(int(cfg["batch_size"]), n)
    steps_per_epoch = n // batch
    total = steps_per_epoch * int(cfg["epochs"])
    warmup = round(cfg["warmup_fraction"] * total)
    step, losses, started = 0, [], time.time()
    model.train()
    bar = tqdm(total=total, desc=desc, leave=False)
    for epoch in range(int(cfg["epochs"])):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for k in range(steps_per_epoch):
            idx = order[k * batch : (k + 1) * batch]
            factor = (
                (step + 1) / warmup
                if step < warmup
                else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            )
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            with autocast():
                if frozen:
                    output = model.decode(inputs[idx].to(device), size)
                else:
                    output = model(to_pixels(inputs[idx], cfg, device))
                loss = loss_fn(output, targets[idx].to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"{desc}: non-finite loss at step {step}")
        if log_metrics is not None:
            log_metrics({"train_loss": float(np.mean(losses[-steps_per_epoch:]))}, epoch)
    bar.close()
    return {
        "steps": step,
        "train_s": time.time() - started,
        "final_train_loss": losses[-1],
        "backbone_frozen": frozen,
    }


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, cfg: Mapping[str, Any], device: torch.device
) -> torch.Tensor:
    """Model outputs (float32, CPU) over ``images`` in batches."""
    model.eval()
    autocast = engine.autocast_factory(device, cfg["precision"])
    size = int(cfg["batch_size"])
    outs = []
    for start in range(0, images.shape[0], size):
        with autocast():
            outs.append(model(to_pixels(images[start : start + size], cfg, device)).float())
    return torch.cat(outs).cpu()


def _backbone_name(backbone: str | Path | Mapping[str, Any]) -> str:
    return "random-init" if isinstance(backbone, Mapping) else str(backbone)


def _replicates(values: np.ndarray) -> list[float | None]:
    """Bootstrap replicates as JSON numbers (None where a replicate is undefined)."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=float)]


def finetune_classification(
    shards_dir: str | Path,
    backbone: str | Path | Mapping[str, Any],
    out_json: str | Path,
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
    model_name: str,
    dataset: str | None = None,
    log_metrics: Callable[[Mapping[str, float], int], None] | None = None,
) -> dict[str, Any]:
    """Train the CXformer classification head (BCE) and write test AUROC to ``out_json``.

    ``backbone``: an HF folder / hub id, or a random-init config (see
    :func:`cxrfoundry.eval.heads.load_backbone`). ``cfg`` overrides :data:`CLS_DEFAULTS`;
    ``backbone_lr`` 0 is a linear probe on the frozen backbone, > 0 fine-tunes it. Training and
    scoring are :func:`cxrfoundry.eval.probe.classification_benchmark` (the benchmarks stage's
    implementation; CIs resample patients); this function keeps the DINO stage's record format
    (``task`` ``cls``, per-finding AUROC as numbers, ``details.bootstrap_replicates`` for the
    ablation's paired comparison). Returns the metrics dict written.
    """
    from cxrfoundry.eval import probe

    cfg = _resolve(cfg, CLS_DEFAULTS, "finetune_cls")
    mode = "linear" if cfg["backbone_lr"] <= 0 else "finetune"
    run = probe.classification_benchmark(
        shards_dir, backbone, {**cfg, "mode": mode}, seed=seed, log_metrics=log_metrics
    )
    res = run.result
    result = {
        "task": "cls",
        "model": model_name,
        "dataset": dataset or Path(shards_dir).name,
        "metric": "auroc_mean",
        "value": res.macro_auroc.value,
        "ci_low": res.macro_auroc.ci_low,
        "ci_high": res.macro_auroc.ci_high,
        "n": res.n,
        "per_class": {
            FINDING_NAME_BY_COLUMN[f]: res.auroc[FINDING_NAME_BY_COLUMN[f]].value
            for f in run.columns
        },
        "n_patients": res.n_patients,
        "ci_method": "percentile bootstrap over patients",
        "details": {
            "backbone": _backbone_name(backbone),
            "mode": mode,
            "n_train": run.n_train,
            "classes_scored": int(sum(e.value is not None for e in res.auroc.values())),
            **run.fit,
            "config": cfg,
            "seed": seed,
            # Same (test patients, bootstrap, seed) => same resamples: these pair with another
            # model's replicates (train.dino.summarize_ablation's paired CI).
            "bootstrap_replicates": _replicates(res.replicates["macro_auroc"]),
        },
    }
    cio.write_json(out_json, result)
    log.info(
        "cls %s: mean AUROC %s [%s, %s]",
        model_name,
        result["value"],
        result["ci_low"],
        result["ci_high"],
    )
    return result


def finetune_segmentation(
    shards_dir: str | Path,
    backbone: str | Path | Mapping[str, Any],
    out_json: str | Path,
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
    model_name: str,
    dataset: str | None = None,
    log_metrics: Callable[[Mapping[str, float], int], None] | None = None,
) -> dict[str, Any]:
    """Train the linear segmentation head (BCE + Dice) on the ``mask`` column; write test Dice.

    Training and scoring are :func:`cxrfoundry.eval.probe.segmentation_benchmark` with the
    linear 1x1 head (``backbone_lr`` 0 freezes the backbone); the record keeps the DINO stage's
    format (``task`` ``seg``, Dice per structure as numbers). Rows without a mask are left out
    of training and scoring (their count is reported). Returns the metrics dict written.
    """
    from cxrfoundry.eval import probe

    cfg = _resolve(cfg, SEG_DEFAULTS, "finetune_seg")
    mode = "linear" if cfg["backbone_lr"] <= 0 else "finetune"
    run = probe.segmentation_benchmark(
        shards_dir, backbone, {**cfg, "mode": mode, "head": "linear"}, seed=seed,
        log_metrics=log_metrics,
    )  # fmt: skip
    res = run.result
    result = {
        "task": "seg",
        "model": model_name,
        "dataset": dataset or Path(shards_dir).name,
        "metric": "dice_mean",
        "value": res.mean.value,
        "ci_low": res.mean.ci_low,
        "ci_high": res.mean.ci_high,
        "n": res.n,
        "per_class": {s: res.per_structure[s].value for s in run.structures},
        "n_patients": res.n_patients,
        "ci_method": "percentile bootstrap over patients",
        "details": {
            "backbone": _backbone_name(backbone),
            "mode": mode,
            "n_train": run.n_train,
            "rows_without_mask": run.rows_without_mask,
            **run.fit,
            "config": cfg,
            "seed": seed,
            "bootstrap_replicates": _replicates(res.replicates),
        },
    }
    cio.write_json(out_json, result)
    log.info("seg %s: mean Dice %s %s", model_name, result["value"], result["per_class"])
    return result
