"""CXformer / DINOv2 self-supervised pretraining on Parquet shards.

:func:`train_dino` trains a student ViT (backbone + DINO head + iBOT head) against an EMA teacher
on multi-crop views of the shard images of one split, and writes::

    out_dir/backbone/          teacher backbone, Hugging Face save_pretrained (safetensors)
    out_dir/heads.safetensors  teacher DINO and iBOT heads (to continue pretraining)
    out_dir/config.json        the resolved config (defaults filled in) and seed
    out_dir/metrics.json       losses, FLOPs, samples/s, MFU, register diagnostics
    out_dir/checkpoint.pt      the final training state (when ``keep_training_state``)

Checkpoints for resume go to ``work_dir`` (default ``out_dir/../.{name}.work``) so that a
Snakemake job whose output folder is cleared on restart still finds them. The run is exactly
resumable: every crop is a pure function of (seed, epoch, index), the global batch order depends
only on (seed, epoch), and the optimiser, centres, teacher and RNG state are checkpointed.

Distributed: launched under torchrun the student is wrapped in DDP, every rank reads its slice
of each global batch, and centring statistics are all-reduced, so N ranks compute what one
process computes on the full batch (``tests/unit/test_dino_train.py`` checks this).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from cxrfoundry import io as cio
from cxrfoundry.data.dataset import list_shards
from cxrfoundry.models.dino import DinoStudent, build_backbone, head_from_config
from cxrfoundry.models.dino_losses import Centering, dino_loss, ibot_loss, koleo_loss
from cxrfoundry.provenance import config_hash
from cxrfoundry.train import engine
from cxrfoundry.train.augment import (
    AugmentConfig,
    DinoTransform,
    collate_crops,
    decode_image,
    normalize,
    prepare,
)

log = logging.getLogger(__name__)

#: Every config key of :func:`train_dino` with its default (CXformer ViT-S recipe where it has
#: one). ``dino.pretrain`` in the workflow config overrides any of them.
DEFAULTS: dict[str, Any] = {
    "backbone": {
        "arch": "vit_small",
        "pretrained": None,
        "num_register_tokens": 4,
        "patch_size": 14,
        "image_size": None,  # position-embedding grid; defaults to the global crop size
        "drop_path_rate": 0.0,
    },
    "dino_head": {"n_prototypes": 16384, "hidden_dim": 2048, "bottleneck_dim": 384, "n_layers": 3},
    "ibot_head": {"n_prototypes": 16384, "hidden_dim": 2048, "bottleneck_dim": 384, "n_layers": 3},
    "augment": {"global_size": 518, "local_size": 98, "n_local": 8},
    "masking": {"probability": 0.5, "ratio": [0.1, 0.5]},
    "centering": "ema",  # "ema" (CXformer) or "sinkhorn" (stock DINOv2)
    "center_momentum": 0.9,
    "center_init": "first_batch",  # or "zero" (DINO); see Centering
    "student_temp": 0.1,
    "teacher_temp": 0.07,
    "teacher_temp_warmup": 0.04,
    # DINO/DINOv2: 0.04 -> 0.07 over 30 epochs; 0.07 from the start collapses (DINO, fig. 7).
    "teacher_temp_warmup_epochs": 30,
    "loss_weights": {"dino": 1.0, "ibot": 1.0, "koleo": 0.0},
    "split": "train",
    "batch_size": 1024,  # global, over all ranks
    "epochs": 100,
    "max_steps": None,  # caps the schedule length (and the run) when set
    "lr": 3e-4,
    "min_lr": 1e-6,
    "warmup_fraction": 0.1,
    "weight_decay": 0.04,
    "weight_decay_end": 0.2,
    "layer_decay": 1.0,  # 1 = off; <1 scales block i's lr by decay^(depth - i)
    "clip_grad": 3.0,
    "teacher_momentum": 0.999,
    "teacher_momentum_end": 1.0,
    "freeze_backbone_epochs": 1,  # CXformer: backbone frozen in the first epoch
    "freeze_last_layer_epochs": 1,  # DINO/DINOv2: prototypes fixed in the first epoch
    "precision": "bf16",  # on GPU; CPU always runs fp32
    "device": "auto",
    "num_workers": 0,
    "preload_max_rows": 50000,  # read all encoded images into memory below this many rows
    "checkpoint_every": 200,
    "log_every": 10,
    "keep_training_state": True,
    "diagnostics": {"n_images": 64, "norm_factor": 2.0},
}


class TrainingInterrupted(RuntimeError):
    """Raised after a SIGTERM/SIGUSR1 checkpoint: the job should exit and be resumed later."""


def resolve_config(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """``cfg`` merged over :data:`DEFAULTS` (one level of nesting); unknown keys raise."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown dino config keys {unknown}; expected some of {sorted(DEFAULTS)}")
    out: dict[str, Any] = {}
    for key, default in DEFAULTS.items():
        value = cfg.get(key, default)
        if isinstance(default, dict):
            value = {**default, **(value or {})}
        out[key] = copy.deepcopy(value)
    if out["centering"] not in ("ema", "sinkhorn"):
        raise ValueError(f"centering must be 'ema' or 'sinkhorn', got {out['centering']!r}")
    if out["backbone"].get("image_size") is None:
        out["backbone"]["image_size"] = out["augment"]["global_size"]
    AugmentConfig.from_dict(out["augment"])  # validates the keys early
    return out


