"""Profiles the hot paths on the embedded benchmark and prints the top functions of each.

    python benchmarks/profile_hotpaths.py [--n 128] [--hidden 64] [--top 15] [--json PATH]

In one temporary run directory (benchmark source, ``--n`` materials, ``data.shard_size = n`` so one
part holds everything):

1. **prepare part**: ``prepare.run_part(part 0)`` under cProfile (generation, graph construction,
   Zarr write; ``prepare.plan`` and the imports run before, unprofiled);
2. **training epoch**: ``toolkit.train.run`` with ``train.epochs = 1`` under cProfile, then the two
   halves measured apart: the data loader alone (``make_loader``, batch 16, iterated over the whole
   store) and the model step alone (forward + L1 loss + backward + AdamW step on batches already in
   memory). ``loader share = loader / (loader + step)``: with ``train.num_workers = 0`` the loader runs
   inline, so this is the fraction of an epoch the model waits for data;
3. **extraction pass**: ``toolkit.embed.run_shard(shard 0)`` in this process (every layer, mean
   pooling; ``embed.plan`` before, unprofiled) under cProfile.

For each it prints the top ``--top`` functions by own time and by cumulative time, and flags
``toolkit`` functions among the top own-time entries (where a Python loop over atoms or edges would
show up). cProfile adds overhead to Python-heavy code; the loader/step split is timed without it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from _common import emit


def profiled(label: str, fn: Callable[[], Any], top: int) -> tuple[float, list[dict]]:
    """Run ``fn`` under cProfile; print the top functions; (wall s, top own-time entries)."""
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    fn()
    pr.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(pr)
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).strip_dirs().sort_stats(key).print_stats(top)
        body = buf.getvalue()
        print(f"\n--- {label}: top {top} by {key} (wall {wall:.2f} s under cProfile) ---")
        print(body[body.find("ncalls"):].rstrip())
    entries = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
    tops = [{"function": f"{Path(f).name}:{line}({name})", "own_s": round(v[2], 3), "cum_s": round(v[3], 3),
             "calls": v[1], "toolkit": "/toolkit/" in f} for (f, line, name), v in entries]
    flagged = [t for t in tops if t["toolkit"]]
    print(f"toolkit functions among the top {top} by own time: "
          + (", ".join(f"{t['function']} {t['own_s']} s ({t['calls']} calls)" for t in flagged) or "none"))
    return wall, tops


def loader_vs_step(store: Path, cfg: Any, batch_size: int) -> tuple[float, float, int]:
    """(seconds to iterate the loader over the store, seconds of model steps on those batches, batches)."""
    import torch

    from toolkit.data.loader import make_loader
    from toolkit.model import build_model

    t0 = time.perf_counter()
    batches = list(make_loader(store, batch_size=batch_size, shuffle=True, seed=0))
    loader_s = time.perf_counter() - t0
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.grid.num)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    t0 = time.perf_counter()
    for b in batches:
        opt.zero_grad(set_to_none=True)
        pred = model(b)
        target = torch.nan_to_num(b.target, nan=0.0) if b.target is not None else torch.zeros_like(pred)
        loss = torch.nn.functional.l1_loss(pred, target)
        loss.backward()
        opt.step()
    step_s = time.perf_counter() - t0
    return loader_s, step_s, len(batches)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128, help="benchmark materials")
    ap.add_argument("--hidden", type=int, default=64, help="model hidden features")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared machine with load > cores, 2 OpenMP threads made "
                         "index_add_ 25-60x slower than 1; see docs/performance.md)")
    ap.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from toolkit import embed, train
    from toolkit.config import load_config
    from toolkit.data import prepare

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory() if args.work_dir is None else None
    run_dir = Path(tmp.name if tmp else args.work_dir)
    cfg = load_config(None, [f"{k}={v}" for k, v in {
        "data.source": "benchmark", "data.benchmark.n_materials": args.n, "data.shard_size": args.n,
        "data.workers": 1, "model.hidden_features": args.hidden, "model.embedding_features": 32,
        "train.epochs": 1, "train.batch_size": args.batch_size, "train.device": "cpu", "train.progress": False,
        "train.num_workers": 0, "embed.workers": 1, "embed.device": "cpu", "embed.batch_size": 64,
        "embed.shard_size": args.n,
    }.items()])
    params: dict[str, Any] = {"n": args.n, "hidden": args.hidden, "batch_size": args.batch_size,
                              "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()[0]}

    prepare.plan(cfg, run_dir)  # store skeleton; imports (scipy.signal, pymatgen: ~10-25 s under load) not profiled
    prep_s, prep_top = profiled("prepare part (run_part 0)", lambda: prepare.run_part(cfg, run_dir, 0), args.top)
    prepare.finalize(cfg, run_dir)
    epoch_s, train_top = profiled("training epoch (train.run, 1 epoch)", lambda: train.run(cfg, run_dir), args.top)
    loader_s, step_s, n_batches = loader_vs_step(run_dir / "dataset.zarr", cfg, args.batch_size)
    print(f"\nloader alone {loader_s:.2f} s, model steps alone {step_s:.2f} s over {n_batches} batches: "
          f"loader share {loader_s / (loader_s + step_s):.1%}")
    embed.plan(cfg, run_dir)  # store skeleton (checkpoint hashed, model built once) not profiled
    embed_s, embed_top = profiled("extraction pass (embed.run_shard 0, in process)",
                                  lambda: embed.run_shard(cfg, run_dir, 0), args.top)
    embed.finalize(cfg, run_dir)
    params["load_avg_end"] = os.getloadavg()[0]
    params["top_own_time"] = {"prepare": prep_top, "train": train_top, "embed": embed_top}
    rows = [
        {"what": "prepare part (under cProfile)", "unit": "materials/s", "ours": round(args.n / prep_s, 2)},
        {"what": "training epoch incl. validation (under cProfile)", "unit": "s", "ours": round(epoch_s, 2)},
        {"what": "loader alone, one pass", "unit": "batches/s", "ours": round(n_batches / loader_s, 2)},
        {"what": "model step alone (fwd+bwd+AdamW)", "unit": "batches/s", "ours": round(n_batches / step_s, 2)},
        {"what": "loader share of an inline-loader epoch", "unit": "fraction",
         "ours": round(loader_s / (loader_s + step_s), 3)},
        {"what": "extraction pass (under cProfile)", "unit": "materials/s", "ours": round(args.n / embed_s, 2)},
    ]
    emit("profile_hotpaths", rows, params, args.json)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
