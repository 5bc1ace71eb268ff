"""DGL interop on real structures: dgl 2.1.0 imports on current torch through the shim, our batches
convert to DGL graphs whose line graph and bond cosines equal DGL's / upstream ALIGNN's, and back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.compat.dgl import dgl_available, from_dgl, import_dgl, line_graph_edges, to_dgl
from toolkit.data.graphs import bond_cosines, cgcnn_table, knn_graph, line_graph_index, structure_graph
from toolkit.data.loader import collate

pytestmark = [pytest.mark.dgl, pytest.mark.skipif(not dgl_available(), reason="dgl 2.1.0 not importable here")]
Structure = pytest.importorskip("pymatgen.core").Structure


def batch_of(shared_data: Path, n: int):
    items = []
    with open(shared_data / "mp_structures" / "mp_structures.jsonl") as fh:
        for i, line in enumerate(fh):
            if i % 101:
                continue
            rec = json.loads(line)
            s = Structure.from_dict(rec["structure"])
            g = structure_graph(s)
            items.append({"index": i, "id": rec["material_id"], "numbers": g.numbers, "edge_src": g.edge_src,
                          "edge_dst": g.edge_dst, "edge_vec": g.edge_vec, "structure": s})
            if len(items) == n:
                break
    return items, collate(items)


def test_import_dgl_with_shim():
    dgl = import_dgl()
    assert dgl.__version__.startswith("2.1")
    assert import_dgl() is dgl
    from toolkit.compat.dgl import DGLUnavailable

    with pytest.raises(DGLUnavailable, match="GraphBolt"):
        dgl.graphbolt.FusedCSCSamplingGraph()


def test_to_dgl_line_graph_and_cosines_match_dgl(shared_data):
    dgl = import_dgl()
    items, b = batch_of(shared_data, 4)
    g, lg = to_dgl(b)
    assert g.batch_size == 4 and g.num_edges() == b.edge_index.shape[1]
    assert torch.equal(g.batch_num_nodes(), b.n_atoms)
    # DGL's own line graph == ours, edge for edge and in the same order
    assert np.array_equal(line_graph_edges(lg), b.line_index.numpy())
    # cosines as upstream computes them on DGL's line graph
    from alignn.graphs import compute_bond_cosines

    lg2 = g.line_graph(shared=True)
    lg2.apply_edges(compute_bond_cosines)
    torch.testing.assert_close(lg2.edata["h"], bond_cosines(b.edge_vec, b.line_index))
    torch.testing.assert_close(lg.edata["h"], lg2.edata["h"])
    np.testing.assert_array_equal(g.ndata["atom_features"].numpy(), cgcnn_table()[b.atomic_numbers.numpy()])
    # message passing on the DGL graph == index_add on the batch
    h = torch.randn(g.num_nodes(), 5)
    w = torch.randn(g.num_edges(), 5)
    g.ndata["h"], g.edata["w"] = h, w
    g.update_all(dgl.function.u_mul_e("h", "w", "m"), dgl.function.sum("m", "out"))
    ref = torch.zeros_like(h).index_add_(0, b.edge_index[1], h[b.edge_index[0]] * w)
    torch.testing.assert_close(g.ndata["out"], ref)


def test_from_dgl_round_trip(shared_data):
    _, b = batch_of(shared_data, 3)
    g = to_dgl(b, line_graph=False)
    back = from_dgl(g, index=b.index, ids=b.ids)
    for name in ("atomic_numbers", "edge_index", "edge_vec", "line_index", "atom_batch", "n_atoms", "n_edges", "index"):
        assert torch.equal(getattr(back, name), getattr(b, name)), name
    del g.ndata["Z"]  # atomic numbers recovered from the CGCNN one-hot rows
    assert torch.equal(from_dgl(g).atomic_numbers, b.atomic_numbers)


@pytest.mark.upstream
def test_line_graph_matches_upstream_dgl_builder(shared_data):
    """Upstream ALIGNN's DGL builder (Graph.atom_dgl_multigraph, k-nearest): our vectorised line graph
    and cosines on its atom graph equal its own line graph and lg.edata['h']."""
    import_dgl()
    agraphs = pytest.importorskip("alignn.graphs")
    jatoms = pytest.importorskip("jarvis.core.atoms")
    items, _ = batch_of(shared_data, 3)
    for it in items:
        s = it["structure"]
        a = jatoms.Atoms(lattice_mat=s.lattice.matrix, coords=s.frac_coords, elements=[str(x) for x in s.species],
                         cartesian=False)
        g, lg = agraphs.Graph.atom_dgl_multigraph(a, cutoff=8.0, max_neighbors=12, atom_features="cgcnn",
                                                  use_canonize=True)
        ours = from_dgl(g)
        assert np.array_equal(line_graph_edges(lg), ours.line_index.numpy())
        torch.testing.assert_close(lg.edata["h"].float(), bond_cosines(ours.edge_vec, ours.line_index))
        # its atom graph is ours minus some of the neighbours tied with the k-th shell (round-off; see
        # test_graphs.test_matches_upstream_alignn_knn_rule for the edge-by-edge check)
        mine = knn_graph(np.array(a.lattice.matrix), np.array(a.frac_coords), np.array(s.atomic_numbers))
        assert 0 <= mine.n_edges - g.num_edges() <= 0.1 * g.num_edges()
        src, dst = g.edges()
        assert torch.equal(line_graph_index(src, dst, g.num_nodes()), ours.line_index)
