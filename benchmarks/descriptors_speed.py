"""Speed of the analysis descriptors (``toolkit.analyze.descriptors``) on real structures.

    python benchmarks/descriptors_speed.py [--structures 100] [--json PATH]

Structures: the first ``--structures / 2`` POSCARs of ``paper_structures/`` (the study's, 6-40 sites)
and the first ``--structures / 2`` records of ``mp_structures/mp_structures.jsonl``. For each
neighbour finder (``crystalnn``: the default up to ``analyze.crystalnn_max_materials``; ``cutoff``:
``MinimumDistanceNN(tol=0.2)``, the large-dataset mode) it reports

* single process: materials/s over the set and the median seconds per material, overall and per
  source (study POSCARs, MP records) (``material_descriptors``, one BLAS thread);
* ``structural_descriptors`` with ``--workers`` spawned processes (the analyze stage's path, block
  cache written to a temporary folder): materials/s including process start-up.

There is no upstream equivalent (upstream ALIGNN computes no structural descriptors): rows carry no
ratio; the ``cutoff`` rows state their speed-up over ``crystalnn`` in the row name's unit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from _common import SHARED_DATA, emit


def load_structures(n: int) -> list[tuple[str, object]]:
    """(label, pymatgen Structure): half from paper_structures, half from mp_structures."""
    from pymatgen.core import Structure
    from pymatgen.io.vasp import Poscar

    half = max(1, n // 2)
    out = []
    for p in sorted((SHARED_DATA / "paper_structures").glob("POSCAR_*.vasp"))[:half]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append((f"paper:{p.name}", Poscar.from_file(p).structure))
    with (SHARED_DATA / "mp_structures" / "mp_structures.jsonl").open() as f:
        for line in f:
            if len(out) >= n:
                break
            rec = json.loads(line)
            out.append((f"mp:{rec['material_id']}", Structure.from_dict(rec["structure"])))
    return out


def single_process(structures: list, coordination: str) -> tuple[float, float, int, dict[str, float]]:
    """(materials/s over the set, median s per material, number of materials with failures,
    {source ("paper" / "mp"): median s per material})."""
    from threadpoolctl import threadpool_limits

    from toolkit.analyze.descriptors import material_descriptors

    times, n_fail = [], 0
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, s in structures:
            t0 = time.perf_counter()
            _, fails = material_descriptors(s, coordination)
            times.append(time.perf_counter() - t0)
            n_fail += bool(fails)
    per_source = {src: statistics.median(t for (label, _), t in zip(structures, times) if label.startswith(src + ":"))
                  for src in ("paper", "mp") if any(label.startswith(src + ":") for label, _ in structures)}
    return len(times) / sum(times), statistics.median(times), n_fail, per_source


def pooled(structures: list, coordination: str, workers: int) -> float:
    """materials/s of ``structural_descriptors`` (spawned worker pool, fresh cache) over the set."""
    from toolkit.analyze.descriptors import StructureArrays, structural_descriptors

    counts = np.array([len(s) for _, s in structures])
    off = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=off[1:])
    arrays = StructureArrays(
        [label for label, _ in structures],
        np.concatenate([np.array(s.atomic_numbers, dtype=np.int16) for _, s in structures]),
        np.concatenate([s.frac_coords for _, s in structures]),
        np.stack([s.lattice.matrix for _, s in structures]),
        off,
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        recs, _ = structural_descriptors(arrays, Path(tmp) / "cache", workers=workers, coordination=coordination,
                                         block=max(1, len(structures) // (4 * workers)))
        wall = time.perf_counter() - t0
    assert len(recs) == len(structures)
    return len(structures) / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structures", type=int, default=100, help="materials (half paper, half MP)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--modes", default="cutoff,crystalnn")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    structures = load_structures(args.structures)
    sites = [len(s) for _, s in structures]
    params = {"structures": len(structures), "sites_median": float(np.median(sites)), "sites_max": max(sites),
              "workers": args.workers, "load_avg_start": os.getloadavg()[0],
              "sources": "paper_structures (first half, alphabetical), mp_structures.jsonl (first records)"}
    rows, rate = [], {}
    for mode in args.modes.split(","):
        r1, med, n_fail, per_source = single_process(structures, mode)
        rate[mode] = r1
        rows.append({"what": f"{mode}: 1 process", "unit": "materials/s", "ours": round(r1, 3)})
        rows.append({"what": f"{mode}: median per material", "unit": "s", "ours": round(med, 4)})
        for src, m in per_source.items():
            rows.append({"what": f"{mode}: median per material, {src} structures", "unit": "s", "ours": round(m, 4)})
        rows.append({"what": f"{mode}: materials with a missing descriptor", "unit": "count", "ours": n_fail})
        rows.append({"what": f"{mode}: structural_descriptors, {args.workers} workers", "unit": "materials/s",
                     "ours": round(pooled(structures, mode, args.workers), 3)})
    if "cutoff" in rate and "crystalnn" in rate:
        rows.append({"what": "cutoff speed-up over crystalnn (1 process)", "unit": "x",
                     "ours": round(rate["cutoff"] / rate["crystalnn"], 2)})
    params["load_avg_end"] = os.getloadavg()[0]
    emit("descriptors", rows, params, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
