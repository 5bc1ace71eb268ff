"""Whole training epochs on real structures: `spectrolens train` vs upstream ALIGNN's own `train_dgl`.

Both sides train end to end, each with its own data pipeline, validation and checkpointing, on the
SAME structures with the SAME targets:

* structures: the study's POSCARs (``paper_structures/*.vasp``) first, then Materials Project
  structures (``mp_structures/mp_structures.jsonl``, those with an anion, as the real-structure
  benchmark uses them) up to ``--n``, written into one POSCAR folder;
* targets: the real-structure benchmark's planted-rule spectra (``data.source: realbench``,
  toolkit/data/realbench.py), log10(alpha) on the study's grid (1,501 points, 0-15 eV);
* ours: ``spectrolens prepare`` once (not timed), then ``spectrolens train`` per run (the real CLI and
  stage: store loader, collate, fused kernel, validation, ``best.pt`` / ``last.pt`` every epoch);
* upstream: ``alignn.data.get_train_val_loaders`` (its LMDB dataset of DGL graphs and line graphs,
  built from the same structures, read from our prepared store, with the same spectra) and
  ``alignn.train.train_dgl`` with its default DGL model ``alignn_atomwise`` (its defaults, except
  ``calculate_gradient`` and ``energy_mult_natoms`` off: a spectrum is no energy; validation,
  ``current_model.pt`` / ``current_state.pt`` / ``best_model.pt`` and its JSON dumps every epoch);
  DGL is imported through toolkit/compat/dgl.py (the GraphBolt stand-in).

Same settings for both: 4 ALIGNN + 4 GCN layers, embedding 64, hidden ``--hidden``, 1,501 outputs,
batch 16, L1 loss, AdamW lr 1e-3 / wd 1e-5 with a one-cycle schedule, split 0.8 / 0.1 / 0.1, graphs
with cutoff 8 Å and 12 neighbours, no loader workers, ``--threads`` torch threads, the glibc malloc
settings of notes/platform-facts.md. Each side runs in its own process; runs alternate ours/upstream
(the order flips every pair). Epoch time is wall time between consecutive epoch ends as seen by this
script (ours: the stage's "epoch k/N" log line; upstream: its per-epoch print), so it includes
training, validation and checkpoint writing; the first epoch (start-up, warm-up) is excluded and
the median over the rest is reported. Peak RSS is of the process tree (sampled every 0.2 s), including
upstream's in-process LMDB build (that is how ``train_dgl`` is used) but not our separate prepare.

    python benchmarks/real_epoch.py [--n 815] [--epochs 3] [--hidden 128 256] [--repeats 1] [--json OUT]

Prints seconds per epoch, training structures/s and peak RSS per side, and the ratios
upstream/ours (> 1: ours faster / smaller). Exits non-zero if either side fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED_DATA, PeakMemory, emit, tune_malloc

OURS_EPOCH = re.compile(r"epoch (\d+)/(\d+): train loss")
UP_EPOCH = re.compile(r"^REAL_EPOCH_END (\d+) train_s ([0-9.eE+-]+) val_s ([0-9.eE+-]+)")


# --------------------------------------------------------------------------------------- data

def write_structures(folder: Path, n: int, paper: Path, mp_jsonl: Path) -> int:
    """The study's POSCARs, then MP structures with an anion, up to ``n`` files in ``folder``."""
    from pymatgen.core import Structure

    from toolkit.data.realbench import _has_anion

    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for p in sorted(paper.glob("*.vasp")):
        if count >= n:
            return count
        shutil.copy(p, folder / p.name)
        count += 1
    with open(mp_jsonl) as fh:
        for line in fh:
            if count >= n:
                break
            if not line.strip():
                continue
            rec = json.loads(line)
            s = Structure.from_dict(rec["structure"])
            if not _has_anion({el.symbol for el in s.composition.elements}):
                continue
            s.to(filename=str(folder / f"POSCAR_{rec['material_id']}.vasp"), fmt="poscar")
            count += 1
    return count


