"""The explain stage: structural edits, the sharded stage (resume = identical results), integrated-gradient
completeness on real structures, and the counterfactual machinery against a hand-built model whose output
follows the embedded benchmark's planted onset rule (see test_planted_rule_signs for what that covers)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from torch import nn

from conftest import smallest_mp_jsonl
from toolkit import sharded
from toolkit.config import load_config
from toolkit.data import benchmark as bm
from toolkit.data import prepare
from toolkit.data.loader import collate
from toolkit.data.readers.common import structure_problem
from toolkit.data.store import DatasetReader
from toolkit.explain import edits as ed
from toolkit.explain import gradients as gr
from toolkit.explain import options as op
from toolkit.explain import stage
from toolkit.explain.probes import graph_item, probe_rows
from toolkit.model import build_model
from toolkit.train import checkpoint as ckpt

MODEL = {"alignn_layers": 1, "gcn_layers": 1, "hidden_features": 16, "embedding_features": 8}
N_STRUCTURES = 12
PAPER = ["Ag2SO4_mp-5625", "Ag3PO4_mp-1229128_mp-4198", "Ag3PS4_mp-12459"]


class Cfg:
    """A PipelineConfig plus an ``explain`` section (until config.py has ExplainConfig)."""

    def __init__(self, cfg, **explain):
        self._cfg, self.explain = cfg, explain

    def __getattr__(self, name):
        return getattr(self._cfg, name)


def _paper(shared_data: Path, name: str) -> Structure:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_file(shared_data / "paper_structures" / f"POSCAR_{name}.vasp")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_data):
    """dataset.zarr of the 12 smallest MP structures (151-point grid) + a tiny random checkpoint."""
    root = tmp_path_factory.mktemp("explain")
    src = smallest_mp_jsonl(shared_data, root / "structures.jsonl", N_STRUCTURES)
    data_run = root / "data"
    cfg = load_config(None, {"data": {"source": "jsonl", "path": str(src), "shard_size": 16, "workers": 1,
                                      "grid": {"num": 151}}, "model": MODEL})
    prepare.run(cfg, data_run)
    torch.manual_seed(0)
    model = build_model(cfg.model, 151)
    ck = root / "best.pt"
    ckpt.atomic_save({"format": ckpt.MODEL_FORMAT, "version": ckpt.VERSION, "model": model.state_dict(),
                      "config": cfg.model_dump_json(), "output_features": 151, "epoch": 0, "val_mae": 1.0}, ck)
    return {"root": root, "dataset": data_run / "dataset.zarr", "ckpt": ck, "cfg": cfg}


def _run_dir(prepared, name: str) -> Path:
    d = prepared["root"] / name
    (d / "train").mkdir(parents=True)
    (d / "dataset.zarr").symlink_to(prepared["dataset"])
    (d / "train" / "best.pt").symlink_to(prepared["ckpt"])
    return d


OPTS = {"shard_size": 4, "batch_size": 8, "ig_steps": 32, "representatives": 2}


@pytest.fixture(scope="module")
def reference(prepared):
    run_dir = _run_dir(prepared, "ref")
    summary = stage.run(Cfg(prepared["cfg"], **OPTS), run_dir)
    return {"run_dir": run_dir, "summary": summary}


# ------------------------------------------------------------------------------------------- edits
def test_edits_are_valid_structures_or_rejects_with_reasons(shared_data):
    opts = op.ExplainOptions(strains=[-0.85, -0.02, 0.04])  # -85 % squeezes atoms together: rejected
    for name in PAPER:
        s = _paper(shared_data, name)
        edits = ed.make_edits(s, opts, 0.5)
        assert {e.type for e in edits} >= {"cation_substitution", "anion_substitution", "strain", "shell_strain"}
        for e in edits:
            assert (e.structure is None) != (e.reason is None), (e.label, e.reason)
            if e.structure is not None:
                assert structure_problem(e.structure, 0.5) is None
            else:
                kind, _, detail = e.reason.partition(": ")
                assert kind and detail, e.reason
        squeezed = next(e for e in edits if e.type == "strain" and e.detail["strain"] == -0.85)
        assert squeezed.structure is None and squeezed.reason.startswith("overlapping atoms")
        strained = next(e for e in edits if e.type == "strain" and e.detail["strain"] == 0.04)
        assert strained.structure.volume == pytest.approx(s.volume * 1.04 ** 3)
    # polyanion units: SO4 in Ag2SO4, PO4 in Ag3PO4 (centre replaced everywhere, O kept); none in a thiophosphate
    so4 = ed.make_edits(_paper(shared_data, PAPER[0]), opts, 0.5)
    units = [e for e in so4 if e.type == "polyanion_centre"]
    assert [e.label for e in units] == ["SO4: S->Se", "SO4: S->Cr"]
    assert "S" not in units[0].structure.composition and units[0].structure.composition["Se"] == \
        _paper(shared_data, PAPER[0]).composition["S"]
    assert [e.label for e in ed.make_edits(_paper(shared_data, PAPER[1]), opts, 0.5)
            if e.type == "polyanion_centre"] == ["PO4: P->As", "PO4: P->V"]
    assert not [e for e in ed.make_edits(_paper(shared_data, PAPER[2]), opts, 0.5) if e.type == "polyanion_centre"]
    # S2- in a thiophosphate is an anion (chalcogen substitutions), S6+ in a sulfate is not
    labels = {e.label for e in ed.make_edits(_paper(shared_data, PAPER[2]), opts, 0.5)}
    assert {"S->Se", "S->Te", "S->O", "Ag->Cu"} <= labels


def test_shell_strain_moves_only_the_first_shell():
    rocksalt = Structure(Lattice.cubic(4.2), ["Mg"] * 4 + ["O"] * 4,
                         [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
                          [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0.5]])
    new, why, info = ed.shell_strain(rocksalt, 0, 0.04)
    assert why is None and info["shell_size"] == 6
    moved = np.linalg.norm(new.cart_coords - (rocksalt * ((info["supercell"],) * 3)).cart_coords, axis=1)
    assert (moved > 1e-6).sum() == 6  # the six O of Mg 0's octahedron, nothing else
    d = sorted(n.nn_distance for n in new.get_neighbors(new[0], 2.5))
    assert d == pytest.approx([2.1 * 1.04] * 6)
    # a primitive cell (every neighbour an image of one atom): done in a supercell
    prim = Structure(Lattice([[0, 2.1, 2.1], [2.1, 0, 2.1], [2.1, 2.1, 0]]), ["Mg", "O"], [[0, 0, 0], [0.5] * 3])
    new, why, info = ed.shell_strain(prim, 0, -0.02)
    assert why is None and info["supercell"] == 2 and len(new) == 16


# ------------------------------------------------------------------------------------ attributions
def test_integrated_gradients_completeness_on_real_structures(shared_data, prepared):
    cfg = prepared["cfg"]
    torch.manual_seed(3)
    model = build_model(cfg.model, 151).eval()
    energy = np.linspace(0, 15, 151)
    for name in PAPER:
        s = _paper(shared_data, name)
        item = graph_item(s, cfg.graph, 0, name)
        mask = gr.window_mask(energy, 3.0, None, 0.5)
        a = gr.integrated_gradients(model, item, mask, steps=32)
        with torch.no_grad():
            direct = float(model(collate([item]))[0, torch.as_tensor(mask)].mean())
        assert a.target == pytest.approx(direct, abs=1e-6)  # gradients.head is the model's forward
        diff = a.target - a.baseline_target
        assert abs(diff) > 1e-3
        # completeness: attributions of atoms + bonds + angles sum to F(input) - F(baseline)
        assert a.completeness_error <= 1e-3 * abs(diff) + 1e-6, (name, a.total, diff)
        assert a.atoms.shape == (len(s),) and a.bonds.shape == (item["edge_src"].size,)
        assert a.angles.size > 0 and np.isfinite(a.angles).all()
        agg = gr.aggregate(a, [x.specie.symbol for x in s], 0.5, 15.0)
        assert sum(v[0] for g in agg.values() for v in g.values()) == pytest.approx(a.total)
        assert set(agg["element"]) == {el.symbol for el in s.composition}


def test_feature_targets_are_first_order_feature_changes():
    """onset / edge_integral targets: w · δ predicts the change of the descriptor under a small δ."""
    from toolkit.data.spectra import edge_integral, onset_energy

    energy = np.linspace(0, 15, 301)
    y = bm.clean_spectrum(energy, 3.1, "octahedral", "sulfide")
    on = float(onset_energy(energy, y, 4.0))
    delta = 0.01 * np.sin(np.linspace(0, 7, 301)) + 0.004
    w, kind = gr.target_weights("onset", energy, y, on)
    assert kind == "onset" and float(onset_energy(energy, y + delta, 4.0)) - on == pytest.approx(w @ delta, rel=0.02)
    w, kind = gr.target_weights("edge_integral", energy, y, on)
    assert kind == "edge_integral"
    assert w @ (y - 2.0) == pytest.approx(edge_integral(energy, y, on), rel=1e-9)
    w, kind = gr.target_weights("onset", energy, np.zeros(301), float("nan"))
    assert kind == "window" and w == pytest.approx(np.full(301, 1 / 301))
    with pytest.raises(op.ExplainError, match="attribution_target"):
        op.options_from_config({"explain": {"attribution_target": "peak_9"}})


# ------------------------------------------------------------------------------------------ stage
def _outputs(run_dir: Path) -> dict[str, str]:
    names = ["edits.csv", "rejects.csv", "summary.csv", "attributions.json"]
    return {n: (op.explain_dir(run_dir) / n).read_text() for n in names}


def test_stage_outputs_and_report(reference):
    run_dir, summary = reference["run_dir"], reference["summary"]
    assert summary["complete"] and summary["n_materials"] == N_STRUCTURES and summary["n_shards"] == 3
    assert summary["n_edits"] > 50 and set(summary["edits_by_type"]) == set(op.EDIT_TYPES)
    assert summary["attribution"]["n_materials"] == N_STRUCTURES
    assert summary["attribution"]["completeness_error_max"] < 1e-3
    assert summary["attribution"]["target_kinds"] == {"window": N_STRUCTURES}
    assert op.is_complete(run_dir) and sharded.done_units("toolkit.explain.stage", run_dir, 3) == [0, 1, 2]
    edits = stage.read_table(op.edits_path(run_dir))
    assert len(edits) == summary["n_edits"]
    for r in edits:
        assert math.isfinite(float(r["delta_spectrum_mae"])) and math.isfinite(float(r["distance_ratio"]))
    rejects = stage.read_table(op.rejects_path(run_dir))
    assert all(": " in r["reason"] for r in rejects)
    rep = stage.explain_summary_for_report(run_dir)
    assert rep["available"] and rep["counts"]["n_edits"] == summary["n_edits"]
    assert rep["rejects"]["columns"] == ["reason", "count"]
    for key in ("effects", "attribution_elements", "attribution_bonds", "attribution_angles"):
        assert rep[key]["rows"] and set(rep[key]["rows"][0]) == set(rep[key]["columns"])
    assert len(rep["representatives"]) == 2 and rep["representatives"][0]["top_atoms"]
    # attribution maps: every representative's, drawn, indexed in summary.json, in the report
    assert len(summary["maps"]) == len(rep["representatives"]) == 2 and len(rep["maps"]) == len(summary["maps"])
    for mp in summary["maps"]:
        assert (op.explain_dir(run_dir) / mp["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(m["data_uri"].startswith("data:image/png;base64,") for m in rep["maps"])
    assert stage.explain_summary_for_report(run_dir.parent / "nowhere")["available"] is False


def test_attribution_map_geometry_reproduces_the_bonds(shared_data):
    """The map's bond vectors (neighbour image recovered from the recorded length) have the graph's
    lengths and point from the bond's first atom to an image of its second."""
    from pymatgen.io.vasp import Poscar

    from toolkit.data.graphs import structure_graph
    from toolkit.explain.maps import _image_vectors, attribution_map

    s = Poscar.from_file(str(shared_data / "paper_structures" / "POSCAR_AlPO4_mp-7848.vasp")).structure
    g = structure_graph(s)
    src, dst = g.edge_src.astype(np.int64), g.edge_dst.astype(np.int64)
    length = np.linalg.norm(g.edge_vec.astype(np.float64), axis=1)
    lat = s.lattice.matrix
    vec = _image_vectors(s.cart_coords, lat, src, dst, length)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), length, atol=1e-6)
    frac = np.linalg.solve(lat.T, (s.cart_coords[src] + vec - s.cart_coords[dst]).T).T  # a lattice translation
    np.testing.assert_allclose(frac, np.round(frac), atol=1e-6)
    rng = np.random.default_rng(0)
    rec = {"id": "x", "formula": s.composition.reduced_formula, "cluster": 0, "target_kind": "window",
           "atoms": [{"site": i, "element": sp.symbol, "attribution": float(rng.normal())} for i, sp in enumerate(s.species)],
           "bonds": {"src": src.tolist(), "dst": dst.tolist(), "length": length.tolist(),
                     "attribution": rng.normal(size=len(src)).tolist()},
           "angles": {"centre": [0, 1], "angle_deg": [100.0, 120.0], "attribution": [0.1, -0.2]},
           "target": 1.0, "baseline_target": 0.2, "total": 0.8}
    fig = attribution_map(rec, lat, s.frac_coords)
    # structure panel with at most the 40 strongest bonds (i->j and j->i drawn once), bar panel, colour bar
    assert len(fig.axes) == 3 and 0 < len(fig.axes[0].lines) <= min(40, len(src) - 1)


