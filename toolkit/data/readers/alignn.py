"""ALIGNN training folders: structure files + ``id_prop.csv`` (see docs/data.md).

``id_prop.csv`` has no header: the structure file name, then one or many comma-separated values.
It is read as UTF-8 (a leading byte-order mark is skipped); a line that is not valid UTF-8 is a
reject naming its line, the other lines are read normally.

* Rows with ``data.grid.num`` values are whole spectra on ``data.grid`` (the energy grid is not in
  the file; the study's default is 0.00-15.00 eV, 1,501 points), already in ``data.transform``
  units (log10 α floored at ``data.log_floor`` by default; values below the floor are raised to it).
* Rows with a single value are a scalar target (e.g. ALIGNN's sample_data band gaps): stored as
  ``Material.properties["target"]`` with ``spectrum=None``.
* The table's kind is that of the majority of its rows (ties: spectra): rows of any other width are
  rejects. A table whose majority has neither 1 nor ``data.grid.num`` values is a configuration
  error: set ``data.grid`` to the table's grid.

File names must resolve inside the folder: an absolute path, a ``..`` that leaves the folder or a
sub-folder that is a symlink to elsewhere is a reject (``outside data folder``) and nothing outside
the folder is opened. Entries of the folder itself may be symlinks (e.g. into a shared store).
The material id is the name's canonical path relative to the folder (the name itself for the usual
plain file names).

Source-level rejects: undecodable or malformed lines, rows of the wrong width, non-numeric, NaN/inf
or negative values, names outside the folder, duplicate file names, rows whose file is missing, and
structure files without a row.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from toolkit.config import ConfigError, DataConfig
from toolkit.data.readers.common import (
    binary_lines,
    build_material,
    decode_line,
    duplicate_reason,
    folder_member,
    read_structure_file,
    reason,
    value_problem,
)
from toolkit.data.records import Material, Reject

STRUCTURE_PATTERNS = ("POSCAR*", "CONTCAR*", "*.vasp", "*.poscar", "*.cif")


def structure_files(folder: Path) -> list[str]:
    """Names of the structure files directly in ``folder`` (POSCAR*, CONTCAR*, *.vasp, *.poscar, *.cif)."""
    names = {p.name for pat in STRUCTURE_PATTERNS for p in folder.glob(pat) if p.is_file()}
    return sorted(names)


@dataclass
class _Row:
    lineno: int
    name: str
    values: np.ndarray
    key: str | None  # canonical name inside the folder, or None (then ``problem`` says why)
    problem: str | None


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

    def _lines(self) -> tuple[list[_Row], list[tuple[int, Reject]], set[str]]:
        """The rows with a name and numeric values, the (line, reject) of every other non-blank line,
        and every first-column name, as written and canonical (so files with a bad row are not also
        reported as 'no row')."""
        rows: list[_Row] = []
        rejects: list[tuple[int, Reject]] = []
        listed: set[str] = set()
        with self.table_path.open("rb") as fh:
            for lineno, _, raw in binary_lines(fh, universal_newlines=True):  # each line parsed on its own
                item, names = self._line(lineno, raw)
                listed.update(names)
                if isinstance(item, Reject):
                    rejects.append((lineno, item))
                elif item is not None:
                    rows.append(item)
        return rows, rejects, listed

    def _line(self, lineno: int, raw: bytes) -> tuple[_Row | Reject | None, tuple[str, ...]]:
        """One line of the table: a row with a name and numbers, a reject, or None (blank line); and
        the names it gives its file."""
        src, rec = str(self.table_path), f"line {lineno}"
        text, problem = decode_line(raw)
        if text is None:
            return Reject(src, rec, problem), (raw.decode("utf-8", "surrogateescape").split(",", 1)[0].strip(),)
        try:
            row = next(csv.reader([text]), [])
        except csv.Error as e:
            return Reject(src, rec, reason("malformed row", str(e))), (text.split(",", 1)[0].strip(),)
        if not row or all(not c.strip() for c in row):
            return None, ()
        name = row[0].strip()
        raw_vals = [c.strip() for c in row[1:]]
        if not name:
            return Reject(src, rec, reason("empty file name", "the first column is empty")), ()
        key, problem = folder_member(self.folder, name)
        names = (name, key) if key else (name,)
        rec = f"line {lineno} ({name})"
        if not raw_vals:
            return Reject(src, rec, reason("no values", "row has a file name but no values")), names
        try:
            vals = np.array([float(c) for c in raw_vals], dtype=np.float64)
        except ValueError:
            bad = next(c for c in raw_vals if not _is_float(c))
            return Reject(src, rec, reason("not a number", f"value {bad!r} is not a number")), names
        return _Row(lineno, name, vals, key, problem), names

    def _expected_width(self, rows: list[_Row]) -> int | None:
        """Values per row of this table: ``data.grid.num`` (spectra) or 1 (scalar target), whichever
        the majority of rows has (ties: spectra); never decided by one row."""
        if not rows:
            return None
        counts = Counter(r.values.size for r in rows)
        if self.cfg.target.kind != "absorption":  # the target says how many values a row has
            from toolkit.data.targets import TargetSpec

            want = TargetSpec.from_config(self.cfg).n_outputs
            width, n = max(counts.items(), key=lambda kv: (kv[1], kv[0] == want))
            if counts.get(want, 0) != n:
                raise ConfigError(
                    f"{self.table_path}: most rows have {width} values ({n} of {len(rows)}) but data.target "
                    f"(kind {self.cfg.target.kind}, names {self.cfg.target.names}) takes {want}: set data.target.names "
                    f"(scalars) or data.grid.num (spectra) to the table's columns")
            return want
        num = self.cfg.grid.num
        width, n = max(counts.items(), key=lambda kv: (kv[1], kv[0] == num, kv[0] == 1))
        if counts.get(num, 0) == n:
            return num
        if counts.get(1, 0) == n:
            return 1
        raise ConfigError(
            f"{self.table_path}: rows have {width} values but data.grid.num is {num} ({n} of {len(rows)} rows); "
            f"set data.grid.start/stop/num to the energy grid of the table's columns (1 value = scalar target)")

    def _parse(self) -> tuple[list[str], dict[str, np.ndarray], list[Reject], set[str]]:
        src = str(self.table_path)
        rows, rejects, listed = self._lines()
        width = self._expected_width(rows)
        kind = "data.grid.num, a spectrum table" if width != 1 else "a scalar-target table"
        keys: list[str] = []
        values: dict[str, np.ndarray] = {}
        first_seen: dict[str, int] = {}
        for r in rows:
            if r.values.size != width:
                problem = reason("wrong number of values", f"row has {r.values.size} values, expected {width} ({kind})")
            elif (problem := value_problem(r.values) or r.problem) is None:
                if r.key in first_seen:
                    problem = duplicate_reason(r.key, f"line {first_seen[r.key]}")
                elif not (self.folder / r.key).is_file():
                    problem = reason("missing file", f"structure file {r.key} does not exist in {self.folder}")
            if problem:
                rejects.append((r.lineno, Reject(src, f"line {r.lineno} ({r.name})", problem)))
                continue
            first_seen[r.key] = r.lineno
            keys.append(r.key)
            values[r.key] = r.values
        self._width = width
        rejects.sort(key=lambda lr: lr[0])  # file order, whichever check found them
        return keys, values, [rj for _, rj in rejects], listed

    def _table(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            _, self._rows, _, _ = self._parse()
        return self._rows

    def scan(self) -> tuple[list[str], list[Reject]]:
        keys, rows, rejects, listed = self._parse()
        self._rows = rows
        for fname in structure_files(self.folder):
            if fname not in listed:
                rejects.append(Reject(str(self.folder / fname), fname,
                                      reason("no row", f"structure file has no row in {self.cfg.id_prop} (no target)")))
        return keys, rejects

    def load(self, keys: list[str]) -> Iterator[Material | Reject]:
        table = self._table()
        src_table = str(self.table_path)
        for key in keys:
            inside, problem = folder_member(self.folder, key)  # keys come from a plan file: check again
            if inside is None:
                yield Reject(src_table, key, problem)
                continue
            vals = table.get(key)
            if vals is None:
                yield Reject(src_table, key, reason("no valid row", f"no valid row for {key!r} in {self.cfg.id_prop}"))
                continue
            path = self.folder / key
            try:
                structure = read_structure_file(path)
            except Exception as e:  # noqa: BLE001 - any parser failure is a per-record reject
                yield Reject(str(path), key, reason("unreadable structure file", f"{type(e).__name__}: {e}"))
                continue
            prov = {"id_prop": src_table}
            if self.cfg.target.kind != "absorption":
                from toolkit.data.targets import TargetSpec

                spectrum, props = TargetSpec.from_config(self.cfg).apply_transform(vals).astype(np.float32), {}
            elif vals.size == 1:
                spectrum, props = None, {"target": float(vals[0])}
            else:
                if self.cfg.transform == "log10_alpha":
                    prov["n_floored"] = int((vals < self.cfg.log_floor).sum())
                    vals = np.maximum(vals, self.cfg.log_floor)
                spectrum, props = vals.astype(np.float32), {}
            try:
                item = build_material(self.cfg, id=key, structure=structure, spectrum=spectrum, source_file=str(path),
                                      record=key, source=self.name, provenance=prov, properties=props)
            except Exception as e:  # noqa: BLE001 - a structure the checks cannot handle is a reject too
                item = Reject(str(path), key, reason("unusable structure", f"{type(e).__name__}: {e}"))
            yield item

    def metadata(self) -> dict:
        if self._width is None:
            self._table()
        return {"source": self.name, "path": str(self.folder), "id_prop": self.cfg.id_prop,
                "units": "eV", "transform": self.cfg.transform, "log_floor": self.cfg.log_floor,
                "values_per_row": self._width,
                "target_kind": self.cfg.target.kind if self.cfg.target.kind != "absorption" else
                ("scalar" if self._width == 1 else "spectrum")}


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
