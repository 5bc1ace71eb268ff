"""Run a sharded stage here: local worker processes, or this process's share under MPI.

``spectrolens prepare`` / ``spectrolens embed`` (and the local executor, which runs those commands)
call :func:`run_sharded`:

* under an MPI launcher (``mpiexec -n R spectrolens prepare ...``), every rank runs
  :func:`toolkit.hpc.stages.array_task` ``rank`` of ``R`` in-process, errors are gathered, rank 0
  finalizes and the summary is broadcast;
* otherwise :func:`start_workers` forks ``stage.workers(cfg)`` processes running
  :func:`toolkit.hpc.worker.main` (task ``t`` of ``T`` each, the same :func:`~toolkit.hpc.stages.array_task` a
  SLURM array task runs), shows progress, and finalizes (:func:`~toolkit.hpc.stages.finalize`).

Logs: ``logs/<stage>/driver.log`` (this process), ``task-<t>.log`` (each task's stage log, as on
SLURM), ``worker-<t>.log`` (each worker process's whole output, tracebacks included), ``finalize.log``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from multiprocessing.connection import wait as wait_any
from pathlib import Path

from toolkit import sharded
from toolkit.config import PipelineConfig, dump_config, record_run
from toolkit.hpc import stages as st
from toolkit.layout import STAGES, RunLayout
from toolkit.runtime import MALLOC_ENV, mpi_world, tail, task_log, write_text

log = logging.getLogger("spectrolens.launch")


def run_sharded(stage: str, cfg: PipelineConfig, run_dir: Path | str, n_workers: int | None = None) -> dict:
    """Run every unfinished unit of ``stage`` and finalize; returns the stage's summary."""
    run_dir = Path(run_dir)
    mod = sharded.resolve(stage)
    mpi = mpi_world()
    if mpi is not None and mpi[1] > 1:
        return _run_mpi(stage, cfg, run_dir, *mpi)
    with task_log(run_dir, mod.NAME, "driver"):
        return _run_local(stage, mod, cfg, run_dir, n_workers)


def _run_local(stage: str, mod, cfg: PipelineConfig, run_dir: Path, n_workers: int | None) -> dict:
    from tqdm import tqdm

    record_run(cfg, run_dir, mod.NAME)
    if mod.NAME in STAGES and RunLayout(run_dir).is_complete(mod.NAME):
        log.info("%s: %s is complete; nothing to do", mod.NAME, run_dir)
        return st.finalize(stage, cfg, run_dir)
    n = sharded.plan_once(stage, cfg, run_dir)  # here, so a refused config fails before any worker starts
    done = len(sharded.done_units(stage, run_dir, n))
    workers = max(1, min(n_workers or mod.workers(cfg), max(1, n - done)))
    log.info("%s: %d of %d %ss to build with %d workers", mod.NAME, n - done, n, mod.UNIT, workers)
    procs = start_workers(stage, cfg, run_dir, workers, gpu=mod.device(cfg) != "cpu")
    log.info("started %d worker processes for %d %ss (%d already done)", workers, n, mod.UNIT, done)
    with tqdm(total=n, initial=done, desc=f"{mod.NAME} {mod.UNIT}s", unit=mod.UNIT, disable=done == n) as bar:
        try:
            while True:
                running = [p for p, _ in procs if p.poll() is None]
                bar.update(len(sharded.done_units(stage, run_dir, n)) - bar.n)
                if not running:
                    break
                wait_any([p.sentinel for p in running], timeout=0.5)  # wakes as soon as a worker exits
        except BaseException:  # Ctrl-C / SIGTERM of the driver: stop the workers; finished units are kept
            _stop(procs)
            raise
    failed = [(t, p.returncode, lf) for t, (p, lf) in enumerate(procs) if p.returncode != 0]
    if failed:
        msg = "; ".join(f"worker {t} exited with {rc} (log {lf}):\n{tail(lf, 15)}" for t, rc, lf in failed)
        raise mod.Error(f"{mod.NAME} workers failed; finished {mod.UNIT}s are kept, re-run to do the rest. {msg}")
    return st.finalize(stage, cfg, run_dir)