def test_resume_after_deleted_and_failed_shards_is_identical(prepared, reference, monkeypatch):
    run_dir = _run_dir(prepared, "resume")
    cfg = Cfg(prepared["cfg"], **OPTS)
    real = stage.explain_materials

    def dies_on_second_shard(materials, *a, **k):  # the job dies while shard 1 is being computed
        if materials[0]["id"] == json.loads(op.plan_path(run_dir).read_text())["ids"][OPTS["shard_size"]]:
            raise RuntimeError("killed")
        return real(materials, *a, **k)

    monkeypatch.setattr(stage, "explain_materials", dies_on_second_shard)
    with pytest.raises(stage.ExplainError, match="killed"):
        sharded.run_inline(stage, cfg, run_dir)
    monkeypatch.undo()
    assert sharded.done_units(stage, run_dir, 3) == [0, 2] and not op.is_complete(run_dir)
    assert not op.shard_file(run_dir, 1, "done.json").exists()
    stage.run(cfg, run_dir)
    assert _outputs(run_dir) == _outputs(reference["run_dir"])
    # a shard whose files were deleted (or whose record no longer matches them) is rebuilt, same result
    op.summary_path(run_dir).unlink()
    for kind in ("edits.csv", "attr.json"):
        op.shard_file(run_dir, 2, kind).unlink()
    op.shard_file(run_dir, 0, "rejects.csv").write_text("id\n")
    op.shard_file(run_dir, 1, "done.json").unlink()  # killed after writing its files, before its record
    assert sharded.done_units(stage, run_dir, 3) == []
    stage.run(cfg, run_dir)
    assert _outputs(run_dir) == _outputs(reference["run_dir"])
    # another option set is refused, naming what changed
    with pytest.raises(stage.ExplainError, match="options"):
        stage.plan(Cfg(prepared["cfg"], **{**OPTS, "strains": [0.01]}), run_dir)


