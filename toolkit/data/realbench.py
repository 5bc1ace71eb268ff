"""The real-structure ground-truth benchmark: real crystal structures, spectra from planted rules.

``data.source: realbench``. The structures are real: the Materials Project set shipped with the
package (``toolkit/resources/mp_structures.jsonl.gz``, 822 structures, CC BY 4.0, attribution in
``toolkit/resources/mp_structures.NOTICE.md``) and, optionally, POSCAR folders given by path
(``data.realbench.paths``; nothing of them is copied into the package). The spectra are synthetic,
made by documented rules from *drivers* computed from each structure with pymatgen, so the
interpretation stages can be scored against the truth (docs/benchmark.md, "Real-structure benchmark").

Drivers (name: kind -> feature it acts on; descriptor names that express it):

1. ``anion_class``: categorical -> onset base A[anion class] (``anion:*``).
2. ``cation_chemistry``: cation chemistry -> onset shift, the strongest of lone-pair (-1.0 eV),
   d10 (-0.6 eV), d0 (-0.35 eV) cations present (``cation_class:lone_pair_p|d10|d0``).
3. ``octahedral_open_d``: coordination-specific -> an open-d (``partial_d``) cation in an octahedron
   adds a d-d / charge-transfer band 1.5 eV below the onset, under the onset threshold (``peak_1``).
4. ``bond_length_mean``: continuous -> onset shifts by -1.5 eV/Å x (bond_length_mean - 2.2 Å).
5. ``linear_bridges``: geometric -> the share of near-linear (>= 160 deg) cation-anion-cation
   bridges widens the absorption edge (``edge_integral``; ``bridge_linear_fraction``, ``angle_MXM_mean``).
6. ``polyanion``: structural unit -> a PO4 / SO4 / SiO4 tetrahedron pins the second band at a fixed
   energy (``peak_2``; ``polyanion:<unit>``).

Distractors (no effect, correlated with a driver): ``volume_per_atom`` and ``cn_mean`` (both grow
with ``bond_length_mean``).

Every material is computed from its structure and ``(seed, key)`` alone, so ``load(keys)`` of any
subset, in any order, in any process, returns identical records.
"""

from __future__ import annotations

import gzip
import json
import math
import warnings
import zlib
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.data.benchmark import ONSET_ANION, _soft_clamp, noise_floor
from toolkit.data.records import Material, Reject
from toolkit.data.spectra import (
    edge_integral,
    energy_grid,
    onset_energy,
    peak_positions,
)

# ---------------------------------------------------------------------------------------------
# Rules (all constants documented in docs/benchmark.md)
# ---------------------------------------------------------------------------------------------

#: anion element -> anion class (the descriptor family ``anion:<class>``)
ANION_CLASS = {"O": "oxide", "S": "sulfide", "Se": "selenide", "Te": "telluride", "N": "nitride",
               "F": "halide", "Cl": "halide", "Br": "halide", "I": "halide"}
#: onset base by anion class (eV): the prototype benchmark's values
ONSET_BASE = dict(ONSET_ANION)
#: onset shift of the strongest cation class present (eV); other classes shift nothing
CATION_SHIFT = {"lone_pair_p": -1.0, "d10": -0.6, "d0": -0.35}
#: onset slope with the mean bond length (eV/Å) and reference length (Å)
BOND_SLOPE, BOND_REF = 1.5, 2.2
#: edge width w = EDGE_W0 + EDGE_W_LINEAR * bridge_linear_fraction (eV)
EDGE_W0, EDGE_W_LINEAR = 0.35, 0.9
#: near-linear bridge: cation-anion-cation angle at least this (deg; the descriptor bridge_linear_fraction)
LINEAR_ANGLE = 160.0
#: main band: E0 + MAIN_OFFSET (eV), height (decades), Gaussian sigma (eV)
MAIN_OFFSET, MAIN_HEIGHT, MAIN_WIDTH = 2.0, 0.7, 0.6
#: second band: E0 + SECOND_OFFSET without a polyanion; at POLYANION_PEAK[unit] with one
SECOND_OFFSET, SECOND_HEIGHT, SECOND_WIDTH = 4.5, 0.6, 0.7
POLYANION_PEAK = {"SiO4": 12.0, "PO4": 12.8, "SO4": 13.6}
#: d-d / charge-transfer band of an octahedral open-d cation: E0 - CT_OFFSET, height, sigma
CT_OFFSET, CT_HEIGHT, CT_WIDTH = 1.5, 0.8, 0.35
#: edge height (decades) and onset clamp (eV), as in the prototype benchmark
EDGE_HEIGHT, ONSET_MIN, ONSET_MAX = 3.5, 0.8, 9.0

