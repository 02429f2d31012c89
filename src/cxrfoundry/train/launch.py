"""Run a training entry point single-process, under ``torchrun`` on one node, or across nodes.

Training rules call one entry point (a module or script) through this launcher; the launcher
chooses how to start it from the job's resources and Slurm's environment:

* 0 or 1 GPU on one node: ``python -m MODULE ARGS`` (single process, GPU or CPU);
* N > 1 GPUs on one node: ``torchrun --standalone --nproc_per_node N -m MODULE ARGS``;
* M > 1 nodes: ``srun --nodes M --ntasks-per-node 1 torchrun --nnodes M --nproc_per_node N
  --rdzv-backend c10d --rdzv-endpoint FIRST_NODE:PORT --rdzv-id JOB_ID -m MODULE ARGS``.

``torchrun`` is run as ``python -m torch.distributed.run`` with the launcher's interpreter, so it
uses the same environment as the workflow. Inside the entry point, :func:`init_distributed` sets
up the process group (NCCL on GPUs, Gloo on CPU) when the launcher started several processes.

Command line (what training rules use)::

    cxrfoundry launch --gpus {resources.gpu} --nodes {resources.nodes} -- \\
        -m cxrfoundry.train.clip --config {input.config} --out {output.model}
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_RDZV_PORT = 29500


@dataclass(frozen=True)
class LaunchPlan:
    """How an entry point will be started."""

    mode: str  # "single" | "standalone" | "multinode"
    nodes: int
    nproc_per_node: int
    command: list[str]

    def shell(self) -> str:
        """The command as one shell-quoted string (for logs)."""
        return shlex.join(self.command)


def _int_env(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name, "").strip()
        # SLURM_GPUS_ON_NODE is a count; SLURM_TASKS_PER_NODE can read "2(x3)".
        match = re.match(r"^(\d+)", value)
        if match:
            return int(match.group(1))
    return None


def detect_gpus(env: Mapping[str, str] | None = None) -> int:
    """GPUs this job may use on its node: Slurm's count, else ``CUDA_VISIBLE_DEVICES``, else 0."""
    env = os.environ if env is None else env
    count = _int_env(env, "SLURM_GPUS_ON_NODE")
    if count is not None:
        return count
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return 0


