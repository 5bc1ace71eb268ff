"""The fused CPU kernels (toolkit/model/kernels.py, csrc/) against their torch-op references: the
edge-gated aggregation (values and gradients on real graphs, float64 gradcheck with empty
neighbourhoods, bad graphs) and LayerNorm -> SiLU -> residual (float64 gradcheck, float32 at
realistic sizes, the conv without residual); the whole model, thread-count independence, the
prebuilt-library and off switches, a library missing a kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import paper_batch

from toolkit.config import ModelConfig
from toolkit.data.batch import GraphBatch
from toolkit.model import build_model
from toolkit.model import kernels as K

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def batch(shared_data: Path) -> GraphBatch:
    return paper_batch(shared_data, ["AlPO4_mp-7848", "BAsO4_mp-3277", "AlCuS2_mp-4979"])


def test_the_fused_kernel_builds_and_loads_here():
    status = K.kernel_status()
    assert status["fused"], f"the fused CPU kernel did not load: {status.get('reason')}"
    assert Path(str(status["path"])).is_file()


def _inputs(n: int, e: int, f: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(n, 4 * f, dtype=dtype, generator=gen).requires_grad_()  # es, bh, ed: strided column views
    mm = torch.randn(e, f, dtype=dtype, generator=gen).requires_grad_()
    gm = torch.randn(e, f, dtype=dtype, generator=gen)
    gh = torch.randn(n, f, dtype=dtype, generator=gen)
    return proj, mm, gm, gh


def _run(fn, g: K.TorchGraph, proj, mm, gm, gh):
    es, bh, ed, _ = proj.split(mm.shape[1], dim=1)
    m, h = fn(g, mm * 1.0, es, ed, bh)  # * 1.0: the reference adds into its input in place
    grads = torch.autograd.grad((m * gm).sum() + (h * gh).sum(), [proj, mm])
    return [m.detach(), h.detach(), *grads]


@pytest.mark.parametrize("which", ["atom graph", "line graph"])
def test_fused_equals_reference_on_real_graphs(batch, which):
    model = build_model(ModelConfig(alignn_layers=1, gcn_layers=1, hidden_features=32, embedding_features=16,
                                    output_features=8))
    g, lg, _, _ = model.prepare_graphs(batch)
    graph = g if which == "atom graph" else lg
    n = batch.atomic_numbers.shape[0] if which == "atom graph" else batch.edge_index.shape[1]
    e = graph.src.shape[0]
    args = _inputs(n, e, 64, torch.float32)
    fused, ref = _run(K.gate_aggregate, graph, *args), _run(K.gate_aggregate_reference, graph, *args)
    for name, a, b in zip(["m", "h", "grad proj", "grad mm"], fused, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), f"{which} {name}: max diff {(a - b).abs().max()}"


def test_gradcheck_float64_with_nodes_without_edges():
    # node 0 receives nothing, node 5 sends nothing, node 6 is isolated
    src = torch.tensor([1, 2, 3, 1, 4, 2, 0, 3, 0])
    dst = torch.tensor([1, 1, 2, 2, 2, 3, 4, 5, 5])
    g = K.torch_graph(src, dst, 7)
    gen = torch.Generator().manual_seed(1)
    mm = torch.randn(9, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    es, ed, bh = (torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c, d: K.gate_aggregate(g, a.clone(), b, c, d), (mm, es, ed, bh))
    # expanded (stride-0) output gradients, as from a plain sum
    m, h = K.gate_aggregate(g, mm.clone(), es, ed, bh)
    m_ref, h_ref = K.gate_aggregate_reference(g, mm.clone(), es, ed, bh)
    grads = torch.autograd.grad(m.sum() + h.sum(), [mm, es, ed, bh])
    grads_ref = torch.autograd.grad(m_ref.sum() + h_ref.sum(), [mm, es, ed, bh])
    assert all(torch.allclose(a, b) for a, b in zip(grads, grads_ref))
    _, h = K.gate_aggregate(g, mm.detach().clone(), es.detach(), ed.detach(), bh.detach())
    assert torch.equal(h[[0, 6]], torch.zeros(2, 3, dtype=torch.float64))  # empty sums: 0 / (0 + 1e-6)


def test_whole_model_fused_equals_reference(batch, monkeypatch):
    def step():
        torch.manual_seed(0)
        model = build_model(ModelConfig(alignn_layers=2, gcn_layers=2, hidden_features=64, embedding_features=16,
                                        output_features=40)).train()
        out = model(batch)
        out.square().mean().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    out_f, grads_f = step()
    monkeypatch.setattr(K, "load_extension", lambda: False)
    out_r, grads_r = step()
    assert torch.allclose(out_f, out_r, rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_r.keys() and len(grads_r) > 50
    for k in grads_r:
        assert torch.allclose(grads_f[k], grads_r[k], rtol=1e-4, atol=1e-6), k


def test_result_does_not_depend_on_the_thread_count(batch):
    model = build_model(ModelConfig(alignn_layers=1, gcn_layers=0, hidden_features=32, embedding_features=16,
                                    output_features=8))
    _, lg, _, _ = model.prepare_graphs(batch)
    args = _inputs(batch.edge_index.shape[1], lg.src.shape[0], 48, torch.float32, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(K.gate_aggregate, lg, *args)
        torch.set_num_threads(2)
        two = _run(K.gate_aggregate, lg, *args)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)  # every output row has one writer, summed in edge order


def test_bf16_runs_the_reference_path():
    g = K.torch_graph(torch.tensor([0, 1]), torch.tensor([1, 1]), 2)
    assert g.in_ptr is not None  # built for the kernel, but the kernel takes float32/float64 only
    x = torch.randn(2, 4).bfloat16()
    mm = torch.randn(2, 4).bfloat16()
    m, h = K.gate_aggregate(g, mm.clone(), x, x, x)
    m_ref, h_ref = K.gate_aggregate_reference(g, mm.clone(), x, x, x)
    assert m.dtype == torch.bfloat16 and h.dtype == torch.float32  # sums accumulated in fp32
    assert torch.equal(m, m_ref) and torch.equal(h, h_ref)


def test_edges_not_sorted_by_destination_are_refused():
    with pytest.raises(ValueError, match="sorted by destination"):
        K.torch_graph(torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]), 3)


def _status_in_subprocess(env: dict[str, str]) -> dict:
    code = ("import json, torch; from toolkit.model import kernels as K; s = K.kernel_status(); "
            "g = K.torch_graph(torch.tensor([0, 1]), torch.tensor([1, 1]), 2); x = torch.ones(2, 3); "
            "m, h = K.gate_aggregate(g, torch.zeros(2, 3), x, x, x); s['h'] = h.tolist(); "
            "a = torch.linspace(-2, 3, 12).reshape(3, 4).requires_grad_(); ln = torch.nn.LayerNorm(4); "
            "out = K.layer_norm_silu(ln, a, a.flip(0), a.flip(1)); s['ln'] = out.tolist(); "
            "s['ln_kernel'] = type(out.grad_fn).__name__ == '_LayerNormSiLUBackward'; print(json.dumps(s))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_prebuilt_library_from_the_environment_and_the_off_switch(tmp_path):
    built = K.kernel_status()["path"]
    # a container: the library prebuilt at image build time; nothing may be built at run time
    ro = tmp_path / "readonly"
    ro.mkdir()
    s = _status_in_subprocess({"SPECTROLENS_KERNEL_LIB": str(built), "TORCH_EXTENSIONS_DIR": str(ro)})
    assert s["fused"] and s["path"] == str(built)
    assert not any(ro.iterdir())  # nothing compiled there
    off = _status_in_subprocess({"SPECTROLENS_FUSED_KERNELS": "0"})
    assert not off["fused"] and "SPECTROLENS_FUSED_KERNELS=0" in off["reason"]
    # both paths give node 1 the same gated mean of its two in-edges
    assert s["h"][1] == pytest.approx(off["h"][1], rel=1e-6) and s["h"][1] == pytest.approx([1.0] * 3, rel=1e-5)
    assert s["h"][0] == off["h"][0] == [0.0] * 3  # node 0 receives no edge
    # the LayerNorm -> SiLU -> residual kernel: in the prebuilt library too, switched off with the other
    assert s["ln_kernel"] and not off["ln_kernel"]
    assert torch.allclose(torch.tensor(s["ln"]), torch.tensor(off["ln"]), rtol=1e-5, atol=1e-6)


# ---- LayerNorm -> SiLU -> residual (csrc/layer_norm_silu.cpp) ----------------------------------


def _norm(f: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.LayerNorm:
    """A LayerNorm with non-default affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    ln = torch.nn.LayerNorm(f, dtype=dtype)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(f, dtype=dtype, generator=gen))
        ln.bias.copy_(0.3 * torch.randn(f, dtype=dtype, generator=gen))
    return ln