#: the per-material planted values (Material.properties keys; the store's benchmark/<factor>)
FACTORS = ("set", "anion", "anion_element", "cation_chemistry", "cation_shift", "cation_classes",
           "octahedral_open_d", "open_d_cation", "bond_length_mean", "bridge_linear_fraction", "angle_MXM_mean",
           "polyanion", "polyanion_units", "cn_mean", "density", "volume_per_atom", "onset_param", "edge_width", "ct_peak", "main_peak",
           "second_peak", "onset", "edge_integral", "peak_1", "peak_2")

PACKAGED_FILE = "mp_structures.jsonl.gz"
MP_SET = "mp"


def _data_cfg(cfg: Any) -> Any:
    return cfg.data if hasattr(cfg, "data") else cfg


# ---------------------------------------------------------------------------------------------
# Structures
# ---------------------------------------------------------------------------------------------

def packaged_path() -> Path:
    """Path of the shipped Materials Project structure file."""
    return Path(str(resources.files("toolkit") / "resources" / PACKAGED_FILE))


@lru_cache(maxsize=1)
def packaged_records() -> tuple[dict, ...]:
    """The shipped MP records ``{"material_id", "formula", "lattice", "species", "frac_coords"}``, in file order."""
    with gzip.open(packaged_path(), "rt") as fh:
        return tuple(json.loads(line) for line in fh if line.strip())


@lru_cache(maxsize=1)
def _packaged_index() -> dict[str, dict]:
    return {r["material_id"]: r for r in packaged_records()}


@lru_cache(maxsize=1)
def _excluded() -> tuple[str, ...]:
    """Packaged MP ids without an anion element (not part of the benchmark)."""
    return tuple(r["material_id"] for r in packaged_records() if not _has_anion(set(r["species"])))


def _structure_of(rec: dict):
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(rec["lattice"]), rec["species"], rec["frac_coords"])


def _has_anion(symbols: set[str]) -> bool:
    return bool(symbols & set(ANION_CLASS)) and len(symbols) > 1


def _poscar_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and (p.name.startswith(("POSCAR", "CONTCAR")) or p.suffix.lower() == ".vasp"))


# ---------------------------------------------------------------------------------------------
# Drivers of one structure
# ---------------------------------------------------------------------------------------------

