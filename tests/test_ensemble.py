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


def test_conformal_factor_covers_at_least_nominal_on_small_validation_sets():
    """The recalibration factor from n validation values: split-conformal (rank ceil((n+1)·0.9545)) covers
    >= 95.45 % of new values on average over many draws, for n = 40 (the benchmark's onsets) and 100; the
    plain quantile it replaced falls short at n = 40. Averaged over 400 draws of n values and 2,000 new ones."""
    rng = np.random.default_rng(1)
    for n, want in ((40, 40 / 41), (100, 97 / 101)):
        conf, plain = [], []
        for _ in range(400):
            sigma = rng.uniform(0.5, 1.5, n)
            err = rng.standard_t(4, n) * sigma  # heavy-tailed errors, as ensembles' are
            s_new = rng.uniform(0.5, 1.5, 2000)
            e_new = rng.standard_t(4, 2000) * s_new
            conf.append(E.coverage(e_new, s_new, 2, E.fit_scale(err, sigma)))
            plain.append(E.coverage(e_new, s_new, 2, float(np.quantile(np.abs(err) / sigma, 0.9545)) / 2))
        assert np.mean(conf) >= 0.9545 and np.mean(conf) == pytest.approx(want, abs=0.006), (n, np.mean(conf))
        if n == 40:
            assert np.mean(plain) < 0.9545 < np.mean(conf)
    assert E.conformal_rank(40) == 40 and E.conformal_rank(100) == 97 and E.conformal_rank(20) == 21


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


# docs/training.md "Ensembles": the measured configuration (jobs/demo.yaml with 1+1 layers, hidden 48, 400 materials),
# with 3 of its 5 members (the same seeds) to keep the suite short
ENSEMBLE_BENCH = [
    "data.source=benchmark", "data.benchmark.n_materials=400", "data.benchmark.noise=0.05", "data.grid.num=301",
    "data.shard_size=50", "data.workers=1", "model.alignn_layers=1", "model.gcn_layers=1", "model.hidden_features=48",
    "model.embedding_features=32", "train.epochs=30", "train.batch_size=16", "train.learning_rate=0.003",
    "train.device=cpu", "train.progress=false", "train.ensemble=3",
]


@pytest.mark.slow
@pytest.mark.learning  # 3 members of ~25 s each on 2 idle cores (~90 s in all)
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
    assert abs(cal["test_onset_coverage_2sigma"] - 0.9545) <= 0.05, cal  # conformal factor (was 85 %: docs)
    assert cal["conformal_exact"] and cal["n_fit_onsets"] == 40


def test_embed_writes_the_ensemble_mean_std_and_onset_interval(ensemble_run, tmp_path, capsys):
    """embed on a run with a finished ensemble: `prediction` = the members' mean, `prediction_std` = their
    std x the recalibration factor of metrics.json, the onset interval from the members' onsets; the layer
    activations are member 0's. Each member's own prediction comes from embed with embed.checkpoint set
    (a single-model store of the same dataset)."""
    import shutil

    import zarr

    from toolkit import embed
    from toolkit.embed.store import ONSET_KEYS

    d, out = ensemble_run
    lay = RunLayout(d)
    cfg = tiny_cfg("train.ensemble=3", "embed.shard_size=16", "embed.device=cpu")
    embed.run(cfg, d)
    root = zarr.open_group(lay.embeddings, mode="r")
    singles = []
    for k in range(3):
        rd = tmp_path / f"m{k}"
        shutil.copytree(lay.dataset, RunLayout(rd).dataset)
        embed.run(tiny_cfg(f"embed.checkpoint={lay.member_best(k)}", "embed.shard_size=16", "embed.device=cpu"), rd)
        singles.append(zarr.open_group(RunLayout(rd).embeddings, mode="r"))
        assert "prediction_std" not in singles[-1] and singles[-1].attrs["ensemble"] == 1
    stack = np.stack([s["prediction"][:].astype(np.float64) for s in singles])
    cal = out["calibration"]
    info = root.attrs["ensemble_info"]
    assert root.attrs["ensemble"] == 3 and info["n_members"] == 3
    assert info["recalibration_factor"] == pytest.approx(cal["recalibration_factor"])
    assert info["member_checkpoints"] == [str(lay.member_best(k)) for k in range(3)]
    np.testing.assert_allclose(root["prediction"][:], stack.mean(0), atol=2e-6)
    np.testing.assert_allclose(root["prediction_std"][:], stack.std(0, ddof=1) * cal["recalibration_factor"],
                               rtol=1e-4, atol=1e-6)
    assert "recalibration" in root["prediction_std"].attrs["meaning"]
    member_on = E.member_onsets(root["energy"][:], stack, 4.0)
    want = E.summarize(root["energy"][:], stack, 4.0, onset_std_scale=cal["onset_recalibration_factor"])
    got = {k: root[k][:] for k in ONSET_KEYS}
    np.testing.assert_allclose(got["prediction_onset"], np.nanmean(member_on, 0), atol=1e-4, equal_nan=True)
    for k in ONSET_KEYS:
        np.testing.assert_allclose(got[k], want[k.removeprefix("prediction_")], atol=1e-4, equal_nan=True)
    ok = np.isfinite(got["prediction_onset_std"])
    assert ok.any() and np.all(got["prediction_onset_low"][ok] <= got["prediction_onset"][ok])
    assert np.all(got["prediction_onset"][ok] <= got["prediction_onset_high"][ok])
    # activations: member 0's (not averaged)
    for key in ("layers/readout/mean", "layers/gcn_1/mean"):
        np.testing.assert_array_equal(root[key][:], singles[0][key][:])
    assert embed.verify(cfg, d) == 0
    saved = lay.train_metrics.read_text()  # other recalibration factors now: the store is stale, never extended
    try:
        changed = json.loads(saved)
        changed["calibration"]["recalibration_factor"] *= 2
        lay.train_metrics.write_text(json.dumps(changed))
        assert embed.verify(cfg, d) == 1 and "another ensemble" in capsys.readouterr().out
        from toolkit.embed.store import EmbedStoreError

        with pytest.raises(EmbedStoreError, match="another ensemble"):
            embed.plan(cfg, d)
    finally:
        lay.train_metrics.write_text(saved)
    # docs/zarr.md "### Ensembles": its snippet reads the band and the onset interval of this store
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "zarr.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text[text.index("### Ensembles"):], flags=re.DOTALL)[0]
    env: dict = {"zarr": zarr}
    exec(compile(code.replace("runs/demo", str(d)), "docs/zarr.md", "exec"), env)  # noqa: S102 - the docs' own code
    np.testing.assert_allclose(env["lo"], root["prediction"][:10] - 2 * root["prediction_std"][:10])
    np.testing.assert_array_equal(env["high"], got["prediction_onset_high"][:10])


