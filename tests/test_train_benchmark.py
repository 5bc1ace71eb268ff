"""Does training reach the embedded benchmark's targets with the demo's training config?

Targets (issue 5): test spectrum MAE within 1.5x the benchmark's noise floor and onset R^2 >= 0.95.
The settings are jobs/demo.yaml's (800 materials, 301-point grid, 2+2 layers, hidden 64, 80 epochs,
max LR 2e-3). Measured 2026-11-24 on an idle 2-core machine: test MAE 1.30x the noise floor, onset
R^2 0.998, 4 min 20 s.
"""

from __future__ import annotations

import pytest

from toolkit.config import load_config
from toolkit.data import prepare
from toolkit.train import run

# jobs/demo.yaml's data/model/train settings (tests/test_hpc.py checks the demo config itself).
DEMO_TRAIN = [
    "data.source=benchmark", "data.benchmark.n_materials=800", "data.benchmark.noise=0.05",
    "data.grid.num=301", "data.shard_size=100", "data.workers=2",
    "model.alignn_layers=2", "model.gcn_layers=2", "model.hidden_features=64", "model.embedding_features=32",
    "train.epochs=80", "train.batch_size=16", "train.learning_rate=0.002", "train.device=cpu",
    "train.progress=false",
]


@pytest.mark.slow
@pytest.mark.learning  # ~4-5 min on 2 idle cores
def test_demo_config_reaches_the_benchmark_targets(tmp_path):
    cfg = load_config(None, DEMO_TRAIN)
    prepare.run(cfg, tmp_path)
    out = run(cfg, tmp_path)
    assert out["noise_floor"] > 0
    assert out["mae_over_noise_floor"] <= 1.5, out
    assert out["onset_r2"] >= 0.95, out
    assert out["onset_n_missing"] == 0, out
