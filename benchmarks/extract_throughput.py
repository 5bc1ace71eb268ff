"""Embedding-extraction throughput: spectrolens' sharded extractor vs upstream-ALIGNN-style extraction.

Reference ("upstream style", as the study did it): one material per forward pass, forward hooks on
every ALIGNN/GCN layer and the readout, mean over atoms, ``.tolist()`` appended to a Python list,
the list dumped to one JSON file at the end.

Ours: ``toolkit.embed`` in one process (plan + run_shard for every shard + finalize: batched
inference_mode forward, vectorised pooling, whole-shard Zarr writes, completion records).

Both use the same model weights (default ALIGNN size unless --hidden/--layers say otherwise, random
weights with a fixed seed), the same prepared graphs (dataset.zarr from real MP structures), the same
device and thread count, in the same run. Prints the median materials/second of each and the ratio,
and checks that both give the same features.

    python benchmarks/extract_throughput.py                 # CPU, 200 structures, 3 repeats
    python benchmarks/extract_throughput.py --device cuda --n 2000 --batch-size 256
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import alternating, emit  # noqa: E402

from toolkit.config import PipelineConfig, load_config  # noqa: E402
from toolkit.data import prepare  # noqa: E402
from toolkit.data.loader import MaterialDataset, collate  # noqa: E402
from toolkit.data.store import DatasetReader  # noqa: E402
from toolkit.embed import stage  # noqa: E402
from toolkit.embed import store as st  # noqa: E402
from toolkit.embed.extract import MODEL_FORMAT, load_model  # noqa: E402
from toolkit.model import build_model, save_state_dict_file  # noqa: E402


def stable_malloc() -> None:
    """glibc: keep freed memory (see shared notes, "CPU timing"); applies to both sides alike."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def shared_data() -> Path:
    return Path(os.environ.get("SPECTROLENS_SHARED_DATA", REPO.parent / "shared" / "data"))


def make_run_dir(work: Path, n: int, args: argparse.Namespace) -> tuple[Path, PipelineConfig]:
    """dataset.zarr of the first n MP structures + a random-weight model checkpoint (best.pt format)."""
    lines = (shared_data() / "mp_structures" / "mp_structures.jsonl").read_text().splitlines()[:n]
    src = work / "structures.jsonl"
    src.write_text("\n".join(lines) + "\n")
    run_dir = work / "run"
    cfg = load_config(None, {
        "data": {"source": "jsonl", "path": str(src), "shard_size": 256, "workers": 2},
        "model": {"hidden_features": args.hidden, "alignn_layers": args.layers, "gcn_layers": args.layers},
        "embed": {"batch_size": args.batch_size, "shard_size": args.shard_size, "device": args.device,
                  "workers": 1, "num_workers": args.loader_workers},
    })
    prepare.run(cfg, run_dir)
    g = len(DatasetReader(run_dir / "dataset.zarr").energy)
    torch.manual_seed(0)
    model = build_model(cfg.model, g)
    save_state_dict_file({"format": MODEL_FORMAT, "version": 1, "model": model.state_dict(),
                          "config": cfg.model_dump_json(), "output_features": g, "epoch": 0, "val_mae": 0.0},
                         run_dir / "train" / "best.pt")
    return run_dir, cfg


