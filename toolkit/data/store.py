"""The Zarr v3 dataset store ``dataset.zarr``: part writer, completion records, reader.

Layout and rules: docs/zarr.md (summary in docs/architecture.md). Each part is a group
``parts/<00000>`` written by exactly one worker (whole arrays, one chunk each), so no two writers
ever touch the same Zarr chunk or shard; the part's completion record (``complete: true`` with the
list of its arrays) is written LAST, so a part left by a killed worker, or one whose arrays were
deleted later, is recognisable (:func:`part_complete`) and is rebuilt from scratch.

The skeleton's root ``zarr.json`` (every attribute, ``format`` and ``complete: false`` at once) is its
last write, so a killed :func:`create_store` leaves an unfinished skeleton that
:func:`skeleton_complete` recognises. The root attribute ``complete: true`` is set by
:func:`mark_complete` as the very last write, after the index and the consolidated metadata;
:class:`DatasetReader` refuses a store without it. Out-of-space errors name the path
(:class:`toolkit.errors.OutOfSpaceError`).

This module must stay importable without pymatgen or jarvis-tools (GPU nodes read stores with
numpy, zarr and torch only).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from toolkit.errors import SpectrolensError
from toolkit.runtime import disk_errors

FORMAT = "spectrolens-dataset"
VERSION = 1
DESCRIPTORS = ("onset", "edge_integral", "direct_gap", "indirect_gap")  # (n,) float32 each; plus peaks (n, 3)
N_PEAKS = 3


class StoreError(SpectrolensError, RuntimeError):
    """A dataset store that cannot be used as asked (the message names the store and the fix)."""


class IncompleteStoreError(StoreError):
    """The store was not finalised (prepare was interrupted or is still running)."""


def part_name(part: int) -> str:
    """Group name of part ``part`` (zero-padded, sorts in order)."""
    return f"{int(part):05d}"


@dataclass
class MaterialRecord:
    """One material as the store holds it (plain arrays; built by ``prepare`` from a Material).

    Units: lattice rows and edge vectors in Å; spectrum on the dataset grid in its transform
    (NaN = masked); descriptors in eV (edge_integral in decades·eV)."""

    id: str
    formula: str
    numbers: np.ndarray  # (n,) atomic numbers
    frac_coords: np.ndarray  # (n, 3)
    lattice: np.ndarray  # (3, 3) Å, rows = lattice vectors
    edge_src: np.ndarray  # (E,) local atom index
    edge_dst: np.ndarray  # (E,)
    edge_vec: np.ndarray  # (E, 3) Å, pos(dst) - pos(src)
    spectrum: np.ndarray | None = None  # (G,)
    descriptors: dict[str, Any] = field(default_factory=dict)  # DESCRIPTORS -> float, "peaks" -> (3,)
    extras: dict[str, dict[str, float | str]] = field(default_factory=dict)  # group -> {name: value}, e.g. benchmark factors


def str_array(values: Any) -> np.ndarray:
    """Variable-length UTF-8 string array (Zarr v3 ``string`` data type)."""
    return np.array(list(values), dtype=np.dtypes.StringDType())


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def part_arrays(records: list[MaterialRecord], grid_num: int) -> dict[str, np.ndarray]:
    """The arrays of one part (name -> array, names as stored, groups as ``a/b``)."""
    n = len(records)
    natoms = np.array([len(r.numbers) for r in records], dtype=np.int32)
    nedges = np.array([len(r.edge_src) for r in records], dtype=np.int32)
    cat = (lambda xs, dt, shape: np.concatenate(xs).astype(dt) if xs else np.zeros(shape, dtype=dt))
    spectrum = np.full((n, grid_num), np.nan, dtype=np.float32)
    has = np.zeros(n, dtype=bool)
    for i, r in enumerate(records):
        if r.spectrum is not None:
            s = np.asarray(r.spectrum, dtype=np.float32)
            if s.shape != (grid_num,):
                raise StoreError(f"material {r.id}: spectrum has shape {s.shape}, the grid has {grid_num} points")
            spectrum[i] = s
            has[i] = True
    out: dict[str, np.ndarray] = {
        "ids": str_array(r.id for r in records), "formula": str_array(r.formula for r in records),
        "natoms": natoms, "atom_offset": _offsets(natoms),
        "numbers": cat([r.numbers for r in records], np.int16, (0,)),
        "frac_coords": cat([r.frac_coords for r in records], np.float64, (0, 3)),
        "lattice": np.stack([np.asarray(r.lattice, np.float64) for r in records]) if n else np.zeros((0, 3, 3)),
        "nedges": nedges, "edge_offset": _offsets(nedges),
        "edge_src": cat([r.edge_src for r in records], np.int32, (0,)),
        "edge_dst": cat([r.edge_dst for r in records], np.int32, (0,)),
        "edge_vec": cat([r.edge_vec for r in records], np.float32, (0, 3)),
        "spectrum": spectrum, "has_spectrum": has,
    }
    for name in DESCRIPTORS:
        out[f"descriptors/{name}"] = np.array([r.descriptors.get(name, np.nan) for r in records], dtype=np.float32)
    peaks = np.full((n, N_PEAKS), np.nan, dtype=np.float32)
    for i, r in enumerate(records):
        p = np.asarray(r.descriptors.get("peaks", []), dtype=np.float32).reshape(-1)[:N_PEAKS]
        peaks[i, : p.size] = p
    out["descriptors/peaks"] = peaks
    groups = sorted({(g, k) for r in records for g, d in r.extras.items() for k in d})
    for g, k in groups:
        vals = [r.extras.get(g, {}).get(k) for r in records]
        name = f"{g}/{k.replace('/', '_')}"
        if any(isinstance(v, str) for v in vals):  # categorical (or mixed): strings, "" = missing
            out[name] = str_array("" if v is None else str(v) for v in vals)
        else:  # numeric: NaN = missing
            out[name] = np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
    return out


#: arrays every part has (a completion record without an ``arrays`` list is checked for these)
CORE_ARRAYS = tuple(part_arrays([], 1))


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """blake2b (hex, 16 bytes) over the names, shapes and bytes of a part's arrays."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        a = arrays[name]
        h.update(name.encode())
        h.update(str(a.shape).encode())
        h.update("\x1f".join(a.tolist()).encode() if a.dtype.kind in "UTO" else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- writing


def create_store(path: str | os.PathLike, attrs: dict) -> None:
    """Create the store skeleton, once, before workers start: the ``parts`` group, then the root group
    with all its attributes (``format``, ``version``, ``attrs``, ``complete: false``) in ONE atomic write,
    the skeleton's last. A kill at any point leaves no root ``zarr.json`` (:func:`skeleton_complete`
    is False) and never a root with only some attributes.

    Replaces whatever dataset store is at ``path``: call it when :func:`skeleton_complete` is False
    (nothing there, or an unfinished skeleton); raises :class:`StoreError` if ``path`` holds something
    that is not a dataset store. The caller serialises it (prepare's plan lock)."""
    p = Path(path)
    _skeleton_state(p)  # refuses a foreign store before anything is deleted
    with disk_errors(p):
        # the root zarr.json goes first, so a kill while removing never leaves a root over missing pieces
        (p / "zarr.json").unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)
        zarr.create_group(str(p / "parts"), zarr_format=3)
        zarr.create_group(str(p), zarr_format=3,
                          attributes={"format": FORMAT, "version": VERSION, **attrs, "complete": False})


