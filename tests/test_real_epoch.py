"""benchmarks/real_epoch.py at a tiny size on CPU, so the script cannot rot: both sides (our
`spectrolens train` and upstream's `train_dgl` on its DGL/LMDB graphs) train, the epochs are seen,
the JSON has the three rows per hidden size; and the profile mode writes its breakdown. ~40 s on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.compat.dgl import dgl_available

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "real_epoch.py"
DATA = Path(os.environ.get("SPECTROLENS_SHARED_DATA", REPO.parent / "shared" / "data"))
TINY = ["--n", "12", "--epochs", "2", "--hidden", "16", "--layers", "1", "--batch", "4"]

pytestmark = [
    pytest.mark.dgl, pytest.mark.upstream, pytest.mark.slow,
    pytest.mark.skipif(not dgl_available(), reason="dgl 2.1.0 not importable here"),
    pytest.mark.skipif(not (DATA / "paper_structures").is_dir(), reason="shared paper_structures not here"),
]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("alignn")
    return subprocess.run([sys.executable, str(SCRIPT), *TINY, "--workdir", str(tmp_path / "work"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO, check=False)


def test_real_epoch_tiny_both_sides(tmp_path):
    out = tmp_path / "real_epoch.json"
    p = _run(["--json", str(out)], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "ratio up/ours" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["params"]["failed"] == []
    rows = doc["rows"]
    assert len(rows) == 3
    for r in rows:
        assert r["ours"] > 0 and r["upstream"] > 0 and r["ratio"] > 0
    for side in ("ours", "upstream"):
        (run,) = doc["runs"]["16"][side]
        assert run["rc"] == 0 and run["n_epochs_seen"] == 2 and len(run["epoch_s"]) == 1


def test_real_epoch_profile_tiny(tmp_path):
    p = _run(["--profile"], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "train: data loading" in p.stdout and "fused gate kernel" in p.stdout
    assert (tmp_path / "work" / "profile_ops.txt").read_text().strip()
