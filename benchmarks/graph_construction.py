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

    python benchmarks/graph_construction.py --n 200 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
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


def time_builder(fn: Callable[[Any], Any], inputs: list[Any], repeats: int) -> tuple[float, list[float]]:
    """Median structures/second over ``repeats`` passes (after one warm-up structure)."""
    fn(inputs[0])
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for x in inputs:
            fn(x)
        rates.append(len(inputs) / (time.perf_counter() - t))
    return statistics.median(rates), rates


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
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mp_structures" / "mp_structures.jsonl")
    ap.add_argument("--n", type=int, default=200, help="structures")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    structs = load_structures(args.data, args.n)
    natoms = [len(s) for s in structs]
    print(f"{len(structs)} structures from {args.data.name} (atoms/cell median {int(np.median(natoms))}, "
          f"max {max(natoms)}), k=12, cutoff 8 Å, torch threads {torch.get_num_threads()}, {args.repeats} repeats")

    builders: dict[str, tuple[Callable[[Any], Any], list[Any]]] = {"ours": (ours, structs), "ours+lg": (ours_lg, structs)}
    sizes: dict[str, str] = {}
    disk, raw = our_bytes(structs)
    sizes["ours"] = f"{disk:,.0f} B on disk (zstd), {raw:,.0f} B raw (graph arrays; no line graph stored)"
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
            pick = [len(pickle.dumps(dgl_builder(a))) for a in atoms[:50]]
            sizes["alignn_dgl"] = f"{np.mean(pick):,.0f} B pickled (g, lg) as in its LMDB cache"
            pick = [len(pickle.dumps(dgl_builder(a, False))) for a in atoms[:50]]
            sizes["alignn_dgl_nolg"] = f"{np.mean(pick):,.0f} B pickled g"
        except Exception as e:  # noqa: BLE001 - report and go on with the other builders
            print(f"upstream DGL builder skipped: {type(e).__name__}: {e}")

    results = {}
    for name, (fn, inputs) in builders.items():
        med, rates = time_builder(fn, inputs, args.repeats)
        results[name] = med
        print(f"  {name:18s} {med:9.1f} structures/s  ({1e3 / med:6.2f} ms/structure; "
              f"passes {', '.join(f'{r:.0f}' for r in rates)})")
    print("sizes per structure:")
    for k, v in sizes.items():
        print(f"  {k:18s} {v}")
    print("ratios (median structures/s, ours / upstream):")
    for a, b in [("ours", "alignn_dgl_nolg"), ("ours+lg", "alignn_dgl"), ("ours", "alignn_pure_nolg"),
                 ("ours+lg", "alignn_pure")]:
        if a in results and b in results:
            print(f"  {a:8s} vs {b:18s} {results[a] / results[b]:6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
