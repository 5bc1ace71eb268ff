"""Parity with upstream ALIGNN (alignn==2026.8.11, test-only dependency).

Upstream's pure-torch ALIGNNAtomWisePure (same parameter names/shapes as ALIGNNAtomWise, which
the study trained) is built with the study's hyperparameters, its weights are copied into ours
with load_state_dict(strict=True), and both get the SAME graphs of real structures
(../shared/data/paper_structures), built by upstream's own graph builder.
Also: load_upstream_checkpoint on real upstream-format files (best_model.pt + config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from toolkit.compat.upstream import STUDY, graphbatch_from_upstream, upstream_graph_pairs, upstream_pure_model
from toolkit.config import ModelConfig
from toolkit.model import build_model, load_upstream_checkpoint
from toolkit.model.checkpoint import CheckpointError, load_matching, upstream_graph_config, upstream_state_dict

pytestmark = pytest.mark.upstream
alignn_pure = pytest.importorskip("alignn.models.alignn_atomwise_pure")

@pytest.fixture(scope="module")
def poscars(shared_data: Path) -> list[Path]:
    """Six of the study's structures (small cells, 6-10 atoms, keep the test fast)."""
    names = ["AlPO4_mp-7848", "AlSbO4_mp-676861", "AlCuSe2_mp-8016", "Ba(SbO3)2_mp-9127", "Al2O3_mp-1143",
             "Ba(CuO)2_mp-7374"]
    files = [shared_data / "paper_structures" / f"POSCAR_{n}.vasp" for n in names]
    assert all(f.is_file() for f in files), "paper_structures should hold the study's POSCARs"
    return files


@pytest.fixture(scope="module")
def pairs(poscars):
    return upstream_graph_pairs(poscars)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-default LayerNorm affine parameters too, so a swapped name would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def test_upstream_weights_load_strict_and_predict_the_same(pairs):
    torch.manual_seed(0)
    up = upstream_pure_model(**STUDY).eval()
    _randomize(up)
    ours = build_model(ModelConfig(**{k: v for k, v in STUDY.items()})).eval()
    ours.load_state_dict(upstream_state_dict(up.state_dict()), strict=True)
    assert set(ours.state_dict()) == set(up.state_dict()) - {"_species_table"}

    from alignn.torch_graph_builder import batch_torch_graph_pairs

    with torch.no_grad():
        ref = up(batch_torch_graph_pairs(pairs) + (None,))["out"]
        got = ours(graphbatch_from_upstream(pairs))
    assert got.shape == (len(pairs), 1501) and ref.shape == got.shape
    assert torch.isfinite(got).all()
    assert ref.std() > 1e-3  # a non-trivial comparison
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    # one structure alone gives the same row as inside the batch (graphs are independent)
    with torch.no_grad():
        one = ours(graphbatch_from_upstream(pairs[2:3]))
    torch.testing.assert_close(one[0], got[2], rtol=1e-5, atol=1e-5)


