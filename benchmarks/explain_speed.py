"""Speed of the explain stage's counterfactual probes and attributions on CPU.

    python benchmarks/explain_speed.py [--structures 20] [--hidden 64] [--layers 2] [--json PATH]

Structures: the first ``--structures`` POSCARs of ``paper_structures/`` (the study's). Model: a random
ALIGNN (``--layers`` ALIGNN + ``--layers`` GCN layers, ``--hidden`` features, 301-point grid). Reports

* edit generation (pymatgen only: oxidation states, substitutions, strains, shells, validity checks): edits/s;
* the whole probe (edits + graph builder + collate + model + spectral features + distance to a reference):
  edits/s (the stage's per-shard path, ``toolkit.explain.probes.probe_rows``, one BLAS thread);
* integrated gradients (32 Gauss-Legendre nodes, atoms + bonds + angles): materials/s.

Upstream ALIGNN has no counterfactual probes: rows carry no ratio.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from _common import SHARED_DATA, emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--structures", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np
    import torch
    from pymatgen.core import Structure

    from toolkit.config import load_config
    from toolkit.explain import edits as ed
    from toolkit.explain import gradients as gr
    from toolkit.explain.options import ExplainOptions
    from toolkit.explain.probes import Reference, graph_item, predict, probe_rows
    from toolkit.model import build_model

    torch.set_num_threads(1)
    files = sorted((SHARED_DATA / "paper_structures").glob("POSCAR_*.vasp"))[: args.structures]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structures = [(f.stem[7:], Structure.from_file(f)) for f in files]
    cfg = load_config(None, {"data": {"grid": {"num": 301}},
                             "model": {"alignn_layers": args.layers, "gcn_layers": args.layers,
                                       "hidden_features": args.hidden, "embedding_features": min(64, args.hidden)}})
    torch.manual_seed(0)
    model = build_model(cfg.model, 301).eval()
    energy = np.linspace(cfg.data.grid.start, cfg.data.grid.stop, cfg.data.grid.num)
    opts = ExplainOptions()
    mats = [{"row": i, "id": n, "formula": s.composition.reduced_formula, "cluster": -1, "representative": False,
             "structure": s} for i, (n, s) in enumerate(structures)]

    t0 = time.perf_counter()
    n_edits = sum(len(ed.make_edits(s, opts, cfg.data.min_distance)) for _, s in structures)
    t_edit = time.perf_counter() - t0

    items = [graph_item(s, cfg.graph, i, n) for i, (n, s) in enumerate(structures)]
    reference = Reference(predict(model, items, 32, torch.device("cpu")).readout)
    probe_rows(mats[:2], model, cfg.graph, cfg.data, energy, opts, torch.device("cpu"), reference)  # warm-up
    t0 = time.perf_counter()
    rows, rejects, _ = probe_rows(mats, model, cfg.graph, cfg.data, energy, opts, torch.device("cpu"), reference)
    t_probe = time.perf_counter() - t0

    t0 = time.perf_counter()
    err = 0.0
    for it in items:
        a = gr.integrated_gradients(model, it, gr.window_mask(energy, None, (2.0, 4.0), 0.5), steps=32)
        err = max(err, a.completeness_error)
    t_ig = time.perf_counter() - t0

    rows_out = [
        {"what": "edit generation (pymatgen, validity checks)", "unit": "edits/s", "ours": round(n_edits / t_edit, 2)},
        {"what": "probe: edits + graphs + model + features", "unit": "edits/s", "ours": round(len(rows) / t_probe, 2)},
        {"what": "probe: rejected edits", "unit": "count", "ours": len(rejects)},
        {"what": "integrated gradients (32 nodes)", "unit": "materials/s", "ours": round(len(items) / t_ig, 3)},
        {"what": "integrated gradients: max completeness error", "unit": "target units", "ours": float(err)},
    ]
    emit("explain", rows_out, {"structures": len(structures), "hidden": args.hidden, "layers": f"{args.layers}+{args.layers}",
                               "grid": 301, "threads": 1}, args.json)


if __name__ == "__main__":
    main()
