"""Rank/world discovery and process-group setup: one code path for one process, torchrun, SLURM and MPI.

Precedence (first match wins):

1. **torchrun** (``RANK`` and ``WORLD_SIZE`` set): ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` from torchrun.
2. **MPI** (``OMPI_COMM_WORLD_RANK``/``PMIX_RANK``/``PMI_RANK``): rank 0's address and a free port are
   broadcast over MPI (mpi4py). Checked before SLURM because ``sbatch --wrap "mpirun ..."`` sets both.
3. **SLURM** (``SLURM_PROCID`` and more than one task in the step): master = first host of the step's
   node list (``scontrol show hostnames``, else submitit's parser), port = ``MASTER_PORT`` or derived
   from the job id (the same on every task, as submitit's ``TorchDistributedEnvironment`` does).
4. otherwise a single process (no process group, no DDP wrapper; the same training loop).
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from toolkit.errors import SpectrolensError
from toolkit.runtime import mpi_world
from toolkit.runtime import select_device as _select_device

log = logging.getLogger(__name__)


class DistributedSetupError(SpectrolensError, RuntimeError):
    """The launcher's environment is inconsistent (the message names the variables)."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "single"  # single | torchrun | mpi | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for n in names:
        v = env.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise DistributedSetupError(f"environment variable {n}={v!r} is not an integer") from None
    return None


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``node[01-03],gpu7``) into host names, first host first."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True)
            hosts = out.stdout.split()
            if hosts:
                return hosts
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("scontrol show hostnames %s failed (%s); using submitit's parser", nodelist, e)
    from submitit.slurm.slurm import _parse_node_list

    return list(_parse_node_list(nodelist))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _mpi_master() -> tuple[str, int]:
    """Rank 0's host and a free port on it, broadcast to every MPI rank."""
    try:
        from mpi4py import MPI
    except Exception as e:  # ImportError, or RuntimeError when no MPI library can be loaded
        raise DistributedSetupError(f"launched under MPI but mpi4py cannot be used: {e}") from e
    comm = MPI.COMM_WORLD
    payload = (socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None
    host, port = comm.bcast(payload, root=0)
    return str(host), int(port)


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Find rank, world size, local rank and the rendezvous address from the launcher's environment."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE") or 1
        rank = _int(env, "RANK") or 0
        port = _int(env, "MASTER_PORT")
        if world > 1 and (not env.get("MASTER_ADDR") or port is None):
            raise DistributedSetupError("RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not "
                                        "(launch with torchrun, or export all four)")
        return DistEnv(rank, world, _int(env, "LOCAL_RANK") or 0, env.get("MASTER_ADDR"), port, "torchrun")

    mpi = mpi_world(env)
    if mpi is not None:
        mpi_rank, world = mpi
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID") or 0
        if world <= 1:
            return DistEnv(0, 1, local, None, None, "mpi")
        host, port = _mpi_master()
        return DistEnv(mpi_rank, world, local, host, port, "mpi")

    procid = _int(env, "SLURM_PROCID")
    ntasks = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if procid is not None and ntasks is not None and ntasks > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise DistributedSetupError("SLURM_PROCID/SLURM_NTASKS are set but SLURM_JOB_NODELIST is not")
        master = slurm_hostnames(nodelist)[0]
        port = _int(env, "MASTER_PORT")
        if port is None:  # same rule as submitit.helpers.TorchDistributedEnvironment: seeded by the job id
            port = random.Random(env.get("SLURM_JOB_ID", "0")).randint(20000, 60000)
        return DistEnv(procid, ntasks, _int(env, "SLURM_LOCALID") or 0, master, port, "slurm")

    return DistEnv()


def _local_world_size(env: Mapping[str, str]) -> int:
    """Ranks of this job on this node, from the launcher's environment (1 when unknown)."""
    n = _int(env, "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
    if n is None:  # SLURM: "8(x2),4" -> 8 tasks on the first node
        first = (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "").split(",")[0].split("(")[0]
        n = int(first) if first.isdigit() else None
    return max(1, n or 1)


def cpu_threads(environ: Mapping[str, str] | None = None, affinity: set[int] | None = None,
                node_cpus: int | None = None) -> tuple[int, str]:
    """Intra-op threads for one CPU training rank, and why.

    ``OMP_NUM_THREADS`` wins. Otherwise, when the launcher pinned this process to fewer CPUs than
    the node has (SLURM cgroups / srun binding, ``mpiexec --bind-to``), use all of those; else share the
    node's CPUs among this node's ranks. torch's default (every core, in every rank) oversubscribes
    a node running several ranks, and the message-passing scatter is 25-60x slower under contention
    (docs/performance.md)."""
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cpus = affinity if affinity is not None else os.sched_getaffinity(0)
    total = node_cpus or os.cpu_count() or len(cpus)
    if len(cpus) < total:
        return len(cpus), f"CPU affinity ({len(cpus)} of {total} CPUs)"
    local = _local_world_size(env)
    return max(1, len(cpus) // local), f"{len(cpus)} CPUs shared by {local} rank(s) on this node"


def select_device(requested: str, dist_env: DistEnv) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when a GPU is visible, else CPU (:func:`toolkit.runtime.select_device`)."""
    return _select_device(requested, dist_env.local_rank, setting="train.device")


def select_backend(requested: str, device: torch.device) -> str:
    """``auto`` -> NCCL on GPU, gloo on CPU; NCCL on a CPU device is refused."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise DistributedSetupError("train.dist_backend=nccl needs a GPU device; use gloo (or auto) on CPU")
    return requested


def init_process_group(dist_env: DistEnv, backend: str, timeout_minutes: float = 30.0) -> bool:
    """Join the process group (no-op for one process). Returns True if a group was created."""
    if not dist_env.distributed or dist.is_initialized():
        return dist.is_initialized()
    init = f"tcp://{dist_env.master_addr}:{dist_env.master_port}"
    if dist_env.launcher == "torchrun":
        init = "env://"
    log.info("rank %d/%d (%s) joining %s process group at %s", dist_env.rank, dist_env.world_size,
             dist_env.launcher, backend, init)
    dist.init_process_group(backend=backend, init_method=init, rank=dist_env.rank, world_size=dist_env.world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (a collective: every rank must call it)."""
    return any_ranks([flag], device)[0]


def any_ranks(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of a few flags over ranks, in one collective (every rank must call it)."""
    if not dist.is_initialized():
        return [bool(f) for f in flags]
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of a few numbers over ranks (float64)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