@pytest.fixture(scope="module")
def ensemble_analyzed(ensemble_run) -> tuple[Path, dict]:
    """The ensemble run through embed (idempotent) and analyze of the readout layer."""
    from toolkit import analyze, embed

    d, _ = ensemble_run
    cfg = tiny_cfg("train.ensemble=3", "embed.shard_size=16", "embed.device=cpu", "analyze.workers=1",
                   "analyze.permutation_repeats=2", "analyze.probe_folds=3", "analyze.max_clusters=4",
                   "analyze.n_clusters=3", 'analyze.layers=["readout"]', "analyze.drivers=false",
                   "analyze.chemiscope=false")
    embed.run(cfg, d)
    return d, analyze.run(cfg, d)


def test_analyze_shows_the_ensembles_bands_and_onset_intervals(ensemble_analyzed):
    """attribution.json: each cluster's predicted spectrum carries the mean σ of its members (the ±2σ
    band of the figure) and the mean predicted onset interval; the report lists the interval."""
    import zarr

    from toolkit.analyze.steps import SPECTRUM_STEP

    d, result = ensemble_analyzed
    assert set(result["layers"]) == {"readout"}
    lay = RunLayout(d)
    root = zarr.open_group(lay.embeddings, mode="r")
    ids = [str(x) for x in root["ids"][:]]
    std = root["prediction_std"][:].astype(np.float64)
    on = {k: root[f"prediction_{k}"][:].astype(np.float64) for k in ("onset", "onset_std", "onset_low", "onset_high")}
    saved = json.loads(lay.attribution.read_text())
    clusters = saved["layers"]["readout"]["clusters"]
    assert len(clusters) == 3
    for c in clusters.values():
        rows = np.array([ids.index(m) for m in c["members"]])
        sigma = np.array(c["spectral"]["predicted"]["sigma"], dtype=float)
        np.testing.assert_allclose(sigma, std[rows].mean(0)[::SPECTRUM_STEP], rtol=1e-3, atol=1e-4)
        po = c["spectral"]["predicted_onset"]
        ok = np.isfinite(on["onset"][rows]) & np.isfinite(on["onset_std"][rows])
        assert po["n"] == int(ok.sum()) > 0
        for k in on:
            assert po[k] == pytest.approx(on[k][rows][ok].mean(), abs=1e-4), k
        assert po["onset_low"] <= po["onset"] <= po["onset_high"]
    page = lay.report.read_text()
    assert page.count("predicted onset (ensemble)") == 3 and "±2σ interval" in page


