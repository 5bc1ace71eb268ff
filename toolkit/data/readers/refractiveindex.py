"""refractiveindex.info YAML: measured n, k of bulk and film samples as reference spectra.

These files have no crystal structure, so they are *reference spectra* for comparison with
experiment, not training records on their own:

* :func:`read_refractiveindex` reads one ``.../<material>/nk/<page>.yml`` (``tabulated nk``, or
  ``tabulated k`` together with ``tabulated n`` / a formula for n) into a :class:`ReferenceSpectrum`:
  E = hc/λ (eV), α = 4πk/λ (cm^-1), sorted by energy; negative k (measurement artefacts) are
  masked as NaN and counted in ``metadata["n_negative_k_masked"]``.
* :func:`load_references` reads a whole database folder; :func:`match_references` pairs them with
  dataset materials by reduced formula.
* ``source: refractiveindex`` in prepare needs ``data.structures`` (a JSON Lines file, format of
  :mod:`toolkit.data.readers.jsonl`); each structure whose reduced formula has a usable reference
  becomes a Material with that reference's α on the target grid (NaN outside the measured range);
  the reference covering most grid points wins (ties: file path order), the others are listed in
  ``provenance["alternatives"]``. Structures without a reference and references without a
  structure are rejected, as are files whose k is identically 0 (no absorption data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import yaml
from pymatgen.core import Composition

from toolkit.config import ConfigError, DataConfig
from toolkit.data.readers.common import (
    build_material,
    reason,
    spectrum_from_alpha,
    target_grid,
    target_values,
)
from toolkit.data.readers.jsonl import JsonlSource
from toolkit.data.records import Material, Reject
from toolkit.data.spectra import alpha_from_k, energy_from_wavelength_um, resample

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class ReferenceSpectrum:
    """A measured absorption spectrum: ``energy`` (eV, ascending), ``alpha`` (cm^-1)."""

    material: str  # the database's material folder name, e.g. "ZnS"
    formula: str  # reduced formula ("" if the name is not a formula)
    energy: np.ndarray
    alpha: np.ndarray
    metadata: dict = field(default_factory=dict)
    n: np.ndarray | None = None  # refractive index on ``energy`` (pages with 'tabulated nk'), else None
    k: np.ndarray | None = None  # extinction coefficient on ``energy`` (NaN = masked)

    def dielectric(self) -> dict[str, np.ndarray] | None:
        """ε1 = n² − k², ε2 = 2nk on ``energy`` (None without n)."""
        if self.n is None or self.k is None:
            return None
        return {"epsilon_1": self.n ** 2 - self.k ** 2, "epsilon_2": 2.0 * self.n * self.k}


def _table(block: dict, cols: int) -> np.ndarray:
    vals = np.array(str(block.get("data", "")).split(), dtype=np.float64)
    if vals.size == 0 or vals.size % cols:
        raise ValueError(f"'{block.get('type')}' data is not a table of {cols} columns")
    return vals.reshape(-1, cols)


def read_refractiveindex(path: str | Path) -> ReferenceSpectrum:
    """Read one refractiveindex.info YAML page; raises ValueError saying what is unusable."""
    p = Path(path)
    doc = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)
    if not isinstance(doc, dict) or not isinstance(doc.get("DATA"), list):
        raise ValueError("no DATA list")
    wl_k = None
    n_of = None
    for block in doc["DATA"]:
        kind = str(block.get("type", ""))
        if kind == "tabulated nk":
            t = _table(block, 3)
            wl_k = (t[:, 0], t[:, 2])
            n_of = t[:, 1]
        elif kind == "tabulated k":
            t = _table(block, 2)
            wl_k = (t[:, 0], t[:, 1])
    if wl_k is None:
        raise ValueError("no extinction coefficient (needs 'tabulated nk' or 'tabulated k')")
    wl, k = wl_k
    ok = np.isfinite(wl) & np.isfinite(k) & (wl > 0)
    wl, k = wl[ok], k[ok]
    n_of = n_of[ok] if n_of is not None else None
    if wl.size < 2:
        raise ValueError("fewer than 2 valid (wavelength, k) rows")
    negative = k < 0
    if negative.all():
        raise ValueError("every k value is negative")
    k = np.where(negative, np.nan, k)  # unphysical points are masked, never clipped
    energy = energy_from_wavelength_um(wl)
    order = np.argsort(energy, kind="stable")
    energy, k, negative = energy[order], k[order], negative[order]
    n_of = n_of[order] if n_of is not None else None
    material = p.parent.parent.name if p.parent.name == "nk" else p.stem
    try:
        formula = Composition(material).reduced_formula
    except Exception:  # noqa: BLE001 - folder names that are not formulas
        formula = ""
    cond = doc.get("CONDITIONS") or {}
    meta = {"file": str(p), "page": p.stem, "n_points": int(energy.size),
            "energy_range_eV": [float(energy[0]), float(energy[-1])], "k_all_zero": bool(np.all(k[np.isfinite(k)] == 0)),
            "n_negative_k_masked": int(negative.sum()),
            "direction": cond.get("direction"), "temperature_K": cond.get("temperature"),
            "comments": str(doc.get("COMMENTS") or "").strip()[:300],
            "references": str(doc.get("REFERENCES") or "").strip()[:500]}
    return ReferenceSpectrum(material, formula, energy, alpha_from_k(energy, k), meta, n_of, k)


def reference_files(folder: str | Path) -> list[Path]:
    """Every ``*/nk/*.yml`` page under ``folder`` (a database root, its data folder, or a material)."""
    root = Path(folder)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.yml") if p.parent.name == "nk")


def load_references(folder: str | Path) -> tuple[list[ReferenceSpectrum], list[Reject]]:
    """All readable pages under ``folder``; unusable ones (no k, k ≡ 0, malformed) are Rejects."""
    refs: list[ReferenceSpectrum] = []
    rejects: list[Reject] = []
    for p in reference_files(folder):
        rec = f"{p.parent.parent.name}/{p.stem}"
        try:
            ref = read_refractiveindex(p)
        except Exception as e:  # noqa: BLE001 - one bad page never stops the others
            rejects.append(Reject(str(p), rec, reason("unusable refractiveindex page", f"{type(e).__name__}: {e}")))
            continue
        if ref.metadata["k_all_zero"]:
            rejects.append(Reject(str(p), rec, reason("no absorption data", "k is identically 0")))
            continue
        if not ref.formula:
            rejects.append(Reject(str(p), rec, reason("not a chemical formula", f"material name {ref.material!r}")))
            continue
        refs.append(ref)
    return refs, rejects


def match_references(formulas: list[str], refs: list[ReferenceSpectrum]) -> dict[str, list[ReferenceSpectrum]]:
    """Reduced formula -> the references for it, for each formula that has any."""
    by: dict[str, list[ReferenceSpectrum]] = {}
    for r in refs:
        by.setdefault(r.formula, []).append(r)
    out: dict[str, list[ReferenceSpectrum]] = {}
    for f in formulas:
        red = Composition(f).reduced_formula
        if red in by:
            out[f] = by[red]
    return out


def best_reference(refs: list[ReferenceSpectrum], grid: np.ndarray) -> tuple[ReferenceSpectrum, list[ReferenceSpectrum]]:
    """The reference covering most points of ``grid`` (ties: first), and the others."""
    cover = [int(np.isfinite(resample(r.energy, r.alpha, grid)).sum()) for r in refs]
    i = int(np.argmax(cover))
    return refs[i], refs[:i] + refs[i + 1:]


class RefractiveIndexSource:
    """``source: refractiveindex``: structures from ``data.structures`` paired with reference α."""

    name = "refractiveindex"

    def __init__(self, cfg: DataConfig):
        if cfg.structures is None:
            raise ConfigError(
                "data.source='refractiveindex': refractiveindex.info files have no crystal structure; set "
                "data.structures to a JSON Lines file of structures to pair with them by reduced formula "
                "(or use toolkit.data.readers.refractiveindex.load_references for comparison only)")
        if not Path(cfg.structures).is_file():
            raise ConfigError(f"data.structures {cfg.structures} does not exist")
        self.cfg = cfg
        self.path = Path(cfg.path)
        self.structures = JsonlSource(cfg.model_copy(update={"source": "jsonl", "path": cfg.structures}))
        self._refs: dict[str, list[ReferenceSpectrum]] | None = None
        self._ref_rejects: list[Reject] = []

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_refs"] = None
        return state

    def _by_formula(self) -> dict[str, list[ReferenceSpectrum]]:
        if self._refs is None:
            refs, self._ref_rejects = load_references(self.path)
            self._refs = {}
            for r in refs:
                self._refs.setdefault(r.formula, []).append(r)
        return self._refs

    def scan(self) -> tuple[list[str], list[Reject]]:
        keys, rejects = self.structures.scan()
        by = self._by_formula()
        rejects = list(self._ref_rejects) + rejects
        kept, used = [], set()
        for m in self.structures.load(keys):
            if isinstance(m, Reject):
                rejects.append(m)
            elif m.formula in by:
                kept.append(m.id)
                used.add(m.formula)
            else:
                rejects.append(Reject(str(self.structures.path), m.provenance["record"],
                                      f"no refractiveindex.info reference for formula {m.formula}"))
        for formula, refs in sorted(by.items()):
            if formula not in used:
                rejects.extend(Reject(r.metadata["file"], f"{r.material}/{r.metadata['page']}",
                                      reason("no matching structure",
                                             f"no structure with formula {formula} in {self.cfg.structures}"))
                               for r in refs)
        return kept, rejects

    def load(self, keys: list[str]) -> Iterator[Material | Reject]:
        by = self._by_formula()
        grid = target_grid(self.cfg)
        for m in self.structures.load(keys):
            if isinstance(m, Reject):
                yield m
                continue
            refs = by.get(m.formula)
            if not refs:
                yield Reject(str(self.structures.path), m.id, f"no refractiveindex.info reference for formula {m.formula}")
                continue
            best, others = best_reference(refs, grid)
            if self.cfg.target.kind == "dielectric":  # ε1, ε2 from the measured n, k
                eps = best.dielectric()
                if eps is None:
                    yield Reject(best.metadata["file"], m.id, reason(
                        "no refractive index", f"{best.material}/{best.metadata['page']} has k without a tabulated n "
                                               f"on the same wavelengths: no dielectric function"))
                    continue
                ok = np.isfinite(eps["epsilon_2"])
                names = self.cfg.target.names or ["epsilon_2"]
                spectrum, problem = target_values(self.cfg, {h: eps[h][ok].tolist() for h in names},
                                                  best.energy[ok].tolist())
                if problem:
                    yield Reject(best.metadata["file"], m.id, problem)
                    continue
            else:
                spectrum = spectrum_from_alpha(self.cfg, best.energy, best.alpha)
            if not np.isfinite(spectrum).any():
                yield Reject(best.metadata["file"], m.id,
                             reason("spectrum outside grid",
                                    f"reference {best.material}/{best.metadata['page']} does not overlap the target grid"))
                continue
            prov = dict(m.provenance)
            prov.update({"reference": best.metadata["file"], "reference_comments": best.metadata["comments"],
                         "alternatives": [r.metadata["file"] for r in others]})
            yield build_material(self.cfg, id=m.id, structure=m.structure, spectrum=spectrum,
                                 source_file=best.metadata["file"], record=m.id, source=self.name,
                                 provenance=prov, properties=m.properties)

    def metadata(self) -> dict:
        return {"source": self.name, "path": str(self.path), "structures": str(self.cfg.structures),
                "units": "eV", "transform": self.cfg.transform, "log_floor": self.cfg.log_floor,
                "conversion": "alpha = 4*pi*k/lambda, E = hc/lambda; reference with the widest grid coverage"}
