"""End-to-end analyze stage on the embedded benchmark: real prepare, a real (tiny, untrained)
checkpoint through the real embed stage, then analyze. Checks the outputs and their schema, the
benchmark recovery (precision@3 of the planted drivers), and that every figure and the report are
produced when descriptors are missing."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import untrained_checkpoint

from toolkit import analyze
from toolkit.analyze.attribution import (
    dedupe_categorical,
    enrichment,
    matches,
    precision_at_k,
)
from toolkit.analyze.descriptors import DescriptorTable
from toolkit.config import load_config
from toolkit.data import prepare

N = 240
MODEL = {"alignn_layers": 1, "gcn_layers": 1, "hidden_features": 16, "embedding_features": 8}
FIGURES = ("dendrogram", "map", "spectra", "enrichment", "elements")


def _cfg(tmp: Path, **analyze_kw):
    an = {"workers": 2, "permutation_repeats": 2, "probe_folds": 3, "max_clusters": 10}
    an.update(analyze_kw)
    return load_config(None, {
        "data": {"benchmark": {"n_materials": N}, "shard_size": 120, "workers": 2},
        "model": MODEL, "embed": {"shard_size": 120, "batch_size": 40, "workers": 1, "checkpoint": str(tmp / "best.pt")},
        "analyze": an})


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    from toolkit import embed

    root = tmp_path_factory.mktemp("analyze")
    run = root / "run"
    cfg = _cfg(root)
    prepare.run(cfg, run)
    untrained_checkpoint(cfg, run, root / "best.pt")
    embed.run(cfg, run)
    result = analyze.run(cfg, run)
    return {"cfg": cfg, "run": run, "result": result, "root": root}


@pytest.mark.slow  # module fixture: prepare + embed + analyze of 240 materials, ~1-2 min on 2 idle cores
def test_outputs_and_schema(analyzed):
    run, res = analyzed["run"], analyzed["result"]
    out = run / "analyze"
    on_disk = json.loads((out / "attribution.json").read_text())
    assert on_disk["format"] == "spectrolens-attribution" and on_disk["n_materials"] == N
    layers = on_disk["layers"]
    assert set(layers) == {"alignn_1", "gcn_1", "readout", "spectrum_reference", "spectrum_predicted"}
    nov = on_disk["novelty"]  # every material has a spectrum and there is no split here: all are training
    assert nov["available"] and nov["n_training"] == N and nov["n_far"] == 0
    assert len((out / "novelty.csv").read_text().splitlines()) == N + 1
    for name, L in layers.items():
        k = L["clustering"]["n_clusters"]
        assert 2 <= k <= 10 and len(L["clusters"]) == k
        assert sum(c["size"] for c in L["clusters"].values()) == N
        members = [m for c in L["clusters"].values() for m in c["members"]]
        assert len(members) == N and len(set(members)) == N
        for c in L["clusters"].values():
            assert c["summary"].startswith("cluster ") and f"{c['size']} materials" in c["summary"]
            for d in c["descriptors"]:
                assert 0 <= d["q"] <= 1 and -1 <= d["effect"] <= 1 and d["test"] in ("fisher", "mannwhitney")
            qs = [d["q"] for d in c["descriptors"]]
            sig = [q < 0.05 for q in qs]
            assert sig == sorted(sig, reverse=True)  # significant (condensed) entries first ...
            assert qs[sum(sig):] == sorted(qs[sum(sig):])  # ... then the rest by q
            assert all(q < 0.05 for q, d in zip(qs, c["descriptors"]) if d.get("covers"))
            assert len(c["spectral"]["reference"]["mean"]) == on_disk["energy_subsample"]["n"]
        z = np.load(out / L["linkage_file"])
        assert z.shape == (N - 1, 4)
        assert L["ami_reference"] is not None and -0.1 <= L["ami_reference"] <= 1.0
        for f in FIGURES:
            assert (out / "figures" / f"{name}_{f}.png").stat().st_size > 1000
            assert (out / "figures" / f"{name}_{f}.svg").stat().st_size > 1000
    assert layers["spectrum_reference"]["ami_reference"] == pytest.approx(1.0)
    assert set(on_disk["probes"]) == set(layers) and on_disk["global_importance"]
    assert "cn_mean" in on_disk["probes"]["alignn_1"]
    with open(out / "clusters.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N and set(rows[0]) == {"id", "formula", *layers}
    with open(out / "descriptors.csv") as f:
        assert len(list(csv.reader(f))) == N + 1
    assert (out / "descriptor_failures.csv").exists()
    html = (out / "report" / "index.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 5 * len(layers) + 1
    # inline scripts only (plotly.js and the interactive maps, issue 21; its code mentions URLs, it fetches none:
    # the Content-Security-Policy forbids it), no external resource
    assert "<script src" not in html and 'src="http' not in html and "<link" not in html
    assert "script-src 'unsafe-inline'; connect-src 'none'" in html and html.count('class="imap"') == len(layers)


@pytest.mark.slow  # module fixture: prepare + embed + analyze of 240 materials, ~1-2 min on 2 idle cores
def test_benchmark_recovery(analyzed, tmp_path):
    """precision@3 of the planted drivers (anion, cation class, bond length, coordination) among
    each cluster's top-3 descriptors. Threshold: 0.5 on the reference-spectra clustering, i.e.
    on average at least half of the top three are planted drivers, where a random ranking of the
    same tested descriptors scores `chance` (~0.1-0.2), and the proxies the benchmark does not
    plant (electronegativity difference, density, element identities) compete for the top places."""
    # The default level changed from the silhouette choice (2-3 clusters here) to k = N / 25 = 10
    # (deliberately: clusters of the size people read). The thresholds below were calibrated for the
    # silhouette clustering, so they are checked on it (analyze.n_clusters = "auto", still an option);
    # at the default level finer clusters are told apart by finer descriptors (measured 0.43 on the
    # reference spectra, chance 0.08), checked against chance.
    cfg = _cfg(analyzed["root"], n_clusters="auto", drivers=False)
    run = tmp_path / "run"  # a separate output directory: the fixture's outputs stay as written
    run.mkdir()
    for name in ("dataset.zarr", "embeddings.zarr"):
        (run / name).symlink_to(analyzed["run"] / name)
    shutil.copytree(analyzed["run"] / "analyze" / "descriptor_cache", run / "analyze" / "descriptor_cache")
    honest = analyze.analyze_inputs(cfg, analyze.load_inputs(cfg, run))["benchmark_recovery"]
    rec = honest["precision_at_3"]  # the earlier score, kept beside the honest one (issue 14)
    assert rec["drivers"] == ["anion:*", "cation_class:*", "bond_length_mean", "coordination:*"]
    ref = rec["per_layer"]["spectrum_reference"]
    assert ref["precision"] >= 0.5, ref
    assert ref["precision"] >= 3 * ref["chance"], ref
    best = rec["per_layer"][rec["best_layer"]]["precision"]
    assert best >= ref["precision"] and best >= 0.5
    assert 0 <= rec["overall"] <= 1
    default = analyzed["result"]["benchmark_recovery"]["precision_at_3"]
    assert analyzed["result"]["layers"]["spectrum_reference"]["clustering"]["n_clusters"] == 10
    dref = default["per_layer"]["spectrum_reference"]
    assert dref["precision"] >= 3 * dref["chance"], dref
    assert default["per_layer"][default["best_layer"]]["precision"] >= 0.4


def test_precision_and_matching_rules():
    ranked = [{"descriptor": "element:Te"}, {"descriptor": "density"}, {"descriptor": "coordination:octahedral"}]
    aliases = {"element:Te": ["anion:telluride"]}
    assert matches("coordination:octahedral", "coordination:*") and not matches("cn_mean", "coordination:*")
    assert matches("element:Te", "anion:*", aliases["element:Te"])
    assert precision_at_k(ranked, ["anion:*", "coordination:*"], aliases) == pytest.approx(2 / 3)


def test_enrichment_finds_a_planted_category():
    """A 0/1 descriptor present in exactly one cluster is its top-ranked descriptor (tiny q);
    aliases (identical columns) are tested once."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    vals = np.column_stack([(labels == 1).astype(float), (labels == 1).astype(float), rng.normal(size=120),
                            rng.integers(0, 2, 120).astype(float)])
    table = DescriptorTable([str(i) for i in range(120)], ["anion:telluride", "element:Te", "density", "element:Na"], vals)
    names, aliases = dedupe_categorical(table)
    assert "element:Te" not in names and aliases["anion:telluride"] == ["element:Te"]
    ranked = enrichment(labels, table, names)
    top = ranked[1][0]
    assert top["descriptor"] == "anion:telluride" and top["q"] < 1e-15 and top["effect"] == pytest.approx(1.0)
    assert all(r["q"] > 1e-3 for r in ranked[1][1:])


