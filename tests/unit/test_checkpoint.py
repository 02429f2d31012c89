"""Preemption: a training run stopped by SIGTERM part-way and rerun ends bit-identical to an
uninterrupted run (CPU, deterministic algorithms, dropout + momentum + LR schedule + shuffling)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cxrfoundry.train.checkpoint import (
    CheckpointManager,
    ResumableSampler,
    StopSignal,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

TRAIN = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from safetensors.torch import save_file
    from cxrfoundry.train.checkpoint import CheckpointManager, ResumableSampler, StopSignal

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    out, ckpt_dir = Path(sys.argv[1]), Path(sys.argv[2])
    pause_at = int(os.environ.get("PAUSE_AT", "-1"))
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(96, 8), torch.randint(0, 3, (96,)))
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    sampler = ResumableSampler(len(data), seed=1)
    loader = DataLoader(data, batch_size=8, sampler=sampler, generator=torch.Generator())
    ckpts = CheckpointManager(ckpt_dir, every_steps=10)
    state = ckpts.resume(model, opt, sched)
    step, epoch, batch = (state.step, state.epoch, state.batch) if state else (0, 0, 0)
    print("start", step, flush=True)
    with StopSignal() as stop:
        while epoch < 3:
            sampler.set_epoch(epoch, start=batch * loader.batch_size)
            for x, y in loader:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                batch += 1
                if step == pause_at:
                    # Stand still until the test's SIGTERM arrives (a mid-run preemption).
                    (ckpt_dir.parent / "paused").write_text(str(step))
                    deadline = time.monotonic() + 30
                    while not stop.requested and time.monotonic() < deadline:
                        time.sleep(0.01)
                if ckpts.due(step) or stop.requested:
                    ckpts.save(step=step, epoch=epoch, batch=batch, model=model,
                               optimizer=opt, scheduler=sched)
                if stop.requested:
                    stop.exit()
            epoch, batch = epoch + 1, 0
    save_file(model.state_dict(), str(out))
    ckpts.clear()
    print("done", step, flush=True)
    """
)


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_sigterm_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    # Reference: one uninterrupted run.
    ref = tmp_path / "ref"
    ref.mkdir()
    subprocess.run(
        [sys.executable, str(script), str(ref / "w.safetensors"), str(ref / "ckpt")],
        env=_env(),
        check=True,
        timeout=120,
    )
    # Interrupted run: SIGTERM arrives at step 23 (between periodic checkpoints 20 and 30).
    run = tmp_path / "run"
    run.mkdir()
    cmd = [sys.executable, str(script), str(run / "w.safetensors"), str(run / "ckpt")]
    proc = subprocess.Popen(
        cmd, env={**_env(), "PAUSE_AT": "23"}, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not (run / "paused").exists():
        assert proc.poll() is None, "training exited before reaching the pause"
        assert time.monotonic() < deadline, "training never reached step 23"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert not (run / "w.safetensors").exists()
    saved = sorted(p.name for p in (run / "ckpt").iterdir())
    # keep=2: the periodic step-20 checkpoint and the one written on the signal at step 23.
    assert saved == ["step-000000020.pt", "step-000000023.pt"], saved

    # Rerun: resumes at step 23 and finishes; the final weights equal the reference bitwise.
    resumed = subprocess.run(
        cmd, env=_env(), capture_output=True, text=True, check=True, timeout=120
    )
    assert "start 23" in resumed.stdout and "done 36" in resumed.stdout, resumed.stdout
    got, want = _weights(run / "w.safetensors"), _weights(ref / "w.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs after resume"
    assert not (run / "ckpt").exists(), "checkpoints are cleared after the final weights"


def test_checkpoint_restores_all_rng_streams(tmp_path: Path) -> None:
    """The RNG state is restored exactly: drawing after a save/load pair repeats the draws."""
    model = torch.nn.Linear(2, 2)
    torch.manual_seed(5)
    path = save_checkpoint(tmp_path / "c.pt", step=1, model=model)
    expected = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    load_checkpoint(path, model=model)
    again = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_rng_state_roundtrip() -> None:
    state = capture_rng_state()
    a = torch.randn(4)
    restore_rng_state(state)
    assert torch.equal(a, torch.randn(4))


def test_manager_prunes_and_reports_latest(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    manager = CheckpointManager(tmp_path / "ck", keep=2, every_steps=5)
    assert manager.latest() is None and manager.resume(model) is None
    assert manager.due(5) and not manager.due(6)
    for step in (5, 10, 15):
        manager.save(step=step, model=model)
    assert [p.name for p in manager.checkpoints()] == ["step-000000010.pt", "step-000000015.pt"]
    assert manager.resume(model).step == 15
    # A non-zero rank never writes.
    assert CheckpointManager(tmp_path / "ck", rank=1).save(step=20, model=model) is None


def test_corrupt_checkpoint_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "step-000000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"step-000000001\.pt"):
        load_checkpoint(bad, model=torch.nn.Linear(1, 1))


def test_sampler_resumes_mid_epoch_and_shards() -> None:
    full = list(ResumableSampler(10, seed=3))
    sampler = ResumableSampler(10, seed=3)
    sampler.set_epoch(0, start=4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(10)) and list(sampler) != full
    ranks = [list(ResumableSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert sum(len(r) for r in ranks) == 9 and not set(ranks[0]) & set(ranks[1])


def test_stop_signal_sets_flag_and_restores_handler() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.exit_code == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before
