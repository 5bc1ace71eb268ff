"""Stage wall times of two code revisions in the same run: did a change slow prepare, train or embed?

Checks the base revision out into a temporary git worktree and runs the real commands of each side
(``python -m toolkit.cli prepare|train|embed`` with ``PYTHONPATH`` on that side's tree) on the same
inputs, alternating which side goes first, and prints per-stage medians and the ratio
base/current (> 1: the current tree is faster). Stages: prepare (240 MP structures, 2 workers),
train (benchmark data, 2 epochs of the small demo-like model), embed (every layer, 1 worker) and, with
``--stages ...,analyze``, analyze with each side's *default* analysis settings on that embedded run
(descriptors included; a fresh copy of the run directory per repeat, so nothing is cached).

    python benchmarks/compare_revisions.py --base HEAD~3 --repeats 4
    python benchmarks/compare_revisions.py --base 3045198 --stages analyze --materials 800 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MALLOC_ENV, REPO, SHARED_DATA, alternating, emit, tune_malloc

COMMON = ["--set", "model.alignn_layers=2", "--set", "model.gcn_layers=2", "--set", "model.hidden_features=64",
          "--set", "model.embedding_features=32", "--set", "data.grid.num=301"]


def stage_commands(work: Path, data: Path, materials: int = 160) -> dict[str, list[list[str]]]:
    """Each stage's command(s) on ``work`` (train and embed get their own prepared run directories)."""
    jsonl = ["--set", "data.source=jsonl", "--set", f"data.path={data}", "--set", "data.shard_size=24",
             "--set", "data.workers=2"]
    bench = ["--set", "data.source=benchmark", "--set", f"data.benchmark.n_materials={materials}", "--set", "data.workers=2",
             "--set", "data.shard_size=40", "--set", "train.epochs=2", "--set", "train.batch_size=16",
             "--set", "train.progress=false", "--set", "embed.workers=1", "--set", "embed.shard_size=40"]
    cli = [sys.executable, "-m", "toolkit.cli"]
    return {
        "prepare": [[*cli, "prepare", "--run-dir", str(work / "prepare"), *jsonl, *COMMON]],
        "train": [[*cli, "train", "--run-dir", str(work / "bench"), *bench, *COMMON]],
        "embed": [[*cli, "embed", "--run-dir", str(work / "bench"), *bench, *COMMON]],
        "analyze": [[*cli, "analyze", "--run-dir", str(work / "analyze"), *bench, *COMMON,
                     "--set", "analyze.workers=2"]],
    }


def run_side(tree: Path, work: Path, data: Path, env: dict, stages: list[str], materials: int) -> dict[str, float]:
    """One repeat of ``stages`` on ``tree``; returns wall seconds per stage."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmds = stage_commands(work, data, materials)
    # the train/embed run directory needs a dataset first (not timed)
    subprocess.run([sys.executable, "-m", "toolkit.cli", "prepare", "--run-dir", str(work / "bench"),
                    *cmds["train"][0][cmds["train"][0].index("--run-dir") + 2:]], cwd=tree, env=env, check=True,
                   capture_output=True)
    out = {}
    for stage in stages:
        if stage == "analyze":  # a fresh copy of the trained, embedded run: no descriptor cache, no earlier analysis
            if not (work / "bench" / "embeddings.zarr").exists():
                for pre in ("train", "embed"):
                    subprocess.run(cmds[pre][0], cwd=tree, env=env, check=True, capture_output=True)
            shutil.rmtree(work / "analyze", ignore_errors=True)
            shutil.copytree(work / "bench", work / "analyze", ignore=shutil.ignore_patterns("analyze", ".locks"))
        t0 = time.perf_counter()
        for cmd in cmds[stage]:
            p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"{stage} failed on {tree}:\n{p.stderr[-3000:]}")
        out[stage] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="git revision to compare the working tree with")
    ap.add_argument("--repeats", type=int, default=4, help="even: the two sides alternate order")
    ap.add_argument("--structures", type=int, default=240)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--stages", default="prepare,train,embed", help="comma list of prepare, train, embed, analyze")
    ap.add_argument("--materials", type=int, default=160, help="benchmark materials of the train/embed/analyze run")
    args = ap.parse_args()
    stages = [x for x in args.stages.split(",") if x]
    tune_malloc()
    tmp = Path(tempfile.mkdtemp(prefix="spectrolens-compare-"))
    base_tree = tmp / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.base], check=True,
                   capture_output=True)
    try:
        data = tmp / "structures.jsonl"
        lines = (SHARED_DATA / "mp_structures" / "mp_structures.jsonl").read_text().splitlines(True)
        data.write_text("".join(lines[: args.structures]))
        sides = {"base": base_tree, "current": REPO}

        def side_run(side: str):
            env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(sides[side]), "OMP_NUM_THREADS": "2"}
            return run_side(sides[side], tmp / f"work-{side}", data, env, stages, args.materials)

        runs = alternating({side: (lambda side=side: side_run(side)) for side in sides}, args.repeats)
        rows = []
        print(f"stage wall seconds, median of {args.repeats} (base {args.base} vs working tree), alternating order")
        for stage in stages:
            b = statistics.median(r[stage] for r in runs["base"])
            c = statistics.median(r[stage] for r in runs["current"])
            rows.append({"what": f"{stage} wall time (s; ratio = base/current, >1 faster)", "unit": "s",
                         "ours": c, "upstream": b, "ratio": b / c})
            if stage == "analyze":
                rows.append({"what": "analyze ms per material", "unit": "ms", "ours": 1e3 * c / args.materials,
                             "upstream": 1e3 * b / args.materials, "ratio": b / c})
        emit("compare_revisions", rows, {"base": args.base, "repeats": args.repeats, "stages": stages,
                                         "structures": args.structures, "materials": args.materials}, args.json)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
