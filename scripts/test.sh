#!/usr/bin/env bash
# Set up everything the tests need and run the whole test suite (the README's test command).
# Extra arguments go to pytest, e.g. scripts/test.sh -k zarr
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test || { echo "setup failed" >&2; exit 1; }
# shellcheck disable=SC1091
. .venv/bin/activate
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824
python -m pytest --durations=25 "$@"
rc=$?
if [ "$rc" = 5 ]; then echo "pytest collected no tests: treating as failure" >&2; exit 1; fi
exit "$rc"
