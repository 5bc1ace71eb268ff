"""The DGL backend (model.backend: dgl) against the torch backend and against upstream's own DGL
model (alignn.models.alignn_atomwise.ALIGNNAtomWise, the class the study trained), on real
structures, on CPU where dgl 2.1.0 imports (through toolkit.compat.dgl's shim)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import paper_batch

from toolkit.compat.dgl import dgl_available, to_dgl
from toolkit.config import ModelConfig
from toolkit.data.batch import GraphBatch
from toolkit.model import build_model

pytestmark = [pytest.mark.dgl,
              pytest.mark.skipif(not dgl_available(), reason="dgl 2.1.0 not importable (test-only dependency)")]

KW = dict(alignn_layers=2, gcn_layers=2, hidden_features=48, embedding_features=16, output_features=30)


@pytest.fixture(scope="module")
def batch(shared_data: Path) -> GraphBatch:
    """Real structures through the production graph builder + collate; the line graph is then
    replaced by DGL's own ``line_graph(shared=True)`` so all models see one graph."""
    b = paper_batch(shared_data, ["AlPO4_mp-7848", "AlCuS2_mp-4979", "Ag2AsS2_mp-1197575"])
    _, lg = to_dgl(b)
    s, d = lg.edges()
    b.line_index = torch.stack([s.long(), d.long()])
    return b


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(**KW)
    ours = build_model(cfg).eval()
    with torch.no_grad():  # non-default LayerNorm affines too
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dgl_model = build_model(cfg.model_copy(update={"backend": "dgl"})).eval()
    dgl_model.load_state_dict(ours.state_dict(), strict=True)
    return ours, dgl_model


def test_same_module_tree_and_predictions(batch):
    ours, dgl_model = _pair()
    assert list(ours.state_dict()) == list(dgl_model.state_dict())
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in dgl_model.named_modules()]
    with torch.no_grad():
        a, b = ours(batch), dgl_model(batch)
    assert a.shape == (3, 30) and a.std() > 1e-3
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_gradients_match(batch):
    ours, dgl_model = _pair(1)
    ours.train(), dgl_model.train()
    ours(batch).square().sum().backward()
    dgl_model(batch).square().sum().backward()
    other = dict(dgl_model.named_parameters())
    for n, p in ours.named_parameters():
        if p.grad is None:
            assert other[n].grad is None, n
            continue
        torch.testing.assert_close(other[n].grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.upstream
def test_matches_upstream_dgl_alignn_atomwise(batch):
    from toolkit.compat.dgl import import_dgl

    import_dgl()
    up_mod = pytest.importorskip("alignn.models.alignn_atomwise")
    ours, dgl_model = _pair(2)
    up = up_mod.ALIGNNAtomWise(up_mod.ALIGNNAtomWiseConfig(
        name="alignn_atomwise", atom_input_features=92, calculate_gradient=False, energy_mult_natoms=False,
        **KW)).eval()
    up.load_state_dict(ours.state_dict(), strict=True)
    g, lg = to_dgl(batch)
    with torch.no_grad():
        ref = up((g, lg, None))["out"]
        torch.testing.assert_close(ours(batch), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dgl_model(batch), ref, rtol=1e-5, atol=1e-5)


def test_upstream_checkpoint_loads_into_either_backend(tmp_path, batch):
    import json

    from toolkit.model import load_upstream_checkpoint

    ours, _ = _pair(3)
    pt, cfgp = tmp_path / "best_model.pt", tmp_path / "config.json"
    torch.save(ours.state_dict(), pt)
    cfgp.write_text(json.dumps({"atom_features": "cgcnn", "model": dict(name="alignn_atomwise", atom_input_features=92,
                                                                         **KW)}))
    m_torch, cfg = load_upstream_checkpoint(pt, cfgp)
    m_dgl, cfg_dgl = load_upstream_checkpoint(pt, cfgp, backend="dgl")
    assert cfg.backend == "torch" and cfg_dgl.backend == "dgl" and type(m_dgl).__name__ == "ALIGNNDGL"
    with torch.no_grad():
        torch.testing.assert_close(m_dgl(batch), m_torch(batch), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m_torch(batch), ours(batch), rtol=0, atol=0)
