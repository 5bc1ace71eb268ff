"""Clustering at scale: scalable micro-cluster Ward vs exact Ward, and 1,000,000 x 256 embeddings.

Part 1 (reference, same run): on N_ref points (Gaussian blobs, float32) exact Ward
(scipy.cluster.hierarchy.linkage, the reference implementation) and toolkit's scalable mode; median
wall time over --repeats runs, their ratio, and the adjusted Rand index between the two partitions.

Part 2 (scale): --n x --dim float32 embeddings written chunk by chunk into a Zarr array on disk (as
embeddings.zarr holds them), then clustered by the scalable mode (chunked mini-batch k-means into
--micro micro-clusters + weighted Ward, silhouette choice of k) in a fresh child process, so its
peak resident memory (ru_maxrss) is that of the clustering alone. Prints time and peak memory.

    python benchmarks/clustering_scale.py                 # defaults: 1,000,000 x 256
    python benchmarks/clustering_scale.py --n 200000 --ref-n 3000 --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def blobs_chunk(start: int, stop: int, dim: int, k: int, seed: int) -> np.ndarray:
    """Rows start..stop of a deterministic blob dataset (k centres, unit noise), float32."""
    centres = np.random.default_rng(seed).normal(scale=1.5, size=(k, dim)).astype(np.float32)
    rng = np.random.default_rng([seed, start])
    lab = rng.integers(0, k, stop - start)
    return centres[lab] + rng.standard_normal((stop - start, dim), dtype=np.float32)


def part_reference(n: int, dim: int, k: int, repeats: int, micro: int, threads: int | None) -> None:
    from scipy.cluster.hierarchy import fcluster, linkage
    from sklearn.metrics import adjusted_rand_score

    from toolkit.analyze.clustering import cluster

    x = blobs_chunk(0, n, dim, k, seed=1)
    t_exact, t_scal = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        z = linkage(x.astype(np.float64), method="ward")
        exact = fcluster(z, k, "maxclust")
        t_exact.append(time.perf_counter() - t)
        t = time.perf_counter()
        res = cluster(x, n_clusters=k, standardize=False, scalable_threshold=100, n_micro=micro, threads=threads)
        t_scal.append(time.perf_counter() - t)
    me, ms = float(np.median(t_exact)), float(np.median(t_scal))
    ari = float(adjusted_rand_score(exact, res.labels))
    print(f"[reference] N={n} D={dim} k={k}: exact scipy Ward median {me:.2f} s, scalable (micro={micro}) "
          f"median {ms:.2f} s, ratio exact/scalable {me / ms:.2f}x, ARI {ari:.3f}",
          flush=True)
    return {"n": n, "exact_s": me, "scalable_s": ms, "ari": ari}


def write_store(path: Path, n: int, dim: int, k: int, chunk: int = 16384) -> None:
    import zarr

    arr = zarr.create_array(path, shape=(n, dim), chunks=(chunk, dim), dtype="float32")
    for s in range(0, n, chunk):
        arr[s:min(n, s + chunk)] = blobs_chunk(s, min(n, s + chunk), dim, k, seed=2)


def child(path: str, micro: int, max_clusters: int, threads: int | None) -> None:
    import zarr

    from toolkit.analyze.clustering import cluster

    x = zarr.open_array(path, mode="r")
    t = time.perf_counter()
    res = cluster(x, n_clusters="auto", max_clusters=max_clusters, standardize=True, n_micro=micro,
                  scalable_threshold=20_000, threads=threads)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    print(json.dumps({"seconds": dt, "peak_rss_gib": peak, "mode": res.mode, "k": res.n_clusters,
                      "micro_clusters": int(res.linkage.shape[0] + 1), "n": int(x.shape[0])}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=12, help="blobs in the synthetic data")
    ap.add_argument("--micro", type=int, default=2000)
    ap.add_argument("--max-clusters", type=int, default=20)
    ap.add_argument("--ref-n", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads of k-means (default: all)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here (benchmarks/run_all)")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.micro, a.max_clusters, a.threads)
        return
    ref = part_reference(a.ref_n, a.dim, a.k, a.repeats, min(a.micro, a.ref_n // 5), a.threads)
    with tempfile.TemporaryDirectory(prefix="clustering_scale_") as tmp:
        store = Path(tmp) / "emb.zarr"
        t = time.perf_counter()
        write_store(store, a.n, a.dim, a.k)
        print(f"[scale] wrote {a.n} x {a.dim} float32 ({a.n * a.dim * 4 / 2**30:.2f} GiB) to Zarr in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        cmd = [sys.executable, __file__, "--child", str(store), "--micro", str(a.micro), "--max-clusters",
               str(a.max_clusters)] + (["--threads", str(a.threads)] if a.threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"[scale] N={r['n']} D={a.dim}: scalable Ward ({r['micro_clusters']} micro-clusters) -> k={r['k']} "
              f"in {r['seconds']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB (limit 24 GiB)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import emit

    emit("clustering_scale", [
        {"what": f"exact scipy Ward vs ours scalable, N={ref['n']} (ours=scalable s, upstream=exact s)",
         "unit": "s", "ours": ref["scalable_s"], "upstream": ref["exact_s"], "ratio": None},
        {"what": f"agreement scalable vs exact Ward (adjusted Rand), N={ref['n']}", "unit": "ARI", "ours": ref["ari"],
         "upstream": None, "ratio": None},
        {"what": f"scalable Ward on {r['n']} x {a.dim} float32: time", "unit": "s", "ours": r["seconds"],
         "upstream": None, "ratio": None},
        {"what": f"scalable Ward on {r['n']} x {a.dim} float32: peak RSS", "unit": "GiB", "ours": r["peak_rss_gib"],
         "upstream": None, "ratio": None}], {"n": a.n, "dim": a.dim, "micro": a.micro, "threads": a.threads}, a.json)


if __name__ == "__main__":
    main()
