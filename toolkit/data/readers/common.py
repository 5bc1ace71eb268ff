"""Checks and helpers shared by the readers: structure validation, value validation, transforms,
file names confined to the data folder, line decoding, and reject reasons.

Every reject reason is ``"<kind>: <specifics>"``: a fixed kind text (no ids, file names or numbers;
prepare counts rejects by it in ``rejects_by_reason``) and then what is specific to the record.
Build reasons with :func:`reason`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
from pymatgen.core import Structure

from toolkit.config import DataConfig
from toolkit.data.records import Material, Reject
from toolkit.data.spectra import apply_transform, energy_grid, resample

UTF8_BOM = b"\xef\xbb\xbf"


def reason(kind: str, detail: str) -> str:
    """A reject reason: the fixed ``kind`` (what prepare groups by), ": ", then the record's specifics."""
    return f"{kind}: {detail}"


def target_grid(cfg: DataConfig) -> np.ndarray:
    """The dataset's target energy grid (eV)."""
    return energy_grid(cfg.grid.start, cfg.grid.stop, cfg.grid.num)


def structure_problem(structure: Structure, min_distance: float) -> str | None:
    """Why a structure cannot be used, or None: empty cell, degenerate lattice, non-finite
    coordinates, or two atoms (periodic images included) closer than ``min_distance`` Å.

    Uses pymatgen's neighbour list (C implementation), not a Python loop over pairs."""
    if len(structure) == 0:
        return reason("empty cell", "structure has no atoms")
    vol = float(structure.lattice.volume)
    if not np.isfinite(vol) or vol < 1e-3:
        return reason("degenerate lattice", f"cell volume {vol:.3g} Å^3")
    if not np.all(np.isfinite(structure.frac_coords)):
        return reason("non-finite coordinates", "atomic coordinates contain NaN/inf")
    centers, neighbors, _, dists = structure.get_neighbor_list(r=min_distance)
    if len(dists):
        k = int(np.argmin(dists))
        i, j = int(centers[k]), int(neighbors[k])
        what = "a periodic image of itself" if i == j else f"atom {j} ({structure[j].species_string})"
        return reason("overlapping atoms", f"atom {i} ({structure[i].species_string}) is {dists[k]:.3f} Å from "
                                           f"{what} (< min_distance {min_distance} Å)")
    return None


def read_structure_file(path: Path) -> Structure:
    """Read a POSCAR/.vasp/CIF (anything pymatgen's ``Structure.from_file`` knows); raises on error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = Structure.from_file(str(path))
    if not isinstance(s, Structure):  # pragma: no cover - from_file returns Structure or raises
        raise ValueError("not a periodic structure")
    return s


def value_problem(values: np.ndarray, *, what: str = "values") -> str | None:
    """NaN, infinite or negative entries in a spectrum/target row (absorption is never negative)."""
    v = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(v)
    if bad.any():
        i = int(np.argmax(bad))
        return reason("non-finite values", f"{int(bad.sum())} NaN/inf in {what}, first at column {i + 1}")
    neg = v < 0
    if neg.any():
        i = int(np.argmax(neg))
        return reason("negative values", f"{int(neg.sum())} in {what}, first at column {i + 1} ({v[i]:g})")
    return None


def gap_problem(value: Any, what: str) -> str | None:
    """Why an optional band gap (eV) is unusable: not a number (strings such as "n/a", lists,
    booleans), non-finite, or negative. ``None`` (absent) is fine."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return reason("invalid gap", f"{what} must be a number, got {_short(value)}")
    try:
        v = float(value)
    except OverflowError:
        v = float("inf")
    if not np.isfinite(v):
        return reason("invalid gap", f"{what} is not finite ({_short(value)})")
    if v < 0:
        return reason("invalid gap", f"{what} is negative ({v:g})")
    return None


