"""The launcher picks single-process, torchrun --standalone or srun + torchrun from resources."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cxrfoundry.train.launch import build_command, detect_gpus, detect_nodes, first_node

ENTRY = ["-m", "cxrfoundry.train.clip", "--out", "results/models/clip"]
PY = "/opt/py/bin/python"


def test_single_process_on_cpu_or_one_gpu() -> None:
    for gpus in (0, 1):
        plan = build_command(ENTRY, gpus=gpus, nodes=1, env={}, python=PY)
        assert plan.mode == "single" and plan.command == [PY, *ENTRY]


def test_several_gpus_use_torchrun_standalone() -> None:
    plan = build_command(ENTRY, gpus=4, nodes=1, env={}, python=PY)
    assert plan.mode == "standalone" and plan.nproc_per_node == 4
    assert plan.command == [
        PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", *ENTRY
    ]  # fmt: skip


def test_multinode_uses_srun_and_c10d_rendezvous() -> None:
    env = {"SLURM_JOB_ID": "77", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NUM_NODES": "2"}
    plan = build_command(ENTRY, env=env, python=PY, rdzv_host="gpu01")
    assert plan.mode == "multinode" and (plan.nodes, plan.nproc_per_node) == (2, 4)
    cmd = plan.command
    assert cmd[:5] == [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--ntasks=2",
        "--kill-on-bad-exit=1",
    ]
    torchrun = cmd[5:]
    assert torchrun[:3] == [PY, "-m", "torch.distributed.run"]
    for flag in ("--nnodes=2", "--nproc_per_node=4", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=gpu01:29500", "--rdzv-id=77"):  # fmt: skip
        assert flag in torchrun
    assert torchrun[-len(ENTRY) :] == ENTRY


def test_resources_from_slurm_environment() -> None:
    assert detect_gpus({"SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0"}) == 2
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert detect_gpus({}) == 0
    assert detect_nodes({"SLURM_JOB_NUM_NODES": "3"}) == 3 and detect_nodes({}) == 1
    # Explicit resources win over the environment.
    plan = build_command(ENTRY, gpus=1, nodes=1, env={"SLURM_GPUS_ON_NODE": "8"}, python=PY)
    assert plan.mode == "single"


def test_first_node_parses_a_nodelist_without_scontrol(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert first_node({"SLURM_JOB_NODELIST": "gpu[03-05,07],cpu1"}) == "gpu03"
    assert first_node({"SLURM_JOB_NODELIST": "node7"}) == "node7"
    assert first_node({}) == "127.0.0.1"


def test_cpu_processes_for_distributed_tests() -> None:
    plan = build_command(["train.py"], gpus=0, nodes=1, env={}, python=PY, cpu_procs=2)
    assert plan.mode == "standalone" and "--nproc_per_node=2" in plan.command


def test_bad_requests_are_rejected() -> None:
    with pytest.raises(ValueError, match="entry point"):
        build_command([], gpus=0, nodes=1, env={})
    with pytest.raises(ValueError, match="invalid resources"):
        build_command(ENTRY, gpus=-1, nodes=1, env={})


def test_cli_dry_run_and_real_run(tmp_path) -> None:
    script = tmp_path / "hello.py"
    script.write_text("import sys; print('hello', *sys.argv[1:])\n")
    dry = subprocess.run(
        [sys.executable, "-m", "cxrfoundry.train.launch", "--gpus", "2", "--nodes", "1",
         "--dry-run", "--", "-m", "x.y", "--lr", "1"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m x.y --lr 1" in dry.stdout
    real = subprocess.run(
        [sys.executable, "-m", "cxrfoundry.train.launch", "--gpus", "0", "--", str(script), "a"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert real.stdout.strip() == "hello a"
