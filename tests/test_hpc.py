"""The pipeline runner with the local executor, the SLURM job parameters from the profiles,
the demo config, and the status command's parsing of SLURM accounting output."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toolkit.config import ConfigError, load_config
from toolkit.hpc import pipeline, records, stages, status
from toolkit.hpc.executors import LocalExecutor, SlurmExecutor

REPO = Path(__file__).resolve().parents[1]


def _jsonl(tmp_path: Path, shared_data: Path, n: int, bad_line: bool = False) -> Path:
    src = tmp_path / "data" / "mp.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    lines = (shared_data / "mp_structures" / "mp_structures.jsonl").read_text().splitlines()[:n]
    if bad_line:
        lines.insert(3, '{"material_id": "broken", "structure": 42}')
    src.write_text("\n".join(lines) + "\n")
    return src


def _write_cfg(tmp_path: Path, data: Path) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(yaml.safe_dump({"data": {"source": "jsonl", "path": str(data), "shard_size": 5, "workers": 2}}))
    return p


def test_local_run_records_skips_and_resumes(tmp_path, shared_data):
    """`spectrolens run --stages prepare` through the real CLI: records, logs, rejects, then a skip."""
    data = _jsonl(tmp_path, shared_data, 12, bad_line=True)
    cfg_file = _write_cfg(tmp_path, data)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "toolkit.cli", "run", str(cfg_file), "--run-dir", str(run_dir), "--stages", "prepare"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = records.load(run_dir)
    assert rec["executor"] == "local"
    st = rec["stages"]["prepare"]
    assert st["state"] == "completed" and st["returncode"] == 0
    assert Path(st["log"]) == run_dir / "logs" / "prepare" / "prepare.log" and Path(st["log"]).stat().st_size > 0
    assert stages.is_complete("prepare", run_dir) and not stages.is_complete("train", run_dir)
    # the one bad record is reported, not dropped silently
    rejects = (run_dir / "prepare" / "rejects.csv").read_text()
    assert "broken" in rejects and str(data.name) in rejects
    assert load_config(run_dir / "config.yaml").data.path == data
    info = json.loads((run_dir / "run_info.json").read_text())
    assert "versions" in info and "seeds" in info
    # status from the run directory's own records
    s = subprocess.run([sys.executable, "-m", "toolkit.cli", "status", str(run_dir)], capture_output=True, text=True)
    assert s.returncode == 0 and "prepare" in s.stdout and "completed" in s.stdout
    # a re-run skips the complete stage and keeps the earlier record in the history
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = records.load(run_dir)
    assert rec["stages"]["prepare"]["state"] == "skipped"
    assert rec["history"][-1]["state"] == "completed"


def test_local_failure_stops_the_chain_and_status_points_to_the_log(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    run_dir = tmp_path / "run"
    cfg = load_config(None, {"data": {"source": "jsonl", "path": str(missing)}})
    assert pipeline.run_pipeline(cfg, run_dir, executor="local", stages=["prepare", "train"]) == 1
    rec = records.load(run_dir)
    assert rec["stages"]["prepare"]["state"] == "failed" and rec["stages"]["prepare"]["returncode"] != 0
    assert rec["stages"]["train"]["state"] == "cancelled"
    log = Path(rec["stages"]["prepare"]["log"])
    assert "nowhere.jsonl" in log.read_text()
    p = subprocess.run([sys.executable, "-m", "toolkit.cli", "status", str(run_dir)], capture_output=True, text=True)
    assert p.returncode == 1
    assert f"failed: see {log}" in p.stdout and "cancelled" in p.stdout


def test_run_needs_a_run_dir_and_known_stages(tmp_path):
    cfg = load_config(None, {})
    with pytest.raises(ConfigError, match="run directory"):
        pipeline.run_pipeline(cfg, None)
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline.run_pipeline(cfg, tmp_path / "r", stages=["prepare", "trian"])
    assert status.main(tmp_path / "never-ran") == 4


def test_local_commands(tmp_path):
    cfg = load_config(REPO / "jobs" / "local.yaml", ["executor.train.tasks_per_node=2"])
    ex = LocalExecutor(cfg, tmp_path, tmp_path / "config.yaml")
    common = ["--config", str(tmp_path / "config.yaml"), "--run-dir", str(tmp_path)]
    assert ex.command("prepare") == [sys.executable, "-m", "toolkit.cli", "prepare", *common]
    assert ex.command("train") == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc_per_node=2", "-m", "toolkit.cli", "train", *common]


def test_slurm_parameters_from_the_gpu_profile_with_overrides(tmp_path):
    cfg = load_config(REPO / "jobs" / "slurm-gpu.yaml",
                      ["executor.train.gpus_per_node=8", "executor.train.tasks_per_node=8",
                       "executor.train.account=proj42", "executor.train.qos=high"])
    ex = SlurmExecutor(cfg, tmp_path, stamp="S")
    assert ex.folder == tmp_path.absolute() / "submitit" / "S"
    p = ex.parameters("train", cfg.executor.train, ["11", "12"], "ranks")
    assert p["nodes"] == 2 and p["ntasks_per_node"] == 8 and p["gpus_per_node"] == 8
    assert p["partition"] == "gpu" and p["account"] == "proj42" and p["qos"] == "high"
    assert p["time"] == 1440 and p["mem"] == f"{200 * 1024}M" and p["cpus_per_task"] == 8
    assert p["dependency"] == "afterok:11:12"
    assert p["additional_parameters"]["kill_on_invalid_dep"] == "yes"
    arr = ex.parameters("embed", cfg.executor.embed, [], "array")
    assert arr["nodes"] == 1 and arr["ntasks_per_node"] == 1 and arr["gpus_per_node"] == 1
    assert arr["array_parallelism"] == 8 and "dependency" not in arr
    fin = ex.parameters("embed", cfg.executor.embed, ["99"], "finalize")
    assert "gpus_per_node" not in fin and fin["cpus_per_task"] == 1 and fin["job_name"].endswith("-finalize")
    # the batch script submitit writes from these parameters
    from submitit.slurm.slurm import _make_sbatch_string

    script = _make_sbatch_string(command="python -m x", folder=tmp_path, **p)
    for flag in ("--kill-on-invalid-dep=yes", "--dependency=afterok:11:12", "--gpus-per-node=8",
                 "--ntasks-per-node=8", "--nodes=2", "--account=proj42", "--partition=gpu"):
        assert f"#SBATCH {flag}" in script, flag
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}" in script


def test_every_profile_is_a_valid_config():
    for f in sorted((REPO / "jobs").glob("*.yaml")):
        cfg = load_config(f)
        assert cfg.executor.kind in ("local", "slurm"), f


def test_demo_config_is_shipped_and_matches_jobs_demo_yaml():
    shipped = REPO / "toolkit" / "resources" / "demo.yaml"
    assert shipped.read_bytes() == (REPO / "jobs" / "demo.yaml").read_bytes()
    cfg = pipeline.demo_config(["train.epochs=1"])
    assert cfg.train.epochs == 1 and cfg.data.source == "benchmark" and cfg.executor.kind == "local"
    assert cfg.model_dump(exclude={"train"}) == load_config(REPO / "jobs" / "demo.yaml").model_dump(exclude={"train"})


def test_demo_summary_reads_the_run_outputs(tmp_path):
    (tmp_path / "analyze").mkdir()
    (tmp_path / "train").mkdir()
    rec = {"k": 3, "overall": 0.5, "best_layer": "gcn_2",
           "per_layer": {"gcn_2": {"precision": 0.75, "chance": 0.2}, "alignn_1": {"precision": 0.25, "chance": 0.2}}}
    (tmp_path / "analyze" / "attribution.json").write_text(json.dumps({"benchmark_recovery": rec}))
    (tmp_path / "train" / "metrics.json").write_text(json.dumps(
        {"test_spectrum_mae": 0.2, "noise_floor": 0.05, "mae_over_noise_floor": 4.0, "onset_r2": 0.81}))
    text = pipeline.demo_summary(tmp_path, 12.0)
    assert f"report: {tmp_path / 'analyze' / 'report' / 'index.html'}" in text
    assert "precision@3 of planted drivers): 0.500 overall; best layer gcn_2: 0.750 (chance 0.200)" in text
    assert "4.000 x noise floor" in text and "onset R^2 0.810" in text


@pytest.mark.parametrize("raw,expected", [
    ("COMPLETED", "completed"), ("CANCELLED by 0", "cancelled"), ("FAILED", "failed"), ("TIMEOUT", "failed"),
    ("OUT_OF_MEMORY", "failed"), ("PENDING", "pending"), ("RUNNING", "running"), ("REQUEUED", "pending"),
    ("NODE_FAIL", "failed"), ("", "unknown"), ("WEIRD", "unknown")])
def test_slurm_state_normalisation(raw, expected):
    assert status.normalise(raw) == expected


def test_pending_array_ids_expand():
    assert status._expand("12_[0-3%2]") == ["12_0", "12_1", "12_2", "12_3"]
    assert status._expand("12_[1,4-5]") == ["12_1", "12_4", "12_5"]
    assert status._expand("12_3") == ["12_3"] and status._expand("7") == ["7"]


def test_container_flag_in_the_shell_command_is_quoted(tmp_path):
    image = tmp_path / "my image.sif"
    image.write_bytes(b"SIF")
    cfg = load_config(None, {"container": {"image": str(image)}})
    from toolkit.hpc import container

    assert shlex.split(container.python_command(cfg, tmp_path))[-2:] == [str(image), "python"]


def test_demo_summary_prints_the_honest_recovery_line(tmp_path):
    (tmp_path / "analyze").mkdir()
    line = "recovery: 4/4 planted drivers named by a cluster they define (best layer x: coverage 1.00 vs chance 0.50)"
    (tmp_path / "analyze" / "attribution.json").write_text(json.dumps({"benchmark_recovery": {"summary": line}}))
    assert f"benchmark {line}" in pipeline.demo_summary(tmp_path)
