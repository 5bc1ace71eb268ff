"""Where analyze's chunked work runs (issue 20): ``analyze.engine = local | dask``.

``local`` (default): everything in the analyze process, descriptors in ``analyze.workers`` spawned
processes (today's path). ``dask``: the same steps, with the chunk-parallel parts run as Dask tasks:

* structural descriptors: one task per group of cache blocks (:func:`toolkit.analyze.dask_steps.
  descriptors`), writing the same per-block cache as the local path (restartable per block) and the
  chunked float32 store ``analyze/descriptors.zarr``;
* feature statistics (:func:`toolkit.analyze.clustering.column_stats`) and the micro-cluster
  assignment pass (:func:`toolkit.analyze.clustering.micro_clusters`): one task per chunk of a Zarr
  feature array, routed through the :func:`toolkit.analyze.clustering.map_chunks` hook by
  :class:`DaskChunkMap`. Results are reduced in chunk order in the driver, so both engines give the
  same numbers (and the same clusters) for the same data.
* whole steps that read only shippable inputs (:class:`Deferred`): each layer's clustering (its
  features are a Zarr array of embeddings.zarr) and the driver ranking of each spectral feature
  (a sample of at most ``FIT_MAX`` rows) start as Dask tasks at the beginning of the stage and run
  on the workers side by side, while the driver works on what it has; the driver collects them in
  order. Under ``local`` the same calls run in this process when their result is first needed.

Where the Dask workers run (``analyze.dask_cluster``; ``auto`` follows ``executor.kind``):

* ``local``: a ``distributed.LocalCluster`` of ``analyze.dask_workers`` processes with
  ``analyze.dask_threads_per_worker`` threads each;
* ``slurm``: a ``dask_jobqueue.SLURMCluster``, one SLURM job per worker, with the analyze stage's
  resources (``executor.analyze``: partition, account, qos, constraint, time_min, cpus_per_task,
  mem_gb, additional sbatch parameters), logs in ``RUN_DIR/logs/analyze/dask/``;
* ``analyze.dask_scheduler``: an address of a running scheduler (any deployment) instead.

The stage's code imports nothing from the launcher (``toolkit.hpc``): the resources are read from
the config schema (:class:`toolkit.config.StageResources`).
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from toolkit.errors import SpectrolensError
from toolkit.layout import RunLayout

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT = 600  # seconds to wait for the first Dask worker (SLURM: queueing time included)
SCATTER_BYTES = 1 << 20  # numpy arguments of a Deferred task larger than this are scattered, not put in the graph
_CLIENT: ContextVar[Any] = ContextVar("spectrolens_analyze_client", default=None)


class EngineError(SpectrolensError, RuntimeError):
    """The Dask engine cannot start (missing package, no worker, bad scheduler address)."""


def cluster_kind(cfg) -> str:
    """``"local"`` or ``"slurm"``: where the Dask workers of ``cfg`` run."""
    kind = cfg.analyze.dask_cluster
    if kind == "auto":
        return "slurm" if cfg.executor.kind == "slurm" else "local"
    return kind


def _walltime(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def slurm_cluster_kwargs(cfg, run_dir: Path) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for the analyze stage's resources
    (``executor.analyze``): one worker process per job with ``cpus_per_task`` threads."""
    res = cfg.executor.analyze
    cores = int(res.cpus_per_task)
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in (("qos", res.qos), ("constraint", res.constraint)) if v]
    extra += [f"--{str(k).replace('_', '-')}={v}" for k, v in res.additional.items()]
    logs = RunLayout(run_dir).logs("analyze") / "dask"
    kw: dict[str, Any] = {
        "cores": cores, "processes": 1, "walltime": _walltime(int(res.time_min)),
        # SLURMCluster needs a memory figure for the worker's limit; without mem_gb SLURM's default applies
        # to the job (no --mem line) and the worker is told 4 GB per core
        "memory": f"{res.mem_gb:g}GB" if res.mem_gb else f"{4 * cores}GB",
        "queue": res.partition, "account": res.account, "job_extra_directives": extra,
        "log_directory": str(logs), "python": sys.executable, "local_directory": str(logs / "scratch"),
        "job_name": "spectrolens-analyze-dask",
        "job_script_prologue": [f"export {k}={v}" for k, v in _worker_env().items()],
        "worker_extra_args": ["--nthreads", str(cfg.analyze.dask_threads_per_worker)]
        if cfg.analyze.dask_threads_per_worker != cores else [],
    }
    if not res.mem_gb:
        kw["job_directives_skip"] = ["--mem"]
    return kw


