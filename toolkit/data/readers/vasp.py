"""VASP optics: ``vasprun.xml`` files of LOPTICS runs (pymatgen's Vasprun reader).

``data.path`` is one vasprun file or a folder searched recursively for ``vasprun.xml*``. The
frequency-dependent dielectric function is orientation-averaged (ε = (ε_xx + ε_yy + ε_zz)/3 for the
real and imaginary parts), converted to α(E) = 2ωκ/c (cm^-1) and resampled onto the target grid.
Rows that VASP wrote as overflow (``*****``, read as NaN) are masked and counted in
``provenance["nan_rows"]``; a run without LOPTICS (e.g. DFPT/LEPSILON only, whose dielectric block
is not the optical response) or without a dielectric function is rejected with the reason.
The material id is the file's path relative to ``data.path`` (``vasprun.xml`` -> its folder,
``vasprun.xml.<tag>`` -> ``<tag>``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from toolkit.config import DataConfig
from toolkit.data.readers.common import (
    build_material,
    duplicate_rejects,
    reason,
    spectrum_from_alpha,
)
from toolkit.data.records import Material, Reject
from toolkit.data.spectra import alpha_from_eps

log = logging.getLogger(__name__)


def vasprun_id(rel: Path) -> str:
    """Material id of a vasprun at relative path ``rel``."""
    name = rel.name
    if name.startswith("vasprun.xml."):
        tag = name[len("vasprun.xml."):]
        tag = tag[:-3] if tag.endswith(".gz") else tag
        return str(rel.parent / tag) if str(rel.parent) != "." else tag
    if str(rel.parent) != ".":
        return rel.parent.as_posix()
    return rel.stem


def orientation_average(energy: np.ndarray, real: np.ndarray, imag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """α(E) in cm^-1 from (N, 6) ε1/ε2 tensors (xx yy zz xy yz zx), averaging the diagonal;
    returns (alpha, nan_row_mask)."""
    e1 = np.asarray(real, dtype=np.float64)[:, :3].mean(axis=1)
    e2 = np.asarray(imag, dtype=np.float64)[:, :3].mean(axis=1)
    nan_rows = ~(np.isfinite(e1) & np.isfinite(e2))
    alpha = alpha_from_eps(energy, e1, e2)
    alpha[nan_rows] = np.nan
    return alpha, nan_rows


def optics_target(cfg, energy: np.ndarray, real: np.ndarray, imag: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, str | None]:
    """The target of ``data.target`` from (N, 6) ε1/ε2 tensors: the absorption spectrum (α from the
    orientation average), or for ``kind: dielectric`` the orientation-averaged ε1 and/or ε2 heads on the
    grid. Returns (values or None, nan_row_mask, reject reason or None)."""
    from toolkit.data.readers.common import target_values

    if cfg.target.kind == "absorption":
        alpha, nan_rows = orientation_average(energy, real, imag)
        return spectrum_from_alpha(cfg, energy, alpha), nan_rows, None
    if cfg.target.kind != "dielectric":
        return None, np.zeros(len(energy), bool), reason(
            "wrong target kind", f"optics files give absorption or dielectric targets, not {cfg.target.kind!r}")
    e1 = np.asarray(real, dtype=np.float64)[:, :3].mean(axis=1)
    e2 = np.asarray(imag, dtype=np.float64)[:, :3].mean(axis=1)
    nan_rows = ~(np.isfinite(e1) & np.isfinite(e2))
    keep = ~nan_rows
    heads = {"epsilon_1": e1[keep].tolist(), "epsilon_2": e2[keep].tolist()}
    names = cfg.target.names or ["epsilon_2"]
    vals, problem = target_values(cfg, {k: heads[k] for k in names}, energy[keep].tolist())
    return vals, nan_rows, problem


class VaspSource:
    """Reader for vasprun.xml files with a LOPTICS dielectric function."""

    name = "vasp"

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.path = Path(cfg.path)
        self.root = self.path if self.path.is_dir() else self.path.parent

    def _files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.rglob("vasprun.xml*") if p.is_file())

    def scan(self) -> tuple[list[str], list[Reject]]:
        rels = [p.relative_to(self.root).as_posix() for p in self._files()]
        ids = [vasprun_id(Path(r)) for r in rels]
        keep, rejects = duplicate_rejects(ids, str(self.root), rels)
        return [rels[k] for k in keep], rejects

    def load(self, keys: list[str]) -> Iterator[Material | Reject]:
        from pymatgen.io.vasp import Vasprun

        for key in keys:
            path = self.root / key
            src = str(path)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    vr = Vasprun(str(path), parse_dos=False, parse_eigen=False, parse_projected_eigen=False,
                                 parse_potcar_file=False)
            except Exception as e:  # noqa: BLE001 - any parser failure is a per-record reject
                yield Reject(src, key, reason("unreadable vasprun.xml", f"{type(e).__name__}: {e}"))
                continue
            loptics = bool(vr.parameters.get("LOPTICS", False))
            energy, real, imag = (np.asarray(x, dtype=np.float64) for x in vr.dielectric) if vr.dielectric else (
                np.empty(0), np.empty((0, 6)), np.empty((0, 6)))
            if not loptics:
                extra = " (LEPSILON/DFPT run: only the static dielectric tensor is meaningful)" \
                    if vr.parameters.get("LEPSILON") else ""
                yield Reject(src, key, reason("no frequency-dependent optics", f"LOPTICS is not set{extra}"))
                continue
            if energy.size < 2 or real.shape != (energy.size, 6) or imag.shape != (energy.size, 6):
                yield Reject(src, key, reason("no dielectric function", "no <dielectricfunction> block with 6 tensor components"))
                continue
            nan_rows = ~(np.isfinite(real[:, :3]).all(1) & np.isfinite(imag[:, :3]).all(1))
            if nan_rows.all():
                yield Reject(src, key, reason("no finite optics", "every row of the dielectric function is NaN/overflow"))
                continue
            spectrum, nan_rows, problem = optics_target(self.cfg, energy, real, imag)
            if problem:
                yield Reject(src, key, problem)
                continue
            if nan_rows.any():
                log.warning("%s: %d dielectric-function rows are NaN/overflow (%.3g-%.3g eV); %d grid points masked",
                            src, int(nan_rows.sum()), float(energy[nan_rows].min()), float(energy[nan_rows].max()),
                            int(np.isnan(spectrum).sum()))
            prov = {"nan_rows": int(nan_rows.sum()),
                    "nan_energy_range_eV": [float(energy[nan_rows].min()), float(energy[nan_rows].max())]
                    if nan_rows.any() else None,
                    "n_masked_grid_points": int(np.isnan(spectrum).sum()),
                    "source_energy_range_eV": [float(energy.min()), float(energy.max())]}
            yield build_material(self.cfg, id=vasprun_id(Path(key)), structure=vr.final_structure,
                                 spectrum=spectrum, source_file=src, record=key, source=self.name, provenance=prov)

    def metadata(self) -> dict:
        return {"source": self.name, "path": str(self.path), "units": "eV", "transform": self.cfg.transform,
                "log_floor": self.cfg.log_floor,
                "conversion": "alpha = 2*omega*kappa/c from the orientation-averaged (xx+yy+zz)/3 dielectric function"}
