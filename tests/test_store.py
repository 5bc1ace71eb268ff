"""dataset.zarr parts, completion records, reader, streaming sampler and loader (real Zarr stores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.data import store
from toolkit.data.batch import GraphBatch
from toolkit.data.graphs import line_graph_index, structure_graph
from toolkit.data.loader import BlockShuffleSampler, MaterialDataset, collate, make_loader

Structure = pytest.importorskip("pymatgen.core").Structure

G = 31  # a short energy grid keeps the stores tiny


def records(shared_data: Path, n: int, offset: int = 0) -> list[store.MaterialRecord]:
    out = []
    rng = np.random.default_rng(offset)
    with open(shared_data / "mp_structures" / "mp_structures.jsonl") as fh:
        for i, line in enumerate(fh):
            if i < offset:
                continue
            rec = json.loads(line)
            s = Structure.from_dict(rec["structure"])
            g = structure_graph(s)
            spec = None
            if i % 3:  # every third material is structure-only; others get a masked random spectrum
                spec = rng.uniform(2, 6, G).astype(np.float32)
                spec[:3] = np.nan
            out.append(store.MaterialRecord(
                id=rec["material_id"], formula=s.composition.reduced_formula, numbers=np.array(s.atomic_numbers),
                frac_coords=s.frac_coords, lattice=s.lattice.matrix, edge_src=g.edge_src, edge_dst=g.edge_dst,
                edge_vec=g.edge_vec, spectrum=spec,
                descriptors={"onset": float(i), "edge_integral": 1.0, "peaks": [3.0, 4.0]},
                extras={"properties": {"label": f"L{i % 2}", "x": float(i)}}))
            if len(out) == n:
                break
    return out


def build_store(path: Path, parts: list[list[store.MaterialRecord]], complete: bool = True) -> None:
    store.create_store(path, {"n_parts": len(parts), "energy": np.linspace(0, 15, G).tolist(),
                              "grid": {"start": 0, "stop": 15, "num": G}})
    for p, recs in enumerate(parts):
        store.write_part(path, p, recs, G)
    if complete:
        store.write_index(path, len(parts))
        store.mark_complete(path, {"n_materials": sum(len(r) for r in parts)})


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("store") / "dataset.zarr"
    recs = records(shared_data, 30)
    parts = [recs[0:8], recs[8:16], recs[16:24], recs[24:30]]
    build_store(path, parts)
    return path, recs


def test_round_trip(small_store):
    path, recs = small_store
    r = store.DatasetReader(path)
    assert len(r) == len(recs) and r.n_parts == 4
    assert list(r.part_sizes()) == [8, 8, 8, 6]
    assert [str(x) for x in r.ids] == [x.id for x in recs]
    for i in (0, 9, 29):
        m = r.material(i)
        src = recs[i]
        assert m["id"] == src.id and m["formula"] == src.formula and m["index"] == i
        np.testing.assert_array_equal(m["numbers"], src.numbers)
        np.testing.assert_array_equal(m["edge_src"], src.edge_src)
        np.testing.assert_array_equal(m["edge_dst"], src.edge_dst)
        np.testing.assert_array_equal(m["edge_vec"], src.edge_vec)
        np.testing.assert_allclose(m["frac_coords"], src.frac_coords)
        np.testing.assert_allclose(m["lattice"], src.lattice)
        assert m["has_spectrum"] == (src.spectrum is not None)
        if src.spectrum is None:
            assert np.isnan(m["spectrum"]).all()
        else:
            np.testing.assert_array_equal(m["spectrum"], src.spectrum)
    onset = r.column("descriptors/onset")
    np.testing.assert_array_equal(onset, [x.descriptors["onset"] for x in recs])
    assert r.column("descriptors/peaks").shape == (30, 3)
    assert [str(x) for x in r.column("properties/label", np.array([3, 4]))] == ["L1", "L0"]
    assert np.array_equal(r.natoms, [len(x.numbers) for x in recs])
    attrs = store.part_attrs(path, 1)
    assert attrs["complete"] is True and attrs["n_materials"] == 8 and len(attrs["checksum"]) == 32


def test_incomplete_store_is_refused(tmp_path, shared_data):
    path = tmp_path / "dataset.zarr"
    build_store(path, [records(shared_data, 4)], complete=False)
    assert store.part_complete(path, 0) and not store.part_complete(path, 1)
    with pytest.raises(store.IncompleteStoreError, match="re-run `spectrolens prepare`"):
        store.DatasetReader(path)
    with pytest.raises(store.IncompleteStoreError):
        MaterialDataset(path)
    # a part whose completion record is missing (writer killed) is detected and rewritten from scratch
    grp = __import__("zarr").open_group(str(path / "parts" / "00000"), mode="r+")
    grp.attrs["complete"] = False
    assert not store.part_complete(path, 0)
    store.write_part(path, 0, records(shared_data, 3), G)
    assert store.part_attrs(path, 0)["n_materials"] == 3
    with pytest.raises(store.StoreError, match="not a Zarr v3 store"):
        store.root_attrs(tmp_path / "nothing.zarr")


def test_collate_builds_consistent_batch(small_store):
    path, recs = small_store
    ds = MaterialDataset(path, indices=[2, 5, 11])
    b = collate([ds[i] for i in range(3)])
    assert isinstance(b, GraphBatch) and b.num_graphs == 3
    na = [len(recs[i].numbers) for i in (2, 5, 11)]
    ne = [len(recs[i].edge_src) for i in (2, 5, 11)]
    assert b.n_atoms.tolist() == na and b.n_edges.tolist() == ne
    assert b.index.tolist() == [2, 5, 11] and b.ids == [recs[i].id for i in (2, 5, 11)]
    # edges stay within their graph and global indices are offset correctly
    gb = b.atom_batch[b.edge_index]
    assert torch.equal(gb[0], gb[1])
    assert torch.equal(b.edge_index[0, ne[0]:ne[0] + ne[1]] - na[0], torch.from_numpy(recs[5].edge_src).long())
    assert torch.equal(b.line_index, line_graph_index(b.edge_index[0], b.edge_index[1], sum(na)))
    # line-graph pairs share the middle atom
    assert torch.equal(b.edge_index[1, b.line_index[0]], b.edge_index[0, b.line_index[1]])
    assert b.target.shape == (3, G) and b.target_mask.dtype == torch.bool
    assert torch.equal(b.target_mask, torch.isfinite(b.target))
    assert b.edge_vec.dtype == torch.float32 and b.atomic_numbers.dtype == torch.int64


def test_sampler_distributed_disjoint_equal_and_block_local():
    blocks = np.repeat(np.arange(10), 25)[:237]  # 10 parts, the last one short
    world = 3
    per_rank = []
    for r in range(world):
        s = BlockShuffleSampler(blocks, shuffle=True, seed=7, rank=r, world=world, window=2)
        s.set_epoch(3)
        per_rank.append(list(s))
    assert len({len(x) for x in per_rank}) == 1 and len(per_rank[0]) == -(-237 // world)
    flat = sum(per_rank, [])
    assert set(flat) == set(range(237))  # every position covered, only padding repeats
    assert len(flat) - len(set(flat)) == len(flat) - 237
    # block locality: the order visits each group of `window` parts once
    order = BlockShuffleSampler(blocks, seed=7, window=2).epoch_order(3)
    seq = blocks[order]
    first = {b: np.nonzero(seq == b)[0][0] for b in range(10)}
    last = {b: np.nonzero(seq == b)[0][-1] for b in range(10)}
    open_parts = [sum(first[b] <= i <= last[b] for b in range(10)) for i in range(len(seq))]
    assert max(open_parts) == 2  # at most `window` parts needed at any point of the epoch
    assert np.count_nonzero(np.diff(seq) != 0) > 20  # materials of the two parts of a group are mixed
    # epochs differ, same epoch is reproducible
    s = BlockShuffleSampler(blocks, seed=7)
    assert not np.array_equal(s.epoch_order(0), s.epoch_order(1))
    assert np.array_equal(s.epoch_order(1), BlockShuffleSampler(blocks, seed=7).epoch_order(1))
    # drop_last truncates to equal size without padding
    d = [list(BlockShuffleSampler(blocks, rank=r, world=world, drop_last=True)) for r in range(world)]
    assert all(len(x) == 237 // world for x in d) and len(set(sum(d, []))) == 237 // world * world
    # no shuffle: identity order
    assert list(BlockShuffleSampler(blocks[:10], shuffle=False)) == list(range(10))


def test_sampler_resumes_mid_epoch_exactly():
    blocks = np.repeat(np.arange(6), 10)
    full = BlockShuffleSampler(blocks, seed=1, rank=1, world=2)
    full.set_epoch(2)
    expect = list(full)
    s = BlockShuffleSampler(blocks, seed=1, rank=1, world=2)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(11)]
    state = s.state_dict()
    assert state["epoch"] == 2 and state["consumed"] == 11
    resumed = BlockShuffleSampler(blocks, seed=1, rank=1, world=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert len(resumed) == len(expect) - 11
    assert head + list(resumed) == expect
    assert list(resumed) == expect  # the next pass is the whole epoch again
    with pytest.raises(ValueError, match="cannot resume"):
        BlockShuffleSampler(blocks, seed=2, rank=1, world=2).load_state_dict(state)


def test_make_loader_streams_with_bounded_cache(small_store):
    path, recs = small_store
    dl = make_loader(path, indices=np.arange(30), batch_size=4, shuffle=True, seed=0, window=2)
    seen = []
    max_cached = 0
    for b in dl:
        seen += b.index.tolist()
        max_cached = max(max_cached, len(dl.dataset.reader._cache))
    assert sorted(seen) == list(range(30))
    assert max_cached <= 2
    # two ranks: disjoint halves
    a = [i for b in make_loader(path, batch_size=5, rank=0, world=2, seed=3) for i in b.index.tolist()]
    c = [i for b in make_loader(path, batch_size=5, rank=1, world=2, seed=3) for i in b.index.tolist()]
    assert len(a) == len(c) == 15 and not set(a) & set(c)


def test_loader_worker_processes(small_store):
    path, _ = small_store
    dl = make_loader(path, batch_size=8, num_workers=2, shuffle=False)
    idx = [i for b in dl for i in b.index.tolist()]
    assert sorted(idx) == list(range(30))


def test_store_and_loader_need_no_pymatgen_or_jarvis(small_store, repo_root):
    """A GPU node reads the store with numpy/zarr/torch only: block pymatgen and jarvis imports."""
    path, _ = small_store
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('pymatgen', 'jarvis'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from toolkit.data.loader import make_loader
n = sum(b.num_graphs for b in make_loader({str(path)!r}, batch_size=7))
assert not any(m.split('.')[0] in ('pymatgen', 'jarvis') for m in sys.modules)
print(n)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "30"
