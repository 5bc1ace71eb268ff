"""JSON Lines: one material per line (see docs/data.md for an example).

Fields of each JSON object:

* id: ``"id"`` (or ``"material_id"`` / ``"jid"``, first present), unique within the file
* ``"structure"``: pymatgen ``Structure.as_dict()``
* optional spectrum: ``"energy"`` (eV, list) with ``"alpha"`` (cm^-1) or ``"log10_alpha"``
  (log10 of α in cm^-1); without ``"energy"`` the values must have ``data.grid.num`` entries and
  are taken to be on ``data.grid``. Resampled onto the target grid, NaN outside the given range.
* optional ``"direct_gap"``, ``"indirect_gap"`` (eV) -> ``Material.properties``
* any other field (``"formula"`` ...) is ignored.

Structure-only lines (no spectrum field) are valid records with ``spectrum=None``.

The file is UTF-8 (a leading byte-order mark is skipped). Everything that can be checked without
building the structure is checked by ``scan`` (JSON, id, structure object, spectrum, gaps: one
:func:`record_problem`), and again by ``load``, which turns every error of a record (the file changed
since the scan, a structure pymatgen cannot build, ...) into a :class:`Reject`, never an exception.
Rejected: undecodable lines, malformed JSON, a missing or non-string/integer id, a later record with
an id already used (the first record that passes the scan checks keeps the id), spectra that are not
lists of finite non-negative numbers or have no point on ``data.grid``, and gaps that are not finite
non-negative numbers.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pymatgen.core import Structure

from toolkit.config import DataConfig
from toolkit.data.readers.common import (
    binary_lines,
    build_material,
    decode_line,
    duplicate_reason,
    gap_problem,
    reason,
    spectrum_from_alpha,
    target_grid,
    target_values,
    value_problem,
)
from toolkit.data.records import Material, Reject

ID_FIELDS = ("id", "material_id", "jid")
SPECTRUM_FIELDS = ("alpha", "log10_alpha")
GAP_FIELDS = ("direct_gap", "indirect_gap")


def record_id(obj: dict) -> str | None:
    """The record's id (first of ``id``, ``material_id``, ``jid``) as a string, or None."""
    for f in ID_FIELDS:
        if obj.get(f) not in (None, ""):
            return str(obj[f])
    return None


def id_problem(obj: dict) -> str | None:
    """Why the record has no usable id: none of the id fields, or one that is not a string/integer."""
    f = next((f for f in ID_FIELDS if obj.get(f) not in (None, "")), None)
    if f is None:
        return reason("no id field", f"expected one of {', '.join(ID_FIELDS)}")
    v = obj[f]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        return reason("invalid id", f"field {f!r} must be a string or an integer, not {type(v).__name__}")
    try:
        str(v).encode("utf-8")
    except UnicodeEncodeError:
        return reason("invalid id", f"field {f!r} holds an unpaired surrogate escape ({v!r})")
    return None


def spectrum_problem(obj: dict, grid_num: int) -> str | None:
    """Why the optional spectrum fields of a record are unusable (before resampling), or None."""
    present = [f for f in SPECTRUM_FIELDS if f in obj]
    if not present:
        return reason("incomplete spectrum", "field 'energy' given without 'alpha' or 'log10_alpha'") \
            if "energy" in obj else None
    if len(present) > 1:
        return reason("conflicting spectrum fields", "both 'alpha' and 'log10_alpha' given; give one")
    field = present[0]
    vals = _numbers(obj[field])
    if vals is None:
        return reason("invalid spectrum", f"field {field!r} is not a list of numbers")
    if vals.ndim != 1 or vals.size < 2:
        return reason("invalid spectrum", f"field {field!r} must be a list of at least 2 numbers")
    if "energy" in obj:
        e = _numbers(obj["energy"])
        if e is None:
            return reason("invalid spectrum", "field 'energy' is not a list of numbers")
        if e.shape != vals.shape:
            return reason("length mismatch", f"'energy' has {e.size} values but {field!r} has {vals.size}")
        if not np.all(np.isfinite(e)):
            return reason("invalid spectrum", "field 'energy' has non-finite values")
    elif vals.size != grid_num:
        return reason("wrong number of values", f"{field!r} has {vals.size} values and no 'energy' field; without "
                                                f"'energy' it must have data.grid.num={grid_num} values")
    return value_problem(vals, what=field)


def record_problem(obj: Any, grid_num: int) -> str | None:
    """Every check of one parsed line that does not need the structure built, or None."""
    if not isinstance(obj, dict):
        return reason("not a JSON object", f"line holds a JSON {type(obj).__name__}")
    problem = id_problem(obj)
    if problem:
        return problem
    if not isinstance(obj.get("structure"), dict):
        return reason("missing structure", "no 'structure' object (pymatgen Structure.as_dict())")
    problem = spectrum_problem(obj, grid_num)
    if problem:
        return problem
    return next((p for p in (gap_problem(obj.get(f), repr(f)) for f in GAP_FIELDS) if p), None)


def _numbers(value: Any) -> np.ndarray | None:
    """A list of JSON numbers as float64, or None (strings, booleans, nested lists, objects)."""
    if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except OverflowError:  # an integer beyond float range
        return None


