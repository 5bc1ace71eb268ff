"""Run-time helpers shared by every stage and by the launcher (a leaf module: it imports nothing
from ``toolkit`` but :mod:`toolkit.errors`, and nothing heavy: no torch, zarr, pymatgen or submitit).

* :func:`task_log`: copy this process's log records to ``RUN_DIR/logs/<stage>/<name>.log``.
* :func:`write_text`, :func:`write_json`: atomic writes (temporary file + rename) with one-line errors
  naming the path when the disk is full or not writable (:class:`toolkit.errors.OutOfSpaceError`).
* :class:`FileLock`: an exclusive lock on ``RUN_DIR/.locks/<name>.lock`` that names its holder (pid,
  host); the one-writer-per-unit rule of docs/architecture.md is built on it. A lock held by a killed
  process never blocks: ``flock`` locks die with their process; on file systems without ``flock`` the
  lock file records its owner and a lock of a dead local pid, or a remote lock whose heartbeat is
  older than ``stale_after_s``, is broken.
* :data:`MALLOC_ENV`: glibc allocator settings for stable CPU speed (docs/performance.md).
* :func:`mpi_world`: (rank, size) under an MPI launcher, the one MPI-environment detection.
* :func:`use_bf16`: the one precision rule (``auto`` = bf16 autocast on GPU, fp32 on CPU).
* :func:`tail`: the last lines of a log file, for error messages.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from toolkit.errors import DeviceError, OutOfSpaceError, RunBusyError

log = logging.getLogger(__name__)

#: environment for CPU-side stability/speed (docs/performance.md "CPU timing"); user settings win
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


# ----------------------------------------------------------------------------------------- logging
@contextlib.contextmanager
def task_log(run_dir: str | os.PathLike, stage: str, name: str) -> Iterator[Path]:
    """Copy this process's log records (INFO and above, every logger) to ``RUN_DIR/logs/<stage>/<name>.log``."""
    path = Path(run_dir) / "logs" / stage / f"{name}.log"  # = RunLayout(run_dir).logs(stage) (leaf: no import)
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


