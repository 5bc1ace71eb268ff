"""ALIGNN in plain PyTorch, with upstream ``alignn.models.alignn_atomwise.ALIGNNAtomWise`` names.

The module tree (and so the ``state_dict``: names, shapes, the RBF ``centers`` buffers) is the
upstream one, so upstream checkpoints load with ``strict=True``::

    atom_embedding.layer.{0: Linear, 1: LayerNorm}          92 -> hidden
    edge_embedding.{0: RBFExpansion(0..8 Å, 80), 1: MLPLayer(80->64), 2: MLPLayer(64->hidden)}
    angle_embedding.{0: RBFExpansion(-1..1, 40), 1: MLPLayer(40->64), 2: MLPLayer(64->hidden)}
    alignn_layers.{i}.{node_update, edge_update}.{src_gate, dst_gate, edge_gate, bn_edges,
                                                 src_update, dst_update, bn_nodes}
    gcn_layers.{i}.{src_gate, ...}
    readout                                                 mean over atoms (no parameters)
    fc                                                      hidden -> output_features

Message passing is :func:`toolkit.model.kernels.gate_aggregate`: a fused C++ kernel on CPU
(float32/float64), else ``index_select`` gathers and ``index_add_`` sums (fp32 accumulation under
autocast); the LayerNorm -> SiLU -> residual updates are :func:`toolkit.model.kernels.layer_norm_silu`
(also a fused CPU kernel, else torch ops; the ``bn_nodes`` / ``bn_edges`` LayerNorm modules hold
the parameters either way). Inside ``torch.compile`` the torch-op path runs; it has no data-dependent Python control
flow, so the model traces without graph breaks.

Units: bond lengths in Å (``GraphBatch.edge_vec``), bond-angle cosines dimensionless.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from toolkit.data.batch import GraphBatch
from toolkit.data.graphs import CGCNN_DIM, bond_cosines, cgcnn_table
from toolkit.model.kernels import TorchGraph, gate_aggregate, layer_norm_silu, segment_sum, torch_graph

# Graph handles passed to the layers. Torch backend: a TorchGraph (kernels.py) of one graph
# (atom graph or line graph); the DGL backend passes a DGLGraph instead (dgl_backend.py).


class RBFExpansion(nn.Module):
    """Gaussian radial basis expansion of a scalar (bond length in Å, or angle cosine).

    ``exp(-gamma (d - c_k)^2)`` on ``bins`` evenly spaced centres ``c_k`` from vmin to vmax,
    gamma = 1 / (centre spacing) as upstream (SchNet-style).
    """

    def __init__(self, vmin: float = 0.0, vmax: float = 8.0, bins: int = 40) -> None:
        super().__init__()
        self.vmin, self.vmax, self.bins = float(vmin), float(vmax), int(bins)
        self.register_buffer("centers", torch.linspace(self.vmin, self.vmax, self.bins))
        # mean centre spacing computed exactly as upstream (numpy on the float32 centres)
        self.lengthscale = float(np.diff(self.centers.numpy()).mean())
        self.gamma = 1.0 / self.lengthscale

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        """(n,) -> (n, bins)."""
        return torch.exp(-self.gamma * (distance.unsqueeze(1) - self.centers) ** 2)


class MLPLayer(nn.Module):
    """Linear -> LayerNorm -> SiLU (upstream ``alignn.models.utils.MLPLayer``; the LayerNorm and SiLU
    run as :func:`~toolkit.model.kernels.layer_norm_silu`)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(in_features, out_features), nn.LayerNorm(out_features), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_silu(self.layer[1], self.layer[0](x))