@pytest.mark.slow  # module fixture: prepare + embed + analyze of 240 materials, ~1-2 min on 2 idle cores
def test_every_figure_when_descriptors_are_missing(analyzed, tmp_path):
    """Drop every element column, NaN the onset of all materials and half of the coordination and
    bond-length values: every figure, the JSON and the report are still produced."""
    cfg = _cfg(analyzed["root"], layers=["gcn_1", "spectrum_reference"])
    run = tmp_path / "run"
    run.mkdir()
    for name in ("dataset.zarr", "embeddings.zarr"):
        (run / name).symlink_to(analyzed["run"] / name)
    shutil.copytree(analyzed["run"] / "analyze" / "descriptor_cache", run / "analyze" / "descriptor_cache")
    inp = analyze.load_inputs(cfg, run)
    t = inp.table
    keep = [n for n in t.names if not n.startswith(("element:", "fraction:"))]
    vals = t.select(keep).values.copy()
    vals[:, keep.index("onset")] = np.nan
    half = np.arange(len(t.ids)) % 2 == 0
    for j, n in enumerate(keep):
        if n.startswith(("coordination:", "bond_length")) or n == "cn_mean":
            vals[half, j] = np.nan
    inp.table = DescriptorTable(t.ids, keep, vals, t.failures + [(i, "onset", "dropped by test") for i in t.ids])
    res = analyze.analyze_inputs(cfg, inp)
    out = run / "analyze"
    for layer in ("gcn_1", "spectrum_reference"):
        for f in FIGURES:
            assert (out / "figures" / f"{layer}_{f}.png").stat().st_size > 1000
            assert (out / "figures" / f"{layer}_{f}.svg").exists()
        for c in res["layers"][layer]["clusters"].values():
            assert "onset unknown" in c["summary"]
            assert not any(d["descriptor"].startswith("element:") for d in c["descriptors"])
    assert (out / "figures" / "layer_comparison.png").exists()
    html = (out / "report" / "index.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 11
    assert json.loads((out / "attribution.json").read_text())["descriptors"]["n_failures"] >= len(t.ids)


@pytest.mark.slow  # module fixture: prepare + embed + analyze of 240 materials, ~1-2 min on 2 idle cores
def test_clear_errors(analyzed, tmp_path):
    with pytest.raises(analyze.AnalyzeError, match="dataset.zarr"):
        analyze.run(_cfg(tmp_path), tmp_path)
    cfg = _cfg(analyzed["root"], layers=["gcn_1", "no_such_layer"])
    inp = analyze.load_inputs(cfg, analyzed["run"])
    with pytest.raises(analyze.AnalyzeError, match=r"no_such_layer.*choose from"):
        analyze.analyze_inputs(cfg, inp)


def test_structure_only_dataset_without_embeddings_is_a_clear_error(shared_data, tmp_path):
    """No spectra and no embeddings: the reference baseline is not in the default layers, so there is
    nothing to cluster, and analyze says so (after computing and caching the descriptors)."""
    lines = (shared_data / "mp_structures" / "mp_structures.jsonl").read_text().splitlines()[:12]
    src = tmp_path / "s.jsonl"
    src.write_text("\n".join(lines) + "\n")
    cfg = load_config(None, {"data": {"source": "jsonl", "path": str(src), "shard_size": 12, "workers": 1},
                             "analyze": {"workers": 1, "coordination": "cutoff"}})
    prepare.run(cfg, tmp_path / "run")
    with pytest.raises(analyze.AnalyzeError, match="nothing to analyse"):
        analyze.run(cfg, tmp_path / "run")
    assert list((tmp_path / "run" / "analyze" / "descriptor_cache").glob("*/block-*.json"))


def test_probes_find_a_planted_signal_in_wide_activations():
    """Activations 1,501 wide (wider than the 64-component projection) mixing 12 latent factors, two
    of them a descriptor and a class: the descriptor is probed with R^2 near 1 and the class with AUC
    near 1; an unrelated descriptor scores about 0 (R^2)."""
    from toolkit.analyze.probes import probe_layer

    rng = np.random.default_rng(0)
    n, h = 600, 1501
    cn = rng.uniform(3, 8, n)
    octa = (rng.random(n) < 0.4).astype(float)
    noise = rng.normal(size=n)
    latent = np.column_stack([cn, octa, rng.normal(size=(n, 10))])
    x = latent @ rng.normal(size=(12, h)) + rng.normal(scale=0.5, size=(n, h))
    table = DescriptorTable([f"m{i}" for i in range(n)], ["cn_mean", "density", "coordination:octahedral"],
                            np.column_stack([cn, noise, octa]))
    out = probe_layer(x, table, ["cn_mean", "density", "coordination:octahedral"], folds=3, seed=0)
    assert out["cn_mean"]["metric"] == "r2" and out["cn_mean"]["score"] > 0.9
    assert abs(out["density"]["score"]) < 0.1
    assert out["coordination:octahedral"]["metric"] == "roc_auc" and out["coordination:octahedral"]["score"] > 0.95
    assert all(v["n"] == n for v in out.values())


def test_spectral_signature_samples_large_clusters(monkeypatch):
    """Clusters above SIGNATURE_MAX use a seeded sample for their spectra (bounded memory) and say
    so; sizes and small clusters stay exact."""
    from toolkit.analyze import attribution as attr_mod

    monkeypatch.setattr(attr_mod, "SIGNATURE_MAX", 400)
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], [3000, 50])
    pred = rng.normal(size=(3050, 21)) + 3.0 * labels[:, None]
    sig = attr_mod.spectral_signature(labels, np.linspace(0, 15, 21), None, pred, None)
    assert sig[0]["size"] == 3000 and sig[0]["spectra_sampled"] == 400 and "spectra_sampled" not in sig[1]
    assert np.allclose(sig[0]["predicted"]["mean"], 0.0, atol=0.25)
    assert np.allclose(sig[1]["predicted"]["mean"], pred[labels == 1].mean(0))
    again = attr_mod.spectral_signature(labels, np.linspace(0, 15, 21), None, pred, None)
    assert np.array_equal(again[0]["predicted"]["p90"], sig[0]["predicted"]["p90"])  # seeded


