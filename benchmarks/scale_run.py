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

Every stage is resumable (its own completion records), so re-running the command after a kill
continues. After each stage the JSON file is rewritten with what finished so far (``partial: true``
until the end), so a run cut short still reports per-material costs. No upstream equivalent exists
(upstream ALIGNN has no dataset store or batch extraction stage): rows carry no ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

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
        with PeakMemory(proc.pid, interval=0.5) as mem:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    rec = {"stage": name, "wall_s": round(wall, 2), "peak_rss_gib": round(mem.peak_gib, 3), "rc": rc,
           "load_avg": os.getloadavg()[0]}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: rc {rc}, {wall:.1f} s, peak RSS {mem.peak_gib:.2f} GiB", flush=True)
    if rc != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
    return rec


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
                    "permutation_repeats": 2, "seed": 0, "layers": args.analyze_layers.split(",")},
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
    for store, b in sizes.items():
        rows.append({"what": f"{store}: bytes on disk per material", "unit": "B", "ours": round(b / n, 1)})
    return rows


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
    ap.add_argument("--stages", default="prepare,embed,analyze", help="re-run a subset; earlier records are kept")
    ap.add_argument("--clean", action="store_true", help="delete the work dir first (default: resume)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    work = (args.work_dir or Path(f"/tmp/spectrolens-scale-{args.n}")).resolve()
    if args.clean and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    params: dict[str, Any] = {"n": args.n, "workers": args.workers, "part_size": args.part_size,
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