# -- schedules ---------------------------------------------------------------------------------
def cosine(step: int, total: int, start: float, end: float, warmup: int = 0, warm_from=0.0):
    """Linear warm-up from ``warm_from`` over ``warmup`` steps, then cosine ``start`` → ``end``."""
    if step < warmup:
        return warm_from + (start - warm_from) * step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def teacher_temperature(cfg: Mapping[str, Any], step: int, steps_per_epoch: int) -> float:
    """Teacher temperature: linear warm-up over ``teacher_temp_warmup_epochs``, then constant."""
    warm = int(cfg["teacher_temp_warmup_epochs"] * steps_per_epoch)
    if step >= warm:
        return float(cfg["teacher_temp"])
    return cfg["teacher_temp_warmup"] + (cfg["teacher_temp"] - cfg["teacher_temp_warmup"]) * (
        step / warm
    )


# -- data --------------------------------------------------------------------------------------
class ShardImages:
    """Encoded images (and ids) of one split, in memory or read row by row from the shards."""

    def __init__(self, shards_dir: str | Path, split: str, preload_max_rows: int) -> None:
        self.paths = list_shards(shards_dir, split)
        if not self.paths:
            raise ValueError(f"{shards_dir}: no shards for split {split!r}")
        counts = [pq.read_metadata(p).num_rows for p in self.paths]
        self.n = int(sum(counts))
        self._images: list[bytes] | None = None
        self._ids: list[str] | None = None
        self._dataset = None
        if self.n <= preload_max_rows:
            images, ids = [], []
            for path in self.paths:
                table = pq.read_table(path, columns=["image_id", "image"])
                ids += table.column("image_id").to_pylist()
                images += table.column("image").to_pylist()
            self._images, self._ids = images, ids
        else:
            from cxrfoundry.data.dataset import ShardDataset

            self._dataset = ShardDataset(self.paths)

    def __len__(self) -> int:
        return self.n

    def get(self, index: int) -> tuple[bytes, str]:
        """(encoded image, image_id) of row ``index``."""
        if self._images is not None and self._ids is not None:
            return self._images[index], self._ids[index]
        row = self._dataset.row(index)
        return row["image"], row["image_id"]


