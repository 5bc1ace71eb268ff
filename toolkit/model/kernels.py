"""Fused CPU kernels of :class:`~toolkit.model.alignn.EdgeGatedGraphConv` (and of the embeddings'
``MLPLayer``), and their reference paths in torch ops.

**Edge-gated aggregation.** For the edges ``k = (u -> v)`` of a graph, from the edge-gate product
``mm`` (E, F) and the node projections ``es``, ``ed``, ``bh`` (N, F)::

    m_k = mm_k + es_u + ed_v
    s_k = sigmoid(m_k)
    h_v = sum_k s_k * bh_u / (sum_k s_k + 1e-6)

:func:`gate_aggregate` returns ``(m, h)``. On CPU tensors of float32/float64 it runs the C++ kernel
in ``csrc/gate_aggregate.cpp``: one pass over the edges forward and two backward, where the torch-op
path makes about fifteen full passes over (E, F) arrays forward and twenty backward (gathers,
elementwise ops, scatter-sums). Elsewhere (CUDA, bf16 autocast) it runs :func:`gate_aggregate_reference`.

**LayerNorm -> SiLU -> residual.** The node and edge updates::

    out = residual + silu(layer_norm(a + b))

:func:`layer_norm_silu` (``b`` and ``residual`` optional) runs ``csrc/layer_norm_silu.cpp`` on CPU
float32/float64: one pass over the rows forward and one backward, recomputing the normalised values
and the SiLU from the inputs and the per-row mean and 1/std (the only things it stores), where
the torch ops make about ten passes forward and keep one or two more (rows, F) arrays for backward.
Elsewhere it runs :func:`layer_norm_silu_reference`.

Both kernels compute the same maths as their references; tests/test_kernels.py checks values and
gradients against each other.

The kernels are one library, compiled on first use with ``torch.utils.cpp_extension`` (a few
seconds; needs a C++ compiler and ninja), into ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``). Container images build it at image build time and name the library in
``$SPECTROLENS_KERNEL_LIB`` (read-only images cannot build at run time). Its inner loops are compiled
for x86-64-v4 (AVX-512), v3 (AVX2) and baseline, chosen at run time, so one build serves every node
of a cluster. If it cannot be built (or a prebuilt library lacks one of the kernels), a warning names
the reason and the reference paths run. ``SPECTROLENS_FUSED_KERNELS=0`` turns both kernels off.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn import functional as F

log = logging.getLogger(__name__)

# Added to the per-node gate sum before dividing (upstream's value; the C++ kernel uses the same).
GATE_EPS = 1e-6
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / "gate_aggregate.cpp", _CSRC / "layer_norm_silu.cpp"]  # + common.h (ninja tracks it)
_OPS = ("gate_forward", "gate_backward", "ln_silu_forward", "ln_silu_backward")
_lock = threading.Lock()
_state: dict[str, object] = {}


def segment_sum(src: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum rows of ``src`` (n, F) into ``num_segments`` rows by ``index`` (n,); fp32 accumulation
    for half/bfloat16 inputs (autocast), else the input dtype."""
    acc = torch.float32 if src.dtype in (torch.float16, torch.bfloat16) else src.dtype
    out = torch.zeros((num_segments, src.shape[1]), dtype=acc, device=src.device)
    return out.index_add_(0, index, src.to(acc))


class TorchGraph(NamedTuple):
    """A graph for the torch backend: edges ``src -> dst`` sorted by ``dst``. For the fused kernel
    also CSR offsets ``in_ptr`` (N + 1) over that order, and the edges in source order ``out_perm``
    with offsets ``out_ptr`` (N + 1) for its backward pass; ``None`` where the reference path runs."""

    src: torch.Tensor
    dst: torch.Tensor
    in_ptr: torch.Tensor | None = None
    out_perm: torch.Tensor | None = None
    out_ptr: torch.Tensor | None = None


