"""Shared test helpers: paths and a runner for the real Snakemake workflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = REPO.parent / "shared" / "data" / "real"


def snakemake(
    workdir: Path,
    *args: str,
    config: str = "config/mini.yaml",
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: int = 900,
) -> subprocess.CompletedProcess:
    """Run the project's Snakefile in ``workdir`` with ``config`` (a repo-relative config file)."""
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(REPO / config),
        "--cores",
        "2",
        *args,
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "MLFLOW_TRACKING_URI": "", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-8000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def shared_real() -> Path:
    """The real sample data beside the project; tests using it skip where it is absent."""
    if not SHARED_REAL.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_REAL}")
    return SHARED_REAL


@pytest.fixture(scope="session")
def mini_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished default-target run of config/mini.yaml, made once per pytest session.

    Shared by every integration module: never modify it, copy it with :func:`copy_run`.
    ``CXRF_MINI_RUN=/path/to/finished/run`` reuses a copy of an existing run of the same code
    and config (for iterating on integration tests; CI always makes a fresh one).
    """
    workdir = tmp_path_factory.mktemp("mini-run")
    existing = os.environ.get("CXRF_MINI_RUN")
    if existing:
        workdir = copy_run(Path(existing), workdir / "run")
        assert "Nothing to be done" in snakemake(workdir, "--dry-run").stdout, (
            f"CXRF_MINI_RUN={existing} is not a finished run of this code and config"
        )
        return workdir
    snakemake(workdir)
    return workdir


def copy_run(src: Path, dest: Path) -> Path:
    """Copy a workflow run (outputs, logs, Snakemake metadata), keeping mtimes."""
    shutil.copytree(src, dest, symlinks=True)
    return dest
