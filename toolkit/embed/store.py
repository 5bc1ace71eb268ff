"""The ``embeddings.zarr`` store (Zarr v3): layout, shard writer, completion records, reader checks.

Layout (see docs/zarr.md, "## embeddings.zarr")::

    embeddings.zarr/  attrs {format, version, checkpoint_sha256, config, layers, hidden, poolings, per_atom,
                             dtype, n_materials, n_shards, shard_size, prediction_size, complete, ...}
      ids (N,) str; index (N,) int64 (row in dataset.zarr); energy (G,) float64 eV (when known)
      prediction (N, G) float32                 ensembles: the members' mean
      prediction_std (N, G) float32             ensembles only: per-point std over members x recalibration factor
      prediction_onset, prediction_onset_std, prediction_onset_low, prediction_onset_high (N,) float32 eV
                                                ensembles only: onset with its ±2σ interval
      layers/<layer>/<pooling> (N, H) float32|float16   (member 0's activations)
      layers/<layer>/atoms (A, H), layers/<layer>/atom_offset (N+1,) int64      (per_atom option)
      _progress/shard-00000        one completion record per finished shard (a Zarr group; record = its attrs)
      _staging/<layer>/shard-00000 per-atom rows of a finished shard until finalize compacts them
                                   (the record lists them: a record whose staged rows are gone is not done)

Concurrency rules (zarr-python #3682: a partial shard write rewrites the whole shard): the driver creates
every array and all metadata once (:func:`create_store`, atomically, by renaming a finished skeleton
into place); material shard ``s`` covers rows ``[s*S, min((s+1)*S, N))`` and is exactly one Zarr shard
of every per-material array, so a worker that owns ``s`` never touches another worker's bytes. A
completion record is written after the data; only :func:`finalize_store` touches root metadata again,
and its ``complete: true`` is the very last write (after compaction and consolidated metadata).
Out-of-space errors name the path (:class:`toolkit.errors.OutOfSpaceError`) and leave no temporary files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from toolkit.errors import SpectrolensError
from toolkit.layout import RunLayout
from toolkit.runtime import disk_errors, write_json

FORMAT = "spectrolens-embeddings"
VERSION = 1
STORE_NAME = RunLayout("").embeddings.name  # "embeddings.zarr"
PROGRESS = "_progress"
STAGING = "_staging"
MAX_INNER_CHUNK = 256  # rows per inner chunk of the sharding codec (readers may fetch one inner chunk)
COMPACTED = "atoms_compacted"  # root attribute: finalize copied every staged per-atom row into place
#: ensembles: the onset of the ensemble prediction, its (recalibrated) std over members and the ±2σ interval
ONSET_KEYS = ("prediction_onset", "prediction_onset_std", "prediction_onset_low", "prediction_onset_high")


class EmbedStoreError(SpectrolensError, RuntimeError):
    """An embeddings store that cannot be used as asked; the message names the store and the reason."""


@dataclass(frozen=True)
class Layout:
    """Shape of an embeddings store. ``hidden`` maps layer name -> feature width H."""

    n_materials: int
    shard_size: int
    hidden: dict[str, int]
    poolings: list[str]
    prediction_size: int
    per_atom: bool = False
    dtype: str = "float32"
    n_atoms: int = 0  # total atoms A (per_atom only)
    ensemble: int = 1  # members whose mean is ``prediction`` (> 1: ``prediction_std`` and the onset interval too)

    @property
    def layers(self) -> list[str]:
        return list(self.hidden)

    @property
    def atom_layers(self) -> list[str]:
        """Layers with per-atom arrays (per_atom option): all but ``readout``, which is pooled already."""
        return [layer for layer in self.hidden if layer != "readout"] if self.per_atom else []

    @property
    def n_shards(self) -> int:
        return max(1, math.ceil(self.n_materials / self.shard_size))

    def rows(self, shard: int) -> slice:
        """Material rows of ``shard`` (the last shard may be short)."""
        if not 0 <= shard < self.n_shards:
            raise EmbedStoreError(f"shard {shard} out of range: the store has {self.n_shards} shards")
        return slice(shard * self.shard_size, min((shard + 1) * self.shard_size, self.n_materials))

    def pooled_keys(self) -> list[str]:
        """Array paths of the pooled features, e.g. ``layers/gcn_4/mean``."""
        return [f"layers/{layer}/{pool}" for layer in self.hidden for pool in self.poolings]

    def ensemble_keys(self) -> list[str]:
        """Per-material arrays of an ensemble's uncertainty (none for one model): ``prediction_std`` (N, G)
        and :data:`ONSET_KEYS` (N,)."""
        return ["prediction_std", *ONSET_KEYS] if self.ensemble > 1 else []

    def compatibility_key(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()}


@dataclass
class ShardResult:
    """Everything one worker computed for one shard, rows in store order.

    ``pooled[key]`` is (n, H) for each key of :meth:`Layout.pooled_keys`; ``prediction`` is (n, G);
    ``atoms[layer]`` is (n_atoms_in_shard, H) (per_atom only); ``uncertainty[key]`` for each key of
    :meth:`Layout.ensemble_keys` (ensembles only)."""

    pooled: dict[str, np.ndarray]
    prediction: np.ndarray
    atoms: dict[str, np.ndarray] = field(default_factory=dict)
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)


def store_path(run_dir: Path) -> Path:
    return RunLayout(run_dir).embeddings


def inner_chunk(shard_size: int) -> int:
    """Rows per inner chunk: the largest divisor of ``shard_size`` not above MAX_INNER_CHUNK."""
    for c in range(min(shard_size, MAX_INNER_CHUNK), 0, -1):
        if shard_size % c == 0:
            return c
    return 1  # pragma: no cover  (c == 1 always divides)


def _row_array(group: zarr.Group, name: str, n: int, width: int | None, dtype: Any, shard_size: int,
               dims: tuple[str, ...], fill: Any) -> None:
    shape = (n,) if width is None else (n, width)
    shards = (shard_size,) if width is None else (shard_size, width)
    chunks = (inner_chunk(shard_size),) + shards[1:]
    group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards, fill_value=fill,
                       dimension_names=dims)


def layout_from_attrs(attrs: dict) -> Layout:
    return Layout(n_materials=int(attrs["n_materials"]), shard_size=int(attrs["shard_size"]),
                  hidden={k: int(v) for k, v in attrs["hidden"].items()}, poolings=list(attrs["poolings"]),
                  prediction_size=int(attrs["prediction_size"]), per_atom=bool(attrs["per_atom"]),
                  dtype=str(attrs["dtype"]), n_atoms=int(attrs.get("n_atoms", 0)),
                  ensemble=int(attrs.get("ensemble", 1)))


def create_store(path: Path, layout: Layout, ids: np.ndarray, index: np.ndarray, attrs: dict[str, Any],
                 natoms: np.ndarray | None = None, energy: np.ndarray | None = None) -> bool:
    """Create the store skeleton once; returns True if this call created it.

    The skeleton (all arrays, ids, index, atom offsets, root attrs) is written into a temporary sibling
    folder and renamed into place, so concurrent planners (array tasks) race safely: exactly one
    rename wins and the others check that the existing store is compatible (:func:`check_compatible`).
    The root attributes are written in one step. An unfinished skeleton found at ``path``
    (:func:`skeleton_complete` False: not made by this function, e.g. by a version that wrote it in
    place) is replaced; the caller serialises planning when that can happen (``toolkit.sharded.plan_once``).
    ``attrs`` must contain ``checkpoint_sha256``."""
    path = Path(path)
    with disk_errors(path):
        return _create_store(path, layout, ids, index, attrs, natoms, energy)


def _create_store(path: Path, layout: Layout, ids: np.ndarray, index: np.ndarray, attrs: dict[str, Any],
                  natoms: np.ndarray | None, energy: np.ndarray | None) -> bool:
    if path.exists():
        if skeleton_complete(path):
            check_compatible(path, layout, attrs["checkpoint_sha256"])
            return False
        _discard(path)
    if len(ids) != layout.n_materials or len(index) != layout.n_materials:
        raise EmbedStoreError(f"{path}: {len(ids)} ids / {len(index)} index rows for {layout.n_materials} materials")
    if layout.per_atom and (natoms is None or len(natoms) != layout.n_materials):
        raise EmbedStoreError(f"{path}: per_atom needs natoms for each of the {layout.n_materials} materials")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        root = zarr.create_group(tmp, zarr_format=3, attributes={"format": FORMAT, "version": VERSION, **attrs,
                                                                  **_layout_attrs(layout), "complete": False})
        n, s = layout.n_materials, layout.shard_size
        _row_array(root, "ids", n, None, str, s, ("material",), "")
        root["ids"][:] = np.asarray(ids).astype(np.dtypes.StringDType())
        _row_array(root, "index", n, None, "int64", s, ("material",), -1)
        root["index"][:] = np.asarray(index, dtype=np.int64)
        _row_array(root, "prediction", n, layout.prediction_size, "float32", s, ("material", "energy"), np.nan)
        for key in layout.ensemble_keys():
            width = layout.prediction_size if key == "prediction_std" else None
            _row_array(root, key, n, width, "float32", s, ("material", "energy") if width else ("material",), np.nan)
            root[key].attrs.update(_ENSEMBLE_ARRAY_ATTRS[key])
        if energy is not None:
            root.create_array("energy", data=np.asarray(energy, dtype=np.float64), dimension_names=("energy",))
            root["energy"].attrs["units"] = "eV"
        for layer, h in layout.hidden.items():
            for pool in layout.poolings:
                _row_array(root, f"layers/{layer}/{pool}", n, h, layout.dtype, s, ("material", "feature"), np.nan)
            if layer in layout.atom_layers:
                offset = np.zeros(n + 1, dtype=np.int64)
                np.cumsum(np.asarray(natoms, dtype=np.int64), out=offset[1:])
                root.create_array(f"layers/{layer}/atom_offset", data=offset, dimension_names=("material_edge",))
                a_chunk = max(1, min(int(offset[-1]), 65536))
                root.create_array(f"layers/{layer}/atoms", shape=(int(offset[-1]), h), dtype=layout.dtype,
                                  chunks=(a_chunk, h), fill_value=np.nan, dimension_names=("atom", "feature"))
        # zarr groups holding plain files, so that zarr listings see no foreign objects
        root.create_group(PROGRESS)
        for layer in layout.atom_layers:
            root.create_group(f"{STAGING}/{layer}")
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
            check_compatible(path, layout, attrs["checkpoint_sha256"])
            return False
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_ENSEMBLE_ARRAY_ATTRS = {
    "prediction_std": {"meaning": "per-point standard deviation over the ensemble members (ddof=1) x the "
                                  "recalibration factor of train/metrics.json (root attrs 'ensemble')"},
    "prediction_onset": {"units": "eV", "meaning": "onset of the ensemble (toolkit.train.ensemble.summarize)"},
    "prediction_onset_std": {"units": "eV", "meaning": "std of the members' onsets x the onset recalibration factor"},
    "prediction_onset_low": {"units": "eV", "meaning": "prediction_onset - 2 prediction_onset_std"},
    "prediction_onset_high": {"units": "eV", "meaning": "prediction_onset + 2 prediction_onset_std"},
}


def skeleton_complete(path: Path) -> bool:
    """True when ``path`` holds a finished store skeleton (its root has the ``format`` and ``complete``
    attributes, written in one step before the skeleton is renamed into place); shards may still be
    missing. False when nothing is at ``path`` or an unfinished skeleton is (no root ``zarr.json``, or
    one without those attributes): :func:`create_store` replaces it. Raises :class:`EmbedStoreError`
    when ``path`` holds a store of another format."""
    f = Path(path) / "zarr.json"
    if not f.is_file():
        return False
    try:
        attrs = json.loads(f.read_text()).get("attributes") or {}
    except (ValueError, AttributeError) as e:
        raise EmbedStoreError(f"{f} is not a readable Zarr v3 group ({e}); delete {path} and re-run "
                              f"`spectrolens embed`") from None
    if not attrs:  # a group whose attributes were never written
        return False
    if attrs.get("format") != FORMAT:
        raise EmbedStoreError(f"{path}: not an embeddings store (format={attrs.get('format')!r})")
    return "complete" in attrs


def _discard(path: Path) -> None:
    """Move an unfinished skeleton aside (one rename, so no reader sees half of it), then delete it."""
    aside = path.with_name(f".{path.name}.unfinished-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another planner moved it already
        return
    shutil.rmtree(aside, ignore_errors=True)


def _layout_attrs(layout: Layout) -> dict[str, Any]:
    return {"layers": layout.layers, "hidden": dict(layout.hidden), "poolings": list(layout.poolings),
            "per_atom": layout.per_atom, "dtype": layout.dtype, "n_materials": layout.n_materials,
            "n_shards": layout.n_shards, "shard_size": layout.shard_size,
            "prediction_size": layout.prediction_size, "n_atoms": layout.n_atoms, "ensemble": layout.ensemble}


def open_root(path: Path, mode: str = "r") -> zarr.Group:
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise EmbedStoreError(f"{path}: no embeddings store here (run `spectrolens embed` first)")
    root = zarr.open_group(path, mode=mode, zarr_format=3)
    if root.attrs.get("format") != FORMAT:
        raise EmbedStoreError(f"{path}: not an embeddings store (format={root.attrs.get('format')!r})")
    if int(root.attrs.get("version", -1)) != VERSION:
        raise EmbedStoreError(f"{path}: store version {root.attrs.get('version')} is not supported (want {VERSION})")
    return root


def read_layout(path: Path) -> Layout:
    return layout_from_attrs(dict(open_root(path).attrs))


def check_compatible(path: Path, layout: Layout, checkpoint_sha256: str) -> None:
    """Refuse (raise) an existing store made from another checkpoint or with another layout."""
    attrs = dict(open_root(path).attrs)
    have = attrs.get("checkpoint_sha256")
    if have != checkpoint_sha256:
        raise EmbedStoreError(
            f"{path} holds activations of checkpoint sha256 {have}, but the model checkpoint now has sha256 "
            f"{checkpoint_sha256}; refusing to mix two models in one store. Delete {path} (or use another "
            f"run directory) to extract with the new checkpoint.")
    old = layout_from_attrs(attrs)
    if old != layout:
        diff = {k: (v, layout.compatibility_key()[k]) for k, v in old.compatibility_key().items()
                if layout.compatibility_key()[k] != v}
        raise EmbedStoreError(f"{path} was planned with another layout (store vs now: {diff}); "
                              f"delete it or restore the embed settings it was made with")


# ---------------------------------------------------------------- completion records


def _record_path(path: Path, shard: int) -> Path:
    """A completion record is a Zarr group ``_progress/shard-00000`` whose attributes are the record;
    its ``zarr.json`` is written atomically (temporary file + rename), after the shard's data."""
    return Path(path) / PROGRESS / f"shard-{shard:05d}" / "zarr.json"


