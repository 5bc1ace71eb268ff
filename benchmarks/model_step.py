"""Forward+backward throughput of our ALIGNN vs upstream's pure-torch ALIGNNAtomWisePure.

Same structures, same graphs (upstream's own pure-torch builder, fed to both models), same
weights (upstream's copied into ours), same hyperparameters (the study's: 4 ALIGNN + 4 GCN
layers, hidden 256, embedding 64, 1,501 outputs), batch 16, L1 loss against a fixed random target.
Prints the median ms per step and structures/s of each, and the ratio ours/upstream (and writes
them as JSON with --json, as benchmarks/collect.py does).

    python benchmarks/model_step.py [--structures 64] [--batch 16] [--threads 2] [--repeats 5]

Both models run in one process, interleaved per repeat, so they see the same machine state.
glibc malloc is tuned (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_) for both unless
--no-malloc-tuning (see ../shared/notes/platform-facts.md: CPU timing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_step_args, alternating, emit, tune_malloc  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(ap)
    args = ap.parse_args()

    tune_malloc(args.no_malloc_tuning)

    import torch

    torch.set_num_threads(args.threads)
    from toolkit.compat.upstream import graphbatch_from_upstream, upstream_graph_pairs, upstream_pure_model
    from alignn.torch_graph_builder import batch_torch_graph_pairs

    from toolkit.config import ModelConfig
    from toolkit.model import build_model
    from toolkit.model.checkpoint import upstream_state_dict

    files = sorted(args.data.glob("POSCAR*"))[: args.structures]
    if len(files) < args.structures:
        print(f"only {len(files)} structures in {args.data}", file=sys.stderr)
    t0 = time.perf_counter()
    pairs = upstream_graph_pairs(files)
    print(f"{len(pairs)} structures, graphs built in {time.perf_counter() - t0:.1f} s (upstream pure builder, "
          f"cutoff 8 Å, 12 neighbours)")
    chunks = [pairs[i: i + args.batch] for i in range(0, len(pairs), args.batch)]
    up_batches = [batch_torch_graph_pairs(c) + (None,) for c in chunks]
    our_batches = [graphbatch_from_upstream(c) for c in chunks]
    n_atoms = sum(int(b.n_atoms.sum()) for b in our_batches)
    n_edges = sum(int(b.edge_index.shape[1]) for b in our_batches)
    n_tri = sum(int(b.line_index.shape[1]) for b in our_batches)
    print(f"atoms {n_atoms}, bonds {n_edges}, angles {n_tri}; batch {args.batch}, threads {args.threads}, "
          f"malloc tuning {'off' if args.no_malloc_tuning else 'on'}")

    kw = dict(alignn_layers=4, gcn_layers=4, atom_input_features=92, edge_input_features=80,
              triplet_input_features=40, embedding_features=64, hidden_features=args.hidden,
              output_features=args.outputs)
    torch.manual_seed(0)
    up = upstream_pure_model(**kw).train()
    ours = build_model(ModelConfig(**kw)).train()
    ours.load_state_dict(upstream_state_dict(up.state_dict()), strict=True)
    targets = [torch.randn(len(c), args.outputs) for c in chunks]

    def timed(step) -> tuple[float, float]:
        """(wall s, process CPU s) of one pass over the batches; on a busy machine the CPU time
        (with --threads 1) is the steadier measure of the work done."""
        t, c = time.perf_counter(), time.process_time()
        for i in range(len(chunks)):
            step(i)
        return time.perf_counter() - t, time.process_time() - c

    def step_up(i: int) -> None:
        up.zero_grad(set_to_none=True)
        torch.nn.functional.l1_loss(up(up_batches[i])["out"], targets[i]).backward()

    def step_ours(i: int) -> None:
        ours.zero_grad(set_to_none=True)
        torch.nn.functional.l1_loss(ours(our_batches[i]), targets[i]).backward()

    timed(step_up), timed(step_ours)  # warm-up
    res = alternating({"upstream": lambda: timed(step_up), "ours": lambda: timed(step_ours)}, args.repeats)
    r_up, r_ours = res["upstream"], res["ours"]
    m_up, m_ours = (statistics.median(r[0] for r in rs) for rs in (r_up, r_ours))
    c_up, c_ours = (statistics.median(r[1] for r in rs) for rs in (r_up, r_ours))
    n = len(pairs)
    emit("model_step", [
        {"what": "forward+backward throughput (higher is better)", "unit": "structures/s",
         "ours": n / m_ours, "upstream": n / m_up, "ratio": m_up / m_ours},
        {"what": "median time per step", "unit": "ms", "ours": m_ours / len(chunks) * 1e3,
         "upstream": m_up / len(chunks) * 1e3, "ratio": None},
        {"what": "throughput per CPU-second (higher is better)", "unit": "structures/cpu-s",
         "ours": n / c_ours, "upstream": n / c_up, "ratio": c_up / c_ours},
    ], {"structures": n, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
        "hidden": args.hidden, "outputs": args.outputs, "malloc_tuning": not args.no_malloc_tuning,
        "upstream_model": "alignn_atomwise_pure.ALIGNNAtomWisePure"}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
