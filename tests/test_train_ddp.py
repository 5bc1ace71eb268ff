"""Two real gloo DDP ranks on CPU via torchrun (``python -m torch.distributed.run -m toolkit.cli train``).

Both ranks must end with identical weights (each writes train/rank<k>.json with a weight hash), and a
2-rank run interrupted by SIGUSR1 on one rank must resume to the same weights as a straight run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolkit.config import load_config
from toolkit.data import prepare

TINY = ["data.source=benchmark", "data.benchmark.n_materials=40", "data.grid.num=101", "data.workers=1",
        "data.shard_size=16", "model.hidden_features=16", "model.embedding_features=16", "model.alignn_layers=1",
        "model.gcn_layers=1", "train.epochs=4", "train.batch_size=4", "train.progress=false", "train.seed=3",
        "train.learning_rate=0.003"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ddp_prepared")
    prepare.run(load_config(None, TINY), d)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "toolkit.cli", "train", "-r", str(run_dir)]
    for s in TINY:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def new_run(prepared: Path, tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "dataset.zarr").symlink_to(prepared / "dataset.zarr")  # read-only use: share the store
    return d


def rank_hashes(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / "train" / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_rank_ddp_gives_identical_weights_on_both_ranks(prepared, tmp_path):
    d = new_run(prepared, tmp_path, "ddp")
    p = torchrun(d)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-4000:]
    r0, r1 = rank_hashes(d)
    assert r0["weights_sha256"] == r1["weights_sha256"]
    assert (r0["world_size"], r0["launcher"], r1["rank"]) == (2, "torchrun", 1)
    assert r0["step"] == 4 * 4  # 32 training materials / 2 ranks / batch 4 = 4 steps per epoch
    m = json.loads((d / "train" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["test_n_materials"] == 4
    for r in (0, 1):
        assert "joining gloo process group" in (d / "logs" / "train" / f"rank{r}.log").read_text()


@pytest.mark.slow
def test_two_rank_ddp_resumes_exactly_after_sigusr1(prepared, tmp_path):
    straight = new_run(prepared, tmp_path, "straight")
    p = torchrun(straight)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-4000:]

    d = new_run(prepared, tmp_path, "interrupted")
    p = torchrun(d)
    last = d / "train" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not last.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not last.exists():
        p.kill()
        pytest.fail(f"no epoch-1 checkpoint appeared; output:\n{p.communicate()[0][-4000:]}")
    workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGUSR1)  # one rank only: the stop is agreed collectively
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0 and "checkpointing at the next batch boundary" in out, out[-4000:]
    assert not (d / "train" / "metrics.json").exists()
    p = torchrun(d)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-4000:]
    assert "resumed from" in (d / "logs" / "train" / "rank1.log").read_text()
    a, b = rank_hashes(straight), rank_hashes(d)
    assert a[0]["weights_sha256"] == b[0]["weights_sha256"] == b[1]["weights_sha256"]


@pytest.mark.mpi
@pytest.mark.slow
def test_two_rank_training_under_mpiexec(prepared, tmp_path):
    import shutil

    if not shutil.which("mpiexec"):
        pytest.fail("mpiexec not found: run scripts/setup.sh --test (installs openmpi-bin)")
    d = new_run(prepared, tmp_path, "mpi")
    cmd = ["mpiexec", "-n", "2", sys.executable, "-m", "toolkit.cli", "train", "-r", str(d)]
    for s in TINY + ["train.epochs=1"]:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    r0, r1 = rank_hashes(d)
    assert r0["launcher"] == r1["launcher"] == "mpi" and r0["world_size"] == 2
    assert r0["weights_sha256"] == r1["weights_sha256"]
