"""Bad input and interrupted or failing writes never break dataset.zarr, embeddings.zarr or a checkpoint:
a killed skeleton is recognised and redone, a part or shard whose data is missing is not "done", the
completion mark is the very last write, a full disk gives one line naming the path and leaves no
temporary files, and a file that is not a checkpoint is called that (plain numpy data, real Zarr stores)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
import zarr.storage._local as zlocal

from toolkit.data import store as ds
from toolkit.embed import store as st
from toolkit.errors import OutOfSpaceError, SpectrolensError
from toolkit.model.checkpoint import (
    CheckpointError,
    load_state_dict_file,
    save_state_dict_file,
)

G = 7
ATTRS = {"n_parts": 2, "energy": np.linspace(0, 15, G).tolist(), "grid": {"start": 0, "stop": 15, "num": G},
         "graph": {"cutoff": 8.0}, "prepare_config": {"graph": {"cutoff": 8.0}}}
HIDDEN = {"alignn_1": 4, "gcn_1": 4, "readout": 4}
SHA = "a" * 64


class Killed(Exception):
    """Stands for the process being killed at a write: nothing of the write lands."""


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_writes(monkeypatch, after: int = 0, exc: BaseException | None = None, match=lambda path, data: True) -> list:
    """Let the first ``after`` matching Zarr file writes through, then make every later matching one fail
    midway (its temporary file created, some bytes written) with ``exc`` (default ENOSPC). Returns the
    list of matching paths seen."""
    real_put, real_atomic = zlocal._put, zlocal._atomic_write
    seen: list[Path] = []

    def put(path, value, exclusive=False):
        if match(path, value.to_bytes()):
            seen.append(path)
            if len(seen) > after:
                if isinstance(exc, Killed):
                    raise exc
                path.parent.mkdir(parents=True, exist_ok=True)
                with real_atomic(path, "wb", exclusive=exclusive) as f:
                    f.write(b"{")
                    raise exc if exc is not None else enospc()
        return real_put(path, value, exclusive)

    monkeypatch.setattr(zlocal, "_put", put)
    return seen


def consolidating(root: Path):
    """Matches the write of ``root/zarr.json`` that carries the consolidated metadata."""
    return lambda path, data: Path(path) == root / "zarr.json" and b"consolidated_metadata" in data


def leftovers(where: Path, settle_s: float = 5.0) -> list[Path]:
    """Temporary files of zarr (``*.partial``), toolkit.runtime and checkpoints (``.*tmp*``), skeletons.

    zarr writes some files concurrently (threads that finish after the failing one raised), so a
    temporary file is a leftover only if it is still there after ``settle_s``."""
    deadline = time.monotonic() + settle_s
    while True:
        found = [p for p in where.rglob("*")
                 if p.name.endswith(".partial") or (p.name.startswith(".") and "tmp" in p.name)]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def one_line_naming(e: BaseException, path: Path) -> None:
    msg = str(e)
    assert isinstance(e, OutOfSpaceError) and isinstance(e, SpectrolensError)
    assert str(path) in msg and "\n" not in msg and "No space left" in msg, msg


# ------------------------------------------------------------------------------------- dataset.zarr helpers


def recs(n: int, start: int = 0) -> list[ds.MaterialRecord]:
    rng = np.random.default_rng(start)
    out = []
    for i in range(start, start + n):
        na = 2 + i % 3
        ne = 2 * na
        out.append(ds.MaterialRecord(
            id=f"m-{i}", formula=f"C{na}", numbers=np.full(na, 6), frac_coords=rng.random((na, 3)),
            lattice=np.eye(3) * 4.0, edge_src=np.arange(ne) % na, edge_dst=(np.arange(ne) + 1) % na,
            edge_vec=rng.normal(size=(ne, 3)), spectrum=None if i % 3 == 0 else rng.random(G).astype(np.float32),
            descriptors={"onset": float(i), "peaks": [1.0]}, extras={"properties": {"label": f"L{i % 2}"}}))
    return out


def build(path: Path, n_parts: int = 2, complete: bool = True) -> None:
    ds.create_store(path, ATTRS)
    for p in range(n_parts):
        ds.write_part(path, p, recs(4, 4 * p), G)
    if complete:
        ds.write_index(path, n_parts)
        ds.mark_complete(path, {"n_materials": 4 * n_parts})


# ------------------------------------------------------------------------------------- embeddings.zarr helpers


def _natoms(n: int) -> np.ndarray:
    return (np.arange(n) % 3 + 1).astype(np.int64)


def _layout(n: int = 10, shard: int = 4, per_atom: bool = True) -> st.Layout:
    return st.Layout(n_materials=n, shard_size=shard, hidden=HIDDEN, poolings=["mean"], prediction_size=3,
                     per_atom=per_atom, n_atoms=int(_natoms(n).sum()) if per_atom else 0)


def _create(path: Path, lay: st.Layout) -> bool:
    n = lay.n_materials
    return st.create_store(path, lay, ids=np.array([f"m-{i}" for i in range(n)]), index=np.arange(n),
                           attrs={"checkpoint_sha256": SHA}, natoms=_natoms(n), energy=np.linspace(0, 15, 3))


def _result(lay: st.Layout, shard: int) -> st.ShardResult:
    rows = lay.rows(shard)
    n = rows.stop - rows.start
    rng = np.random.default_rng(shard)
    pooled = {k: rng.normal(size=(n, 4)).astype(np.float32) for k in lay.pooled_keys()}
    na = int(_natoms(lay.n_materials)[rows].sum())
    atoms = {layer: rng.normal(size=(na, 4)).astype(np.float32) for layer in lay.atom_layers}
    return st.ShardResult(pooled=pooled, prediction=rng.normal(size=(n, 3)).astype(np.float32), atoms=atoms)


def _write_all(path: Path, lay: st.Layout) -> dict[int, st.ShardResult]:
    results = {s: _result(lay, s) for s in range(lay.n_shards)}
    for s, r in results.items():
        st.write_shard(path, s, r, SHA)
    return results


# ------------------------------------------------------------------------------------- 1. one error base


def test_store_and_checkpoint_errors_are_user_facing_errors():
    for cls, old in ((ds.StoreError, RuntimeError), (ds.IncompleteStoreError, RuntimeError),
                     (st.EmbedStoreError, RuntimeError), (CheckpointError, ValueError)):
        assert issubclass(cls, SpectrolensError) and issubclass(cls, old), cls


# ------------------------------------------------------------------------------------- 2. killed skeletons


@pytest.mark.parametrize("kill_at", [0, 1])
def test_killed_dataset_skeleton_is_recognised_and_redone(tmp_path, monkeypatch, kill_at):
    path = tmp_path / "dataset.zarr"
    fail_writes(monkeypatch, after=kill_at, exc=Killed())
    with pytest.raises(Killed):
        ds.create_store(path, ATTRS)
    monkeypatch.undo()
    # never a root with only some attributes: either no root yet, or all of them
    if (path / "zarr.json").is_file():
        assert ATTRS.items() <= ds.root_attrs(path).items()
    assert not ds.skeleton_complete(path)
    ds.create_store(path, ATTRS)  # the caller redoes an unfinished skeleton
    assert ds.skeleton_complete(path)
    attrs = ds.root_attrs(path)
    assert ATTRS.items() <= attrs.items() and attrs["complete"] is False and attrs["format"] == ds.FORMAT
    ds.write_part(path, 0, recs(3), G)
    assert ds.part_complete(path, 0)


def test_partial_root_attributes_are_an_unfinished_skeleton(tmp_path):
    """zarr versions that write the root attributes one key at a time leave a root with some of them."""
    path = tmp_path / "dataset.zarr"
    path.mkdir()
    node = {"zarr_format": 3, "node_type": "group", "attributes": {"format": ds.FORMAT, "version": ds.VERSION,
                                                                   "n_parts": 2}}
    (path / "zarr.json").write_text(json.dumps(node))
    assert not ds.skeleton_complete(path)
    with pytest.raises(ds.StoreError, match="unfinished") as e:
        ds.root_attrs(path)
    assert "different configuration" not in str(e.value)
    ds.create_store(path, ATTRS)
    assert ds.skeleton_complete(path) and ds.root_attrs(path)["graph"] == ATTRS["graph"]
    # an empty root (killed right after the group was created) is unfinished too; another format is not ours
    (path / "zarr.json").write_text(json.dumps({**node, "attributes": {}}))
    assert not ds.skeleton_complete(path)
    (path / "zarr.json").write_text(json.dumps({**node, "attributes": {"format": "something-else"}}))
    with pytest.raises(ds.StoreError, match="not a spectrolens dataset store"):
        ds.skeleton_complete(path)
    assert not ds.skeleton_complete(tmp_path / "absent.zarr")


@pytest.mark.parametrize("kill_at", [0, 3])
def test_killed_embed_skeleton_is_redone(tmp_path, monkeypatch, kill_at):
    path = tmp_path / "embeddings.zarr"
    lay = _layout()
    fail_writes(monkeypatch, after=kill_at, exc=Killed())
    with pytest.raises(Killed):
        _create(path, lay)
    monkeypatch.undo()
    assert not st.skeleton_complete(path) and not leftovers(tmp_path)
    assert _create(path, lay) is True and st.skeleton_complete(path)
    assert _create(path, lay) is False  # a finished skeleton is reused


def test_unfinished_embed_skeleton_in_place_is_replaced(tmp_path):
    path = tmp_path / "embeddings.zarr"
    path.mkdir()
    node = {"zarr_format": 3, "node_type": "group", "attributes": {"format": st.FORMAT, "version": st.VERSION}}
    (path / "zarr.json").write_text(json.dumps(node))
    lay = _layout()
    assert not st.skeleton_complete(path)
    assert _create(path, lay) is True
    assert st.skeleton_complete(path) and st.read_layout(path) == lay
    assert [p.name for p in tmp_path.iterdir()] == ["embeddings.zarr"]


# ------------------------------------------------------------------------------------- 3. records need their data


def test_part_whose_arrays_were_deleted_is_incomplete_and_refused(tmp_path):
    path = tmp_path / "dataset.zarr"
    build(path, complete=False)
    assert ds.part_attrs(path, 1)["arrays"]  # the completion record lists the part's arrays
    shutil.rmtree(path / "parts" / "00001" / "ids")
    assert ds.part_complete(path, 0) and not ds.part_complete(path, 1)
    with pytest.raises(ds.StoreError, match=r"part 00001.*ids.*re-run `spectrolens prepare`"):
        ds.write_index(path, 2)
    shutil.rmtree(path / "parts" / "00000" / "descriptors" / "onset")
    assert not ds.part_complete(path, 0)
    for p in (0, 1):  # a re-run rebuilds them
        ds.write_part(path, p, recs(4, 4 * p), G)
    assert ds.part_complete(path, 0) and ds.part_complete(path, 1)
    ds.write_index(path, 2)
    ds.mark_complete(path, {"n_materials": 8})
    assert ds.DatasetReader(path).material(5)["id"] == "m-5"


def test_reader_refuses_a_part_whose_arrays_were_deleted(tmp_path):
    path = tmp_path / "dataset.zarr"
    build(path)
    shutil.rmtree(path / "parts" / "00000" / "natoms")
    r = ds.DatasetReader(path)  # consolidated metadata still lists the array
    with pytest.raises(ds.StoreError, match=r"part 00000.*natoms.*re-run `spectrolens prepare`"):
        r.read_part(0)
    with pytest.raises(ds.StoreError, match="part 00000"):
        r.column("descriptors/onset")
    assert r.material(6)["id"] == "m-6"  # other parts are fine


def test_embed_shard_whose_staged_atoms_were_deleted_is_redone(tmp_path):
    path = tmp_path / "embeddings.zarr"
    lay = _layout()
    _create(path, lay)
    results = _write_all(path, lay)
    shutil.rmtree(path / st.STAGING / "gcn_1" / "shard-00001")
    assert st.is_done(path, 0) and not st.is_done(path, 1) and st.done_shards(path) == {0, 2}
    with pytest.raises(st.EmbedStoreError, match="1 of 3 shards not finished: 1;"):
        st.finalize_store(path)
    st.write_shard(path, 1, results[1], SHA)
    st.finalize_store(path)
    assert all(st.is_done(path, s) for s in range(lay.n_shards))  # staging is compacted and gone: still done
    full = np.concatenate([results[s].atoms["gcn_1"] for s in range(lay.n_shards)])
    np.testing.assert_array_equal(st.open_embeddings(path)["layers/gcn_1/atoms"][:], full)
    assert st.verify_store(path).ok


# ------------------------------------------------------------------------------------- 4. completion mark last


def test_dataset_completion_mark_is_the_last_write(tmp_path, monkeypatch):
    path = tmp_path / "dataset.zarr"
    build(path, complete=False)
    ds.write_index(path, 2)
    fail_writes(monkeypatch, match=consolidating(path))  # disk full while consolidating
    with pytest.raises(OSError):
        ds.mark_complete(path, {"n_materials": 8})
    monkeypatch.undo()
    assert ds.root_attrs(path)["complete"] is not True
    with pytest.raises(ds.IncompleteStoreError):
        ds.DatasetReader(path)
    ds.mark_complete(path, {"n_materials": 8})
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["attributes"]["complete"] is True and meta["attributes"]["n_materials"] == 8
    assert "parts/00001/ids" in meta["consolidated_metadata"]["metadata"]
    r = ds.DatasetReader(path)  # opens with the consolidated metadata
    assert r._root.metadata.consolidated_metadata is not None
    assert r.attrs["complete"] is True and len(r) == 8
    assert sorted(r.read_part(1).arrays) == sorted(ds.part_attrs(path, 1)["arrays"])
    assert r.material(7)["id"] == "m-7"
    # re-finalising a complete store unmarks it while the index is rewritten, and marks it again
    ds.write_index(path, 2)
    assert ds.root_attrs(path)["complete"] is False
    ds.mark_complete(path, {"n_materials": 8})
    assert ds.DatasetReader(path).attrs["complete"] is True


def test_embed_completion_mark_is_the_last_write(tmp_path, monkeypatch):
    path = tmp_path / "embeddings.zarr"
    lay = _layout()
    _create(path, lay)
    results = _write_all(path, lay)
    fail_writes(monkeypatch, match=consolidating(path))
    with pytest.raises(OSError):
        st.finalize_store(path)
    monkeypatch.undo()
    assert not zarr.open_group(path, mode="r", use_consolidated=False).attrs["complete"]
    with pytest.raises(st.EmbedStoreError, match="not complete"):
        st.open_embeddings(path)
    assert st.done_shards(path) == {0, 1, 2}  # atoms were compacted already: nothing to redo
    assert st.finalize_store(path)["already_complete"] is False
    root = st.open_embeddings(path)
    assert root.metadata.consolidated_metadata is not None and root.attrs["complete"] is True
    assert "layers/gcn_1/mean" in json.loads((path / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    full = np.concatenate([results[s].atoms["gcn_1"] for s in range(lay.n_shards)])
    np.testing.assert_array_equal(root["layers/gcn_1/atoms"][:], full)
    assert st.verify_store(path).ok


# ------------------------------------------------------------------------------------- 5. out of space


@pytest.mark.parametrize("step,after", [("create_store", 0), ("create_store", 1), ("write_part", 3),
                                        ("write_index", 2), ("mark_complete", 0), ("mark_complete", 1)])
def test_out_of_space_in_dataset_writes(tmp_path, monkeypatch, step, after):
    path = tmp_path / "dataset.zarr"
    steps = {"create_store": lambda: ds.create_store(path, ATTRS),
             "write_part": lambda: ds.write_part(path, 0, recs(4), G),
             "write_index": lambda: ds.write_index(path, 1),
             "mark_complete": lambda: ds.mark_complete(path, {"n_materials": 4})}
    for name, fn in steps.items():
        if name == step:
            break
        fn()
    fail_writes(monkeypatch, after=after)
    with pytest.raises(OSError) as e:
        steps[step]()
    one_line_naming(e.value, path)
    monkeypatch.undo()
    assert not leftovers(tmp_path)
    if step == "write_part":
        assert not ds.part_complete(path, 0)
    if step == "create_store":
        assert not ds.skeleton_complete(path)
    if step in ("write_index", "mark_complete"):
        assert ds.root_attrs(path)["complete"] is False


def test_out_of_space_in_embed_writes(tmp_path, monkeypatch):
    path = tmp_path / "embeddings.zarr"
    lay = _layout()
    fail_writes(monkeypatch, after=2)
    with pytest.raises(OSError) as e:
        _create(path, lay)
    one_line_naming(e.value, path)
    monkeypatch.undo()
    assert not path.exists() and not leftovers(tmp_path)
    _create(path, lay)
    fail_writes(monkeypatch, after=1)  # a chunk of the shard's data
    with pytest.raises(OSError) as e:
        st.write_shard(path, 0, _result(lay, 0), SHA)
    one_line_naming(e.value, path)
    monkeypatch.undo()

    def no_space(fd):
        raise enospc()

    monkeypatch.setattr(os, "fsync", no_space)  # the completion record (an atomic JSON write)
    with pytest.raises(OSError) as e:
        st.write_shard(path, 0, _result(lay, 0), SHA)
    one_line_naming(e.value, path / st.PROGRESS / "shard-00000")
    monkeypatch.undo()
    assert not st.is_done(path, 0) and not leftovers(tmp_path)
    _write_all(path, lay)
    fail_writes(monkeypatch)
    with pytest.raises(OSError) as e:
        st.finalize_store(path)
    one_line_naming(e.value, path)
    monkeypatch.undo()
    assert not leftovers(tmp_path)
    st.finalize_store(path)
    assert st.verify_store(path).ok


def test_out_of_space_saving_a_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "model.pt"
    save_state_dict_file({"w": torch.ones(2)}, path)

    def no_space(fd):
        raise enospc()

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as e:
        save_state_dict_file({"w": torch.zeros(2)}, path)
    one_line_naming(e.value, path)
    monkeypatch.undo()
    assert not leftovers(tmp_path)
    assert torch.equal(load_state_dict_file(path)["w"], torch.ones(2))  # the previous file is intact


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tmpfs is Linux")
def test_real_full_tmpfs(tmp_path):
    """A real 16 KiB file system (needs mount rights, e.g. root in a container; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], capture_output=True,
                           timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode(errors='replace').strip()}")
    try:
        path = mnt / "dataset.zarr"
        with pytest.raises(OSError) as e:
            ds.create_store(path, ATTRS)
            for p in range(4):
                ds.write_part(path, p, recs(20, 20 * p), G)
        one_line_naming(e.value, path)
        assert not leftovers(mnt)
        assert not any(ds.part_complete(path, p) for p in range(4) if (path / "parts" / ds.part_name(p)).exists())
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=20, check=False)


# ------------------------------------------------------------------------------------- 6. not a checkpoint


def test_file_that_is_not_a_checkpoint_is_called_that(tmp_path):
    for name, data in (("random.pt", np.random.default_rng(0).bytes(4096)), ("text.pt", b"hello, not a model\n" * 9),
                       ("empty.pt", b"")):
        f = tmp_path / name
        f.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            load_state_dict_file(f)
        msg = str(e.value)
        assert "not a PyTorch checkpoint" in msg and str(f) in msg and "Python objects" not in msg, msg
    # real torch files that need arbitrary unpickling keep their refusal (zip and legacy formats)
    for legacy in (False, True):
        evil = tmp_path / f"evil-{legacy}.pt"
        torch.save({"w": torch.ones(1), "args": argparse.Namespace(lr=1)}, evil,
                   _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match="Python objects.*arbitrary code"):
            load_state_dict_file(evil)
    ok = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(1)}, ok, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict_file(ok)["w"], torch.ones(1))
