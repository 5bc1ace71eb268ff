"""The analyze stage's steps alone, on small synthetic inputs (no prepare, no embed): a per-layer
analysis finds a planted cluster-defining descriptor, the figure step writes every figure, the
assembly step builds the documented attribution.json keys and AMI values, and the orchestration
writes strict JSON that equals what it returns."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score
from test_analyze import FIGURES, _cfg

from toolkit import analyze
from toolkit.analyze import steps
from toolkit.analyze.attribution import dedupe_categorical
from toolkit.analyze.descriptors import DescriptorTable
from toolkit.analyze.probes import probe_targets

N, K, HAS_SPEC = 120, 3, 100  # materials, planted groups, materials with a reference spectrum (the first 100)
PLANTED = "anion:telluride"  # present exactly in group 1; element:Te is an identical column (an alias)


class _Emb(dict):
    """A dict standing in for embeddings.zarr (``attrs`` + ``layers/<layer>/<pooling>`` arrays)."""

    attrs = {"layers": ["blobs"]}


def _inputs(tmp_path, seed: int = 0) -> analyze.Inputs:
    """Three well-separated groups in an 8-wide "layer" and in the reference spectra; descriptors:
    the planted category, its alias, an unrelated category, and noise."""
    rng = np.random.default_rng(seed)
    group = rng.permutation(np.repeat(np.arange(K), N // K))
    x = (rng.normal(scale=6.0, size=(K, 8))[group] + rng.normal(size=(N, 8))).astype(np.float32)
    energy = np.linspace(0.0, 15.0, 31)
    shapes = np.stack([np.sin(energy / (2 + g)) for g in range(K)])
    reference = (shapes[group] + 0.05 * rng.normal(size=(N, len(energy)))).astype(np.float32)
    reference[HAS_SPEC:] = np.nan
    onset = np.where(np.arange(N) < HAS_SPEC, 1.0 + group + 0.1 * rng.normal(size=N), np.nan)
    planted = (group == 1).astype(float)
    names = [PLANTED, "element:Te", "element:Na", "density", "cn_mean", "onset"]
    values = np.column_stack([planted, planted, rng.integers(0, 2, N), rng.normal(size=N), rng.uniform(3, 8, N), onset])
    ids = [f"m{i}" for i in range(N)]
    table = DescriptorTable(ids, names, values, [(i, "onset", "no reference spectrum") for i in ids[HAS_SPEC:]])
    reader = SimpleNamespace(attrs={}, column=lambda key, rows: np.array([f"X{i}" for i in rows]))
    return analyze.Inputs(run_dir=tmp_path, reader=reader, emb=_Emb({"layers/blobs/mean": x}), rows=np.arange(N),
                          ids=ids, has_spec=np.arange(N) < HAS_SPEC, energy=energy, reference=reference,
                          predicted=None, table=table, dinfo={"dataset_hash": "synthetic"})


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    """The "blobs" layer (all materials) and the reference-spectra baseline (first HAS_SPEC)."""
    inp = _inputs(tmp_path_factory.mktemp("steps"))
    cfg = _cfg(inp.run_dir, n_clusters=K, workers=1)
    names, aliases = dedupe_categorical(inp.table)
    targets = probe_targets(inp.table)
    blobs = steps.analyze_layer(cfg, inp, "blobs", inp.emb["layers/blobs/mean"], np.ones(N, bool), names, targets)
    ref = steps.analyze_layer(cfg, inp, steps.REFERENCE, inp.reference[inp.has_spec], inp.has_spec, names, targets)
    return SimpleNamespace(inp=inp, cfg=cfg, names=names, aliases=aliases, targets=targets, blobs=blobs, ref=ref)


def test_analyze_layer_finds_the_planted_descriptor(layers):
    for lr in (layers.blobs, layers.ref):
        planted = layers.inp.table.column(PLANTED)[lr.mask] == 1
        c = int(np.bincount(lr.clustering.labels[planted]).argmax())
        assert (lr.clustering.labels == c).sum() == planted.sum()  # the group is recovered exactly
        top = lr.ranked[c][0]
        assert top["descriptor"] == PLANTED and top["q"] < 1e-10 and top["effect"] == pytest.approx(1.0)
        assert "element:Te" not in {r["descriptor"] for rs in lr.ranked.values() for r in rs}  # tested as an alias
        assert PLANTED in lr.surrogate["importances"]
        assert lr.probes[PLANTED]["metric"] == "roc_auc" and lr.probes[PLANTED]["score"] > 0.95
        assert set(lr.probes) == set(layers.targets)
        assert lr.n_tests == sum(len(v) for v in lr.ranked.values())
        assert set(lr.signature) == set(lr.ranked) == set(lr.elements) == set(range(K))
    assert layers.blobs.coverage == N and (layers.blobs.labels >= 0).all()
    ref = layers.ref
    assert ref.coverage == HAS_SPEC and ref.member_ids == layers.inp.ids[:HAS_SPEC]
    assert (ref.labels[HAS_SPEC:] == -1).all() and np.array_equal(ref.labels[:HAS_SPEC], ref.clustering.labels)
    assert ref.signature[0]["reference"]["mean"].shape == layers.inp.energy.shape


def test_analyze_layer_skips_a_layer_covering_fewer_than_three(layers):
    mask = np.zeros(N, bool)
    mask[:2] = True
    assert steps.analyze_layer(layers.cfg, layers.inp, "tiny", layers.inp.reference[mask], mask, layers.names,
                               layers.targets) is None


def test_write_layer_figures_writes_every_figure(layers, tmp_path):
    assert steps.FIGURES == FIGURES
    onset = steps.onset_of(layers.inp.table)
    for lr in (layers.blobs, layers.ref):
        uris = steps.write_layer_figures(lr, layers.inp.energy, onset, tmp_path / "figures")
        assert list(uris) == list(FIGURES)
        assert all(u.startswith("data:image/png;base64,") for u in uris.values())
    glob = steps.write_comparison_figure({"blobs": 0.5, steps.REFERENCE: 1.0},
                                         {"blobs": layers.blobs.probes, steps.REFERENCE: layers.ref.probes},
                                         tmp_path / "figures")
    assert list(glob) == ["layers"] and glob["layers"].startswith("data:image/png;base64,")
    written = {p.name for p in (tmp_path / "figures").iterdir()}
    expect = {f"{lr}_{f}.{ext}" for lr in ("blobs", steps.REFERENCE) for f in FIGURES for ext in ("png", "svg")}
    assert written == expect | {"layer_comparison.png", "layer_comparison.svg"}
    assert all((tmp_path / "figures" / n).stat().st_size > 1000 for n in written)


LAYER_KEYS = {"clustering", "linkage_file", "coverage", "n_tests", "tested", "aliases", "ami_reference",
              "ami_predicted", "surrogate", "clusters"}
# "hierarchy" and "drivers" were added with the explained Ward tree and the driver ranking (deliberate)
TOP_KEYS = {"format", "version", "run_dir", "generated", "n_materials", "config", "energy_subsample", "descriptors",
            "layers", "global_importance", "layer_comparison", "probes", "benchmark_recovery", "hierarchy", "drivers",
            "target"}


def test_assemble_attribution_keys_and_ami(layers):
    inp, blobs, ref = layers.inp, layers.blobs, layers.ref
    truth = {"features": {"onset": {"drivers": ["anion:*", "cn_mean"]}}}
    res = steps.assemble_attribution(layers.cfg, inp, [blobs, ref], layers.names, layers.aliases, truth=truth)
    assert set(res) == TOP_KEYS and res["format"] == "spectrolens-attribution" and res["n_materials"] == N
    assert res["target"]["kind"] == "absorption" and res["target"]["headline"] == {"name": "onset", "units": "eV"}
    assert list(res["layers"]) == ["blobs", steps.REFERENCE] and list(res["probes"]) == ["blobs", steps.REFERENCE]
    assert res["energy_subsample"] == {"start": 0.0, "step": pytest.approx(5.0), "every": 10, "n": 4}
    d = res["descriptors"]
    assert d["n_descriptors"] == 6 and d["n_tested"] == len(layers.names) == 4  # no element:Te alias, no onset
    assert d["failures_by_descriptor"] == {"onset": N - HAS_SPEC} and d["dataset_hash"] == "synthetic"
    for lr in (blobs, ref):
        L = res["layers"][lr.name]
        assert set(L) == LAYER_KEYS and L["coverage"] == lr.coverage and L["linkage_file"] == f"linkage/{lr.name}.npy"
        assert L["aliases"] == {PLANTED: ["element:Te"]} and L["tested"] == layers.names
        assert sum(c["size"] for c in L["clusters"].values()) == lr.coverage
        for c, cl in L["clusters"].items():
            # "node" (the cluster's Ward tree node) and "path" (its taxonomy) added deliberately
            assert set(cl) == {"size", "members", "summary", "spectral", "descriptors", "node", "path"}
            assert cl["members"] == [i for i, lab in zip(lr.member_ids, lr.clustering.labels) if lab == int(c)]
            assert len(cl["spectral"]["reference"]["mean"]) == res["energy_subsample"]["n"]
            top = cl["descriptors"][0]
            assert {"descriptor", "test", "p", "q", "effect", "in_cluster", "rest", "n_in", "n_rest", "aliases"} <= set(top)
        assert L["ami_predicted"] is None  # no predicted-spectra clustering
        # the explained tree: the default level is the clusters' nodes, every cluster has a taxonomy path
        H = res["hierarchy"][lr.name]
        default = next(v for v in H["levels"] if v["default"])
        assert default["k"] == K and default["nodes"] == [cl["node"] for cl in L["clusters"].values()]
        assert default["sizes"] == [cl["size"] for cl in L["clusters"].values()]
        assert H["splits"] and H["splits"][0]["size"] == lr.coverage and set(H["paths"]) == set(L["clusters"])
        top = {c: cl["descriptors"][0] for c, cl in L["clusters"].items()}
        planted = [c for c, d in top.items() if d["descriptor"] == PLANTED and d["effect"] > 0]
        assert len(planted) == 1 and "tellurides" in L["clusters"][planted[0]]["path"]
    # AMI with the reference clustering on the rows both cover
    both = slice(0, HAS_SPEC)
    expect = adjusted_mutual_info_score(ref.labels[both], blobs.labels[both])
    assert res["layers"]["blobs"]["ami_reference"] == pytest.approx(expect)
    assert res["layers"][steps.REFERENCE]["ami_reference"] == pytest.approx(1.0)
    assert res["layer_comparison"] == {"ami_vs_reference": {"blobs": pytest.approx(expect), steps.REFERENCE: 1.0},
                                       "ami_vs_predicted": {}}
    assert res["global_importance"] and next(iter(res["global_importance"])) == PLANTED
    rec = res["benchmark_recovery"]["precision_at_3"]
    assert res["benchmark_recovery"]["summary"]
    assert rec["drivers"] == ["anion:*", "cn_mean"] and set(rec["per_layer"]) == {"blobs", steps.REFERENCE}
    assert steps.assemble_attribution(layers.cfg, inp, [blobs], layers.names, layers.aliases)["benchmark_recovery"] is None
    assert res["drivers"] is None  # computed by the orchestration (analyze_inputs), passed in


def test_assemble_attribution_ami_from_given_labels(layers):
    """AMI is computed from each LayerResult's labels: a relabelled copy of the reference partition
    scores 1, rows a clustering does not cover (-1) are left out, no baseline gives None."""
    ref = layers.ref
    relabelled = dataclasses.replace(ref, name="same", labels=np.where(ref.labels >= 0, (ref.labels + 1) % K, -1))
    res = steps.assemble_attribution(layers.cfg, layers.inp, [relabelled, ref], layers.names, layers.aliases)
    assert res["layers"]["same"]["ami_reference"] == pytest.approx(1.0)
    alone = steps.assemble_attribution(layers.cfg, layers.inp, [layers.blobs], layers.names, layers.aliases)
    assert alone["layers"]["blobs"]["ami_reference"] is None and alone["layer_comparison"]["ami_vs_reference"] == {}


def test_analyze_inputs_writes_strict_json_equal_to_its_result(layers, tmp_path, monkeypatch):
    """The orchestration on the synthetic inputs: attribution.json is strict JSON (a NaN probe score
    is written as null) equal to the returned dict; clusters.csv, linkage files, figures and the
    report are all written."""
    from toolkit.analyze import probes

    real = probes.probe_layer

    def nan_cn_mean(*args, **kw):
        out = real(*args, **kw)
        out["cn_mean"]["score"] = float("nan")
        return out

    monkeypatch.setattr(probes, "probe_layer", nan_cn_mean)
    # chemiscope=False: the test double of the dataset has no structures to export (issue 21's chemiscope file)
    cfg = _cfg(tmp_path, n_clusters=K, workers=1, layers=["blobs", steps.REFERENCE], chemiscope=False)
    inp = dataclasses.replace(layers.inp, run_dir=tmp_path)
    res = analyze.analyze_inputs(cfg, inp)
    out = tmp_path / "analyze"

    def no_nan(c):
        raise ValueError(f"non-strict JSON token {c}")

    def null_nan(o):
        if isinstance(o, dict):
            return {str(k): null_nan(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [null_nan(v) for v in o]
        return None if isinstance(o, float) and not math.isfinite(o) else o

    on_disk = json.loads((out / "attribution.json").read_text(), parse_constant=no_nan)
    assert on_disk == null_nan(res) and set(on_disk["layers"]) == {"blobs", steps.REFERENCE}
    assert math.isnan(res["probes"]["blobs"]["cn_mean"]["score"]) and on_disk["probes"]["blobs"]["cn_mean"]["score"] is None
    with open(out / "clusters.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N and list(rows[0]) == ["id", "formula", "blobs", steps.REFERENCE]
    assert rows[0]["formula"] == "X0" and rows[-1][steps.REFERENCE] == "-1"
    for name, cov in (("blobs", N), (steps.REFERENCE, HAS_SPEC)):
        assert np.load(out / "linkage" / f"{name}.npy").shape == (cov - 1, 4)
        assert all((out / "figures" / f"{name}_{f}.png").is_file() for f in FIGURES)
    assert (out / "figures" / "layer_comparison.svg").is_file() and (out / "descriptors.csv").is_file()
    html = (out / "report" / "index.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 5 * 2 + 1