def _stop(procs: list[tuple[Worker, Path]]) -> None:
    for p, _ in procs:
        if p.poll() is None:
            p.terminate()
    for p, _ in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def worker_env(n_workers: int, task: int, gpu: bool) -> dict[str, str]:
    """Environment of local worker ``task``: the CPUs split between workers, glibc allocator settings,
    and with several GPUs, GPU ``task % n_gpus`` only (unless CUDA_VISIBLE_DEVICES is set already)."""
    env = dict(os.environ)
    if gpu and "CUDA_VISIBLE_DEVICES" not in env:
        import torch

        if torch.cuda.device_count() > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(task % torch.cuda.device_count())
    threads = max(1, len(os.sched_getaffinity(0)) // n_workers)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", str(threads))
    return {**MALLOC_ENV, **env}


def _worker_argv(stage: str, config_file: Path, run_dir: Path, task: int, n_tasks: int) -> list[str]:
    return ["--stage", stage, "--config", str(config_file), "--run-dir", str(run_dir), "--task", str(task),
            "--tasks", str(n_tasks)]


class Worker:
    """One local worker process (Popen-like: ``poll``, ``returncode``, ``terminate``, ``wait``, ``kill``)."""

    def __init__(self, proc) -> None:
        self.proc = proc

    def poll(self) -> int | None:
        return None if self.proc.is_alive() else self.returncode

    @property
    def sentinel(self) -> int:
        return self.proc.sentinel

    @property
    def returncode(self) -> int | None:
        return self.proc.exitcode

    def terminate(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()

    def wait(self, timeout: float | None = None) -> int | None:
        self.proc.join(timeout)
        if self.proc.is_alive():
            raise subprocess.TimeoutExpired("worker", timeout or 0)
        return self.returncode


def _context(mod):
    """forkserver with the stage's heavy imports preloaded once (workers start warm, a fork each; the
    server is single-threaded, so no thread state is forked), else spawn."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["toolkit.hpc.worker", mod.__name__, *getattr(mod, "PRELOAD", ())])
    return ctx


def _child(argv: list[str], log_file: str, env: dict[str, str], cwd: str) -> None:
    """Body of a forked worker: output to its log file (tracebacks included), the driver's environment,
    working directory and import path as ``python -m`` would have them, then the worker's ``main``."""
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    if "torch" in sys.modules and env.get("OMP_NUM_THREADS", "").isdigit():
        sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))
    from toolkit.hpc import worker

    rc = 1
    try:
        rc = worker.main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - the traceback goes to the worker's log; the driver reports it
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(rc)


def start_workers(stage: str, cfg: PipelineConfig, run_dir: Path, n_tasks: int, gpu: bool = False) -> list[tuple[Worker, Path]]:
    """Start ``n_tasks`` worker processes (task ``t`` of ``n_tasks``: :func:`toolkit.hpc.stages.array_task`,
    exactly what a SLURM array task runs), worker ``t``'s whole output in ``logs/<stage>/worker-<t>.log``."""
    mod = sharded.resolve(stage)
    logs = RunLayout(run_dir).logs(mod.NAME)
    logs.mkdir(parents=True, exist_ok=True)
    config_file = logs / f"config.{os.getpid()}.yaml"
    write_text(config_file, dump_config(cfg))
    for k, v in MALLOC_ENV.items():  # read by glibc when the fork server starts; workers inherit it
        os.environ.setdefault(k, v)
    ctx = _context(mod)
    procs = []
    for t in range(n_tasks):
        log_file = logs / f"worker-{t}.log"
        p = ctx.Process(target=_child, name=f"{mod.NAME}-worker-{t}",
                        args=(_worker_argv(stage, config_file, run_dir, t, n_tasks), str(log_file),
                              worker_env(n_tasks, t, gpu), os.getcwd()))
        p.start()
        procs.append((Worker(p), log_file))
    return procs


def _run_mpi(stage: str, cfg: PipelineConfig, run_dir: Path, rank: int, world: int) -> dict:
    """MPI ranks: rank ``r`` is task ``r`` of ``world``; rank 0 finalizes; every rank returns the summary."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() != world:
        raise sharded.resolve(stage).Error(f"MPI environment says {world} ranks but MPI.COMM_WORLD has "
                                           f"{comm.Get_size()}")
    mod = sharded.resolve(stage)
    if rank == 0:
        record_run(cfg, run_dir, mod.NAME)
    error = None
    try:
        units = st.array_task(stage, cfg, run_dir, rank, world)
        log.info("MPI rank %d of %d: built %ss %s", rank, world, mod.UNIT, units)
    except Exception as e:  # every rank must reach the collective below, or the others hang
        error = f"rank {rank}: {type(e).__name__}: {e}"
    errors = [x for x in comm.allgather(error) if x]
    if errors:
        raise mod.Error(f"{mod.NAME} failed on MPI ranks (re-run to resume): " + "; ".join(errors))
    result: dict = {}
    if rank == 0:
        try:
            result = {"summary": st.finalize(stage, cfg, run_dir)}
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {e}"}
    result = comm.bcast(result, root=0)
    if "error" in result:
        raise mod.Error(f"{mod.NAME} finalize failed on rank 0: {result['error']}")
    return result["summary"]


def run_unit(stage: str, cfg: PipelineConfig, run_dir: Path | str, unit: int) -> bool:
    """Build one unit (``--part`` / ``--shard``) under its lock; False when it was done already."""
    mod = sharded.resolve(stage)
    n = sharded.plan_once(stage, cfg, run_dir)
    if not 0 <= unit < n:
        raise mod.Error(f"{mod.UNIT} {unit} does not exist: the plan has {n} {mod.UNIT}s (0..{n - 1})")
    with sharded.unit_lock(run_dir, mod, unit):
        if mod.unit_done(Path(run_dir), unit):
            return False
        mod.run_units(cfg, Path(run_dir), [unit])
        return True
