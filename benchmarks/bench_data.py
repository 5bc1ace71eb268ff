"""Speed of the data layer, with the reference implementation timed in the same run.

* benchmark generation (materials/s; target >= 500/s) vs a reference that also measures the
  planted descriptors on every noise-free spectrum with the general descriptor code;
* resampling 1,000 spectra onto the 1,501-point grid: ``spectra.resample`` (columns at once, with
  masks) vs a ``numpy.interp`` loop per spectrum (no masks);
* the overlapping-atom check: ``structure_problem`` (pymatgen neighbour list) vs pymatgen's full
  distance matrix (O(N^2), images not included), on a 4x4x4 supercell.

Usage: python benchmarks/bench_data.py [--repeats 5]. Prints medians (s) and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np

from toolkit.config import DataConfig
from toolkit.data.benchmark import BenchmarkSource, clean_spectrum, generate, prototypes, recipes
from toolkit.data.readers.common import structure_problem
from toolkit.data.spectra import energy_grid, resample, spectral_descriptors


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    cfg = DataConfig(benchmark={"n_materials": args.n})
    prototypes(), recipes()  # one-off template set-up, not per material
    src = BenchmarkSource(cfg)
    keys, _ = src.scan()
    t_gen = median_time(lambda: list(src.load(keys)), args.repeats)
    e = energy_grid()

    def reference_generation() -> None:
        # the naive way to get the planted truth: measure every noise-free spectrum with the general
        # descriptor code (find_peaks etc.) instead of the generator's closed-form values
        for i in range(args.n):
            m = generate(cfg, i, e)
            p = m.properties
            clean = clean_spectrum(e, p["onset_param"], p["coordination"], p["anion"])
            spectral_descriptors(e, clean)

    t_ref = median_time(reference_generation, args.repeats)
    print(f"benchmark generation: {args.n / t_gen:.0f} materials/s (median {t_gen:.3f} s for {args.n}); "
          f"reference (descriptors measured on each clean spectrum): {args.n / t_ref:.0f}/s; "
          f"ratio {t_ref / t_gen:.2f}x")

    rng = np.random.default_rng(0)
    src_e = np.sort(rng.uniform(0, 20, 5000))
    vals = rng.normal(3, 1, (5000, 1000))
    t_ours = median_time(lambda: resample(src_e, vals, e), args.repeats)
    t_np = median_time(lambda: [np.interp(e, src_e, vals[:, j], left=np.nan, right=np.nan) for j in range(1000)],
                       args.repeats)
    print(f"resample 1000 spectra: ours {t_ours:.4f} s, numpy.interp loop {t_np:.4f} s, ratio {t_np / t_ours:.2f}x")

    s = next(iter(BenchmarkSource(DataConfig(benchmark={"n_materials": 10})).load(["bench-00002"]))).structure
    big = s * (4, 4, 4)
    t_nl = median_time(lambda: structure_problem(big, 0.5), args.repeats)
    t_dm = median_time(lambda: big.distance_matrix.min(), args.repeats)
    print(f"overlap check on {len(big)} atoms: neighbour list {t_nl:.4f} s, distance matrix {t_dm:.4f} s, "
          f"ratio {t_dm / t_nl:.2f}x")


if __name__ == "__main__":
    main()