def _skeleton_state(p: Path) -> tuple[dict | None, bool]:
    """(root attributes or None when there is no root zarr.json, whether the skeleton is finished)."""
    f = p / "zarr.json"
    if not f.is_file():
        return None, False
    try:
        attrs = json.loads(f.read_text()).get("attributes") or {}
    except (ValueError, AttributeError) as e:
        raise StoreError(f"{f} is not a readable Zarr v3 group ({e}); delete {p} and re-run `spectrolens prepare`") \
            from None
    if not attrs:  # the group was created, its attributes never written
        return attrs, False
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{p} is not a spectrolens dataset store (format={attrs.get('format')!r})")
    # "complete" is written together with every other attribute (and was the last key of zarr versions
    # that wrote attributes one key at a time); the parts group is written before the root
    return attrs, "complete" in attrs and (p / "parts" / "zarr.json").is_file()


def skeleton_complete(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a finished store skeleton (root attributes and ``parts`` group; parts and
    completion may still be missing). False when there is nothing at ``path`` or only an unfinished
    skeleton (a :func:`create_store` was killed): redo it with :func:`create_store`, nothing is lost.
    Raises :class:`StoreError` when ``path`` holds something else (never overwrite that)."""
    return _skeleton_state(Path(path))[1]


def root_attrs(path: str | os.PathLike) -> dict:
    """Root attributes of a store, complete or not. Raises :class:`StoreError` if it is not a dataset store
    (nothing there, another format), :class:`IncompleteStoreError` if its skeleton was left unfinished."""
    p = Path(path)
    attrs, finished = _skeleton_state(p)
    if attrs is None:
        raise StoreError(f"{p} is not a Zarr v3 store (no zarr.json); run `spectrolens prepare` to create it")
    if not finished:
        raise IncompleteStoreError(f"{p} is an unfinished store skeleton (a prepare was killed while creating it; it holds "
                         f"no finished work): re-run `spectrolens prepare`, or delete {p} and re-run it")
    return attrs


def part_attrs(path: str | os.PathLike, part: int) -> dict | None:
    """Attributes of a part group, or None if the group does not exist."""
    gpath = Path(path) / "parts" / part_name(part)
    if not (gpath / "zarr.json").is_file():
        return None
    return dict(zarr.open_group(str(gpath), mode="r", use_consolidated=False).attrs)


def part_problem(path: str | os.PathLike, part: int) -> str | None:
    """Why part ``part`` cannot be used (a phrase, e.g. ``"is marked complete but its arrays are missing:
    ids"``), or None when it is complete: its completion record is there and so is every array the
    record lists. A cheap check: the arrays' ``zarr.json`` files, no chunk data is read."""
    a = part_attrs(path, part)
    if a is None:
        return "does not exist"
    if a.get("complete") is not True:
        return "was not finished (no completion record: its writer was interrupted)"
    gpath = Path(path) / "parts" / part_name(part)
    missing = [n for n in a.get("arrays", CORE_ARRAYS) if not (gpath / n / "zarr.json").is_file()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        return f"is marked complete but its arrays are missing: {', '.join(missing[:5])}{more}"
    return None


def part_complete(path: str | os.PathLike, part: int) -> bool:
    """True when part ``part`` was written completely: its completion record is present and so are the
    arrays it lists (see :func:`part_problem`); a part that is not is rebuilt by :func:`write_part`."""
    return part_problem(path, part) is None


def _refuse_part(path: str | os.PathLike, part: int) -> None:
    problem = part_problem(path, part)
    if problem is not None:
        raise StoreError(f"{path}: part {part_name(part)} {problem}; re-run `spectrolens prepare` with the same "
                         f"config and run directory to rebuild it")


def remove_part(path: str | os.PathLike, part: int) -> None:
    """Delete a (partially written) part group."""
    shutil.rmtree(Path(path) / "parts" / part_name(part), ignore_errors=True)


def write_part(path: str | os.PathLike, part: int, records: list[MaterialRecord], grid_num: int) -> dict:
    """Write part ``part`` from scratch: every array whole, then the completion record (``complete: true``
    and the names of its arrays) LAST, in one write. Returns its attrs. A failed write removes the part."""
    remove_part(path, part)
    arrays = part_arrays(records, grid_num)
    gpath = Path(path) / "parts" / part_name(part)
    try:
        with disk_errors(gpath):
            grp = zarr.create_group(str(gpath), zarr_format=3, attributes={"complete": False})
            for name, a in arrays.items():
                parent = grp
                *groups, leaf = name.split("/")
                for g in groups:
                    parent = parent.require_group(g)
                chunks = tuple(max(1, s) for s in a.shape)
                parent.create_array(leaf, data=a, chunks=chunks)
            attrs = {"n_materials": len(records), "n_atoms": int(arrays["natoms"].sum()),
                     "n_edges": int(arrays["nedges"].sum()), "checksum": checksum(arrays),
                     "arrays": sorted(arrays), "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "host": platform.node(), "pid": os.getpid()}
            grp.attrs.update({**attrs, "complete": True})  # the completion record, last
    except BaseException:
        remove_part(path, part)  # an unfinished part is rebuilt from scratch anyway: free its space now
        raise
    return {**attrs, "complete": True}


def write_index(path: str | os.PathLike, n_parts: int) -> dict[str, np.ndarray]:
    """Build ``index/`` (part_of, local, ids, natoms, nedges, has_spectrum) from the complete parts.

    Raises :class:`StoreError` naming a part that is not complete (:func:`part_problem`). A store marked
    complete is unmarked first (:func:`mark_complete` marks it again)."""
    with disk_errors(path):
        return _write_index(path, n_parts)


def _write_index(path: str | os.PathLike, n_parts: int) -> dict[str, np.ndarray]:
    for p in range(n_parts):
        _refuse_part(path, p)
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    if root.attrs.get("complete") is True:  # the index is about to change: not complete until marked again
        root.attrs.update({"complete": False})
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("part_of", "local", "ids", "natoms", "nedges", "has_spectrum")}
    for p in range(n_parts):
        g = root["parts"][part_name(p)]
        n = int(g.attrs["n_materials"])
        cols["part_of"].append(np.full(n, p, dtype=np.int32))
        cols["local"].append(np.arange(n, dtype=np.int32))
        for k in ("ids", "natoms", "nedges", "has_spectrum"):
            cols[k].append(np.asarray(g[k][:]) if n else np.zeros(0, dtype=np.int32))
    index = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
    index["ids"] = str_array(str(x) for x in index["ids"])
    ids = index["ids"]
    if len(np.unique(ids)) != len(ids):
        u, c = np.unique(ids, return_counts=True)
        raise StoreError(f"{path}: duplicate material ids across parts: {u[c > 1][:10].tolist()}")
    if "index" in root:
        del root["index"]
    ig = root.create_group("index")
    for k, a in index.items():
        ig.create_array(k, data=a, chunks=(max(1, len(a)),))
    return index


def mark_complete(path: str | os.PathLike, attrs: dict) -> None:
    """Set the final root attrs, consolidate metadata, then set ``complete: true`` as the very last write
    (once, at the end): an interrupted or failed call leaves the store incomplete, never half-finished
    and marked complete."""
    with disk_errors(path):
        root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        root.attrs.update({**attrs, "complete": False})
        with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec": zarr-python reads it
            warnings.simplefilter("ignore", UserWarning)
            root = zarr.consolidate_metadata(str(path))
        # this group carries the consolidated metadata, so rewriting its zarr.json keeps it
        root.attrs.update({"complete": True})


# ---------------------------------------------------------------------------------------------- reading


class PartArrays:
    """All arrays of one part in memory, sliceable per material."""

    def __init__(self, arrays: dict[str, np.ndarray], conditions: tuple[str, ...] = ()):
        self.arrays = arrays
        self.n = int(arrays["natoms"].shape[0])
        self.conditions = [arrays[f"conditions/{c}"] for c in conditions]  # (n,) each

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    def material(self, local: int) -> dict[str, Any]:
        """Arrays of material ``local`` of this part (atom indices of edges are local to the material)."""
        a = self.arrays
        a0, a1 = int(a["atom_offset"][local]), int(a["atom_offset"][local + 1])
        e0, e1 = int(a["edge_offset"][local]), int(a["edge_offset"][local + 1])
        return {
            "id": str(a["ids"][local]), "formula": str(a["formula"][local]),
            "numbers": a["numbers"][a0:a1].astype(np.int64), "frac_coords": a["frac_coords"][a0:a1],
            "lattice": a["lattice"][local],
            "edge_src": a["edge_src"][e0:e1].astype(np.int64), "edge_dst": a["edge_dst"][e0:e1].astype(np.int64),
            "edge_vec": a["edge_vec"][e0:e1],
            "spectrum": a["spectrum"][local], "has_spectrum": bool(a["has_spectrum"][local]),
            "conditions": np.array([c[local] for c in self.conditions]) if self.conditions else None,
        }


def _read_group(g: zarr.Group, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, item in g.members():
        if isinstance(item, zarr.Group):
            out.update(_read_group(item, f"{prefix}{name}/"))
        else:
            out[f"{prefix}{name}"] = np.asarray(item[...])
    return out


class DatasetReader:
    """Read a complete ``dataset.zarr`` (numpy + zarr only).

    Holds the root attrs and the small index (O(N) ints); parts are read whole on demand
    (:meth:`read_part`), with an LRU cache of ``cache_parts`` parts so memory stays bounded."""

    def __init__(self, path: str | os.PathLike, cache_parts: int = 2):
        self.path = Path(path)
        attrs = root_attrs(self.path)
        if attrs.get("complete") is not True:
            raise IncompleteStoreError(
                f"dataset store {self.path} is incomplete (root attribute complete is not true): prepare was "
                f"interrupted or is still running; re-run `spectrolens prepare` with the same config and run "
                f"directory to finish it")
        self.attrs = attrs
        self._root = zarr.open_group(str(self.path), mode="r")
        ig = self._root["index"]
        self.part_of = np.asarray(ig["part_of"][:], dtype=np.int64)
        self.local = np.asarray(ig["local"][:], dtype=np.int64)
        self.ids = np.asarray(ig["ids"][:])  # numpy StringDType
        self.natoms = np.asarray(ig["natoms"][:], dtype=np.int64)
        self.nedges = np.asarray(ig["nedges"][:], dtype=np.int64)
        self.has_spectrum = np.asarray(ig["has_spectrum"][:], dtype=bool)
        self.n_parts = int(attrs["n_parts"])
        self.cache_parts = max(1, int(cache_parts))
        self._cache: OrderedDict[int, PartArrays] = OrderedDict()
        self._checked: set[int] = set()

    def __len__(self) -> int:
        return int(self.part_of.shape[0])

    @property
    def energy(self) -> np.ndarray:
        """The target grid (eV)."""
        return np.asarray(self.attrs["energy"], dtype=np.float64)

    @property
    def condition_names(self) -> tuple[str, ...]:
        """Names of the per-record conditions (``conditions/<name>`` arrays; data.target.conditions)."""
        return tuple((self.attrs.get("target") or {}).get("conditions", ()))

    def part_sizes(self) -> np.ndarray:
        return np.bincount(self.part_of, minlength=self.n_parts)

    def read_part(self, part: int) -> PartArrays:
        """All arrays of part ``part`` (cached, LRU)."""
        part = int(part)
        if part in self._cache:
            self._cache.move_to_end(part)
            return self._cache[part]
        self._check_part(part)
        pa = PartArrays(_read_group(self._root["parts"][part_name(part)]), self.condition_names)
        self._cache[part] = pa
        while len(self._cache) > self.cache_parts:
            self._cache.popitem(last=False)
        return pa

    def _check_part(self, part: int) -> None:
        """Refuse a part whose arrays are missing (the consolidated metadata would still list them and
        reading would give fill values): checked once per part and reader."""
        if part not in self._checked:
            _refuse_part(self.path, part)
            self._checked.add(part)

    def material(self, index: int) -> dict[str, Any]:
        """Arrays of material ``index`` (row of the index), plus its ``index``."""
        rec = self.read_part(int(self.part_of[index])).material(int(self.local[index]))
        rec["index"] = int(index)
        return rec

    def column(self, name: str, indices: np.ndarray | None = None) -> np.ndarray:
        """A per-material array (``spectrum``, ``descriptors/onset``, ``benchmark/<f>``, ...) for ``indices``
        (default all), in index order; reads one part at a time, bypassing the cache."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        out: np.ndarray | None = None
        for p in np.unique(self.part_of[idx]):
            sel = np.nonzero(self.part_of[idx] == p)[0]
            self._check_part(int(p))
            g = self._root["parts"][part_name(int(p))]
            try:
                arr = g[name]
            except KeyError:
                raise StoreError(f"{self.path}: part {part_name(int(p))} has no array {name!r}") from None
            vals = np.asarray(arr[...])[self.local[idx[sel]]]
            if out is None:
                out = np.empty((len(idx),) + vals.shape[1:], dtype=vals.dtype)
            out[sel] = vals
        if out is None:
            raise StoreError(f"{self.path}: no materials selected for column {name!r}")
        return out
