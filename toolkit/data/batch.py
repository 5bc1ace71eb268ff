"""The batch that flows from the on-disk dataset into the model (the graph <-> model contract).

All graphs of a batch are concatenated into one disjoint graph; indices are global within the batch.

Conventions (ALIGNN's): an atom-graph edge ``e = (u -> v)`` carries ``edge_vec[e] = pos(v) - pos(u)``
(Cartesian, Å, periodic image included). Messages flow from ``u`` (source) to ``v`` (destination).
Line-graph edges connect bond ``e1 = (a -> b)`` to bond ``e2 = (b -> c)`` (they share atom ``b``,
backtracking ``c == a`` included, as DGL's ``line_graph(shared=True)``; a bond is never paired
with itself, which only matters for bonds to an atom's own periodic image); the bond-angle cosine is
``cos(-edge_vec[e1], edge_vec[e2])``, the angle at ``b``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class GraphBatch:
    atomic_numbers: torch.Tensor  # (A,) int64
    edge_index: torch.Tensor  # (2, E) int64: source, destination atom (global)
    edge_vec: torch.Tensor  # (E, 3) float32, pos(dst) - pos(src)
    line_index: torch.Tensor  # (2, T) int64: bond e1 -> bond e2 (global edge indices)
    atom_batch: torch.Tensor  # (A,) int64: graph index of each atom
    n_atoms: torch.Tensor  # (B,) int64
    n_edges: torch.Tensor  # (B,) int64
    index: torch.Tensor  # (B,) int64: material index in the dataset store
    target: torch.Tensor | None = None  # (B, G) float32 (NaN where masked)
    target_mask: torch.Tensor | None = None  # (B, G) bool: True where the target is defined
    conditions: torch.Tensor | None = None  # (B, C) float32 condition values (temperature, ...), raw units
    ids: list[str] = field(default_factory=list)

    @property
    def num_graphs(self) -> int:
        return int(self.n_atoms.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "GraphBatch":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return GraphBatch(**kw)

    def pin_memory(self) -> "GraphBatch":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.pin_memory() if isinstance(v, torch.Tensor) else v
        return GraphBatch(**kw)