class DinoDataset(Dataset):
    """Indexed by ``(epoch, row)``: multi-crop views of row ``row`` for ``epoch``."""

    def __init__(self, images: ShardImages, transform: DinoTransform) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        data, image_id = self.images.get(index)
        return self.transform(data, epoch, index, name=image_id)


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's slice of each global batch, from global step ``start_step`` on.

    Epoch ``e`` is a permutation of the rows seeded by ``(seed, e)``, cut into global batches of
    ``global_batch`` (the remainder is dropped); rank ``r`` of ``world`` takes the ``r``-th
    contiguous slice. The union over ranks is independent of the world size, which is what makes
    DDP runs equivalent to single-process ones and resumable on a different number of GPUs.
    """

    def __init__(
        self,
        n_rows: int,
        global_batch: int,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start_step: int = 0,
        total_steps: int,
    ) -> None:
        if global_batch % world:
            raise ValueError(f"batch_size {global_batch} is not divisible by world size {world}")
        if n_rows < global_batch:
            raise ValueError(f"{n_rows} rows are fewer than one global batch of {global_batch}")
        self.n_rows, self.global_batch = n_rows, global_batch
        self.seed, self.rank, self.world = seed, rank, world
        self.start_step, self.total_steps = start_step, total_steps
        self.steps_per_epoch = n_rows // global_batch

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.global_batch // self.world
        step = self.start_step
        while step < self.total_steps:
            epoch, k = divmod(step, self.steps_per_epoch)
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            order = rng.permutation(self.n_rows)
            for j in range(k, self.steps_per_epoch):
                if step >= self.total_steps:
                    return
                batch = order[j * self.global_batch : (j + 1) * self.global_batch]
                mine = batch[self.rank * local : (self.rank + 1) * local]
                yield [(epoch, int(i)) for i in mine]
                step += 1


# -- optimisation ------------------------------------------------------------------------------
def _layer_id(name: str, depth: int) -> int:
    if name.startswith("backbone.embeddings"):
        return 0
    if name.startswith("backbone.encoder.layer."):
        return int(name.split(".")[3]) + 1
    return depth + 1  # final norm and the heads


def param_groups(model: DinoStudent, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: layer-wise lr scale, weight decay only on matrices; flags for freezing."""
    depth = model.backbone.config.num_hidden_layers
    groups: dict[tuple[int, bool, bool, bool], dict[str, Any]] = {}
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not param.requires_grad:
            continue
        layer = _layer_id(name, depth)
        decay = param.ndim >= 2 and "token" not in name and "position_embeddings" not in name
        key = (layer, decay, name.startswith("backbone."), name.endswith("prototypes"))
        group = groups.setdefault(
            key,
            {
                "params": [],
                "lr_scale": layer_decay ** (depth + 1 - layer),
                "wd_scale": 1.0 if decay else 0.0,
                "is_backbone": key[2],
                "is_last_layer": key[3],
            },
        )
        group["params"].append(param)
    return list(groups.values())


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, parameter by parameter."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)


