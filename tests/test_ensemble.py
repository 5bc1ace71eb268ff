"""Ensembles: `train.ensemble: N` trains N resumable members with different seeds, writes the ensemble's
test metrics and its calibration (coverage of ±1σ/±2σ, recalibration fitted on validation) to
metrics.json, and `predict` on the run directory uses every member (mean, std, onset interval)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.config import ConfigError, load_config
from toolkit.layout import RunLayout
from toolkit.train import ensemble as E

TINY = ["data.source=benchmark", "data.benchmark.n_materials=40", "data.grid.num=101", "data.workers=1",
        "data.shard_size=16", "model.hidden_features=16", "model.embedding_features=16", "model.alignn_layers=1",
        "model.gcn_layers=1", "train.epochs=2", "train.batch_size=8", "train.progress=false", "train.seed=7",
        "train.device=cpu"]


def tiny_cfg(*extra: str):
    return load_config(None, TINY + list(extra))


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory) -> tuple[Path, dict]:
    from toolkit import train
    from toolkit.data import prepare

    d = tmp_path_factory.mktemp("ens") / "run"
    cfg = tiny_cfg("train.ensemble=3")
    prepare.run(cfg, d)
    return d, train.run(cfg, d)


def test_coverage_and_recalibration_on_known_errors():
    """Errors drawn with twice the stated σ: ±2σ covers ~68 %, the fitted factor is ~2, after it ~95.45 %."""
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.5, 1.5, 20000)
    err = rng.normal(0, 2 * sigma)
    assert E.coverage(err, sigma, 2) == pytest.approx(0.6827, abs=0.01)
    s = E.fit_scale(err[:10000], sigma[:10000])
    assert s == pytest.approx(2.0, rel=0.03)
    assert E.coverage(err[10000:], sigma[10000:], 2, s) == pytest.approx(0.9545, abs=0.01)
    assert E.coverage(err[10000:], sigma[10000:], 1, s) == pytest.approx(0.6827, abs=0.015)
    assert np.isnan(E.coverage([np.nan], [1.0], 2)) and E.fit_scale([np.nan], [1.0]) == 1.0
    # onset spread: NaN where fewer than 2 members have an onset
    on = np.array([[1.0, 2.0, np.nan], [1.2, np.nan, np.nan], [1.4, 2.0, 3.0]])
    np.testing.assert_allclose(E.onset_spread(on), [0.2, 0.0, np.nan])


def test_ensemble_members_metrics_and_calibration(ensemble_run):
    d, out = ensemble_run
    lay = RunLayout(d)
    members = [lay.member_best(k) for k in range(3)]
    assert all(p.is_file() for p in members) and not lay.member_dir(3).exists()
    assert [m["checkpoint"] for m in out["members"]] == [str(p) for p in members]
    assert all(lay.member_dir(k).joinpath("checkpoints/last.pt").is_file() for k in range(3))  # own resume point
    assert [m["seed"] for m in out["members"]] == [7, 8, 9]
    weights = [torch.load(p, weights_only=True)["model"]["fc.weight"] for p in members]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    assert lay.best_checkpoint.read_bytes() == members[0].read_bytes()  # embed/analyze read member 0
    assert lay.is_complete("train")
    saved = json.loads(lay.train_metrics.read_text())
    assert saved["ensemble"] == 3 and saved["single_member"]["test_spectrum_mae"] == out["members"][0]["test_spectrum_mae"]
    # each member's own training report agrees with the ensemble report's view of it
    for k in range(3):
        own = json.loads((lay.member_dir(k) / "metrics.json").read_text())
        assert own["test_spectrum_mae"] == pytest.approx(out["members"][k]["test_spectrum_mae"], rel=1e-5)
    cal = saved["calibration"]
    for key in ("test_spectrum_coverage_1sigma", "test_spectrum_coverage_2sigma", "test_spectrum_coverage_2sigma_raw",
                "val_spectrum_coverage_2sigma", "test_onset_coverage_2sigma_raw"):
        assert 0.0 <= cal[key] <= 1.0, key
    assert cal["recalibration_factor"] > 0 and cal["fitted_on"] == "val"
    # the factor is fitted so that ±2σ covers 95.45 % of the validation points
    assert cal["val_spectrum_coverage_2sigma"] == pytest.approx(0.9545, abs=0.02)
    assert cal["test_spectrum_coverage_2sigma"] >= cal["test_spectrum_coverage_2sigma_raw"] or \
        cal["recalibration_factor"] < 1
    rows = list(csv.DictReader(open(lay.train_dir / "test_predictions.csv")))
    assert len(rows) == saved["test_n_materials"] == 4
    assert np.mean([float(r["spectrum_mae"]) for r in rows]) == pytest.approx(saved["test_spectrum_mae"], rel=1e-4)


def test_predict_with_ensemble_run_directory(ensemble_run, tmp_path, shared_data):
    """The run directory's 3 members through predict == mean and recalibrated std of the members predicted
    one by one (each member's best.pt as its own checkpoint)."""
    from toolkit.predict import load_result, stage

    d, out = ensemble_run
    files = [shared_data / "paper_structures" / f"POSCAR_{n}.vasp" for n in ("Al2O3_mp-1143", "AlPO4_mp-7848")]

    def run(ck: Path, name: str) -> dict:
        cfg = load_config(None, [f"predict.inputs={json.dumps([str(f) for f in files])}", f"predict.checkpoint={ck}",
                                 "predict.device=cpu", "predict.plot=true"])
        stage.run(cfg, tmp_path / name)
        return load_result(tmp_path / name)

    ens = run(d, "ens")
    singles = [run(RunLayout(d).member_best(k), f"m{k}") for k in range(3)]
    stack = np.stack([np.asarray(s["spectrum"], dtype=np.float64) for s in singles])
    s = out["calibration"]["recalibration_factor"]
    assert ens["n_members"] == 3 and all(x["n_members"] == 1 for x in singles)
    np.testing.assert_allclose(ens["spectrum"], stack.mean(0), atol=2e-6)
    np.testing.assert_allclose(ens["spectrum_std"], stack.std(0, ddof=1) * s, rtol=1e-4, atol=1e-6)
    assert np.all(ens["spectrum_std"] > 0)
    ok = np.isfinite(ens["onset_std"])
    assert np.all(ens["onset_low"][ok] <= ens["onset"][ok]) and np.all(ens["onset"][ok] <= ens["onset_high"][ok])
    np.testing.assert_allclose(ens["member_onset"], np.stack([x["onset"] for x in singles]), atol=1e-9)
    summary = json.loads((tmp_path / "ens" / "summary.json").read_text())
    assert summary["std_scale"] == pytest.approx(s) and len(summary["model_files"]) == 3
    assert len(summary["outputs"]["figures"]) == 2
    header = next(csv.reader(open(tmp_path / "ens" / "predictions.csv")))
    assert "std_0.0000eV" in header and "onset_std_eV" in header


def test_members_resume_one_by_one(tmp_path):
    """Stopped after the first epoch of member 0, re-run: member 0 resumes, the others train, and the
    ensemble metrics equal those of an uninterrupted run (CPU, fixed seeds)."""
    from toolkit import train
    from toolkit.data import prepare

    cfg = tiny_cfg("train.ensemble=2", "data.benchmark.n_materials=24")
    a, b = tmp_path / "a", tmp_path / "b"
    prepare.run(cfg, a)
    prepare.run(cfg, b)
    straight = train.run(cfg, a)
    assert train.run(cfg, b, stop_after_epoch=1) == {}
    lay = RunLayout(b)
    assert lay.member_dir(0).joinpath("checkpoints/last.pt").is_file() and not lay.member_dir(1).exists()
    assert not lay.is_complete("train")
    resumed = train.run(cfg, b)
    assert resumed["test_spectrum_mae"] == straight["test_spectrum_mae"]
    assert resumed["calibration"] == straight["calibration"]
    # a finished ensemble is not retrained
    mtime = lay.member_best(1).stat().st_mtime_ns
    assert train.run(cfg, b)["test_spectrum_mae"] == straight["test_spectrum_mae"]
    assert lay.member_best(1).stat().st_mtime_ns == mtime


def test_ensemble_setting_is_validated_and_resume_safe():
    from toolkit.train.checkpoint import RESUME_SAFE_TRAIN_FIELDS

    with pytest.raises(ConfigError, match="train.ensemble"):
        tiny_cfg("train.ensemble=0")
    assert tiny_cfg().train.ensemble == 1 and "ensemble" in RESUME_SAFE_TRAIN_FIELDS


# docs/training.md "Ensembles": the measured configuration (jobs/demo.yaml with 1+1 layers, hidden 48, 400 materials)
ENSEMBLE_BENCH = [
    "data.source=benchmark", "data.benchmark.n_materials=400", "data.benchmark.noise=0.05", "data.grid.num=301",
    "data.shard_size=50", "data.workers=1", "model.alignn_layers=1", "model.gcn_layers=1", "model.hidden_features=48",
    "model.embedding_features=32", "train.epochs=30", "train.batch_size=16", "train.learning_rate=0.003",
    "train.device=cpu", "train.progress=false", "train.ensemble=5",
]


@pytest.mark.slow
@pytest.mark.learning  # 5 members of ~20-30 s each on 2 idle cores
def test_ensemble_mean_beats_a_single_member_and_is_calibrated(tmp_path):
    from toolkit import train
    from toolkit.data import prepare

    cfg = load_config(None, ENSEMBLE_BENCH)
    prepare.run(cfg, tmp_path)
    out = train.run(cfg, tmp_path)
    maes = [m["test_spectrum_mae"] for m in out["members"]]
    assert out["test_spectrum_mae"] < out["single_member"]["test_spectrum_mae"], out
    assert out["test_spectrum_mae"] < min(maes), maes
    assert out["onset_r2"] > out["member_mean"]["onset_r2"], out
    cal = out["calibration"]
    assert cal["test_spectrum_coverage_2sigma_raw"] < 0.9  # the members' own spread is too narrow
    assert abs(cal["test_spectrum_coverage_2sigma"] - 0.9545) <= 0.05, cal
