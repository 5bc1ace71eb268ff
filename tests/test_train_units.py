"""Training building blocks: rank discovery, split, checkpoint state, metrics, config/resume checks."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from toolkit.config import ConfigError, PipelineConfig, TrainConfig
from toolkit.train import checkpoint as ckpt
from toolkit.train import distributed as D
from toolkit.train.metrics import MetricsLog, masked_loss, onset_metrics
from toolkit.train.split import make_split, read_split_file, resolve_split, save_split, load_saved_split

# ---------------------------------------------------------------- rank / world discovery


def test_discover_single_process():
    env = D.discover({"PATH": "/usr/bin"})
    assert (env.rank, env.world_size, env.launcher, env.distributed) == (0, 1, "single", False)


def test_discover_torchrun():
    env = D.discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
                      "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert env == D.DistEnv(3, 4, 1, "n1", 29500, "torchrun")


def test_discover_torchrun_without_master_is_an_error():
    with pytest.raises(D.DistributedSetupError, match="MASTER_ADDR"):
        D.discover({"RANK": "1", "WORLD_SIZE": "2"})


def test_discover_slurm_uses_first_host_and_job_seeded_port():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[07-08,11],cpu1"}
    a, b = D.discover(env), D.discover({**env, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert (a.rank, a.world_size, a.local_rank, a.master_addr, a.launcher) == (5, 8, 1, "gpu07", "slurm")
    assert a.master_port == b.master_port and 20000 <= a.master_port <= 60000  # every task agrees
    assert D.discover({**env, "MASTER_PORT": "12345"}).master_port == 12345


def test_discover_slurm_single_task_is_single_process():
    env = D.discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"})
    assert env.world_size == 1 and not env.distributed


def test_cpu_threads_never_oversubscribe_the_node():
    """OMP_NUM_THREADS wins; a launcher's CPU binding is used as is; otherwise the node's CPUs are
    shared among this node's ranks (torchrun, Open MPI, SLURM task counts)."""
    node = set(range(16))
    assert D.cpu_threads({"OMP_NUM_THREADS": "3"}, node, 16) == (3, "OMP_NUM_THREADS")
    assert D.cpu_threads({}, node, 16)[0] == 16
    assert D.cpu_threads({"LOCAL_WORLD_SIZE": "4"}, node, 16)[0] == 4
    assert D.cpu_threads({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, node, 16)[0] == 5
    assert D.cpu_threads({"SLURM_TASKS_PER_NODE": "8(x2)"}, node, 16)[0] == 2
    assert D.cpu_threads({"LOCAL_WORLD_SIZE": "32"}, node, 16)[0] == 1
    threads, why = D.cpu_threads({"LOCAL_WORLD_SIZE": "4"}, {0, 1, 2}, 16)  # bound by the launcher
    assert threads == 3 and "affinity" in why


def test_slurm_hostnames_expands_ranges():
    assert D.slurm_hostnames("node[01-03],login") == ["node01", "node02", "node03", "login"]


@pytest.mark.mpi
def test_discover_mpi_broadcasts_rank0_address(tmp_path):
    if not shutil.which("mpiexec"):
        pytest.fail("mpiexec not found: run scripts/setup.sh --test (installs openmpi-bin)")
    # each rank writes its own file: mpiexec forwards both ranks' stdout and can interleave their lines
    code = ("import json,sys,pathlib; from toolkit.train import distributed as D; e=D.discover(); "
            f"pathlib.Path({str(tmp_path)!r}, f'rank{{e.rank}}.json').write_text("
            "json.dumps([e.rank,e.world_size,e.local_rank,e.master_addr,e.master_port,e.launcher]))")
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    out = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    rows = sorted(json.loads(f.read_text()) for f in tmp_path.glob("rank*.json"))
    assert [r[0] for r in rows] == [0, 1] and all(r[1] == 2 and r[5] == "mpi" for r in rows)
    assert rows[0][3:5] == rows[1][3:5] and rows[0][4] > 0  # same rendezvous on both ranks


def test_backend_and_device_selection():
    assert D.select_backend("auto", torch.device("cpu")) == "gloo"
    assert D.select_backend("auto", torch.device("cuda", 0)) == "nccl"
    with pytest.raises(D.DistributedSetupError, match="nccl needs a GPU"):
        D.select_backend("nccl", torch.device("cpu"))
    assert D.select_device("cpu", D.DistEnv()).type == "cpu"


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="dist_backend"):
        from toolkit.config import load_config

        load_config(None, ["train.dist_backend=mpi"])


# ---------------------------------------------------------------- split


def test_split_matches_the_study_counts_and_is_reproducible():
    ids = [f"mp-{i}" for i in range(2681)]
    a = make_split(ids, np.ones(2681, bool), (0.8, 0.1, 0.1), seed=123)
    b = make_split(list(reversed(ids)), np.ones(2681, bool), (0.8, 0.1, 0.1), seed=123)
    assert (len(a.train), len(a.val), len(a.test), len(a.unassigned)) == (2144, 268, 268, 1)
    assert a.to_json() == b.to_json()  # does not depend on the order the dataset lists the ids in
    every = a.train + a.val + a.test + a.unassigned
    assert sorted(every) == sorted(ids)  # nothing dropped silently
    assert a.train != make_split(ids, np.ones(2681, bool), (0.8, 0.1, 0.1), seed=124).train


