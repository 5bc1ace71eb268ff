"""Does training reach the embedded benchmark's targets with the demo's training config?

Targets (issue 5): test spectrum MAE within 1.5x the benchmark's noise floor and onset R^2 >= 0.95.
The data/model/train settings are those recommended for jobs/demo.yaml (docs/training.md). As of
2026-11-24 this test has not been seen passing: a 40-epoch run on 300 materials reached 2.77x the
noise floor (onset R^2 0.99); 600 materials x 60 epochs is the candidate (docs/training.md).
"""

from __future__ import annotations

import pytest

from toolkit.config import load_config
from toolkit.data import prepare
from toolkit.train import run

# Candidate demo settings (docs/training.md, "Demo configuration"); grid and model as jobs/demo.yaml.
DEMO_TRAIN = [
    "data.source=benchmark", "data.benchmark.n_materials=600", "data.benchmark.noise=0.05",
    "data.grid.num=301", "data.shard_size=100", "data.workers=2",
    "model.alignn_layers=2", "model.gcn_layers=2", "model.hidden_features=64", "model.embedding_features=32",
    "train.epochs=60", "train.batch_size=16", "train.learning_rate=0.003", "train.device=cpu",
    "train.progress=false",
]


@pytest.mark.slow
def test_demo_config_reaches_the_benchmark_targets(tmp_path):
    cfg = load_config(None, DEMO_TRAIN)
    prepare.run(cfg, tmp_path)
    out = run(cfg, tmp_path)
    assert out["noise_floor"] > 0
    assert out["mae_over_noise_floor"] <= 1.5, out
    assert out["onset_r2"] >= 0.95, out
    assert out["onset_n_missing"] == 0, out