class JsonlSource:
    """Reader for a JSON Lines file (``cfg.path``)."""

    name = "jsonl"

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.path = Path(cfg.path)
        self._offsets: dict[str, tuple[int, int]] | None = None
        self._n_spectra = 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_offsets"] = None
        return state

    def _parse_line(self, raw: bytes) -> tuple[Any, str | None]:
        """(object, None) or (None, reason) for one line of the file."""
        text, problem = decode_line(raw)
        if text is None:
            return None, problem
        try:
            return json.loads(text), None
        except json.JSONDecodeError as e:
            return None, reason("malformed JSON", f"{e.msg} at column {e.colno}")
        except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits, deep nesting
            return None, reason("malformed JSON", f"{type(e).__name__}: {str(e)[:200]}")

    def _index(self) -> tuple[list[str], dict[str, tuple[int, int]], list[Reject]]:
        src = str(self.path)
        keys: list[str] = []
        offsets: dict[str, tuple[int, int]] = {}
        rejects: list[Reject] = []
        n_spec = 0
        with self.path.open("rb") as fh:
            for lineno, start, raw in binary_lines(fh):
                if not raw.strip():
                    continue
                obj, problem = self._parse_line(raw)
                rid = record_id(obj) if isinstance(obj, dict) and id_problem(obj) is None else None
                rec = f"line {lineno}" if rid is None else f"line {lineno} ({rid})"
                problem = problem or record_problem(obj, self.cfg.grid.num) or self._values(obj)[1]
                if problem is None and rid in offsets:
                    problem = duplicate_reason(rid, f"line {offsets[rid][1]}")
                if problem:
                    rejects.append(Reject(src, rec, problem))
                    continue
                n_spec += any(f in obj for f in SPECTRUM_FIELDS)
                offsets[rid] = (start, lineno)
                keys.append(rid)
        self._n_spectra = n_spec
        return keys, offsets, rejects

    def scan(self) -> tuple[list[str], list[Reject]]:
        keys, self._offsets, rejects = self._index()
        return keys, rejects

    def load(self, keys: list[str]) -> Iterator[Material | Reject]:
        if self._offsets is None:
            _, self._offsets, _ = self._index()
        src = str(self.path)
        with self.path.open("rb") as fh:
            for key in keys:
                if key not in self._offsets:
                    yield Reject(src, key, reason("not a valid record", f"id {key!r} is not a valid record of {self.path.name}"))
                    continue
                off, lineno = self._offsets[key]
                rec = f"line {lineno} ({key})"
                try:
                    fh.seek(off)
                    item = self._material(fh.readline(), key, rec)
                except Exception as e:  # noqa: BLE001 - load never raises for one record
                    item = Reject(src, rec, reason("unreadable record", f"{type(e).__name__}: {e}"))
                yield item

    def _material(self, raw: bytes, key: str, rec: str) -> Material | Reject:
        """The line at a scanned offset -> Material, with every scan check made again (the file may
        have changed since the plan)."""
        src = str(self.path)
        obj, problem = self._parse_line(raw)
        problem = problem or record_problem(obj, self.cfg.grid.num)
        if problem is None and record_id(obj) != key:
            problem = reason("changed record", f"the line now holds id {record_id(obj)!r} ({self.path.name} was "
                                               f"modified after the scan)")
        if problem:
            return Reject(src, rec, problem)
        if obj["structure"].get("sites") == []:
            return Reject(src, rec, reason("empty cell", "structure has no atoms"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure.from_dict(obj["structure"])
        except Exception as e:  # noqa: BLE001 - any malformed dict is a per-record reject
            return Reject(src, rec, reason("unreadable structure", f"{type(e).__name__}: {e}"))
        spectrum, problem = self._values(obj)
        if problem:
            return Reject(src, rec, problem)
        props: dict[str, Any] = {f: float(obj[f]) for f in GAP_FIELDS if obj.get(f) is not None}
        for f in (*self.cfg.target.conditions, "structure_id"):  # conditions are checked by prepare
            if f in obj:
                props[f] = obj[f]
        return build_material(self.cfg, id=key, structure=structure, spectrum=spectrum, source_file=src,
                              record=rec, source=self.name, properties=props)

    def _values(self, obj: dict) -> tuple[np.ndarray | None, str | None]:
        """The record's target vector: the absorption spectrum (``alpha``/``log10_alpha``), or for other
        target kinds the ``"target"`` field (toolkit.data.readers.common.target_values)."""
        if self.cfg.target.kind == "absorption":
            return self._spectrum(obj)
        if "target" not in obj:
            return None, None
        energy = obj.get("energy")
        return target_values(self.cfg, obj["target"], energy)

    def _spectrum(self, obj: dict) -> tuple[np.ndarray | None, str | None]:
        """The record's spectrum on the target grid (None without one), or a reason it is unusable:
        values that overflow, or no point on the target grid."""
        field = next((f for f in SPECTRUM_FIELDS if f in obj), None)
        if field is None:
            return None, None
        vals = np.asarray(obj[field], dtype=np.float64)
        with np.errstate(over="ignore"):
            alpha = vals if field == "alpha" else 10.0 ** vals
        if not np.all(np.isfinite(alpha)):
            i = int(np.argmax(~np.isfinite(alpha)))
            return None, reason("non-finite values", f"10**{field} overflows at column {i + 1} ({vals[i]:g})")
        energy = np.asarray(obj["energy"], dtype=np.float64) if "energy" in obj else target_grid(self.cfg)
        spectrum = spectrum_from_alpha(self.cfg, energy, alpha)
        if not np.isfinite(spectrum).any():
            g = self.cfg.grid
            return None, reason("spectrum outside grid", f"energies {energy.min():g}-{energy.max():g} eV put no point "
                                                         f"on data.grid ({g.start:g}-{g.stop:g} eV, {g.num} points)")
        return spectrum, None

    def metadata(self) -> dict:
        return {"source": self.name, "path": str(self.path), "units": "eV", "transform": self.cfg.transform,
                "log_floor": self.cfg.log_floor, "spectrum_fields": list(SPECTRUM_FIELDS),
                "n_with_spectrum": self._n_spectra}
