"""Does training reach the embedded benchmark's targets with the demo's training config?

Targets (issue 5): test spectrum MAE within 1.5x the benchmark's noise floor and onset R^2 >= 0.95.
The data/model/train settings are those recommended for jobs/demo.yaml (docs/training.md). As of
2026-11-24 this test has not been seen passing: a 40-epoch run on 300 materials reached 2.77x the
noise floor (onset R^2 0.99) and 600 materials reached 1.60x at epoch 45 of 60; the stand-alone
loop of benchmarks/benchmark_learnability.py reached 1.37x (onset R^2 0.998) with 800 materials x 80
epochs at lr 2e-3, which is what this test now uses.
"""

from __future__ import annotations

import pytest

from toolkit.config import load_config
from toolkit.data import prepare
from toolkit.train import run

# Candidate demo settings (docs/training.md, "Demo configuration"); grid and model as jobs/demo.yaml.
DEMO_TRAIN = [
    "data.source=benchmark", "data.benchmark.n_materials=800", "data.benchmark.noise=0.05",
    "data.grid.num=301", "data.shard_size=100", "data.workers=2",
    "model.alignn_layers=2", "model.gcn_layers=2", "model.hidden_features=64", "model.embedding_features=32",
    "train.epochs=80", "train.batch_size=16", "train.learning_rate=0.002", "train.device=cpu",
    "train.progress=false",
]


@pytest.mark.learning  # ~15-20 min on 2 cores: not in the default suite; run with scripts/test.sh -m learning
def test_demo_config_reaches_the_benchmark_targets(tmp_path):
    cfg = load_config(None, DEMO_TRAIN)
    prepare.run(cfg, tmp_path)
    out = run(cfg, tmp_path)
    assert out["noise_floor"] > 0
    assert out["mae_over_noise_floor"] <= 1.5, out
    assert out["onset_r2"] >= 0.95, out
    assert out["onset_n_missing"] == 0, out
