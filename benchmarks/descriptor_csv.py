"""Writing analyze/descriptors.csv: the chunked writer (``DescriptorTable.write``) against the per-value
writer it replaced (kept here as the reference), on a synthetic table shaped like the stage's (430
columns: half 0/1 families, 10 % missing), same bytes checked.

    python benchmarks/descriptor_csv.py --n 20000 --repeats 5

Prints the median ms per material of each and the ratio. At 10^7 materials the per-material cost of this
one file was the largest O(N) term of the analyze driver (docs/performance.md, "Projection").
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from toolkit.analyze.descriptors import DescriptorTable


def reference_write(table: DescriptorTable, path: Path) -> None:
    """The writer before the change: one Python-level isfinite/repr per value."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *table.names])
        w.writerows([i, *("" if not np.isfinite(v) else repr(float(v)) for v in row)]
                    for i, row in zip(table.ids, table.values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--columns", type=int, default=430)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    v = rng.normal(size=(a.n, a.columns)) * 3.0
    half = a.columns // 2
    v[:, :half] = v[:, :half] > 2.0
    v[rng.random(v.shape) < 0.1] = np.nan
    table = DescriptorTable([f"mp-{i}" for i in range(a.n)], [f"d{j}" for j in range(a.columns)], v, [])
    d = Path(tempfile.mkdtemp(prefix="desc-csv-"))
    ours, ref = [], []
    for _ in range(a.repeats):  # alternated
        t = time.perf_counter()
        table.write(d / "ours.csv", d / "fail.csv")
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        reference_write(table, d / "ref.csv")
        ref.append(time.perf_counter() - t)
    same = (d / "ours.csv").read_bytes() == (d / "ref.csv").read_bytes()
    mo, mr = statistics.median(ours), statistics.median(ref)
    out = {"n": a.n, "columns": a.columns, "repeats": a.repeats, "ours_ms_per_material": 1e3 * mo / a.n,
           "reference_ms_per_material": 1e3 * mr / a.n, "ratio": mr / mo, "identical_bytes": same,
           "bytes_per_material": (d / "ours.csv").stat().st_size / a.n, "load_avg": os.getloadavg()[0]}
    print(f"descriptors.csv, {a.n} materials x {a.columns} columns, median of {a.repeats}: "
          f"ours {out['ours_ms_per_material']:.3f} ms/material, per-value writer {out['reference_ms_per_material']:.3f} "
          f"ms/material, {out['ratio']:.1f}x; identical bytes: {same}; {out['bytes_per_material']:.0f} B/material; "
          f"load average {out['load_avg']:.1f}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    if not same:
        raise SystemExit("the two writers disagree")


if __name__ == "__main__":
    main()
