"""The pure-torch ALIGNN on real structures (../shared/data/paper_structures) through the real
graph builder and collate: shapes and names (the embed/train contract), invariances, hooks,
bf16 autocast, torch.compile tracing, learning, and safe checkpoint I/O."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytest
import torch

from toolkit.config import ModelConfig, load_config
from toolkit.data.batch import GraphBatch
from toolkit.data.graphs import structure_graph
from toolkit.data.loader import collate
from toolkit.model import (CheckpointError, build_model, capture_modules, layer_names, load_state_dict_file,
                           save_state_dict_file)

SMALL = dict(alignn_layers=2, gcn_layers=2, hidden_features=32, embedding_features=16, output_features=24)


def batch_of(structures: list, first_index: int = 0) -> GraphBatch:
    """GraphBatch of pymatgen structures via the production graph builder and collate."""
    items = []
    for i, s in enumerate(structures):
        g = structure_graph(s)
        items.append(dict(numbers=g.numbers, edge_src=g.edge_src, edge_dst=g.edge_dst, edge_vec=g.edge_vec,
                          index=first_index + i, id=f"s{first_index + i}"))
    return collate(items)


@pytest.fixture(scope="module")
def structures(shared_data: Path) -> list:
    from pymatgen.core import Structure

    names = ["AlPO4_mp-7848", "BAsO4_mp-3277", "AlCuS2_mp-4979", "AgNO3_mp-552185"]  # small cells: fast
    files = [shared_data / "paper_structures" / f"POSCAR_{n}.vasp" for n in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_file(f) for f in files]


@pytest.fixture(scope="module")
def batch(structures) -> GraphBatch:
    return batch_of(structures)


def small_model(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**SMALL, **kw})).eval()


def test_output_shape_and_upstream_names(batch):
    cfg = load_config(None).model  # defaults: the study's 4 + 4 layers, hidden 256, embedding 64
    model = build_model(cfg, output_features=1501).eval()
    with torch.no_grad():
        out = model(batch)
    assert out.shape == (batch.num_graphs, 1501) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    sd = model.state_dict()
    for key, shape in {"atom_embedding.layer.0.weight": (256, 92), "edge_embedding.0.centers": (80,),
                       "edge_embedding.1.layer.0.weight": (64, 80), "angle_embedding.0.centers": (40,),
                       "angle_embedding.2.layer.1.weight": (256,),
                       "alignn_layers.3.edge_update.edge_gate.weight": (256, 256),
                       "alignn_layers.0.node_update.bn_nodes.bias": (256,),
                       "gcn_layers.3.dst_update.weight": (256, 256), "fc.weight": (1501, 256)}.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any("atom_features" in k or "running" in k for k in sd)  # lookup table is not saved
    assert sd["edge_embedding.0.centers"][-1] == 8.0 and sd["angle_embedding.0.centers"][0] == -1.0
    with pytest.raises(ValueError, match="output_features"):
        build_model(cfg)  # no grid length known


def test_graph_order_and_batch_composition_do_not_matter(structures, batch):
    model = small_model()
    with torch.no_grad():
        ref = model(batch)
        # bonds and angles shuffled (line graph remapped accordingly)
        gen = torch.Generator().manual_seed(1)
        pe = torch.randperm(batch.edge_index.shape[1], generator=gen)
        inv = torch.empty_like(pe)
        inv[pe] = torch.arange(pe.numel())
        li = inv[batch.line_index][:, torch.randperm(batch.line_index.shape[1], generator=gen)]
        shuffled = GraphBatch(**{**batch.__dict__, "edge_index": batch.edge_index[:, pe],
                                 "edge_vec": batch.edge_vec[pe], "line_index": li})
        torch.testing.assert_close(model(shuffled), ref, rtol=1e-5, atol=1e-5)
        # each material alone, and in reversed order, gives its own row
        for i, s in enumerate(structures):
            torch.testing.assert_close(model(batch_of([s]))[0], ref[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(batch_of(structures[::-1])), ref.flip(0), rtol=1e-5, atol=1e-5)
    assert (ref[0] - ref[1]).abs().max() > 1e-4  # different materials, different predictions


def test_capture_modules_hooks_see_layer_outputs(batch):
    model = small_model(alignn_layers=2, gcn_layers=3)
    names = layer_names(model)
    assert names == ["alignn_1", "alignn_2", "gcn_1", "gcn_2", "gcn_3", "readout"]
    mods = capture_modules(model)
    assert list(mods) == names and mods["gcn_2"] is model.gcn_layers[1] and mods["readout"] is model.readout
    seen: dict[str, object] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, out)) for n, m in mods.items()]
    with torch.no_grad():
        out = model(batch)
    for h in handles:
        h.remove()
    A, E, H = batch.atomic_numbers.shape[0], batch.edge_index.shape[1], 32
    x, y, z = seen["alignn_2"]
    assert x.shape == (A, H) and y.shape == (E, H) and z.shape == (batch.line_index.shape[1], H)
    gx, gy = seen["gcn_3"]
    assert gx.shape == (A, H) and gy.shape == (E, H)
    pooled = seen["readout"]
    assert pooled.shape == (batch.num_graphs, H)
    # readout = mean of the last layer's atom features per material, and fc(readout) is the output
    mean0 = gx[batch.atom_batch == 0].mean(0)
    torch.testing.assert_close(pooled[0], mean0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.fc(pooled), out, rtol=1e-5, atol=1e-6)
    # the same through a DDP-style wrapper (.module)
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert capture_modules(wrapper) == mods and layer_names(wrapper) == names


def test_bf16_autocast_runs_with_fp32_sums(batch):
    model = small_model()
    with torch.no_grad():
        ref = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(batch)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05
    # and a training step under autocast gives finite fp32 gradients
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch).float().square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    # as upstream, the last layer's bond (gcn) and angle (alignn) features feed nothing
    unused = {n for n, g in grads.items() if g is None}
    assert unused == {"gcn_layers.1.bn_edges.weight", "gcn_layers.1.bn_edges.bias",
                      "alignn_layers.1.edge_update.bn_edges.weight", "alignn_layers.1.edge_update.bn_edges.bias"}
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values() if g is not None)


def test_forward_traces_without_graph_breaks(batch):
    import torch._dynamo as dynamo

    model = small_model()
    dynamo.reset()
    explanation = dynamo.explain(model)(batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    dynamo.reset()


def test_a_few_steps_reduce_the_loss(batch):
    model = small_model(seed=3).train()
    target = torch.linspace(-1, 1, 24).expand(batch.num_graphs, 24) * torch.arange(1, batch.num_graphs + 1)[:, None]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.l1_loss(model(batch), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_no_alignn_layers_and_single_atom_structure():
    from pymatgen.core import Lattice, Structure

    po = Structure(Lattice.cubic(3.35), ["Po"], [[0, 0, 0]])  # one atom: every bond is to its own images
    b = batch_of([po])
    for kw in (dict(alignn_layers=0), dict(gcn_layers=0), {}):
        with torch.no_grad():
            out = small_model(**kw)(b)
        assert out.shape == (1, 24) and torch.isfinite(out).all()


def test_state_dict_file_roundtrip_and_refusals(tmp_path, batch):
    model = small_model(seed=5)
    path = tmp_path / "ck" / "model.pt"
    save_state_dict_file({"model": model.state_dict(), "epoch": 3, "note": "x"}, path)
    assert not list(path.parent.glob(".*tmp*"))  # atomic: no temporary left behind
    loaded = load_state_dict_file(path)
    assert loaded["epoch"] == 3
    other = small_model(seed=6)
    other.load_state_dict(loaded["model"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(other(batch), model(batch))

    evil = tmp_path / "evil.pt"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1)}, evil)  # needs unpickling
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_state_dict_file(evil)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict_file(tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_state_dict_file(broken)
    with pytest.raises(ValueError, match="CGCNN"):
        build_model(ModelConfig(**{**SMALL, "atom_input_features": 10}))
