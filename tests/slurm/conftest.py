"""Fixtures for the tests that run on a real single-node Slurm cluster (marker ``slurm``).

The ``slurm_cluster`` fixture installs Slurm with apt if needed, starts munged, MariaDB and
slurmdbd (accounting, where they install), slurmctld and slurmd on localhost with two fake GPUs,
and stops every daemon it started at the end of the session. Where that is impossible (not
root, no apt, a daemon fails) the tests are skipped with the reason. Set
``CXRF_REQUIRE_SLURM=1`` (CI does) to turn that skip into a failure.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from localslurm import LocalSlurm, SlurmUnavailable


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    """A running single-node Slurm cluster; its client environment is exported while it runs."""
    root = Path(os.environ.get("CXRF_SLURM_DIR", "/tmp/cxrfoundry-slurm"))
    slurm = LocalSlurm(root=root, gpus=2)
    t0 = time.monotonic()
    try:
        began = slurm.up(timeout=60)
    except SlurmUnavailable as exc:
        if os.environ.get("CXRF_REQUIRE_SLURM") == "1":
            pytest.fail(f"Slurm required (CXRF_REQUIRE_SLURM=1) but unavailable: {exc}")
        pytest.skip(f"cannot start a local Slurm cluster: {exc}")
    print(
        f"\nlocal Slurm ready in {time.monotonic() - t0:.1f} s ({'started' if began else 'reused'})"
    )
    saved = {k: os.environ.get(k) for k in slurm.env}
    os.environ.update(slurm.env)
    try:
        yield slurm
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if began:
            slurm.down()
