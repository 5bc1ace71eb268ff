"""Canonical records passed from the readers to the prepare stage, and the rejects file.

A reader yields :class:`Material` for every valid record and :class:`Reject` for every record it
cannot use (never raising on one bad record, never dropping one silently). Rejects are written to
``prepare/rejects.csv`` with the columns ``source_file,record,reason``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from pymatgen.core import Structure

REJECT_COLUMNS = ("source_file", "record", "reason")


@dataclass
class Material:
    """One material on the dataset's target grid.

    ``spectrum`` is on the target energy grid (eV), in the dataset's transform (log10 of the
    absorption coefficient in cm^-1, floored, by default), NaN where the source does not cover the
    grid; ``None`` for structure-only records. ``properties`` holds scalars such as ``direct_gap``
    / ``indirect_gap`` (eV), ``target`` (single-value ALIGNN tables) or the benchmark's factors.
    """

    id: str
    structure: Structure
    formula: str
    spectrum: np.ndarray | None
    source: str
    provenance: dict = field(default_factory=dict)
    properties: dict = field(default_factory=dict)


@dataclass
class Reject:
    """A record that could not be used: the file it came from, the record within it, and why.

    ``reason`` is ``"<kind>: <specifics>"``: a fixed kind text first (no ids, file names or numbers;
    prepare counts rejects per kind, the text before the first colon), then what is specific to the
    record (see :func:`toolkit.data.readers.common.reason`)."""

    source_file: str
    record: str
    reason: str


def write_rejects(path: str | os.PathLike, rejects: Iterable[Reject]) -> int:
    """Write rejects as CSV (header ``source_file,record,reason``) atomically; returns the count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    n = 0
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(REJECT_COLUMNS)
        for r in rejects:
            w.writerow([r.source_file, r.record, r.reason])
            n += 1
    os.replace(tmp, p)
    return n


def read_rejects(path: str | os.PathLike) -> list[Reject]:
    """Read a rejects CSV written by :func:`write_rejects`."""
    with Path(path).open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or tuple(rows[0]) != REJECT_COLUMNS:
        raise ValueError(f"{path}: not a rejects file (expected header {','.join(REJECT_COLUMNS)})")
    return [Reject(*row) for row in rows[1:]]