def test_clusters_sampling_and_per_cluster_summary(prepared):
    run_dir = _run_dir(prepared, "clusters")
    ids = [str(x) for x in DatasetReader(prepared["dataset"]).ids]
    (run_dir / "analyze").mkdir()
    (run_dir / "analyze" / "clusters.csv").write_text(
        "id,formula,gcn_1,readout\n" + "".join(f"{m},X,0,{i % 2}\n" for i, m in enumerate(ids)))
    cfg = Cfg(prepared["cfg"], per_cluster=2, edits=["strain"], attribution=True, ig_steps=4, shard_size=3, seed=1)
    summary = stage.run(cfg, run_dir)
    plan = json.loads(op.plan_path(run_dir).read_text())
    assert plan["cluster_column"] == "readout" and sorted(plan["clusters"]) == [0, 0, 1, 1]
    assert all(ids.index(m) % 2 == c for m, c in zip(plan["ids"], plan["clusters"]))
    assert summary["n_edits"] == 4 * 4 and summary["edits_by_type"]["strain"] == 16
    table = stage.read_table(op.table_path(run_dir))
    assert {r["cluster"] for r in table} == {"all", "0", "1"}
    # attributions aggregated per cluster as well: the clusters' element sums add up to the dataset's
    attr = json.loads(op.attributions_path(run_dir).read_text())
    assert sorted(attr["by_cluster"]) == ["0", "1"] and all(v["n_materials"] == 2 for v in attr["by_cluster"].values())
    for row in attr["element"]:
        parts = [r["sum"] for v in attr["by_cluster"].values() for r in v["element"] if r["key"] == row["key"]]
        assert sum(parts) == pytest.approx(row["sum"], rel=1e-9, abs=1e-12)
    rep = stage.explain_summary_for_report(run_dir)["attribution_by_cluster"]
    assert [r["cluster"] for r in rep["rows"]] == ["0", "1"] and all(r["top element"] for r in rep["rows"])


