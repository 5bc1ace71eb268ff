"""Where stages run: :class:`LocalExecutor` (processes on this machine) and :class:`SlurmExecutor`
(submitit jobs with afterok dependencies).

Local: each stage is one subprocess ``python -m toolkit.cli <stage> --config RUN_DIR/config.yaml
--run-dir RUN_DIR`` (training with more than one rank: ``python -m torch.distributed.run
--standalone --nproc_per_node=N -m toolkit.cli train ...``), its output in
``RUN_DIR/logs/<stage>/<stage>.log``; stages run one after another and a failure stops the chain.

SLURM: prepare and embed (every sharded stage, :mod:`toolkit.sharded`) are job arrays of
``executor.<stage>.array_tasks`` tasks (task t of T builds the units u % T == t that are not done,
one writer per unit: :func:`toolkit.hpc.stages.array_task`, the same function local workers and MPI
ranks run) followed by one small finalize job;
train is one job of nodes x tasks_per_node ranks launched by srun (submitit), analyze one job.
An ensemble (``train.ensemble: N`` > 1) trains its members concurrently: one job array of N tasks (task k
trains member k into ``train/members/<k>``, one writer per member) when training is one rank, else N
DDP jobs; then one job (afterok all of them) writes the ensemble report (:class:`toolkit.hpc.stages.TrainJob`).
Each job depends ``afterok`` on the previous stage's last job and is submitted with
``--kill-on-invalid-dep=yes``, so a failure cancels its dependants instead of leaving them pending.
Every submission gets a fresh submitit folder ``RUN_DIR/submitit/<stamp>/<stage>`` (SLURM job ids
can repeat after a controller reset; a reused folder would return an old job's result).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from toolkit.config import PipelineConfig, StageResources
from toolkit.hpc import container, records, stages
from toolkit.layout import RunLayout
from toolkit.runtime import MALLOC_ENV, tail

log = logging.getLogger(__name__)


def world_size(res: StageResources) -> int:
    """Training ranks: nodes x tasks per node (one rank per GPU on GPU nodes)."""
    return res.nodes * res.tasks_per_node


# ----------------------------------------------------------------------------------------- local
class LocalExecutor:
    """Run each stage as a subprocess on this machine; the run directory records every step."""

    kind = "local"

    def __init__(self, cfg: PipelineConfig, run_dir: Path, config_file: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.config_file = Path(config_file)

    def command(self, stage: str) -> list[str]:
        """The stage's command line (wrapped in ``apptainer exec`` when a container image is set)."""
        common = ["--config", str(self.config_file), "--run-dir", str(self.run_dir)]
        n = world_size(self.cfg.executor.train)
        if stage == "train" and n > 1:
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                    "-m", "toolkit.cli", "train", *common]
        else:
            argv = [sys.executable, "-m", "toolkit.cli", stage, *common]
        return container.wrap(self.cfg, self.run_dir, argv)

    def run_stage(self, stage: str) -> int:
        """Run one stage to completion; returns its exit code (recorded in pipeline.json)."""
        log_path = RunLayout(self.run_dir).logs(stage) / f"{stage}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command(stage)
        env = {**MALLOC_ENV, **os.environ}
        rec = {"state": "running", "stamp": records.stamp(), "started": records.now(), "log": str(log_path),
               "command": cmd, "host": os.uname().nodename}
        with open(log_path, "ab") as fh:
            fh.write(f"\n=== {records.now()} {shlex.join(cmd)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            records.set_stage(self.run_dir, stage, {**rec, "pid": proc.pid}, self.kind)
            log.info("%s: running (pid %d), log %s", stage, proc.pid, log_path)
            try:
                rc = proc.wait()
            except BaseException:  # Ctrl-C / SIGTERM of the runner: stop the stage's process group
                _terminate_group(proc)
                records.update_stage(self.run_dir, stage, state="cancelled", ended=records.now(),
                                     returncode=proc.returncode)
                raise
        state = "completed" if rc == 0 else "failed"
        records.update_stage(self.run_dir, stage, state=state, returncode=rc, ended=records.now())
        if rc != 0:
            log.error("%s failed with exit code %d; log: %s\n%s", stage, rc, log_path, tail(log_path))
        return rc


def _terminate_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------------------- SLURM
class SlurmExecutor:
    """Submit stages as SLURM jobs through submitit, chained with afterok dependencies."""

    kind = "slurm"

    def __init__(self, cfg: PipelineConfig, run_dir: Path, stamp: str | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir).absolute()
        self.stamp = stamp or records.stamp()
        self.folder = self.run_dir / "submitit" / self.stamp

    # -- parameters -------------------------------------------------------------------------------
    def parameters(self, stage: str, res: StageResources, dependency: list[str], role: str) -> dict[str, Any]:
        """submitit ``SlurmExecutor.update_parameters`` keywords for one job of ``stage``."""
        single = role in ("finalize", "single", "array")
        params: dict[str, Any] = {
            "job_name": f"{self.cfg.name}-{stage}" + ("-finalize" if role == "finalize" else ""),
            "time": res.time_min if role != "finalize" else min(res.time_min, 60),
            "nodes": 1 if single else res.nodes,
            "ntasks_per_node": 1 if single else res.tasks_per_node,
            "cpus_per_task": res.cpus_per_task if role != "finalize" else 1,
            "setup": self.setup_lines(res.cpus_per_task if role != "finalize" else 1),
            "additional_parameters": {"kill_on_invalid_dep": "yes", **res.additional},
        }
        if res.gpus_per_node and role != "finalize":
            params["gpus_per_node"] = res.gpus_per_node
        for key in ("partition", "account", "qos", "constraint"):
            v = getattr(res, key)
            if v:
                params[key] = v
        if res.mem_gb:
            params["mem"] = f"{int(round(res.mem_gb * 1024))}M"
        if dependency:
            params["dependency"] = "afterok:" + ":".join(dependency)
        if role == "array":
            params["array_parallelism"] = res.array_parallelism
        if res.srun_args:
            params["srun_args"] = list(res.srun_args)
        return params

    @staticmethod
    def setup_lines(cpus: int) -> list[str]:
        """Lines run in the batch script before srun: thread counts and allocator settings."""
        lines = [f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{cpus}}}",
                 f"export MKL_NUM_THREADS=${{MKL_NUM_THREADS:-{cpus}}}"]
        lines += [f"export {k}=${{{k}:-{v}}}" for k, v in MALLOC_ENV.items()]
        return lines

    def _executor(self, stage: str, res: StageResources, dependency: list[str], role: str):
        import submitit

        python = container.python_command(self.cfg, self.run_dir) if container.enabled(self.cfg) else None
        ex = submitit.SlurmExecutor(folder=self.folder / stage, python=python)
        ex.update_parameters(**self.parameters(stage, res, dependency, role))
        return ex

    # -- submission -------------------------------------------------------------------------------
    def submit_stage(self, stage: str, after: list[str]) -> tuple[dict[str, Any], list[str]]:
        """Submit ``stage`` (after the jobs ``after``); returns its record and the ids later stages wait on."""
        res: StageResources = getattr(self.cfg.executor, stage)
        cfg, run_dir = self.cfg, self.run_dir
        jobs: list[dict[str, Any]] = []
        if stage in stages.SHARDED:
            jobs, last = self.submit_sharded(stage, res, after)
        elif stage == "train" and cfg.train.ensemble > 1:
            jobs, last = self.submit_ensemble(res, after)
        elif stage == "train":
            job = self._executor(stage, res, after, "ranks").submit(stages.train_job(cfg, run_dir))
            ntasks = world_size(res)
            jobs.append({"role": "ranks", "job_id": job.job_id,
                         "tasks": [_task_record(job.task(t) if ntasks > 1 else job, t) for t in range(ntasks)]})
            last = [job.job_id]
        elif stage == "analyze":
            job = self._executor(stage, res, after, "single").submit(stages.analyze, cfg, run_dir)
            jobs.append({"role": "single", "job_id": job.job_id, "tasks": [_task_record(job, 0)]})
            last = [job.job_id]
        else:
            raise ValueError(f"unknown stage {stage!r}")
        rec = {"state": "submitted", "stamp": self.stamp, "submitted": records.now(), "folder": str(self.folder / stage),
               "after": after, "jobs": jobs}
        records.set_stage(self.run_dir, stage, rec, self.kind)
        log.info("%s: submitted %s (after %s)", stage, ", ".join(f"{j['role']} {j['job_id']}" for j in jobs),
                 ",".join(after) or "nothing")
        return rec, last


    def submit_ensemble(self, res: StageResources, after: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
        """``train.ensemble: N``: the members as one array of N single-rank tasks (or N jobs of
        ``world_size`` ranks), then one job, afterok all of them, that writes the ensemble report."""
        cfg, run_dir, n = self.cfg, self.run_dir, self.cfg.train.ensemble
        ntasks = world_size(res)
        if ntasks == 1:
            arr = self._executor("train", res, after, "array").map_array(stages.train_job(cfg, run_dir), range(n))
            wait = [arr[0].job_id.split("_")[0]]
            jobs = [{"role": "array", "job_id": wait[0], "members": list(range(n)),
                     "tasks": [_task_record(j, k) for k, j in enumerate(arr)]}]
        else:
            ex = self._executor("train", res, after, "ranks")
            member_jobs = [ex.submit(stages.TrainJob(cfg, run_dir, member=k)) for k in range(n)]
            wait = [j.job_id for j in member_jobs]
            jobs = [{"role": "ranks", "job_id": j.job_id, "member": k,
                     "tasks": [_task_record(j.task(t), t) for t in range(ntasks)]} for k, j in enumerate(member_jobs)]
        fin = self._executor("train", res, wait, "single").submit(stages.train_job(cfg, run_dir))
        jobs.append({"role": "finalize", "job_id": fin.job_id, "tasks": [_task_record(fin, 0)]})
        return jobs, [fin.job_id]

    def submit_sharded(self, stage: str, res: StageResources, after: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
        """A sharded stage (by name or module path): an array of ``res.array_tasks`` tasks
        :func:`~toolkit.hpc.stages.array_task`, then one :func:`~toolkit.hpc.stages.finalize` job."""
        cfg, run_dir, n = self.cfg, self.run_dir, res.array_tasks
        name = stage.rsplit(".", 1)[-1]
        ex = self._executor(name, res, after, "array")
        arr = ex.map_array(stages.array_task, [stage] * n, [cfg] * n, [run_dir] * n, range(n), [n] * n)
        array_id = arr[0].job_id.split("_")[0]
        jobs = [{"role": "array", "job_id": array_id, "tasks": [_task_record(j, t) for t, j in enumerate(arr)]}]
        fin = self._executor(name, res, [array_id], "finalize").submit(stages.finalize, stage, cfg, run_dir)
        jobs.append({"role": "finalize", "job_id": fin.job_id, "tasks": [_task_record(fin, 0)]})
        return jobs, [fin.job_id]


def _task_record(job, task: int) -> dict[str, Any]:
    return {"task": task, "job_id": str(job.job_id), "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}


def job_ids(stage_record: dict[str, Any]) -> list[str]:
    """Every SLURM job id (array tasks as ``A_t``) of a stage record."""
    out: list[str] = []
    for j in stage_record.get("jobs", []):
        if j["role"] == "array":
            out += [t["job_id"] for t in j["tasks"]]
        else:
            out.append(str(j["job_id"]))
    return out
