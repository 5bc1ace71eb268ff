"""The prepare stage end to end on real data: 822 MP structures with 2 worker processes, a second run
that recognises the complete store, a real prepare subprocess killed with SIGKILL and resumed, config
changes refused, bad records rejected (never dropped), and the benchmark source's attrs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from toolkit.config import ConfigError, load_config
from toolkit.data import prepare, store
from toolkit.data.records import read_rejects


def jsonl_cfg(path: Path, **over):
    sets = {"data.source": "jsonl", "data.path": str(path), "data.workers": 2, **over}
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def part_mtimes(run_dir: Path) -> dict[str, int]:
    parts = run_dir / "dataset.zarr" / "parts"
    return {p.name: (p / "zarr.json").stat().st_mtime_ns for p in sorted(parts.iterdir()) if (p / "zarr.json").is_file()}


def test_prepare_mp_structures_two_workers_then_second_run_is_noop(tmp_path, shared_data):
    src = shared_data / "mp_structures" / "mp_structures.jsonl"
    cfg = jsonl_cfg(src, **{"data.shard_size": 300})
    run_dir = tmp_path / "run"
    summary = prepare.run(cfg, run_dir)
    assert summary["n_materials"] == 822 and summary["n_rejected"] == 0 and summary["n_parts"] == 3
    r = store.DatasetReader(run_dir / "dataset.zarr")
    assert len(r) == 822 and r.attrs["complete"] is True
    assert r.attrs["graph"] == {"cutoff": 8.0, "max_neighbors": 12, "dedupe_self_images": False}
    assert r.attrs["n_materials"] == 822 and len(r.energy) == 1501 and r.attrs["source"]["source"] == "jsonl"
    assert r.attrs["counts"]["atoms"] == int(r.natoms.sum()) == 16503  # summary.json of the shared data
    assert (r.nedges >= 12 * r.natoms).all()
    ids = [json.loads(line)["material_id"] for line in src.read_text().splitlines()]
    assert [str(x) for x in r.ids] == ids  # source order kept
    assert not r.has_spectrum.any()
    assert (run_dir / "config.yaml").is_file() and "prepare" in json.loads((run_dir / "run_info.json").read_text())["stages"]
    before = part_mtimes(run_dir)
    root_before = (run_dir / "dataset.zarr" / "zarr.json").stat().st_mtime_ns
    t = time.perf_counter()
    again = prepare.run(cfg, run_dir)
    assert time.perf_counter() - t < 5
    assert again == summary
    assert part_mtimes(run_dir) == before
    assert (run_dir / "dataset.zarr" / "zarr.json").stat().st_mtime_ns == root_before

    # a config that changes the data is refused, not mixed in
    with pytest.raises(ConfigError, match=r"graph\.max_neighbors: 12 -> 8"):
        prepare.run(jsonl_cfg(src, **{"data.shard_size": 300, "graph.max_neighbors": 8}), run_dir)
    with pytest.raises(ConfigError, match=r"grid\.num: 1501 -> 301"):
        prepare.plan(jsonl_cfg(src, **{"data.shard_size": 300, "data.grid.num": 301}), run_dir)
    # workers/strict do not change the data: accepted
    assert prepare.plan(jsonl_cfg(src, **{"data.shard_size": 300, "data.workers": 1}), run_dir) == 3


def test_killed_prepare_resumes_without_rebuilding_finished_parts(tmp_path, shared_data, repo_root):
    src = tmp_path / "mp240.jsonl"  # the first 240 real structures: 20 parts of 12
    src.write_text("".join((shared_data / "mp_structures" / "mp_structures.jsonl").open().readlines()[:240]))
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "toolkit.cli", "prepare", "--run-dir", str(run_dir),
            "--set", "data.source=jsonl", "--set", f"data.path={src}", "--set", "data.shard_size=12",
            "--set", "data.workers=1"]
    proc = subprocess.Popen(args, cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    parts_dir = run_dir / "dataset.zarr" / "parts"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            done = [p for p in range(20) if parts_dir.is_dir() and store.part_complete(run_dir / "dataset.zarr", p)]
            if len(done) >= 3:
                break
            assert proc.poll() is None, "prepare finished before it could be killed"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    n_parts = json.loads((run_dir / "prepare" / "plan.json").read_text())["n_parts"]
    assert n_parts == 20
    complete = {p for p in range(n_parts) if store.part_complete(run_dir / "dataset.zarr", p)}
    assert 3 <= len(complete) < n_parts
    assert store.root_attrs(run_dir / "dataset.zarr")["complete"] is False
    with pytest.raises(store.IncompleteStoreError, match="re-run"):
        store.DatasetReader(run_dir / "dataset.zarr")
    before = {k: v for k, v in part_mtimes(run_dir).items() if int(k) in complete}
    time.sleep(0.05)

    out = subprocess.run(args[:-1] + ["data.workers=2"], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{n_parts - len(complete)} of {n_parts} parts to build" in out.stderr
    after = part_mtimes(run_dir)
    assert {k: after[k] for k in before} == before  # finished parts were not rebuilt
    r = store.DatasetReader(run_dir / "dataset.zarr")
    assert len(r) == 240 and len(set(str(x) for x in r.ids)) == 240


def _write_bad_jsonl(shared_data: Path, path: Path) -> list[str]:
    lines = (shared_data / "mp_structures" / "mp_structures.jsonl").read_text().splitlines()[:6]
    recs = [json.loads(x) for x in lines]
    overlap = json.loads(lines[0])
    overlap["material_id"] = "bad-overlap"
    sites = overlap["structure"]["sites"]
    sites[1]["abc"] = [x + 1e-3 for x in sites[0]["abc"]]
    sites[1].pop("xyz", None)
    out = lines[:3] + ["{not json", json.dumps(overlap)] + lines[3:]
    path.write_text("\n".join(out) + "\n")
    return [r["material_id"] for r in recs]


def test_bad_records_are_rejected_listed_and_strict_fails(tmp_path, shared_data, repo_root):
    src = tmp_path / "mixed.jsonl"
    good = _write_bad_jsonl(shared_data, src)
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "toolkit.cli", "prepare", "--strict", "--run-dir", str(run_dir),
                          "--set", "data.source=jsonl", "--set", f"data.path={src}", "--set", "data.workers=1",
                          "--set", "data.shard_size=4"], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    rejects = read_rejects(run_dir / "prepare" / "rejects.csv")
    assert len(rejects) == 2
    assert all(r.source_file.endswith("mixed.jsonl") for r in rejects)
    assert "2 rejected records" in out.stderr
    for r in rejects:
        assert f"{r.source_file},{r.record},{r.reason}" in out.stderr
    summary = json.loads((run_dir / "prepare" / "summary.json").read_text())
    assert summary["n_materials"] == 6 and summary["n_rejected"] == 2
    assert sum(summary["rejects_by_reason"].values()) == 2
    r = store.DatasetReader(run_dir / "dataset.zarr")
    assert [str(x) for x in r.ids] == good  # nothing good dropped, nothing bad kept


def test_benchmark_source_attrs_and_columns(tmp_path):
    cfg = load_config(None, ["data.source=benchmark", "data.benchmark.n_materials=24", "data.shard_size=10",
                             "data.workers=1"])
    run_dir = tmp_path / "run"
    summary = prepare.run(cfg, run_dir)
    assert summary["n_materials"] == 24
    r = store.DatasetReader(run_dir / "dataset.zarr")
    assert r.attrs["benchmark_truth"]["n_materials"] == 24 and "onset" in r.attrs["benchmark_truth"]["features"]
    assert r.has_spectrum.all()
    onset = r.column("descriptors/onset")
    planted = r.column("benchmark/onset")
    assert np.isfinite(onset).sum() >= 20
    ok = np.isfinite(onset) & np.isfinite(planted)
    assert np.median(np.abs(onset[ok] - planted[ok])) < 0.2  # descriptor of the noisy spectrum ~ planted onset
    assert set(str(x) for x in r.column("benchmark/coordination")) <= {
        "tetrahedral", "octahedral", "cubic", "linear", "trigonal_planar", "square_planar", "other"}
    spec = r.column("spectrum")
    assert spec.shape == (24, 1501) and np.isfinite(spec).all()


@pytest.mark.mpi
def test_prepare_under_mpiexec_splits_parts_across_ranks(tmp_path, shared_data, repo_root):
    import shutil

    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not installed (apt-get install openmpi-bin)")
    src = tmp_path / "mp120.jsonl"
    src.write_text("".join((shared_data / "mp_structures" / "mp_structures.jsonl").open().readlines()[:120]))
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    out = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "toolkit.cli", "prepare", "--run-dir", str(run_dir),
                          "--set", "data.source=jsonl", "--set", f"data.path={src}", "--set", "data.shard_size=20"],
                         cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = store.DatasetReader(run_dir / "dataset.zarr")
    assert len(r) == 120 and r.n_parts == 6
    pids = [store.part_attrs(run_dir / "dataset.zarr", p)["pid"] for p in range(6)]
    assert len(set(pids)) == 2  # two ranks wrote ...
    assert len(set(pids[0::2])) == 1 and len(set(pids[1::2])) == 1 and pids[0] != pids[1]  # ... parts u % 2 == rank
    assert "MPI rank 1 of 2" in out.stderr


@pytest.mark.parametrize("repeat", range(3))
def test_two_concurrent_prepare_commands_give_one_correct_store(tmp_path, shared_data, repo_root, repeat):
    """A double submission: two `spectrolens prepare` processes (2 and 1 workers) started together on one
    run directory both finish, every part is built exactly once, and the store equals a single run's."""
    src = tmp_path / "mp60.jsonl"
    src.write_text("".join((shared_data / "mp_structures" / "mp_structures.jsonl").open().readlines()[:60]))
    sets = ["--set", "data.source=jsonl", "--set", f"data.path={src}", "--set", "data.shard_size=6"]
    single = tmp_path / "single"
    prepare.run(jsonl_cfg(src, **{"data.shard_size": 6}), single)
    run_dir = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "toolkit.cli", "prepare", "--run-dir", str(run_dir), *sets,
                               "--set", f"data.workers={w}"], cwd=repo_root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in (2, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    a, b = store.DatasetReader(single / "dataset.zarr"), store.DatasetReader(run_dir / "dataset.zarr")
    assert [str(x) for x in a.ids] == [str(x) for x in b.ids] and len(b) == 60
    for p in range(a.n_parts):
        assert store.part_attrs(single / "dataset.zarr", p)["checksum"] == \
            store.part_attrs(run_dir / "dataset.zarr", p)["checksum"]
    logs = "".join(p.read_text() for p in (run_dir / "logs" / "prepare").glob("task-*.log"))
    built = Counter(int(m) for m in re.findall(r"part (\d{5}): \d+ materials", logs))
    assert built == Counter(range(10))  # one writer per part
    assert json.loads((run_dir / "prepare" / "summary.json").read_text())["n_materials"] == 60


def test_disk_full_while_finalizing_leaves_the_store_incomplete_then_rerun_finishes(tmp_path, shared_data,
                                                                                       monkeypatch):
    """The completion mark is the last write: a full disk while writing summary.json leaves a store that
    readers refuse (not one marked complete without its summary), with a one-line error naming the file."""
    import errno as _errno

    from toolkit import runtime
    from toolkit.errors import OutOfSpaceError

    src = tmp_path / "mp24.jsonl"
    src.write_text("".join((shared_data / "mp_structures" / "mp_structures.jsonl").open().readlines()[:24]))
    cfg = jsonl_cfg(src, **{"data.shard_size": 12, "data.workers": 1})
    run_dir = tmp_path / "run"
    real = runtime.atomic_write

    def full(path, write):
        if Path(path).name == "summary.json":
            raise runtime.OutOfSpaceError(f"cannot write {path}: {os.strerror(_errno.ENOSPC)}")
        return real(path, write)

    monkeypatch.setattr(runtime, "atomic_write", full)
    with pytest.raises(OutOfSpaceError, match="summary.json"):
        prepare.run(cfg, run_dir)
    assert store.root_attrs(run_dir / "dataset.zarr")["complete"] is False
    with pytest.raises(store.IncompleteStoreError):
        store.DatasetReader(run_dir / "dataset.zarr")
    monkeypatch.setattr(runtime, "atomic_write", real)
    assert prepare.run(cfg, run_dir)["n_materials"] == 24
    assert store.DatasetReader(run_dir / "dataset.zarr").attrs["complete"] is True
