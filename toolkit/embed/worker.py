"""One local embed worker process: ``python -m toolkit.embed.worker --config F --run-dir R --task t --tasks T``.

Started by :func:`toolkit.embed.stage.run` (its output goes to ``RUN_DIR/logs/embed/worker-<t>.log``);
does the unfinished shards ``s % T == t`` and exits 0, or non-zero with the error in the log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from toolkit.config import load_config
from toolkit.embed.stage import run_task


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m toolkit.embed.worker")
    ap.add_argument("--config", type=Path, required=True, help="resolved pipeline YAML")
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--task", type=int, required=True)
    ap.add_argument("--tasks", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s %(levelname)s worker-{args.task} pid={os.getpid()}: %(message)s")
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(int(threads))
    cfg = load_config(args.config)
    done = run_task(cfg, args.run_dir, args.task, args.tasks)
    logging.getLogger("toolkit.embed.worker").info("finished: %d shards extracted", len(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