def is_done(path: Path, shard: int) -> bool:
    """The shard's completion record is there and so is the data it keeps apart from the shared arrays:
    the per-atom staging arrays the record lists, until :func:`finalize_store` has compacted them
    (a cheap check: their ``zarr.json`` files). A shard that is not done is redone by :func:`write_shard`."""
    rec = _record_path(path, shard)
    if not rec.is_file():
        return False
    try:
        staged = json.loads(rec.read_text())["attributes"].get("staging", [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # records are written atomically: an unreadable one is not ours to trust
    if all((Path(path) / key / "zarr.json").is_file() for key in staged):
        return True
    attrs = dict(open_root(path).attrs)
    return bool(attrs.get(COMPACTED) or attrs.get("complete"))


def done_shards(path: Path) -> set[int]:
    """Shards that are done (:func:`is_done`)."""
    out = set()
    for p in (Path(path) / PROGRESS).glob("shard-*/zarr.json"):
        try:
            shard = int(p.parent.name.split("-", 1)[1])
        except ValueError:
            continue
        if is_done(path, shard):
            out.add(shard)
    return out


def read_record(path: Path, shard: int) -> dict[str, Any]:
    return json.loads(_record_path(path, shard).read_text())["attributes"]


# ---------------------------------------------------------------- shard writer


def write_shard(path: Path, shard: int, result: ShardResult, checkpoint_sha256: str,
                extra: dict[str, Any] | None = None) -> None:
    """Write one whole shard of every per-material array, then its completion record.

    Redoing a shard (after a crash left partial bytes and no record) overwrites the whole shard."""
    with disk_errors(path):
        _write_shard(Path(path), shard, result, checkpoint_sha256, extra)


def _write_shard(path: Path, shard: int, result: ShardResult, checkpoint_sha256: str,
                 extra: dict[str, Any] | None) -> None:
    root = open_root(path, mode="r+")
    layout = layout_from_attrs(dict(root.attrs))
    if root.attrs["checkpoint_sha256"] != checkpoint_sha256:
        raise EmbedStoreError(f"{path}: shard {shard} was computed with checkpoint sha256 {checkpoint_sha256}, "
                              f"the store belongs to {root.attrs['checkpoint_sha256']}; refusing to mix")
    rows = layout.rows(shard)
    n = rows.stop - rows.start
    _check_shape(path, "prediction", result.prediction, (n, layout.prediction_size))
    missing = set(layout.pooled_keys()) - set(result.pooled)
    if missing:
        raise EmbedStoreError(f"{path}: shard {shard} result lacks {sorted(missing)}")
    if layout.atom_layers:
        offset = root[f"layers/{layout.atom_layers[0]}/atom_offset"]
        n_atoms = int(offset[rows.stop] - offset[rows.start])
        for layer in layout.atom_layers:
            arr = result.atoms.get(layer)
            if arr is None:
                raise EmbedStoreError(f"{path}: shard {shard} result lacks per-atom features of {layer}")
            _check_shape(path, f"{layer}/atoms", arr, (n_atoms, layout.hidden[layer]))
            root.create_array(_staging_key(layer, shard), data=np.ascontiguousarray(arr.astype(layout.dtype)),
                              overwrite=True)
    for key in layout.pooled_keys():
        _check_shape(path, key, result.pooled[key], (n, layout.hidden[key.split("/")[1]]))
        root[key][rows] = result.pooled[key].astype(layout.dtype, copy=False)
    root["prediction"][rows] = result.prediction.astype(np.float32, copy=False)
    for key in layout.ensemble_keys():
        arr = result.uncertainty.get(key)
        if arr is None:
            raise EmbedStoreError(f"{path}: shard {shard} result lacks {key} (the store holds an ensemble's "
                                  f"prediction of {layout.ensemble} members)")
        _check_shape(path, key, arr, (n, layout.prediction_size) if key == "prediction_std" else (n,))
        root[key][rows] = arr.astype(np.float32, copy=False)
    record = {"shard": shard, "rows": [rows.start, rows.stop], "checkpoint_sha256": checkpoint_sha256,
              "staging": [_staging_key(layer, shard) for layer in layout.atom_layers],
              "host": socket.gethostname(), "pid": os.getpid(), "finished": time.time(), **(extra or {})}
    write_json(_record_path(path, shard), {"zarr_format": 3, "node_type": "group", "attributes": record})


def _staging_key(layer: str, shard: int) -> str:
    return f"{STAGING}/{layer}/shard-{shard:05d}"


def _check_shape(path: Path, what: str, arr: np.ndarray, want: tuple[int, ...]) -> None:
    if tuple(arr.shape) != want:
        raise EmbedStoreError(f"{path}: {what} has shape {tuple(arr.shape)}, expected {want}")


# ---------------------------------------------------------------- finalize / verify


def finalize_store(path: Path) -> dict[str, Any]:
    """Check that every shard is done, compact per-atom staging, consolidate metadata, then mark the
    store complete: ``complete: true`` is the very last write, so an interrupted or failed call leaves
    an incomplete store that the next call finishes (compaction is not repeated once recorded).

    Raises :class:`EmbedStoreError` naming the missing shards; idempotent on a complete store."""
    path = Path(path)
    with disk_errors(path):
        return _finalize_store(path)


def _finalize_store(path: Path) -> dict[str, Any]:
    root = open_root(path, mode="r+")
    layout = layout_from_attrs(dict(root.attrs))
    if root.attrs.get("complete"):
        return {"n_materials": layout.n_materials, "n_shards": layout.n_shards, "already_complete": True}
    missing = sorted(set(range(layout.n_shards)) - done_shards(path))
    if missing:
        raise EmbedStoreError(f"{path}: {len(missing)} of {layout.n_shards} shards not finished: "
                              f"{_ranges(missing)}; re-run `spectrolens embed` to do only those")
    if layout.atom_layers and not root.attrs.get(COMPACTED):
        for layer in layout.atom_layers:
            offset = root[f"layers/{layer}/atom_offset"][:]
            atoms = root[f"layers/{layer}/atoms"]
            for s in range(layout.n_shards):
                rows = layout.rows(s)
                a0, a1 = int(offset[rows.start]), int(offset[rows.stop])
                if a1 > a0:
                    atoms[a0:a1] = root[_staging_key(layer, s)][:]
        root.attrs.update({COMPACTED: True})  # the staged rows are no longer needed
    shutil.rmtree(path / STAGING, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        root = zarr.consolidate_metadata(path, zarr_format=3)
    # this group carries the consolidated metadata, so rewriting its zarr.json keeps it
    root.attrs.update({"complete": True})
    return {"n_materials": layout.n_materials, "n_shards": layout.n_shards, "already_complete": False}


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_store`: missing shards/rows and rows with non-finite values per array."""

    n_materials: int
    n_shards: int
    complete: bool
    missing_shards: list[int]
    missing_rows: int
    nonfinite: dict[str, list[str]]  # array path -> ids of rows with NaN/inf (first few)
    nonfinite_counts: dict[str, int]
    duplicate_ids: list[str]

    @property
    def ok(self) -> bool:
        return (not self.missing_shards and not self.nonfinite_counts and not self.duplicate_ids
                and self.complete)

    def lines(self, path: Path) -> Iterator[str]:
        yield (f"{path}: {self.n_materials} materials in {self.n_shards} shards; "
               f"complete={self.complete}")
        if self.missing_shards:
            yield (f"  missing: {len(self.missing_shards)} shards ({self.missing_rows} rows): "
                   f"{_ranges(self.missing_shards)}")
        for key, count in self.nonfinite_counts.items():
            yield f"  non-finite: {count} rows of {key}, e.g. ids {self.nonfinite[key]}"
        if self.duplicate_ids:
            yield f"  duplicated ids: {self.duplicate_ids[:10]}"
        if not self.complete and not self.missing_shards:
            yield "  all shards done but not finalized (re-run `spectrolens embed` to finalize)"
        yield "  OK" if self.ok else "  NOT OK"


def verify_store(path: Path, max_examples: int = 5) -> VerifyReport:
    """Read every finished shard and report missing shards and non-finite rows (one shard at a time)."""
    path = Path(path)
    root = open_root(path)
    layout = layout_from_attrs(dict(root.attrs))
    done = done_shards(path)
    missing = sorted(set(range(layout.n_shards)) - done)
    missing_rows = sum(layout.rows(s).stop - layout.rows(s).start for s in missing)
    ids = root["ids"][:]
    uniq, counts = np.unique(ids, return_counts=True)
    dup = [str(x) for x in uniq[counts > 1]]
    keys = ["prediction", *layout.ensemble_keys()[:1], *layout.pooled_keys()]  # onsets may be NaN (no crossing)
    bad: dict[str, list[str]] = {}
    bad_n: dict[str, int] = {}
    for s in sorted(done):
        rows = layout.rows(s)
        for key in keys:
            block = root[key][rows]
            rowbad = ~np.isfinite(block).all(axis=1)
            if rowbad.any():
                bad_n[key] = bad_n.get(key, 0) + int(rowbad.sum())
                bad.setdefault(key, []).extend(str(x) for x in ids[rows][rowbad][: max_examples])
    complete = bool(root.attrs.get("complete"))
    if layout.atom_layers and complete:
        for layer in layout.atom_layers:
            atoms = root[f"layers/{layer}/atoms"]
            step = 65536
            n_bad = 0
            for a0 in range(0, atoms.shape[0], step):
                n_bad += int((~np.isfinite(atoms[a0:a0 + step]).all(axis=1)).sum())
            if n_bad:
                bad_n[f"layers/{layer}/atoms"] = n_bad
                bad[f"layers/{layer}/atoms"] = []
    return VerifyReport(layout.n_materials, layout.n_shards, complete, missing, missing_rows,
                        {k: v[:max_examples] for k, v in bad.items()}, bad_n, dup)


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for x in xs:
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# ---------------------------------------------------------------- reading


def open_embeddings(run_dir_or_store: Path) -> zarr.Group:
    """Open a finished store read-only (consolidated metadata); accepts a run dir or the store path."""
    p = Path(run_dir_or_store)
    if p.name != STORE_NAME and (p / STORE_NAME).exists():
        p = p / STORE_NAME
    root = open_root(p)
    if not root.attrs.get("complete"):
        raise EmbedStoreError(f"{p}: extraction is not complete (run `spectrolens embed --verify` to see what is missing)")
    return root


def per_atom(root: zarr.Group, layer: str, material_row: int) -> np.ndarray:
    """Per-atom features (natoms, H) of one material (rows of ``layers/<layer>/atoms``)."""
    off = root[f"layers/{layer}/atom_offset"][material_row:material_row + 2]
    return root[f"layers/{layer}/atoms"][int(off[0]):int(off[1])]
