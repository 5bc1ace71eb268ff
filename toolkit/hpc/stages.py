"""The pipeline stages as the launcher sees them: completion checks and job entry points.

Every function here that runs inside a job is a plain module-level callable (submitit pickles it
with its arguments). Sharded stages (prepare, embed, and any module implementing
:mod:`toolkit.sharded`) run as tasks :func:`array_task` ``t`` of ``T`` followed by one
:func:`finalize`, on every executor: local worker processes (:mod:`toolkit.hpc.launch`), MPI ranks,
SLURM array tasks, inside a container or not. Each task logs to ``RUN_DIR/logs/<stage>/task-<t>.log``,
the finalize step to ``finalize.log``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import submitit

from toolkit import sharded
from toolkit.config import PipelineConfig, record_run
from toolkit.layout import STAGES as _STAGES
from toolkit.layout import RunLayout
from toolkit.runtime import task_log

log = logging.getLogger(__name__)

Stage = Literal["prepare", "train", "embed", "analyze", "explain"]
STAGES: tuple[Stage, ...] = _STAGES  # type: ignore[assignment]
SHARDED: frozenset[str] = frozenset(sharded.SHARDED)


def is_complete(stage: str, run_dir: Path) -> bool:
    """Whether ``stage``'s final outputs exist in ``run_dir`` (:meth:`toolkit.layout.RunLayout.is_complete`)."""
    return RunLayout(run_dir).is_complete(stage)


def check_stages(stages: list[str]) -> list[Stage]:
    """Validate a stage list and return it in pipeline order (raises ValueError naming the bad one)."""
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {', '.join(bad)}; stages are {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]


def _name(stage: str) -> str:
    return sharded.resolve(stage).NAME


def array_task(stage: str, cfg: PipelineConfig, run_dir: Path, task: int, n_tasks: int) -> list[int]:
    """Task ``task`` of ``n_tasks`` of a sharded stage (:func:`toolkit.sharded.run_task`: plan once, then
    the units ``u % n_tasks == task`` that are not done, one writer per unit). Returns the units built."""
    run_dir = Path(run_dir)
    with task_log(run_dir, _name(stage), f"task-{task}"):
        log.info("%s task %d of %d on %s (pid %d)", stage, task, n_tasks, os.uname().nodename, os.getpid())
        return sharded.run_task(stage, cfg, run_dir, task, n_tasks)


def finalize(stage: str, cfg: PipelineConfig, run_dir: Path) -> dict:
    """The step after every task of a sharded stage: checks every unit and marks the store complete."""
    run_dir = Path(run_dir)
    with task_log(run_dir, _name(stage), "finalize"):
        log.info("%s finalize on %s (pid %d)", stage, os.uname().nodename, os.getpid())
        record_run(cfg, run_dir, _name(stage))
        summary = sharded.finalize_once(stage, cfg, run_dir)
        log.info("%s finalized", stage)
        return summary


class TrainJob(submitit.helpers.Checkpointable):
    """submitit entry point of training: ``executor.submit(TrainJob(cfg, run_dir))`` (one task per rank).

    Ensembles under SLURM: ``executor.map_array(TrainJob(cfg, run_dir), range(N))`` trains member ``k`` in
    array task ``k`` (``train.run(..., member=k)``), or ``TrainJob(cfg, run_dir, member=k)`` one DDP job per
    member; then ``TrainJob(cfg, run_dir)`` (afterok) finds every member finished and writes the ensemble report.

    On a timeout/preemption signal the training loop saves a checkpoint at the next batch boundary,
    then calls submitit's handler, which requeues :meth:`checkpoint`'s DelayedSubmission; it resumes."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path | str, member: int | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.member = member

    def __call__(self, member: int | None = None) -> dict:
        from toolkit import train

        m = self.member if member is None else member
        return train.run(self.cfg, self.run_dir, extra_stop_signals=_submitit_signals(), member=m)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on timeout/preemption (after our loop saved last.pt): resubmit; it resumes."""
        log.info("requeueing training of %s%s; it resumes from its last checkpoint", self.run_dir,
                 "" if self.member is None and not args else f" (ensemble member {self.member if not args else args[0]})")
        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg, self.run_dir, self.member), *args, **kwargs)


def _submitit_signals() -> tuple[int, ...]:
    """submitit's preemption signal when this process is a submitit job, else nothing."""
    try:
        if submitit.JobEnvironment().activated():
            return (submitit.JobEnvironment._usr_sig(),)
    except RuntimeError:  # not started by submitit
        pass
    return ()


def train_job(cfg: PipelineConfig, run_dir: Path) -> TrainJob:
    """The submitit callable of the training job (one per rank; requeues itself on timeout/preemption)."""
    return TrainJob(cfg, Path(run_dir))


def analyze(cfg: PipelineConfig, run_dir: Path) -> dict:
    """The analyze job (one process; it logs to ``logs/analyze/job.log`` itself)."""
    from toolkit import analyze as analyze_stage

    return analyze_stage.run(cfg, Path(run_dir))