# --------------------------------------------------------------------------------- planted rule
class RuleModel(nn.Module):
    """A hand-built model that follows the embedded benchmark's planted onset rule exactly (docs/benchmark.md):
    E0 = A[anion] + mean over cations of C[cation class] - 1.5 eV/Å (mean first-shell cation-anion bond - 2.4 Å),
    soft-clamped to [0.8, 9] eV; spectrum = the benchmark's clean spectrum (octahedral edge width/peaks).
    It reads only what a trained ALIGNN reads: atomic numbers and bond vectors of the GraphBatch."""

    def __init__(self, energy: np.ndarray):
        super().__init__()
        self.energy = torch.as_tensor(energy, dtype=torch.float64)
        a = torch.full((119,), float("nan"), dtype=torch.float64)
        c = torch.zeros(119, dtype=torch.float64)
        from pymatgen.core import Element

        for el, (cls, _) in bm.ANIONS.items():
            a[Element(el).Z] = bm.ONSET_ANION[cls]
        for (el, _), cls in bm.CATIONS.items():
            if c[Element(el).Z] == 0:
                c[Element(el).Z] = bm.ONSET_CATION[cls]
        self.a, self.c = a, c

    def forward(self, b):
        z = b.atomic_numbers
        anion = torch.isfinite(self.a[z])
        nb = b.num_graphs
        cnt_an = torch.zeros(nb, dtype=torch.float64).index_add_(0, b.atom_batch, anion.double())
        a_mean = torch.zeros(nb, dtype=torch.float64).index_add_(
            0, b.atom_batch, torch.where(anion, self.a[z], 0.0)) / cnt_an
        c_mean = torch.zeros(nb, dtype=torch.float64).index_add_(
            0, b.atom_batch, torch.where(anion, 0.0, self.c[z])) / (b.n_atoms.double() - cnt_an)
        src, dst = b.edge_index
        length = torch.linalg.vector_norm(b.edge_vec.double(), dim=1)
        sel = ~anion[src] & anion[dst]
        nearest = torch.full((z.shape[0],), float("inf"), dtype=torch.float64).scatter_reduce(
            0, src[sel], length[sel], reduce="amin")
        first = sel & (length <= 1.15 * nearest[src])
        g = b.atom_batch[src[first]]
        dbar = (torch.zeros(nb, dtype=torch.float64).index_add_(0, g, length[first])
                / torch.zeros(nb, dtype=torch.float64).index_add_(0, g, torch.ones_like(length[first])))
        e0 = torch.tensor([bm._soft_clamp(float(x), bm.ONSET_MIN, bm.ONSET_MAX) for x in
                           a_mean + c_mean - bm.BOND_SLOPE * (dbar - bm.BOND_REF)], dtype=torch.float64)
        return torch.stack([torch.as_tensor(bm.clean_spectrum(self.energy.numpy(), float(e), "octahedral", "oxide"))
                            for e in e0]).float()