def _ln_inputs(rows: int, f: int, dtype: torch.dtype, seed: int = 0):
    """a: a strided column view (as the node projections' ux), b, residual, and an output gradient."""
    gen = torch.Generator().manual_seed(seed)
    a = (2 * torch.randn(rows, 3 * f, dtype=dtype, generator=gen) + 0.5)[:, f: 2 * f].detach().requires_grad_()
    b, r = (torch.randn(rows, f, dtype=dtype, generator=gen).requires_grad_() for _ in range(2))
    return a, b, r, torch.randn(rows, f, dtype=dtype, generator=gen)


def _ln_run(fn, ln, a, b, r, g):
    out = fn(ln, a, b, r)
    wrt = [t for t in (a, b, r) if t is not None] + [ln.weight, ln.bias]
    return [out.detach(), *torch.autograd.grad((out * g).sum(), wrt)], type(out.grad_fn).__name__


@pytest.mark.parametrize("with_b, with_residual", [(True, True), (False, True), (True, False), (False, False)])
def test_layer_norm_silu_gradcheck_float64(with_b, with_residual):
    a, b, r, _ = _ln_inputs(9, 6, torch.float64, seed=2)
    ln = _norm(6, torch.float64, seed=2)
    w, c = ln.weight.detach().clone().requires_grad_(), ln.bias.detach().clone().requires_grad_()
    del ln.weight, ln.bias  # plain tensors in their place, so gradcheck can vary them

    def fn(a, b, r, w, c):
        ln.weight, ln.bias = w, c
        out = K.layer_norm_silu(ln, a, b if with_b else None, r if with_residual else None)
        assert type(out.grad_fn).__name__ == "_LayerNormSiLUBackward"  # the kernel ran
        return out

    assert torch.autograd.gradcheck(fn, (a, b, r, w, c))


