"""Issue 21: the report's interactive maps (in headless Chromium, through Plotly's own JS API and the
page's ``window.spectrolens``), the chemiscope export (read back with chemiscope's own reader) and
``toolkit.open_run`` (xarray), on one real run directory: prepare (60 benchmark materials), a tiny
untrained checkpoint through the real embed stage, then analyze of one model layer and the
reference-spectra baseline (about 15 s on 2 cores)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import untrained_checkpoint

from toolkit import analyze
from toolkit.analyze import interactive
from toolkit.config import load_config
from toolkit.data import prepare
from toolkit.data.store import DatasetReader

N = 60
LAYERS = ["gcn_1", "spectrum_reference"]
MODEL = {"alignn_layers": 1, "gcn_layers": 1, "hidden_features": 16, "embedding_features": 8}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from toolkit import embed

    root = tmp_path_factory.mktemp("interactive")
    run = root / "run"
    cfg = load_config(None, {
        "data": {"benchmark": {"n_materials": N}, "shard_size": 30, "workers": 1}, "model": MODEL,
        "embed": {"shard_size": 30, "batch_size": 30, "workers": 1, "checkpoint": str(root / "best.pt")},
        "analyze": {"workers": 1, "permutation_repeats": 2, "probe_folds": 3, "max_clusters": 6, "layers": LAYERS,
                    "drivers": False, "chemiscope": "auto"}})
    prepare.run(cfg, run)
    untrained_checkpoint(cfg, run, root / "best.pt")
    embed.run(cfg, run)
    analyze.run(cfg, run)
    return run


def _clusters_csv(run: Path) -> list[dict]:
    with open(run / "analyze" / "clusters.csv") as f:
        return list(csv.DictReader(f))


CLICK = """(() => {
  const gd = document.querySelector('#imap-gcn_1 .plotly-graph-div');
  const cd = gd.data[0].customdata[0];
  gd.emit('plotly_click', {points: [{curveNumber: 0, pointNumber: 0, customdata: cd}]});
  const box = document.querySelector('#imap-gcn_1 .imap-detail');
  const sp = box.querySelector('.imap-spectrum');
  return {id: cd[0], formula: cd[1], title: box.querySelector('.imap-title').textContent,
          traces: (sp.data || []).map(t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y)}))};
})()"""
HOVER = """(() => {
  const gd = document.querySelector('#imap-gcn_1 .plotly-graph-div');
  Plotly.Fx.hover(gd, [{curveNumber: 0, pointNumber: 1}]);
  return {id: gd.data[0].customdata[1][0], label: document.querySelector('#imap-gcn_1 .hoverlayer').textContent};
})()"""
COLOUR = """(() => {
  window.spectrolens.colourBy('gcn_1', 'onset');
  const gd = document.querySelector('#imap-gcn_1 .plotly-graph-div');
  return {colours: gd.data.map(t => Array.from(t.marker.color)),
          legend: document.querySelector('#imap-gcn_1 .imap-legend').textContent};
})()"""
LEGEND = """(() => {
  const gd = document.querySelector('#imap-gcn_1 .plotly-graph-div');
  gd.emit('plotly_legendclick', {curveNumber: 1});
  const m = document.querySelector('#imap-gcn_1 .imap-members');
  return {head: m.querySelector('h4').textContent, ids: Array.from(m.querySelectorAll('td a')).map(a => a.textContent)};
})()"""

TREE = """(() => {
  const all = Array.from(document.querySelectorAll('.tree-node[data-layer="gcn_1"]'));
  const sp = all.reduce((a, b) => (b.dataset.clusters.split(',').length > a.dataset.clusters.split(',').length ? b : a));
  sp.click();
  const m = document.querySelector('#imap-gcn_1 .imap-members');
  return {clusters: sp.dataset.clusters, node: sp.textContent, head: m.querySelector('h4').textContent,
          ids: Array.from(m.querySelectorAll('td a')).map(a => a.textContent)};
})()"""

SUMMARY = """(() => {
  const li = document.querySelector('#layer-gcn_1 ~ ul.summary li');
  li.click();
  return {item: li.textContent, head: document.querySelector('#imap-gcn_1 .imap-members h4').textContent};
})()"""


@pytest.mark.browser
def test_map_click_and_hover_show_material_and_spectra(run_dir, tmp_path):
    from test_report_browser import CHROMIUM, _open_in_chromium

    if CHROMIUM is None:
        pytest.skip("chromium not installed (scripts/setup.sh --test installs it)")
    page = run_dir / "analyze" / "report" / "index.html"
    state, errors, requests, _ = _open_in_chromium(page, tmp_path, actions=(
        "Object.keys(window.spectrolens.maps)", CLICK, HOVER, COLOUR, LEGEND, SUMMARY, TREE))
    assert not errors, errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert state["images"] == state["decoded"] == 5 * len(LAYERS) + 1  # the PNG figures stay
    maps, click, hover, colour, legend, summary, tree = state["actions"]
    assert maps == LAYERS

    # click a point: its id, formula and both spectra appear, equal to the stores' (every step-th energy)
    assert click["id"] in click["title"] and click["formula"] in click["title"]
    assert [t["name"] for t in click["traces"]] == ["reference", "predicted"]
    reader = DatasetReader(run_dir / "dataset.zarr")
    row = [str(x) for x in reader.ids].index(click["id"])
    step = max(1, len(reader.energy) // interactive.SPECTRUM_POINTS)
    ref = reader.column("spectrum", np.array([row]))[0][::step]
    import zarr

    pred = zarr.open_group(run_dir / "embeddings.zarr", mode="r")["prediction"][row][::step]
    np.testing.assert_allclose(click["traces"][0]["x"], reader.energy[::step], atol=1e-5)
    for got, want in ((click["traces"][0]["y"], ref), (click["traces"][1]["y"], pred)):
        got = np.array([np.nan if v is None else v for v in got], dtype=float)
        np.testing.assert_allclose(got, want, atol=2e-3 * max(1.0, float(np.nanmax(np.abs(want)))))

    # hover (Plotly.Fx.hover): the label names the material
    assert hover["id"] in hover["label"] and "cluster" in hover["label"] and "onset" in hover["label"]

    # colour by a descriptor: every point gets a colour, the legend names the descriptor
    assert "onset" in colour["legend"]
    assert all(isinstance(c, str) and c.startswith(("rgb(", "#")) for cs in colour["colours"] for c in cs)

    # click a cluster in the legend: its members are listed (all: N is below the subsample size)
    c = int(legend["head"].split(":")[0].split()[1])
    members = [r["id"] for r in _clusters_csv(run_dir) if int(r["gcn_1"]) == c]
    assert f"{len(members)} materials" in legend["head"] and sorted(legend["ids"]) == sorted(members)
    # ... and from the report's cluster list of that layer
    assert summary["item"].split(":")[0] == summary["head"].split(":")[0] == "cluster 0"
    # ... and from a node of the taxonomy tree: the materials of every cluster under it
    cs = [int(x) for x in tree["clusters"].split(",")]
    members = [r["id"] for r in _clusters_csv(run_dir) if int(r["gcn_1"]) in cs]
    assert len(cs) >= 1 and tree["head"].startswith(tree["node"]) and f"{len(members)} materials" in tree["head"]
    assert sorted(tree["ids"]) == sorted(members)


def test_report_maps_survive_rerender_and_subsample(run_dir):
    out = run_dir / "analyze"
    assert sorted(p.name for p in (out / "interactive").iterdir()) == [f"{n}.npz" for n in sorted(LAYERS)]
    page = analyze.rerender_report(run_dir)  # from files only (as explain's finalize calls it)
    text = page.read_text()
    assert text.count('class="imap"') == len(LAYERS) and text.count('id="sl-spectra"') == 1
    assert "script-src 'unsafe-inline'; connect-src 'none'" in text and "<script src" not in text
    assert f"All {N:,} materials shown." in text

    # above the display limit: a seeded subsample per cluster, the page says so; the data are untouched
    d = interactive.load_all(out / "interactive", ["gcn_1"])["gcn_1"]
    desc = {k[2:]: v for k, v in d.items() if k.startswith("d:")}
    small = interactive.map_data("gcn_1", d["id"], d["formula"], d["xy"], d["cluster"], desc, d["energy"],
                                 d["reference"], d["predicted"], max_points=20, seed=3)
    again = interactive.map_data("gcn_1", d["id"], d["formula"], d["xy"], d["cluster"], desc, d["energy"],
                                 d["reference"], d["predicted"], max_points=20, seed=3)
    assert np.array_equal(small["id"], again["id"]) and 15 <= len(small["id"]) <= 25
    assert set(small["cluster"].tolist()) == set(d["cluster"].tolist())
    assert small["cluster_sizes"].sum() == N
    frag = interactive.fragments({"gcn_1": small})["gcn_1"]
    assert f"subsample of {len(small['id'])} of {N}" in frag

    # the stage ends with a summary of what it wrote and where
    log = (run_dir / "logs" / "analyze" / "job.log").read_text()
    for what in ("report", "attribution", "figures", "chemiscope"):
        assert f"  {what}" in log.split("analyze: wrote", 1)[1]


def test_chemiscope_file_loads_with_chemiscope(run_dir):
    chemiscope = pytest.importorskip("chemiscope")
    path = run_dir / "analyze" / "chemiscope.json.gz"
    widget = chemiscope.show_input(str(path), cache_structures=False)  # chemiscope's own reader
    data = json.loads(widget.value)
    reader = DatasetReader(run_dir / "dataset.zarr")
    ids = [str(x) for x in reader.ids]
    assert len(data["structures"]) == N and data["properties"]["id"]["values"] == ids
    assert [s["size"] for s in data["structures"]] == reader.natoms.tolist()
    props = data["properties"]
    for layer in LAYERS:
        assert len(props[f"{layer} PC1"]["values"]) == N
        assert [int(v) for v in props[f"{layer} cluster"]["values"]] == [int(r[layer]) for r in _clusters_csv(run_dir)]
    assert "onset" in props and "class:anion" in props
    assert len(props["predicted spectrum"]["values"][0]) == len(data["parameters"]["energy"]["values"])
    assert data["settings"]["map"]["x"]["property"] == "gcn_1 PC1"


def test_chemiscope_file_samples_per_cluster_above_its_limit(run_dir, tmp_path):
    """Above analyze.chemiscope_max_materials the file holds a seeded sample per cluster of the first model
    layer (every cluster keeps its share), the right structures and coordinates, and says it is a sample."""
    chemiscope = pytest.importorskip("chemiscope")
    from toolkit.analyze import attribution, chemiscope_export, probes
    from toolkit.analyze.steps import analyze_layer

    cfg = load_config(None, {"analyze": {"workers": 1, "permutation_repeats": 1, "probe_folds": 3, "max_clusters": 6,
                                         "layers": LAYERS, "drivers": False}})
    inp = analyze.load_inputs(cfg, run_dir)
    names, _ = attribution.dedupe_categorical(inp.table)
    x, mask = analyze._features("gcn_1", cfg, inp.emb, inp.reference, inp.has_spec)
    lr = analyze_layer(cfg, inp, "gcn_1", x, mask, names, probes.probe_targets(inp.table))
    formulas = inp.reader.column("formula", inp.rows)
    path = chemiscope_export.write(tmp_path / "c.json.gz", inp, [lr], formulas, max_materials=24, seed=0)
    data = json.loads(chemiscope.show_input(str(path), cache_structures=False).value)
    got = data["properties"]["id"]["values"]
    pos = [inp.ids.index(i) for i in got]
    assert pos == sorted(set(pos)) and 24 <= len(got) <= 24 + lr.clustering.n_clusters
    assert f"{len(got)} of the {N} materials" in data["meta"]["description"]
    sizes = np.bincount(lr.labels, minlength=lr.clustering.n_clusters)
    shown = np.bincount(lr.labels[pos], minlength=lr.clustering.n_clusters)
    assert (shown >= 1).all() and np.abs(shown - 24 * sizes / N).max() <= 1.0, (shown, sizes)
    assert [s["size"] for s in data["structures"]] == DatasetReader(run_dir / "dataset.zarr").natoms[inp.rows[pos]].tolist()
    np.testing.assert_allclose(data["properties"]["gcn_1 PC1"]["values"], lr.clustering.coords[pos, 0], rtol=1e-6)
    assert data["properties"]["formula"]["values"] == [str(formulas[i]) for i in pos]


def test_open_run_xarray(run_dir):
    pytest.importorskip("xarray")
    import zarr

    import toolkit

    ds = toolkit.open_run(run_dir)
    reader = DatasetReader(run_dir / "dataset.zarr")
    ids = [str(x) for x in reader.ids]
    assert list(ds["material"].values) == ids and ds.sizes["energy"] == len(reader.energy)
    for v in ("reference", "prediction", "embedding_gcn_1", "embedding_alignn_1", "embedding_readout"):
        assert not ds[v].variable._in_memory, v  # lazily backed by the Zarr stores
    one = ds.sel(material=ids[7])
    np.testing.assert_array_equal(one["reference"].values, reader.column("spectrum", np.array([7]))[0])
    emb = zarr.open_group(run_dir / "embeddings.zarr", mode="r")
    np.testing.assert_array_equal(one["prediction"].values, emb["prediction"][7])
    np.testing.assert_array_equal(ds["embedding_gcn_1"][:5].values, emb["layers/gcn_1/mean"][:5])
    assert ds["energy"].attrs["units"] == "eV" and ds["formula"].values[7] == str(reader.column("formula")[7])
    assert list(ds["clustering"].values) == LAYERS
    assert ds["cluster"].sel(clustering="gcn_1").values.tolist() == [int(r["gcn_1"]) for r in _clusters_csv(run_dir)]
    onset = ds["descriptors"].sel(descriptor="onset").values
    np.testing.assert_allclose(onset, reader.column("descriptors/onset"), rtol=1e-6, equal_nan=True)


def test_chemiscope_switch(run_dir, monkeypatch):
    """analyze.chemiscope: true without the package is a clear error; false writes nothing (and removes an
    earlier file)."""
    from toolkit.analyze import chemiscope_export
    from toolkit.errors import SpectrolensError

    inp = SimpleNamespace(run_dir=run_dir, ids=[])
    monkeypatch.setattr(chemiscope_export, "available", lambda: False)
    with pytest.raises(SpectrolensError, match="pip install chemiscope"):
        analyze._chemiscope(load_config(None, {"analyze": {"chemiscope": True}}), inp, [], [])
    stale = run_dir / "analyze" / "chemiscope-switch-test"
    stale.mkdir()
    monkeypatch.setattr(analyze, "RunLayout", lambda d: SimpleNamespace(analyze_dir=stale))
    (stale / "chemiscope.json.gz").write_bytes(b"old")
    assert analyze._chemiscope(load_config(None, {"analyze": {"chemiscope": False}}), inp, [], []) is None
    assert not (stale / "chemiscope.json.gz").exists()