def upstream_dataset(store: Path, out: Path) -> int:
    """The prepared structures and spectra as upstream's ``dataset_array`` (jarvis Atoms dicts), JSON."""
    import numpy as np
    from jarvis.core.atoms import Atoms
    from pymatgen.core.periodic_table import Element

    from toolkit.data.store import DatasetReader

    r = DatasetReader(store)
    rows = []
    for i in range(len(r)):
        m = r.material(i)
        if not m["has_spectrum"]:
            continue
        y = np.asarray(m["spectrum"], dtype=np.float64)
        if not np.isfinite(y).all():
            continue
        atoms = Atoms(lattice_mat=np.asarray(m["lattice"], dtype=np.float64).tolist(),
                      coords=np.asarray(m["frac_coords"], dtype=np.float64).tolist(),
                      elements=[Element.from_Z(int(z)).symbol for z in m["numbers"]], cartesian=False)
        rows.append({"jid": m["id"], "atoms": atoms.to_dict(), "target": y.tolist()})
    out.write_text(json.dumps(rows))
    return len(rows)


# --------------------------------------------------------------------------------------- runs

def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def run_side(name: str, cmd: list[str], env: dict, pattern: re.Pattern, log: Path, timeout: float) -> dict:
    """Run one side; timestamp its epoch-end lines as they arrive; peak RSS of its process tree."""
    t_start = time.monotonic()
    cpu0, load0 = os.times(), os.getloadavg()[0]
    ends: list[float] = []
    own: list[tuple[float, float]] = []
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, cwd=REPO)

        def reader() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                t = time.monotonic()
                lf.write(line)
                mt = pattern.search(line)
                if mt:
                    ends.append(t)
                    if name == "upstream":
                        own.append((float(mt.group(2)), float(mt.group(3))))

        th = threading.Thread(target=reader, daemon=True)
        with PeakMemory(proc.pid) as mem:
            th.start()
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
                lf.write(f"\n[real_epoch] killed after {timeout:.0f} s\n")
            th.join(timeout=10)
    epochs = [b - a for a, b in itertools.pairwise(ends)]  # epochs 2..N: end(k) - end(k-1)
    cpu1, wall = os.times(), time.monotonic() - t_start
    # CPU seconds of the (waited-for) child per wall second: ~threads when it had the cores to itself;
    # clearly less means other work on the machine took cores from it (see docs/performance.md)
    cpu_per_wall = ((cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)) / wall
    return {"rc": rc, "wall_s": wall, "cpu_per_wall": cpu_per_wall, "loadavg_1min": [load0, os.getloadavg()[0]], "first_epoch_end_s": (ends[0] - t_start) if ends else None,
            "epoch_s": epochs, "n_epochs_seen": len(ends), "peak_rss_gib": mem.peak_gib, "own_train_val_s": own,
            "log": str(log)}


