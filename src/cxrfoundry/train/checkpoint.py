"""Preemption-safe training: atomic checkpoints, a stop-on-signal flag and exact resume.

A training loop that uses these utilities can be killed by Slurm (preemption, time limit) and
restarted with the same command, and end with the same weights as an uninterrupted run::

    sampler = ResumableSampler(len(dataset), seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=16, sampler=sampler,
                        generator=torch.Generator())          # see "RNG" below
    ckpts = CheckpointManager(ckpt_dir, every_steps=500)
    state = ckpts.resume(model, optimizer, scheduler)          # None on a fresh start
    step, epoch, batch = (state.step, state.epoch, state.batch) if state else (0, 0, 0)
    with StopSignal() as stop:
        while epoch < epochs:
            sampler.set_epoch(epoch, start=batch * loader.batch_size)
            for x, y in loader:
                ...; optimizer.step(); scheduler.step(); step += 1; batch += 1
                if ckpts.due(step) or stop.requested:
                    ckpts.save(step=step, epoch=epoch, batch=batch, model=model,
                               optimizer=optimizer, scheduler=scheduler)
                if stop.requested:
                    stop.exit()                                # status 128 + signal
            epoch, batch = epoch + 1, 0
    ckpts.clear()                                              # the final weights are written

What a checkpoint holds: model, optimizer and scheduler state dicts, the step, epoch and
position in the epoch (so the sampler resumes mid-epoch), the Python, NumPy, torch CPU and CUDA
RNG states, and free-form ``extra``. Files are written to a temporary name, fsynced and renamed,
so a job killed while saving leaves the previous checkpoint intact; the newest ``keep`` are kept.

Signals: :class:`StopSignal` turns SIGTERM (Slurm's preemption and time-limit signal, and what
``--signal=TERM@120`` sends ahead of the limit) and SIGUSR1 into a flag; the loop saves at the next
step boundary and exits with ``128 + signal`` (143 for SIGTERM), which Snakemake reports as a
failed attempt: Slurm requeues a preempted job itself (``sbatch --requeue``) and Snakemake's
``--retries`` resubmits a timed-out one; either way the next run resumes here. Keep the
checkpoint folder outside the rule's declared outputs: Snakemake deletes the outputs of a failed
job before it is retried.

RNG: the restored RNG state is the one at the checkpoint, so nothing may draw from the global RNG
between the checkpoint and the next step except the training step itself. A ``DataLoader`` draws
a seed from the global torch RNG each time it starts an epoch unless it has its own
``generator``: give it one (as above), or resumed runs diverge from the first dropout on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import numpy as np
import torch

from cxrfoundry.io import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d{9})\.pt$")
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


# ------------------------------------------------------------------------------------ RNG state
def capture_rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch CPU and (if present) CUDA RNG states, as checkpointable values."""
    np_state = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------- sampler