def test_planted_rule_signs(tmp_path):
    """Counterfactual machinery vs the benchmark's planted drivers of the onset, on benchmark materials.

    Covers: edits -> production graph builder -> collate -> model -> descriptors -> shifts -> summary, with a
    model whose onset follows the planted rule exactly; the predicted shift must have the rule's sign for every
    planted driver, anion (A[anion]), cation class (C[class]), bond length (-1.5 eV/Å, via strain), and the
    rule's size within 0.02 eV + 2 %. Whether a *trained* ALIGNN learned the rule is
    test_trained_model_recovers_the_planted_drivers."""
    cfg = load_config(None, ["data.source=benchmark", "data.benchmark.n_materials=24", "data.grid.num=301",
                             "data.shard_size=24", "data.workers=1"])
    prepare.run(cfg, tmp_path)
    reader = DatasetReader(tmp_path / "dataset.zarr")
    mats = [{"row": i, "id": str(reader.ids[i]), "formula": "", "cluster": -1, "representative": False,
             "structure": ed.structure_from_record(reader.material(i))} for i in range(len(reader))]
    model = RuleModel(reader.energy)
    opts = op.ExplainOptions(edits=["cation_substitution", "anion_substitution", "strain"], rescale=False)
    rows, _rejects, originals = probe_rows(mats, model, cfg.graph, cfg.data, reader.energy, opts, torch.device("cpu"),
                                          None)
    # the model reproduces the benchmark's own onsets on the unedited structures
    # (except where a cation's class depends on its oxidation state, e.g. Sn2+/Sn4+: no graph shows that)
    classes: dict[str, set] = {}
    for (el, _), cls in bm.CATIONS.items():
        classes.setdefault(el, set()).add(cls)
    plain = [i for i, m in enumerate(mats) if all(len(classes.get(el.symbol, ())) <= 1
                                                   for el in m["structure"].composition)]
    assert len(plain) >= 20
    truth = reader.column("benchmark/onset")[plain]
    got = np.array([originals[mats[i]["id"]]["features"]["onset"] for i in plain])
    np.testing.assert_allclose(got, truth, atol=0.08)
    checked = {"anion": 0, "cation": 0, "bond_length": 0}
    for r in rows:
        d, det = r["delta_onset"], r["detail"]
        if not math.isfinite(d):
            continue
        if r["type"] == "strain":
            expect = -np.sign(det["strain"])
            key = "bond_length"
        elif r["type"] == "anion_substitution":
            expect = np.sign(bm.ONSET_ANION[bm.ANIONS[det["to"]][0]] - bm.ONSET_ANION[bm.ANIONS[det["from"]][0]])
            key = "anion"
        else:
            c_old, c_new = model.c[ed.Element(det["from"]).Z], model.c[ed.Element(det["to"]).Z]
            expect = np.sign(float(c_new - c_old))
            key = "cation"
        if expect == 0:
            assert abs(d) < 1e-6, r
            continue
        assert np.sign(d) == expect, r
        checked[key] += 1
    assert min(checked.values()) >= 5, checked
    # ... and in size: the rule's own shift of E0 for the edit (onset = E0 + a constant for one edge shape),
    # on materials whose onset stays in [2, 7.8] eV before and after, where the soft clamp is the identity within
    # 1 %. Tolerance 0.02 eV + 2 %: the onset is a threshold crossing interpolated on a 0.05 eV grid (error
    # < 0.01 eV on these edges) and the clamp's slope is >= 0.99 there.
    bond = dict(zip([str(x) for x in reader.ids], reader.column("benchmark/bond_length_mean")))
    sized = {"anion": 0, "cation": 0, "bond_length": 0}
    for r in rows:
        d, det = r["delta_onset"], r["detail"]
        base = originals[r["id"]]["features"]["onset"]
        if not (math.isfinite(d) and 2.0 <= base <= 7.8 and 2.0 <= base + d <= 7.8):
            continue
        comp = next(m["structure"] for m in mats if m["id"] == r["id"]).composition
        anions = sum(n for el, n in comp.items() if el.symbol in bm.ANIONS)
        if r["type"] == "strain":
            expect, key = -bm.BOND_SLOPE * det["strain"] * bond[r["id"]], "bond_length"
        elif r["type"] == "anion_substitution":
            expect = (bm.ONSET_ANION[bm.ANIONS[det["to"]][0]] - bm.ONSET_ANION[bm.ANIONS[det["from"]][0]]) \
                * comp[det["from"]] / anions
            key = "anion"
        else:
            dc = float(model.c[ed.Element(det["to"]).Z] - model.c[ed.Element(det["from"]).Z])
            expect, key = dc * comp[det["from"]] / (comp.num_atoms - anions), "cation"
        assert abs(d - expect) <= 0.02 + 0.02 * abs(expect), (r["type"], r["label"], r["id"], d, expect)
        sized[key] += 1
    assert min(sized.values()) >= 5, sized
    # the summary sentence: replacing O by S lowers the predicted onset, in every oxide where it was made
    table = stage.summarise([{**r, "detail": json.dumps(r["detail"]), "extrapolated": str(r["extrapolated"])}
                             for r in rows])
    o_s = next(t for t in table if t["label"] == "O->S" and t["feature"] == "onset" and t["cluster"] == "all")
    assert o_s["mean"] < 0 and o_s["n_same_sign"] == o_s["n"]
    assert o_s["sentence"].startswith("replacing O by S lowers the predicted onset by 1.")
    assert o_s["sentence"].endswith(f"eV in {o_s['n']} of {o_s['n']} materials")


