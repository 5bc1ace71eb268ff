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
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pymatgen.core import Structure

from toolkit.config import DataConfig
from toolkit.data.readers.common import build_material, spectrum_from_alpha, target_grid, value_problem
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


def spectrum_problem(obj: dict, grid_num: int) -> str | None:
    """Why the optional spectrum fields of a record are unusable, or None."""
    present = [f for f in SPECTRUM_FIELDS if f in obj]
    if not present:
        return "field 'energy' given without 'alpha' or 'log10_alpha'" if "energy" in obj else None
    if len(present) > 1:
        return "both 'alpha' and 'log10_alpha' given; give one"
    try:
        vals = np.asarray(obj[present[0]], dtype=np.float64)
    except (TypeError, ValueError):
        return f"field {present[0]!r} is not a list of numbers"
    if vals.ndim != 1 or vals.size < 2:
        return f"field {present[0]!r} must be a list of at least 2 numbers"
    if "energy" in obj:
        try:
            e = np.asarray(obj["energy"], dtype=np.float64)
        except (TypeError, ValueError):
            return "field 'energy' is not a list of numbers"
        if e.shape != vals.shape:
            return f"'energy' has {e.size} values but {present[0]!r} has {vals.size}"
        if not np.all(np.isfinite(e)):
            return "field 'energy' has non-finite values"
    elif vals.size != grid_num:
        return (f"{present[0]!r} has {vals.size} values and no 'energy' field; without 'energy' it must have "
                f"data.grid.num={grid_num} values")
    return value_problem(vals, what=present[0])


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

    def _index(self) -> tuple[list[str], dict[str, tuple[int, int]], list[Reject]]:
        src = str(self.path)
        keys: list[str] = []
        offsets: dict[str, tuple[int, int]] = {}
        rejects: list[Reject] = []
        n_spec = 0
        with self.path.open("rb") as fh:
            lineno, pos = 0, 0
            for raw in fh:
                lineno += 1
                start, pos = pos, pos + len(raw)
                if not raw.strip():
                    continue
                rec = f"line {lineno}"
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    rejects.append(Reject(src, rec, f"malformed JSON: {e.msg} at column {e.colno}"))
                    continue
                if not isinstance(obj, dict):
                    rejects.append(Reject(src, rec, "line is not a JSON object"))
                    continue
                rid = record_id(obj)
                if rid is None:
                    rejects.append(Reject(src, rec, f"no id field (one of {', '.join(ID_FIELDS)})"))
                    continue
                rec = f"line {lineno} ({rid})"
                if not isinstance(obj.get("structure"), dict):
                    rejects.append(Reject(src, rec, "no 'structure' object (pymatgen Structure.as_dict())"))
                    continue
                problem = spectrum_problem(obj, self.cfg.grid.num)
                if problem:
                    rejects.append(Reject(src, rec, problem))
                    continue
                if rid in offsets:
                    rejects.append(Reject(src, rec, f"duplicate id {rid!r} (first seen at line {offsets[rid][1]})"))
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
                    yield Reject(src, key, f"id {key!r} is not a valid record of {self.path.name}")
                    continue
                off, lineno = self._offsets[key]
                fh.seek(off)
                obj = json.loads(fh.readline())
                yield self._material(obj, key, f"line {lineno} ({key})")

    def _material(self, obj: dict, key: str, rec: str) -> Material | Reject:
        src = str(self.path)
        if obj["structure"].get("sites") == []:
            return Reject(src, rec, "empty cell: structure has no atoms")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure.from_dict(obj["structure"])
        except Exception as e:  # noqa: BLE001 - any malformed dict is a per-record reject
            return Reject(src, rec, f"unreadable structure: {type(e).__name__}: {e}")
        spectrum = self._spectrum(obj)
        props: dict[str, Any] = {f: float(obj[f]) for f in GAP_FIELDS if obj.get(f) is not None}
        return build_material(self.cfg, id=key, structure=structure, spectrum=spectrum, source_file=src,
                              record=rec, source=self.name, properties=props)

    def _spectrum(self, obj: dict) -> np.ndarray | None:
        field = next((f for f in SPECTRUM_FIELDS if f in obj), None)
        if field is None:
            return None
        vals = np.asarray(obj[field], dtype=np.float64)
        alpha = vals if field == "alpha" else 10.0 ** vals
        energy = np.asarray(obj["energy"], dtype=np.float64) if "energy" in obj else target_grid(self.cfg)
        return spectrum_from_alpha(self.cfg, energy, alpha)

    def metadata(self) -> dict:
        return {"source": self.name, "path": str(self.path), "units": "eV", "transform": self.cfg.transform,
                "log_floor": self.cfg.log_floor, "spectrum_fields": list(SPECTRUM_FIELDS),
                "n_with_spectrum": self._n_spectra}
