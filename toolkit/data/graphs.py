"""Periodic k-nearest-neighbour atom graph, line graph and CGCNN atom features (ALIGNN semantics).

Atom graph (built once per material in ``prepare``, stored in ``dataset.zarr``): the rule of
upstream ALIGNN's ``nearest_neighbor_edges`` + ``build_undirected_edgedata`` (its DGL k-NN
builder with ``use_canonize=True``, the default of ``Graph.atom_dgl_multigraph``):

1. for every atom ``i``, all periodic neighbours ``j + image`` within ``cutoff`` (Å), the atom
   itself at zero distance excluded; if any atom has fewer than ``max_neighbors`` (k) neighbours,
   the cutoff is widened the way upstream does it (to the longest lattice vector length, or
   doubled once it is already longer) and the search repeated. The result depends only on the
   k-th-shell distances, not on the search radius, so the search starts smaller than ``cutoff``
   (a sphere holding ~2k atoms) and grows until every atom's k-th shell is inside: the same graph
   as upstream's search at ``cutoff``, for a fraction of the neighbour pairs;
2. atom ``i`` keeps every neighbour whose distance is <= the distance of its k-th nearest
   neighbour (so ties at the k-th shell are all kept: often more than k neighbours);
3. the kept (i, j, image) pairs are made undirected: every pair becomes the two directed edges
   ``i -> j`` and ``j -> i`` (duplicates collapsed), as upstream's canonised edge set does.
   Upstream emits a self-image pair ``i -> i + image`` once for ``+image`` and once for
   ``-image`` and both directions of each, so such edges appear twice; we reproduce that by
   default (``GraphConfig.dedupe_self_images=False``) so a model sees exactly upstream's graph.

The only deliberate deviation: the k-th-shell comparison uses a tolerance of ``SHELL_TOL`` Å,
so symmetry-equivalent neighbours whose distances differ by floating-point round-off are all
kept (upstream compares exactly, so which of them it keeps depends on round-off).

Edge convention (see :mod:`toolkit.data.batch`): ``edge_vec[e] = pos(dst) - pos(src)`` in Å,
periodic image included. The neighbour search is pymatgen's compiled
``find_points_in_spheres``, imported lazily: reading a prepared store (``store.py``,
``loader.py``, :func:`line_graph_index`, :func:`cgcnn_table`) needs neither pymatgen nor
jarvis-tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: prepare workers build graphs without it
    import torch

SHELL_TOL = 1e-6  # Å; neighbours within this of the k-th neighbour's distance count as the k-th shell
SELF_TOL = 1e-8  # Å; a "neighbour" this close is the atom itself
_CGCNN_JSON = Path(__file__).resolve().parents[1] / "resources" / "cgcnn_atom_init.json"
CGCNN_DIM = 92
MAX_Z = 118


class GraphError(ValueError):
    """A structure for which no atom graph can be built (the message says why)."""


@dataclass
class AtomGraph:
    """One material's atom graph (arrays in the units stated)."""

    numbers: np.ndarray  # (n,) int64 atomic numbers
    edge_src: np.ndarray  # (E,) int32, local atom index
    edge_dst: np.ndarray  # (E,) int32, local atom index
    edge_vec: np.ndarray  # (E, 3) float32, Å: pos(dst) - pos(src), periodic image included
    edge_image: np.ndarray  # (E, 3) int32: lattice image of dst relative to src's cell

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.edge_src.shape[0])


