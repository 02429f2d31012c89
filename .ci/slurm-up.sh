#!/usr/bin/env bash
# Bring up (or down) the single-node Slurm test cluster with fake GPUs on this machine.
#   sudo .ci/slurm-up.sh          # install slurm-wlm + munge if missing, start, wait until ready
#   sudo .ci/slurm-up.sh down     # stop the daemons `up` started
# Needs root (CI runs as root with apt). The pytest fixture in tests/slurm/conftest.py does the
# same by itself and reuses a cluster that is already up; see tests/slurm/localslurm.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
exec "$python" "$here/tests/slurm/localslurm.py" "${1:-up}" "${@:2}"
