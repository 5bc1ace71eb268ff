"""The real-structure benchmark (data.source: realbench): packaged MP structures, planted drivers, truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from toolkit.config import load_config
from toolkit.data import realbench as rb
from toolkit.data.readers import open_source
from toolkit.data.records import Material, Reject
from toolkit.data.spectra import peak_positions


def _cfg(**sets):
    base = {"data.source": "realbench", "data.realbench.max_materials": 60}
    base.update(sets)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def small():
    cfg = _cfg()
    src = open_source(cfg.data)
    keys, rejects = src.scan()
    items = list(src.load(keys))
    return cfg, keys, rejects, items


def test_packaged_set_and_notice_ship_with_the_package():
    recs = rb.packaged_records()
    assert len(recs) == 822 and recs[0]["material_id"].startswith("mp-")
    notice = rb.packaged_path().with_name("mp_structures.NOTICE.md").read_text()
    assert "CC BY 4.0" in notice and "Materials Project" in notice


def test_small_dataset_spectra_drivers_and_truth(small):
    cfg, keys, rejects, items = small
    assert len(keys) == 60 and not rejects and open_source(cfg.data).metadata()["excluded_no_anion"] == 70
    mats = [m for m in items if isinstance(m, Material)]
    assert len(mats) == 60, [r for r in items if isinstance(r, Reject)]
    spec = np.stack([m.spectrum for m in mats])
    assert spec.shape == (60, cfg.data.grid.num) and np.isfinite(spec).all()
    assert all(m.source == "realbench" and set(rb.FACTORS) <= set(m.properties) for m in mats)
    P = {k: [m.properties[k] for m in mats] for k in rb.FACTORS}
    # drivers of different kinds present in enough materials
    assert len(set(P["anion"])) >= 3
    assert sum(c != "none" for c in P["cation_chemistry"]) >= 15
    assert sum(c == "lone_pair_p" for c in P["cation_chemistry"]) >= 5
    assert sum(p != "none" for p in P["polyanion"]) >= 2
    assert sum(f > 0 for f in P["bridge_linear_fraction"]) >= 5
    assert np.std(P["bond_length_mean"]) > 0.2
    # the onset of the clean spectrum is the planted E0 (the CT band stays under the threshold)
    assert np.allclose(P["onset"], P["onset_param"], atol=0.02)
    # the confounded distractor really is correlated with its driver
    assert np.corrcoef(P["volume_per_atom"], P["bond_length_mean"])[0, 1] > 0.5
    # truth: six drivers of different kinds, each with a feature and descriptor names; JSON-able
    truth = json.loads(json.dumps(rb.realbench_truth(cfg)))
    d = truth["drivers"]
    assert len(d) >= 6 and {"categorical", "cation chemistry", "coordination", "continuous", "geometric",
                            "structural unit"} <= {x["kind"] for x in d.values()}
    for x in d.values():
        assert x["features"] and x["descriptors"] and set(x["features"]) <= set(truth["features"])
    assert d["polyanion"]["descriptors"] == ["polyanion:SiO4", "polyanion:PO4", "polyanion:SO4"] and "bond_length_mean" in d["bond_length_mean"]["descriptors"]
    assert truth["distractors"]["volume_per_atom"]["correlated_with"] == "bond_length_mean"
    assert truth["kind"] == "realbench" and truth["noise"] == cfg.data.realbench.noise


def test_spot_checks_on_real_structures():
    cfg = _cfg(**{"data.realbench.noise": 0.02})
    src = open_source(cfg.data)
    energy = np.linspace(cfg.data.grid.start, cfg.data.grid.stop, cfg.data.grid.num)
    phos, ircl3, zrmo = list(src.load(["mp-3439", "mp-568208", "mp-1095622"]))  # SbPO4, IrCl3, Zr(MoO4)2
    p = phos.properties
    assert p["polyanion"] == "PO4" and p["anion"] == "oxide" and p["cation_chemistry"] == "lone_pair_p"
    assert p["second_peak"] == rb.POLYANION_PEAK["PO4"]
    assert np.nanmin(np.abs(peak_positions(energy, phos.spectrum) - rb.POLYANION_PEAK["PO4"])) < 0.2
    q = ircl3.properties
    assert q["octahedral_open_d"] == 1.0 and q["open_d_cation"] == "Ir" and q["anion"] == "halide"
    assert abs(q["peak_1"] - q["ct_peak"]) < 0.1 and q["ct_peak"] < q["onset"]
    z = zrmo.properties
    assert z["cation_chemistry"] == "d0" and z["bridge_linear_fraction"] > 0.5 and z["edge_width"] > rb.EDGE_W0
    assert z["polyanion"] == "none"  # MoO4 is not one of the planted units


def test_deterministic_any_order_and_seeded_noise():
    cfg = _cfg()
    src = open_source(cfg.data)
    a = {m.id: m.spectrum for m in src.load(["mp-3439", "mp-568208"])}
    b = {m.id: m.spectrum for m in src.load(["mp-568208", "mp-3439"])}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    other = open_source(_cfg(**{"data.realbench.seed": 1}).data)
    assert not np.array_equal(next(iter(other.load(["mp-3439"]))).spectrum, a["mp-3439"])


def test_poscar_folders_by_path(shared_data):
    folder = shared_data / "paper_structures"
    cfg = _cfg(**{"data.realbench.mp": "false", "data.realbench.max_materials": 4,
                  "data.realbench.paths": json.dumps([str(folder)])})
    src = open_source(cfg.data)
    keys, _ = src.scan()
    assert len(keys) == 4 and all(k.startswith("path0/") for k in keys)
    mats = list(src.load(keys))
    assert all(isinstance(m, Material) and m.properties["set"] == "path0" for m in mats)
    assert all(np.isfinite(m.spectrum).all() for m in mats)
    assert src.metadata()["paths"] == [str(folder)]


def test_prepare_builds_the_store(tmp_path):
    from toolkit.data import prepare, store

    cfg = _cfg(**{"data.realbench.max_materials": 8, "data.shard_size": 4, "data.workers": 1})
    summary = prepare.run(cfg, tmp_path / "run")
    assert summary["n_materials"] == 8
    r = store.DatasetReader(tmp_path / "run" / "dataset.zarr")
    assert r.attrs["source"]["source"] == "realbench"
    assert np.isfinite(r.column("spectrum")).all()
    group = "benchmark" if "benchmark_truth" in r.attrs else "properties"  # benchmark/ once prepare.py knows realbench
    if "benchmark_truth" in r.attrs:
        assert r.attrs["benchmark_truth"]["kind"] == "realbench"
    bl = r.column(f"{group}/bond_length_mean")
    assert bl.shape == (8,) and np.isfinite(bl).all()
    from toolkit.analyze.recovery import planted_values

    pv = planted_values(r, rb.realbench_truth(cfg))
    assert pv["ids"] == [str(i) for i in r.ids] and np.allclose(pv["bond_length_mean"], bl)
    assert {"anion", "cation_chemistry", "octahedral_open_d", "bridge_linear_fraction", "polyanion",
            "volume_per_atom", "cn_mean"} <= set(pv)
