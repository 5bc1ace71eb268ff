"""Issue 14's bar on the real-structure benchmark, end to end with a model trained in the test.

jobs/realbench.yaml (751 Materials Project structures shipped with the package, six planted drivers
of different kinds, two distractors; docs/benchmark.md) with 30 epochs: prepare, train, embed and
the default analysis. The default analysis must name at least 5 of the 6 planted drivers, name the
defining driver in at least 80 % of the (cluster, driver) pairs where a driver defines a cluster
(far above the chance level of three random descriptors), keep the distractor rate below 20 %, and
the model must be within a stated distance of the benchmark's noise floor.

Measured 2026-12-03: see docs/benchmark.md ("Measured: the whole pipeline on realbench"). At 40 epochs
the test spectrum MAE was 2.7x the noise floor, onset R^2 0.954, recall 0.88, distractor rate 0.03; at
the test's 30 epochs (to keep the suite short) 2.9x, 0.941, 0.87 (196 pairs, chance 0.03), 0.06, with 6
of 6 drivers named and the onset's three in its feature ranking; at 25 epochs recall fell to 0.835,
too close to the bar. About 4 minutes on 2 idle cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit import analyze, embed
from toolkit.config import load_config
from toolkit.data import prepare
from toolkit.train import run as train

JOB = Path(__file__).resolve().parents[1] / "jobs" / "realbench.yaml"


@pytest.mark.slow
@pytest.mark.learning  # ~5 min on 2 idle cores
def test_default_analysis_recovers_the_planted_drivers(tmp_path):
    cfg = load_config(JOB, ["train.epochs=30"])
    prepare.run(cfg, tmp_path)
    metrics = train(cfg, tmp_path)
    # the model: within 3.5x the noise floor (measured 2.9x at 30 epochs), onset R^2 >= 0.9 (measured 0.94)
    assert metrics["mae_over_noise_floor"] <= 3.5, metrics
    assert metrics["onset_r2"] >= 0.9, metrics
    embed.run(cfg, tmp_path)
    analyze.run(cfg, tmp_path)
    att = json.loads((tmp_path / "analyze" / "attribution.json").read_text())
    rec = att["benchmark_recovery"]
    o = rec["overall"]
    print(rec["summary"])
    # default resolution: clusters of the size people read, not 2-5 per layer
    ks = [L["clustering"]["n_clusters"] for L in att["layers"].values()]
    assert min(ks) >= 20, ks
    assert len(o["drivers_named_any_layer"]) >= 5, rec["per_driver"]
    assert o["recall"] >= 0.80 and o["recall"] >= 10 * o["chance_recall"], o
    assert o["n_pairs"] >= 100, o
    assert o["distractor_rate"] < 0.20, o
    # the feature rankings name the onset's three drivers; the hierarchy's splits are scored too
    assert set(rec["features"]["per_feature"]["onset"]["named"]) == {"anion_class", "cation_chemistry",
                                                                     "bond_length_mean"}
    h = rec["hierarchy"]
    assert h["scored"] and h["n_pairs"] > 0 and h["recall"] >= 5 * h["chance_recall"], h
