#!/usr/bin/env bash
# Set up spectrolens and run the full pipeline (prepare -> train -> embed -> analyze) on the
# embedded benchmark with the local executor. Prints the report path and the recovery score.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824
exec spectrolens demo "$@"