def test_cluster_spectra_figure_draws_the_predicted_band():
    from toolkit.analyze.figures import cluster_spectra

    e = np.linspace(0, 5, 20)
    pred = {"mean": np.linspace(2, 5, 20), "std": np.full(20, 0.1), "p10": np.zeros(20), "p90": np.zeros(20)}
    sig = {0: {"size": 5, "predicted": {**pred, "sigma": np.full(20, 0.2)}, "onset": {"n": 0}}}
    fig = cluster_spectra(e, sig, "x")
    ax = fig.axes[0]
    band = [c for c in ax.collections if c.get_label() == "predicted ±2σ"]
    assert len(band) == 1
    ys = np.concatenate([p.vertices[:, 1] for p in band[0].get_paths()])
    assert ys.min() == pytest.approx(2 - 0.4) and ys.max() == pytest.approx(5 + 0.4)
    assert "predicted ±2σ" in fig._suptitle.get_text()
    one = cluster_spectra(e, {0: {"size": 5, "predicted": pred, "onset": {"n": 0}}}, "x")  # one model: no band
    assert not [c for c in one.axes[0].collections if c.get_label() == "predicted ±2σ"]


CLICK_BAND = """(() => {
  const gd = document.querySelector('#imap-readout .plotly-graph-div');
  const cd = gd.data[0].customdata[0];
  gd.emit('plotly_click', {points: [{curveNumber: 0, pointNumber: 0, customdata: cd}]});
  const sp = document.querySelector('#imap-readout .imap-detail .imap-spectrum');
  return {id: cd[0], traces: (sp.data || []).map(t => ({name: t.name, fill: t.fill || null, y: Array.from(t.y)}))};
})()"""


@pytest.mark.browser
def test_report_click_shows_the_predicted_band(ensemble_analyzed, tmp_path):
    """In Chromium: a click on a map point shows the predicted spectrum with its ±2σ band (mean ± 2
    prediction_std of embeddings.zarr on the panel's energies)."""
    import zarr
    from test_report_browser import CHROMIUM, _open_in_chromium

    from toolkit.analyze import interactive

    if CHROMIUM is None:
        pytest.skip("chromium not installed (scripts/setup.sh --test installs it)")
    d, _ = ensemble_analyzed
    state, errors, requests, _ = _open_in_chromium(RunLayout(d).report, tmp_path, actions=(CLICK_BAND,))
    assert not errors, errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    click = state["actions"][0]
    names = [t["name"] for t in click["traces"]]
    assert names[:2] == ["reference", "predicted"] and names[-1] == "predicted ±2σ", names
    assert click["traces"][-1]["fill"] == "tonexty"
    root = zarr.open_group(RunLayout(d).embeddings, mode="r")
    row = [str(x) for x in root["ids"][:]].index(click["id"])
    step = max(1, root["prediction"].shape[1] // interactive.SPECTRUM_POINTS)
    want_hi = (root["prediction"][row] + 2 * root["prediction_std"][row])[::step]
    want_lo = (root["prediction"][row] - 2 * root["prediction_std"][row])[::step]
    got_hi = np.array([np.nan if v is None else v for v in click["traces"][-1]["y"]], dtype=float)
    got_lo = np.array([np.nan if v is None else v for v in click["traces"][-2]["y"]], dtype=float)
    tol = 5e-3 * max(1.0, float(np.abs(want_hi).max()))
    np.testing.assert_allclose(got_hi, want_hi, atol=tol)
    np.testing.assert_allclose(got_lo, want_lo, atol=tol)


def test_members_trained_one_per_call_then_the_report(tmp_path):
    """`train.run(..., member=k)` (what each SLURM array task runs) trains member k alone into its own
    folder and writes no ensemble report; a final `train.run` trains nothing and writes the same report
    as training the members one after another. A requeued member task resubmits the same member."""
    import submitit

    from toolkit import train
    from toolkit.data import prepare
    from toolkit.hpc.stages import TrainJob

    cfg = tiny_cfg("train.ensemble=2", "data.benchmark.n_materials=24", "train.epochs=1")
    a, b = tmp_path / "a", tmp_path / "b"
    prepare.run(cfg, a)
    prepare.run(cfg, b)
    straight = train.run(cfg, a)
    lay = RunLayout(b)
    one = train.run(cfg, b, member=1)
    assert lay.member_best(1).is_file() and not lay.member_dir(0).exists() and not lay.train_metrics.exists()
    assert one["test_spectrum_mae"] == pytest.approx(straight["members"][1]["test_spectrum_mae"], rel=1e-5)
    assert (b / "logs" / "train" / "member1-rank0.log").stat().st_size > 0
    train.run(cfg, b, member=0)
    mtimes = [lay.member_best(k).stat().st_mtime_ns for k in (0, 1)]
    report = train.run(cfg, b)
    assert [lay.member_best(k).stat().st_mtime_ns for k in (0, 1)] == mtimes  # nothing retrained
    assert report["test_spectrum_mae"] == straight["test_spectrum_mae"]
    assert report["calibration"] == straight["calibration"]
    with pytest.raises(ConfigError, match="member 2 does not exist"):
        train.run(cfg, b, member=2)
    again = TrainJob(cfg, b).checkpoint(1)  # submitit passes the array task's arguments back
    assert isinstance(again, submitit.helpers.DelayedSubmission) and again.args == (1,)
    assert isinstance(again.function, TrainJob)
