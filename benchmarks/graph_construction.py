"""Graph construction speed and size: spectrolens vs upstream ALIGNN's builders, same structures, same run.

Builders (k = 12 neighbours, cutoff 8 Å, all on one core unless torch threads say otherwise):

* ``ours``            toolkit.data.graphs.structure_graph (atom graph, as stored by prepare)
* ``ours+lg``         ours plus the line graph and bond cosines (what collate adds per batch)
* ``alignn_dgl``      alignn.graphs.Graph.atom_dgl_multigraph, k-nearest, with its line graph (DGL)
* ``alignn_dgl_nolg`` the same without the line graph
* ``alignn_pure``     alignn.torch_graph_builder.build_pure_torch_graph (pure torch, with line graph)
* ``alignn_pure_nolg`` the same without the line graph

Upstream builders take jarvis ``Atoms`` (converted before timing); ours takes the pymatgen
``Structure``. Sizes: ours = compressed bytes on disk in a dataset.zarr part (graph arrays
only) and raw in-memory bytes; upstream = pickled (g, lg) as its LMDB cache stores them.

    python benchmarks/graph_construction.py --structures 200 --repeats 5 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED_DATA, emit, median_seconds  # noqa: E402

sys.path.insert(0, str(REPO))
from toolkit.data import store  # noqa: E402
from toolkit.data.graphs import bond_cosines, line_graph_index, structure_graph  # noqa: E402


def load_structures(path: Path, n: int) -> list[Any]:
    from pymatgen.core import Structure

    out = []
    with open(path) as fh:
        for line in fh:
            out.append(Structure.from_dict(json.loads(line)["structure"]))
            if len(out) == n:
                break
    return out


def ours(s: Any) -> Any:
    return structure_graph(s, cutoff=8.0, max_neighbors=12)


def ours_lg(s: Any) -> Any:
    g = structure_graph(s, cutoff=8.0, max_neighbors=12)
    li = line_graph_index(torch.from_numpy(g.edge_src), torch.from_numpy(g.edge_dst), g.n_atoms)
    return g, li, bond_cosines(torch.from_numpy(g.edge_vec), li)


def rate(fn: Callable[[Any], Any], inputs: list[Any], repeats: int) -> tuple[float, list[float]]:
    """Median structures/second over ``repeats`` passes over ``inputs`` (after one warm-up pass)."""
    med, times = median_seconds(lambda: [fn(x) for x in inputs], repeats=repeats, warmup=1)
    return len(inputs) / med, [len(inputs) / t for t in times]


def our_bytes(structs: list[Any]) -> tuple[float, float]:
    """(on-disk compressed, in-memory raw) bytes per structure of the stored graph arrays."""
    recs = []
    for s in structs:
        g = ours(s)
        recs.append(store.MaterialRecord(id="x", formula="x", numbers=g.numbers, frac_coords=s.frac_coords,
                                         lattice=s.lattice.matrix, edge_src=g.edge_src, edge_dst=g.edge_dst,
                                         edge_vec=g.edge_vec))
    names = ("edge_src", "edge_dst", "edge_vec", "edge_offset", "nedges")
    raw = sum(a.nbytes for k, a in store.part_arrays(recs, 2).items() if k in names)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.zarr"
        store.create_store(path, {"n_parts": 1})
        store.write_part(path, 0, recs, 2)
        disk = sum(f.stat().st_size for n in names for f in (path / "parts" / "00000" / n).rglob("*") if f.is_file())
    return disk / len(structs), raw / len(structs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "mp_structures" / "mp_structures.jsonl")
    ap.add_argument("--structures", "--n", dest="n", type=int, default=200, help="structures")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON (benchmarks/run_all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    structs = load_structures(args.data, args.n)
    natoms = [len(s) for s in structs]
    print(f"{len(structs)} structures from {args.data.name} (atoms/cell median {int(np.median(natoms))}, "
          f"max {max(natoms)}), k=12, cutoff 8 Å, torch threads {torch.get_num_threads()}, {args.repeats} repeats")

    builders: dict[str, tuple[Callable[[Any], Any], list[Any]]] = {"ours": (ours, structs), "ours+lg": (ours_lg, structs)}
    disk, raw = our_bytes(structs)
    sizes: dict[str, float] = {"ours_disk": disk, "ours_raw": raw}
    try:
        from jarvis.core.atoms import Atoms

        atoms = [Atoms(lattice_mat=s.lattice.matrix, coords=s.frac_coords, elements=[str(e) for e in s.species],
                       cartesian=False) for s in structs]
    except ImportError as e:
        atoms = []
        print(f"upstream builders skipped: {e}")
    if atoms:
        from alignn.torch_graph_builder import build_pure_torch_graph

        def pure(a: Any, lg: bool = True) -> Any:
            return build_pure_torch_graph(atoms=a, two_body_cutoff=8.0, three_body_cutoff=8.0, max_neighbors=12,
                                          atom_features="cgcnn", compute_line_graph=lg)

        builders["alignn_pure"] = (pure, atoms)
        builders["alignn_pure_nolg"] = (lambda a: pure(a, False), atoms)
        try:
            from toolkit.compat.dgl import import_dgl

            import_dgl()
            from alignn.graphs import Graph

            def dgl_builder(a: Any, lg: bool = True) -> Any:
                return Graph.atom_dgl_multigraph(a, neighbor_strategy="k-nearest", cutoff=8.0, max_neighbors=12,
                                                 atom_features="cgcnn", compute_line_graph=lg, use_canonize=True)

            builders["alignn_dgl"] = (dgl_builder, atoms)
            builders["alignn_dgl_nolg"] = (lambda a: dgl_builder(a, False), atoms)
            sizes["alignn_dgl"] = float(np.mean([len(pickle.dumps(dgl_builder(a))) for a in atoms[:50]]))
            sizes["alignn_dgl_nolg"] = float(np.mean([len(pickle.dumps(dgl_builder(a, False))) for a in atoms[:50]]))
        except Exception as e:  # noqa: BLE001 - report and go on with the other builders
            print(f"upstream DGL builder skipped: {type(e).__name__}: {e}")

    results = {}
    for name, (fn, inputs) in builders.items():
        med, rates = rate(fn, inputs, args.repeats)
        results[name] = med
        print(f"  {name:18s} {med:9.1f} structures/s  ({1e3 / med:6.2f} ms/structure; "
              f"passes {', '.join(f'{r:.0f}' for r in rates)})")
    print(f"sizes per structure: ours {disk:,.0f} B on disk (zstd), {raw:,.0f} B raw (graph arrays; no line "
          f"graph stored)" + (f"; upstream DGL pickled (g, lg) {sizes['alignn_dgl']:,.0f} B, g alone "
                              f"{sizes['alignn_dgl_nolg']:,.0f} B (its LMDB cache)" if "alignn_dgl" in sizes else ""))
    rows = []
    for a, b, what in [("ours", "alignn_dgl_nolg", "atom graph build vs ALIGNN DGL k-NN builder"),
                       ("ours+lg", "alignn_dgl", "atom + line graph vs ALIGNN DGL builder"),
                       ("ours", "alignn_pure_nolg", "atom graph build vs ALIGNN pure-torch builder"),
                       ("ours+lg", "alignn_pure", "atom + line graph vs ALIGNN pure-torch builder")]:
        up = results.get(b)
        rows.append({"what": what, "unit": "structures/s", "ours": results[a], "upstream": up,
                     "ratio": results[a] / up if up else None})
    if "alignn_dgl" in sizes:
        rows.append({"what": "stored bytes/structure (ratio = upstream/ours)", "unit": "B", "ours": disk,
                     "upstream": sizes["alignn_dgl"], "ratio": sizes["alignn_dgl"] / disk})
    emit("graph_construction", rows, {"structures": len(structs), "repeats": args.repeats,
                                      "threads": torch.get_num_threads(), "k": 12, "cutoff": 8.0}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
