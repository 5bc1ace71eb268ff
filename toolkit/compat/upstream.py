"""Upstream ALIGNN (``alignn==2026.8.11``) on the same inputs as ours, for the parity tests and the
benchmarks that compare against it. ``alignn`` is a test/benchmark-only dependency: it is imported
inside each function, so importing this module never needs it.

* :data:`STUDY`: the study's model hyperparameters (4 ALIGNN + 4 GCN layers, hidden 256, 1,501 outputs).
* :func:`upstream_graph_pairs`: upstream's own pure-torch graphs (its builder, its features).
* :func:`graphbatch_from_upstream`: our :class:`~toolkit.data.batch.GraphBatch` of exactly those graphs.
* :func:`upstream_pure_model`: upstream's ``ALIGNNAtomWisePure`` (same parameter names and shapes as
  the ``ALIGNNAtomWise`` the study trained).
"""

from __future__ import annotations

from pathlib import Path

import torch

from toolkit.data.batch import GraphBatch

STUDY = dict(alignn_layers=4, gcn_layers=4, atom_input_features=92, edge_input_features=80,
             triplet_input_features=40, embedding_features=64, hidden_features=256, output_features=1501)


def upstream_graph_pairs(poscars: list[Path], cutoff: float = 8.0, max_neighbors: int = 12) -> list:
    """(g, lg) TorchGraph pairs of POSCAR files from upstream's pure-torch builder."""
    from alignn.torch_graph_builder import build_pure_torch_graph
    from jarvis.core.atoms import Atoms

    return [build_pure_torch_graph(Atoms.from_poscar(str(p)), two_body_cutoff=cutoff, max_neighbors=max_neighbors,
                                   use_matscipy_topology=False) for p in poscars]


def graphbatch_from_upstream(pairs: list) -> GraphBatch:
    """Our GraphBatch of exactly the graphs upstream sees (global indices, ALIGNN conventions)."""
    from alignn.torch_graph_builder import batch_torch_graph_pairs

    g, lg = batch_torch_graph_pairs(pairs)
    n_atoms = g.batch_num_nodes.long()
    return GraphBatch(
        atomic_numbers=g.ndata["Z"].long(),
        edge_index=torch.stack([g.src, g.dst]).long(),
        edge_vec=g.edata["r"].float().contiguous(),
        line_index=torch.stack([lg.src, lg.dst]).long(),
        atom_batch=torch.repeat_interleave(torch.arange(len(pairs)), n_atoms),
        n_atoms=n_atoms,
        n_edges=g.batch_num_edges.long(),
        index=torch.arange(len(pairs)),
    )


def upstream_pure_model(**kw):
    """Upstream's ``ALIGNNAtomWisePure`` for a spectrum (no forces, no ZBL, no per-atom scaling)."""
    from alignn.models import alignn_atomwise_pure as alignn_pure

    cfg = alignn_pure.ALIGNNAtomWisePureConfig(name="alignn_atomwise_pure", calculate_gradient=False,
                                               use_zbl=False, energy_mult_natoms=False, **kw)
    return alignn_pure.ALIGNNAtomWisePure(cfg)
