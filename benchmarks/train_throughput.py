"""Training throughput (structures/s): spectrolens' training step vs upstream ALIGNN's pure-torch model.

One full optimizer step per batch for each: forward, L1 loss on the spectrum, backward, gradient
clipping (max norm 1), AdamW (lr 1e-3, weight decay 1e-5), one-cycle LR step. Ours runs the
production step (``toolkit.train.loop.Trainer._train_step``: masked loss, NaN check, clip, AdamW,
scheduler); upstream runs ``alignn.models.alignn_atomwise_pure.ALIGNNAtomWisePure`` with the same
optimizer, schedule and clipping in a plain loop. Same real structures (the study's POSCARs), same
graphs (upstream's pure-torch builder, fed to both), same initial weights, the study's
hyperparameters (4 ALIGNN + 4 GCN layers, hidden 256, embedding 64, 1,501 outputs), batch 16.
The two models alternate in one process, in alternating order (``_common.alternating``), so they
see the same machine state and neither always runs second.

    python benchmarks/train_throughput.py [--structures 64] [--batch 16] [--threads 2] [--repeats 5]
    python benchmarks/train_throughput.py --device cuda --bf16        # GPU, bf16 autocast for both

Prints the median seconds per epoch (over the structures) and structures/s for each, and the ratio
ours/upstream. glibc malloc is tuned for both (see ../shared/notes/platform-facts.md: CPU timing).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_step_args, alternating, emit, tune_malloc  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(ap)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for both models")
    args = ap.parse_args()

    tune_malloc(args.no_malloc_tuning)

    import torch

    torch.set_num_threads(args.threads)
    from alignn.torch_graph_builder import batch_torch_graph_pairs
    from toolkit.compat.upstream import graphbatch_from_upstream, upstream_graph_pairs, upstream_pure_model

    from toolkit.config import load_config
    from toolkit.model import build_model
    from toolkit.model.checkpoint import upstream_state_dict
    from toolkit.train.distributed import DistEnv
    from toolkit.train.loop import Loaders, Trainer

    dev = torch.device(args.device)
    files = sorted(args.data.glob("POSCAR*"))[: args.structures]
    t0 = time.perf_counter()
    pairs = upstream_graph_pairs(files)
    print(f"{len(pairs)} structures from {args.data}, graphs built in {time.perf_counter() - t0:.1f} s "
          f"(upstream pure builder, cutoff 8 Å, 12 neighbours); device {dev}, bf16 {args.bf16}, "
          f"threads {args.threads}, batch {args.batch}")
    chunks = [pairs[i: i + args.batch] for i in range(0, len(pairs), args.batch)]
    gen = torch.Generator().manual_seed(0)
    targets = [2.0 + 4.0 * torch.rand(len(c), args.outputs, generator=gen) for c in chunks]
    up_batches = [tuple(x.to(dev) for x in batch_torch_graph_pairs(c)) + (None,) for c in chunks]
    ours_batches = []
    for c, y in zip(chunks, targets):
        b = graphbatch_from_upstream(c)
        b.target, b.target_mask, b.ids = y, torch.ones_like(y, dtype=torch.bool), [f"s{i}" for i in range(len(c))]
        ours_batches.append(b.to(dev))
    targets = [y.to(dev) for y in targets]

    cfg = load_config(None, [
        "model.alignn_layers=4", "model.gcn_layers=4", f"model.hidden_features={args.hidden}",
        "model.embedding_features=64", f"model.output_features={args.outputs}", "train.learning_rate=0.001",
        "train.weight_decay=0.00001", "train.grad_clip=1.0", "train.loss=l1", "train.epochs=1000",
        f"train.precision={'bf16' if args.bf16 else 'fp32'}", f"train.device={args.device}"])
    kw = dict(alignn_layers=4, gcn_layers=4, atom_input_features=92, edge_input_features=80,
              triplet_input_features=40, embedding_features=64, hidden_features=args.hidden,
              output_features=args.outputs)
    torch.manual_seed(0)
    up = upstream_pure_model(**kw).to(dev).train()
    ours = build_model(cfg.model, args.outputs)
    ours.load_state_dict(upstream_state_dict(up.state_dict()), strict=True)

    steps = len(chunks) * (args.repeats + 1)
    loaders = Loaders(train=ours_batches, val=None, test=None, steps_per_epoch=len(chunks),
                      set_epoch=lambda e: None, sampler_state=lambda n: {}, load_sampler_state=lambda s: None)
    tmp = tempfile.TemporaryDirectory()
    trainer = Trainer(cfg, ours, loaders, Path(tmp.name), DistEnv(), dev, energy=None, output_features=args.outputs)

    opt = torch.optim.AdamW(up.parameters(), lr=1e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps * 1000)

    def autocast():
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def epoch_up() -> float:
        sync()
        t = time.perf_counter()
        for b, y in zip(up_batches, targets):
            with autocast():
                out = up(b)["out"]
            loss = torch.nn.functional.l1_loss(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(up.parameters(), 1.0)
            opt.step()
            sched.step()
        sync()
        return time.perf_counter() - t

    def epoch_ours() -> float:
        sync()
        t = time.perf_counter()
        for b in ours_batches:
            trainer._train_step(b)
        sync()
        return time.perf_counter() - t

    epoch_up(), epoch_ours()  # warm-up
    res = alternating({"upstream": epoch_up, "ours": epoch_ours}, args.repeats)
    t_up, t_ours = res["upstream"], res["ours"]
    m_up, m_ours = statistics.median(t_up), statistics.median(t_ours)
    n = len(pairs)
    print(f"upstream ALIGNNAtomWisePure train step: median {m_up / len(chunks) * 1e3:8.1f} ms/step "
          f"{n / m_up:7.2f} structures/s   (runs: {', '.join(f'{x:.2f}' for x in t_up)} s)")
    print(f"spectrolens train step (Trainer)      : median {m_ours / len(chunks) * 1e3:8.1f} ms/step "
          f"{n / m_ours:7.2f} structures/s   (runs: {', '.join(f'{x:.2f}' for x in t_ours)} s)")
    print(f"ratio ours/upstream (throughput): {m_up / m_ours:.2f}x  (target >= 1.3x on CPU)")
    emit("train_throughput", [{"what": f"training structures/s ({args.device}{', bf16' if args.bf16 else ''})",
                               "unit": "structures/s", "ours": n / m_ours, "upstream": n / m_up,
                               "ratio": m_up / m_ours}],
         {"structures": n, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
          "hidden": args.hidden, "outputs": args.outputs, "device": args.device, "bf16": args.bf16}, args.json)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
