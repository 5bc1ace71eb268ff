"""The analyze report at scale: one clustering of --n materials (default 100,000) with its interactive
map, rendered by the production code (toolkit.analyze.interactive + toolkit.analyze.report.render),
then opened in headless Chromium (tests/test_report_browser.py's DevTools helper).

Data are synthetic (Gaussian blobs on the 2-D map, --clusters clusters, a spectrum per material on a
--grid-point energy grid, onset / bond_length_mean / anion class descriptors); the attribution has the
keys the report reads. Above analyze.interactive_max_points (20,000) the map shows a seeded subsample
per cluster, as in a real run. Prints the page size, the render time and the time Chromium takes
from navigation to the end of the load event (the maps are drawn by then: Plotly.newPlot runs in
inline scripts), median of --repeats fresh browser sessions.

    python benchmarks/report_scale.py                  # 100,000 materials
    python benchmarks/report_scale.py --n 20000 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

ANIONS = ("oxide", "sulfide", "selenide", "telluride", "halide", "nitride")
LOAD = """(() => { const n = performance.getEntriesByType('navigation')[0];
  return {load: n.loadEventEnd, maps: Object.keys(window.spectrolens.maps).length,
          points: document.querySelectorAll('.imap .plotly-graph-div .point').length}; })()"""
# interaction costs: re-colour every point by a descriptor, click a point -> its spectra drawn
INTERACT = """(() => { const S = window.spectrolens, t0 = performance.now(); S.colourBy('layer', 'onset');
  const t1 = performance.now(); S.showMaterial('layer', S.maps.layer.d.ids[0]);
  return {colour: t1 - t0, click: performance.now() - t1}; })()"""


def synthetic(n: int, k: int, g: int, seed: int = 0) -> tuple[dict, dict]:
    """(attribution dict, {layer: map data}) for one clustering ``layer`` of ``n`` materials."""
    from toolkit.analyze import interactive

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n).astype(np.int32)
    centres = rng.normal(scale=6.0, size=(k, 2))
    coords = (centres[labels] + rng.standard_normal((n, 2))).astype(np.float32)
    energy = np.linspace(0.0, 15.0, g)
    onset = np.clip(1.0 + labels % 7 + rng.normal(scale=0.3, size=n), 0.1, None)
    spectra = np.log10(1 + np.exp(np.clip(energy[None, :] - onset[:, None], -30, 30)) * 1e4).astype(np.float32)
    ids = np.array([f"mat-{i:07d}" for i in range(n)])
    formulas = np.array([f"A{1 + i % 3}B{1 + i % 5}" for i in range(n)])
    desc = {"onset": onset.astype(np.float32), "bond_length_mean": rng.normal(2.3, 0.2, n).astype(np.float32),
            "class:anion": np.array(ANIONS)[labels % len(ANIONS)]}
    data = interactive.map_data("layer", ids, formulas, coords, labels, desc, energy, spectra,
                                spectra + rng.normal(scale=0.05, size=spectra.shape).astype(np.float32))
    sizes = np.bincount(labels, minlength=k)
    clusters = {str(c): {"size": int(sizes[c]), "path": [],
                         "summary": f"cluster {c}: {sizes[c]} materials, onset {1 + c % 7:.1f} ± 0.3 eV"}
                for c in range(k)}
    attribution = {"n_materials": n, "run_dir": "synthetic", "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "descriptors": {"n_descriptors": 3, "n_failures": 0}, "probes": {}, "hierarchy": {},
                   "drivers": None, "benchmark_recovery": None,
                   "layers": {"layer": {"clustering": {"n_clusters": k, "mode": "scalable", "criterion": "user",
                                                       "preprocessing": {}},
                                        "ami_reference": None, "surrogate": {"importances": {}}, "clusters": clusters}}}
    return attribution, {"layer": data}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--grid", type=int, default=1501, help="energy grid points of the spectra")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from test_report_browser import CHROMIUM, _open_in_chromium

    from toolkit.analyze.report import render

    if CHROMIUM is None:
        sys.exit("chromium not found")
    t = time.perf_counter()
    attribution, maps = synthetic(args.n, args.clusters, args.grid)
    t_data = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report" / "index.html"
        t = time.perf_counter()
        render(attribution, {}, page, "report scale benchmark", interactive=maps)
        t_render = time.perf_counter() - t
        size = page.stat().st_size
        loads, colour, click, errors = [], [], [], []
        for r in range(args.repeats):
            state, errs, _, _ = _open_in_chromium(page, Path(tmp) / f"profile{r}", actions=(LOAD, INTERACT))
            a, b = state["actions"]
            loads.append(a["load"] / 1000.0)
            colour.append(b["colour"] / 1000.0)
            click.append(b["click"] / 1000.0)
            errors += errs
            print(f"  run {r + 1}: load {a['load'] / 1000:.2f} s, maps {a['maps']}, points drawn {a['points']}; "
                  f"colour by onset {b['colour'] / 1000:.2f} s, click -> spectra {b['click'] / 1000:.2f} s", flush=True)
    shown = len(maps["layer"]["id"])
    med = statistics.median(loads)
    print(f"report_scale: {args.n:,} materials ({shown:,} shown on the map), page {size / 1e6:.1f} MB; "
          f"data {t_data:.1f} s, render {t_render:.1f} s; Chromium load (navigation -> load event end) "
          f"median {med:.2f} s of {args.repeats}; colour by a descriptor {statistics.median(colour):.2f} s, "
          f"click -> spectra {statistics.median(click):.2f} s; console errors: {len(errors)}")
    if args.json:
        import json

        args.json.write_text(json.dumps({"benchmark": "report_scale", "n": args.n, "shown": shown, "page_bytes": size,
                                         "render_s": t_render, "load_s": loads, "load_median_s": med,
                                         "colour_s": colour, "click_s": click,
                                         "console_errors": len(errors)}, indent=1))


if __name__ == "__main__":
    main()