def test_split_excludes_structure_only_materials(tmp_path, caplog):
    ids = [f"m{i}" for i in range(50)]
    has = np.array([i % 5 != 0 for i in range(50)])
    caplog.set_level("INFO")
    s = resolve_split(TrainConfig(split=(0.6, 0.2, 0.2)), ids, has, tmp_path / "split.json")
    assert sorted(s.excluded_no_spectrum) == sorted(f"m{i}" for i in range(0, 50, 5))
    assert not set(s.excluded_no_spectrum) & set(s.train + s.val + s.test)
    assert "excluded 10 structure-only" in caplog.text
    save_split(s, tmp_path / "split.json")
    assert load_saved_split(tmp_path / "split.json").train == s.train
    assert json.loads((tmp_path / "split.json").read_text())["counts"]["train"] == len(s.train) == 24


def test_split_file_errors_name_the_problem(tmp_path):
    ids, has = ["a", "b", "c", "d"], np.array([True, True, True, False])
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"train": ["a", "zz"], "val": ["b"], "test": ["c"]}))
    with pytest.raises(ConfigError, match=r"not in the dataset.*zz"):
        read_split_file(f, ids, has)
    f.write_text(json.dumps({"train": ["a"], "val": ["a"], "test": ["c"]}))
    with pytest.raises(ConfigError, match="exactly one set"):
        read_split_file(f, ids, has)
    f.write_text(json.dumps({"train": ["a"], "test": ["c"]}))
    with pytest.raises(ConfigError, match="'train', 'val' and 'test'"):
        read_split_file(f, ids, has)
    f.write_text(json.dumps({"train": ["a", "d"], "val": ["b"], "test": ["c"]}))
    s = read_split_file(f, ids, has)
    assert s.train == ["a"] and s.excluded_no_spectrum == ["d"]
    f.write_text(json.dumps({"train": ["d"], "val": ["b"], "test": ["c"]}))
    with pytest.raises(ConfigError, match="training set is empty"):
        resolve_split(TrainConfig(split_file=f), ids, has, tmp_path / "none.json")


# ---------------------------------------------------------------- checkpoint state


def test_rng_state_roundtrips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = ckpt.capture_rng()
    expect = (random.random(), np.random.standard_normal(), torch.rand(3).tolist())
    ckpt.atomic_save({"format": "x", "rng": [state]}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)  # only tensors / primitive containers
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.restore_rng(loaded["rng"][0])
    assert (random.random(), np.random.standard_normal(), torch.rand(3).tolist()) == expect
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away


def test_load_refuses_wrong_format_and_broken_files(tmp_path):
    ckpt.atomic_save({"format": "other"}, tmp_path / "a.pt")
    with pytest.raises(ckpt.CheckpointError, match="a.pt"):
        ckpt.load(tmp_path / "a.pt", ckpt.TRAIN_FORMAT)
    (tmp_path / "b.pt").write_bytes(b"truncated")
    with pytest.raises(ckpt.CheckpointError, match="b.pt"):
        ckpt.load(tmp_path / "b.pt")


def test_check_resumable_names_result_changing_differences(tmp_path):
    a = PipelineConfig()
    b = a.model_copy(deep=True)
    b.train.num_workers = 3  # does not change results
    ckpt.check_resumable(a.model_dump_json(), b.model_dump_json(), tmp_path / "train" / "checkpoints" / "last.pt")
    b.train.learning_rate = 0.5
    b.model.hidden_features = 8
    with pytest.raises(ckpt.CheckpointError, match=r"model.hidden_features: 256 -> 8.*train.learning_rate"):
        ckpt.check_resumable(a.model_dump_json(), b.model_dump_json(), tmp_path / "train" / "checkpoints" / "last.pt")


# ---------------------------------------------------------------- metrics


def test_masked_loss_ignores_masked_points():
    pred = torch.tensor([[1.0, 2.0, 100.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0, float("nan")], [1.0, float("nan"), float("nan")]])
    mask = torch.isfinite(target)
    assert masked_loss(pred, target, mask, "l1").item() == pytest.approx((1 + 2 + 1) / 3)
    assert masked_loss(pred, target, mask, "mse").item() == pytest.approx((1 + 4 + 1) / 3)


def test_onset_metrics_use_the_reference_mask():
    e = np.linspace(0, 10, 101)
    true = np.stack([2 + np.clip(e - s, 0, None) for s in (1.0, 2.0, 3.0, 4.0)])
    pred = np.stack([2 + np.clip(e - s - 0.1, 0, None) for s in (1.0, 2.0, 3.0, 4.0)])
    m = onset_metrics(e, pred, true, threshold=4.0)
    assert np.allclose(m["onset_true"], [3, 4, 5, 6]) and np.allclose(m["onset_pred"], [3.1, 4.1, 5.1, 6.1])
    assert m["onset_mae"] == pytest.approx(0.1) and m["onset_r2"] == pytest.approx(1 - 4 * 0.01 / 5.0)
    true[0, :50] = np.nan  # reference masked below 5 eV: its onset is unknown, so is the prediction's
    m = onset_metrics(e, pred, true, threshold=4.0)
    assert m["onset_n"] == 3 and m["onset_n_missing"] == 1


def test_metrics_log_drops_rows_after_the_resumed_epoch(tmp_path):
    log = MetricsLog(tmp_path, resume_epoch=0, tensorboard=True)
    for ep in (1, 2, 3):
        log.add({"epoch": ep, "train_loss": 1.0 / ep})
    log.close()
    log = MetricsLog(tmp_path, resume_epoch=2, tensorboard=False)  # epoch 3 is redone after a resume
    log.add({"epoch": 3, "train_loss": 0.25})
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["train_loss"] == 0.25
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "epoch,train_loss"
    assert any((tmp_path / "tb").iterdir())