def periodic_neighbors(lattice: np.ndarray, frac_coords: np.ndarray, cutoff: float
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All periodic neighbour pairs within ``cutoff`` Å (self excluded), via pymatgen's compiled search.

    Returns ``(i, j, image, distance)``: centre atom, neighbour atom, integer image (3,) of the
    neighbour (position ``frac[j] + image`` in fractional coordinates) and distance in Å.
    """
    from pymatgen.optimization.neighbors import find_points_in_spheres

    lattice = np.ascontiguousarray(lattice, dtype=np.float64)
    cart = np.ascontiguousarray(np.asarray(frac_coords, dtype=np.float64) @ lattice)
    i, j, images, d = find_points_in_spheres(cart, cart, r=float(cutoff), pbc=np.array([1, 1, 1], dtype=np.int64),
                                             lattice=lattice, tol=SELF_TOL)
    images = np.rint(images).astype(np.int64)
    keep = ~((i == j) & ~images.any(axis=1))  # the atom itself (same index, same cell)
    return i[keep].astype(np.int64), j[keep].astype(np.int64), images[keep], d[keep]


def _widened(cutoff: float, lattice: np.ndarray) -> float:
    """Upstream's rule for a larger search radius when an atom has fewer than k neighbours."""
    longest = float(np.linalg.norm(lattice, axis=1).max())
    return longest if cutoff < longest else 2.0 * cutoff


def knn_graph(lattice: np.ndarray, frac_coords: np.ndarray, numbers: np.ndarray, cutoff: float = 8.0,
              max_neighbors: int = 12, min_distance: float | None = None,
              dedupe_self_images: bool = False) -> AtomGraph:
    """Build the ALIGNN k-NN atom graph of one periodic structure (see the module docstring).

    lattice: (3, 3) Å, rows are lattice vectors; frac_coords: (n, 3); numbers: (n,) atomic numbers.
    min_distance (Å): raise :class:`GraphError` if two atoms are closer than this.
    """
    lattice = np.asarray(lattice, dtype=np.float64)
    frac = np.asarray(frac_coords, dtype=np.float64)
    numbers = np.asarray(numbers, dtype=np.int64)
    n = int(frac.shape[0])
    if n == 0:
        raise GraphError("structure has no atoms")
    if lattice.shape != (3, 3) or frac.shape != (n, 3) or numbers.shape != (n,):
        raise GraphError(f"inconsistent shapes: lattice {lattice.shape}, frac_coords {frac.shape}, numbers {numbers.shape}")
    if not (np.isfinite(lattice).all() and np.isfinite(frac).all()):
        raise GraphError("non-finite lattice or coordinates")
    if abs(np.linalg.det(lattice)) < 1e-6:
        raise GraphError(f"degenerate lattice (volume {np.linalg.det(lattice):.3g} Å^3)")
    k = int(max_neighbors)
    # Search radius: the graph does not depend on it as long as every atom's whole k-th shell lies
    # inside, so start from the radius of a sphere holding ~2k atoms at this density (much less work
    # than a full `cutoff` search), grow up to `cutoff`, then widen beyond it as upstream does.
    volume = abs(float(np.linalg.det(lattice)))
    r = min(float(cutoff), 1.3 * (3.0 * k * volume / (4.0 * np.pi * n)) ** (1.0 / 3.0))
    for _ in range(64):
        i, j, img, d = periodic_neighbors(lattice, frac, r)
        if d.size and d.min() <= SELF_TOL:
            a = int(np.argmin(d))
            raise GraphError(f"atoms {int(i[a])} and {int(j[a])} sit on the same position (duplicate site)")
        if min_distance is not None and d.size and d.min() < min_distance:
            a = int(np.argmin(d))
            raise GraphError(f"atoms {int(i[a])} and {int(j[a])} are {d[a]:.3f} Å apart "
                             f"(closer than data.min_distance = {min_distance} Å)")
        counts = np.bincount(i, minlength=n)
        if counts.min() >= k:
            # sort by (centre, distance) with one float key: centres are separated by more than any distance
            order = np.argsort(i * (2.0 * r + 1.0) + d, kind="stable")
            i, j, img, d = i[order], j[order], img[order], d[order]
            starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
            dk = d[starts + k - 1]
            if np.all(dk + SHELL_TOL < r):
                break
        r = min(float(cutoff), 1.5 * r) if r < cutoff else _widened(r, lattice)
    else:  # pragma: no cover - only for absurd lattices
        raise GraphError(f"could not find {k} neighbours for every atom up to {r:.1f} Å")

    # keep the whole k-th shell of every atom
    keep = d <= dk[i] + SHELL_TOL
    i, j, img = i[keep], j[keep], img[keep]

    # canonical undirected pairs (a <= b, image of b relative to a), duplicates collapsed
    swap = j < i
    a = np.where(swap, j, i)
    b = np.where(swap, i, j)
    im = np.where(swap[:, None], -img, img)
    if dedupe_self_images:
        selfp = a == b  # i -> i+I and i -> i-I are one undirected edge: keep the lexicographically positive one
        first_nz = np.take_along_axis(im, np.argmax(im != 0, axis=1)[:, None], axis=1)[:, 0]
        im = np.where((selfp & (first_nz < 0))[:, None], -im, im)
    span = int(np.abs(im).max()) if im.size else 0
    base = 2 * span + 1
    key = ((a * n + b) * base + (im[:, 0] + span)) * base * base + (im[:, 1] + span) * base + (im[:, 2] + span)
    _, first = np.unique(key, return_index=True)
    a, b, im = a[first], b[first], im[first]

    cart = frac @ lattice
    vec = cart[b] + im @ lattice - cart[a]
    src = np.stack([a, b], axis=1).reshape(-1)
    dst = np.stack([b, a], axis=1).reshape(-1)
    vecs = np.stack([vec, -vec], axis=1).reshape(-1, 3)
    imgs = np.stack([im, -im], axis=1).reshape(-1, 3)
    o = np.lexsort((np.einsum("ij,ij->i", vecs, vecs), dst, src))  # deterministic: by source, then destination, length
    return AtomGraph(numbers=numbers, edge_src=src[o].astype(np.int32), edge_dst=dst[o].astype(np.int32),
                     edge_vec=vecs[o].astype(np.float32), edge_image=imgs[o].astype(np.int32))


def structure_graph(structure: Any, cutoff: float = 8.0, max_neighbors: int = 12,
                    min_distance: float | None = None, dedupe_self_images: bool = False) -> AtomGraph:
    """:func:`knn_graph` of a pymatgen ``Structure`` (or anything with ``lattice.matrix``,
    ``frac_coords`` and ``atomic_numbers``)."""
    if getattr(structure, "is_ordered", True) is False:
        raise GraphError("disordered structure (partial site occupancies): an atom graph needs one element per site")
    return knn_graph(structure.lattice.matrix, structure.frac_coords, np.asarray(structure.atomic_numbers),
                     cutoff=cutoff, max_neighbors=max_neighbors, min_distance=min_distance,
                     dedupe_self_images=dedupe_self_images)


def graph_from_config(structure: Any, graph_cfg: Any, min_distance: float | None = None) -> AtomGraph:
    """:func:`structure_graph` with the parameters of a :class:`toolkit.config.GraphConfig`."""
    return structure_graph(structure, cutoff=graph_cfg.cutoff, max_neighbors=graph_cfg.max_neighbors,
                           min_distance=min_distance, dedupe_self_images=graph_cfg.dedupe_self_images)


def _line_graph_numpy(src: np.ndarray, dst: np.ndarray, n_atoms: int) -> np.ndarray:
    by_src = np.argsort(src, kind="stable")
    out_deg = np.bincount(src, minlength=n_atoms)
    first_out = np.cumsum(out_deg) - out_deg
    cnt = out_deg[dst]  # number of e2 for each e1
    T = int(cnt.sum())
    e1 = np.repeat(np.arange(src.shape[0], dtype=np.int64), cnt)
    within = np.arange(T, dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    e2 = by_src[np.repeat(first_out[dst], cnt) + within].astype(np.int64)
    keep = e1 != e2  # a self-image bond i -> i is not paired with itself (as DGL)
    return np.stack([e1[keep], e2[keep]])


def _line_graph_torch(src: torch.Tensor, dst: torch.Tensor, n_atoms: int) -> torch.Tensor:
    import torch

    dev = src.device
    by_src = torch.argsort(src, stable=True)
    out_deg = torch.bincount(src, minlength=n_atoms)
    first_out = torch.cumsum(out_deg, 0) - out_deg
    cnt = out_deg[dst]
    T = int(cnt.sum())
    e1 = torch.repeat_interleave(torch.arange(src.shape[0], device=dev), cnt, output_size=T)
    within = torch.arange(T, device=dev) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt, output_size=T)
    e2 = by_src[torch.repeat_interleave(first_out[dst], cnt, output_size=T) + within]
    keep = e1 != e2
    return torch.stack([e1[keep], e2[keep]])


def line_graph_index(edge_src: torch.Tensor, edge_dst: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """Line graph of a (batched) directed atom graph, vectorised.

    One line-graph edge ``e1 -> e2`` for every pair of bonds ``e1 = (a -> b)``, ``e2 = (b -> c)``
    (backtracking ``c == a`` included, as DGL's ``line_graph(shared=True)``; like DGL, a bond is
    never paired with itself, which only happens for a self-image bond ``a -> a``). Returns (2, T) int64
    global edge indices, grouped by ``e1`` in increasing order, on the device of the input.
    CPU tensors go through numpy (torch's CPU ``repeat_interleave`` is ~50x slower here).
    """
    import torch

    edge_src = torch.as_tensor(edge_src).long()
    edge_dst = torch.as_tensor(edge_dst).long()
    if edge_src.shape[0] == 0:
        return torch.empty((2, 0), dtype=torch.long, device=edge_src.device)
    if edge_src.device.type == "cpu":
        return torch.from_numpy(_line_graph_numpy(edge_src.numpy(), edge_dst.numpy(), int(n_atoms)))
    return _line_graph_torch(edge_src, edge_dst, int(n_atoms))


def bond_cosines(edge_vec: torch.Tensor, line_index: torch.Tensor) -> torch.Tensor:
    """Cosine of the bond angle at the shared atom ``b`` of each line-graph edge (a->b, b->c):
    ``cos(-edge_vec[e1], edge_vec[e2])``, clamped to [-1, 1] (upstream ``compute_bond_cosines``)."""
    import torch

    unit = edge_vec / torch.linalg.norm(edge_vec, dim=-1, keepdim=True)  # normalise per bond (E), not per pair (T)
    return torch.clamp(-(unit[line_index[0]] * unit[line_index[1]]).sum(-1), -1.0, 1.0)


@lru_cache(maxsize=1)
def cgcnn_table() -> np.ndarray:
    """(MAX_Z + 1, 92) float32: the CGCNN one-hot atom encoding ALIGNN uses, row = atomic number.

    Same values as ``jarvis.core.specie.get_node_attributes(el, "cgcnn")`` (a copy of its
    ``atom_init.json`` ships in toolkit/resources); like upstream, elements beyond Z = 100 get
    the row of Z = 100. Row 0 is zeros (padding)."""
    raw = json.loads(_CGCNN_JSON.read_text())
    table = np.zeros((MAX_Z + 1, CGCNN_DIM), dtype=np.float32)
    for key, row in raw.items():
        table[int(key)] = row
    zmax = max(int(k) for k in raw)
    table[zmax + 1:] = table[zmax]
    table.setflags(write=False)
    return table


def cgcnn_features(numbers: np.ndarray) -> np.ndarray:
    """(n, 92) float32 CGCNN features of atomic numbers ``numbers``."""
    numbers = np.asarray(numbers, dtype=np.int64)
    if numbers.size and (numbers.min() < 1 or numbers.max() > MAX_Z):
        raise GraphError(f"atomic numbers out of range 1..{MAX_Z}: {sorted(set(numbers.tolist()))}")
    return cgcnn_table()[numbers]