class EdgeGatedGraphConv(nn.Module):
    """Edge-gated graph convolution (arXiv:1711.07553), ALIGNN's variant, residual.

    For an edge ``u -> v`` with features ``y_uv`` and nodes ``x``::

        m_uv   = W_sg x_u + W_dg x_v + W_eg y_uv
        s_uv   = sigmoid(m_uv)
        h_v    = sum_u s_uv * W_du x_u / (sum_u s_uv + 1e-6)
        x_v'   = x_v + SiLU(LN(W_su x_v + h_v))
        y_uv'  = y_uv + SiLU(LN(m_uv))

    The four node-side linear maps run as one GEMM on concatenated weights (the parameters stay
    separate, as upstream). ``g`` is the graph's ``(src, dst)`` index pair. Returns ``(x', y')``.
    """

    def __init__(self, input_features: int, output_features: int, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.src_gate = nn.Linear(input_features, output_features)
        self.dst_gate = nn.Linear(input_features, output_features)
        self.edge_gate = nn.Linear(input_features, output_features)
        self.bn_edges = nn.LayerNorm(output_features)
        self.src_update = nn.Linear(input_features, output_features)
        self.dst_update = nn.Linear(input_features, output_features)
        self.bn_nodes = nn.LayerNorm(output_features)

    def node_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One GEMM for the four node-side maps: ``x W_sg + b_sg + b_eg`` (the edge-gate bias is
        folded in here), ``x W_du + b_du``, ``x W_dg + b_dg``, ``x W_su + b_su``; each (N, F)."""
        w = torch.cat([self.src_gate.weight, self.dst_update.weight, self.dst_gate.weight, self.src_update.weight])
        b = torch.cat([self.src_gate.bias + self.edge_gate.bias, self.dst_update.bias,
                       self.dst_gate.bias, self.src_update.bias])
        return F.linear(x, w, b).split(self.src_gate.out_features, dim=1)

    def finish(self, x: torch.Tensor, y: torch.Tensor, ux: torch.Tensor, h: torch.Tensor,
               m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Node and edge updates with LayerNorm, SiLU and the residual connection:
        ``x + SiLU(bn_nodes(ux + h))``, ``y + SiLU(bn_edges(m))`` (kernels.layer_norm_silu: one fused
        CPU kernel for the add, LayerNorm, SiLU and residual add; torch ops elsewhere)."""
        x_new = layer_norm_silu(self.bn_nodes, ux, h, x if self.residual else None)
        y_new = layer_norm_silu(self.bn_edges, m, None, y if self.residual else None)
        return x_new, y_new

    def forward(self, g: TorchGraph, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e_src, bh, e_dst, ux = self.node_projections(x)
        # (E, F) edge-gate pre-activation m and gated sum h (kernels.gate_aggregate)
        m, h = gate_aggregate(g, torch.mm(y, self.edge_gate.weight.t()), e_src, e_dst, bh)
        return self.finish(x, y, ux, h, m)


class ALIGNNConv(nn.Module):
    """One ALIGNN layer: edge-gated conv on the atom graph, then on the line graph.

    Returns ``(x, y, z)``: atom, bond and angle features."""

    conv_cls: type[EdgeGatedGraphConv] = EdgeGatedGraphConv

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.node_update = self.conv_cls(in_features, out_features)
        self.edge_update = self.conv_cls(out_features, out_features)

    def forward(self, g: Any, lg: Any, x: torch.Tensor, y: torch.Tensor,
                z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, m = self.node_update(g, x, y)
        y, z = self.edge_update(lg, m, z)
        return x, y, z


class AvgPooling(nn.Module):
    """Mean of atom features per graph: (A, H) -> (B, H). A forward hook on it sees the pooled
    vector that feeds ``fc`` (the ``readout`` embedding layer)."""

    def forward(self, x: torch.Tensor, atom_batch: torch.Tensor, n_atoms: torch.Tensor) -> torch.Tensor:
        total = segment_sum(x, atom_batch, n_atoms.shape[0])
        return (total / n_atoms.clamp_min(1).to(total.dtype).unsqueeze(1)).to(x.dtype)


def sort_by_destination(edge_index: torch.Tensor, edge_vec: torch.Tensor, line_index: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reorder bonds by destination atom and angles by destination bond (stable), remapping the
    line graph's bond indices: the same graph, laid out for cache-friendly ``index_add_``."""
    pe = torch.argsort(edge_index[1], stable=True)
    inv = torch.empty_like(pe).scatter_(0, pe, torch.arange(pe.shape[0], device=pe.device))
    li = inv[line_index]
    pl = torch.argsort(li[1], stable=True)
    return edge_index.index_select(1, pe), edge_vec.index_select(0, pe), li.index_select(1, pl)


class ALIGNN(nn.Module):
    """ALIGNN regression model: ``forward(batch: GraphBatch) -> (B, output_features)``.

    CGCNN atom features (92 per element, looked up from ``batch.atomic_numbers`` in a
    non-persistent buffer so the state_dict equals upstream's) -> ``atom_embedding``; bond length
    RBF -> ``edge_embedding``; bond-angle cosine RBF -> ``angle_embedding``; ``alignn_layers``;
    ``gcn_layers``; ``readout`` (mean over atoms); ``fc``; then the link (identity by default).
    """

    conv_cls: type[EdgeGatedGraphConv] = EdgeGatedGraphConv
    alignn_cls: type[ALIGNNConv] = ALIGNNConv

    def __init__(self, *, alignn_layers: int = 4, gcn_layers: int = 4, atom_input_features: int = 92,
                 edge_input_features: int = 80, triplet_input_features: int = 40,
                 embedding_features: int = 64, hidden_features: int = 256, output_features: int = 1501,
                 cutoff: float = 8.0, link: str = "identity", conditions: int = 0, condition_features: int = 32,
                 condition_every_layer: bool = False) -> None:
        super().__init__()
        if link not in ("identity", "log", "logit"):
            raise ValueError(f"model link must be identity, log or logit, got {link!r}")
        self.link = link
        self.output_features = output_features
        if atom_input_features != CGCNN_DIM:
            raise ValueError(f"model.atom_input_features={atom_input_features}: only CGCNN atom features "
                             f"({CGCNN_DIM} per element) are supported")
        self.register_buffer("atom_features", torch.from_numpy(cgcnn_table().copy()), persistent=False)
        self.atom_embedding = MLPLayer(atom_input_features, hidden_features)
        self.edge_embedding = nn.Sequential(
            RBFExpansion(vmin=0.0, vmax=cutoff, bins=edge_input_features),
            MLPLayer(edge_input_features, embedding_features),
            MLPLayer(embedding_features, hidden_features),
        )
        self.angle_embedding = nn.Sequential(
            RBFExpansion(vmin=-1.0, vmax=1.0, bins=triplet_input_features),
            MLPLayer(triplet_input_features, embedding_features),
            MLPLayer(embedding_features, hidden_features),
        )
        self.alignn_layers = nn.ModuleList(
            [self.alignn_cls(hidden_features, hidden_features) for _ in range(alignn_layers)])
        self.gcn_layers = nn.ModuleList(
            [self.conv_cls(hidden_features, hidden_features) for _ in range(gcn_layers)])
        self.readout = AvgPooling()
        self.conditions = int(conditions)
        if self.conditions:  # the state vector (MEGNet's state attributes): standardised, embedded, mixed in
            self.register_buffer("condition_mean", torch.zeros(self.conditions))
            self.register_buffer("condition_std", torch.ones(self.conditions))
            self.condition_embedding = nn.Sequential(nn.Linear(self.conditions, condition_features), nn.SiLU(),
                                                     nn.Linear(condition_features, condition_features), nn.SiLU())
            self.condition_mix = nn.Sequential(nn.Linear(hidden_features + condition_features, hidden_features),
                                               nn.SiLU())
            self.condition_to_atoms = (nn.Linear(condition_features, hidden_features)
                                       if condition_every_layer else None)
        self.fc = nn.Linear(hidden_features, output_features)
        if link == "log":  # upstream's initial bias (log of the mean dft_3d band gap, 0.7 eV)
            nn.init.constant_(self.fc.bias, math.log(0.7))

    def condition_state(self, batch: GraphBatch) -> torch.Tensor:
        """(B, condition_features) embedding of the batch's standardised conditions."""
        c = getattr(batch, "conditions", None)
        if c is None or c.shape != (batch.num_graphs, self.conditions):
            raise ValueError(f"the model takes {self.conditions} condition values per material; the batch has "
                             f"{None if c is None else tuple(c.shape)} (conditions missing from the data?)")
        return self.condition_embedding((c.float() - self.condition_mean) / self.condition_std)

    def set_condition_scale(self, values: np.ndarray) -> None:
        """Standardise conditions with the mean and SD of ``values`` (N, C): the training records'."""
        v = np.asarray(values, dtype=np.float64).reshape(-1, self.conditions)
        sd = np.nanstd(v, axis=0)
        with torch.no_grad():
            self.condition_mean.copy_(torch.as_tensor(np.nanmean(v, axis=0), dtype=torch.float32))
            self.condition_std.copy_(torch.as_tensor(np.where(sd > 0, sd, 1.0), dtype=torch.float32))

    def prepare_graphs(self, batch: GraphBatch) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
        """``(g, lg, edge_vec, line_index)`` for the layers. Torch backend: g / lg are
        :class:`~toolkit.model.kernels.TorchGraph`, with bonds and angles reordered by destination
        (the sums over destinations then touch memory in order; the result does not depend on the
        input order)."""
        edge_index, edge_vec, line_index = sort_by_destination(batch.edge_index, batch.edge_vec, batch.line_index)
        g = torch_graph(edge_index[0], edge_index[1], batch.atomic_numbers.shape[0])
        lg = torch_graph(line_index[0], line_index[1], edge_index.shape[1])
        return g, lg, edge_vec, line_index

    def embeddings(self, batch: GraphBatch, r: torch.Tensor,
                   line_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Atom, bond and angle embeddings (``r``, ``line_index`` from :meth:`prepare_graphs`); the angle
        embedding is None for a model without ALIGNN layers (nothing reads it)."""
        x = self.atom_embedding(self.atom_features.index_select(0, batch.atomic_numbers))
        y = self.edge_embedding(torch.linalg.vector_norm(r, dim=1))
        z = self.angle_embedding(bond_cosines(r, line_index)) if len(self.alignn_layers) > 0 else None
        return x, y, z

    def forward(self, batch: GraphBatch) -> torch.Tensor:
        g, lg, r, line_index = self.prepare_graphs(batch)
        return self.head(g, lg, batch, *self.embeddings(batch, r, line_index))

    def head(self, g: Any, lg: Any, batch: GraphBatch, x: torch.Tensor, y: torch.Tensor,
             z: torch.Tensor | None) -> torch.Tensor:
        """Everything after the embeddings: the layers, the readout, ``fc`` and the link. With conditions,
        the embedded state vector joins the pooled features before ``fc`` (and, with
        ``condition_every_layer``, is added to the atom features before every layer)."""
        s = self.condition_state(batch) if self.conditions else None
        to_atoms = (self.condition_to_atoms(s).to(x.dtype).index_select(0, batch.atom_batch)
                    if s is not None and self.condition_to_atoms is not None else None)
        for layer in self.alignn_layers:
            x, y, z = layer(g, lg, x if to_atoms is None else x + to_atoms, y, z)
        for layer in self.gcn_layers:
            x, y = layer(g, x if to_atoms is None else x + to_atoms, y)
        pooled = self.readout(x, batch.atom_batch, batch.n_atoms)
        if s is not None:
            pooled = self.condition_mix(torch.cat([pooled, s.to(pooled.dtype)], dim=1))
        out = self.fc(pooled)
        if self.link == "log":
            return torch.exp(out)
        if self.link == "logit":
            return torch.sigmoid(out)
        return out