def _worker_env() -> dict[str, str]:
    from toolkit.runtime import MALLOC_ENV

    return {**MALLOC_ENV, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextmanager
def dask_client(cfg, run_dir: Path) -> Iterator[Any]:
    """A ``distributed.Client`` on the cluster ``cfg`` asks for (closed, with its cluster, on exit)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise EngineError("analyze.engine = dask needs the dask and distributed packages: "
                          "pip install 'spectrolens[dask]' (or set analyze.engine=local)") from None
    a = cfg.analyze
    run_dir = Path(run_dir)
    if a.dask_scheduler:
        try:
            client = Client(a.dask_scheduler, timeout="30s")
        except OSError as e:
            raise EngineError(f"analyze.dask_scheduler {a.dask_scheduler!r}: cannot connect ({e})") from e
        try:
            yield client
        finally:
            client.close()
        return
    kind = cluster_kind(cfg)
    if kind == "local":
        cluster = LocalCluster(n_workers=a.dask_workers, threads_per_worker=a.dask_threads_per_worker,
                               processes=True, dashboard_address=":0", env=_worker_env(),
                               local_directory=str(RunLayout(run_dir).logs("analyze") / "dask"))
    else:
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise EngineError("analyze.dask_cluster = slurm needs dask-jobqueue: pip install 'spectrolens[dask]'") from None
        kw = slurm_cluster_kwargs(cfg, run_dir)
        Path(kw["log_directory"]).mkdir(parents=True, exist_ok=True)
        cluster = SLURMCluster(**kw)
        log.info("analyze: Dask workers as SLURM jobs:\n%s", cluster.job_script())
        cluster.scale(jobs=a.dask_workers)
    client = Client(cluster)
    try:
        try:
            client.wait_for_workers(1, timeout=WORKER_START_TIMEOUT)
        except TimeoutError as e:
            raise EngineError(f"analyze: no Dask worker started within {WORKER_START_TIMEOUT} s ({kind} cluster); "
                              f"see {RunLayout(run_dir).logs('analyze') / 'dask'}") from e
        log.info("analyze: Dask engine on a %s cluster, %d workers, scheduler %s", kind,
                 len(client.scheduler_info()["workers"]), client.scheduler.address)
        yield client
    finally:
        client.close()
        cluster.close()


def _call(fn: Callable, x: Any, a: int, b: int) -> Any:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return fn(x, a, b)


def shippable(x: Any) -> bool:
    """Whether ``x`` is read by the workers themselves: a Zarr array on a shared file system, or a lazy
    :class:`toolkit.analyze.lazy.Spectra` view of one. Other array-likes (numpy in the driver's memory,
    views of the dataset reader's parts) are processed in the driver, not copied to workers."""
    import zarr

    from toolkit.analyze.lazy import Spectra

    return isinstance(x, zarr.Array) or (isinstance(x, Spectra) and isinstance(x.source, zarr.Array))


class DaskChunkMap:
    """A mapper for :func:`toolkit.analyze.clustering.use_chunk_map`: one Dask task per row range of a
    Zarr array, at most ``window`` in flight, results yielded in range order (released as read, so the
    results waiting in worker memory are bounded by the window). Chunk tasks (seconds each) go before
    queued whole steps (a layer's clustering waits for its chunks; a feature's driver ranking does not)."""

    def __init__(self, client: Any, window: int | None = None, in_task: bool = False):
        self.client = client
        n = max(1, len(client.scheduler_info()["workers"]))
        self.window = window or 2 * n + 2
        self.tasks = 0
        self.in_task = in_task  # used from inside a Dask task: leave the worker's pool only while waiting

    def _result(self, f: Any) -> Any:
        """``f``'s result; from inside a task the task gives its thread slot up while it waits (its chunks
        can run on its own worker too) and takes one back before it computes again, so a worker never
        runs more busy threads than its slots (no deadlock: chunk tasks wait for nothing)."""
        if not self.in_task:
            return f.result()
        from distributed import rejoin, secede

        secede()
        try:
            return f.result()
        finally:
            rejoin()

    def __call__(self, fn: Callable, x: Any, ranges: list[tuple[int, int]]) -> Iterator[Any]:
        if not shippable(x) or len(ranges) < 2:
            yield from (fn(x, a, b) for a, b in ranges)
            return
        fn_f, x_f = self.client.scatter([fn, x], broadcast=True, hash=False)
        pending: deque = deque()
        it = iter(ranges)
        try:
            for a, b in it:
                pending.append(self.client.submit(_call, fn_f, x_f, a, b, pure=False, priority=1))
                self.tasks += 1
                if len(pending) >= self.window:
                    f = pending.popleft()
                    yield self._result(f)
                    f.release()
            while pending:
                f = pending.popleft()
                yield self._result(f)
                f.release()
        finally:
            for f in pending:
                f.cancel()


def current_client() -> Any:
    """The Dask client of the running :func:`engine` block (None under the local engine or outside it)."""
    return _CLIENT.get()


def _in_task(fn: Callable, args: tuple, kwargs: dict, rows: int, chunk_tasks: bool) -> tuple[Any, int]:
    """Run ``fn`` on a worker with the stage's chunk size and one BLAS thread; with ``chunk_tasks`` its
    chunked passes (:func:`toolkit.analyze.clustering.map_chunks`) become Dask tasks of their own (the
    task leaves the worker's thread pool only while it waits for them). Returns (value, chunk tasks run)."""
    from threadpoolctl import threadpool_limits

    from toolkit.analyze.clustering import use_chunk_map

    with threadpool_limits(1):
        if not chunk_tasks:
            with use_chunk_map(None, rows):
                return fn(*args, **kwargs), 0
        from distributed import get_client

        mapper = DaskChunkMap(get_client(), in_task=True)
        with use_chunk_map(mapper, rows):
            return fn(*args, **kwargs), mapper.tasks


class Deferred:
    """``fn(*args, **kwargs)`` as a step of the stage: under the dask engine a task submitted at once
    (numpy arguments over ``SCATTER_BYTES`` scattered to the workers first; with ``chunk_tasks`` its
    chunked passes run as tasks of their own on all workers; ``quiet``: its completion is logged at
    DEBUG, for many small steps), under the local engine a call made in
    this process when :meth:`result` is first asked. Either way :meth:`result` returns the same value;
    ``fn`` and its arguments must be picklable for the dask engine (module-level functions, numpy
    arrays, Zarr arrays)."""

    def __init__(self, fn: Callable, args: tuple = (), kwargs: dict | None = None, chunk_tasks: bool = False,
                 quiet: bool = False):
        import numpy as np

        from toolkit.analyze.clustering import chunk_rows

        kwargs = kwargs or {}
        self._name = getattr(fn, "__name__", repr(fn))
        self._quiet = quiet  # many small steps (chunks of a file): logged at DEBUG
        self._call: tuple | None = (fn, args, kwargs)
        self._future: Any = None
        self._value: Any = None
        client = current_client()
        self.remote = client is not None  # whether the step runs as a Dask task
        if client is not None:
            def ship(v: Any) -> Any:
                return client.scatter(v, hash=False) if isinstance(v, np.ndarray) and v.nbytes > SCATTER_BYTES else v

            self._future = client.submit(_in_task, fn, tuple(ship(a) for a in args),
                                         {k: ship(v) for k, v in kwargs.items()}, chunk_rows(), chunk_tasks, pure=False)
            self._call = None

    def result(self) -> Any:
        if self._future is not None:
            (self._value, tasks), self._future = self._future.result(), self._future.release()
            log.log(logging.DEBUG if self._quiet else logging.INFO, "analyze: step %s ran as a Dask task (%d chunk tasks)",
                    self._name, tasks)
        elif self._call is not None:
            fn, args, kwargs = self._call
            self._value, self._call = fn(*args, **kwargs), None
        return self._value


@contextmanager
def engine(cfg, run_dir: Path) -> Iterator[Any]:
    """The analyze engine of ``cfg`` (``local``: chunks of ``analyze.chunk_rows`` rows, in this process;
    yields None). For ``dask``: start the client, compute the descriptors as Dask
    tasks (:func:`toolkit.analyze.dask_steps.descriptors`) and route every chunked pass of the
    clustering through Dask while the block runs; yields the client (None for ``local``)."""
    from toolkit.analyze.clustering import use_chunk_map

    if cfg.analyze.engine != "dask":
        with use_chunk_map(None, cfg.analyze.chunk_rows):
            yield None
        return
    from toolkit.analyze import dask_steps

    with dask_client(cfg, run_dir) as client:
        dask_steps.descriptors(client, cfg, run_dir)
        mapper = DaskChunkMap(client)
        token = _CLIENT.set(client)
        try:
            with use_chunk_map(mapper, cfg.analyze.chunk_rows):
                yield client
        finally:
            _CLIENT.reset(token)
        log.info("analyze: %d chunk tasks ran on Dask", mapper.tasks)
