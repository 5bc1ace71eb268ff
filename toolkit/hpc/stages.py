"""The four pipeline stages as the launcher sees them: completion checks and job entry points.

Every function here that runs inside a job is a plain module-level function (submitit pickles it
with its arguments) that calls the stage's own entry points from docs/architecture.md; the same
functions run under the local executor (as ``python -m toolkit.cli <stage>`` subprocesses) and
under SLURM (as submitit jobs), inside or outside a container.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from toolkit.config import PipelineConfig

log = logging.getLogger(__name__)

Stage = Literal["prepare", "train", "embed", "analyze"]
STAGES: tuple[Stage, ...] = ("prepare", "train", "embed", "analyze")
SHARDED: frozenset[str] = frozenset({"prepare", "embed"})


def _zarr_complete(store: Path) -> bool:
    """True when a Zarr v3 group's root attributes say ``complete: true`` (read without zarr)."""
    meta = store / "zarr.json"
    try:
        return json.loads(meta.read_text()).get("attributes", {}).get("complete") is True
    except (OSError, ValueError):
        return False


def is_complete(stage: str, run_dir: Path) -> bool:
    """Whether ``stage``'s final outputs exist in ``run_dir`` (a completed stage is skipped on re-runs).

    prepare: dataset.zarr marked complete; train: train/metrics.json and train/best.pt;
    embed: embeddings.zarr marked complete; analyze: analyze/attribution.json and the HTML report."""
    run_dir = Path(run_dir)
    if stage == "prepare":
        return _zarr_complete(run_dir / "dataset.zarr")
    if stage == "train":
        return (run_dir / "train" / "metrics.json").is_file() and (run_dir / "train" / "best.pt").is_file()
    if stage == "embed":
        return _zarr_complete(run_dir / "embeddings.zarr")
    if stage == "analyze":
        return (run_dir / "analyze" / "attribution.json").is_file() and \
            (run_dir / "analyze" / "report" / "index.html").is_file()
    raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")


def check_stages(stages: list[str]) -> list[Stage]:
    """Validate a stage list and return it in pipeline order (raises ValueError naming the bad one)."""
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {', '.join(bad)}; stages are {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]


@contextlib.contextmanager
def task_log(run_dir: Path, stage: str, name: str) -> Iterator[Path]:
    """Copy this process's log records (INFO and above, every logger) to ``RUN_DIR/logs/<stage>/<name>.log``."""
    path = Path(run_dir) / "logs" / stage / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {stage}/{name} %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger()  # root: the stages log under "toolkit.*" and "spectrolens.*"
    old = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
        handler.close()


@contextlib.contextmanager
def _exclusive(run_dir: Path, name: str) -> Iterator[None]:
    """An flock on ``RUN_DIR/.locks/<name>.lock`` (array tasks plan the store exactly once)."""
    d = Path(run_dir) / ".locks"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _module(stage: str):
    if stage == "prepare":
        from toolkit.data import prepare

        return prepare
    if stage == "embed":
        import toolkit.embed as embed

        return embed
    raise ValueError(f"stage {stage!r} is not sharded (sharded stages: prepare, embed)")


def array_task(stage: str, cfg: PipelineConfig, run_dir: Path, task: int, n_tasks: int) -> list[int]:
    """Array task ``task`` of ``n_tasks`` of a sharded stage: plan once (locked), then do the units
    ``u`` with ``u % n_tasks == task`` (completed units are skipped). Returns the units handled."""
    run_dir = Path(run_dir)
    mod = _module(stage)
    with task_log(run_dir, stage, f"task-{task}"):
        log.info("%s array task %d of %d on %s (pid %d)", stage, task, n_tasks, os.uname().nodename, os.getpid())
        with _exclusive(run_dir, f"{stage}-plan"):
            n_units = mod.plan(cfg, run_dir)
        units = mod.run_task(cfg, run_dir, task, n_tasks)
        log.info("%s array task %d of %d: %d of %d units done here: %s", stage, task, n_tasks, len(units), n_units,
                 units)
        return list(units)


def finalize(stage: str, cfg: PipelineConfig, run_dir: Path) -> dict:
    """The small job after a sharded stage's array: checks every unit and marks the store complete."""
    run_dir = Path(run_dir)
    mod = _module(stage)
    with task_log(run_dir, stage, "finalize"):
        from toolkit.config import record_run

        record_run(cfg, run_dir, stage)
        summary = mod.finalize(cfg, run_dir)
        if stage == "prepare" and cfg.data.strict and summary.get("n_rejected", 0):
            raise RuntimeError(f"data.strict is set and {summary['n_rejected']} records were rejected; "
                               f"see {run_dir / 'prepare' / 'rejects.csv'}")
        return summary


def train_job(cfg: PipelineConfig, run_dir: Path):
    """The submitit callable of the training job (one per rank; requeues itself on timeout/preemption)."""
    from toolkit.train import TrainJob

    return TrainJob(cfg, Path(run_dir))


def analyze(cfg: PipelineConfig, run_dir: Path) -> dict:
    """The analyze job (one process; it logs to ``logs/analyze/job.log`` itself)."""
    from toolkit import analyze as analyze_stage

    return analyze_stage.run(cfg, Path(run_dir))
