"""The pipeline on a real single-node SLURM cluster with accounting (tests/slurm_cluster.sh).

Real daemons (munged, mariadbd, slurmdbd, slurmctld, slurmd), real submitit jobs, the real stages on
the embedded benchmark with a tiny config (40 materials, hidden 16, 101 grid points, 24 epochs,
training as 2 srun tasks over gloo on CPU). Failure tests: scancel the training job and an embed
array task mid-run, re-run, compare with the uninterrupted run; a failing stage cancels its
dependants (--kill-on-invalid-dep=yes) and `spectrolens status` points at the failing log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from toolkit.config import load_config
from toolkit.hpc import records, status
from toolkit.hpc.pipeline import run_pipeline

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("slurm_cluster.sh")
DAEMONS = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sacct", "sbatch")

TINY = {
    "name": "tiny",
    "data": {"source": "benchmark", "benchmark": {"n_materials": 40, "seed": 0},
             "grid": {"start": 0.0, "stop": 15.0, "num": 101}, "shard_size": 10, "workers": 1},
    "model": {"alignn_layers": 1, "gcn_layers": 1, "hidden_features": 16, "embedding_features": 16},
    # 24 epochs: the scancel test cancels training after its first checkpoint; with 6 epochs an idle machine
    # finished training between the checkpoint and the cancel (a flaky failure)
    "train": {"epochs": 24, "batch_size": 8, "device": "cpu", "progress": False, "seed": 7},
    "embed": {"workers": 1, "shard_size": 2, "batch_size": 8, "device": "cpu"},
    "analyze": {"workers": 1, "max_clusters": 4, "permutation_repeats": 1, "layers": ["readout"], "probe_folds": 2},
    "executor": {"kind": "slurm", "poll_seconds": 1,
                 "prepare": {"array_tasks": 2, "cpus_per_task": 1, "time_min": 10},
                 "train": {"nodes": 1, "tasks_per_node": 2, "cpus_per_task": 1, "time_min": 10},
                 "embed": {"array_tasks": 2, "cpus_per_task": 1, "time_min": 10},
                 "analyze": {"cpus_per_task": 1, "time_min": 10}},
}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real SLURM cluster for the session; stopped (pidfiles, newest first) afterwards."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(f"SLURM binaries absent ({', '.join(missing)}): install with scripts/setup.sh --test "
                    f"(apt: slurm-wlm slurmdbd munge mariadb-server libpmix-dev)")
    d = tmp_path_factory.mktemp("slurm")
    p = subprocess.run(["bash", str(SCRIPT), "start", str(d)], capture_output=True, text=True, timeout=240)
    if p.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], timeout=120)
        pytest.fail(f"tests/slurm_cluster.sh start failed ({p.returncode}):\n{p.stderr[-3000:]}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(d / "etc" / "slurm.conf")
    try:
        yield d
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], timeout=120)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        left = [n for n in ("slurmctld", "slurmd", "slurmdbd", "mariadbd") if (d / "run" / f"{n}.pid").exists()]
        assert not left, f"daemons not stopped: {left}"


def tiny_cfg(**over):
    raw = json.loads(json.dumps(TINY))
    for dotted, v in over.items():
        cur = raw
        keys = dotted.split("__")
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        cur[keys[-1]] = v
    return load_config(None, raw)


def _states(run_dir: Path) -> dict[tuple[str, str], str]:
    return {(r.stage, r.task): r.state for r in status.rows(run_dir)}


def _wait(pred, timeout: float, what: str, poll: float = 0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _wait_terminal(run_dir: Path, timeout: float = 300) -> list[status.Row]:
    def done():
        rs = status.rows(run_dir)
        return rs if all(r.state in status.TERMINAL for r in rs) else None

    return _wait(done, timeout, f"every job of {run_dir} to finish", poll=1.0)


def _sacct_params(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def _outputs(run_dir: Path) -> dict:
    """What the pipeline computed: embedding ids/rows/predictions, trained weights, analysis clusters."""
    from toolkit.embed import open_embeddings

    root = open_embeddings(run_dir)
    out = {"ids": [str(x) for x in root["ids"][:]], "index": np.asarray(root["index"][:]),
           "prediction": np.asarray(root["prediction"][:]), "readout": np.asarray(root["layers/readout/mean"][:])}
    ranks = sorted((run_dir / "train").glob("rank*.json"))
    out["weights"] = {json.loads(p.read_text())["weights_sha256"] for p in ranks}
    out["metrics"] = json.loads((run_dir / "train" / "metrics.json").read_text())
    return out


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tmp_path_factory):
    """The uninterrupted pipeline: submitted, waited on, every job COMPLETED in sacct."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    t0 = time.monotonic()
    rc = run_pipeline(tiny_cfg(), run_dir, executor="slurm", wait=True)
    return run_dir, rc, time.monotonic() - t0


