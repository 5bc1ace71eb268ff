"""Streaming reads of dataset.zarr: one training-style epoch, throughput and peak memory vs store size.

The store is built from benchmark materials (real graphs of generated crystals, 1,501-point spectra),
written as ``--parts`` parts of ``--shard-size`` materials (materials repeat across parts with new
ids). Each measurement runs in a fresh process (so peaks do not mix):

* ``ours``: ``make_loader(shuffle=True)`` over the whole store, batches of 64, collate (line graph
  included); memory should stay flat as the store grows (a few parts + the index).
* ``reference``: what an in-memory dataset does (upstream ALIGNN keeps every graph in a Python list):
  read every material into memory first, then the same shuffled epoch of collated batches.

    python benchmarks/loader_streaming.py --parts 8 32 --shard-size 256 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, PeakMemory, emit  # noqa: E402

sys.path.insert(0, str(REPO))


def build_store(path: Path, n_parts: int, shard: int) -> int:
    """Write ``n_parts`` parts of ``shard`` benchmark materials (graphs built once, ids made unique)."""
    from toolkit.config import load_config
    from toolkit.data import store
    from toolkit.data.benchmark import BenchmarkSource
    from toolkit.data.prepare import material_record
    from toolkit.data.spectra import energy_grid

    cfg = load_config(None, [f"data.benchmark.n_materials={shard}"])
    energy = energy_grid(0, 15, 1501)
    src = BenchmarkSource(cfg)
    keys, _ = src.scan()
    base = [material_record(cfg, m, energy) for m in src.load(keys)]
    store.create_store(path, {"n_parts": n_parts, "energy": energy.tolist(), "grid": {"start": 0, "stop": 15, "num": 1501}})
    for p in range(n_parts):
        for r in base:
            r.id = f"{r.id.split('~')[0]}~{p}"
        store.write_part(path, p, base, 1501)
    store.write_index(path, n_parts)
    store.mark_complete(path, {"n_materials": n_parts * len(base)})
    return n_parts * len(base)


def epoch(path: str, mode: str) -> None:
    """Child process: one shuffled epoch in ``mode`` (ours | reference); prints JSON {seconds, n}."""
    import numpy as np

    from toolkit.data.loader import MaterialDataset, collate, make_loader

    t = time.perf_counter()
    n = 0
    if mode == "ours":
        for b in make_loader(path, batch_size=64, shuffle=True, seed=0):
            n += b.num_graphs
    else:
        ds = MaterialDataset(path)
        everything = [ds[i] for i in range(len(ds))]  # the in-memory dataset
        order = np.random.default_rng(0).permutation(len(everything))
        for i in range(0, len(order), 64):
            n += collate([everything[j] for j in order[i:i + 64]]).num_graphs
    print(json.dumps({"seconds": time.perf_counter() - t, "n": n}))


def measure(path: Path, mode: str) -> tuple[float, float]:
    """(materials/s, peak RSS GiB) of one epoch in a fresh process."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(path), mode], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    with PeakMemory(proc.pid, interval=0.05) as mem:
        out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{mode} epoch failed (exit {proc.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    return res["n"] / res["seconds"], mem.peak_gib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, nargs="+", default=[8, 32], help="store sizes in parts")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", nargs=2, metavar=("STORE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        epoch(*args.child)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_parts in args.parts:
            path = Path(tmp) / f"d{n_parts}.zarr"
            n = build_store(path, n_parts, args.shard_size)
            disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
            ours = measure(path, "ours")
            ref = measure(path, "reference")
            print(f"{n:7d} materials ({disk:,.0f} MiB on disk): ours {ours[0]:7.0f} materials/s, peak "
                  f"{ours[1]:.2f} GiB | in-memory reference {ref[0]:7.0f} materials/s, peak {ref[1]:.2f} GiB")
            rows.append({"what": f"epoch over {n} materials, throughput", "unit": "materials/s", "ours": ours[0],
                         "upstream": ref[0], "ratio": ours[0] / ref[0]})
            rows.append({"what": f"epoch over {n} materials, peak RSS (ratio = reference/ours)", "unit": "GiB",
                         "ours": ours[1], "upstream": ref[1], "ratio": ref[1] / ours[1]})
    emit("loader_streaming", rows, {"parts": args.parts, "shard_size": args.shard_size, "batch": 64}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
