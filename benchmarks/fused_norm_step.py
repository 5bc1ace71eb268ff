"""The fused LayerNorm -> SiLU -> residual kernel (toolkit.model.kernels.layer_norm_silu) against the
torch ops it replaces, forward + backward, in one process (alternating, so both see the same machine
state), at three levels:

* ``op``: one call on (rows, hidden) arrays, as the line-graph edge update (a + residual, no b);
* ``conv``: one EdgeGatedGraphConv on a line-graph-sized graph: ``--nodes`` bonds as nodes with
  ``--degree`` in-edges each (3,840 x 12 = 46,080 angle rows: a batch of 16 of the study's structures);
* ``model``: the training step of the study's model (4+4 layers, 1,501 outputs) on a batch of
  ``--batch`` paper structures (production graph builder), L1 loss.

"torch ops" is exactly the code before the kernel (F.silu(norm(a + b)).add_(residual)); the gate kernel
runs in both. Prints median wall ms and median process CPU ms per variant and the ratio torch/fused
(> 1: the kernel is faster), and the minimum wall time (the least disturbed sample on a busy machine).

    python benchmarks/fused_norm_step.py [--level op conv model] [--hidden 128 256] [--threads 2] [--repeats 6]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, alternating, emit, tune_malloc  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--level", nargs="+", choices=["op", "conv", "model"], default=["op", "conv", "model"])
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=6, help="rounds (even: the order alternates)")
    ap.add_argument("--inner", type=int, default=3, help="timed calls per round (each one a sample)")
    ap.add_argument("--nodes", type=int, default=3840)
    ap.add_argument("--degree", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "paper_structures")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-malloc-tuning", action="store_true")
    args = ap.parse_args()
    tune_malloc(args.no_malloc_tuning)

    import torch

    torch.set_num_threads(args.threads)
    from toolkit.config import ModelConfig
    from toolkit.model import alignn as A
    from toolkit.model import build_model
    from toolkit.model import kernels as K

    status = K.kernel_status()
    if not status["fused"]:
        print(f"the fused kernels are not available: {status.get('reason')}", file=sys.stderr)
        return 1
    variants = {"fused": K.layer_norm_silu, "torch ops": K.layer_norm_silu_reference}

    def measure(step) -> dict[str, tuple[float, float]]:
        def run(fn):
            def timed() -> list[tuple[float, float, int]]:
                A.layer_norm_silu = fn  # what EdgeGatedGraphConv.finish and MLPLayer call
                step()
                out = []
                for _ in range(args.inner):
                    pf = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t, c = time.perf_counter(), time.process_time()
                    step()
                    out.append(((time.perf_counter() - t) * 1e3, (time.process_time() - c) * 1e3,
                                resource.getrusage(resource.RUSAGE_SELF).ru_minflt - pf))
                return out
            return timed
        try:
            res = alternating({k: run(fn) for k, fn in variants.items()}, args.repeats)
        finally:
            A.layer_norm_silu = K.layer_norm_silu
        flat = {k: [x for r in v for x in r] for k, v in res.items()}
        return {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v), min(x[0] for x in v),
                    statistics.median(x[2] for x in v)) for k, v in flat.items()}

    rows = []

    def report(what: str, res: dict[str, tuple[float, float, float, float]]) -> None:
        (fw, fc, fm, fp), (rw, rc, rm, rp) = res["fused"], res["torch ops"]
        for kind, f, r in (("median wall", fw, rw), ("min wall", fm, rm), ("median process CPU", fc, rc)):
            rows.append({"what": f"{what}: {kind} (lower is better)", "unit": "ms", "ours": f, "upstream": None,
                         "ratio": None, "torch_ops": r, "speedup": r / f})
        print(f"{what}\n  median wall: fused {fw:8.1f} ms, torch ops {rw:8.1f} ms ({rw / fw:.3f}x)   "
              f"min wall: fused {fm:8.1f}, torch ops {rm:8.1f} ({rm / fm:.3f}x)\n"
              f"  median CPU:  fused {fc:8.1f} ms, torch ops {rc:8.1f} ms ({rc / fc:.3f}x)   "
              f"minor page faults per step: fused {fp:.0f}, torch ops {rp:.0f}", flush=True)

    gen = torch.Generator().manual_seed(0)
    rows_lg = args.nodes * args.degree
    for h in args.hidden:
        if "op" in args.level:
            ln = torch.nn.LayerNorm(h)
            a, r = (torch.randn(rows_lg, h, generator=gen).requires_grad_() for _ in range(2))
            g = torch.randn(rows_lg, h, generator=gen)

            def op_step(ln=ln, a=a, r=r, g=g) -> None:
                out = A.layer_norm_silu(ln, a, None, r)
                torch.autograd.grad(out, [a, r, ln.weight, ln.bias], g)

            report(f"op {rows_lg} x {h}", measure(op_step))
        if "conv" in args.level:
            conv = A.EdgeGatedGraphConv(h, h)
            dst = torch.arange(args.nodes).repeat_interleave(args.degree)
            graph = K.torch_graph(torch.randint(0, args.nodes, (rows_lg,), generator=gen), dst, args.nodes)
            x, y = torch.randn(args.nodes, h, generator=gen), torch.randn(rows_lg, h, generator=gen)
            gx, gy = torch.randn(args.nodes, h, generator=gen), torch.randn(rows_lg, h, generator=gen)

            def conv_step(conv=conv, graph=graph, x=x, y=y, gx=gx, gy=gy) -> None:
                conv.zero_grad(set_to_none=True)
                xs, ys = x.detach().requires_grad_(), y.detach().requires_grad_()
                torch.autograd.backward(conv(graph, xs, ys), [gx, gy])

            report(f"conv N={args.nodes} E={rows_lg} h={h}", measure(conv_step))
        if "model" in args.level:
            from pymatgen.core import Structure

            from toolkit.data.graphs import structure_graph
            from toolkit.data.loader import collate

            items = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for i, f in enumerate(sorted(args.data.glob("POSCAR*"))[: args.batch]):
                    sg = structure_graph(Structure.from_file(f))
                    items.append(dict(numbers=sg.numbers, edge_src=sg.edge_src, edge_dst=sg.edge_dst,
                                      edge_vec=sg.edge_vec, index=i, id=f.stem))
            batch = collate(items)
            torch.manual_seed(0)
            model = build_model(ModelConfig(alignn_layers=4, gcn_layers=4, hidden_features=h, embedding_features=64,
                                            output_features=1501)).train()
            target = torch.randn(len(items), 1501, generator=gen)

            def model_step(model=model, batch=batch, target=target) -> None:
                model.zero_grad(set_to_none=True)
                torch.nn.functional.l1_loss(model(batch), target).backward()

            report(f"model step B={len(items)} (bonds {batch.edge_index.shape[1]}, angles "
                   f"{batch.line_index.shape[1]}) h={h}", measure(model_step))
    emit("fused_norm_step", rows, {"threads": args.threads, "repeats": args.repeats, "inner": args.inner,
                                   "levels": args.level, "hidden": args.hidden,
                                   "malloc_tuning": not args.no_malloc_tuning}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