def test_pipeline_on_slurm(reference_run, capsys):
    run_dir, rc, seconds = reference_run
    assert rc == 0, (run_dir / "pipeline.json").read_text()
    rec = records.load(run_dir)
    assert set(rec["stages"]) == {"prepare", "train", "embed", "analyze"}
    # job structure: arrays of 2 tasks + finalize for sharded stages, one 2-rank job for train
    prep, train, emb = rec["stages"]["prepare"], rec["stages"]["train"], rec["stages"]["embed"]
    assert [j["role"] for j in prep["jobs"]] == ["array", "finalize"] and len(prep["jobs"][0]["tasks"]) == 2
    assert [j["role"] for j in emb["jobs"]] == ["array", "finalize"] and len(emb["jobs"][0]["tasks"]) == 2
    assert train["jobs"][0]["role"] == "ranks" and len(train["jobs"][0]["tasks"]) == 2
    # afterok chain: each stage waited on the previous stage's last job
    assert train["after"] == [prep["jobs"][1]["job_id"]]
    assert emb["after"] == [train["jobs"][0]["job_id"]]
    assert rec["stages"]["analyze"]["after"] == [emb["jobs"][1]["job_id"]]
    # every job and array task completed according to SLURM accounting
    rows = status.rows(run_dir)
    assert len(rows) == 2 + 1 + 2 + 2 + 1 + 1 and all(r.state == "completed" for r in rows), rows
    # fresh submitit folder per submission, inside the run dir; logs per stage and task
    folders = list((run_dir / "submitit").iterdir())
    assert len(folders) == 1 and (folders[0] / "train").is_dir()
    for name in ("prepare/task-0.log", "prepare/task-1.log", "prepare/finalize.log", "embed/task-0.log",
                 "embed/task-1.log", "train/rank0.log", "train/rank1.log", "analyze/job.log"):
        assert (run_dir / "logs" / name).stat().st_size > 0, name
    # ranks ran as 2 srun tasks of one job, synchronised (same weights)
    ranks = [json.loads((run_dir / "train" / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and {r["launcher"] for r in ranks} == {"slurm"}
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    # outputs: every material embedded exactly once, report written, run recorded
    out = _outputs(run_dir)
    assert len(out["ids"]) == 40 and len(set(out["ids"])) == 40
    assert np.isfinite(out["prediction"]).all() and np.isfinite(out["readout"]).all()
    assert (run_dir / "analyze" / "report" / "index.html").is_file()
    assert load_config(run_dir / "config.yaml").executor.kind == "slurm"
    assert json.loads((run_dir / "run_info.json").read_text())["seeds"]["train"] == 7
    # status command through the real CLI
    p = subprocess.run([sys.executable, "-m", "toolkit.cli", "status", str(run_dir)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("completed") == 9
    # a second run of the same pipeline skips every stage and submits nothing
    assert run_pipeline(tiny_cfg(), run_dir, executor="slurm", wait=True) == 0
    assert len(list((run_dir / "submitit").iterdir())) == 1
    assert all(s["state"] == "skipped" for s in records.load(run_dir)["stages"].values())
    print(f"SLURM pipeline wall time: {seconds:.0f} s")


def test_scancel_training_and_embed_task_then_resume(reference_run, tmp_path):
    ref_dir, ref_rc, _ = reference_run
    assert ref_rc == 0
    run_dir = tmp_path / "run"
    cfg = tiny_cfg()
    # 1) training cancelled after its first checkpoint: the dependants are cancelled, not left pending
    assert run_pipeline(cfg, run_dir, executor="slurm", wait=False) == 0
    train_job = records.load(run_dir)["stages"]["train"]["jobs"][0]["job_id"]

    def first_checkpoint():
        if (run_dir / "train" / "checkpoints" / "last.pt").is_file():
            return True
        bad = [r for r in status.rows(run_dir) if r.stage in ("prepare", "train") and r.state in ("failed", "cancelled")]
        assert not bad, f"{bad[0].stage} {bad[0].task} {bad[0].state} before the checkpoint; log {bad[0].log}"
        return False

    _wait(first_checkpoint, 300, "the first training checkpoint", poll=0.5)
    subprocess.run(["scancel", train_job], check=True)
    rows = _wait_terminal(run_dir)
    st = {(r.stage, r.task): r.state for r in rows}
    assert st[("train", "rank0")] == "cancelled"
    assert st[("embed", "0")] == st[("embed", "finalize")] == st[("analyze", "-")] == "cancelled"
    assert not (run_dir / "train" / "metrics.json").exists()

    # 2) re-run: prepare skipped, training resumes from its checkpoint; one embed task cancelled mid-run
    assert run_pipeline(cfg, run_dir, executor="slurm", wait=False) == 0
    rec = records.load(run_dir)
    assert rec["stages"]["prepare"]["state"] == "skipped"
    emb = rec["stages"]["embed"]["jobs"][0]["tasks"]
    from toolkit.embed.store import done_shards

    store = run_dir / "embeddings.zarr"

    # task 0 owns shards 0, 2, .., 18: cancel it right after its first shard's completion record appears
    _wait(lambda: 0 in done_shards(store) if (store / "zarr.json").exists() else False, 300,
          "embed shard 0 (task 0's first)", poll=0.05)
    subprocess.run(["scancel", emb[0]["job_id"]], check=True)
    rows = _wait_terminal(run_dir)
    st = {(r.stage, r.task): r.state for r in rows}
    assert st[("train", "rank0")] == "completed"
    assert "resumed from" in (run_dir / "logs" / "train" / "rank0.log").read_text()
    assert st[("embed", "0")] == "cancelled" and st[("embed", "1")] == "completed"
    assert st[("embed", "finalize")] == st[("analyze", "-")] == "cancelled"
    done_before = done_shards(store)
    task0 = set(range(0, 20, 2))
    assert set(range(1, 20, 2)) <= done_before and 0 in done_before, done_before
    if task0 <= done_before:  # tiny shards take milliseconds: on an idle machine task 0 may finish them all
        print(f"note: embed task 0 wrote all its shards before scancel reached it ({sorted(done_before)})")
    stamps = {s: (store / "_progress" / f"shard-{s:05d}" / "zarr.json").stat().st_mtime_ns for s in done_before}

    # 3) re-run: only the missing shards are computed, the rest is reused
    assert run_pipeline(cfg, run_dir, executor="slurm", wait=True) == 0
    assert done_shards(store) == set(range(20))
    assert {s: (store / "_progress" / f"shard-{s:05d}" / "zarr.json").stat().st_mtime_ns for s in done_before} == stamps
    rec = records.load(run_dir)
    assert rec["stages"]["train"]["state"] == "skipped"
    assert len(rec["history"]) >= 4  # earlier submissions are kept
    assert len(list((run_dir / "submitit").iterdir())) == 3  # a fresh submitit folder per submission

    # final outputs equal the uninterrupted run's: no missing or duplicate rows, same model
    got, ref = _outputs(run_dir), _outputs(ref_dir)
    assert got["ids"] == ref["ids"] and len(set(got["ids"])) == 40
    np.testing.assert_array_equal(got["index"], ref["index"])
    assert got["weights"] == ref["weights"], "training resumed from a checkpoint must end with the same weights"
    np.testing.assert_allclose(got["prediction"], ref["prediction"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["readout"], ref["readout"], rtol=0, atol=1e-5)


def test_failing_stage_cancels_dependants_and_status_points_to_log(slurm_cluster, tmp_path):
    bad = tmp_path / "missing.jsonl"  # does not exist: every prepare array task fails on it
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(data__source="jsonl", data__path=str(bad))
    rc = run_pipeline(cfg, run_dir, executor="slurm", wait=True)
    assert rc == 1
    rows = status.rows(run_dir)
    st = {(r.stage, r.task): r for r in rows}
    failed = [r for r in rows if r.state == "failed"]
    assert failed and all(r.stage == "prepare" for r in failed), rows
    for key in (("prepare", "finalize"), ("train", "rank0"), ("embed", "0"), ("embed", "finalize"), ("analyze", "-")):
        assert st[key].state == "cancelled", (key, st[key])  # kill-on-invalid-dep: nothing left pending
    # the job script carried the flag
    sub = next((run_dir / "submitit").iterdir()) / "train"
    assert "#SBATCH --kill-on-invalid-dep=yes" in next(sub.glob("*_submission.sh")).read_text()
    # `spectrolens status` exits 1 and names the failing task's log, which holds the reason
    p = subprocess.run([sys.executable, "-m", "toolkit.cli", "status", str(run_dir)], capture_output=True, text=True)
    assert p.returncode == 1
    log_path = Path(failed[0].log)
    assert f"failed: see {log_path}" in p.stdout
    text = log_path.read_text()
    assert "missing.jsonl" in text and "Traceback" in text


def test_the_same_submitit_job_runs_inside_the_container(slurm_cluster, tmp_path, monkeypatch):
    """submitit's `python` = `apptainer exec --nv --bind ... IMAGE python`: srun starts the job's
    Python through the container runtime (a stand-in here, Apptainer cannot run on this machine)."""
    from test_containers import _fake_apptainer

    from toolkit.hpc.executors import SlurmExecutor

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "apptainer.jsonl"
    _fake_apptainer(bin_dir, record)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # sbatch exports it to the job
    image = tmp_path / "spectrolens.sif"
    image.write_bytes(b"SIF")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = tiny_cfg(container__image=str(image))
    sx = SlurmExecutor(cfg, run_dir)
    job = sx._executor("analyze", cfg.executor.analyze, [], "single").submit(os.getenv, "FAKE_APPTAINER")
    assert job.result() == "1"
    calls = [json.loads(x) for x in record.read_text().splitlines()]
    assert len(calls) == 1 and calls[0]["image"] == str(image) and calls[0]["opts"]["--nv"]
    assert calls[0]["opts"]["binds"] == [str(run_dir)]
    assert calls[0]["cmd"] == ["python", "-u", "-m", "submitit.core._submit", str(sx.folder / "analyze")]


def test_fake_sharded_stage_as_a_slurm_array(slurm_cluster, tmp_path, monkeypatch):
    """The launcher contract on SLURM: the tiny fake stage of tests/test_launcher.py runs as a 2-task
    array + finalize job, through the same toolkit.hpc.stages.array_task as local workers and MPI ranks."""
    from collections import Counter

    from toolkit.config import StageResources
    from toolkit.hpc.executors import SlurmExecutor

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # jobs import tests.fake_stage from here
    run_dir = tmp_path / "fake"
    ex = SlurmExecutor(load_config(None, {"executor": {"kind": "slurm"}}), run_dir)
    jobs, last = ex.submit_sharded("tests.fake_stage", StageResources(array_tasks=2, cpus_per_task=1, time_min=5), [])
    ids = [t["job_id"] for j in jobs for t in j["tasks"]]
    assert [j["role"] for j in jobs] == ["array", "finalize"] and last == [jobs[1]["job_id"]]
    deadline = time.time() + 300
    while True:
        states = status.slurm_states(ids)
        if all(states.get(i, ("unknown",))[0] in status.TERMINAL for i in ids):
            break
        assert time.time() < deadline, states
        time.sleep(1)
    assert all(states[i][0] == "completed" for i in ids), states
    result = json.loads((run_dir / "fake" / "result.json").read_text())
    assert result["sum"] == sum(u * u for u in range(6))
    writes = (run_dir / "fake" / "writes.log").read_text().split()
    assert Counter(int(u) for u in writes[0::2]) == Counter(range(6))
    pids = result["pids"]
    assert len(set(pids[0::2])) == 1 and len(set(pids[1::2])) == 1 and pids[0] != pids[1]
    for name in ("task-0.log", "task-1.log", "finalize.log"):
        assert (run_dir / "logs" / "fake" / name).stat().st_size > 0, name


def test_ensemble_members_as_one_slurm_array_then_one_report_job(slurm_cluster, tmp_path):
    """`train.ensemble: 2` with one rank per member: the members are one SLURM array (task k trains
    member k into train/members/<k>, its own log), then one job afterok the array writes the ensemble
    report (train/metrics.json with calibration, train/best.pt = member 0's); every job COMPLETED."""
    import torch

    from toolkit.layout import RunLayout

    run_dir = tmp_path / "ens"
    cfg = tiny_cfg(train__epochs=1, train__ensemble=2, executor__train__tasks_per_node=1)
    assert run_pipeline(cfg, run_dir, executor="slurm", stages=["prepare", "train"], wait=True) == 0
    rec = records.load(run_dir)["stages"]["train"]
    assert [j["role"] for j in rec["jobs"]] == ["array", "finalize"]
    arr = rec["jobs"][0]
    assert [t["task"] for t in arr["tasks"]] == [0, 1] and [t["job_id"] for t in arr["tasks"]] == [
        f"{arr['job_id']}_0", f"{arr['job_id']}_1"]
    rows = [r for r in status.rows(run_dir) if r.stage == "train"]
    assert [(r.task, r.state) for r in rows] == [("0", "completed"), ("1", "completed"), ("finalize", "completed")]
    lay = RunLayout(run_dir)
    for k in (0, 1):
        assert (lay.member_dir(k) / "metrics.json").is_file() and lay.member_best(k).is_file()
        assert (run_dir / "logs" / "train" / f"member{k}-rank0.log").stat().st_size > 0
        assert json.loads((lay.member_dir(k) / "rank0.json").read_text())["world_size"] == 1  # one task per member
    w = [torch.load(lay.member_best(k), weights_only=True)["model"]["fc.weight"] for k in (0, 1)]
    assert not torch.equal(w[0], w[1])  # seeds 7 and 8
    metrics = json.loads(lay.train_metrics.read_text())
    assert metrics["ensemble"] == 2 and [m["seed"] for m in metrics["members"]] == [7, 8]
    for k in (0, 1):  # the report job evaluated the members the array tasks trained
        own = json.loads((lay.member_dir(k) / "metrics.json").read_text())
        assert own["test_spectrum_mae"] == pytest.approx(metrics["members"][k]["test_spectrum_mae"], rel=1e-5)
    assert 0 < metrics["calibration"]["recalibration_factor"] and metrics["calibration"]["fitted_on"] == "val"
    assert lay.best_checkpoint.read_bytes() == lay.member_best(0).read_bytes() and lay.is_complete("train")
    # the report job ran after both members finished and trained none itself
    log = (run_dir / "logs" / "train" / "rank0.log").read_text()
    assert "ensemble member 1/2 is finished" in log and "ensemble member 2/2 is finished" in log
    assert all(lay.train_metrics.stat().st_mtime >= (lay.member_dir(k) / "metrics.json").stat().st_mtime for k in (0, 1))


def test_ensemble_members_as_ddp_jobs_then_one_report_job(slurm_cluster, tmp_path):
    """`train.ensemble: 2` with 2 ranks per member: one 2-rank DDP job per member (ranks synchronised,
    each member in its own folder), then the report job afterok both."""
    from toolkit.layout import RunLayout

    run_dir = tmp_path / "ens-ddp"
    cfg = tiny_cfg(train__epochs=1, train__ensemble=2)  # executor.train: 1 node x 2 tasks
    assert run_pipeline(cfg, run_dir, executor="slurm", stages=["prepare", "train"], wait=True) == 0
    rec = records.load(run_dir)["stages"]["train"]
    assert [(j["role"], j.get("member")) for j in rec["jobs"]] == [("ranks", 0), ("ranks", 1), ("finalize", None)]
    rows = [r for r in status.rows(run_dir) if r.stage == "train"]
    assert [r.state for r in rows] == ["completed"] * 5, rows  # 2 x 2 ranks + the report job
    lay = RunLayout(run_dir)
    for k in (0, 1):
        ranks = [json.loads((lay.member_dir(k) / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["world_size"] for r in ranks] == [2, 2] and {r["launcher"] for r in ranks} == {"slurm"}
        assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
        assert (run_dir / "logs" / "train" / f"member{k}-rank1.log").stat().st_size > 0
    metrics = json.loads(lay.train_metrics.read_text())
    assert metrics["ensemble"] == 2 and [m["seed"] for m in metrics["members"]] == [7, 8] and lay.is_complete("train")