def _offsets(index: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(index, minlength=n)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def use_fused(device: torch.device) -> bool:
    """Whether graphs on ``device`` get the fused kernel's CSR arrays: CPU, the kernel loads, and not
    inside ``torch.compile`` tracing (the reference path traces without graph breaks)."""
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()  # torch >= 2.3
    return device.type == "cpu" and not compiling and load_extension()


def torch_graph(src: torch.Tensor, dst: torch.Tensor, n_nodes: int, fused: bool | None = None) -> TorchGraph:
    """:class:`TorchGraph` of edges already sorted by destination (``sort_by_destination``), with the
    kernel's CSR arrays when ``fused`` (default: :func:`use_fused` on the edges' device)."""
    if not (use_fused(dst.device) if fused is None else fused):
        return TorchGraph(src, dst)
    if dst.numel() > 1 and bool((dst[1:] < dst[:-1]).any()):
        raise ValueError("torch_graph: edges must be sorted by destination (see alignn.sort_by_destination)")
    return TorchGraph(src, dst, _offsets(dst, n_nodes), torch.argsort(src, stable=True), _offsets(src, n_nodes))


def build_extension(build_directory: str | None = None) -> str:
    """Compile (if its sources or flags changed) and load the kernel library (both kernels); its path.
    Raises when it cannot be built (no compiler or ninja, ...). ``build_directory`` defaults to torch's
    ``$TORCH_EXTENSIONS_DIR/<python tag>/spectrolens_kernels``."""
    from torch.utils.cpp_extension import load

    if build_directory is not None:
        Path(build_directory).mkdir(parents=True, exist_ok=True)
    return str(load(name="spectrolens_kernels", sources=[str(p) for p in _SOURCES],
                    extra_cflags=["-O3", "-fopenmp"], build_directory=build_directory, is_python_module=False,
                    verbose=False))


def load_extension() -> bool:
    """Load the C++ kernels once per process: the prebuilt library named by ``$SPECTROLENS_KERNEL_LIB``
    (container images), else :func:`build_extension`. ``False``, with a logged warning naming the
    reason, when they are switched off (``SPECTROLENS_FUSED_KERNELS=0``) or cannot be loaded (also when
    the library lacks one of them: one built from older sources)."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = False
            prebuilt = os.environ.get("SPECTROLENS_KERNEL_LIB")
            try:
                if os.environ.get("SPECTROLENS_FUSED_KERNELS", "1") == "0":
                    raise RuntimeError("switched off by SPECTROLENS_FUSED_KERNELS=0")
                if prebuilt:
                    torch.ops.load_library(prebuilt)
                    _state["path"] = prebuilt
                else:
                    log.info("loading the fused CPU kernels (compiled on first use, a few seconds)")
                    _state["path"] = build_extension()
                missing = [op for op in _OPS if not hasattr(torch.ops.spectrolens, op)]
                if missing:
                    raise RuntimeError(f"{_state['path']} lacks {', '.join(missing)} (built from older sources: "
                                       f"rebuild it with build_extension)")
                _state["ok"] = True
            except Exception as exc:  # noqa: BLE001 - any build/load failure: fall back, say why
                lines = str(exc).strip().splitlines() or [""]
                _state["reason"] = f"{type(exc).__name__}: {lines[-1][:300]}"
                log.warning("fused CPU kernels unavailable (%s); using the torch-op paths", _state["reason"])
        return bool(_state["ok"])


def kernel_status() -> dict[str, object]:
    """``{"fused": bool, "path" or "reason": str}`` for run records and tests."""
    ok = load_extension()
    return {"fused": ok, **({"path": _state.get("path")} if ok else {"reason": _state.get("reason")})}


def gate_aggregate_reference(g: TorchGraph, mm: torch.Tensor, es: torch.Tensor, ed: torch.Tensor,
                             bh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, h)`` with torch ops: gathers by index_select, sums by index_add_ (fp32 accumulation
    under half/bf16 autocast). Runs on any device and dtype."""
    src, dst = g.src, g.dst
    # in place on the GEMM output (mm's backward needs only its inputs)
    m = mm.add_(es.index_select(0, src)).add_(ed.index_select(0, dst))
    sigma = torch.sigmoid(m)
    n = es.shape[0]
    h = segment_sum(bh.index_select(0, src) * sigma, dst, n) / (segment_sum(sigma, dst, n) + GATE_EPS)
    return m, h


class _GateAggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mm, es, ed, bh, g: TorchGraph):  # type: ignore[override]
        m, h, den = torch.ops.spectrolens.gate_forward(mm, es, ed, bh, g.src, g.in_ptr)
        ctx.save_for_backward(m, h, den, bh, g.src, g.dst, g.in_ptr, g.out_perm, g.out_ptr)
        return m, h

    @staticmethod
    def backward(ctx, grad_m, grad_h):  # type: ignore[override]
        m, h, den, bh, src, dst, in_ptr, out_perm, out_ptr = ctx.saved_tensors
        grad_h = torch.zeros_like(h) if grad_h is None else grad_h.contiguous()
        grad_m = None if grad_m is None else grad_m.contiguous()  # e.g. expanded by a sum
        g_mm, g_es, g_ed, g_bh = torch.ops.spectrolens.gate_backward(
            grad_m, grad_h, m, h, den, bh, src, dst, in_ptr, out_perm, out_ptr)
        return g_mm, g_es, g_ed, g_bh, None