# -- diagnostics -------------------------------------------------------------------------------
@torch.no_grad()
def collapse_diagnostics(targets: torch.Tensor, cls: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse monitors of one step (this rank's batch).

    ``target_entropy``: mean entropy of the teacher's DINO targets (→ ln K: uniform collapse);
    ``target_batch_entropy``: entropy of their batch mean (→ 0: every image on one prototype);
    ``cls_cosine``: mean pairwise cosine of the teacher's CLS features (→ 1: one embedding).
    """
    t = targets.float()
    row = -(t * t.clamp_min(1e-12).log()).sum(dim=-1).mean()
    mean = t.mean(dim=0)
    batch = -(mean * mean.clamp_min(1e-12).log()).sum()
    x = torch.nn.functional.normalize(cls.float(), dim=-1)
    n = x.shape[0]
    cos = (x @ x.t()).sum().sub(n).div(max(n * (n - 1), 1))
    return {"target_entropy": row, "target_batch_entropy": batch, "cls_cosine": cos}


@torch.no_grad()
def high_norm_token_share(
    backbone: nn.Module, pixels: torch.Tensor, norm_factor: float = 2.0
) -> dict[str, float]:
    """Register diagnostics: the share of "artifact" patch tokens with an outsized norm.

    Darcet et al. (2024) show ViTs without registers repurpose a few low-information patch tokens
    as global scratch space; those tokens have norms far above the rest. A patch token counts as
    high-norm when its last-block output norm (before the final layer norm) exceeds
    ``norm_factor`` × the median patch-token norm of the batch.
    """
    out = backbone(pixel_values=pixels, output_hidden_states=True)
    n_prefix = 1 + int(getattr(backbone.config, "num_register_tokens", 0) or 0)
    patches = out.hidden_states[-1][:, n_prefix:].float()
    norms = patches.norm(dim=-1)
    median = norms.median()
    return {
        "high_norm_share": float((norms > norm_factor * median).float().mean()),
        "patch_norm_median": float(median),
        "patch_norm_max": float(norms.max()),
    }


def diagnostic_pixels(images: ShardImages, aug: AugmentConfig, n: int) -> torch.Tensor:
    """The first ``n`` images, resized to the global crop size and normalised (no augmentation)."""
    batch = []
    for i in range(min(n, len(images))):
        data, image_id = images.get(i)
        image = prepare(decode_image(data, name=image_id), aug)
        image = torch.nn.functional.interpolate(
            image[None, None], size=(aug.global_size, aug.global_size), mode="bilinear"
        )[0, 0]
        batch.append(normalize(image, aug))
    return torch.stack(batch)


# -- training ----------------------------------------------------------------------------------
def _work_dir(out_dir: Path, work_dir: str | Path | None) -> Path:
    return Path(work_dir) if work_dir else out_dir.parent / f".{out_dir.name}.work"


def train_dino(
    shards_dir: str | Path,
    out_dir: str | Path,
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
    log_metrics: Callable[[Mapping[str, float], int], None] | None = None,
    work_dir: str | Path | None = None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Pretrain a DINO/iBOT backbone on the ``cfg["split"]`` shards of ``shards_dir``.

    Args:
        shards_dir: a shard folder with ``index.json`` (``cxrfoundry.data.shards``).
        out_dir: the model folder to publish (atomically, on rank 0) when training finishes.
        cfg: overrides of :data:`DEFAULTS`.
        seed: seeds model init, batch order, augmentations and masks.
        log_metrics: called as ``log_metrics(metrics, step)`` every ``log_every`` steps on
            rank 0 (e.g. ``Step.log_metrics``).
        work_dir: where resume checkpoints live (default ``out_dir/../.{name}.work``).
        stop_at: checkpoint and return after this many global steps without publishing (what a
            pre-empted job does; used by tests and time-boxed jobs).

    Returns:
        The metrics dict (also written to ``out_dir/metrics.json``); when stopped early it has
        ``finished: False`` and the checkpointed ``step``. Raises :class:`TrainingInterrupted`
        after checkpointing on SIGTERM/SIGUSR1.
    """
    cfg = resolve_config(cfg)
    out_dir, shards_dir = Path(out_dir), Path(shards_dir)
    ckpt_path = _work_dir(out_dir, work_dir) / "checkpoint.pt"
    info = engine.init_distributed(cfg["device"])
    device = info.device
    engine.seed_everything(seed)

    aug = AugmentConfig.from_dict(cfg["augment"])
    patch = int(cfg["backbone"]["patch_size"])
    if aug.global_size % patch or aug.local_size % patch:
        raise ValueError(
            f"crop sizes {aug.global_size}/{aug.local_size} must be multiples of the patch "
            f"size {patch}"
        )
    images = ShardImages(shards_dir, cfg["split"], int(cfg["preload_max_rows"]))
    transform = DinoTransform(aug, patch, seed, masking=dict(cfg["masking"]))
    steps_per_epoch = len(images) // int(cfg["batch_size"])
    if steps_per_epoch == 0:
        raise ValueError(
            f"{shards_dir}: {len(images)} {cfg['split']} rows are fewer than one global batch "
            f"of {cfg['batch_size']}"
        )
    total_steps = int(cfg["epochs"]) * steps_per_epoch
    if cfg["max_steps"]:
        total_steps = min(total_steps, int(cfg["max_steps"]))
    warmup = round(cfg["warmup_fraction"] * total_steps)

    backbone = build_backbone(cfg["backbone"], seed=seed)
    dim = backbone.config.hidden_size
    student = DinoStudent(
        backbone, head_from_config(dim, cfg["dino_head"]), head_from_config(dim, cfg["ibot_head"])
    ).to(device)
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    dino_center = Centering(
        cfg["dino_head"]["n_prototypes"],
        cfg["centering"],
        cfg["center_momentum"],
        init=cfg["center_init"],
    ).to(device)
    ibot_center = Centering(
        cfg["ibot_head"]["n_prototypes"],
        cfg["centering"],
        cfg["center_momentum"],
        init=cfg["center_init"],
    ).to(device)
    optimizer = torch.optim.AdamW(param_groups(student, float(cfg["layer_decay"])), lr=cfg["lr"])

    fingerprint = config_hash({"cfg": cfg, "seed": seed, "shards": str(shards_dir)})
    start_step, flops_per_step, history = 0, None, {}
    state = engine.load_checkpoint(ckpt_path)
    if state is not None and state.get("fingerprint") != fingerprint:
        log.warning("%s: made with another config or seed; starting afresh", ckpt_path)
        state = None
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        dino_center.load_state_dict(state["dino_center"])
        ibot_center.load_state_dict(state["ibot_center"])
        optimizer.load_state_dict(state["optimizer"])
        engine.set_rng_state(state["rng"])
        start_step, flops_per_step = int(state["step"]), state.get("flops_per_step")
        history = state.get("history", {})
        log.info("resumed from %s at step %d", ckpt_path, start_step)

    model: nn.Module = student
    if info.distributed:
        model = DistributedDataParallel(
            student, device_ids=[device.index] if device.index else None
        )
    autocast = engine.autocast_factory(device, cfg["precision"])
    sampler = GlobalBatchSampler(
        len(images),
        int(cfg["batch_size"]),
        seed=seed,
        rank=info.rank,
        world=info.world_size,
        start_step=start_step,
        total_steps=total_steps if stop_at is None else min(total_steps, stop_at),
    )
    loader = DataLoader(
        DinoDataset(images, transform),
        batch_sampler=sampler,
        collate_fn=collate_crops,
        num_workers=int(cfg["num_workers"]),
        pin_memory=device.type == "cuda",
    )
    weights = cfg["loss_weights"]
    freeze_backbone = int(cfg["freeze_backbone_epochs"] * steps_per_epoch)
    freeze_last = int(cfg["freeze_last_layer_epochs"] * steps_per_epoch)
    throughput = engine.Throughput(device, info.world_size)
    flag = engine.StopFlag()

    def save(step: int) -> None:
        if info.is_main:
            engine.save_checkpoint(
                ckpt_path,
                {
                    "fingerprint": fingerprint,
                    "step": step,
                    "student": student.state_dict(),
                    "teacher": teacher.state_dict(),
                    "dino_center": dino_center.state_dict(),
                    "ibot_center": ibot_center.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": engine.rng_state(),
                    "flops_per_step": flops_per_step,
                    "history": history,
                },
            )
        engine.barrier()

    def train_step(step: int, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        global_crops = batch["global_crops"].to(device, non_blocking=True)
        local_crops = batch["local_crops"].to(device, non_blocking=True)
        masks = batch["masks"].to(device, non_blocking=True)
        temp = teacher_temperature(cfg, step, steps_per_epoch)
        with autocast():
            with torch.no_grad():
                t_out = teacher(global_crops, None, None, patch_select=masks)
                t_dino = dino_center.targets(t_out["global_logits"], temp)
                t_ibot = ibot_center.targets(t_out["patch_logits"], temp)
            s_out = model(global_crops, masks, local_crops)
            losses = {
                "dino": dino_loss(
                    t_dino,
                    s_out["global_logits"],
                    s_out.get("local_logits"),
                    n_global=2,
                    student_temperature=cfg["student_temp"],
                ),
                "ibot": ibot_loss(
                    t_ibot, s_out["patch_logits"], masks, student_temperature=cfg["student_temp"]
                ),
            }
            if weights["koleo"]:
                losses["koleo"] = sum(koleo_loss(c) for c in s_out["global_cls"].chunk(2))
            total = sum(weights[k] * v for k, v in losses.items())
        total.backward()
        for group in optimizer.param_groups:
            if (group["is_backbone"] and step < freeze_backbone) or (
                group["is_last_layer"] and step < freeze_last
            ):
                for p in group["params"]:
                    p.grad = None
        grad_norm = engine.clip_gradients(student, cfg["clip_grad"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        momentum = cosine(step, total_steps, cfg["teacher_momentum"], cfg["teacher_momentum_end"])
        ema_update(teacher, student, momentum)
        dino_center.update(t_out["global_logits"])
        ibot_center.update(t_out["patch_logits"])
        return {
            "loss": total.detach(),
            **{f"loss_{k}": v.detach() for k, v in losses.items()},
            **collapse_diagnostics(t_dino, t_out["global_cls"]),
            "grad_norm": torch.tensor(grad_norm),
            "teacher_momentum": torch.tensor(momentum),
            "teacher_temp": torch.tensor(temp),
        }

    started = time.time()
    step = start_step
    last: dict[str, float] = {}
    bar = tqdm(total=sampler.total_steps, initial=start_step, disable=not info.is_main, desc="dino")
    with flag.installed():
        for batch in loader:
            lr = cosine(step, total_steps, cfg["lr"], cfg["min_lr"], warmup)
            wd = cosine(step, total_steps, cfg["weight_decay"], cfg["weight_decay_end"])
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
                group["weight_decay"] = wd * group["wd_scale"]
            n_samples = int(cfg["batch_size"])
            if flops_per_step is None:
                # Count one step under the FLOP counter (all ranks' work = local × world).
                result: dict[str, torch.Tensor] = {}
                local_flops = engine.count_flops(
                    lambda s=step, b=batch, r=result: r.update(train_step(s, b))
                )
                flops_per_step = float(local_flops * info.world_size)
                out = result
            else:
                throughput.start()
                out = train_step(step, batch)
                throughput.stop(n_samples, flops_per_step)
            step += 1
            bar.update(1)
            if step % int(cfg["log_every"]) == 0 or step == sampler.total_steps:
                last = {k: float(v) for k, v in out.items()}
                last["lr"] = lr
                if not all(math.isfinite(v) for v in last.values()):
                    raise FloatingPointError(f"non-finite training metrics at step {step}: {last}")
                history[str(step)] = last
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                if log_metrics is not None and info.is_main:
                    log_metrics(last, step)
            if engine.any_rank(bool(flag), device):
                save(step)
                raise TrainingInterrupted(
                    f"signal {flag.signum} at step {step}: checkpointed to {ckpt_path}"
                )
            if step % int(cfg["checkpoint_every"]) == 0 and step < total_steps:
                save(step)
    bar.close()
    if step < total_steps:
        save(step)
        return {"finished": False, "step": step, "checkpoint": str(ckpt_path)}

    speed = throughput.summary()
    metrics: dict[str, Any] = {
        "finished": True,
        "step": step,
        "total_steps": total_steps,
        "epochs": total_steps / steps_per_epoch,
        "samples_seen": total_steps * int(cfg["batch_size"]),
        "world_size": info.world_size,
        "device": str(device),
        "flops_per_step": flops_per_step,
        "total_flops": (flops_per_step or 0.0) * total_steps,
        "samples_per_s": speed["samples_per_s"],
        "flops_per_s": speed["flops_per_s"],
        "mfu": speed["mfu"],
        "wall_s_this_run": time.time() - started,
        "final": last,
        "num_register_tokens": int(teacher.backbone.config.num_register_tokens),
        "centering": cfg["centering"],
        "n_prototypes": int(cfg["dino_head"]["n_prototypes"]),
    }
    if info.is_main:
        diag = cfg["diagnostics"]
        if diag["n_images"]:
            pixels = diagnostic_pixels(images, aug, int(diag["n_images"])).to(device)
            metrics["registers"] = high_norm_token_share(
                teacher.backbone, pixels, float(diag["norm_factor"])
            )
        final_state = None
        if cfg["keep_training_state"]:
            save(step)
            final_state = ckpt_path
        with cio.atomic_dir(out_dir) as tmp:
            teacher.backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
            heads = {
                **{f"dino_head.{k}": v for k, v in teacher.dino_head.state_dict().items()},
                **{f"ibot_head.{k}": v for k, v in teacher.ibot_head.state_dict().items()},
            }
            save_file(
                {k: v.contiguous().cpu() for k, v in heads.items()}, tmp / "heads.safetensors"
            )
            cio.write_json(tmp / "config.json", {"dino": cfg, "seed": seed})
            cio.write_json(tmp / "metrics.json", {"history": history, **metrics})
            if final_state is not None:
                (tmp / "checkpoint.pt").write_bytes(final_state.read_bytes())
        log.info("DINO backbone written to %s", out_dir / "backbone")
    elif cfg["keep_training_state"]:
        engine.barrier()  # matches the barrier inside rank 0's save()
    engine.barrier()
    return metrics


def pretrain_dino(
    shards_dir: str | Path,
    out_dir: str | Path,
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
    work_dir: str | Path,
    gpus: int = 0,
    nodes: int = 1,
    log_metrics: Callable[[Mapping[str, float], int], None] | None = None,
) -> dict[str, Any]:
    """The rule's entry: :func:`train_dino` in-process for 0-1 GPU on one node, else the same
    run under ``torchrun`` / ``srun … torchrun`` (:mod:`cxrfoundry.train.launch`).

    Returns the metrics written to ``out_dir/metrics.json``. A pre-empted run raises (the job
    fails, its checkpoint stays in ``work_dir`` and a rerun resumes from it).
    """
    if gpus <= 1 and nodes <= 1:
        return train_dino(
            shards_dir, out_dir, cfg, seed=seed, log_metrics=log_metrics, work_dir=work_dir
        )
    import subprocess

    from cxrfoundry.train.launch import build_command

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "launch_config.json"
    cio.write_json(cfg_path, dict(cfg or {}))
    entry = ["-m", "cxrfoundry.train.dino", str(shards_dir), str(out_dir)]
    entry += ["--config", str(cfg_path), "--seed", str(seed), "--work-dir", str(work)]
    plan = build_command(entry, gpus=gpus, nodes=nodes)
    log.info("launching: %s", plan.shell())
    proc = subprocess.run(plan.command, check=False)
    metrics_path = Path(out_dir) / "metrics.json"
    if proc.returncode != 0 or not metrics_path.is_file():
        raise RuntimeError(f"distributed DINO training exited {proc.returncode}: {plan.shell()}")
    return cio.read_json(metrics_path)


def summarize_ablation(
    model_dirs: list[Path],
    benchmark_root: Path,
    variants: Mapping[str, Any],
    out_md: Path,
    out_json: Path,
) -> list[dict[str, Any]]:
    """One row per DINO model (plus the random-init baseline): AUROC, Dice, FLOPs, artifacts.

    The AUROC gain over ``dino_random`` gets a paired bootstrap CI when both benchmark files carry
    ``details.bootstrap_replicates`` (same test set, seed and resample count). Reads
    ``{model}/metrics.json`` and ``{benchmark_root}/{model}/{cls,seg}.json``; writes a Markdown
    table to ``out_md`` and the rows to ``out_json``; returns the rows.
    """

    def bench(model: str, task: str) -> dict[str, Any]:
        path = benchmark_root / model / f"{task}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: benchmark missing for the ablation table")
        return cio.read_json(path)

    from cxrfoundry.eval.heads import paired_ci

    baseline = bench("dino_random", "cls")
    rows = []
    for model_dir in [*model_dirs, None]:
        name = "dino_random" if model_dir is None else model_dir.name
        pre = {} if model_dir is None else cio.read_json(model_dir / "metrics.json")
        cls, seg = bench(name, "cls"), bench(name, "seg")
        gain_ci: tuple[float | None, float | None] = (None, None)
        mine = cls.get("details", {}).get("bootstrap_replicates")
        theirs = baseline.get("details", {}).get("bootstrap_replicates")
        if model_dir is not None and mine and theirs and len(mine) == len(theirs):
            gain_ci = paired_ci(mine, theirs)
        rows.append(
            {
                "model": name,
                "variant": variants.get(name.removeprefix("dino_"), {}) if model_dir else {},
                "num_register_tokens": pre.get("num_register_tokens"),
                "centering": pre.get("centering"),
                "n_prototypes": pre.get("n_prototypes"),
                "auroc_mean": cls["value"],
                "auroc_ci": [cls["ci_low"], cls["ci_high"]],
                "auroc_gain": None if model_dir is None else cls["value"] - baseline["value"],
                "auroc_gain_ci": list(gain_ci),
                "dice_lungs": seg["per_class"].get("lungs"),
                "dice_heart": seg["per_class"].get("heart"),
                "pretrain_flops": pre.get("total_flops"),
                "high_norm_share": pre.get("registers", {}).get("high_norm_share"),
            }
        )

    def fmt(value: Any, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    lines = [
        "| model | registers | centering | prototypes | mean AUROC [95% CI] "
        "| vs random [paired 95% CI] | Dice lungs | Dice heart | pretrain FLOPs "
        "| high-norm tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["auroc_ci"]
        glow, ghigh = r["auroc_gain_ci"]
        gain = "–" if r["auroc_gain"] is None else f"{r['auroc_gain']:+.4f}"
        if glow is not None:
            gain += f" [{glow:+.3f}, {ghigh:+.3f}]"
        lines.append(
            f"| {r['model']} | {fmt(r['num_register_tokens'], 'd')} | {r['centering'] or '–'} "
            f"| {fmt(r['n_prototypes'], 'd')} | {r['auroc_mean']:.4f} "
            f"[{fmt(low, '.3f')}, {fmt(high, '.3f')}] | {gain} | {fmt(r['dice_lungs'], '.4f')} "
            f"| {fmt(r['dice_heart'], '.4f')} | {fmt(r['pretrain_flops'], '.3g')} "
            f"| {fmt(r['high_norm_share'], '.2%')} |"
        )
    cio.write_text(out_md, "\n".join(lines) + "\n")
    cio.write_json(out_json, rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m cxrfoundry.train.dino SHARDS OUT [--config JSON] [--seed N] [--work-dir D]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cxrfoundry.train.dino", description=__doc__)
    parser.add_argument("shards", help="shard folder, e.g. results/shards/demo")
    parser.add_argument("out", help="model folder to write, e.g. results/models/dino")
    parser.add_argument("--config", help="JSON file with the dino pretraining config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="checkpoint folder")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = cio.read_json(args.config) if args.config else {}
    try:
        train_dino(args.shards, args.out, cfg, seed=args.seed, work_dir=args.work_dir)
    except TrainingInterrupted as exc:
        log.warning("%s", exc)
        return 3
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