def detect_nodes(env: Mapping[str, str] | None = None) -> int:
    """Nodes of the Slurm allocation (1 outside Slurm)."""
    env = os.environ if env is None else env
    return _int_env(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1


def _job_nodelist(job_id: str) -> str | None:
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\bNodeList=(\S+)", out)
    return match.group(1) if match and match.group(1) != "(null)" else None


def first_node(env: Mapping[str, str] | None = None) -> str:
    """Host name of the allocation's first node: the c10d rendezvous host."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist and env.get("SLURM_JOB_ID"):
        # Snakemake's job step drops SLURM_* variables except the job id: ask slurmctld.
        nodelist = _job_nodelist(env["SLURM_JOB_ID"])
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        log.warning("scontrol cannot expand %r; parsing it myself", nodelist)
    # "node[03-05,07],gpu1" -> "node03"
    match = re.match(r"^([^,\[]+)(?:\[(\d+))?", nodelist)
    if not match:
        raise ValueError(f"cannot read the first node of SLURM_JOB_NODELIST={nodelist!r}")
    return match.group(1) + (match.group(2) or "")


def build_command(
    entry: Sequence[str],
    *,
    gpus: int | None = None,
    nodes: int | None = None,
    env: Mapping[str, str] | None = None,
    python: str | None = None,
    rdzv_host: str | None = None,
    rdzv_port: int = DEFAULT_RDZV_PORT,
    cpu_procs: int = 1,
) -> LaunchPlan:
    """Build the command that starts ``entry`` for the job's resources.

    ``entry`` is what follows ``python`` (``["-m", "pkg.mod", *args]`` or ``["train.py", ...]``).
    ``gpus`` (per node) and ``nodes`` default to what Slurm's environment says
    (:func:`detect_gpus`, :func:`detect_nodes`). ``cpu_procs`` > 1 runs that many CPU processes
    under torchrun when there is no GPU (Gloo), e.g. to test distributed code on a laptop.
    """
    env = os.environ if env is None else env
    entry = list(entry)
    if not entry:
        raise ValueError("no entry point given (expected '-m MODULE ARGS' or 'SCRIPT ARGS')")
    if entry[0] == "-m" and len(entry) < 2:
        raise ValueError("'-m' needs a module name")
    python = python or sys.executable
    gpus = detect_gpus(env) if gpus is None else int(gpus)
    nodes = detect_nodes(env) if nodes is None else int(nodes)
    if gpus < 0 or nodes < 1 or cpu_procs < 1:
        raise ValueError(f"invalid resources: gpus={gpus}, nodes={nodes}, cpu_procs={cpu_procs}")
    nproc = gpus if gpus > 0 else cpu_procs
    torchrun = [python, "-m", "torch.distributed.run"]
    if nodes > 1:
        host = rdzv_host or first_node(env)
        run_id = env.get("SLURM_JOB_ID", "cxrfoundry")
        command = [
            "srun",
            f"--nodes={nodes}",
            "--ntasks-per-node=1",
            f"--ntasks={nodes}",
            "--kill-on-bad-exit=1",
            *torchrun,
            f"--nnodes={nodes}",
            f"--nproc_per_node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={host}:{rdzv_port}",
            f"--rdzv-id={run_id}",
            *entry,
        ]
        return LaunchPlan("multinode", nodes, nproc, command)
    if nproc > 1:
        command = [*torchrun, "--standalone", f"--nproc_per_node={nproc}", *entry]
        return LaunchPlan("standalone", 1, nproc, command)
    return LaunchPlan("single", 1, 1, [python, *entry])


def run(plan: LaunchPlan, env: Mapping[str, str] | None = None) -> int:
    """Run a plan in the foreground and return its exit status.

    The launcher replaces itself with the command (``exec``) so signals from Slurm (SIGTERM
    before the time limit or on preemption) reach torchrun or the trainer directly, and the job's
    exit status is the trainer's.
    """
    log.info("launch (%s): %s", plan.mode, plan.shell())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(plan.command[0], plan.command, dict(os.environ if env is None else env))
    return 127  # not reached


def init_distributed(backend: str | None = None) -> dict[str, Any]:
    """Join the process group torchrun set up; a no-op for a single process.

    Returns ``{"rank", "world_size", "local_rank", "device", "distributed"}``. The backend is
    NCCL when CUDA is available, else Gloo.
    """
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
    return {
        "rank": rank,
        "world_size": world,
        "local_rank": local_rank,
        "device": device,
        "distributed": world > 1,
    }


def add_arguments(parser: Any) -> None:
    """Add the launcher's options to an argparse parser (used by ``cxrfoundry launch``)."""
    parser.add_argument(
        "--gpus", type=int, default=None, help="GPUs per node (default: from Slurm/CUDA env)"
    )
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default: from Slurm)")
    parser.add_argument("--cpu-procs", type=int, default=1, help="CPU processes if no GPU")
    parser.add_argument("--rdzv-port", type=int, default=DEFAULT_RDZV_PORT)
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run")
    parser.add_argument("entry", nargs="+", help="after --: -m MODULE ARGS | SCRIPT ARGS")


def main_from_args(args: Any) -> int:
    """Run the launcher for parsed :func:`add_arguments` options."""
    entry = args.entry[1:] if args.entry[:1] == ["--"] else args.entry
    plan = build_command(
        entry,
        gpus=args.gpus,
        nodes=args.nodes,
        rdzv_port=args.rdzv_port,
        cpu_procs=args.cpu_procs,
    )
    if args.dry_run:
        print(plan.shell())
        return 0
    return run(plan)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cxrfoundry.train.launch [options] -- ENTRY...``."""
    import argparse

    parser = argparse.ArgumentParser(prog="cxrfoundry launch", description=__doc__.split("\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