@pytest.mark.parametrize("rows, f", [(5000, 256), (3001, 128), (70, 64)])
def test_layer_norm_silu_float32_equals_reference(rows, f):
    ln = _norm(f, torch.float32, seed=rows)
    args = _ln_inputs(rows, f, torch.float32, seed=rows)
    fused, kind = _ln_run(K.layer_norm_silu, ln, *args)
    ref, _ = _ln_run(K.layer_norm_silu_reference, ln, *args)
    assert kind == "_LayerNormSiLUBackward"
    for name, x, y in zip(["out", "grad a", "grad b", "grad residual", "grad weight", "grad bias"], fused, ref):
        scale = float(y.abs().max())
        assert float((x - y).abs().max()) <= 1e-5 * max(scale, 1.0), f"{name}: max diff {(x - y).abs().max()}"


def test_layer_norm_silu_without_b_or_residual_and_the_conv_updates():
    ln = _norm(32, torch.float32)
    a, b, r, g = _ln_inputs(100, 32, torch.float32, seed=5)
    for bb, rr in [(None, r), (b, None), (None, None)]:
        fused, kind = _ln_run(K.layer_norm_silu, ln, a, bb, rr, g)
        ref, _ = _ln_run(K.layer_norm_silu_reference, ln, a, bb, rr, g)
        assert kind == "_LayerNormSiLUBackward"
        assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-5) for x, y in zip(fused, ref))
    # EdgeGatedGraphConv without the residual: x' = SiLU(LN(W_su x + h)), y' = SiLU(LN(m))
    from toolkit.model.alignn import EdgeGatedGraphConv

    torch.manual_seed(0)
    conv = EdgeGatedGraphConv(16, 16, residual=False)
    gr = K.torch_graph(torch.tensor([0, 2, 1, 0]), torch.tensor([0, 1, 1, 2]), 3)
    x, y = torch.randn(3, 16), torch.randn(4, 16)
    x_new, y_new = conv(gr, x, y)
    es, bh, ed, ux = conv.node_projections(x)
    m, h = K.gate_aggregate_reference(gr, y @ conv.edge_gate.weight.t(), es, ed, bh)
    assert torch.allclose(x_new, torch.nn.functional.silu(conv.bn_nodes(ux + h)), atol=1e-5)
    assert torch.allclose(y_new, torch.nn.functional.silu(conv.bn_edges(m)), atol=1e-5)


def test_layer_norm_silu_does_not_depend_on_the_thread_count():
    ln = _norm(48, torch.float32, seed=7)
    args = _ln_inputs(1000, 48, torch.float32, seed=7)  # 16 blocks of 64 rows, the last one partial
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = _ln_run(K.layer_norm_silu, ln, *args)
        torch.set_num_threads(2)
        two, _ = _ln_run(K.layer_norm_silu, ln, *args)
    finally:
        torch.set_num_threads(before)
    for x, y in zip(one, two):
        assert torch.equal(x, y)  # rows independent; weight/bias sums per fixed block, then in block order


def test_layer_norm_silu_under_bf16_autocast_runs_the_reference():
    ln = _norm(8, torch.float32)
    a = torch.randn(4, 8).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = K.layer_norm_silu(ln, a, a, a)
        ref = K.layer_norm_silu_reference(ln, a, a, a)
    assert type(out.grad_fn).__name__ != "_LayerNormSiLUBackward"
    assert torch.equal(out, ref)


def test_a_library_without_every_kernel_is_refused(monkeypatch):
    """A prebuilt library from older sources (gate kernel only): the reference paths run, and the
    reason says so."""
    assert K.load_extension()
    monkeypatch.setattr(K, "_state", {})
    monkeypatch.setattr(K, "_OPS", (*K._OPS, "not_built_yet"))
    assert not K.load_extension()
    assert "lacks not_built_yet" in K.kernel_status()["reason"]
