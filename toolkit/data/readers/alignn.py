"""ALIGNN training folders: structure files + ``id_prop.csv`` (see docs/data.md).

``id_prop.csv`` has no header: the structure file name, then one or many comma-separated values.

* Rows with ``data.grid.num`` values are whole spectra on ``data.grid`` (the energy grid is not in
  the file; the study's default is 0.00-15.00 eV, 1,501 points), already in ``data.transform``
  units (log10 α floored at ``data.log_floor`` by default; values below the floor are raised to it).
* Rows with a single value are a scalar target (e.g. ALIGNN's sample_data band gaps): stored as
  ``Material.properties["target"]`` with ``spectrum=None``.
* Any other width is a configuration error: set ``data.grid`` to the table's grid.

Source-level rejects: rows whose value count differs from the first row's, non-numeric, NaN/inf or
negative values, duplicate file names, rows whose file is missing, and structure files without a row.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

import numpy as np

from toolkit.config import ConfigError, DataConfig
from toolkit.data.readers.common import build_material, read_structure_file, value_problem
from toolkit.data.records import Material, Reject

STRUCTURE_PATTERNS = ("POSCAR*", "CONTCAR*", "*.vasp", "*.poscar", "*.cif")


def structure_files(folder: Path) -> list[str]:
    """Names of the structure files directly in ``folder`` (POSCAR*, CONTCAR*, *.vasp, *.poscar, *.cif)."""
    names = {p.name for pat in STRUCTURE_PATTERNS for p in folder.glob(pat) if p.is_file()}
    return sorted(names)


class AlignnSource:
    """Reader for an ALIGNN folder (``cfg.path``) with its ``cfg.id_prop`` table."""

    name = "alignn"

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.folder = Path(cfg.path)
        self.table_path = self.folder / cfg.id_prop
        if not self.folder.is_dir():
            raise ConfigError(f"data.source='alignn' needs a folder; {self.folder} is not one")
        if not self.table_path.is_file():
            raise ConfigError(f"{self.table_path} not found: an ALIGNN folder needs its id_prop table "
                              f"(no header: file name, value[, value...]); set data.id_prop if it has another name")
        self._rows: dict[str, np.ndarray] | None = None
        self._width: int | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_rows"] = None  # workers re-read the table instead of receiving it
        return state

    def _parse(self) -> tuple[list[str], dict[str, np.ndarray], list[Reject]]:
        src = str(self.table_path)
        keys: list[str] = []
        rows: dict[str, np.ndarray] = {}
        rejects: list[Reject] = []
        first_seen: dict[str, int] = {}
        width: int | None = None
        with self.table_path.open(newline="") as fh:
            for lineno, row in enumerate(csv.reader(fh), start=1):
                if not row or all(not c.strip() for c in row):
                    continue
                rec = f"line {lineno}"
                name = row[0].strip()
                raw = [c.strip() for c in row[1:]]
                if not name:
                    rejects.append(Reject(src, rec, "empty file name in first column"))
                    continue
                rec = f"line {lineno} ({name})"
                if not raw:
                    rejects.append(Reject(src, rec, "row has a file name but no values"))
                    continue
                try:
                    vals = np.array([float(c) for c in raw], dtype=np.float64)
                except ValueError:
                    bad = next(c for c in raw if not _is_float(c))
                    rejects.append(Reject(src, rec, f"value {bad!r} is not a number"))
                    continue
                if width is None:
                    width = vals.size
                elif vals.size != width:
                    rejects.append(Reject(src, rec, f"row has {vals.size} values, expected {width} (as the first row)"))
                    continue
                problem = value_problem(vals)
                if problem:
                    rejects.append(Reject(src, rec, problem))
                    continue
                if name in first_seen:
                    rejects.append(Reject(src, rec, f"duplicate id {name!r} (first seen at line {first_seen[name]})"))
                    continue
                if not (self.folder / name).is_file():
                    rejects.append(Reject(src, rec, f"structure file {self.folder / name} does not exist"))
                    continue
                first_seen[name] = lineno
                keys.append(name)
                rows[name] = vals
        if width is not None and width != 1 and width != self.cfg.grid.num:
            raise ConfigError(
                f"{self.table_path}: rows have {width} values but data.grid.num is {self.cfg.grid.num}; "
                f"set data.grid.start/stop/num to the energy grid of the table's columns (1 value = scalar target)")
        self._width = width
        return keys, rows, rejects

    def _table(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            _, self._rows, _ = self._parse()
        return self._rows

    def scan(self) -> tuple[list[str], list[Reject]]:
        keys, rows, rejects = self._parse()
        self._rows = rows
        listed = {k.strip() for k in _all_names(self.table_path)}
        for fname in structure_files(self.folder):
            if fname not in listed:
                rejects.append(Reject(str(self.folder / fname), fname,
                                      f"structure file has no row in {self.cfg.id_prop} (no target)"))
        return keys, rejects

    def load(self, keys: list[str]) -> Iterator[Material | Reject]:
        table = self._table()
        src_table = str(self.table_path)
        for key in keys:
            path = self.folder / key
            vals = table.get(key)
            if vals is None:
                yield Reject(src_table, key, f"no valid row for {key!r} in {self.cfg.id_prop}")
                continue
            try:
                structure = read_structure_file(path)
            except Exception as e:  # noqa: BLE001 - any parser failure is a per-record reject
                yield Reject(str(path), key, f"unreadable structure file: {type(e).__name__}: {e}")
                continue
            prov = {"id_prop": src_table}
            if vals.size == 1:
                spectrum, props = None, {"target": float(vals[0])}
            else:
                if self.cfg.transform == "log10_alpha":
                    prov["n_floored"] = int((vals < self.cfg.log_floor).sum())
                    vals = np.maximum(vals, self.cfg.log_floor)
                spectrum, props = vals.astype(np.float32), {}
            yield build_material(self.cfg, id=key, structure=structure, spectrum=spectrum, source_file=str(path),
                                 record=key, source=self.name, provenance=prov, properties=props)

    def metadata(self) -> dict:
        if self._width is None:
            self._table()
        return {"source": self.name, "path": str(self.folder), "id_prop": self.cfg.id_prop,
                "units": "eV", "transform": self.cfg.transform, "log_floor": self.cfg.log_floor,
                "values_per_row": self._width,
                "target_kind": "scalar" if self._width == 1 else "spectrum"}


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _all_names(table: Path) -> list[str]:
    """Every first-column name of the table, valid or not (so files with a bad row are not also
    reported as 'no row')."""
    with table.open(newline="") as fh:
        return [row[0] for row in csv.reader(fh) if row]