def ours(run_dir: Path, cfg: PipelineConfig) -> float:
    """Seconds for plan + all shards + finalize into a fresh store (model already loaded: process cache)."""
    shutil.rmtree(st.store_path(run_dir), ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n_shards = stage.plan(cfg, run_dir)
    for s in range(n_shards):
        stage.run_shard(cfg, run_dir, s)
    stage.finalize(cfg, run_dir)
    return time.perf_counter() - t0


def reference(run_dir: Path, model: torch.nn.Module, device: torch.device, out_json: Path) -> float:
    """Upstream-style: one material per forward pass with hooks, Python lists, one JSON dump."""
    ds = MaterialDataset(run_dir / "dataset.zarr")
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def f(_m, _a, out):
            captured[name] = out[0] if isinstance(out, tuple) else out
        return f

    handles = [m.register_forward_hook(hook(f"alignn_{i + 1}")) for i, m in enumerate(model.alignn_layers)]
    handles += [m.register_forward_hook(hook(f"gcn_{i + 1}")) for i, m in enumerate(model.gcn_layers)]
    handles.append(model.readout.register_forward_hook(hook("readout")))
    t0 = time.perf_counter()
    results = []
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            batch = collate([item]).to(device)
            pred = model(batch)
            rec = {"id": item["id"], "prediction": pred[0].cpu().tolist()}
            for name, x in captured.items():
                rec[name] = (x[0] if name == "readout" else x.mean(0)).cpu().tolist()
            results.append(rec)
    with open(out_json, "w") as f:
        json.dump(results, f)
    seconds = time.perf_counter() - t0
    for h in handles:
        h.remove()
    return seconds


def check_same(run_dir: Path, ref_json: Path) -> float:
    """Max |ours - reference| over all mean-pooled layers (same model, same graphs)."""
    root = st.open_embeddings(run_dir)
    ref = json.loads(ref_json.read_text())
    worst = 0.0
    for layer in root.attrs["layers"]:
        a = root[f"layers/{layer}/mean"][:]
        b = np.array([r[layer] for r in ref], dtype=np.float32)
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="structures (first n of mp_structures.jsonl)")
    ap.add_argument("--repeats", type=int, default=4, help="even: the two sides alternate order")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--loader-workers", type=int, default=0, help="embed.num_workers (GPU: 4)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4, help="ALIGNN layers = GCN layers")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here (benchmarks/run_all)")
    args = ap.parse_args()
    stable_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="extract-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    run_dir, cfg = make_run_dir(work, args.n, args)
    device = torch.device(args.device)
    n = len(DatasetReader(run_dir / "dataset.zarr"))
    loaded = load_model(run_dir / "train" / "best.pt", device)
    ref_json = work / "reference_embeddings.json"
    print(f"extract throughput: {n} structures, hidden {args.hidden}, {args.layers}+{args.layers} layers, "
          f"{loaded.output_features} outputs, device {device}, torch threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, shard {args.shard_size}")
    ours(run_dir, cfg)  # warm-up (graphs cache, allocator, kernels)
    reference(run_dir, loaded.model, device, ref_json)
    res = alternating({"reference": lambda: reference(run_dir, loaded.model, device, ref_json),
                       "ours": lambda: ours(run_dir, cfg)}, args.repeats)
    t_ours, t_ref = res["ours"], res["reference"]
    for r, (a, b) in enumerate(zip(t_ref, t_ours)):
        print(f"  repeat {r}: reference {n / a:8.1f} materials/s   spectrolens {n / b:8.1f} materials/s")
    med_ref, med_ours = statistics.median(t_ref), statistics.median(t_ours)
    diff = check_same(run_dir, ref_json)
    print(f"median reference (1 material/forward, hooks, JSON list): {n / med_ref:8.1f} materials/s ({med_ref:.2f} s)")
    print(f"median spectrolens embed (batched, sharded Zarr):        {n / med_ours:8.1f} materials/s ({med_ours:.2f} s)")
    print(f"ratio spectrolens / reference: {med_ref / med_ours:.2f}x")
    print(f"max |difference| of mean-pooled features, ours vs reference: {diff:.2e}")
    print(f"store size {sum(p.stat().st_size for p in st.store_path(run_dir).rglob('*') if p.is_file()) / 1e6:.1f} MB, "
          f"reference JSON {ref_json.stat().st_size / 1e6:.1f} MB")
    emit("extract_throughput", [{"what": "extraction (ours batched+Zarr vs 1 material/pass+JSON)", "unit": "materials/s",
                                 "ours": n / med_ours, "upstream": n / med_ref, "ratio": med_ref / med_ours}],
         {"n": n, "hidden": args.hidden, "layers": args.layers, "batch": args.batch_size, "device": str(device),
          "threads": torch.get_num_threads(), "repeats": args.repeats, "max_abs_diff": diff}, args.json)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