def gate_aggregate(g: TorchGraph, mm: torch.Tensor, es: torch.Tensor, ed: torch.Tensor,
                   bh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, h)`` (module docstring): the fused kernel for float32/float64 on a graph built for it
    (:func:`torch_graph`), else the reference."""
    if (g.in_ptr is not None and mm.dtype in (torch.float32, torch.float64)
            and es.dtype == ed.dtype == bh.dtype == mm.dtype):
        return _GateAggregate.apply(mm, es, ed, bh, g)
    return gate_aggregate_reference(g, mm, es, ed, bh)



def layer_norm_silu_reference(norm: torch.nn.LayerNorm, a: torch.Tensor, b: torch.Tensor | None = None,
                              residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + silu(norm(a + b))`` with torch ops (``b``, ``residual`` optional; the residual is
    added in place: SiLU's backward needs its input, not its output). Any device and dtype."""
    out = F.silu(norm(a if b is None else a + b))
    return out if residual is None else out.add_(residual)


class _LayerNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, residual, weight, bias, eps):  # type: ignore[override]
        out, mean, rstd = torch.ops.spectrolens.ln_silu_forward(a, b, residual, weight, bias, eps)
        ctx.save_for_backward(a, b, weight, bias, mean, rstd)  # inputs the caller keeps anyway, (rows,) stats
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        a, b, weight, bias, mean, rstd = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # e.g. expanded by a sum
        g_z, g_w, g_c = torch.ops.spectrolens.ln_silu_backward(grad_out, a, b, weight, bias, mean, rstd)
        return g_z, (g_z if b is not None else None), (grad_out if ctx.has_residual else None), g_w, g_c, None


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def layer_norm_silu(norm: torch.nn.LayerNorm, a: torch.Tensor, b: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + silu(norm(a + b))`` for (rows, F) tensors (module docstring): the fused kernel on
    CPU for float32/float64 (all of one dtype, ``norm`` with weight and bias over the last dimension),
    else :func:`layer_norm_silu_reference`. ``norm``'s parameters get their gradients either way."""
    w, c = norm.weight, norm.bias
    tensors = [t for t in (a, b, residual) if t is not None]
    if (w is not None and c is not None and a.dim() == 2 and tuple(norm.normalized_shape) == (a.shape[1],)
            and a.dtype in (torch.float32, torch.float64)
            and all(t.dtype == a.dtype and t.shape == a.shape for t in tensors) and w.dtype == c.dtype == a.dtype
            and use_fused(a.device)):
        return _LayerNormSiLU.apply(_rows(a), None if b is None else _rows(b),
                                    None if residual is None else _rows(residual), w, c, float(norm.eps))
    return layer_norm_silu_reference(norm, a, b, residual)