def planted_drivers(structure) -> dict[str, Any]:
    """The planted driver values of one pymatgen Structure (raises ValueError without an anion).

    Reuses the definitions of the analyze stage's descriptors: oxidation states, cation classes and
    polyanion units from :mod:`toolkit.analyze.chemistry` (bond valence, then charge balance), the
    minimum-distance neighbour rule (``MinimumDistanceNN(tol=0.2)``,
    :func:`toolkit.analyze.descriptors.min_distance_edges`), bridge angles
    (:func:`~toolkit.analyze.descriptors._angles_within`) and pymatgen's ``LocalStructOrderParams``
    polyhedra (:func:`~toolkit.analyze.descriptors._polyhedron`)."""
    from pymatgen.analysis.local_env import LocalStructOrderParams
    from pymatgen.core import Element, Lattice, Structure

    from toolkit.analyze import chemistry as C
    from toolkit.analyze import descriptors as D

    syms = np.array([sp.symbol for sp in structure.species])
    present = set(syms.tolist())
    anion_els = sorted((el for el in present if el in ANION_CLASS), key=lambda e: -Element(e).X)
    if not anion_els or len(present) < 2:
        raise ValueError("no anion: the structure holds none of O, S, Se, Te, N, F, Cl, Br, I next to a cation")
    anion_el = anion_els[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oxi = C.oxidation_states(structure)
    if oxi.ok:
        anions, cations = oxi.anions(), oxi.cations() - oxi.anions()
        states = {el: sorted({round(v) for v in oxi.states.get(el, []) if v > 0}) for el in cations}
    else:
        anions, cations = {anion_el}, present - {anion_el}
        states = {el: [] for el in cations}
    if not cations:
        raise ValueError("no cation: every element is an anion")
    classes: dict[str, set[str]] = {}
    for el in sorted(cations):
        cs: set[str] = set()
        for st in states[el] or [None]:
            cs.update(C.cation_classes(Element(el), st))
        classes[el] = cs
    all_classes = sorted({c for cs in classes.values() for c in cs})
    shifts = [(CATION_SHIFT[c], c) for c in all_classes if c in CATION_SHIFT]
    shift, chem = min(shifts) if shifts else (0.0, "none")

    centre, nbr, vecs = D.min_distance_edges(structure)
    dist = np.linalg.norm(vecs, axis=1)
    if not len(dist):
        raise ValueError("no neighbours found")
    is_anion = np.isin(syms, sorted(anions))
    is_cation = np.isin(syms, sorted(cations))
    deg = np.bincount(centre, minlength=len(syms))
    cn = deg[is_cation & (deg > 0)]
    bridge = is_anion[centre] & is_cation[nbr]
    ang = D._angles_within(centre[bridge], vecs[bridge])
    lin = float(np.mean(ang >= LINEAR_ANGLE)) if len(ang) else 0.0
    mxm = float(np.mean(ang)) if len(ang) else float("nan")

    # octahedral open-d cation: a partial_d cation site whose neighbour shell is an octahedron
    open_d = ""
    lop = None
    for i in np.flatnonzero(np.isin(syms, [el for el, cs in classes.items() if "partial_d" in cs])):
        own = centre == i
        v = vecs[own]
        if len(v) != 6:
            continue
        lop = lop or LocalStructOrderParams(["tet", "sq_plan", "oct", "bcc", "tri_plan"])
        local = Structure(Lattice.cubic(100.0), [syms[i], *syms[nbr[own]]],
                          np.vstack([[50.0, 50.0, 50.0], 50.0 + v]), coords_are_cartesian=True)
        poly = D._polyhedron(lop, local, 6, v)
        if (poly[0] if isinstance(poly, tuple) else poly) == "octahedral":
            open_d = str(syms[i])
            break

    # polyanion units (toolkit.analyze.chemistry.polyanions); the planted ones: SiO4, PO4, SO4
    units, _, _ = C.polyanions(syms, centre, nbr, dist, anions, oxi.site if oxi.ok else None)
    planted = [u for u in POLYANION_PEAK if u in units]
    return {
        "anion": ANION_CLASS[anion_el], "anion_element": anion_el, "cation_chemistry": chem,
        "cation_shift": float(shift), "cation_classes": ",".join(all_classes),
        "octahedral_open_d": float(bool(open_d)), "open_d_cation": open_d,
        "bond_length_mean": float(np.mean(dist)), "bridge_linear_fraction": lin, "angle_MXM_mean": mxm,
        "polyanion": planted[0] if planted else "none", "polyanion_units": ",".join(sorted(units)),
        "cn_mean": float(np.mean(cn)) if len(cn) else float("nan"),
        "density": float(structure.density), "volume_per_atom": float(structure.volume / len(structure)),
    }


# ---------------------------------------------------------------------------------------------
# Spectrum
# ---------------------------------------------------------------------------------------------

def spectral_parameters(drivers: dict[str, Any]) -> dict[str, float]:
    """Onset E0, edge width w and band positions (eV) from the planted drivers."""
    raw = ONSET_BASE[drivers["anion"]] + drivers["cation_shift"] - BOND_SLOPE * (drivers["bond_length_mean"] - BOND_REF)
    e0 = _soft_clamp(raw, ONSET_MIN, ONSET_MAX)
    w = EDGE_W0 + EDGE_W_LINEAR * drivers["bridge_linear_fraction"]
    poly = drivers["polyanion"]
    return {"onset_param": float(e0), "edge_width": float(w),
            "ct_peak": float(e0 - CT_OFFSET) if drivers["octahedral_open_d"] else float("nan"),
            "main_peak": float(e0 + MAIN_OFFSET),
            "second_peak": float(POLYANION_PEAK[poly] if poly in POLYANION_PEAK else e0 + SECOND_OFFSET)}


def clean_spectrum(energy: np.ndarray, params: dict[str, float], *, threshold: float = 4.0,
                   log_floor: float = 2.0) -> np.ndarray:
    """Noise-free log10 α: floor + H σ((E − E0)/w + s0) + main band + second band (+ CT band)."""
    frac = min(max((threshold - log_floor) / EDGE_HEIGHT, 0.05), 0.95)
    s0 = math.log(frac / (1 - frac))
    x = (energy - params["onset_param"]) / params["edge_width"] + s0
    y = log_floor + EDGE_HEIGHT / (1.0 + np.exp(-np.clip(x, -60, 60)))
    y = y + MAIN_HEIGHT * np.exp(-0.5 * ((energy - params["main_peak"]) / MAIN_WIDTH) ** 2)
    y = y + SECOND_HEIGHT * np.exp(-0.5 * ((energy - params["second_peak"]) / SECOND_WIDTH) ** 2)
    if np.isfinite(params.get("ct_peak", float("nan"))):
        y = y + CT_HEIGHT * np.exp(-0.5 * ((energy - params["ct_peak"]) / CT_WIDTH) ** 2)
    return y


def _key_seed(key: str) -> int:
    return zlib.crc32(key.encode())


def make_material(cfg: Any, key: str, structure, set_name: str, provenance: dict,
                  energy: np.ndarray | None = None) -> Material:
    """The benchmark Material of ``structure`` (raises ValueError when it has no anion/cation)."""
    dc = _data_cfg(cfg)
    rc = dc.realbench
    if energy is None:
        energy = energy_grid(dc.grid.start, dc.grid.stop, dc.grid.num)
    drivers = planted_drivers(structure)
    params = spectral_parameters(drivers)
    clean = clean_spectrum(energy, params, threshold=dc.onset_threshold, log_floor=dc.log_floor)
    rng = np.random.default_rng([rc.seed, _key_seed(key)])
    observed = clean + rng.normal(0.0, rc.noise, size=clean.shape) if rc.noise > 0 else clean
    if dc.transform == "alpha":
        observed = 10.0 ** observed
    on = float(onset_energy(energy, clean, dc.onset_threshold))
    pk = peak_positions(energy, clean)
    props = {"set": set_name, **drivers, **params, "onset": on,
             "edge_integral": float(edge_integral(energy, clean, on, log_floor=dc.log_floor)),
             "peak_1": float(pk[0]), "peak_2": float(pk[1])}
    return Material(id=key, structure=structure, formula=structure.composition.reduced_formula,
                    spectrum=observed.astype(np.float32), source="realbench", provenance=provenance,
                    properties=props)


# ---------------------------------------------------------------------------------------------
# Truth
# ---------------------------------------------------------------------------------------------

DRIVERS: dict[str, dict[str, Any]] = {
    "anion_class": {
        "kind": "categorical", "type": "categorical", "features": ["onset"], "factor": "anion",
        "descriptors": ["anion:*"], "defined_by": ["anion:*"], "combine": "any", "baseline": [],
        "rule": "onset base A[anion class] of the most electronegative anion element (eV): " + json.dumps(ONSET_BASE)},
    "cation_chemistry": {
        "kind": "cation chemistry", "type": "categorical", "features": ["onset"], "factor": "cation_chemistry",
        "descriptors": ["cation_class:lone_pair_p", "cation_class:d10", "cation_class:d0"],
        "defined_by": ["cation_class:lone_pair_p", "cation_class:d10", "cation_class:d0"], "combine": "any",
        "baseline": ["none"],
        "rule": "onset shift of the strongest cation class present (oxidation states and cation classes of "
                "toolkit.analyze.chemistry: bond valence, then charge balance): " + json.dumps(CATION_SHIFT) + " eV"},
    "octahedral_open_d": {
        "kind": "coordination", "type": "categorical", "features": ["peak_1"], "factor": "octahedral_open_d",
        "descriptors": ["cation_class:partial_d", "coordination:octahedral"],
        "defined_by": ["cation_class:partial_d", "coordination:octahedral"], "combine": "all", "baseline": [0.0],
        "rule": f"a partial_d cation with an octahedral first shell adds a d-d/charge-transfer band at "
                f"E0 - {CT_OFFSET} eV (height {CT_HEIGHT} decades, sigma {CT_WIDTH} eV), below the onset threshold"},
    "bond_length_mean": {
        "kind": "continuous", "type": "continuous", "features": ["onset"], "factor": "bond_length_mean",
        "descriptors": ["bond_length_mean"], "defined_by": ["bond_length_mean"],
        "rule": f"onset shift -{BOND_SLOPE} eV/A x (bond_length_mean - {BOND_REF} A); bond_length_mean = mean "
                "length of every minimum-distance neighbour bond (MinimumDistanceNN tol 0.2)"},
    "linear_bridges": {
        "kind": "geometric", "type": "continuous", "features": ["edge_integral"], "factor": "bridge_linear_fraction",
        "descriptors": ["bridge_linear_fraction", "angle_MXM_mean"],
        "defined_by": ["bridge_linear_fraction", "angle_MXM_mean"],
        "rule": f"edge width w = {EDGE_W0} + {EDGE_W_LINEAR} x bridge_linear_fraction eV; bridge_linear_fraction = "
                f"share of cation-anion-cation angles >= {LINEAR_ANGLE} deg at anion centres (minimum-distance bonds)"},
    "polyanion": {
        "kind": "structural unit", "type": "categorical", "features": ["peak_2"], "factor": "polyanion",
        "descriptors": [f"polyanion:{u}" for u in POLYANION_PEAK],
        "defined_by": [f"polyanion:{u}" for u in POLYANION_PEAK], "combine": "any", "baseline": ["none"],
        "rule": f"a SiO4 / PO4 / SO4 unit (toolkit.analyze.chemistry.polyanions on minimum-distance bonds; the "
                f"first of SiO4, PO4, SO4 present) pins the second band at a fixed energy {json.dumps(POLYANION_PEAK)} "
                f"eV (else E0 + {SECOND_OFFSET} eV); other units (CO3, MoO4, ...) have no effect"},
}

DISTRACTORS: dict[str, dict[str, Any]] = {
    "volume_per_atom": {"type": "continuous", "factor": "volume_per_atom", "descriptors": ["volume_per_atom"],
                        "correlated_with": "bond_length_mean", "rule": "no effect on any spectrum; grows with the "
                        "bond lengths (Spearman 0.82 with bond_length_mean over the packaged set)"},
    "cn_mean": {"type": "continuous", "factor": "cn_mean", "descriptors": ["cn_mean"],
                "correlated_with": "bond_length_mean", "rule": "no effect on any spectrum; mean cation coordination "
                "number, larger for longer bonds (Spearman 0.45 with bond_length_mean)"},
}


def realbench_truth(cfg: Any) -> dict:
    """The ground truth for the dataset attribute ``benchmark_truth`` (docs/benchmark.md)."""
    dc = _data_cfg(cfg)
    rc = dc.realbench
    features: dict[str, dict[str, Any]] = {}
    for name, d in DRIVERS.items():
        for f in d["features"]:
            features.setdefault(f, {"drivers": [], "primary": [], "driver_names": []})
            features[f]["primary"].extend(d["descriptors"])
            features[f]["driver_names"].append(name)
    onset_drivers = [*DRIVERS["anion_class"]["descriptors"], *DRIVERS["cation_chemistry"]["descriptors"],
                     "bond_length_mean"]
    features["onset"]["drivers"] = list(onset_drivers)
    features["edge_integral"]["drivers"] = [*DRIVERS["linear_bridges"]["descriptors"], *onset_drivers]
    features["peak_1"]["drivers"] = [*DRIVERS["octahedral_open_d"]["descriptors"], *onset_drivers]
    features["peak_2"]["drivers"] = [*DRIVERS["polyanion"]["descriptors"], *DRIVERS["octahedral_open_d"]["descriptors"],
                                     *onset_drivers]
    rules = {
        "onset": f"E0 = A[anion] + C[strongest cation class] - {BOND_SLOPE} eV/A (bond_length_mean - {BOND_REF} A), "
                 f"soft-clamped to [{ONSET_MIN}, {ONSET_MAX}] eV",
        "edge_integral": f"edge width w = {EDGE_W0} + {EDGE_W_LINEAR} bridge_linear_fraction (eV)",
        "peak_1": f"first band: the CT band E0 - {CT_OFFSET} eV of an octahedral open-d cation, else E0 + {MAIN_OFFSET} eV",
        "peak_2": f"second band: POLYANION_PEAK[unit] with a PO4/SO4/SiO4 unit, else E0 + {SECOND_OFFSET} eV "
                  "(the main band E0 + 2 eV when a CT band comes first)",
    }
    for f, r in rules.items():
        features[f]["rule"] = r
    return {
        "version": 1, "kind": "realbench", "seed": rc.seed, "noise": rc.noise, "noise_floor": noise_floor(rc.noise),
        "noise_model": "additive Gaussian N(0, noise^2) on log10(alpha) at every grid point, after the floor",
        "sets": {"mp": bool(rc.mp), "max_materials": rc.max_materials, "paths": [str(p) for p in rc.paths]},
        "features": features,
        "drivers": json.loads(json.dumps(DRIVERS)),
        "distractors": json.loads(json.dumps(DISTRACTORS)),
        "parameters": {
            "onset_anion_eV": ONSET_BASE, "cation_shift_eV": CATION_SHIFT, "bond_slope_eV_per_A": BOND_SLOPE,
            "bond_ref_A": BOND_REF, "edge_width_eV": [EDGE_W0, EDGE_W_LINEAR], "linear_angle_deg": LINEAR_ANGLE,
            "main_band": [MAIN_OFFSET, MAIN_HEIGHT, MAIN_WIDTH], "second_band": [SECOND_OFFSET, SECOND_HEIGHT, SECOND_WIDTH],
            "polyanion_peak_eV": POLYANION_PEAK,
            "ct_band": [CT_OFFSET, CT_HEIGHT, CT_WIDTH], "edge_height_decades": EDGE_HEIGHT,
            "onset_clamp_eV": [ONSET_MIN, ONSET_MAX],
        },
        "attribution": "structures of the Materials Project (CC BY 4.0), see toolkit/resources/mp_structures.NOTICE.md",
        "factors": list(FACTORS),
    }


# ---------------------------------------------------------------------------------------------
# Source
# ---------------------------------------------------------------------------------------------

class RealBenchSource:
    """``source: realbench``: keys ``mp-<id>`` of the packaged set (those with an anion element), then
    ``path<j>/<relative file>`` of every POSCAR folder in ``data.realbench.paths``; ``max_materials``
    keeps the first N keys."""

    name = "realbench"

    def __init__(self, cfg: Any):
        self.cfg = _data_cfg(cfg)

    def scan(self) -> tuple[list[str], list[Reject]]:
        from toolkit.config import ConfigError

        rc = self.cfg.realbench
        keys: list[str] = []
        rejects: list[Reject] = []
        if rc.mp:  # MP entries without an anion element are outside the benchmark (metadata: excluded)
            keys.extend(r["material_id"] for r in packaged_records() if _has_anion(set(r["species"])))
        for j, folder in enumerate(rc.paths):
            folder = Path(folder)
            if not folder.is_dir():
                raise ConfigError(f"data.realbench.paths[{j}] = {folder} is not a folder of POSCAR files")
            keys.extend(f"path{j}/{p.relative_to(folder).as_posix()}" for p in _poscar_files(folder))
        if rc.max_materials is not None:
            keys = keys[: rc.max_materials]
        return keys, rejects

    def _structure(self, key: str) -> tuple[Any, str, dict]:
        if key.startswith("path") and "/" in key:
            j = int(key[4:key.index("/")])
            path = Path(self.cfg.realbench.paths[j]) / key[key.index("/") + 1:]
            from pymatgen.io.vasp import Poscar

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = Poscar.from_file(str(path), check_for_potcar=False).structure
            return s, f"path{j}", {"file": str(path), "record": key}
        rec = _packaged_index().get(key)
        if rec is None:
            raise KeyError(f"{key!r} is not in the packaged Materials Project set")
        return _structure_of(rec), MP_SET, {"file": PACKAGED_FILE, "record": key, "material_id": key}

    def load(self, keys: list[str]) -> Iterator[Material | Reject]:
        energy = energy_grid(self.cfg.grid.start, self.cfg.grid.stop, self.cfg.grid.num)
        for key in keys:
            try:
                structure, set_name, prov = self._structure(key)
            except Exception as e:  # noqa: BLE001 - one bad record never stops the run
                yield Reject(PACKAGED_FILE if not key.startswith("path") else key.split("/")[0], key,
                             f"unreadable structure: {type(e).__name__}: {e}"[:300])
                continue
            try:
                yield make_material(self.cfg, key, structure, set_name, prov, energy)
            except ValueError as e:
                yield Reject(str(prov.get("file")), key, f"no planted drivers: {e}"[:300])

    def metadata(self) -> dict:
        rc = self.cfg.realbench
        return {"source": self.name, "path": None, "units": "eV", "transform": self.cfg.transform,
                "log_floor": self.cfg.log_floor, "seed": rc.seed, "noise": rc.noise,
                "noise_floor": noise_floor(rc.noise), "mp": rc.mp, "max_materials": rc.max_materials,
                "paths": [str(p) for p in rc.paths], "excluded_no_anion": len(_excluded()) if rc.mp else 0,
                "attribution": "structures: Materials Project (CC BY 4.0), toolkit/resources/mp_structures.NOTICE.md"}
