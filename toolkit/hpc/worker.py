"""One local worker process of a sharded stage:
``python -m toolkit.hpc.worker --stage S --config F --run-dir R --task t --tasks T``.

:func:`toolkit.hpc.launch.start_workers` runs :func:`main` in processes forked from a fork server
(output to ``RUN_DIR/logs/<stage>/worker-<t>.log``); by hand it runs as the command above. It runs :func:`toolkit.hpc.stages.array_task` ``t`` of ``T``
exactly as a SLURM array task does, and exits 0, or non-zero with the error in the log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from toolkit.config import load_config
from toolkit.hpc.stages import array_task


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m toolkit.hpc.worker")
    ap.add_argument("--stage", required=True, help="sharded stage name (prepare, embed) or module path")
    ap.add_argument("--config", type=Path, required=True, help="resolved pipeline YAML")
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--task", type=int, required=True)
    ap.add_argument("--tasks", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s %(levelname)s worker-{args.task} pid={os.getpid()}: %(message)s")
    # threads: OMP_NUM_THREADS from toolkit.hpc.launch.worker_env (torch reads it at start-up)
    cfg = load_config(args.config)
    done = array_task(args.stage, cfg, args.run_dir, args.task, args.tasks)
    logging.getLogger("toolkit.hpc.worker").info("finished: %d units built", len(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