def test_descriptor_csv_is_the_per_value_csv_written_in_chunks(tmp_path):
    """descriptors.csv from the chunked writer: the bytes the csv module writes value by value (shortest
    round-trip decimals, empty for NaN and infinities, ids quoted where they must be), across chunk ends."""
    rng = np.random.default_rng(0)
    v = rng.normal(size=(11, 5)) * 1e3
    v[:, 0] = v[:, 0] > 0
    v[1, 1], v[2, 2], v[3, 3], v[4, 4] = np.nan, np.inf, -np.inf, 1e-300
    ids = [f"m{i}" for i in range(11)]
    ids[5], ids[6] = 'odd,"id', "line\nbreak"
    t = DescriptorTable(ids, ["a", "b:c", "d", "e", "f"], v, [("m1", "b:c", "failed")])
    t.write(tmp_path / "d.csv", tmp_path / "f.csv", chunk=4)
    with open(tmp_path / "want.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *t.names])
        w.writerows([i, *("" if not np.isfinite(x) else repr(float(x)) for x in row)] for i, row in zip(ids, v))
    assert (tmp_path / "d.csv").read_bytes() == (tmp_path / "want.csv").read_bytes()
    with open(tmp_path / "d.csv", newline="") as f:
        back = list(csv.reader(f))
    assert [r[0] for r in back[1:]] == ids and back[2][2] == "" and back[5][5] == "1e-300"
    assert list(csv.reader(open(tmp_path / "f.csv")))[1] == ["m1", "b:c", "failed"]
    DescriptorTable(ids[:2], [], np.zeros((2, 0)), []).write(tmp_path / "e.csv", tmp_path / "g.csv")
    assert (tmp_path / "e.csv").read_text().split() == ["id", "m0", "m1"]
