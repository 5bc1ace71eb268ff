"""DGL interop: import dgl 2.1.0 on current torch, convert atom graphs / line graphs to and from DGL.

DGL is optional (test-only dependency): its newest PyPI release, 2.1.0, is built for torch 2.0-2.2
and ``import dgl`` on newer torch fails while loading its GraphBolt C++ library (a separate
sampling/dataloading component built per torch version, which spectrolens never uses).
:func:`import_dgl` installs a stand-in ``dgl.graphbolt`` module before ``import dgl`` (nothing in
site-packages is edited); graphs, ``dgl.batch``, ``line_graph``, message passing and save/load work.
Anything that touches GraphBolt raises :class:`DGLUnavailable` naming the reason.

Conversions follow upstream ALIGNN's DGL data layout: atom graph ``g`` with ``g.edata["r"]``
(E, 3) bond vectors ``pos(dst) - pos(src)`` in Å, ``g.ndata["atom_features"]`` (n, 92) CGCNN
features and ``g.ndata["Z"]``; line graph ``lg = g.line_graph(shared=True)`` with
``lg.edata["h"]`` the bond-angle cosines (upstream ``compute_bond_cosines``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import warnings
from typing import Any

import numpy as np
import torch

from toolkit.data.batch import GraphBatch
from toolkit.data.graphs import bond_cosines, cgcnn_table

DGL_VERSION = "2.1.0"


class DGLUnavailable(ImportError):
    """dgl cannot be imported here, or a part of it that cannot work on this torch was used."""


def _graphbolt_standin() -> types.ModuleType:
    """A ``dgl.graphbolt`` stand-in: names resolve to placeholder classes that refuse to be used."""
    mod = types.ModuleType("dgl.graphbolt")
    mod.__doc__ = "spectrolens stand-in: DGL GraphBolt has no build for this torch version"
    mod.__path__ = []  # a package, so `import dgl.graphbolt.x` fails cleanly

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def _refuse(*args: Any, **kwargs: Any) -> Any:
            raise DGLUnavailable(f"dgl.graphbolt.{name} is unavailable: DGL {DGL_VERSION} ships no GraphBolt "
                                 f"library for torch {torch.__version__} (spectrolens does not use GraphBolt)")

        placeholder = type(name, (), {"__init__": _refuse, "__module__": "dgl.graphbolt"})
        setattr(mod, name, placeholder)
        return placeholder

    mod.__getattr__ = __getattr__  # type: ignore[attr-defined]
    mod.load_graphbolt = lambda: None  # type: ignore[attr-defined]
    return mod


def import_dgl() -> types.ModuleType:
    """Import and return ``dgl`` (with the GraphBolt stand-in); raises :class:`DGLUnavailable` with the
    install hint when dgl (or one of its undeclared dependencies) is missing."""
    if "dgl" in sys.modules and getattr(sys.modules["dgl"], "graph", None) is not None:
        return sys.modules["dgl"]
    os.environ.setdefault("DGLBACKEND", "pytorch")
    if importlib.util.find_spec("dgl") is None:
        raise DGLUnavailable(f"dgl is not installed; install the test extra: pip install dgl=={DGL_VERSION} "
                             f"torchdata==0.9.0 packaging pandas pyyaml pydantic")
    sys.modules.setdefault("dgl.graphbolt", _graphbolt_standin())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdata's datapipes deprecation banner
        try:
            dgl = importlib.import_module("dgl")
        except Exception as e:
            for name in [m for m in sys.modules if m == "dgl" or m.startswith("dgl.")]:
                sys.modules.pop(name, None)
            raise DGLUnavailable(f"import dgl failed even with the GraphBolt stand-in: {type(e).__name__}: {e}. "
                                 f"Needs dgl=={DGL_VERSION}, torchdata==0.9.0, packaging, pandas, pyyaml, "
                                 f"pydantic") from e
    if not hasattr(dgl, "graphbolt"):
        dgl.graphbolt = sys.modules["dgl.graphbolt"]
    return dgl


def dgl_available() -> bool:
    try:
        import_dgl()
        return True
    except DGLUnavailable:
        return False


def to_dgl(batch: GraphBatch, line_graph: bool = True) -> Any:
    """A :class:`GraphBatch` as upstream-ALIGNN DGL graphs: ``(g, lg)`` (or ``g``), batched per material.

    ``g``: edges ``edge_index``, ``edata["r"]`` = edge_vec (Å), ``ndata["atom_features"]`` (CGCNN),
    ``ndata["Z"]``; ``lg``: DGL's own ``line_graph(shared=True)`` with ``edata["h"]`` bond cosines."""
    dgl = import_dgl()
    src, dst = batch.edge_index[0].long(), batch.edge_index[1].long()
    g = dgl.graph((src, dst), num_nodes=int(batch.atomic_numbers.shape[0]))
    g.ndata["Z"] = batch.atomic_numbers.long()
    g.ndata["atom_features"] = torch.from_numpy(cgcnn_table()[batch.atomic_numbers.cpu().numpy()]).to(
        batch.edge_vec.device)
    g.edata["r"] = batch.edge_vec.float()
    g.set_batch_num_nodes(batch.n_atoms.long())
    g.set_batch_num_edges(batch.n_edges.long())
    if not line_graph:
        return g
    lg = g.line_graph(shared=True)
    s, d = lg.edges()
    lg.edata["h"] = bond_cosines(batch.edge_vec.float(), torch.stack([s.long(), d.long()]))
    return g, lg


def from_dgl(g: Any, index: torch.Tensor | None = None, ids: list[str] | None = None) -> GraphBatch:
    """A (batched) DGL atom graph with ``edata["r"]`` and ``ndata["Z"]`` (or CGCNN ``atom_features``)
    as a :class:`GraphBatch`; the line graph is rebuilt by :func:`toolkit.data.graphs.line_graph_index`."""
    from toolkit.data.graphs import line_graph_index

    src, dst = g.edges()
    if "Z" in g.ndata:
        z = g.ndata["Z"].long().reshape(-1)
    elif "atom_features" in g.ndata:  # invert the CGCNN one-hot table (rows are unique for Z <= 100)
        feats = g.ndata["atom_features"].float().cpu().numpy()
        table = cgcnn_table()[: 101]
        match = (feats[:, None, :] == table[None, 1:, :]).all(-1)
        if not match.any(1).all():
            raise ValueError("atom_features rows are not CGCNN encodings; set g.ndata['Z']")
        z = torch.from_numpy(match.argmax(1) + 1).long()
    else:
        raise ValueError("DGL graph has neither ndata['Z'] nor ndata['atom_features']")
    n_atoms = g.batch_num_nodes().long()
    n_edges = g.batch_num_edges().long()
    B = int(n_atoms.shape[0])
    return GraphBatch(
        atomic_numbers=z, edge_index=torch.stack([src.long(), dst.long()]), edge_vec=g.edata["r"].float(),
        line_index=line_graph_index(src.long(), dst.long(), int(z.shape[0])),
        atom_batch=torch.repeat_interleave(torch.arange(B), n_atoms), n_atoms=n_atoms, n_edges=n_edges,
        index=torch.arange(B) if index is None else index, ids=list(ids or []))


def line_graph_edges(lg: Any) -> np.ndarray:
    """(2, T) int64 numpy array of a DGL line graph's edges (for comparisons)."""
    s, d = lg.edges()
    return np.stack([s.cpu().numpy(), d.cpu().numpy()]).astype(np.int64)
