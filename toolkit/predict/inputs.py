"""Structures to predict: every input ``prepare`` reads, plus plain structure files and folders.

Each input (``predict.inputs``) becomes a reader with the contract of :mod:`toolkit.data.readers`
(``scan() -> (keys, rejects)``, ``load(keys) -> Material | Reject``), so one plan of record keys can be
split into shards and each shard re-created in any worker:

* ``predict.source`` names a prepare source (``jsonl``, ``alignn``, ``vasp``, ``jarvis``,
  ``refractiveindex``): :func:`toolkit.data.readers.open_source` with ``data`` settings and
  ``data.path`` = the input (spectra in the input are read and checked as prepare does, then ignored);
* ``auto`` (default): a ``.jsonl`` file -> ``jsonl``; a folder with ``data.id_prop`` -> ``alignn``;
  anything else -> plain structures (:class:`StructureFiles`);
* :class:`StructureFiles`: one file or a folder searched recursively for CIF (``*.cif``), POSCAR
  (``POSCAR*``, ``CONTCAR*``, ``*.vasp``, ``*.poscar``), pymatgen JSON (``*.json``: one
  ``Structure.as_dict()``) and ASE databases (``*.db``: every row; needs ``ase``). id = the path
  relative to the input folder (``<path>@<row id>`` for database rows).

Every record that cannot be read is a :class:`~toolkit.data.records.Reject` naming file, record and
reason; the structure checks of prepare (:func:`toolkit.data.readers.common.structure_problem`:
empty cell, degenerate lattice, overlapping atoms) apply to every input.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterator

from toolkit.config import ConfigError, PipelineConfig
from toolkit.data.readers import open_source
from toolkit.data.readers.common import build_material, read_structure_file, reason
from toolkit.data.records import Material, Reject

POSCAR_PATTERNS = ("POSCAR*", "CONTCAR*", "*.vasp", "*.poscar")
STRUCTURE_PATTERNS = POSCAR_PATTERNS + ("*.cif", "*.json", "*.db")
DB_SEP = "@"


def _is_structure_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and any(p.match(pat) for pat in STRUCTURE_PATTERNS)


class StructureFiles:
    """Plain structure files: one file, or every structure file under a folder (sorted, recursive)."""

    name = "structures"

    def __init__(self, path: Path, cfg: PipelineConfig):
        self.path = Path(path)
        self.root = self.path if self.path.is_dir() else self.path.parent
        self.data = cfg.data.model_copy(update={"min_distance": cfg.predict.min_distance or cfg.data.min_distance})

    def _files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.rglob("*") if _is_structure_file(p))

    def scan(self) -> tuple[list[str], list[Reject]]:
        keys: list[str] = []
        rejects: list[Reject] = []
        for f in self._files():
            rel = f.relative_to(self.root).as_posix()
            if f.suffix == ".db":
                try:
                    keys += [f"{rel}{DB_SEP}{i}" for i in _db_ids(f)]
                except Exception as e:  # noqa: BLE001 - one unreadable database never stops the others
                    rejects.append(Reject(str(f), rel, reason("unreadable database", f"{type(e).__name__}: {e}")))
            else:
                keys.append(rel)
        return keys, rejects

    def load(self, keys: list[str]) -> Iterator[Material | Reject]:
        for key in keys:
            head, _, tail = key.rpartition(DB_SEP)
            rel, row = (head, tail) if head.endswith(".db") and tail.isdigit() else (key, "")
            f = self.root / rel
            try:
                structure = _read(f, row)
            except Exception as e:  # noqa: BLE001 - every unreadable record is a reject naming it
                yield Reject(str(f), key, reason("unreadable structure", f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            yield build_material(self.data, id=key, structure=structure, spectrum=None, source_file=str(f),
                                 record=key, source=self.name)

    def metadata(self) -> dict:
        return {"source": self.name, "path": str(self.path)}


def _db_ids(path: Path) -> list[int]:
    try:
        from ase.db import connect
    except ImportError:
        raise ConfigError(f"{path} is an ASE database: reading it needs the ase package (pip install ase)") from None
    with connect(str(path)) as db:
        return [int(r.id) for r in db.select()]


def _read(f: Path, row: str) -> Any:
    """A pymatgen Structure from a structure file (``row``: ASE database row id)."""
    if row:
        from ase.db import connect
        from pymatgen.io.ase import AseAtomsAdaptor

        with connect(str(f)) as db:
            atoms = db.get_atoms(id=int(row))
        if not all(atoms.pbc):
            raise ValueError(f"row {row} is not periodic in all three directions (pbc={atoms.pbc.tolist()})")
        return AseAtomsAdaptor.get_structure(atoms)
    if f.suffix == ".json":
        from pymatgen.core import Structure

        obj = json.loads(f.read_text())
        if not isinstance(obj, dict):
            raise ValueError(f"expected one pymatgen Structure.as_dict() object, got a JSON {type(obj).__name__} "
                             f"(many structures: one per line in a .jsonl file)")
        if "structure" in obj and isinstance(obj["structure"], dict):
            obj = obj["structure"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Structure.from_dict(obj)
    return read_structure_file(f)


def source_kind(cfg: PipelineConfig, path: Path) -> str:
    """How input ``path`` is read (``predict.source``, or guessed by ``auto``)."""
    kind = cfg.predict.source
    if kind != "auto":
        return kind
    if path.is_file() and path.suffix == ".jsonl":
        return "jsonl"
    if path.is_dir() and (path / cfg.data.id_prop).is_file():
        return "alignn"
    return "structures"


def open_input(cfg: PipelineConfig, path: str | Path) -> Any:
    """The reader of one input (raises :class:`ConfigError` naming the input when it cannot be read)."""
    path = Path(path)
    kind = source_kind(cfg, path)
    if kind != "jarvis" and not path.exists():
        raise ConfigError(f"predict input {path} does not exist")
    if kind == "structures":
        return StructureFiles(path, cfg)
    data = cfg.data.model_copy(update={"source": kind, "path": path,
                                       "min_distance": cfg.predict.min_distance or cfg.data.min_distance})
    return open_source(data)
