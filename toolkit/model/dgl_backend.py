"""DGL backend of the same ALIGNN (``model.backend: dgl``): identical module tree and state_dict,
message passing with DGL's built-in functions, as upstream ``ALIGNNAtomWise`` does it.

DGL 2.1.0 is CPU-only here and unmaintained (see docs / platform facts): this backend exists for
cross-checking and for users with a working DGL; the default torch backend runs everywhere.
dgl is imported through :func:`toolkit.compat.dgl.import_dgl` (GraphBolt stand-in).
"""

from __future__ import annotations

from typing import Any

import torch

from toolkit.compat.dgl import import_dgl, to_dgl
from toolkit.data.batch import GraphBatch
from toolkit.model.alignn import ALIGNN, ALIGNNConv, EdgeGatedGraphConv
from toolkit.model.kernels import GATE_EPS


class DGLEdgeGatedGraphConv(EdgeGatedGraphConv):
    """:class:`EdgeGatedGraphConv` on a ``DGLGraph`` (same parameters, same maths)."""

    def forward(self, g: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fn = import_dgl().function
        g = g.local_var()
        g.ndata["e_src"] = self.src_gate(x)
        g.ndata["e_dst"] = self.dst_gate(x)
        g.apply_edges(fn.u_add_v("e_src", "e_dst", "e_nodes"))
        m = g.edata.pop("e_nodes") + self.edge_gate(y)
        g.edata["sigma"] = torch.sigmoid(m)
        g.ndata["Bh"] = self.dst_update(x)
        g.update_all(fn.u_mul_e("Bh", "sigma", "m"), fn.sum("m", "sum_sigma_h"))
        g.update_all(fn.copy_e("sigma", "m"), fn.sum("m", "sum_sigma"))
        h = g.ndata["sum_sigma_h"] / (g.ndata["sum_sigma"] + GATE_EPS)
        return self.finish(x, y, self.src_update(x), h, m)


class DGLALIGNNConv(ALIGNNConv):
    conv_cls = DGLEdgeGatedGraphConv


class ALIGNNDGL(ALIGNN):
    """:class:`~toolkit.model.alignn.ALIGNN` with DGL message passing; load either's state_dict."""

    conv_cls = DGLEdgeGatedGraphConv
    alignn_cls = DGLALIGNNConv

    def __init__(self, **kwargs: Any) -> None:
        import_dgl()  # fail at construction, with the install hint, when dgl is unusable
        super().__init__(**kwargs)

    def prepare_graphs(self, batch: GraphBatch) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
        """Upstream's DGL graphs: the batched atom graph and ``line_graph(shared=True)``."""
        g, lg = to_dgl(batch)
        s, d = lg.edges()
        return g, lg, batch.edge_vec, torch.stack([s.long(), d.long()])
