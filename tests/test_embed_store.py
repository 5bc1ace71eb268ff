"""embeddings.zarr layout, shard writer, completion records, finalize and verify (plain numpy data)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import zarr

from toolkit.embed import store as st

HIDDEN = {"alignn_1": 6, "gcn_1": 6, "readout": 6}


def _layout(n: int = 23, shard: int = 8, per_atom: bool = False, dtype: str = "float32") -> st.Layout:
    natoms = _natoms(n)
    return st.Layout(n_materials=n, shard_size=shard, hidden=HIDDEN, poolings=["mean", "max"],
                     prediction_size=5, per_atom=per_atom, dtype=dtype, n_atoms=int(natoms.sum()) if per_atom else 0)


def _natoms(n: int) -> np.ndarray:
    return (np.arange(n) % 4 + 1).astype(np.int64)


def _result(layout: st.Layout, shard: int, seed: int = 0) -> st.ShardResult:
    rows = layout.rows(shard)
    n = rows.stop - rows.start
    rng = np.random.default_rng(1000 * seed + shard)
    pooled = {k: rng.normal(size=(n, layout.hidden[k.split("/")[1]])).astype(np.float32) for k in layout.pooled_keys()}
    atoms = {}
    if layout.per_atom:
        na = int(_natoms(layout.n_materials)[rows].sum())
        atoms = {layer: rng.normal(size=(na, layout.hidden[layer])).astype(np.float32) for layer in layout.atom_layers}
    return st.ShardResult(pooled=pooled, prediction=rng.normal(size=(n, layout.prediction_size)).astype(np.float32),
                          atoms=atoms)


def _create(path: Path, layout: st.Layout, sha: str = "a" * 64) -> bool:
    n = layout.n_materials
    return st.create_store(path, layout, ids=np.array([f"m-{i}" for i in range(n)]), index=np.arange(n),
                           attrs={"checkpoint_sha256": sha, "config": {"embed": {"shard_size": layout.shard_size}}},
                           natoms=_natoms(n), energy=np.linspace(0, 15, layout.prediction_size))


def test_layout_shards_cover_rows_once():
    lay = _layout(n=23, shard=8)
    assert lay.n_shards == 3
    covered = np.concatenate([np.arange(n)[lay.rows(s)] for s, n in [(s, 23) for s in range(lay.n_shards)]])
    np.testing.assert_array_equal(covered, np.arange(23))
    with pytest.raises(st.EmbedStoreError, match="out of range"):
        lay.rows(3)
    assert st.inner_chunk(1024) == 256 and st.inner_chunk(24) == 24 and st.inner_chunk(300) == 150


def test_write_finalize_read_roundtrip(tmp_path):
    lay = _layout()
    path = tmp_path / "embeddings.zarr"
    assert _create(path, lay) is True
    root = zarr.open_group(path, mode="r")
    # arrays are sharded exactly along material shards
    assert root["layers/gcn_1/mean"].shards == (8, 6)
    assert root["prediction"].shards == (8, 5)
    assert root["layers/gcn_1/mean"].metadata.dimension_names == ("material", "feature")
    results = {s: _result(lay, s) for s in range(lay.n_shards)}
    for s in (2, 0, 1):
        st.write_shard(path, s, results[s], "a" * 64)
    info = st.finalize_store(path)
    assert info["n_shards"] == 3 and not info["already_complete"]
    root = st.open_embeddings(tmp_path)
    for key in lay.pooled_keys():
        np.testing.assert_array_equal(root[key][:], np.concatenate([results[s].pooled[key] for s in range(3)]))
    np.testing.assert_array_equal(root["prediction"][:], np.concatenate([results[s].prediction for s in range(3)]))
    assert list(root["ids"][:]) == [f"m-{i}" for i in range(23)]
    assert root.attrs["complete"] is True and root.attrs["checkpoint_sha256"] == "a" * 64
    assert root.metadata.consolidated_metadata is not None
    rep = st.verify_store(path)
    assert rep.ok and not rep.missing_shards and not rep.nonfinite_counts
    assert st.finalize_store(path)["already_complete"] is True


def test_missing_and_partial_shard_are_reported_then_redone(tmp_path):
    lay = _layout()
    path = tmp_path / "embeddings.zarr"
    _create(path, lay)
    st.write_shard(path, 0, _result(lay, 0), "a" * 64)
    # a crashed worker: data of shard 1 partly written, no completion record
    root = zarr.open_group(path, mode="r+")
    root["layers/gcn_1/mean"][lay.rows(1)] = np.full((8, 6), 7.0, np.float32)
    rep = st.verify_store(path)
    assert rep.missing_shards == [1, 2] and rep.missing_rows == 15 and not rep.ok
    text = "\n".join(rep.lines(path))
    assert "missing: 2 shards (15 rows): 1-2" in text and "NOT OK" in text
    with pytest.raises(st.EmbedStoreError, match="2 of 3 shards not finished: 1-2"):
        st.finalize_store(path)
    redo = {s: _result(lay, s, seed=1) for s in (1, 2)}
    for s, r in redo.items():
        st.write_shard(path, s, r, "a" * 64)
    st.finalize_store(path)
    root = st.open_embeddings(path)
    np.testing.assert_array_equal(root["layers/gcn_1/mean"][8:16], redo[1].pooled["layers/gcn_1/mean"])
    assert st.verify_store(path).ok


def test_nonfinite_rows_are_named(tmp_path):
    lay = _layout()
    path = tmp_path / "embeddings.zarr"
    _create(path, lay)
    for s in range(lay.n_shards):
        r = _result(lay, s)
        if s == 1:
            r.pooled["layers/alignn_1/max"][3, 2] = np.inf
            r.prediction[5, 0] = np.nan
        st.write_shard(path, s, r, "a" * 64)
    st.finalize_store(path)
    rep = st.verify_store(path)
    assert not rep.ok
    assert rep.nonfinite == {"layers/alignn_1/max": ["m-11"], "prediction": ["m-13"]}


def test_other_checkpoint_or_layout_is_refused(tmp_path):
    lay = _layout()
    path = tmp_path / "embeddings.zarr"
    _create(path, lay)
    assert _create(path, lay) is False  # same checkpoint + layout: reused
    with pytest.raises(st.EmbedStoreError, match="refusing to mix"):
        _create(path, lay, sha="b" * 64)
    with pytest.raises(st.EmbedStoreError, match="refusing to mix"):
        st.write_shard(path, 0, _result(lay, 0), "b" * 64)
    with pytest.raises(st.EmbedStoreError, match="another layout"):
        _create(path, _layout(shard=4))
    with pytest.raises(st.EmbedStoreError, match="shape"):
        bad = _result(lay, 0)
        bad.prediction = bad.prediction[:, :3]
        st.write_shard(path, 0, bad, "a" * 64)
    assert not st.done_shards(path)


def test_per_atom_ragged_compaction_and_float16(tmp_path):
    lay = _layout(per_atom=True, dtype="float16")
    path = tmp_path / "embeddings.zarr"
    _create(path, lay)
    results = {s: _result(lay, s) for s in range(lay.n_shards)}
    for s in range(lay.n_shards):
        st.write_shard(path, s, results[s], "a" * 64)
    st.finalize_store(path)
    root = st.open_embeddings(path)
    assert root["layers/gcn_1/mean"].dtype == np.float16
    assert "atoms" not in root["layers/readout"]  # readout is pooled already
    off = root["layers/gcn_1/atom_offset"][:]
    np.testing.assert_array_equal(np.diff(off), _natoms(23))
    full = np.concatenate([results[s].atoms["gcn_1"] for s in range(3)]).astype(np.float16)
    np.testing.assert_array_equal(root["layers/gcn_1/atoms"][:], full)
    np.testing.assert_array_equal(st.per_atom(root, "gcn_1", 9), full[off[9]:off[10]])
    assert not (path / st.STAGING).exists()
    assert st.verify_store(path).ok


def _create_in_process(args):
    path, q = args
    q.put(_create(Path(path), _layout()))


def test_concurrent_planners_create_the_store_once(tmp_path):
    path = tmp_path / "embeddings.zarr"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_create_in_process, args=((str(path), q),)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    created = [q.get(timeout=5) for _ in procs]
    assert sorted(created) == [False, False, False, True]
    assert [p.name for p in tmp_path.iterdir()] == ["embeddings.zarr"]  # no temporary skeletons left
    assert st.read_layout(path) == _layout()