@pytest.mark.slow
@pytest.mark.learning  # ~30 s on 2 idle cores, ~2.5 min on loaded ones: trains a small ALIGNN on the benchmark
def test_trained_model_recovers_the_planted_drivers(tmp_path):
    """The issue's bar on a *trained* model: train 1+1 layers, hidden 32 on 300 benchmark materials (30 epochs,
    onset R^2 ~0.99), then the counterfactual shifts of the predicted onset must have the planted rule's sign for
    every planted driver: anion (chalcogen swaps, sign of ΔA[anion], and size: see below), cation class (every
    substitution that changes C[class], sign of ΔC, and the pooled size) and bond length (uniform ±4 % strain: the onset at +4 % lies
    below the one at -4 %, mean over materials; the small model learns this slope only weakly, ~0.02 eV where the
    rule gives ~0.3 eV: explain reports that, the test does not hide it).
    Measured 2026-12-02: 70 of 70 cation pairs and every chalcogen pair agree in sign."""
    from toolkit.train import run as train

    cfg = load_config(None, [
        "data.source=benchmark", "data.benchmark.n_materials=300", "data.grid.num=151", "data.shard_size=100",
        "data.workers=1", "model.alignn_layers=1", "model.gcn_layers=1", "model.hidden_features=32",
        "model.embedding_features=16", "train.epochs=30", "train.batch_size=16", "train.learning_rate=0.003",
        "train.device=cpu", "train.progress=false"])
    prepare.run(cfg, tmp_path)
    out = train(cfg, tmp_path)
    assert out["onset_r2"] > 0.9, out
    stage.run(Cfg(cfg, sample_size=80, edits=["anion_substitution", "strain", "cation_substitution"],
                  attribution=False, rescale=False, strains=[-0.04, 0.04]), tmp_path)
    by: dict[tuple, list] = {}
    strained: dict[float, dict[str, float]] = {-0.04: {}, 0.04: {}}
    for r in stage.read_table(op.edits_path(tmp_path)):
        d = json.loads(r["detail"])
        if r["type"] == "strain":
            strained[d["strain"]][r["id"]] = float(r["delta_onset"])
            continue
        if r["type"] == "anion_substitution":
            key = ("anion", np.sign(bm.ONSET_ANION[bm.ANIONS[d["to"]][0]] - bm.ONSET_ANION[bm.ANIONS[d["from"]][0]]),
                   r["label"])
        else:
            dc = (bm.ONSET_CATION[bm.cation_class(d["to"], d["charge"])]
                  - bm.ONSET_CATION[bm.cation_class(d["from"], d["charge"])])
            key = ("cation_class", np.sign(dc), r["label"])
        if key[1] != 0 and math.isfinite(float(r["delta_onset"])):
            by.setdefault(key, []).append(float(r["delta_onset"]))
    wrong = [(k, float(np.mean(v)), len(v)) for k, v in by.items() if np.sign(np.mean(v)) != k[1]]
    assert {k[0] for k in by} == {"anion", "cation_class"}
    assert sum(k[0] == "cation_class" for k in by) >= 20 and sum(k[0] == "anion" for k in by) >= 6
    assert not wrong, wrong
    # size of the anion effect: the model sees anion identity and bond length together (the benchmark's sulfide
    # bonds are longer than its oxide bonds, and longer bonds lower the onset), so an unrescaled swap moves the
    # prediction by between the pure rule dA and the data-level difference dA - 1.5 eV/Å x (mean bond length of
    # the new anion class - of the old); accepted: within that band widened by 25 % (measured 2026-12-03: 11 of
    # the 12 swaps inside the band, e.g. O->S -2.07 eV between -1.5 (rule) and -2.21 (data level); S->Se -0.83
    # eV, 9 % beyond the data level -0.76)
    reader = DatasetReader(tmp_path / "dataset.zarr")
    cls = np.array([str(x) for x in np.asarray(reader.column("benchmark/anion")).tolist()])
    bl = np.asarray(reader.column("benchmark/bond_length_mean"), dtype=np.float64)
    dbar = {c: float(np.nanmean(bl[cls == c])) for c in set(cls.tolist())}
    sizes = {}
    for (kind, _, label), v in by.items():
        if kind != "anion":
            continue
        a, b = label.split("->")
        da = bm.ONSET_ANION[bm.ANIONS[b][0]] - bm.ONSET_ANION[bm.ANIONS[a][0]]
        ddata = da - bm.BOND_SLOPE * (dbar[bm.ANIONS[b][0]] - dbar[bm.ANIONS[a][0]])
        lo, hi = sorted((abs(da), abs(ddata)))
        sizes[label] = (round(float(np.mean(v)), 2), round(da, 2), round(ddata, 2))
        assert 0.75 * lo <= abs(float(np.mean(v))) <= 1.25 * hi and np.sign(ddata) == np.sign(da), sizes[label]
    print("anion swaps: (predicted, rule dA, data-level) onset shift, eV:", sizes)
    # size of the cation-class effect, pooled: the rule's shift of the mean cation shift C (dC x the share of
    # the cation sites replaced) against the predicted shift, by least squares through the origin
    row_of = {str(x): i for i, x in enumerate(reader.ids)}
    pred_c, rule_c = [], []
    for r in stage.read_table(op.edits_path(tmp_path)):
        if r["type"] != "cation_substitution" or not math.isfinite(float(r["delta_onset"])):
            continue
        d = json.loads(r["detail"])
        comp = ed.structure_from_record(reader.material(row_of[r["id"]])).composition
        cations = sum(n for el, n in comp.items() if el.symbol not in bm.ANIONS)
        dc = (bm.ONSET_CATION[bm.cation_class(d["to"], d["charge"])] - bm.ONSET_CATION[bm.cation_class(d["from"], d["charge"])])
        pred_c.append(float(r["delta_onset"]))
        rule_c.append(dc * comp[d["from"]] / cations)
    pred_c, rule_c = np.array(pred_c), np.array(rule_c)
    slope = float(pred_c @ rule_c / (rule_c @ rule_c))
    corr = float(np.corrcoef(pred_c, rule_c)[0, 1])
    print(f"cation substitutions: predicted = {slope:.2f} x rule (n = {len(pred_c)}, corr {corr:.2f})")
    # accepted: slope within 30 % of 1 and correlation >= 0.8. The substituted cation keeps the old one's bonds
    # (no rescale) while the model saw every class only with its own radii, and a class's shift is one of ~8
    # values learned from 300 materials (measured 2026-12-03: slope 0.87, corr 0.90, 333 substitutions)
    assert len(pred_c) >= 100 and 0.7 <= slope <= 1.3 and corr >= 0.8, (slope, corr, len(pred_c))
    # bond length: planted dE0/dd = -1.5 eV/Å, so the onset at +4 % strain lies below the onset at -4 % (the
    # material-wise difference; the small model's slope is weak, each mean alone is within ~0.01 eV of zero)
    both = sorted(set(strained[0.04]) & set(strained[-0.04]))
    up, down = np.array([strained[0.04][m] for m in both]), np.array([strained[-0.04][m] for m in both])
    ok = np.isfinite(up) & np.isfinite(down)
    assert ok.sum() >= 60 and np.mean(up[ok] - down[ok]) < 0, (np.mean(up[ok]), np.mean(down[ok]))