def _short(value: Any, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def folder_member(folder: Path, name: str) -> tuple[str | None, str | None]:
    """Resolve the file ``name`` of a table row inside ``folder`` without touching anything outside.

    Returns ``(key, None)`` with the canonical path relative to the folder (POSIX separators), or
    ``(None, reason)``: an empty or NUL-containing name, an absolute path, a ``..`` that leaves the
    folder, or a directory part that resolves (through symlinks) outside it. The folder's own entries
    may be symlinks to files elsewhere (a folder of links into a shared store is a valid data
    folder); the names in a table can only pick among them, never reach past them."""
    if not name or "\x00" in name:
        return None, reason("invalid file name", f"{_short(name)} is empty or contains a NUL character")
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        return None, reason("outside data folder", f"{name} is an absolute path; names must be relative to {folder}")
    parts = Path(name).parts
    depth = 0
    for part in parts:  # lexical check first: nothing outside is even looked at
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return None, reason("outside data folder", f"{name} leaves {folder}")
    head, tail = os.path.split(name)
    if tail in ("", ".", ".."):
        return None, reason("invalid file name", f"{name} names a folder, not a structure file")
    root = os.path.realpath(folder)
    try:  # strict: "nodir/../x" is not x (the system would not open it either)
        real_dir = os.path.realpath(os.path.join(folder, head), strict=True)
    except OSError:
        return None, reason("missing file", f"folder {head} of {name} does not exist in {folder}")
    except ValueError as e:
        return None, reason("invalid file name", f"{_short(name)}: {e}")
    if not os.path.isdir(real_dir):
        return None, reason("missing file", f"{head} of {name} is not a folder in {folder}")
    if real_dir != root and not real_dir.startswith(root.rstrip(os.sep) + os.sep):
        return None, reason("outside data folder", f"{name} resolves to {real_dir}, outside {root}")
    return Path(os.path.relpath(real_dir, root), tail).as_posix().removeprefix("./"), None


def decode_line(raw: bytes) -> tuple[str | None, str | None]:
    """``(text, None)`` for a UTF-8 line, or ``(None, reason)`` naming the first undecodable byte."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, reason("undecodable line", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")


def binary_lines(fh: BinaryIO, *, universal_newlines: bool = False) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, byte offset, line without its end)`` of a file opened in binary mode, read
    line by line. A UTF-8 byte-order mark at the start of the file is skipped (the first offset points
    past it). Lines end at ``\\n``; with ``universal_newlines`` (CSV tables) also at ``\\r\\n`` and a
    bare ``\\r``, as :meth:`bytes.splitlines` does (offsets are then those of the ``\\n`` lines)."""
    lineno, pos = 0, 0
    for raw in fh:
        start, pos = pos, pos + len(raw)
        if start == 0 and raw.startswith(UTF8_BOM):
            raw, start = raw[len(UTF8_BOM):], len(UTF8_BOM)
        body = raw[:-1] if raw.endswith(b"\n") else raw
        if not universal_newlines:
            lineno += 1
            yield lineno, start, body
            continue
        body = body[:-1] if body.endswith(b"\r") else body  # \r\n, or a bare \r ending the file
        for part in body.split(b"\r"):
            lineno += 1
            yield lineno, start, part


def spectrum_from_alpha(cfg: DataConfig, energy: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """α(E) (cm^-1 on ``energy`` eV) -> float32 spectrum on the target grid in ``cfg.transform``,
    NaN outside the source's energy range (transform first, then resample)."""
    y = apply_transform(alpha, cfg.transform, cfg.log_floor)
    return resample(energy, y, target_grid(cfg)).astype(np.float32)


def build_material(cfg: DataConfig, *, id: str, structure: Structure, spectrum: np.ndarray | None,
                   source_file: str, record: str, source: str, provenance: dict[str, Any] | None = None,
                   properties: dict[str, Any] | None = None) -> Material | Reject:
    """Validate the structure and assemble a Material (or a Reject naming file, record and reason)."""
    problem = structure_problem(structure, cfg.min_distance)
    if problem:
        return Reject(source_file, record, problem)
    prov = {"file": source_file, "record": record}
    prov.update(provenance or {})
    return Material(id=id, structure=structure, formula=structure.composition.reduced_formula,
                    spectrum=spectrum, source=source, provenance=prov, properties=dict(properties or {}))


def duplicate_reason(id: str, first: str) -> str:
    """Reason for a record whose id an earlier valid record already has."""
    return reason("duplicate record", f"duplicate id {id!r} (first seen at {first})")


def duplicate_rejects(ids: list[str], source_file: str, records: list[str]) -> tuple[list[int], list[Reject]]:
    """Positions to keep (first occurrence of each id) and a Reject for every later duplicate."""
    seen: dict[str, str] = {}
    keep: list[int] = []
    rejects: list[Reject] = []
    for k, (i, rec) in enumerate(zip(ids, records)):
        if i in seen:
            rejects.append(Reject(source_file, rec, duplicate_reason(i, seen[i])))
        else:
            seen[i] = rec
            keep.append(k)
    return keep, rejects


def target_values(cfg: DataConfig, value: Any, energy: Any = None) -> tuple[np.ndarray | None, str | None]:
    """A record's non-absorption target (``data.target``) as the stored vector, or a reason it is unusable.

    ``value``: a number or list of numbers (scalar heads, in ``target.names`` order); a list on
    ``data.grid`` (one spectral head), or on ``energy`` (eV, resampled onto the grid); or an object
    ``{head: list}`` for several spectral heads (ε1 and ε2). The transform (``data.transform``) is applied."""
    from toolkit.data.targets import TargetSpec

    spec = TargetSpec.from_config(cfg)
    grid = target_grid(cfg)

    def nums(v: Any) -> np.ndarray | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, (int, float)):
            return np.array([float(v)])
        if isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return np.asarray(v, dtype=np.float64)
        return None

    heads = value if isinstance(value, dict) else {spec.heads[0].name: value} if spec.spectral else None
    out = np.full(spec.n_outputs, np.nan)
    if heads is None:  # scalar heads
        v = nums(value)
        if v is None or v.size != spec.n_outputs:
            return None, reason("invalid target", f"'target' must be {spec.n_outputs} number(s) "
                                                  f"({', '.join(h.name for h in spec.heads)}), got {str(value)[:80]}")
        out[:] = v
    else:
        unknown = sorted(set(heads) - {h.name for h in spec.heads})
        if unknown:
            return None, reason("invalid target", f"'target' has heads {unknown} not in data.target.names "
                                                  f"{[h.name for h in spec.heads]}")
        e = nums(energy) if energy is not None else None
        for h in spec.heads:
            if h.name not in heads:
                continue  # a missing head stays masked (NaN)
            v = nums(heads[h.name])
            if v is None:
                return None, reason("invalid target", f"head {h.name!r} is not a list of numbers")
            if e is not None:
                if e.size != v.size or e.size < 2:
                    return None, reason("invalid target", f"head {h.name!r} has {v.size} values for {e.size} energies")
                v = resample(e, v, grid)
            elif v.size != h.size:
                return None, reason("invalid target", f"head {h.name!r} has {v.size} values; without 'energy' it "
                                                      f"must have data.grid.num={h.size}")
            out[h.offset:h.offset + h.size] = v
    if not np.isfinite(out).any():
        return None, reason("invalid target", "no finite value on the target grid")
    if np.isinf(out).any():
        return None, reason("non-finite values", "target has infinite values")
    return spec.apply_transform(out).astype(np.float32), None