def tail(path: str | os.PathLike, n: int = 20) -> str:
    """The last ``n`` lines of a text file (``(no log)`` when it cannot be read)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------------------- writes
def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn out-of-space / read-only / permission errors into one :class:`OutOfSpaceError` naming ``path``."""
    try:
        yield
    except OSError as e:
        if isinstance(e, OutOfSpaceError) or e.errno not in _SPACE_ERRNOS:
            raise
        raise OutOfSpaceError(f"cannot write {path}: {os.strerror(e.errno)} (errno {e.errno}); free space or "
                              f"fix permissions there and re-run: finished work is kept") from e


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``write(fh)`` into a unique temporary file beside it (binary), fsync,
    rename. Concurrent writers never share a temporary name; a failed write (out of space: one-line
    :class:`OutOfSpaceError` naming ``path``) leaves no temporary file and the previous ``path`` intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic UTF-8 text write (:func:`atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(text.encode()))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """Atomic strict-JSON write (NaN/inf become null)."""
    write_text(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False, default=str))


# ----------------------------------------------------------------------------------------- locks
def lock_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / ".locks"


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """Exclusive lock ``RUN_DIR/.locks/<name>.lock``; the file holds the owner ``{pid, host, since}``.

    ``acquire(blocking=False)`` returns False when another process holds it; ``holder()`` says who.
    Use as a context manager for a blocking acquire. Not re-entrant; one object per acquisition."""

    def __init__(self, run_dir: str | os.PathLike, name: str, stale_after_s: float = 600.0) -> None:
        self.path = lock_dir(run_dir) / f"{name}.lock"
        self.name = name
        self.stale_after_s = stale_after_s
        self._fh = None
        self._fallback = False
        self._stop = threading.Event()

    # -- flock path (local disks, Lustre with -o flock, NFSv4) ------------------------------------
    def acquire(self, blocking: bool = True, poll_s: float = 0.5) -> bool:
        with disk_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.close()
            return False
        except OSError as e:
            fh.close()
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._fallback = True
            return self._acquire_exclusive_file(blocking, poll_s)
        self._fh = fh
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(_owner()))
        fh.flush()
        return True

    # -- fallback: O_EXCL lock files with owner and heartbeat ------------------------------------
    def _excl_path(self) -> Path:
        return self.path.with_suffix(".owner")

    def _acquire_exclusive_file(self, blocking: bool, poll_s: float) -> bool:
        p = self._excl_path()
        while True:
            try:
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._break_if_stale(p):
                    continue
                if not blocking:
                    return False
                time.sleep(poll_s)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(_owner()))
            self._start_heartbeat()
            return True

    def _start_heartbeat(self) -> None:
        """Refresh the owner file's time while held, so other hosts never take a live lock for stale."""
        self._stop = threading.Event()

        def beat() -> None:
            while not self._stop.wait(max(1.0, self.stale_after_s / 4)):
                with contextlib.suppress(OSError):
                    os.utime(self._excl_path())

        threading.Thread(target=beat, name=f"lock-heartbeat-{self.name}", daemon=True).start()

    def _break_if_stale(self, p: Path) -> bool:
        try:
            owner = json.loads(p.read_text() or "{}")
            age = time.time() - p.stat().st_mtime
        except (OSError, ValueError):
            return False
        same_host = owner.get("host") == socket.gethostname()
        dead = same_host and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"])
        if dead or (not same_host and age > self.stale_after_s):
            log.warning("breaking stale lock %s held by %s (%s)", p, owner, "dead pid" if dead else f"{age:.0f} s old")
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            return True
        return False

    def release(self) -> None:
        if self._fallback:
            self._stop.set()
            with contextlib.suppress(FileNotFoundError):
                self._excl_path().unlink()
            self._fallback = False
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.seek(0)
                self._fh.truncate()
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def holder(self) -> dict:
        """The owner record of the current holder ({} when unknown)."""
        for p in (self._excl_path(), self.path):
            try:
                text = p.read_text().strip()
                if text:
                    return json.loads(text)
            except (OSError, ValueError):
                continue
        return {}

    def __enter__(self) -> "FileLock":
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def exclusive_or_busy(run_dir: str | os.PathLike, name: str, what: str) -> Iterator[FileLock]:
    """Hold lock ``name`` for the block, or raise :class:`RunBusyError` "run directory busy (pid, host)"."""
    lock = FileLock(run_dir, name)
    if not lock.acquire(blocking=False):
        h = lock.holder()
        raise RunBusyError(f"run directory busy: {run_dir} is being used by {what} (pid {h.get('pid', '?')}, host "
                           f"{h.get('host', '?')}); wait for it to finish or stop it")
    try:
        yield lock
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------- environment
_MPI_ENV = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMIX_RANK", None), ("PMI_RANK", "PMI_SIZE"))


def mpi_world(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(rank, size) when this process was started by an MPI launcher (Open MPI, PMIx, MPICH/Intel MPI),
    else None. PMIx exports no size variable: the size then comes from SLURM or from mpi4py."""
    env = os.environ if environ is None else environ
    for rank_key, size_key in _MPI_ENV:
        if rank_key not in env:
            continue
        size_txt = env.get(size_key) if size_key else None
        size_txt = size_txt or env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
        if size_txt is None:
            from mpi4py import MPI

            size = MPI.COMM_WORLD.Get_size()
        else:
            size = int(size_txt)
        return int(env[rank_key]), size
    return None


def use_bf16(precision: str, device_type: str) -> bool:
    """``bf16`` always, ``auto`` on GPU only (bf16 autocast), ``fp32`` never."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def select_device(requested: str, local_rank: int = 0, setting: str = "device"):
    """The one device rule: ``cpu``; ``cuda`` -> ``cuda:<local_rank mod visible GPUs>`` (made current);
    ``auto`` -> that GPU when torch sees one, else CPU. ``setting`` names the config key in errors."""
    import torch

    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"{setting} is 'cuda' but torch sees no GPU (use 'auto' or 'cpu')")
    idx = int(local_rank) % torch.cuda.device_count()
    torch.cuda.set_device(idx)
    return torch.device("cuda", idx)
