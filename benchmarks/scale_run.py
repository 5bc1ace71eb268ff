"""Scale run: N structure-only materials through prepare -> embed -> analyze, each stage its own
``spectrolens`` subprocess, measured for wall time, peak RSS of the process tree and bytes on disk.

    python benchmarks/scale_run.py --n 100000 --json benchmarks/results/scale_run.json

Steps (all under ``--work-dir``, default ``/tmp/spectrolens-scale-<n>``):

1. ``structures.jsonl``: N structures from :func:`toolkit.data.benchmark.generate` (prototype crystals
   with substituted elements, strained and perturbed) under benchmark seed ``--seed`` (not the
   training seed), written WITHOUT spectra in the format of ``toolkit/data/readers/jsonl.py``.
2. ``train/``: a small model (hidden 64, ``--train-epochs`` epochs) trained on ``--train-n`` benchmark
   materials with spectra (seed 0): ``spectrolens prepare`` + ``spectrolens train``. Not part of the
   per-material costs; skipped with ``--checkpoint PATH``.
3. ``run/``: ``spectrolens prepare`` (jsonl source, 2 workers), ``spectrolens embed`` (2 workers, CPU) and
   ``spectrolens analyze`` (cheap ``cutoff`` coordination descriptors: CrystalNN on 10^5 structures
   would take hours on 2 cores; micro-cluster Ward above ``analyze.scalable_threshold``).

``--analyze-engine dask`` runs analyze on a Dask LocalCluster of ``--workers`` processes (docs/dask.md);
each stage record also has the peak RSS of its largest single process (the analyze driver or one
worker). ``--dask-analyze`` measures only analyze's chunked passes (feature statistics, micro-clusters
+ Ward, per-cluster sufficient statistics) and the stage's spectra steps on a lazy view of the predicted
spectra (sampled signatures, chunked predicted descriptors: ``toolkit.analyze.lazy``) on synthetic Zarr
stores of ``--n`` materials, with the peak RSS of the driver and of each Dask worker (docs/performance.md, "Analyze on Dask"):

    python benchmarks/scale_run.py --dask-analyze --n 1000000 --json benchmarks/results/dask_analyze_1e6.json

Every stage is resumable (its own completion records), so re-running the command after a kill
continues. After each stage the JSON file is rewritten with what finished so far (``partial: true``
until the end), so a run cut short still reports per-material costs. No upstream equivalent exists
(upstream ALIGNN has no dataset store or batch extraction stage): rows carry no ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Self

import numpy as np
import yaml

from _common import MALLOC_ENV, REPO, PeakMemory, emit

SPECTROLENS = [sys.executable, "-m", "toolkit.cli"]


def _line(args: tuple[int, int]) -> str:
    """One JSON Lines record (id + pymatgen structure dict, no spectrum) for benchmark index i."""
    from toolkit.config import DataConfig
    from toolkit.data.benchmark import generate

    seed, i = args
    cfg = DataConfig(source="benchmark", benchmark={"seed": seed, "n_materials": max(10, i + 1)})
    m = generate(cfg, i)
    return json.dumps({"id": f"scale-{seed}-{i:07d}", "structure": m.structure.as_dict()})


def write_structures(path: Path, n: int, seed: int, workers: int) -> float:
    """Write ``n`` structure-only records to ``path`` (skipped if it already has ``n`` lines); seconds."""
    if path.exists() and sum(1 for _ in path.open()) == n:
        return 0.0
    t0 = time.perf_counter()
    tmp = path.with_suffix(".tmp")
    with Pool(workers) as pool, tmp.open("w") as f:
        for line in pool.imap(_line, ((seed, i) for i in range(n)), chunksize=256):
            f.write(line + "\n")
    tmp.replace(path)
    return time.perf_counter() - t0


def du_bytes(path: Path) -> int:
    """Bytes on disk (allocated blocks, like ``du``) of a file tree."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def run_stage(name: str, args: list[str], log_dir: Path) -> dict[str, Any]:
    """Run ``spectrolens <args>`` as a subprocess; wall seconds, peak tree RSS and exit code."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    env = {**os.environ, **MALLOC_ENV}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(args)} (log {log})", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([*SPECTROLENS, "--log-level", "WARNING", *args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO, env=env)
        with PeakMemory(proc.pid, interval=0.5) as mem, TreePeaks(proc.pid, interval=0.5) as per:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    rec = {"stage": name, "wall_s": round(wall, 2), "peak_rss_gib": round(mem.peak_gib, 3), "rc": rc,
           "peak_rss_one_process_gib": round(per.max_one / 2**30, 3), "processes_seen": len(per.peak),
           "load_avg": os.getloadavg()[0]}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: rc {rc}, {wall:.1f} s, peak RSS {mem.peak_gib:.2f} GiB", flush=True)
    if rc != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
    return rec


class TreePeaks:
    """Peak RSS of every process of a tree (each on its own), sampled in a background thread:
    ``max_one`` is the largest single process (the analyze driver or one Dask worker)."""

    def __init__(self, pid: int, interval: float = 0.5):
        import threading

        self.pid, self.interval = pid, interval
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.pid)
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        self.peak[p.pid] = max(self.peak.get(p.pid, 0), p.memory_info().rss)
            self._stop.wait(self.interval)

    @property
    def max_one(self) -> int:
        return max(self.peak.values(), default=0)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def config(args: argparse.Namespace, work: Path) -> Path:
    """The scale run's pipeline YAML (written once; each stage reads it with --config)."""
    cfg = {
        "name": f"scale-{args.n}", "seed": 0,
        "data": {"source": "jsonl", "path": str(work / "structures.jsonl"), "shard_size": args.part_size,
                 "workers": args.workers},
        "embed": {"workers": args.workers, "shard_size": args.shard_size, "batch_size": 64, "device": "cpu",
                  "checkpoint": str(args.checkpoint or work / "train" / "train" / "best.pt")},
        # structure-only data: no 'spectrum_reference' baseline (the default layer list includes it and
        # analyze then fails with "no materials selected for column 'spectrum'")
        "analyze": {"workers": args.workers, "coordination": args.coordination, "max_clusters": 10,
                    "permutation_repeats": 2, "seed": 0, "layers": args.analyze_layers.split(","),
                    "engine": args.analyze_engine, "dask_workers": args.workers},
    }
    path = work / "scale.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_config(args: argparse.Namespace, work: Path) -> Path:
    """YAML of the small model trained on benchmark materials with spectra."""
    cfg = {
        "name": "scale-train", "seed": 0,
        "data": {"source": "benchmark", "benchmark": {"n_materials": args.train_n, "seed": 0}, "workers": args.workers},
        "model": {"hidden_features": 64, "embedding_features": 32},
        "train": {"epochs": args.train_epochs, "batch_size": 16, "learning_rate": 0.003, "device": "cpu",
                  "progress": False},
    }
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def rows_of(n: int, stages: list[dict], sizes: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    for s in stages:
        if s["rc"] != 0 or s["stage"] not in ("prepare", "embed", "analyze"):
            continue
        rows.append({"what": f"{s['stage']}: wall time", "unit": "s", "ours": s["wall_s"]})
        rows.append({"what": f"{s['stage']}: throughput", "unit": "materials/s", "ours": round(n / s["wall_s"], 2)})
        rows.append({"what": f"{s['stage']}: per material", "unit": "ms", "ours": round(1000 * s["wall_s"] / n, 3)})
        rows.append({"what": f"{s['stage']}: peak RSS (process tree)", "unit": "GiB", "ours": s["peak_rss_gib"]})
        if "peak_rss_one_process_gib" in s:
            rows.append({"what": f"{s['stage']}: peak RSS (largest one process)", "unit": "GiB",
                         "ours": s["peak_rss_one_process_gib"]})
    for store, b in sizes.items():
        rows.append({"what": f"{store}: bytes on disk per material", "unit": "B", "ours": round(b / n, 1)})
    return rows


# ----------------------------------------------------------------------------------------- issue 20: Dask analyze
def _synthetic_chunk(kind: str, a: int, b: int, width: int, seed: int) -> np.ndarray:
    """Rows a:b of the synthetic analyze inputs (deterministic per chunk): ``layer`` embeddings (40
    Gaussian blobs), ``prediction`` spectra (smooth edges on the grid), ``descriptors`` (first half
    0/1 categorical columns that follow the blob, second half continuous)."""
    k = 40
    centres = np.random.default_rng(seed).normal(scale=1.5, size=(k, width)).astype(np.float32)
    rng = np.random.default_rng([seed, a])
    lab = rng.integers(0, k, b - a)
    if kind == "layer":
        return centres[lab] + rng.standard_normal((b - a, width), dtype=np.float32)
    if kind == "prediction":
        e = np.linspace(0, 15, width, dtype=np.float32)
        onset = 1.0 + (lab % 10).astype(np.float32)[:, None]
        return (2.0 + 3.0 / (1.0 + np.exp(-(e[None, :] - onset) * 2.0))
                + 0.1 * rng.standard_normal((b - a, width), dtype=np.float32))
    half = width // 2
    cat = (rng.random((b - a, half)) < 0.05) | ((np.arange(half)[None, :] % k) == lab[:, None])
    cont = centres[lab, :width - half] + rng.standard_normal((b - a, width - half), dtype=np.float32)
    return np.hstack([cat.astype(np.float32), cont])


def write_synthetic(path: Path, kind: str, n: int, width: int, chunk: int, seed: int) -> Any:
    """A (n, width) float32 Zarr array written chunk by chunk (kept when it already has this shape)."""
    import zarr

    if (path / "zarr.json").exists():
        arr = zarr.open_array(str(path), mode="r")
        if arr.shape == (n, width) and arr.chunks[0] == chunk:
            return arr
    arr = zarr.create_array(str(path), shape=(n, width), chunks=(chunk, width), dtype="float32", overwrite=True)
    for a in range(0, n, chunk):
        arr[a:min(n, a + chunk)] = _synthetic_chunk(kind, a, min(n, a + chunk), width, seed)
    return zarr.open_array(str(path), mode="r")


class ProcessPeaks:
    """Peak RSS of each of several processes (not their trees), sampled in a background thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.2):
        import threading

        import psutil

        self.procs = {k: psutil.Process(p) for k, p in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.interval = interval

    def sample(self) -> None:
        import psutil

        for k, p in self.procs.items():
            with contextlib.suppress(psutil.Error):  # a worker that exited keeps its last peak
                self.peak[k] = max(self.peak[k], p.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def dask_analyze(args: argparse.Namespace) -> int:
    """Analyze's chunked passes at N materials on synthetic stores (``--dask-analyze``): feature
    statistics, micro-clusters + weighted Ward (``toolkit.analyze.clustering.cluster``), spectral
    signatures and Fisher tables from per-chunk sufficient statistics
    (``toolkit.analyze.dask_steps.cluster_moments``), on a Dask LocalCluster of ``--workers`` processes
    (``--engine dask``) or in this one process (``--engine local``). Peak RSS per process."""
    import resource

    from toolkit.analyze.clustering import cluster, use_chunk_map
    from toolkit.analyze.attribution import spectral_signature
    from toolkit.analyze.dask_steps import cluster_moments, fisher_tables, save_labels
    from toolkit.analyze.descriptors import DescriptorTable, add_spectral
    from toolkit.analyze.lazy import Spectra

    n, chunk = args.n, args.chunk_rows
    work = (args.work_dir or Path(f"/tmp/spectrolens-dask-analyze-{n}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    layer = write_synthetic(work / "layer.zarr", "layer", n, args.dim, chunk, 0)
    pred = write_synthetic(work / "prediction.zarr", "prediction", n, args.grid, chunk, 0)
    desc = write_synthetic(work / "descriptors.zarr", "descriptors", n, args.descriptors, chunk, 0)
    names = [f"element:E{j}" for j in range(args.descriptors // 2)] + \
            [f"cont_{j}" for j in range(args.descriptors - args.descriptors // 2)]
    gen_s = time.perf_counter() - t0
    print(f"[{time.strftime('%H:%M:%S')}] synthetic stores of {n} materials in {gen_s:.1f} s ({work})", flush=True)
    client = cluster_ = None
    pids = {"driver": os.getpid()}
    if args.engine == "dask":
        from distributed import Client, LocalCluster

        from toolkit.analyze.engine import DaskChunkMap, _worker_env

        cluster_ = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                                env=_worker_env(), local_directory=str(work / "dask-scratch"))
        client = Client(cluster_)
        for i, (addr, pid) in enumerate(sorted(client.run(os.getpid).items())):
            pids[f"worker_{i}"] = pid
    mapper = DaskChunkMap(client) if client is not None else None
    steps: dict[str, float] = {}
    with ProcessPeaks(pids) as peaks, use_chunk_map(mapper, chunk):
        t = time.perf_counter()
        res = cluster(layer, n_clusters="size", max_clusters=args.max_clusters, scalable_threshold=20_000,
                      n_micro=args.micro, seed=0, threads=1)
        steps["cluster (stats, micro-clusters, Ward, map)"] = time.perf_counter() - t
        t = time.perf_counter()
        lab = save_labels(work / "labels.zarr", res.labels, chunk)
        sig = cluster_moments(pred, lab, res.n_clusters, chunk)
        steps["spectral signatures (mean/std per cluster)"] = time.perf_counter() - t
        t = time.perf_counter()
        tables = fisher_tables(cluster_moments(desc, lab, res.n_clusters, chunk), names)
        steps["enrichment 2x2 tables (categorical)"] = time.perf_counter() - t
        # the stage's own spectra steps on a lazy view of the predicted spectra (never held whole in the driver)
        view, energy = Spectra(pred), np.linspace(0.0, 15.0, args.grid)
        t = time.perf_counter()
        stage_sig = spectral_signature(res.labels, energy, None, view, None, seed=0)
        steps["stage spectral signatures (sampled bands, lazy view)"] = time.perf_counter() - t
        t = time.perf_counter()
        feats = add_spectral(DescriptorTable(np.arange(n).astype(str).tolist(), [], np.zeros((n, 0)), []),
                             energy, view, prefix="pred:")
        steps["stage predicted spectral descriptors (chunks, lazy view)"] = time.perf_counter() - t
    if client is not None:
        client.close()
        cluster_.close()
    total = sum(steps.values())
    gib = {k: round(v / 2**30, 3) for k, v in peaks.peak.items()}
    rows = [{"what": f"dask analyze: {k}", "unit": "s", "ours": round(v, 2)} for k, v in steps.items()]
    rows += [{"what": "dask analyze: chunked passes total", "unit": "s", "ours": round(total, 2)},
             {"what": "dask analyze: per material", "unit": "ms", "ours": round(1000 * total / n, 4)}]
    rows += [{"what": f"dask analyze: peak RSS {k}", "unit": "GiB", "ours": v} for k, v in gib.items()]
    params = {"n": n, "engine": args.engine, "workers": args.workers if client is not None else 0,
              "chunk_rows": chunk, "dim": args.dim, "grid": args.grid, "descriptors": args.descriptors,
              "micro_clusters": args.micro, "k": res.n_clusters, "mode": res.mode,
              "chunk_bytes": {"layer": chunk * args.dim * 4, "prediction": chunk * args.grid * 4,
                              "descriptors": chunk * args.descriptors * 4},
              "driver_ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
              "tasks": mapper.tasks if mapper is not None else 0, "generate_s": round(gen_s, 1),
              "signature_finite": bool(np.isfinite(sig["mean"]).all()), "fisher_columns": len(tables),
              "stage_signature_clusters": len(stage_sig),
              "stage_signature_max_abs_diff_vs_exact_mean": float(np.nanmax(np.abs(np.stack(
                  [stage_sig[c]["predicted"]["mean"] for c in sorted(stage_sig)]) - sig["mean"]))),
              "pred_onset_defined": float(np.isfinite(feats.column("pred:onset")).mean()),
              "spectra_bytes_whole": n * args.grid * 4,
              "load_avg": os.getloadavg()[0]}
    emit("scale_run_dask_analyze", rows, params, args.json)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="materials in the scale run")
    ap.add_argument("--work-dir", type=Path, default=None, help="default /tmp/spectrolens-scale-<n>")
    ap.add_argument("--workers", type=int, default=2, help="prepare / embed / analyze workers")
    ap.add_argument("--seed", type=int, default=7, help="benchmark generator seed of the scale structures")
    ap.add_argument("--part-size", type=int, default=1024, help="prepare: materials per store part")
    ap.add_argument("--shard-size", type=int, default=1024, help="embed: materials per shard")
    ap.add_argument("--train-n", type=int, default=300)
    ap.add_argument("--train-epochs", type=int, default=3)
    ap.add_argument("--checkpoint", type=Path, default=None, help="use this model instead of training one")
    ap.add_argument("--coordination", choices=["cutoff", "crystalnn"], default="cutoff")
    ap.add_argument("--analyze-layers", default="alignn_4,gcn_4,readout,spectrum_predicted",
                    help="analyze.layers (comma-separated)")
    ap.add_argument("--analyze-engine", choices=["local", "dask"], default="local",
                    help="analyze.engine (dask: a LocalCluster of --workers processes; docs/dask.md)")
    ap.add_argument("--stages", default="prepare,embed,analyze", help="re-run a subset; earlier records are kept")
    ap.add_argument("--clean", action="store_true", help="delete the work dir first (default: resume)")
    ap.add_argument("--json", type=Path, default=None)
    g = ap.add_argument_group("--dask-analyze: analyze's chunked passes on synthetic stores (issue 20)")
    g.add_argument("--dask-analyze", action="store_true", help="measure only analyze's chunked passes at --n")
    g.add_argument("--engine", choices=["dask", "local"], default="dask")
    g.add_argument("--chunk-rows", type=int, default=16384)
    g.add_argument("--dim", type=int, default=64, help="embedding width")
    g.add_argument("--grid", type=int, default=151, help="spectrum grid points")
    g.add_argument("--descriptors", type=int, default=96, help="descriptor columns (half categorical)")
    g.add_argument("--micro", type=int, default=2000, help="micro-clusters")
    g.add_argument("--max-clusters", type=int, default=100)
    args = ap.parse_args()
    if args.dask_analyze:
        return dask_analyze(args)

    work = (args.work_dir or Path(f"/tmp/spectrolens-scale-{args.n}")).resolve()
    if args.clean and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    params: dict[str, Any] = {"n": args.n, "workers": args.workers, "part_size": args.part_size,
                              "analyze_engine": args.analyze_engine,
                              "shard_size": args.shard_size, "coordination": args.coordination,
                              "model": "hidden 64, embedding 32, 4 ALIGNN + 4 GCN layers, 1501 outputs, fp32 CPU",
                              "work_dir": str(work), "load_avg_start": os.getloadavg()[0]}
    record_file = work / "stages.json"  # stage records of earlier invocations (a re-run replaces a stage's)
    stages: list[dict] = json.loads(record_file.read_text()) if record_file.exists() else []
    sizes: dict[str, int] = {}

    def add(rec: dict) -> None:
        stages[:] = [s for s in stages if s["stage"] != rec["stage"]] + [rec]
        record_file.write_text(json.dumps(stages, indent=1))

    def report(partial: bool) -> None:
        params["partial"] = partial
        params["stages"] = stages
        params["load_avg_now"] = os.getloadavg()[0]
        emit("scale_run", rows_of(args.n, stages, sizes), params, args.json)

    gen_s = write_structures(work / "structures.jsonl", args.n, args.seed, args.workers)
    params["generate_structures_s"] = round(gen_s, 1)
    params["structures_jsonl_bytes"] = (work / "structures.jsonl").stat().st_size
    print(f"structures.jsonl: {args.n} records in {gen_s:.1f} s", flush=True)

    if args.checkpoint is None and not (work / "train" / "train" / "best.pt").exists():
        tdir, tcfg = work / "train", train_config(args, work)
        for name, cmd in (("train_prepare", ["prepare"]), ("train", ["train"])):
            rec = run_stage(name, [*cmd, "--config", str(tcfg), "--run-dir", str(tdir)], logs)
            add(rec)
            if rec["rc"] != 0:
                report(True)
                return 1
    cfg, rdir = config(args, work), work / "run"
    for stage in args.stages.split(","):
        rec = run_stage(stage, [stage, "--config", str(cfg), "--run-dir", str(rdir)], logs)
        add(rec)
        for store in ("dataset.zarr", "embeddings.zarr"):
            if (rdir / store).exists():
                sizes[store] = du_bytes(rdir / store)
        report(True)
        if rec["rc"] != 0:
            return 1
    report(False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
