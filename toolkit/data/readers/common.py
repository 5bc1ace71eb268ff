"""Checks and helpers shared by the readers: structure validation, value validation, transforms."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure

from toolkit.config import DataConfig
from toolkit.data.records import Material, Reject
from toolkit.data.spectra import apply_transform, energy_grid, resample


def target_grid(cfg: DataConfig) -> np.ndarray:
    """The dataset's target energy grid (eV)."""
    return energy_grid(cfg.grid.start, cfg.grid.stop, cfg.grid.num)


def structure_problem(structure: Structure, min_distance: float) -> str | None:
    """Why a structure cannot be used, or None: empty cell, degenerate lattice, non-finite
    coordinates, or two atoms (periodic images included) closer than ``min_distance`` Å.

    Uses pymatgen's neighbour list (C implementation), not a Python loop over pairs."""
    if len(structure) == 0:
        return "empty cell: structure has no atoms"
    vol = float(structure.lattice.volume)
    if not np.isfinite(vol) or vol < 1e-3:
        return f"degenerate lattice: cell volume {vol:.3g} Å^3"
    if not np.all(np.isfinite(structure.frac_coords)):
        return "non-finite atomic coordinates"
    centers, neighbors, _, dists = structure.get_neighbor_list(r=min_distance)
    if len(dists):
        k = int(np.argmin(dists))
        i, j = int(centers[k]), int(neighbors[k])
        what = "a periodic image of itself" if i == j else f"atom {j} ({structure[j].species_string})"
        return (f"overlapping atoms: atom {i} ({structure[i].species_string}) is {dists[k]:.3f} Å from "
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
        return f"{what}: {int(bad.sum())} non-finite value(s) (NaN/inf), first at column {i + 1}"
    neg = v < 0
    if neg.any():
        i = int(np.argmax(neg))
        return f"{what}: {int(neg.sum())} negative value(s), first at column {i + 1} ({v[i]:g})"
    return None


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


def duplicate_rejects(ids: list[str], source_file: str, records: list[str]) -> tuple[list[int], list[Reject]]:
    """Positions to keep (first occurrence of each id) and a Reject for every later duplicate."""
    seen: dict[str, str] = {}
    keep: list[int] = []
    rejects: list[Reject] = []
    for k, (i, rec) in enumerate(zip(ids, records)):
        if i in seen:
            rejects.append(Reject(source_file, rec, f"duplicate id {i!r} (first seen at {seen[i]})"))
        else:
            seen[i] = rec
            keep.append(k)
    return keep, rejects