def upstream_worker(spec_path: Path) -> int:
    """In a child process: upstream's loaders (LMDB, DGL graphs) and ``train_dgl`` on the shared dataset."""
    spec = json.loads(spec_path.read_text())
    import torch

    torch.set_num_threads(int(spec["threads"]))
    sys.path.insert(0, str(REPO))
    from toolkit.compat.dgl import import_dgl

    import_dgl()
    import alignn.train as at
    from alignn.config import TrainingConfig
    from alignn.data import get_train_val_loaders

    dataset = json.loads(Path(spec["dataset"]).read_text())
    out = Path(spec["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    config = TrainingConfig(
        dataset="user_data", target="target", epochs=spec["epochs"], batch_size=spec["batch"],
        learning_rate=1e-3, weight_decay=1e-5, criterion="l1", optimizer="adamw", scheduler="onecycle",
        train_ratio=0.8, val_ratio=0.1, test_ratio=0.1, num_workers=0, pin_memory=False,
        cutoff=8.0, max_neighbors=12, use_lmdb=True, read_existing=False, output_dir=str(out),
        filename=str(out / "lmdb"), random_seed=123, progress=False,
        model={"name": "alignn_atomwise", "alignn_layers": spec["layers"], "gcn_layers": spec["layers"],
               "hidden_features": spec["hidden"], "embedding_features": 64,
               "output_features": len(dataset[0]["target"]), "atom_input_features": 92,
               # a spectrum, not an energy: no forces, no multiplication by the atom count
               "calculate_gradient": False, "energy_mult_natoms": False})
    t0 = time.monotonic()
    train_loader, val_loader, test_loader, prepare_batch = get_train_val_loaders(
        dataset_array=dataset, target="target", n_train=None, n_val=None, n_test=None,
        train_ratio=config.train_ratio, val_ratio=config.val_ratio, test_ratio=config.test_ratio,
        line_graph=True, batch_size=config.batch_size, atom_features=config.atom_features,
        neighbor_strategy=config.neighbor_strategy, standardize=False, id_tag="jid",
        pin_memory=config.pin_memory, workers=config.num_workers, save_dataloader=False,
        use_canonize=config.use_canonize, filename=config.filename, cutoff=config.cutoff,
        cutoff_extra=config.cutoff_extra, max_neighbors=config.max_neighbors,
        three_body_cutoff=config.three_body_cutoff, output_features=config.model.output_features,
        keep_data_order=config.keep_data_order, output_dir=config.output_dir, use_lmdb=True,
        use_pure_torch=False, read_existing=False, dtype=config.dtype)
    del dataset
    print(f"REAL_LOADERS train {len(train_loader.dataset)} val {len(val_loader.dataset)} "
          f"test {len(test_loader.dataset)} built_s {time.monotonic() - t0:.2f}", flush=True)
    orig = at.print_train_val_loss

    def marked(*a, **k):  # called once per epoch, after validation and checkpoints
        orig(*a, **k)
        print(f"REAL_EPOCH_END {a[0]} train_s {float(a[13]):.3f} val_s {float(a[14]):.3f}", flush=True)

    at.print_train_val_loss = marked
    at.train_dgl(config, train_val_test_loaders=[train_loader, val_loader, test_loader, prepare_batch])
    return 0


OP_GROUPS = (  # torch.profiler op name -> part of the model step (self CPU time)
    ("fused gate kernel (spectrolens::gate_forward/backward)", ("spectrolens::gate",)),
    ("fused LayerNorm-SiLU-residual kernel (spectrolens::ln_silu_forward/backward)", ("spectrolens::ln_silu",)),
    ("matrix products (mm, addmm, bmm, linear)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul",
                                                  "aten::linear")),
    ("gathers / scatters (index_select, index_add_, gather, scatter, embedding)",
     ("aten::index", "aten::scatter", "aten::gather", "aten::embedding", "aten::segment", "aten::repeat_interleave",
      "aten::take")),
    ("layer norm (fwd + bwd)", ("aten::native_layer_norm", "aten::layer_norm")),
    ("optimizer + clipping (_foreach_*)", ("aten::_foreach", "aten::_fused_adam")),
)


