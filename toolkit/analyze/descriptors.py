"""Structural and spectral descriptors of every material (names: docs/architecture.md).

Computed once per material, in parallel (``cfg.analyze.workers`` spawned processes), cached in
``RUN_DIR/analyze/descriptor_cache/<dataset hash>/block-*.json`` (one file per block of materials,
written atomically, so a killed run resumes where it stopped) and assembled into
``RUN_DIR/analyze/descriptors.csv`` plus ``descriptor_failures.csv`` (id, descriptor, reason).

A descriptor that cannot be computed for a material is missing (NaN) with its reason in the
failures table, never guessed. Families and how they are computed:

* ``element:<El>`` (0/1) and ``fraction:<El>`` (atomic fraction) from the composition.
* ``oxidation:<El><+n>`` of cations from pymatgen's ``BVAnalyzer`` (bond valence); missing when it
  fails. (Anion states are left out: they are fixed by the anion class.)
* ``anion:<class>`` from the anion species (negative bond-valence oxidation state, else the most
  electronegative element when it is O, S, Se, Te, N or a halogen).
* ``cation_class:<class>`` per cation species; d0/d10/partial_d and lone_pair_p need an oxidation
  state: bond valence, else pymatgen's charge-balance guess (``Composition.oxi_state_guesses``),
  else the family is missing.
* Neighbours from ``CrystalNN`` (``coordination="crystalnn"``) or, for very large datasets, the much
  cheaper ``MinimumDistanceNN(tol=0.2)`` (``"cutoff"``; ``"auto"`` switches above
  ``crystalnn_max_materials``). From them: ``cn_mean`` (cations), ``coordination:<polyhedron>`` of
  cations (pymatgen ``LocalStructOrderParams`` tet/oct/bcc/tri_plan/sq_plan >= 0.5 with the matching
  coordination number; linear = two neighbours at >= 160 deg), ``bond_length_mean``/``_min`` and
  ``bond_length:<A>-<B>`` (Å), ``angle_XMX_mean``/``angle_MXM_mean`` (deg).
* ``density`` (g/cm^3), ``volume_per_atom`` (Å^3), ``spacegroup:<symbol>``, ``crystal_system:<name>``
  (spglib, symprec 0.1), ``electronegativity_diff`` (max - min Pauling electronegativity).
* Spectral: ``onset`` (eV), ``edge_integral`` (eV decades), ``peak_1``, ``peak_2`` (eV) of the
  reference spectrum and ``pred:<same>`` of the predicted one, from
  ``toolkit.data.spectra.spectral_descriptors``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable

import numpy as np

log = logging.getLogger(__name__)

DESCRIPTOR_VERSION = 2  # bump when a definition changes (invalidates the cache)
BLOCK = 32  # materials per cache block

ANION_CLASS = {"O": "oxide", "S": "sulfide", "Se": "selenide", "Te": "telluride", "N": "nitride",
               "F": "halide", "Cl": "halide", "Br": "halide", "I": "halide"}
POLYHEDRA = ("tetrahedral", "octahedral", "cubic", "linear", "trigonal_planar", "square_planar", "other")
CATION_CLASSES = ("alkali", "alkaline_earth", "d0", "d10", "partial_d", "lone_pair_p", "rare_earth", "other")
# LocalStructOrderParams type -> (coordination number, polyhedron)
_LOP = {"tet": (4, "tetrahedral"), "sq_plan": (4, "square_planar"), "oct": (6, "octahedral"),
        "bcc": (8, "cubic"), "tri_plan": (3, "trigonal_planar")}
CATEGORICAL_FAMILIES = ("element", "anion", "cation_class", "coordination", "spacegroup", "crystal_system",
                        "oxidation")
SPECTRAL = ("onset", "edge_integral", "peak_1", "peak_2")
ZERO_DEFAULT = (*CATEGORICAL_FAMILIES, "fraction")  # families whose absence from a material means 0


def family(name: str) -> str:
    """``"element:Te"`` -> ``"element"``; ``"cn_mean"`` -> ``"cn_mean"``."""
    return name.split(":", 1)[0]


def is_categorical(name: str) -> bool:
    return family(name) in CATEGORICAL_FAMILIES


def is_spectral(name: str) -> bool:
    return name in SPECTRAL or name.startswith("pred:")


@dataclass
class DescriptorTable:
    """``values`` (N, D) float64, NaN = missing; categorical columns hold 0/1."""

    ids: list[str]
    names: list[str]
    values: np.ndarray
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (id, descriptor or family, reason)

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.names.index(name)]

    def select(self, names: Iterable[str]) -> "DescriptorTable":
        names = [n for n in names if n in self.names]
        idx = [self.names.index(n) for n in names]
        return DescriptorTable(self.ids, names, self.values[:, idx], self.failures)

    def write(self, path: Path, failures_path: Path) -> None:
        _write_csv(path, ["id", *self.names],
                   ([i, *("" if not np.isfinite(v) else repr(float(v)) for v in row)]
                    for i, row in zip(self.ids, self.values)))
        _write_csv(failures_path, ["id", "descriptor", "reason"], self.failures)


def _write_csv(path: Path, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


# ---------------------------------------------------------------- one material
def structure_from_arrays(numbers: np.ndarray, frac_coords: np.ndarray, lattice: np.ndarray):
    """pymatgen Structure from store arrays (atomic numbers, fractional coordinates, lattice rows in Å)."""
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(np.asarray(lattice, dtype=np.float64)), [int(z) for z in numbers],
                     np.asarray(frac_coords, dtype=np.float64))


def _oxidation_states(structure) -> tuple[dict[str, float] | None, dict[str, float] | None, str | None]:
    """(bond-valence states per element, states for cation classes, reason when BV failed).

    The second may come from the charge-balance guess when bond valence fails."""
    from pymatgen.analysis.bond_valence import BVAnalyzer

    reason = None
    try:
        val = BVAnalyzer().get_valences(structure)
        per_el: dict[str, float] = {}
        for site, v in zip(structure, val):
            per_el.setdefault(site.specie.symbol, float(v))
        return per_el, per_el, None
    except Exception as e:  # BVAnalyzer raises ValueError for non charge-balanced / unknown sites
        reason = f"BVAnalyzer: {type(e).__name__}: {e}"[:200]
    try:
        guesses = structure.composition.oxi_state_guesses(max_sites=-50)
    except Exception:  # noqa: BLE001 - pymatgen raises various errors for exotic compositions
        guesses = []
    return None, ({k: float(v) for k, v in guesses[0].items()} if guesses else None), reason


def _cation_class(el, oxi: float | None) -> list[str]:
    out = []
    if el.is_alkali:
        out.append("alkali")
    if el.is_alkaline:
        out.append("alkaline_earth")
    if 57 <= el.Z <= 71 or el.symbol in ("Sc", "Y"):
        out.append("rare_earth")
    if oxi is not None and el.is_transition_metal and not (57 <= el.Z <= 71 or 89 <= el.Z <= 103):
        d = el.group - int(round(oxi))
        out.append("d0" if d == 0 else "d10" if d == 10 else "partial_d" if 0 < d < 10 else "other")
    elif oxi is not None and el.group in (13, 14, 15, 16, 17) and int(round(oxi)) == el.group - 12 and oxi > 0:
        out.append("lone_pair_p")
    if not out:
        out.append("other")
    return out


def _polyhedron(lop, local, cn: int, vecs: np.ndarray) -> str:
    if cn == 2:
        u = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        return "linear" if np.degrees(np.arccos(np.clip(u[0] @ u[1], -1, 1))) >= 160 else "other"
    if cn not in (3, 4, 6, 8):
        return "other"
    vals = lop.get_order_parameters(local, 0, indices_neighs=list(range(1, cn + 1)))
    best, name = 0.5, "other"
    for (t, (tcn, poly)), v in zip(_LOP.items(), vals):
        if tcn == cn and v is not None and v >= best:
            best, name = v, poly
    return name


def _angles_mean(vecs: np.ndarray) -> list[float]:
    """All pairwise angles (deg) between neighbour vectors (k, 3)."""
    if len(vecs) < 2:
        return []
    u = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    i, j = np.triu_indices(len(u), 1)
    return list(np.degrees(np.arccos(np.clip(np.einsum("ij,ij->i", u[i], u[j]), -1.0, 1.0))))


def material_descriptors(structure, coordination: str = "crystalnn") -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Structural descriptors of one pymatgen Structure.

    Returns (values, failures): values maps descriptor name -> float (categorical families list only
    their 1 entries; absent = 0 unless the family failed); failures are (descriptor or family, reason)."""
    from pymatgen.core import Lattice, Structure
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    vals: dict[str, float] = {}
    fails: list[tuple[str, str]] = []
    comp = structure.composition
    elements = sorted(comp.elements, key=lambda e: e.X if np.isfinite(e.X) else 99)
    for el, amt in comp.fractional_composition.items():
        vals[f"element:{el.symbol}"] = 1.0
        vals[f"fraction:{el.symbol}"] = float(amt)
    vals["density"] = float(structure.density)
    vals["volume_per_atom"] = float(structure.volume / len(structure))
    xs = [e.X for e in comp.elements if np.isfinite(e.X)]
    if len(comp.elements) >= 2 and len(xs) == len(comp.elements):
        vals["electronegativity_diff"] = float(max(xs) - min(xs))
    else:
        fails.append(("electronegativity_diff", "single element or element without Pauling electronegativity"))
    try:
        sga = SpacegroupAnalyzer(structure, symprec=0.1)
        vals[f"spacegroup:{sga.get_space_group_symbol()}"] = 1.0
        vals[f"crystal_system:{sga.get_crystal_system()}"] = 1.0
    except Exception as e:  # noqa: BLE001 - spglib failures come as several types
        fails += [("spacegroup", f"spglib: {e}"[:200]), ("crystal_system", f"spglib: {e}"[:200])]

    bv, oxi_any, bv_reason = _oxidation_states(structure)
    if bv is not None:
        for el, v in bv.items():
            if v > 0:  # cations only: an anion's state is fixed by its anion class
                vals[f"oxidation:{el}{int(round(v)):+d}"] = 1.0
    else:
        fails.append(("oxidation", bv_reason or "BVAnalyzer failed"))
    # anions / cations
    if oxi_any is not None:
        anions = {el for el, v in oxi_any.items() if v < 0}
        cations = {el for el, v in oxi_any.items() if v > 0}
    else:
        top = elements[-1].symbol if elements else None
        anions = {top} if top in ANION_CLASS and len(elements) > 1 else set()
        cations = {e.symbol for e in elements} - anions
    for el in anions:
        if el in ANION_CLASS:
            vals[f"anion:{ANION_CLASS[el]}"] = 1.0
    if oxi_any is None:
        fails.append(("cation_class", f"no oxidation state ({bv_reason}; charge-balance guess found none)"))
    else:
        from pymatgen.core import Element

        for el in cations:
            for c in _cation_class(Element(el), oxi_any.get(el)):
                vals[f"cation_class:{c}"] = 1.0

    # neighbours
    try:
        if coordination == "crystalnn":
            from pymatgen.analysis.local_env import CrystalNN

            nn = CrystalNN()
        else:
            from pymatgen.analysis.local_env import MinimumDistanceNN

            nn = MinimumDistanceNN(tol=0.2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            all_nn = nn.get_all_nn_info(structure)
    except Exception as e:  # noqa: BLE001
        reason = f"{coordination} neighbours failed: {type(e).__name__}: {e}"[:200]
        for name in ("cn_mean", "coordination", "bond_length_mean", "bond_length_min", "bond_length",
                     "angle_XMX_mean", "angle_MXM_mean"):
            fails.append((name, reason))
        return vals, fails

    from pymatgen.analysis.local_env import LocalStructOrderParams

    lop = LocalStructOrderParams(list(_LOP))
    box = Lattice.cubic(100.0)
    centre_sites = cations if cations else {e.symbol for e in elements}
    cns, lengths, xmx, mxm = [], [], [], []
    pair: dict[str, list[float]] = {}
    for i, (site, nbrs) in enumerate(zip(structure, all_nn)):
        sym = site.specie.symbol
        if not nbrs:
            continue
        coords = np.array([n["site"].coords for n in nbrs])
        vecs = coords - site.coords
        d = np.linalg.norm(vecs, axis=1)
        lengths.extend(d)
        for n, dist in zip(nbrs, d):
            key = "-".join(sorted((sym, n["site"].specie.symbol)))
            pair.setdefault(key, []).append(float(dist))
        nsym = [n["site"].specie.symbol for n in nbrs]
        if sym in centre_sites:
            cns.append(len(nbrs))
            xv = vecs[[s in anions for s in nsym]]
            xmx.extend(_angles_mean(xv))
            local = Structure(box, [sym, *nsym], np.vstack([[50.0, 50.0, 50.0], 50.0 + vecs]), coords_are_cartesian=True)
            vals[f"coordination:{_polyhedron(lop, local, len(nbrs), vecs)}"] = 1.0
        if sym in anions:
            mxm.extend(_angles_mean(vecs[[s in cations for s in nsym]]))
    if cns:
        vals["cn_mean"] = float(np.mean(cns))
    else:
        fails.append(("cn_mean", "no cation site with neighbours"))
    if lengths:
        vals["bond_length_mean"] = float(np.mean(lengths))
        vals["bond_length_min"] = float(np.min(lengths))
        for k, v in pair.items():
            vals[f"bond_length:{k}"] = float(np.mean(v))
    else:
        fails.append(("bond_length_mean", "no neighbours found"))
    for name, arr, why in (("angle_XMX_mean", xmx, "no cation with two anion neighbours"),
                           ("angle_MXM_mean", mxm, "no anion with two cation neighbours")):
        if arr:
            vals[name] = float(np.mean(arr))
        else:
            fails.append((name, why))
    return vals, fails


def _single_threaded() -> None:
    """Worker initialiser: one BLAS/OpenMP thread per process (workers already fill the cores)."""
    from threadpoolctl import threadpool_limits

    os.environ["OMP_NUM_THREADS"] = "1"
    threadpool_limits(1)
    warnings.simplefilter("ignore")


def _block_worker(args: tuple) -> tuple[int, list[dict]]:
    """Descriptors of one block of materials (runs in a worker process)."""
    block, items, coordination = args
    out = []
    for mid, numbers, frac, lat in items:
        try:
            s = structure_from_arrays(numbers, frac, lat)
            v, f = material_descriptors(s, coordination)
        except Exception as e:  # noqa: BLE001 - one bad material must not stop the run
            v, f = {}, [("*", f"structure could not be analysed: {type(e).__name__}: {e}"[:200])]
        out.append({"id": mid, "values": v, "failures": f})
    return block, out


# ---------------------------------------------------------------- many materials
@dataclass
class StructureArrays:
    """Per-material structure arrays (the dataset store's layout): ``atom_offset`` (N+1,)."""

    ids: list[str]
    numbers: np.ndarray
    frac_coords: np.ndarray
    lattice: np.ndarray
    atom_offset: np.ndarray

    def item(self, i: int) -> tuple:
        a, b = int(self.atom_offset[i]), int(self.atom_offset[i + 1])
        return self.ids[i], self.numbers[a:b], self.frac_coords[a:b], self.lattice[i]


def dataset_hash(parts: Any) -> str:
    """Short sha256 of anything JSON-serialisable identifying the dataset (+ descriptor version)."""
    blob = json.dumps({"v": DESCRIPTOR_VERSION, "data": parts}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def structural_descriptors(arrays: StructureArrays, cache_dir: Path, workers: int = 2,
                           coordination: str = "crystalnn", block: int = BLOCK) -> tuple[list[dict], int]:
    """Per-material descriptor dicts, resuming from block files in ``cache_dir``.

    Returns (records in material order, number of blocks computed now)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    n = len(arrays.ids)
    blocks = list(range((n + block - 1) // block))
    todo = [b for b in blocks if not (cache_dir / f"block-{b:06d}.json").exists()]
    if todo:
        log.info("descriptors: %d of %d blocks to compute (%s, %d workers)", len(todo), len(blocks), coordination, workers)
        jobs = [(b, [arrays.item(i) for i in range(b * block, min(n, (b + 1) * block))], coordination) for b in todo]
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                     initializer=_single_threaded) as ex:
                for b, recs in ex.map(_block_worker, jobs):
                    _save_block(cache_dir, b, recs)
        else:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(1):
                for job in jobs:
                    b, recs = _block_worker(job)
                    _save_block(cache_dir, b, recs)
    recs: list[dict] = []
    for b in blocks:
        recs.extend(json.loads((cache_dir / f"block-{b:06d}.json").read_text()))
    if [r["id"] for r in recs] != list(arrays.ids):
        raise RuntimeError(f"descriptor cache {cache_dir} does not match the dataset's ids; delete it and re-run")
    return recs, len(todo)


def _save_block(cache_dir: Path, b: int, recs: list[dict]) -> None:
    tmp = cache_dir / f".block-{b:06d}.json.tmp"
    tmp.write_text(json.dumps(recs))
    os.replace(tmp, cache_dir / f"block-{b:06d}.json")


def build_table(records: list[dict], min_count: int = 1) -> DescriptorTable:
    """Assemble per-material records into a table. Categorical families and ``fraction:*`` are 0
    where absent and NaN
    where the family failed for that material; categorical columns seen in fewer than ``min_count``
    materials are dropped."""
    ids = [r["id"] for r in records]
    names: dict[str, int] = {}
    for r in records:
        for k in r["values"]:
            names.setdefault(k, 0)
            names[k] += 1
    cols = sorted(k for k, c in names.items() if not is_categorical(k) or c >= min_count)
    col = {k: j for j, k in enumerate(cols)}
    vals = np.full((len(records), len(cols)), np.nan)
    cat_idx = {f: [col[k] for k in cols if family(k) == f] for f in ZERO_DEFAULT}
    failures: list[tuple[str, str, str]] = []
    for i, r in enumerate(records):
        failed = {f for f, _ in r["failures"]}
        for f in ZERO_DEFAULT:
            if f not in failed and "*" not in failed:
                vals[i, cat_idx[f]] = 0.0
        for k, v in r["values"].items():
            if k in col:
                vals[i, col[k]] = v
        failures.extend((r["id"], f, why) for f, why in r["failures"])
    return DescriptorTable(ids, cols, vals, failures)


def add_spectral(table: DescriptorTable, energy: np.ndarray, spectra: np.ndarray | None, prefix: str = "",
                 threshold: float = 4.0, transform: str = "log10_alpha", log_floor: float = 2.0) -> DescriptorTable:
    """Append onset, edge_integral, peak_1, peak_2 of each spectrum row (``prefix`` e.g. "pred:")."""
    from toolkit.data.spectra import spectral_descriptors

    n = len(table.ids)
    new = np.full((n, len(SPECTRAL)), np.nan)
    fails = list(table.failures)
    if spectra is None:
        fails.extend((i, f"{prefix}spectrum", "no spectrum available") for i in table.ids)
    else:
        for i in range(n):
            row = np.asarray(spectra[i], dtype=np.float64)
            if not np.isfinite(row).any():
                fails.append((table.ids[i], f"{prefix}spectrum", "spectrum entirely masked"))
                continue
            d = spectral_descriptors(energy, row, threshold=threshold, transform=transform, log_floor=log_floor)
            new[i] = [d["onset"], d["edge_integral"], d["peaks"][0], d["peaks"][1]]
            for j, name in enumerate(SPECTRAL):
                if not np.isfinite(new[i, j]):
                    fails.append((table.ids[i], prefix + name, "not defined for this spectrum (no threshold crossing / peak)"))
    names = [*table.names, *(prefix + s for s in SPECTRAL)]
    return DescriptorTable(table.ids, names, np.hstack([table.values, new]), fails)
