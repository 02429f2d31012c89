"""Generic training utilities shared by the pretraining stages (CLIP, DINO, diffusion).

* distributed init from the torchrun environment (gloo on CPU, nccl on GPU);
* AdamW with decoupled decay on matrices only, cosine schedule with linear warm-up;
* bf16 autocast on GPU;
* FLOP accounting with :class:`torch.utils.flop_counter.FlopCounterMode` (one step measured,
  multiplied by the step count), samples/s and MFU against a peak-FLOPs table;
* checkpoints written atomically, periodically and when SIGTERM/SIGUSR1 arrives (Slurm's
  pre-emption warning), holding model, optimiser, scheduler, RNG states and loop position so a
  resumed run continues bit-identically.

The checkpoint and signal helpers here are minimal on purpose: ``cxrfoundry.train.checkpoint``
(a colleague's module) is the long-term home; once it lands these can delegate to it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cxrfoundry.io import atomic_path

log = logging.getLogger(__name__)

#: Dense bf16 peak FLOP/s per GPU (vendor datasheets, without sparsity); matched by substring.
PEAK_FLOPS_BF16: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12 (matched first below)
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,  # fp16 tensor cores (no bf16)
}


# -- distributed -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        """True for a multi-process run."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that writes files)."""
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group from torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK).

    Without those variables it returns a single-process :class:`DistInfo`. ``device``: ``auto``
    (CUDA when available), ``cpu`` or ``cuda``. The backend is nccl on CUDA, gloo on CPU.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        log.info("process group up: rank %d/%d on %s", rank, world, dev)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def barrier() -> None:
    """Synchronise ranks (no-op single-process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state a training loop consumes (for exact resume)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state` output."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- optimisation ------------------------------------------------------------------------------
def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (biases, norms, scalars such as the logit scale
    are not decayed). Frozen parameters are left out."""
    decay, no_decay = [], []
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def cosine_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base lr, then cosine decay to ``min_lr_ratio`` × base lr."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(model: nn.Module, max_norm: float | None) -> float:
    """Clip the global gradient norm (when ``max_norm``) and return the pre-clip norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


def autocast_factory(device: torch.device, precision: str) -> Callable[[], Any]:
    """A zero-argument factory of the autocast context: bf16 on CUDA when asked, else none.

    On CPU bf16 autocast is slower than fp32 on most hosts and changes numerics; it stays off.
    """
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    if device.type == "cuda" and precision == "bf16":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


# -- FLOPs and throughput ----------------------------------------------------------------------
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (forward and any backward it runs), by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device`` from :data:`PEAK_FLOPS_BF16`; None on CPU/unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS_BF16, key=len, reverse=True):
        if key in name:
            return PEAK_FLOPS_BF16[key]
    return None


class Throughput:
    """Samples/s, achieved FLOP/s and MFU over the timed steps of a run."""

    def __init__(self, device: torch.device, world_size: int = 1) -> None:
        self.device = device
        self.world_size = world_size
        self.samples = 0
        self.seconds = 0.0
        self.flops = 0.0
        self._t0: float | None = None

    def start(self) -> None:
        """Mark the start of a timed step."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()

    def stop(self, samples: int, flops: float) -> None:
        """Close a timed step of ``samples`` samples (global) and ``flops`` FLOPs (global)."""
        if self._t0 is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - self._t0
        self.samples += samples
        self.flops += flops
        self._t0 = None

    def summary(self) -> dict[str, float | None]:
        """samples_per_s, flops_per_s (achieved, global) and mfu (None without a peak)."""
        if self.seconds <= 0:
            return {"samples_per_s": None, "flops_per_s": None, "mfu": None}
        achieved = self.flops / self.seconds
        peak = peak_flops(self.device)
        return {
            "samples_per_s": self.samples / self.seconds,
            "flops_per_s": achieved,
            "mfu": achieved / (peak * self.world_size) if peak else None,
        }


# -- checkpoints and signals -------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """``torch.save`` ``state`` atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)
    log.info("checkpoint written: %s", path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Load a checkpoint written by :func:`save_checkpoint`; None when there is none."""
    target = Path(path)
    if not target.is_file():
        return None
    try:
        return torch.load(target, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt file must not be mistaken for "no checkpoint"
        raise ValueError(f"{target}: unreadable checkpoint ({exc})") from exc


class StopFlag:
    """Set by SIGTERM/SIGUSR1 while installed; the loop checkpoints and stops at the next step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("signal %s received: checkpointing at the end of this step", signum)
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Install the handlers for the duration of the block (main thread only)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank (so every rank stops at the same step)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