def test_report_compares_the_driver_ranking_with_the_counterfactuals(tmp_path):
    """The report's consistency table: a ranked family whose edits barely move the prediction is a
    correlation, a family the model responds to but the ranking misses is flagged, the rest agree; the
    section renders with the counterfactual tables, and says how to run explain when it is absent."""
    from toolkit.analyze import report

    drivers = {"onset": {"families": [{"family": "anion", "importance": 1.0}, {"family": "bonds", "importance": 0.4},
                                      {"family": "cation chemistry", "importance": 0.0}]}}
    effects = [{"type": "anion_substitution", "feature": "onset", "n": 10, "mean": -1.5},
               {"type": "strain", "feature": "onset", "n": 8, "mean": 0.02},
               {"type": "cation_substitution", "feature": "onset", "n": 4, "mean": 0.9},
               {"type": "strain", "feature": "edge_integral", "n": 8, "mean": 3.0}]
    rows = {r["edit"]: r for r in report.consistency(drivers, effects)}
    assert rows["anion_substitution"]["flag"] == "agree"
    assert rows["strain"]["flag"] == "correlation, not a learned cause" and rows["strain"]["n_edits"] == 8
    assert rows["cation_substitution"]["flag"] == "learned, not ranked"
    table = {"columns": ["type", "mean"], "rows": [{"type": "strain", "mean": 0.02}]}
    explain = {"available": True, "counts": {"n_materials": 3, "n_edits": 22, "n_rejects": 1, "n_extrapolated": 0},
               "headline": ["replacing S by Se lowers the predicted onset by 0.61 ± 0.12 eV in 3 of 3 materials"],
               "onset_effects": effects, "effects": table}
    page = report.explain_html(explain, drivers)
    assert "correlation, not a learned cause" in page and "replacing S by Se" in page and "22 edited" in page
    assert "spectrolens explain" in report.explain_html(None, drivers)
