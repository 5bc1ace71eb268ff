#!/usr/bin/env bash
# Set up spectrolens in ./.venv on a fresh Debian machine.
#   scripts/setup.sh          runtime only (enough for `spectrolens demo`)
#   scripts/setup.sh --test   also the test/benchmark stack: OpenMPI, SLURM + MariaDB + munge,
#                             Chromium (apt, needs root), upstream alignn and dgl (pip)
# Idempotent: re-running skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1

log() { echo "[setup] $*" >&2; }

if [ "$WITH_TEST" = 1 ]; then
  need=()
  command -v mpiexec >/dev/null || need+=(openmpi-bin libopenmpi-dev)
  command -v slurmctld >/dev/null || need+=(slurm-wlm slurmdbd munge mariadb-server libpmix-dev)
  command -v chromium >/dev/null || need+=(chromium)
  command -v c++ >/dev/null || need+=(g++)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    log "apt-get install ${need[*]}"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || { log "creating .venv"; "$PY" -m venv .venv; }
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: an unpinned torch pulled in by another package downloads GBs of CUDA.
python -c "import torch" 2>/dev/null || { log "pip install torch==2.13.0"; pip install -q torch==2.13.0; }
log "pip install -r requirements/base.txt"
pip install -q -r requirements/base.txt
pip install -q --no-deps -e .
command -v c++ >/dev/null || log "no C++ compiler: CPU training and extraction will use the slower torch-op path \
(apt-get install g++ for the fused kernel; docs/performance.md)"
if [ "$WITH_TEST" = 1 ]; then
  log "pip install -r requirements/test.txt"
  pip install -q -r requirements/test.txt
fi
log "ready: $(python -c 'import toolkit,torch; print("spectrolens", toolkit.__version__, "torch", torch.__version__)')"
