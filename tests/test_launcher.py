"""The launcher contract: stages import nothing from the launcher; one sharded-stage contract driven the
same way by local worker processes, MPI ranks (and SLURM arrays: tests/test_slurm.py); one writer per
unit under concurrent runs; stale locks never block; one runner per run directory."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from toolkit import runtime, sharded
from toolkit.config import load_config
from toolkit.errors import RunBusyError
from toolkit.hpc import launch, pipeline

REPO = Path(__file__).resolve().parents[1]
FAKE = "tests.fake_stage"
STAGE_MODULES = ["toolkit.data.prepare", "toolkit.train", "toolkit.embed", "toolkit.embed.stage", "toolkit.analyze",
                 "toolkit.sharded", "toolkit.runtime", "toolkit.layout", "toolkit.config", "toolkit.data.readers",
                 "toolkit.explain.stage", "toolkit.predict.stage", "toolkit.predict.experiment", "toolkit.train.ensemble"]


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_stage_module_imports_neither_launcher_nor_submitit(module):
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('toolkit.hpc') or "
            "m.split('.')[0] == 'submitit')))")
    p = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [], f"{module} pulls in the launcher"


def _writes(run_dir: Path) -> Counter:
    lines = (run_dir / "fake" / "writes.log").read_text().split()
    return Counter(int(u) for u in lines[0::2])


def _expected_sum() -> int:
    return sum(u * u for u in range(6))


def test_fake_stage_through_local_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # worker processes import tests.fake_stage from the repository root
    run_dir = tmp_path / "run"
    summary = launch.run_sharded(FAKE, load_config(None), run_dir, n_workers=2)
    assert summary["sum"] == _expected_sum()
    assert _writes(run_dir) == Counter(range(6))  # every unit built exactly once
    pids = summary["pids"]
    assert len(set(pids)) == 2 and len(set(pids[0::2])) == 1 and len(set(pids[1::2])) == 1  # u % T == t
    logs = run_dir / "logs" / "fake"
    for name in ("driver.log", "task-0.log", "task-1.log", "worker-0.log", "worker-1.log", "finalize.log"):
        assert (logs / name).stat().st_size > 0, name
    assert "3 of 3 units built here" in (logs / "task-0.log").read_text()
    assert (run_dir / "fake" / "plans.log").read_text().count("\n") == 1  # planned once
    # a second run finds everything done and only finalizes (idempotent)
    assert launch.run_sharded(FAKE, load_config(None), run_dir, n_workers=2)["sum"] == _expected_sum()
    assert _writes(run_dir) == Counter(range(6))


def test_failing_unit_names_worker_and_log_then_rerun_finishes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    monkeypatch.setenv("FAKE_FAIL_UNIT", "3")
    with pytest.raises(RuntimeError, match=r"(?s)worker 1 exited with 1 .*worker-1.log.*unit 3 fails as asked"):
        launch.run_sharded(FAKE, load_config(None), run_dir, n_workers=2)
    assert sorted(_writes(run_dir)) == [0, 1, 2, 4, 5]  # finished units are kept
    monkeypatch.delenv("FAKE_FAIL_UNIT")
    assert launch.run_sharded(FAKE, load_config(None), run_dir, n_workers=2)["sum"] == _expected_sum()
    assert _writes(run_dir) == Counter(range(6))  # only unit 3 was built again


@pytest.mark.mpi
def test_fake_stage_under_mpiexec(tmp_path):
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not installed (apt-get install openmpi-bin)")
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    code = ("import logging, sys; from toolkit.config import load_config; from toolkit.hpc import launch; "
            "logging.basicConfig(level=logging.INFO); "
            "launch.run_sharded('tests.fake_stage', load_config(None), sys.argv[1])")
    p = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", code, str(run_dir)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((run_dir / "fake" / "result.json").read_text())
    assert result["sum"] == _expected_sum() and _writes(run_dir) == Counter(range(6))
    pids = result["pids"]
    assert len(set(pids)) == 2 and len(set(pids[0::2])) == 1 and len(set(pids[1::2])) == 1
    assert "MPI rank 1 of 2" in p.stderr
    assert (run_dir / "logs" / "fake" / "task-1.log").stat().st_size > 0


_RUN = ("import sys; from toolkit.config import load_config; from toolkit.hpc import launch; "
        "print(launch.run_sharded('tests.fake_stage', load_config(None), sys.argv[1], n_workers=int(sys.argv[2]))['sum'])")


@pytest.mark.parametrize("repeat", range(3))
def test_two_concurrent_runs_build_each_unit_once(tmp_path, repeat):
    """Two drivers (2 + 1 workers) started at the same moment on one run directory: both succeed, the
    result equals a single run's, and no unit is ever written twice."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "FAKE_UNIT_SECONDS": "0.3"}
    procs = [subprocess.Popen([sys.executable, "-c", _RUN, str(run_dir), str(w)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in (2, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == str(_expected_sum())
    assert _writes(run_dir) == Counter(range(6))
    assert (run_dir / "fake" / "plans.log").read_text().count("\n") == 1


def test_killed_holder_never_blocks(tmp_path, monkeypatch):
    """A process killed while it holds a unit's lock: the next run builds that unit (flock dies with it)."""
    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    env = {**os.environ, "FAKE_UNIT_SECONDS": "30"}
    code = ("import sys; from toolkit import sharded; from toolkit.config import load_config; "
            "sharded.run_task('tests.fake_stage', load_config(None), sys.argv[1], 0, 1)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO, env=env)
    lock = run_dir / ".locks" / "fake" / "unit-000000.lock"
    deadline = time.time() + 60
    while not (lock.is_file() and lock.read_text()):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    assert json.loads(lock.read_text())["pid"] == proc.pid  # the lock names its holder
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    t0 = time.time()
    summary = launch.run_sharded(FAKE, load_config(None), run_dir, n_workers=1)
    assert summary["sum"] == _expected_sum() and time.time() - t0 < 60


def test_fallback_lock_files_break_dead_local_holders(tmp_path, monkeypatch):
    """Where flock is unsupported (some network file systems) the O_EXCL owner file is used; a lock of a
    dead pid on this host is broken, a live one is not."""
    def no_flock(fh, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = tmp_path / ".locks" / "u.owner"
    owner.parent.mkdir(parents=True)
    owner.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "since": 0}))
    lock = runtime.FileLock(tmp_path, "u")
    assert lock.acquire(blocking=False)  # the dead holder's lock was broken
    other = runtime.FileLock(tmp_path, "u")
    assert not other.acquire(blocking=False)  # a live holder (this process) is respected
    assert other.holder()["pid"] == os.getpid()
    lock.release()
    assert other.acquire(blocking=False)
    other.release()
    assert not owner.exists()


def test_second_runner_is_refused_with_pid_and_host(tmp_path):
    run_dir = tmp_path / "run"
    holder = runtime.FileLock(run_dir, "runner")
    assert holder.acquire(blocking=False)
    try:
        with pytest.raises(RunBusyError, match=rf"run directory busy: .* \(pid {os.getpid()}, host "):
            pipeline.run_pipeline(load_config(None), run_dir, executor="local", stages=["prepare"])
    finally:
        holder.release()


def test_contract_is_checked_and_unknown_stages_named():
    with pytest.raises(ValueError, match="not sharded"):
        sharded.resolve("train")
    with pytest.raises(TypeError, match="does not implement the sharded-stage contract"):
        sharded.resolve("toolkit.layout")
    assert sharded.resolve("prepare").UNIT == "part" and sharded.resolve("embed").UNIT == "shard"


def test_atomic_writes_leave_nothing_behind_when_the_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")
    real_open = open

    def full_open(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        if "w" in mode and str(path).endswith(".tmp"):
            def boom(_):
                raise OSError(errno.ENOSPC, "No space left on device")
            fh.write = boom
        return fh

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(runtime.OutOfSpaceError, match=rf"cannot write {target}: No space left on device"):
        runtime.write_json(target, {"a": 1})
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
