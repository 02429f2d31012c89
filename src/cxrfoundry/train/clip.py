"""CheXficient CLIP pretraining: curated contrastive training on image-report shards.

``train_clip(shards_dir, out_dir, cfg, seed=...)`` trains :class:`~cxrfoundry.models.clip.
CLIPModel` on the ``train`` split of a shard folder and writes ``out_dir``:

* ``vision/``, ``text/``, ``head.safetensors``, ``clip_config.json`` — the model
  (transformers ``save_pretrained`` layout, safetensors);
* ``config.json`` — the resolved ``clip`` config; ``metrics.json`` — losses, samples, FLOPs,
  throughput, curation counts; ``training_state.pt`` — the final training state;
* ``subset.parquet`` — the curated subset (``image_id``, dataset index, curator category,
  cluster, distance, weight, ``kept``); every train row when curation is off.

The loop (module docstrings of :mod:`.curator`, :mod:`.gradcache`, :mod:`.engine` hold the
details): each epoch draws a seeded permutation of its index pool — the whole train split while
the curator runs (``curator.curation_epochs``), then the kept subset (hard mode) or a weighted
draw (soft mode). Global batches are split across ranks in rank order, so DDP on N ranks and one
process on the whole batch see the same gathered batch, the same curator decisions and the same
loss. Checkpoints go to ``work_dir`` (outside ``out_dir``, which Snakemake deletes when a job
fails) every ``checkpoint_every`` steps and on SIGTERM/SIGUSR1; a rerun resumes from there.

A frozen text tower (``model.text.train_layers: 0``, the demo) is run once over every report
up front and its pooled features are reused every epoch — the projection still trains.

Command line: ``python -m cxrfoundry.train.clip {train,ablation} ...`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cxrfoundry import io as cio
from cxrfoundry.config import deep_merge
from cxrfoundry.models.clip import DEFAULT_MODEL_CONFIG, CLIPModel
from cxrfoundry.models.losses import clip_loss, gather_no_grad, gather_with_grad
from cxrfoundry.train import engine
from cxrfoundry.train.curator import (
    CATEGORY_NAMES,
    KEPT_CATEGORIES,
    CuratorConfig,
    PrototypeCurator,
)
from cxrfoundry.train.gradcache import contrastive_backward, unwrap

log = logging.getLogger(__name__)

MetricsCallback = Callable[[Mapping[str, float], int], None]

DEFAULT_TRAIN_CONFIG: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 64,  # global (all ranks together)
    "micro_batch_size": None,  # per rank; smaller than the rank's batch -> GradCache
    "lr": 5e-4,
    "min_lr_ratio": 0.1,
    "weight_decay": 1e-4,
    "warmup_steps": 20,
    "grad_clip": 1.0,
    "precision": "bf16",  # on GPU; CPU always runs fp32
    "device": "auto",
    "num_workers": 0,
    "cache_row_groups": 64,
    "checkpoint_every": 200,
    "log_every": 10,
    "max_steps": None,  # stop early (smoke tests, benchmarks)
    "text_feature_batch": 128,
}

DEFAULT_CLIP_CONFIG: dict[str, Any] = {
    "model": DEFAULT_MODEL_CONFIG,
    "curator": asdict(CuratorConfig()),
    "train": DEFAULT_TRAIN_CONFIG,
}

CHECKPOINT_NAME = "checkpoint.pt"

#: Keys of the workflow's ``clip`` block that are not training settings (ignored here).
WORKFLOW_KEYS = frozenset({"enabled", "corpus", "eval"})


def resolve_config(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults merged with ``cfg``; unknown ``train``/``curator`` keys raise ``ValueError``."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULT_CLIP_CONFIG) - WORKFLOW_KEYS)
    if unknown:
        raise ValueError(f"clip: unknown keys {unknown}")
    cfg = {k: v for k, v in cfg.items() if k not in WORKFLOW_KEYS}
    unknown = sorted(set(cfg.get("train") or {}) - set(DEFAULT_TRAIN_CONFIG))
    if unknown:
        raise ValueError(f"clip.train: unknown keys {unknown}")
    out = deep_merge(DEFAULT_CLIP_CONFIG, cfg)
    CuratorConfig.from_mapping(out["curator"])  # validates
    return out


# -- data --------------------------------------------------------------------------------------
class _IndexedShards(Dataset):
    """(dataset index, image, report) rows of a :class:`ShardDataset`."""

    def __init__(self, shards_dir: Path, split: str, cache_row_groups: int) -> None:
        from cxrfoundry.data.dataset import ShardDataset

        self.inner = ShardDataset(shards_dir, split, cache_row_groups=cache_row_groups)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.inner[index]
        return {"index": index, "image": sample["image"], "report": sample["report"]}


def _collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
        "image": torch.stack([r["image"] for r in rows]),
        "report": [r["report"] for r in rows],
    }


def read_split_table(shards_dir: Path, split: str, columns: Sequence[str]) -> pa.Table:
    """Columns of every row of ``split``, in :class:`ShardDataset` index order (no pixels)."""
    from cxrfoundry.data.dataset import list_shards

    paths = list_shards(shards_dir, split)
    if not paths:
        raise ValueError(f"{shards_dir}: no shards for split {split!r}")
    return pa.concat_tables([pq.read_table(p, columns=list(columns)) for p in paths])


@torch.no_grad()
def text_tower_features(
    model: CLIPModel, reports: Sequence[str], batch_size: int, device: torch.device
) -> torch.Tensor:
    """Pooled (pre-projection) text-tower features of ``reports`` in fixed-size batches."""
    model.text.eval()
    out = []
    for start in tqdm(range(0, len(reports), batch_size), desc="text features", leave=False):
        tok = model.tokenize(reports[start : start + batch_size])
        out.append(model.text_features(**{k: v.to(device) for k, v in tok.items()}).float())
    return torch.cat(out).cpu() if out else torch.zeros(0)


class _Batches:
    """Global batches of an epoch's index pool, this rank's slice of each (resumable)."""

    def __init__(self, pool: np.ndarray, batch: int, rank: int, world: int, start: int) -> None:
        self.pool, self.batch, self.rank, self.world, self.start = pool, batch, rank, world, start
        self.local = batch // world

    def __len__(self) -> int:
        return max(0, len(self.pool) // self.batch - self.start)

    def __iter__(self):
        for b in range(self.start, len(self.pool) // self.batch):
            chunk = self.pool[b * self.batch : (b + 1) * self.batch]
            yield chunk[self.rank * self.local : (self.rank + 1) * self.local].tolist()


# -- the training loop -------------------------------------------------------------------------
class _Trainer:
    def __init__(
        self,
        shards_dir: Path,
        cfg: dict[str, Any],
        seed: int,
        work_dir: Path,
        log_metrics: MetricsCallback | None,
    ) -> None:
        self.cfg, self.seed, self.work_dir, self.log_metrics = cfg, int(seed), work_dir, log_metrics
        t = cfg["train"]
        self.dist = engine.init_distributed(t["device"])
        engine.seed_everything(self.seed)
        self.device = self.dist.device
        self.autocast = engine.autocast_factory(self.device, t["precision"])
        if t["batch_size"] % self.dist.world_size:
            raise ValueError(
                f"clip.train.batch_size {t['batch_size']} is not divisible by the "
                f"world size {self.dist.world_size}"
            )
        self.data = _IndexedShards(shards_dir, "train", t["cache_row_groups"])
        self.meta = read_split_table(shards_dir, "train", ["image_id", "report"])
        self.n = len(self.data)
        if self.n < t["batch_size"]:
            raise ValueError(
                f"{shards_dir}: {self.n} train rows, fewer than one batch of {t['batch_size']}"
            )
        self.model = CLIPModel(cfg["model"]).to(self.device)
        self.text_cache: torch.Tensor | None = None
        if self.model.text_frozen:
            reports = [r or "" for r in self.meta.column("report").to_pylist()]
            self.text_cache = text_tower_features(
                self.model, reports, t["text_feature_batch"], self.device
            )
        self.ddp: torch.nn.Module = self.model
        if self.dist.distributed:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None,
            )
        self.curator_cfg = CuratorConfig.from_mapping(cfg["curator"])
        self.curator = (
            PrototypeCurator(self.curator_cfg, self.n, self.seed)
            if self.curator_cfg.enabled
            else None
        )
        self.epochs = int(t["epochs"])
        self.batch = int(t["batch_size"])
        self.total_steps = self._planned_steps()
        self.optimizer = engine.build_optimizer(
            self.model, lr=t["lr"], weight_decay=t["weight_decay"]
        )
        self.scheduler = engine.cosine_schedule(
            self.optimizer,
            warmup_steps=t["warmup_steps"],
            total_steps=self.total_steps,
            min_lr_ratio=t["min_lr_ratio"],
        )
        # Loop state (everything below is checkpointed).
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.subset: np.ndarray | None = None  # dataset indices kept after curation
        self.subset_weights: np.ndarray | None = None
        self.flops_per_step: int | None = None
        self.totals = {"samples_seen": 0, "samples_in_loss": 0, "loss_sum": 0.0, "flops": 0.0}
        self.epoch_loss: list[float] = []
        self.losses_this_epoch: list[float] = []
        self.throughput = engine.Throughput(self.device, self.dist.world_size)

    # -- planning ----------------------------------------------------------------------------
    def _curating(self, epoch: int) -> bool:
        return self.curator is not None and epoch < self.curator_cfg.curation_epochs

    def _planned_steps(self) -> int:
        """Steps of the whole run for the lr schedule (the subset size is estimated up front)."""
        full = self.n // self.batch
        if self.curator is None:
            steps = full * self.epochs
        else:
            cur = min(self.epochs, self.curator_cfg.curation_epochs)
            steps = full * cur + self._estimated_subset_steps() * (self.epochs - cur)
        max_steps = self.cfg["train"]["max_steps"]
        return max(1, min(steps, max_steps) if max_steps else steps)

    def _estimated_subset_steps(self) -> int:
        c = self.curator_cfg
        if c.mode == "soft":
            return max(1, int(c.soft_sample_fraction * c.outlier_quantile * self.n) // self.batch)
        # Expected kept share per batch: support band + capped central, per cluster.
        per_cluster = self.batch / c.num_prototypes
        central = min(c.central_cap, c.support_quantile * per_cluster)
        kept = c.num_prototypes * (
            central + (c.outlier_quantile - c.support_quantile) * per_cluster
        )
        return max(1, int(self.n * min(1.0, kept / self.batch)) // self.batch)

    def _pool(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        if self._curating(epoch) or self.curator is None or self.subset is None:
            return rng.permutation(self.n)
        if self.curator_cfg.mode == "soft":
            assert self.subset_weights is not None
            p = self.subset_weights / self.subset_weights.sum()
            size = max(self.batch, int(self.curator_cfg.soft_sample_fraction * len(self.subset)))
            return rng.choice(self.subset, size=size, replace=True, p=p)
        return self.subset[rng.permutation(len(self.subset))]

    # -- one step ----------------------------------------------------------------------------
    def _loss_fn(self, ids: torch.Tensor, curating: bool, stats: dict[str, Any]):
        def fn(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            image_all, text_all = gather_with_grad(image), gather_with_grad(text)
            stats["n"] = image_all.shape[0]
            if not curating:
                stats["kept"] = image_all.shape[0]
                return clip_loss(image_all, text_all, scale)
            ids_all = gather_no_grad(ids.to(image.device)).cpu()
            assert self.curator is not None
            cur = self.curator.step(image_all.detach(), text_all.detach(), ids_all)
            keep = cur.keep.nonzero().squeeze(1).to(image.device)
            stats["kept"] = int(keep.numel())
            weights = (
                cur.weights.to(image.device)[keep] if self.curator_cfg.mode == "soft" else None
            )
            return clip_loss(image_all[keep], text_all[keep], scale, weights)

        return fn

    def _model_batch(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        pixels = self.model.preprocess_images(batch["image"].to(self.device, non_blocking=True))
        if self.text_cache is not None:
            return {
                "pixel_values": pixels,
                "text_feats": self.text_cache[batch["index"]].to(self.device),
            }
        tok = self.model.tokenize(batch["report"])
        return {"pixel_values": pixels, **{k: v.to(self.device) for k, v in tok.items()}}

    def _train_step(self, batch: Mapping[str, Any], curating: bool) -> dict[str, float]:
        t = self.cfg["train"]
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, Any] = {}
        inputs = self._model_batch(batch)
        loss_fn = self._loss_fn(batch["index"], curating, stats)

        def run() -> torch.Tensor:
            loss, _, _ = contrastive_backward(
                self.ddp,
                inputs,
                loss_fn,
                micro_batch_size=t["micro_batch_size"],
                autocast=self.autocast,
            )
            return loss

        if self.flops_per_step is None:
            # Measured once, on a real step; its time is left out of the throughput figure.
            holder: dict[str, torch.Tensor] = {}
            self.flops_per_step = engine.count_flops(lambda: holder.update(loss=run()))
            loss = holder["loss"]
            log.info("FLOPs per step (per rank): %.3g", self.flops_per_step)
            timed = False
        else:
            self.throughput.start()
            loss = run()
            timed = True
        grad_norm = engine.clip_gradients(self.model, t["grad_clip"])
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            # Keep the temperature inside the clamp so its gradient never dies at the bound.
            unwrap(self.ddp).logit_scale.clamp_(0, math.log(self.cfg["model"]["logit_scale_max"]))
        step_flops = float(self.flops_per_step) * self.dist.world_size
        if timed:
            self.throughput.stop(stats["n"], step_flops)
        self.totals["samples_seen"] += stats["n"]
        self.totals["samples_in_loss"] += stats["kept"]
        self.totals["flops"] += step_flops
        value = float(loss)
        self.totals["loss_sum"] += value
        return {
            "loss": value,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "logit_scale": float(self.model.scale().detach()),
            "kept_fraction": stats["kept"] / stats["n"],
        }

    # -- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "config_sha256": cio.sha256_bytes(cio.dumps_json(self.cfg).encode()),
            "seed": self.seed,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "curator": self.curator.state_dict() if self.curator else None,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "subset": self.subset,
            "subset_weights": self.subset_weights,
            "flops_per_step": self.flops_per_step,
            "totals": dict(self.totals),
            "epoch_loss": list(self.epoch_loss),
            "losses_this_epoch": list(self.losses_this_epoch),
            "throughput": {k: getattr(self.throughput, k) for k in ("samples", "seconds", "flops")},
            "rng": engine.rng_state(),
        }

    def load(self, state: Mapping[str, Any]) -> None:
        expected = cio.sha256_bytes(cio.dumps_json(self.cfg).encode())
        if state["config_sha256"] != expected or state["seed"] != self.seed:
            raise ValueError(
                f"{self.work_dir / CHECKPOINT_NAME}: checkpoint was written with another config "
                "or seed; delete it to start over"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.curator and state["curator"]:
            self.curator.load_state_dict(state["curator"])
        self.epoch, self.batch_in_epoch, self.step = (
            state["epoch"],
            state["batch_in_epoch"],
            state["step"],
        )
        self.subset, self.subset_weights = state["subset"], state["subset_weights"]
        self.flops_per_step = state["flops_per_step"]
        self.totals = dict(state["totals"])
        self.epoch_loss = list(state["epoch_loss"])
        self.losses_this_epoch = list(state["losses_this_epoch"])
        for k, v in state["throughput"].items():
            setattr(self.throughput, k, v)
        engine.set_rng_state(state["rng"])
        log.info(
            "resumed at epoch %d batch %d (step %d)", self.epoch, self.batch_in_epoch, self.step
        )

    def checkpoint(self) -> None:
        if self.dist.is_main:
            engine.save_checkpoint(self.work_dir / CHECKPOINT_NAME, self.state())
        engine.barrier()

    # -- the loop ----------------------------------------------------------------------------
    def _finish_curation(self) -> None:
        assert self.curator is not None
        kept = np.isin(self.curator.category, KEPT_CATEGORIES)
        self.subset = np.flatnonzero(kept)
        self.subset_weights = self.curator.weight[self.subset].astype(np.float64)
        if len(self.subset) < self.batch:
            raise ValueError(
                f"curation kept {len(self.subset)} samples, fewer than one batch of {self.batch}"
            )
        log.info("curation done: %d of %d train samples kept", len(self.subset), self.n)

    def run(self, stop: engine.StopFlag) -> str:
        t = self.cfg["train"]
        max_steps = t["max_steps"]
        bar = tqdm(
            total=self.total_steps, initial=self.step, desc="clip", disable=not self.dist.is_main
        )
        while self.epoch < self.epochs:
            curating = self._curating(self.epoch)
            batches = _Batches(
                self._pool(self.epoch),
                self.batch,
                self.dist.rank,
                self.dist.world_size,
                self.batch_in_epoch,
            )
            loader = DataLoader(
                self.data,
                batch_sampler=batches,
                num_workers=t["num_workers"],
                collate_fn=_collate,
                # Its own generator: creating the iterator must not draw from the global RNG,
                # or a resumed epoch would see different dropout masks.
                generator=torch.Generator().manual_seed(self.seed + self.epoch),
            )
            for batch in loader:
                metrics = self._train_step(batch, curating)
                self.losses_this_epoch.append(metrics["loss"])
                self.step += 1
                self.batch_in_epoch += 1
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}", kept=f"{metrics['kept_fraction']:.2f}"
                )
                if self.log_metrics and self.dist.is_main and self.step % t["log_every"] == 0:
                    self.log_metrics(metrics, self.step)
                if max_steps and self.step >= max_steps:
                    bar.close()
                    return "max_steps"
                if engine.any_rank(bool(stop), self.device):
                    self.checkpoint()
                    bar.close()
                    return "preempted"
                if t["checkpoint_every"] and self.step % t["checkpoint_every"] == 0:
                    self.checkpoint()
            losses, self.losses_this_epoch = self.losses_this_epoch, []
            self.epoch_loss.append(float(np.mean(losses)) if losses else float("nan"))
            if curating and not self._curating(self.epoch + 1):
                self._finish_curation()
            self.epoch += 1
            self.batch_in_epoch = 0
        bar.close()
        return "completed"

    # -- outputs -----------------------------------------------------------------------------
    def subset_table(self) -> pa.Table:
        ids = self.meta.column("image_id")
        if self.curator is None:
            n = self.n
            return pa.table(
                {
                    "image_id": ids,
                    "index": pa.array(np.arange(n), pa.int64()),
                    "category": pa.array(["uncurated"] * n),
                    "cluster": pa.array(np.full(n, -1), pa.int16()),
                    "distance": pa.array(np.full(n, np.nan), pa.float32()),
                    "weight": pa.array(np.ones(n), pa.float32()),
                    "kept": pa.array(np.ones(n, dtype=bool)),
                }
            )
        c = self.curator
        kept = np.zeros(self.n, dtype=bool)
        if self.subset is not None:
            kept[self.subset] = True
        return pa.table(
            {
                "image_id": ids,
                "index": pa.array(np.arange(self.n), pa.int64()),
                "category": pa.array([CATEGORY_NAMES[int(v)] for v in c.category]),
                "cluster": pa.array(c.cluster, pa.int16()),
                "distance": pa.array(c.distance, pa.float32()),
                "weight": pa.array(c.weight, pa.float32()),
                "kept": pa.array(kept),
            }
        )

    def metrics(self, status: str) -> dict[str, Any]:
        steps = max(1, self.step)
        subset_size = self.n if self.subset is None else len(self.subset)
        out: dict[str, Any] = {
            "status": status,
            "steps": self.step,
            "epochs_completed": self.epoch,
            "world_size": self.dist.world_size,
            "global_batch_size": self.batch,
            "train_samples": self.n,
            "subset_size": int(subset_size),
            "subset_fraction": subset_size / self.n,
            "samples_seen": self.totals["samples_seen"],
            "samples_in_loss": self.totals["samples_in_loss"],
            "mean_loss": self.totals["loss_sum"] / steps,
            "epoch_loss": self.epoch_loss,
            "flops_per_step": (self.flops_per_step or 0) * self.dist.world_size,
            "total_flops": self.totals["flops"],
            "device": str(self.device),
            **self.throughput.summary(),
        }
        if self.curator is not None:
            out["curation"] = self.curator.summary()
        return out

    def write_outputs(self, out_dir: Path, metrics: Mapping[str, Any]) -> None:
        with cio.atomic_dir(out_dir) as tmp:
            self.model.save_pretrained(tmp)
            cio.write_json(tmp / "config.json", {"clip": self.cfg, "seed": self.seed})
            cio.write_json(tmp / "metrics.json", dict(metrics))
            cio.write_parquet(tmp / "subset.parquet", self.subset_table())
            torch.save(self.state(), tmp / "training_state.pt")


def train_clip(
    shards_dir: str | Path,
    out_dir: str | Path,
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
    work_dir: str | Path | None = None,
    log_metrics: MetricsCallback | None = None,
) -> dict[str, Any]:
    """Train CLIP on ``shards_dir``'s train split; write ``out_dir`` (module docstring).

    Args:
        shards_dir: a shard folder with ``index.json`` (``results/shards/{corpus}``).
        out_dir: the model folder, replaced atomically when training completes.
        cfg: the ``clip`` config block (see :data:`DEFAULT_CLIP_CONFIG`); missing keys default.
        seed: root seed (model init, batch order, curator k-means).
        work_dir: where checkpoints live between runs (default ``{out_dir}.work``); a checkpoint
            found there is resumed.
        log_metrics: ``callback(metrics, step)`` every ``train.log_every`` steps (rank 0).

    Returns the metrics dict (also ``metrics.json``); ``status`` is ``completed`` or
    ``max_steps`` (outputs written) or ``preempted`` (checkpoint written, no outputs).
    """
    resolved = resolve_config(cfg)
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    trainer = _Trainer(Path(shards_dir), resolved, seed, work, log_metrics)
    state = engine.load_checkpoint(work / CHECKPOINT_NAME)
    if state is not None:
        trainer.load(state)
    stop = engine.StopFlag()
    with stop.installed():
        status = trainer.run(stop)
    metrics = trainer.metrics(status)
    if status != "preempted" and trainer.dist.is_main:
        trainer.write_outputs(out, metrics)
        (work / CHECKPOINT_NAME).unlink(missing_ok=True)
        if work.is_dir() and not any(work.iterdir()):
            work.rmdir()  # leave no empty work folder behind a completed run
    engine.barrier()
    log.info("clip training %s after %d steps", status, trainer.step)
    return metrics


def pretrain_clip(
    shards_dir: str | Path,
    out_dir: str | Path,
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
    work_dir: str | Path,
    gpus: int = 0,
    nodes: int = 1,
    log_metrics: MetricsCallback | None = None,
) -> dict[str, Any]:
    """The rule's entry: :func:`train_clip` in-process for 0-1 GPU on one node, else the same
    training under ``torchrun`` (or ``srun ... torchrun``) via :mod:`cxrfoundry.train.launch`,
    returning the ``metrics.json`` it wrote. A pre-empted run raises ``RuntimeError`` so the
    job fails, keeps its checkpoint in ``work_dir`` and resumes when rerun."""
    if gpus <= 1 and nodes <= 1:
        metrics = train_clip(
            shards_dir, out_dir, cfg, seed=seed, work_dir=work_dir, log_metrics=log_metrics
        )
    else:
        import subprocess

        from cxrfoundry.train.launch import build_command

        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        cfg_path = work / "launch_config.json"
        cio.write_json(cfg_path, {"clip": dict(cfg or {})})
        entry = [
            "-m",
            "cxrfoundry.train.clip",
            "train",
            str(shards_dir),
            str(out_dir),
            "--config",
            str(cfg_path),
            "--seed",
            str(seed),
            "--work-dir",
            str(work),
        ]
        plan = build_command(entry, gpus=gpus, nodes=nodes)
        log.info("launching: %s", plan.shell())
        proc = subprocess.run(plan.command, check=False)
        metrics_path = Path(out_dir) / "metrics.json"
        if proc.returncode != 0 or not metrics_path.is_file():
            raise RuntimeError(
                f"distributed CLIP training exited {proc.returncode}: {plan.shell()}"
            )
        metrics = cio.read_json(metrics_path)
    if metrics["status"] == "preempted":
        raise RuntimeError(
            f"CLIP training pre-empted at step {metrics['steps']}; checkpoint in {work_dir}, "
            "rerun to resume"
        )
    return metrics


# -- ablation ----------------------------------------------------------------------------------
def run_ablation(
    shards_dir: str | Path,
    out_dir: str | Path,
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
    split: str | None = None,
) -> dict[str, Any]:
    """Curated vs uncurated training at equal epochs; zero-shot AUROC of each on ``split``.

    ``cfg`` is the workflow's ``clip`` block; its ``eval`` settings (``split``, ``findings``,
    ``min_per_class``, ``n_boot``) apply to both evaluations, ``split`` overrides them.
    Writes ``{out_dir}/{curated,uncurated}/`` (models), ``{out_dir}/{name}.zeroshot.json``,
    ``{out_dir}/ablation.json`` and ``{out_dir}/ablation.md`` and returns the summary.
    """
    from cxrfoundry.eval.zeroshot import zeroshot_eval

    out = Path(out_dir)
    ev = dict((cfg or {}).get("eval") or {})
    split = split or ev.get("split", "test")
    rows = {}
    for name, enabled in (("curated", True), ("uncurated", False)):
        run_cfg = copy.deepcopy(dict(cfg or {}))
        run_cfg.setdefault("curator", {})["enabled"] = enabled
        model_dir = out / name
        started = time.perf_counter()
        metrics = train_clip(shards_dir, model_dir, run_cfg, seed=seed)
        wall = time.perf_counter() - started  # informational: the only non-reproducible field
        zs = zeroshot_eval(
            model_dir,
            shards_dir,
            out / f"{name}.zeroshot.json",
            split=split,
            findings=ev.get("findings"),
            min_per_class=ev.get("min_per_class", 5),
            n_boot=ev.get("n_boot", 200),
            seed=seed,
            model_name=f"clip-{name}",
        )
        rows[name] = {
            "subset_size": metrics["subset_size"],
            "train_samples": metrics["train_samples"],
            "samples_seen": metrics["samples_seen"],
            "samples_in_loss": metrics["samples_in_loss"],
            "total_flops": metrics["total_flops"],
            "steps": metrics["steps"],
            "train_wall_s": round(wall, 1),
            "mean_auroc": zs["value"],
            "auroc_ci": [zs["ci_low"], zs["ci_high"]],
        }
    ratio = rows["curated"]["mean_auroc"] / rows["uncurated"]["mean_auroc"]
    summary = {
        "runs": rows,
        "auroc_ratio_curated_over_uncurated": ratio,
        "claim_holds": bool(
            ratio >= 0.95 and rows["curated"]["subset_size"] < rows["uncurated"]["subset_size"]
        ),
        "seed": seed,
        "split": split,
    }
    cio.write_json(out / "ablation.json", summary)
    lines = [
        "| run | subset | steps | samples seen | samples in loss | FLOPs | train wall s "
        "| mean AUROC (95 % CI) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lo, hi = r["auroc_ci"]
        ci = f" ({lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else ""
        lines.append(
            f"| {name} | {r['subset_size']}/{r['train_samples']} | {r['steps']} | "
            f"{r['samples_seen']} | {r['samples_in_loss']} | {r['total_flops']:.3g} | "
            f"{r['train_wall_s']} | {r['mean_auroc']:.4f}{ci} |"
        )
    lines.append(f"\nAUROC ratio curated/uncurated: {ratio:.3f}")
    cio.write_text(out / "ablation.md", "\n".join(lines) + "\n")
    return summary


def _load_clip_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    return data.get("clip", data)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cxrfoundry.train.clip {train,ablation} SHARDS OUT [--config Y] [--seed N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m cxrfoundry.train.clip",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["train", "ablation"])
    parser.add_argument("shards", help="shard folder, e.g. results/shards/demo")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--config", help="YAML file with a clip: block (or the block itself)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override, e.g. --set train.epochs=2 (value parsed as JSON)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--work-dir", help="checkpoint folder (default: OUT.work)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = _load_clip_config(args.config)
    for item in args.set:
        key, _, raw = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = json.loads(raw)
        except json.JSONDecodeError:
            node[leaf] = raw
    if args.command == "train":
        result = train_clip(args.shards, args.out, cfg, seed=args.seed, work_dir=args.work_dir)
        if result["status"] == "preempted":
            print(cio.dumps_json(result))
            return 75  # EX_TEMPFAIL: checkpointed, rerun to resume
    else:
        result = run_ablation(args.shards, args.out, cfg, seed=args.seed)
    print(cio.dumps_json(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