class ResumableSampler(torch.utils.data.Sampler[int]):
    """A seeded shuffling sampler that can start mid-epoch and shard across ranks.

    The order of epoch ``e`` is a permutation drawn from ``seed + e`` (independent of the global
    RNG); :meth:`set_epoch` selects the epoch and the number of samples already consumed in it.
    With ``world_size > 1`` each rank takes every ``world_size``-th index (like
    ``DistributedSampler``; the tail is dropped so ranks get equal counts).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples < 1:
            raise ValueError("ResumableSampler needs at least one sample")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch ``epoch``'s order, skipping the first ``start`` samples of this rank."""
        self.epoch, self.start = int(epoch), int(start)

    def _indices(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank = self.num_samples // self.world_size
        return order[self.rank : per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return self.num_samples // self.world_size - self.start

    def state_dict(self) -> dict[str, int]:
        """Epoch and position (samples consumed) of this sampler."""
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed}


# ---------------------------------------------------------------------------------- the signal
class StopSignal:
    """Context manager that turns SIGTERM/SIGUSR1 into :attr:`requested` (checked per step).

    The handler only sets a flag: saving inside a signal handler could interleave with an
    optimizer step and write an inconsistent state. A second signal while a stop is already
    pending is ignored. ``requeue=True`` additionally asks Slurm to requeue the job
    (``scontrol requeue $SLURM_JOB_ID``) in :meth:`exit`, for sites that send a warning signal
    before the time limit and want the same job id to continue.
    """

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS, *, requeue: bool = False) -> None:
        self.signals = tuple(signals)
        self.requeue = requeue
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """True once one of the signals arrived."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            # logging from a handler is safe enough here: it runs between bytecodes.
            log.warning(
                "received %s: checkpointing at the next step boundary", signal.Signals(signum).name
            )

    def __enter__(self) -> StopSignal:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        """``128 + signal``: what a shell reports for a process stopped by that signal."""
        return 128 + int(self.signum or signal.SIGTERM)

    def exit(self) -> NoReturn:
        """Leave the process after the checkpoint, requeueing the Slurm job if asked to."""
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue and job:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["scontrol", "requeue", job], timeout=30, check=True)
                log.warning("asked Slurm to requeue job %s", job)
        logging.shutdown()
        sys.exit(self.exit_code)


# --------------------------------------------------------------------------------- checkpoints
@dataclass
class ResumeState:
    """Where a resumed run continues: counters and the free-form ``extra`` saved with them."""

    step: int
    epoch: int
    batch: int
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    epoch: int = 0,
    batch: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write one checkpoint file atomically (temp file, fsync, rename) and return its path."""
    payload = {
        "format": 1,
        "step": int(step),
        "epoch": int(epoch),
        "batch": int(batch),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(),
        "extra": extra or {},
        "saved_at": time.time(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    map_location: str | torch.device = "cpu",
    restore_rng: bool = True,
) -> ResumeState:
    """Load a checkpoint into ``model``/``optimizer``/``scheduler`` and restore the RNG states."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != 1:
        raise ValueError(f"{path}: not a cxrfoundry checkpoint (format 1)")
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise ValueError(f"{path}: saved without optimizer state")
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None:
        if payload["scheduler"] is None:
            raise ValueError(f"{path}: saved without scheduler state")
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng:
        restore_rng_state(payload["rng"])
    return ResumeState(
        step=payload["step"],
        epoch=payload["epoch"],
        batch=payload["batch"],
        path=Path(path),
        extra=payload.get("extra") or {},
    )


class CheckpointManager:
    """Numbered checkpoints in one folder: periodic saves, resume from the newest, pruning.

    ``every_steps`` and/or ``every_seconds`` make :meth:`due` true periodically. Only rank 0
    writes (``rank`` defaults to ``$RANK``); every rank resumes from the same file.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep: int = 2,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        rank: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self._last_save = time.monotonic()

    def checkpoints(self) -> list[Path]:
        """Existing checkpoint files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if CHECKPOINT_RE.match(p.name)]
        return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """The newest checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def due(self, step: int) -> bool:
        """Whether a periodic checkpoint is due after ``step``."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_seconds and time.monotonic() - self._last_save >= self.every_seconds)

    def save(self, *, step: int, **state: Any) -> Path | None:
        """Save (rank 0 only) ``step`` and the :func:`save_checkpoint` keyword ``state``."""
        self._last_save = time.monotonic()
        if self.rank != 0:
            return None
        path = save_checkpoint(self.directory / f"step-{step:09d}.pt", step=step, **state)
        for old in self.checkpoints()[: -self.keep]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        log.info("checkpoint %s", path)
        return path

    def resume(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        map_location: str | torch.device = "cpu",
    ) -> ResumeState | None:
        """Load the newest checkpoint into the given objects; None if there is none."""
        path = self.latest()
        if path is None:
            return None
        state = load_checkpoint(
            path, model=model, optimizer=optimizer, scheduler=scheduler, map_location=map_location
        )
        log.info("resuming from %s (step %d, epoch %d)", path, state.step, state.epoch)
        return state

    def clear(self) -> None:
        """Delete every checkpoint (after the final weights are safely written)."""
        for path in self.checkpoints():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(OSError):
            self.directory.rmdir()