def test_gradients_match_upstream(pairs):
    torch.manual_seed(1)
    kw = dict(STUDY, alignn_layers=2, gcn_layers=1, hidden_features=64, output_features=16)
    up = upstream_pure_model(**kw).train()
    ours = build_model(ModelConfig(**kw)).train()
    ours.load_state_dict(upstream_state_dict(up.state_dict()), strict=True)
    from alignn.torch_graph_builder import batch_torch_graph_pairs

    sub = pairs[:3]
    up(batch_torch_graph_pairs(sub) + (None,))["out"].square().sum().backward()
    ours(graphbatch_from_upstream(sub)).square().sum().backward()
    up_grads = dict(up.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, up_grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def _write_upstream_run(tmp_path: Path, model: torch.nn.Module, model_section: dict) -> tuple[Path, Path]:
    """best_model.pt + config.json exactly as upstream's train.py writes them."""
    from alignn.config import TrainingConfig

    pt = tmp_path / "best_model.pt"
    torch.save(model.state_dict(), pt)
    tc = TrainingConfig(model=model_section, atom_features="cgcnn")
    cfgp = tmp_path / "config.json"
    cfgp.write_text(json.dumps(tc.model_dump(mode="json"), indent=4))  # upstream: config.dict()
    return pt, cfgp


def test_load_upstream_checkpoint_from_files(tmp_path, pairs):
    torch.manual_seed(2)
    kw = dict(STUDY, alignn_layers=1, gcn_layers=1, hidden_features=32, output_features=20)
    up = upstream_pure_model(**kw).eval()
    _randomize(up, 3)
    section = dict(name="alignn_atomwise", calculate_gradient=False, **kw)
    pt, cfgp = _write_upstream_run(tmp_path, up, section)
    model, cfg = load_upstream_checkpoint(pt, cfgp)
    assert (cfg.alignn_layers, cfg.gcn_layers, cfg.hidden_features, cfg.output_features) == (1, 1, 32, 20)
    gcfg = upstream_graph_config(cfgp)  # upstream TrainingConfig defaults: k-nearest, 12 neighbours
    assert gcfg.max_neighbors == 12 and gcfg.cutoff == json.loads(cfgp.read_text())["cutoff"]
    with pytest.raises(CheckpointError, match="neighbor_strategy"):
        upstream_graph_config({"neighbor_strategy": "radius_graph", "cutoff": 5.0})
    from alignn.torch_graph_builder import batch_torch_graph_pairs

    with torch.no_grad():
        ref = up(batch_torch_graph_pairs(pairs) + (None,))["out"]
        got = model(graphbatch_from_upstream(pairs))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_classic_alignn_checkpoint_is_refused(tmp_path, monkeypatch):
    import alignn.models.alignn as classic_mod
    from alignn.models.alignn import ALIGNN as Classic, ALIGNNConfig

    if classic_mod.AvgPooling is None:  # dgl not importable here: the pooling has no parameters,
        monkeypatch.setattr(classic_mod, "AvgPooling", torch.nn.Identity)  # so the state_dict is the same

    kw = dict(alignn_layers=1, gcn_layers=1, hidden_features=32, output_features=20)
    classic = Classic(ALIGNNConfig(name="alignn", **kw))
    pt, cfgp = _write_upstream_run(tmp_path, classic, dict(name="alignn", **kw))
    with pytest.raises(CheckpointError, match="BatchNorm"):
        load_upstream_checkpoint(pt, cfgp)
    # even when the config claims atomwise, the BatchNorm statistics in the weights give it away
    cfgp.write_text(json.dumps({"model": dict(name="alignn_atomwise", **kw, atom_input_features=92)}))
    with pytest.raises(CheckpointError, match="running statistics"):
        load_upstream_checkpoint(pt, cfgp)


def test_mismatched_config_is_refused_with_reason(tmp_path):
    kw = dict(STUDY, alignn_layers=1, gcn_layers=1, hidden_features=32, output_features=20)
    up = upstream_pure_model(**kw)
    pt, cfgp = _write_upstream_run(tmp_path, up, dict(name="alignn_atomwise", **dict(kw, hidden_features=48)))
    with pytest.raises(CheckpointError, match=r"best_model.pt.*shape/value mismatch"):
        load_upstream_checkpoint(pt, cfgp)
    cfgp.write_text(json.dumps({"model": dict(name="alignn_atomwise", **kw, extra_features=4)}))
    with pytest.raises(CheckpointError, match="extra_features"):
        load_upstream_checkpoint(pt, cfgp)
    cfgp.write_text(json.dumps({"model": dict(name="ealignn_atomwise", **kw)}))
    with pytest.raises(CheckpointError, match="not supported"):
        load_upstream_checkpoint(pt, cfgp)
    # a whole pickled model object (not a state_dict) would need arbitrary unpickling: refused
    torch.save(up, pt)
    cfgp.write_text(json.dumps({"model": dict(name="alignn_atomwise", **kw)}))
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_upstream_checkpoint(pt, cfgp)
    # same shapes, other bond-length RBF range: the centres buffer gives it away
    other = build_model(ModelConfig(**kw, cutoff=6.0))
    with pytest.raises(CheckpointError, match="RBF centres"):
        load_matching(other, upstream_state_dict(up.state_dict()))
