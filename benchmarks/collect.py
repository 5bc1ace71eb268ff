"""Runs the benchmark scripts one after another (each in its own process, so they do not share
allocator or thread state) and writes benchmarks/results/all.json plus the table between the
markers in docs/performance.md. Called by benchmarks/run_all."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import REPO, machine_info

RESULTS = REPO / "benchmarks" / "results"
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"

# (name, script, normal args, quick args)
SUITE = [
    ("graph_construction", "graph_construction.py", [], ["--structures", "40", "--repeats", "2"]),
    ("loader_streaming", "loader_streaming.py", [], ["--parts", "2", "4"]),
    ("model_step", "model_step.py", [], ["--structures", "32", "--repeats", "2"]),
    ("train_throughput", "train_throughput.py", [], ["--structures", "32", "--repeats", "2"]),
    ("extract_throughput", "extract_throughput.py", [], ["--n", "32", "--repeats", "2"]),
    ("descriptors", "descriptors_speed.py", [], ["--structures", "20"]),
    ("clustering_scale", "clustering_scale.py", [], ["--n", "100000", "--ref-n", "2000", "--repeats", "1"]),
    ("profile_hotpaths", "profile_hotpaths.py", [], ["--n", "64"]),
]
SCALE = ("scale_run", "scale_run.py", [], ["--n", "2000"])
GPU = ("gpu_suite", "gpu_suite.py", [], ["--structures", "256", "--max-batch", "256"])  # --gpu: needs CUDA


def table(results: list[dict]) -> str:
    lines = ["| benchmark | measure | ours | upstream ALIGNN | ratio |", "|---|---|---|---|---|"]
    for res in results:
        for r in res.get("rows", []):
            up = r.get("upstream")
            ratio = r.get("ratio")
            lines.append(f"| {res['name']} | {r['what']} | {r['ours']:.4g} {r.get('unit', '')} | "
                         + (f"{up:.4g} {r.get('unit', '')}" if up is not None else "n/a") + " | "
                         + (f"{ratio:.2f}x" if ratio is not None else "") + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scale", action="store_true")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--gpu", action="store_true", help="also the GPU suite (benchmarks/gpu_suite.py; needs CUDA)")
    args = ap.parse_args()
    suite = SUITE + ([SCALE] if args.scale else []) + ([GPU] if args.gpu else [])
    RESULTS.mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    for name, script, normal, quick in suite:
        if args.only and name not in args.only:
            continue
        out = RESULTS / f"{name}.json"
        cmd = [sys.executable, str(REPO / "benchmarks" / script), *(quick if args.quick else normal), "--json", str(out)]
        print("$", " ".join(cmd), flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=REPO)
        if rc != 0 or not out.exists():
            failed.append(name)
            print(f"!! {name} failed (exit {rc})", flush=True)
            continue
        res = json.loads(out.read_text())
        res["wall_s"] = round(time.time() - t0, 1)
        results.append(res)
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "quick": args.quick,
               "results": results, "failed": failed}
    (RESULTS / "all.json").write_text(json.dumps(summary, indent=2))
    perf = REPO / "docs" / "performance.md"
    text = perf.read_text() if perf.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    m = summary["machine"]
    block = (f"{BEGIN}\nLast `benchmarks/run_all{' --quick' if args.quick else ''}`: {summary['date']}, "
             f"{m.get('cpu', '?')}, {m.get('cpus')} cores, {m.get('mem_gib')} GiB, torch {m.get('torch')}, "
             f"alignn {m.get('alignn')}. Medians; ratio = ours / upstream throughput (higher is better) "
             f"unless the row says otherwise.\n\n{table(results)}\n{END}")
    if BEGIN in text and END in text:
        text = text.split(BEGIN)[0] + block + text.split(END, 1)[1]
    else:
        text += "\n" + block + "\n"
    perf.write_text(text)
    print(table(results))
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