def profile_worker(spec_path: Path) -> int:
    """In a child process: `spectrolens train` (the CLI, in process) with timers around each part of an
    epoch, cProfile of the data loading and torch.profiler of the last epoch's model ops."""
    import collections
    import cProfile
    import io
    import pstats

    spec = json.loads(spec_path.read_text())
    out = Path(spec["out"])
    sys.path.insert(0, str(REPO))
    import torch
    from torch.profiler import ProfilerActivity, profile

    import toolkit.train.data as TD
    import toolkit.train.loop as L
    from toolkit import cli
    from toolkit.model import alignn as A

    last = int(spec["epochs"]) - 1  # the profiled epoch (0-based); the one before it is timed without profilers
    acc: dict[int, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    cur = {"epoch": 0, "t_epoch": 0.0}
    walls: dict[int, float] = {}
    loader_prof = cProfile.Profile()
    tprof: dict[str, object] = {}

    def timed(part, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[cur["epoch"]][part] += time.perf_counter() - t
        return wrapper

    class TimedLoader:
        def __init__(self, it, part):
            self.it, self.part = it, part

        def __len__(self):
            return len(self.it)

        def __iter__(self):
            t = time.perf_counter()
            it = iter(self.it)
            acc[cur["epoch"]][self.part] += time.perf_counter() - t
            while True:
                on = cur["epoch"] == last
                t = time.perf_counter()
                if on:
                    loader_prof.enable()
                try:
                    b = next(it)
                except StopIteration:
                    return
                finally:
                    if on:
                        loader_prof.disable()
                    acc[cur["epoch"]][self.part] += time.perf_counter() - t
                yield b

    orig_loaders = TD.TrainingData.loaders

    def loaders(self, *a, **k):
        ld = orig_loaders(self, *a, **k)
        ld.train = TimedLoader(ld.train, "train: data loading (store read, line graph, collate)")
        if ld.val is not None:
            ld.val = TimedLoader(ld.val, "validation: data loading")
        return ld

    TD.TrainingData.loaders = loaders
    orig_step = L.Trainer._train_step

    def step(self, batch):
        cur["epoch"] = self.state.epoch
        if self.state.epoch == last and "p" not in tprof:
            tprof["p"] = profile(activities=[ProfilerActivity.CPU])
            tprof["p"].__enter__()
        t = time.perf_counter()
        try:
            return orig_step(self, batch)
        finally:
            acc[cur["epoch"]]["train: model step (total)"] += time.perf_counter() - t

    L.Trainer._train_step = step
    orig_fwd = A.ALIGNN.forward

    def fwd(self, *a, **k):
        t = time.perf_counter()
        try:
            return orig_fwd(self, *a, **k)
        finally:
            acc[cur["epoch"]]["train: forward" if self.training else "validation: forward"] += time.perf_counter() - t

    A.ALIGNN.forward = fwd
    torch.Tensor.backward = timed("train: backward", torch.Tensor.backward)
    torch.nn.utils.clip_grad_norm_ = timed("train: gradient clipping", torch.nn.utils.clip_grad_norm_)
    torch.optim.AdamW.step = timed("train: AdamW step", torch.optim.AdamW.step)
    L.Trainer.evaluate = timed("validation (total)", L.Trainer.evaluate)
    L.Trainer.save_best = timed("checkpoint: best.pt", L.Trainer.save_best)
    orig_last = L.Trainer.save_last
    orig_fit = L.Trainer.fit

    def fit(self, *a, **k):
        cur["t_epoch"] = time.perf_counter()
        return orig_fit(self, *a, **k)

    def save_last(self):
        t = time.perf_counter()
        try:
            return orig_last(self)
        finally:
            now = time.perf_counter()
            e = self.state.epoch - 1  # save_last runs after the epoch counter moved on
            acc[e]["checkpoint: last.pt"] += now - t
            if e not in walls:
                walls[e] = now - cur["t_epoch"]
                cur["t_epoch"] = now
                if e == last and "p" in tprof:
                    tprof["p"].__exit__(None, None, None)
                    tprof["done"] = True
            cur["epoch"] = self.state.epoch

    L.Trainer.fit = fit
    L.Trainer.save_last = save_last
    rc = cli.main(spec["argv"])
    res: dict[str, object] = {"rc": rc, "epochs": {str(e): {"wall_s": walls.get(e), **acc[e]} for e in sorted(acc)}}
    if tprof.get("done"):
        ka = tprof["p"].key_averages()  # type: ignore[union-attr]
        (out / "profile_ops.txt").write_text(ka.table(sort_by="self_cpu_time_total", row_limit=40))
        groups: dict[str, float] = collections.defaultdict(float)
        total = 0.0
        for ev in ka:
            self_s = ev.self_cpu_time_total / 1e6
            total += self_s
            for gname, prefixes in OP_GROUPS:
                if ev.key.startswith(prefixes):
                    groups[gname] += self_s
                    break
            else:
                groups["other ops (elementwise, copies, Python between ops)" if ev.key.startswith("aten::")
                       else "other (non-aten events)"] += self_s
        res["ops_self_s"] = dict(groups)
        res["ops_total_self_s"] = total
    sio = io.StringIO()
    pstats.Stats(loader_prof, stream=sio).sort_stats("cumulative").print_stats(25)
    (out / "profile_loader.txt").write_text(sio.getvalue())
    (out / "profile.json").write_text(json.dumps(res, indent=2))
    return int(rc or 0)


def profile_ours(args: argparse.Namespace, work: Path, run: Path, argv: list[str], env: dict) -> int:
    """Run the profile worker and print the breakdown of the last unprofiled epoch and the op groups."""
    shutil.rmtree(run / "train", ignore_errors=True)
    spec = work / "profile_spec.json"
    spec.write_text(json.dumps({"argv": argv, "epochs": args.epochs, "out": str(work)}))
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--profile-worker", str(spec)]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    (work / "profile.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0 or not (work / "profile.json").exists():
        print((p.stdout + p.stderr)[-3000:], file=sys.stderr)
        print("ours: profiled run failed", file=sys.stderr)
        return 1
    res = json.loads((work / "profile.json").read_text())
    ep = res["epochs"]
    e = str(args.epochs - 2)  # the last epoch without profilers (epoch 1 is warm-up when epochs >= 3)
    row = ep[e]
    wall = row.pop("wall_s")
    print(f"\nours, hidden {args.hidden[0]}: epoch {int(e) + 1} of {args.epochs} (no profiler), wall {wall:.2f} s")
    step = row.get("train: model step (total)", 0.0)
    parts = ["train: data loading (store read, line graph, collate)", "train: forward", "train: backward",
             "train: gradient clipping", "train: AdamW step", "validation: data loading", "validation: forward",
             "validation (total)", "checkpoint: best.pt", "checkpoint: last.pt"]
    for k in parts:
        if k in row:
            print(f"  {k:<58} {row[k]:8.2f} s  {100 * row[k] / wall:5.1f} %")
    inner = sum(row.get(k, 0.0) for k in ("train: forward", "train: backward", "train: gradient clipping",
                                          "train: AdamW step"))
    print(f"  {'train: rest of the step (loss, NaN check, zero_grad, LR)':<58} {step - inner:8.2f} s  "
          f"{100 * (step - inner) / wall:5.1f} %")
    rest = wall - step - sum(row.get(k, 0.0) for k in ("train: data loading (store read, line graph, collate)",
                                                        "validation (total)", "checkpoint: best.pt",
                                                        "checkpoint: last.pt"))
    print(f"  {'loop overhead (collectives, metrics, logging)':<58} {rest:8.2f} s  {100 * rest / wall:5.1f} %")
    if "ops_self_s" in res:
        tot = res["ops_total_self_s"]
        print(f"epoch {args.epochs} under torch.profiler: {tot:.2f} s self CPU time in recorded ops, by group:")
        for k, v in sorted(res["ops_self_s"].items(), key=lambda kv: -kv[1]):
            print(f"  {k:<75} {v:8.2f} s  {100 * v / tot:5.1f} %")
    print(f"op table: {work / 'profile_ops.txt'}; data-loading cProfile: {work / 'profile_loader.txt'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"name": "real_epoch_profile", "hidden": args.hidden[0], **res}, indent=2))
    return 0


# --------------------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=815, help="number of structures (paper POSCARs first, then MP)")
    ap.add_argument("--epochs", type=int, default=3, help=">= 2: the first epoch is excluded")
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--layers", type=int, default=4, help="ALIGNN layers = GCN layers")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="ours/upstream pairs per hidden size (order alternates)")
    ap.add_argument("--paper", type=Path, default=SHARED_DATA / "paper_structures")
    ap.add_argument("--mp", type=Path, default=SHARED_DATA / "mp_structures" / "mp_structures.jsonl")
    ap.add_argument("--workdir", type=Path, default=None, help="keep run folders and logs here (default: temporary)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-malloc-tuning", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="instead of the comparison: one ours run at the first --hidden with a time breakdown of "
                         "each epoch part, cProfile of data loading and torch.profiler of the last epoch")
    ap.add_argument("--upstream-worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--profile-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.upstream_worker:
        return upstream_worker(args.upstream_worker)
    if args.profile_worker:
        return profile_worker(args.profile_worker)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch is excluded)")
    tune_malloc(args.no_malloc_tuning)

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="real_epoch_")
        work = Path(tmp.name)
    else:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    spectrolens = str(bindir / "spectrolens") if (bindir / "spectrolens").exists() else shutil.which("spectrolens")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONUNBUFFERED": "1", "DGLBACKEND": "pytorch"}
    if not args.no_malloc_tuning:
        from toolkit.runtime import MALLOC_ENV
        env.update(MALLOC_ENV)

    # 1. structures and our prepared store (shared by every run; not timed)
    sfolder = work / "structures"
    if sfolder.exists():
        shutil.rmtree(sfolder)
    n_files = write_structures(sfolder, args.n, args.paper, args.mp)
    run = work / "ours"
    if run.exists():
        shutil.rmtree(run)
    data_sets = ["data.source=realbench", "data.realbench.mp=false", f"data.realbench.paths=[{sfolder}]",
                 "data.workers=2", "data.shard_size=256"]
    t0 = time.monotonic()
    p = subprocess.run([spectrolens, "prepare", "--run-dir", str(run), *_sets(data_sets)],
                       env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-3000:], sep="\n", file=sys.stderr)
        print("ours: spectrolens prepare failed", file=sys.stderr)
        return 1
    t_prep = time.monotonic() - t0
    ds = work / "upstream_dataset.json"
    n = upstream_dataset(run / "dataset.zarr", ds)
    print(f"{n} structures with spectra ({n_files} files: paper POSCARs + MP), prepared in {t_prep:.1f} s; "
          f"{args.layers}+{args.layers} layers, batch {args.batch}, {args.threads} threads, {args.epochs} epochs, "
          f"workdir {work}", flush=True)

    def ours_argv(hidden: int) -> list[str]:
        sets = data_sets + [
            f"model.alignn_layers={args.layers}", f"model.gcn_layers={args.layers}",
            f"model.hidden_features={hidden}", "model.embedding_features=64",
            f"train.epochs={args.epochs}", f"train.batch_size={args.batch}", "train.learning_rate=0.001",
            "train.weight_decay=0.00001", "train.loss=l1", "train.device=cpu", "train.precision=fp32",
            "train.num_workers=0", "train.progress=false", "train.split=[0.8,0.1,0.1]"]
        return ["train", "--run-dir", str(run), *_sets(sets)]

    if args.profile:
        return profile_ours(args, work, run, ours_argv(args.hidden[0]), env)

    results: dict[int, dict[str, list[dict]]] = {}
    failed = []
    k = 0
    for hidden in args.hidden:
        results[hidden] = {"ours": [], "upstream": []}
        for rep in range(args.repeats):
            order = ["ours", "upstream"] if k % 2 == 0 else ["upstream", "ours"]
            k += 1
            for side in order:
                tag = f"h{hidden}_r{rep}_{side}"
                if side == "ours":
                    shutil.rmtree(run / "train", ignore_errors=True)
                    cmd = [spectrolens, *ours_argv(hidden)]
                    r = run_side("ours", cmd, env, OURS_EPOCH, work / f"{tag}.log", args.timeout)
                else:
                    out = work / f"up_{tag}"
                    shutil.rmtree(out, ignore_errors=True)
                    spec = work / f"{tag}.json"
                    spec.write_text(json.dumps({"dataset": str(ds), "output_dir": str(out), "hidden": hidden,
                                                "layers": args.layers, "epochs": args.epochs, "batch": args.batch,
                                                "threads": args.threads}))
                    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--upstream-worker", str(spec)]
                    r = run_side("upstream", cmd, env, UP_EPOCH, work / f"{tag}.log", args.timeout)
                ok = r["rc"] == 0 and r["n_epochs_seen"] == args.epochs
                med = statistics.median(r["epoch_s"]) if r["epoch_s"] else float("nan")
                print(f"  hidden {hidden:4d} {side:8s}: rc {r['rc']}, epochs seen {r['n_epochs_seen']}, "
                      f"epoch s {', '.join(f'{x:.2f}' for x in r['epoch_s'])} (median {med:.2f}), "
                      f"first epoch ends at {r['first_epoch_end_s'] or float('nan'):.1f} s, "
                      f"peak RSS {r['peak_rss_gib']:.2f} GiB, CPU/wall {r['cpu_per_wall']:.2f}, "
                      f"load {r['loadavg_1min'][0]:.1f}->{r['loadavg_1min'][1]:.1f}, log {r['log']}", flush=True)
                if not ok:
                    failed.append(tag)
                    print(Path(r["log"]).read_text()[-3000:], file=sys.stderr)
                results[hidden][side].append(r)

    # train split sizes: ours 0.8 of n (toolkit.train.split), upstream from its loader line
    n_train_up = None
    for hidden in args.hidden:
        for r in results[hidden]["upstream"]:
            m = re.search(r"REAL_LOADERS train (\d+)", Path(r["log"]).read_text())
            if m:
                n_train_up = int(m.group(1))
    n_train = n_train_up or round(0.8 * n)
    rows = []
    print(f"\nseconds per epoch = median over epochs 2..{args.epochs} of wall time between epoch ends "
          f"(train + validation + checkpoints); structures/s = {n_train} training structures / that")
    print(f"{'hidden':>6} {'ours s/epoch':>13} {'upstream s/epoch':>17} {'ratio up/ours':>14} "
          f"{'ours RSS GiB':>13} {'upstream RSS GiB':>17} {'RSS ratio':>10}")
    for hidden in args.hidden:
        o = [x for r in results[hidden]["ours"] for x in r["epoch_s"]]
        u = [x for r in results[hidden]["upstream"] for x in r["epoch_s"]]
        if not o or not u:
            continue
        mo, mu = statistics.median(o), statistics.median(u)
        ro = max(r["peak_rss_gib"] for r in results[hidden]["ours"])
        ru = max(r["peak_rss_gib"] for r in results[hidden]["upstream"])
        print(f"{hidden:>6} {mo:>13.2f} {mu:>17.2f} {mu / mo:>13.2f}x {ro:>13.2f} {ru:>17.2f} {ru / ro:>9.2f}x")
        rows += [
            {"what": f"hidden {hidden}: training epoch (s, ratio = upstream/ours)", "unit": "s", "ours": mo,
             "upstream": mu, "ratio": mu / mo},
            {"what": f"hidden {hidden}: training structures/s", "unit": "structures/s", "ours": n_train / mo,
             "upstream": n_train / mu, "ratio": mu / mo},
            {"what": f"hidden {hidden}: peak RSS (ratio = upstream/ours)", "unit": "GiB", "ours": ro,
             "upstream": ru, "ratio": ru / ro},
        ]
    params = {"structures": n, "train": n_train, "epochs": args.epochs, "batch": args.batch,
              "threads": args.threads, "layers": args.layers, "hidden": args.hidden, "repeats": args.repeats,
              "failed": failed}
    emit("real_epoch", rows, params, args.json)
    if args.json:  # every run's epoch times, RSS and upstream's own train/val timers
        doc = json.loads(Path(args.json).read_text())
        doc["runs"] = {str(h): {s: [{k2: v for k2, v in r.items() if k2 != "log"} for r in rs]
                                for s, rs in v.items()} for h, v in results.items()}
        Path(args.json).write_text(json.dumps(doc, indent=2))
    if tmp is not None:
        tmp.cleanup()
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
