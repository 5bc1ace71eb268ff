"""Structural and spectral descriptors of every material (names: docs/architecture.md).

Computed once per material, in parallel (``cfg.analyze.workers`` spawned processes), cached in
``RUN_DIR/analyze/descriptor_cache/<dataset hash>/block-*.json`` (one file per block of materials,
written atomically, so a killed run resumes where it stopped) and assembled into
``RUN_DIR/analyze/descriptors.csv`` plus ``descriptor_failures.csv`` (id, descriptor, reason).

A descriptor that cannot be computed for a material is missing (NaN) with its reason in the
failures table, never guessed. Every name belongs to a named family (:func:`descriptor_family`,
``FAMILY_OF_PREFIX``; in brackets below). How each is computed:

* ``element:<El>`` (0/1), ``fraction:<El>`` (atomic fraction) and ``heavy_atom_fraction`` (atomic
  fraction of elements with Z >= 50) from pymatgen's ``Composition`` [composition].
* Oxidation states (:mod:`toolkit.analyze.chemistry`): pymatgen's ``BVAnalyzer().get_valences`` (bond
  valence, per site) in ``crystalnn`` mode; when it fails, and always in the large-dataset ``cutoff``
  mode, the charge-balance cascade of :func:`toolkit.analyze.chemistry.charge_balance` (pymatgen
  ``Composition.oxi_state_guesses`` on the reduced formula with its default ICSD/common states; then
  the doubled formula for a mixed-valence element, the most electronegative element fixed as the only
  anion; then, with that anion fixed, any positive state pymatgen lists; cached per reduced formula,
  about 250x cheaper than bond valence). ``oxidation:<El><+n>`` (0/1) lists every cation state
  found [cation chemistry]; ``oxidation_method:<method>`` (0/1) marks a material whose states came
  from a fallback (``charge_balance``, ``charge_balance_mixed_valence``,
  ``charge_balance_all_states``) instead of the mode's own source (bond valence / the first
  charge-balance step) - provenance, documented as family "other". When every method fails (an
  element, an intermetallic, a polyiodide, a cluster compound) ``oxidation``, ``cation_class`` and the
  d-electron counts are missing with every method's reason. (Anion states are left out: they are
  fixed by the anion class.)
* ``anion:<class>`` from the anion species (negative oxidation state, else the most electronegative
  element when it is O, S, Se, Te, N or a halogen; a halide also as ``anion:fluoride`` / ``chloride`` /
  ``bromide`` / ``iodide``); ``electronegativity_diff`` (max - min Pauling
  electronegativity, pymatgen ``Element.X``) [anion].
* ``cation_class:<class>`` per cation species and state (:func:`toolkit.analyze.chemistry.cation_classes`):
  alkali, alkaline_earth, rare_earth from the element; d0 / partial_d / d10 of d-block cations (d count
  = group - state); d10 also for p-block cations of period >= 4 without valence s/p electrons (Ga3+,
  In3+, Sn4+, Sb5+...); lone_pair_p for ns2 cations (state = group - 12: Tl+, Sn2+, Pb2+, Sb3+, Bi3+,
  Se4+, Te4+, I5+...) [cation chemistry].
* ``d_electrons_mean`` / ``d_electrons_max``: group - oxidation state over the d-block cations (La-Lu and
  Ac-Lr excluded), site-weighted mean and maximum; 0 when the material has no d-block cation; missing
  when it has a d-block element but no oxidation state [cation chemistry].
* Neighbours from ``CrystalNN`` (``coordination="crystalnn"``) or, for very large datasets, the
  minimum-distance rule of pymatgen's ``MinimumDistanceNN(tol=0.2)`` evaluated on one periodic
  neighbour list per structure (``"cutoff"``, :func:`min_distance_edges`; ``"auto"`` switches above
  ``crystalnn_max_materials``). From the bond arrays, without a loop over bonds:

  - ``cn_mean`` (cations), ``coordination:<polyhedron>`` of cations (pymatgen
    ``LocalStructOrderParams`` tet/oct/bcc/tri_plan/sq_plan >= 0.5 with the matching coordination
    number; linear = two neighbours at >= 160 deg; classified once per symmetry-equivalent class of
    sites), ``polyhedron_order_mean`` (that order parameter of the assigned polyhedron, (1 - cos)/2
    for linear, mean over cation sites whose polyhedron is not "other"), ``polyhedron_distortion_mean``
    (std / mean of each cation polyhedron's bond lengths, mean over cation sites with >= 2
    neighbours) [coordination];
  - ``bond_length_mean``/``_min`` and ``bond_length:<A>-<B>`` (Å) [bonds];
  - ``angle_XMX_mean``/``_std`` (anion-cation-anion) and ``angle_MXM_mean``/``_std``
    (cation-anion-cation) over every pair of bonds at a site (deg), ``bridge_linear_fraction`` (share
    of M-X-M angles >= 160 deg) [angles];
  - ``polyanion:<unit>`` (0/1; e.g. PO4, SO4, SiO4, CO3, BO3, NO3, SeO3, PS4, MoO4, VO4): a B, C, N,
    Si, Ge, P, As, Sb, S, Se, Te, Cl, Br or I site, or a d0 V/Cr/Mo/W/Mn/Tc/Re site, that is not an
    anion, has 3 or 4 neighbours, all anion sites (O, S, Se, Te, N, halogen) at short bond lengths
    (< 1.15 x the sum of pymatgen's ``CovalentRadius``; transition metals < 1.85 Å to O), named by
    centre + ligands + count (:func:`toolkit.analyze.chemistry.polyanions`); ``polyanion_fraction``:
    share of the anion sites bound in such a unit (missing without anion sites) [polyanions].
* ``density`` (g/cm^3), ``volume_per_atom`` (Å^3) [density].
* ``spacegroup:<symbol>``, ``crystal_system:<name>``, ``centrosymmetric`` (0/1: the point group is a
  Laue group, ``SpacegroupAnalyzer.is_laue``) from spglib through pymatgen, symprec 0.1 [symmetry].
* Spectral: ``onset`` (eV), ``edge_integral`` (eV decades), ``peak_1``, ``peak_2`` (eV) of the
  reference spectrum and ``pred:<same>`` of the predicted one, from
  ``toolkit.data.spectra.spectral_descriptors`` [spectral].
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable

import numpy as np

log = logging.getLogger(__name__)

DESCRIPTOR_VERSION = 5  # bump when a definition changes (invalidates the cache)
BLOCK = 32  # materials per cache block

ANION_CLASS = {"O": "oxide", "S": "sulfide", "Se": "selenide", "Te": "telluride", "N": "nitride",
               "F": "halide", "Cl": "halide", "Br": "halide", "I": "halide"}
#: halide anions also carry their own class (``anion:halide`` and ``anion:iodide``): "iodides" is what a
#: chemist says of a cluster of iodides, "halides" of one mixing them
HALIDE_CLASS = {"F": "fluoride", "Cl": "chloride", "Br": "bromide", "I": "iodide"}
POLYHEDRA = ("tetrahedral", "octahedral", "cubic", "linear", "trigonal_planar", "square_planar", "other")
CATION_CLASSES = ("alkali", "alkaline_earth", "d0", "d10", "partial_d", "lone_pair_p", "rare_earth", "other")
# LocalStructOrderParams type -> (coordination number, polyhedron)
_LOP = {"tet": (4, "tetrahedral"), "sq_plan": (4, "square_planar"), "oct": (6, "octahedral"),
        "bcc": (8, "cubic"), "tri_plan": (3, "trigonal_planar")}
CATEGORICAL_FAMILIES = ("element", "anion", "cation_class", "coordination", "spacegroup", "crystal_system",
                        "oxidation", "oxidation_method", "polyanion")
SPECTRAL = ("onset", "edge_integral", "peak_1", "peak_2")
ZERO_DEFAULT = (*CATEGORICAL_FAMILIES, "fraction")  # families whose absence from a material means 0


def family(name: str) -> str:
    """``"element:Te"`` -> ``"element"``; ``"cn_mean"`` -> ``"cn_mean"``."""
    return name.split(":", 1)[0]


#: named descriptor families used by every ranking and by the report: prefix -> family (not listed,
#: hence "other": ``oxidation_method``, the provenance of a material's oxidation states)
FAMILY_OF_PREFIX: dict[str, str] = {
    "anion": "anion", "electronegativity_diff": "anion",
    "element": "composition", "fraction": "composition",
    "heavy_atom_fraction": "composition",
    "cation_class": "cation chemistry", "oxidation": "cation chemistry",
    "d_electrons_mean": "cation chemistry", "d_electrons_max": "cation chemistry",
    "coordination": "coordination", "cn_mean": "coordination",
    "polyhedron_distortion_mean": "coordination", "polyhedron_order_mean": "coordination",
    "bond_length": "bonds", "bond_length_mean": "bonds", "bond_length_min": "bonds",
    "angle_XMX_mean": "angles", "angle_MXM_mean": "angles", "angle_XMX_std": "angles", "angle_MXM_std": "angles",
    "bridge_linear_fraction": "angles",
    "polyanion": "polyanions", "polyanion_fraction": "polyanions",
    "spacegroup": "symmetry", "crystal_system": "symmetry", "centrosymmetric": "symmetry",
    "density": "density", "volume_per_atom": "density",
}
FAMILIES: tuple[str, ...] = ("anion", "cation chemistry", "coordination", "bonds", "angles", "polyanions",
                             "symmetry", "density", "composition", "spectral", "other")


def descriptor_family(name: str) -> str:
    """The named family of a descriptor (``"anion:oxide"`` -> ``"anion"``, ``"bond_length:Ti-O"`` ->
    ``"bonds"``, ``"onset"`` / ``"pred:onset"`` -> ``"spectral"``); ``"other"`` when unknown."""
    if is_spectral(name):
        return "spectral"
    return FAMILY_OF_PREFIX.get(family(name), "other")


def is_categorical(name: str) -> bool:
    return family(name) in CATEGORICAL_FAMILIES


def is_spectral(name: str) -> bool:
    """A target feature (reference or ``pred:``; onset... of a spectrum, ``target:*`` of other targets)."""
    from toolkit.data.targets import is_feature

    return is_feature(name) or name.startswith("pred:")


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

    def write(self, path: Path, failures_path: Path, chunk: int = 4096, window: int = 8) -> None:
        """``path``: one row per material (id, then every column; shortest round-trip decimal, empty =
        missing), formatted a chunk of rows at a time with one C-level format per row (the per-value
        Python loop cost ~1 ms per material at 430 columns, hours at 10^7); under the dask engine the
        chunks are formatted as Dask tasks (at most ``window`` in flight) and written here in order.
        ``failures_path``: the failures."""
        from collections import deque

        from toolkit.analyze.engine import Deferred
        from toolkit.runtime import atomic_write

        def write(fh) -> None:
            head = io.StringIO()
            csv.writer(head).writerow(["id", *self.names])
            fh.write(head.getvalue().encode())
            pending: deque = deque()
            for a in range(0, len(self.ids), chunk):
                pending.append(Deferred(csv_rows, (self.ids[a:a + chunk], np.asarray(self.values[a:a + chunk])),
                                        quiet=True))
                if len(pending) >= window:
                    fh.write(pending.popleft().result().encode())
            while pending:
                fh.write(pending.popleft().result().encode())

        atomic_write(path, write)  # a unique temporary file per writer
        _write_csv(failures_path, ["id", "descriptor", "reason"], self.failures)


def csv_rows(ids: list[str], values: np.ndarray) -> str:
    """Rows of descriptors.csv (``\\r\\n`` line ends, as the csv module writes them) of ``ids`` and their
    ``values`` rows: ``%r`` of every value (shortest round-trip decimal), empty for NaN and infinities."""
    if values.ndim < 2 or values.shape[1] == 0:
        return "".join(f"{_csv_field(i)}\r\n" for i in ids)
    fmt = ",".join(["%r"] * values.shape[1])
    vals = np.asarray(values, dtype=np.float64).tolist()
    return "".join(f"{_csv_field(i)},{_no_nonfinite(fmt % tuple(row))}\r\n" for i, row in zip(ids, vals))


def _csv_field(s: str) -> str:
    """``s`` as one CSV field (quoted as the csv module does when it holds a comma, quote or newline)."""
    s = str(s)
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\r\n') else s


def _no_nonfinite(line: str) -> str:
    """A line of ``%r``-formatted floats with NaN and infinities as empty fields."""
    return line.replace("-inf", "").replace("inf", "").replace("nan", "") if "n" in line else line


def _write_csv(path: Path, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    from toolkit.runtime import write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    write_text(path, buf.getvalue())  # atomic, a unique temporary file per writer


# ---------------------------------------------------------------- one material
def structure_from_arrays(numbers: np.ndarray, frac_coords: np.ndarray, lattice: np.ndarray):
    """pymatgen Structure from store arrays (atomic numbers, fractional coordinates, lattice rows in Å)."""
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(np.asarray(lattice, dtype=np.float64)), [int(z) for z in numbers],
                     np.asarray(frac_coords, dtype=np.float64))


def _oxidation_states(structure, method: str = "bond_valence"):
    """The structure's :class:`~toolkit.analyze.chemistry.Oxidation`: bond valence (pymatgen
    ``BVAnalyzer``) then the charge-balance cascade of :func:`toolkit.analyze.chemistry.charge_balance`
    (``method="bond_valence"``), or the charge-balance cascade alone (``"charge_balance"``, the
    large-dataset ``cutoff`` mode: cached per reduced formula, about 250x cheaper)."""
    from toolkit.analyze.chemistry import oxidation_states

    if method == "charge_balance":
        _charge_balance(structure.composition.reduced_formula)  # the per-formula cache
    return oxidation_states(structure, use_bond_valence=method != "charge_balance")


@lru_cache(maxsize=65536)
def _charge_balance(reduced_formula: str) -> dict[str, float] | None:
    """Average charge-balanced oxidation state per element of a composition, or None
    (:func:`toolkit.analyze.chemistry.charge_balance`)."""
    from toolkit.analyze.chemistry import charge_balance

    guess, _, _ = charge_balance(reduced_formula)
    return {el: float(np.mean(st)) for el, st in guess.items()} if guess is not None else None


def _cation_class(el, oxi: float | None) -> list[str]:
    from toolkit.analyze.chemistry import cation_classes

    return cation_classes(el, oxi)


def _polyhedron(lop, local, cn: int, vecs: np.ndarray) -> tuple[str, float]:
    """(polyhedron, order-parameter value of that polyhedron; NaN for "other"). Linear: two neighbours
    at >= 160 deg, value (1 - cos angle) / 2 (1 for 180 deg); the others: the best pymatgen
    ``LocalStructOrderParams`` value >= 0.5 among the types matching the coordination number."""
    if cn == 2:
        u = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        c = float(np.clip(u[0] @ u[1], -1, 1))
        return ("linear", (1 - c) / 2) if np.degrees(np.arccos(c)) >= 160 else ("other", np.nan)
    if cn not in (3, 4, 6, 8):
        return "other", np.nan
    vals = lop.get_order_parameters(local, 0, indices_neighs=list(range(1, cn + 1)))
    best, name = 0.5, "other"
    for (t, (tcn, poly)), v in zip(_LOP.items(), vals):
        if tcn == cn and v is not None and v >= best:
            best, name = v, poly
    return name, (float(best) if name != "other" else np.nan)


#: descriptors computed from the neighbour list (all fail together when the neighbour finder fails)
NEIGHBOUR_DESCRIPTORS = ("cn_mean", "coordination", "bond_length_mean", "bond_length_min", "bond_length",
                         "angle_XMX_mean", "angle_MXM_mean", "angle_XMX_std", "angle_MXM_std",
                         "bridge_linear_fraction", "polyhedron_distortion_mean", "polyhedron_order_mean",
                         "polyanion", "polyanion_fraction")


def material_descriptors(structure, coordination: str = "crystalnn") -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Structural descriptors of one pymatgen Structure.

    Returns (values, failures): values maps descriptor name -> float (categorical families list only
    their 1 entries; absent = 0 unless the family failed); failures are (descriptor or family, reason)."""
    from pymatgen.core import Element
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from toolkit.analyze.chemistry import d_electrons

    vals: dict[str, float] = {}
    fails: list[tuple[str, str]] = []
    comp = structure.composition
    elements = sorted(comp.elements, key=lambda e: e.X if np.isfinite(e.X) else 99)
    frac = comp.fractional_composition
    for el, amt in frac.items():
        vals[f"element:{el.symbol}"] = 1.0
        vals[f"fraction:{el.symbol}"] = float(amt)
    vals["heavy_atom_fraction"] = float(sum(amt for el, amt in frac.items() if el.Z >= 50))
    vals["density"] = float(structure.density)
    vals["volume_per_atom"] = float(structure.volume / len(structure))
    xs = [e.X for e in comp.elements if np.isfinite(e.X)]
    if len(comp.elements) >= 2 and len(xs) == len(comp.elements):
        vals["electronegativity_diff"] = float(max(xs) - min(xs))
    else:
        fails.append(("electronegativity_diff", "single element or element without Pauling electronegativity"))
    equivalent = None
    try:
        sga = SpacegroupAnalyzer(structure, symprec=0.1)
        vals[f"spacegroup:{sga.get_space_group_symbol()}"] = 1.0
        vals[f"crystal_system:{sga.get_crystal_system()}"] = 1.0
        vals["centrosymmetric"] = float(sga.is_laue())
        equivalent = np.asarray(sga.get_symmetry_dataset().equivalent_atoms)
    except Exception as e:  # noqa: BLE001 - spglib failures come as several types
        fails += [(k, f"spglib: {e}"[:200]) for k in ("spacegroup", "crystal_system", "centrosymmetric")]

    oxi = _oxidation_states(structure, "bond_valence" if coordination == "crystalnn" else "charge_balance")
    if oxi.ok:
        if oxi.method != ("bond_valence" if coordination == "crystalnn" else "charge_balance"):
            vals[f"oxidation_method:{oxi.method}"] = 1.0  # a fallback, not the mode's own source
        for el, st in oxi.states.items():
            for v in sorted(set(st)):
                if v > 0:  # cations only: an anion's state is fixed by its anion class
                    vals[f"oxidation:{el}{v:+d}"] = 1.0
        anions, cations = oxi.anions(), oxi.cations()
    else:
        fails.append(("oxidation", oxi.reason or "no oxidation states"))
        top = elements[-1].symbol if elements else None
        anions = {top} if top in ANION_CLASS and len(elements) > 1 else set()
        cations = {e.symbol for e in elements} - anions
    for el in anions:
        if el in ANION_CLASS:
            vals[f"anion:{ANION_CLASS[el]}"] = 1.0
        if el in HALIDE_CLASS:
            vals[f"anion:{HALIDE_CLASS[el]}"] = 1.0
    if not oxi.ok:
        fails.append(("cation_class", f"no oxidation state ({oxi.reason})"))
    else:
        for el in cations:
            for v in sorted(set(oxi.states[el])):
                if v > 0:
                    for c in _cation_class(Element(el), v):
                        vals[f"cation_class:{c}"] = 1.0
    d = d_electrons(oxi, comp.elements)
    if isinstance(d, str):
        fails += [("d_electrons_mean", d), ("d_electrons_max", d)]
    else:
        vals["d_electrons_mean"], vals["d_electrons_max"] = d

    # neighbours
    try:
        centre, nbr, vecs = neighbour_edges(structure, coordination)
    except Exception as e:  # noqa: BLE001
        reason = f"{coordination} neighbours failed: {type(e).__name__}: {e}"[:200]
        fails += [(name, reason) for name in NEIGHBOUR_DESCRIPTORS]
        return vals, fails
    centre_sites = cations if cations else {e.symbol for e in elements}
    vals.update(_environment(structure, centre, nbr, vecs, centre_sites, anions, cations, equivalent, fails,
                             oxi.site))
    return vals, fails


def neighbour_edges(structure, coordination: str = "crystalnn") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour bonds of every site as arrays: (centre index (E,), neighbour index (E,), Cartesian
    vector centre -> neighbour image (E, 3) in Å), from ``CrystalNN`` or the minimum-distance rule."""
    if coordination != "crystalnn":
        return min_distance_edges(structure)
    from pymatgen.analysis.local_env import CrystalNN

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        all_nn = CrystalNN().get_all_nn_info(structure)
    centre = np.array([i for i, nbrs in enumerate(all_nn) for _ in nbrs], dtype=np.int64)
    nbr = np.array([n["site_index"] for nbrs in all_nn for n in nbrs], dtype=np.int64)
    vecs = np.array([n["site"].coords - structure[i].coords for i, nbrs in enumerate(all_nn) for n in nbrs],
                    dtype=np.float64).reshape(-1, 3)
    return centre, nbr, vecs


def min_distance_edges(structure, tol: float = 0.2, cutoff: float = 10.0, start: float = 5.0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pymatgen ``MinimumDistanceNN(tol, cutoff)``'s neighbours of every site (those closer than
    ``(1 + tol)`` x the site's nearest-neighbour distance) from one periodic neighbour list per
    structure instead of one search per site (~200x faster). The search radius starts at ``start`` and
    doubles up to ``cutoff`` until it covers every site's shell; a site with no neighbour within
    ``cutoff`` has none (MinimumDistanceNN would raise for the whole structure)."""
    n = len(structure)
    r = min(start, cutoff)
    while True:
        c, p, img, d = structure.get_neighbor_list(r)
        dmin = np.full(n, np.inf)
        np.minimum.at(dmin, c, d)
        if r >= cutoff or np.all((1 + tol) * dmin <= r):
            break
        r = min(2 * r, cutoff)
    keep = d < (1 + tol) * dmin[c]
    c, p, img = c[keep].astype(np.int64), p[keep].astype(np.int64), img[keep]
    cart = structure.cart_coords
    vecs = cart[p] + img @ structure.lattice.matrix - cart[c]
    order = np.lexsort((np.linalg.norm(vecs, axis=1), c))
    return c[order], p[order], vecs[order]


def _angles_within(centre: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    """Angles (deg) between every pair of bonds that share a centre, vectorised over centres."""
    if len(centre) < 2:
        return np.empty(0)
    order = np.argsort(centre, kind="stable")
    centre = centre[order]
    u = vecs[order] / np.maximum(np.linalg.norm(vecs[order], axis=1, keepdims=True), 1e-12)
    uniq, first, counts = np.unique(centre, return_index=True, return_counts=True)
    row = np.searchsorted(uniq, centre)
    slot = np.arange(len(centre)) - first[row]
    k = int(counts.max())
    if k < 2:
        return np.empty(0)
    padded = np.zeros((len(uniq), k, 3))
    present = np.zeros((len(uniq), k), dtype=bool)
    padded[row, slot] = u
    present[row, slot] = True
    i, j = np.triu_indices(k, 1)
    cos = np.einsum("nad,nad->na", padded[:, i], padded[:, j])[present[:, i] & present[:, j]]
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _environment(structure, centre: np.ndarray, nbr: np.ndarray, vecs: np.ndarray, centre_sites: set[str],
                 anions: set[str], cations: set[str], equivalent: np.ndarray | None,
                 fails: list[tuple[str, str]], site_oxi: np.ndarray | None = None) -> dict[str, float]:
    """Coordination, bond-length, bond-angle and polyanion descriptors from the bond arrays (no loop
    over bonds; the polyhedron is classified once per symmetry-equivalent class of centre sites)."""
    from pymatgen.analysis.local_env import LocalStructOrderParams
    from pymatgen.core import Lattice, Structure

    from toolkit.analyze.chemistry import polyanions

    vals: dict[str, float] = {}
    syms = np.array([sp.symbol for sp in structure.species])
    n = len(syms)
    is_centre, is_anion, is_cation = (np.isin(syms, sorted(x)) for x in (centre_sites, anions, cations))
    deg = np.bincount(centre, minlength=n)
    dist = np.linalg.norm(vecs, axis=1)
    cns = deg[is_centre & (deg > 0)]
    if len(cns):
        vals["cn_mean"] = float(np.mean(cns))
    else:
        fails.append(("cn_mean", "no cation site with neighbours"))
    if len(dist):
        vals["bond_length_mean"] = float(np.mean(dist))
        vals["bond_length_min"] = float(np.min(dist))
        names = sorted(set(syms))
        code = np.searchsorted(names, syms)
        a, b = np.minimum(code[centre], code[nbr]), np.maximum(code[centre], code[nbr])
        key, inv = np.unique(a * len(names) + b, return_inverse=True)
        means = np.bincount(inv, weights=dist) / np.bincount(inv)
        for k, m in zip(key, means):
            vals[f"bond_length:{names[k // len(names)]}-{names[k % len(names)]}"] = float(m)
    else:
        fails.append(("bond_length_mean", "no neighbours found"))
    xmx = is_centre[centre] & is_anion[nbr]
    mxm = is_anion[centre] & is_cation[nbr]
    for tag, sel, why in (("XMX", xmx, "no cation with two anion neighbours"),
                          ("MXM", mxm, "no anion with two cation neighbours")):
        ang = _angles_within(centre[sel], vecs[sel])
        if len(ang):
            vals[f"angle_{tag}_mean"] = float(np.mean(ang))
            vals[f"angle_{tag}_std"] = float(np.std(ang))
            if tag == "MXM":
                vals["bridge_linear_fraction"] = float(np.mean(ang >= 160.0))
        else:
            fails += [(f"angle_{tag}_mean", why), (f"angle_{tag}_std", why)]
            if tag == "MXM":
                fails.append(("bridge_linear_fraction", why))
    # polyhedron distortion: bond-length spread std/mean per centre site with >= 2 neighbours
    poly = is_centre & (deg >= 2)
    if poly.any():
        on = poly[centre]
        k = np.bincount(centre[on], minlength=n)[poly]
        s1 = np.bincount(centre[on], weights=dist[on], minlength=n)[poly]
        s2 = np.bincount(centre[on], weights=dist[on] ** 2, minlength=n)[poly]
        mean = s1 / k
        std = np.sqrt(np.maximum(s2 / k - mean ** 2, 0.0))
        vals["polyhedron_distortion_mean"] = float(np.mean(std / mean))
    else:
        fails.append(("polyhedron_distortion_mean", "no cation site with two or more neighbours"))
    # polyhedra: one representative per symmetry-equivalent class of centre sites with neighbours
    cls = equivalent if equivalent is not None and len(equivalent) == n else np.arange(n)
    sites = np.flatnonzero(is_centre & (deg > 0))
    _, rep, mult = np.unique(cls[sites], return_index=True, return_counts=True)
    orders, weights = [], []
    if len(rep):
        lop = LocalStructOrderParams(list(_LOP))
        box = Lattice.cubic(100.0)
        for i, m in zip(sites[rep], mult):
            own = centre == i
            v = vecs[own]
            local = Structure(box, [syms[i], *syms[nbr[own]]], np.vstack([[50.0, 50.0, 50.0], 50.0 + v]),
                              coords_are_cartesian=True)
            name, order = _polyhedron(lop, local, len(v), v)
            vals[f"coordination:{name}"] = 1.0
            if np.isfinite(order):
                orders.append(order)
                weights.append(m)
    if orders:
        vals["polyhedron_order_mean"] = float(np.average(orders, weights=weights))
    else:
        fails.append(("polyhedron_order_mean", "no cation polyhedron matches a reference shape (all 'other')"))
    # polyanion units
    units, anion_sites, bound = polyanions(syms, centre, nbr, dist, anions, site_oxi)
    for name in units:
        vals[f"polyanion:{name}"] = 1.0
    if anion_sites.any():
        vals["polyanion_fraction"] = float(bound[anion_sites].mean())
    else:
        fails.append(("polyanion_fraction", "no anion site"))
    return vals


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

    def subset(self, rows: np.ndarray) -> "StructureArrays":
        """The materials ``rows`` (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        spans = [np.arange(self.atom_offset[i], self.atom_offset[i + 1]) for i in rows]
        atoms = np.concatenate(spans) if spans else np.zeros(0, np.int64)
        counts = np.array([len(x) for x in spans], dtype=np.int64)
        off = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(counts, out=off[1:])
        return StructureArrays([self.ids[i] for i in rows], self.numbers[atoms], self.frac_coords[atoms],
                               self.lattice[rows], off)


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
        t0, step, n_done = time.monotonic(), max(1, len(jobs) // 10), 0

        def done(k: int, b: int, recs: list[dict]) -> None:
            nonlocal n_done
            _save_block(cache_dir, b, recs)
            n_done += len(recs)
            if (k + 1) % step == 0 or k + 1 == len(jobs):
                rate = n_done / max(time.monotonic() - t0, 1e-9)
                log.info("descriptors: %d/%d blocks (%.1f materials/s)", k + 1, len(jobs), rate)

        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                     initializer=_single_threaded) as ex:
                for k, (b, recs) in enumerate(ex.map(_block_worker, jobs)):
                    done(k, b, recs)
        else:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(1):
                for k, job in enumerate(jobs):
                    done(k, *_block_worker(job))
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


def _features_chunk(spectra: Any, a: int, b: int, energy: np.ndarray, spec: Any) -> tuple[np.ndarray, np.ndarray]:
    """(rows with a spectrum, (their count, features) values) of rows a:b of ``spectra`` (``spec.feature_names`` order)."""
    rows = np.asarray(spectra[a:b], dtype=np.float64)
    ok = np.isfinite(rows).any(axis=1)
    if not ok.any():
        return ok, np.empty((0, len(spec.feature_names)))
    got = spec.features(energy, rows[ok])
    return ok, np.column_stack([got[f] for f in spec.feature_names])


def add_spectral(table: DescriptorTable, energy: np.ndarray, spectra: np.ndarray | None, prefix: str = "",
                 threshold: float = 4.0, transform: str = "log10_alpha", log_floor: float = 2.0,
                 spec=None) -> DescriptorTable:
    """Append the target features of each row of ``spectra`` (``prefix`` e.g. "pred:"): onset,
    edge_integral, peak_1, peak_2 of an absorption spectrum, or ``spec``'s features for other targets
    (:class:`toolkit.data.targets.TargetSpec`; default: absorption with ``threshold``/``transform``)."""
    from toolkit.data.targets import Head, TargetSpec

    if spec is None:
        spec = TargetSpec(heads=(Head("log10_alpha", 0, len(energy)),), transform=transform, log_floor=log_floor,
                          onset_threshold=threshold)
    feats = spec.feature_names
    n = len(table.ids)
    new = np.full((n, len(feats)), np.nan)
    fails = list(table.failures)
    if spectra is None:
        fails.extend((i, f"{prefix}spectrum", "no spectrum available") for i in table.ids)
    else:  # in chunks of rows: ``spectra`` may be a lazy view (toolkit.analyze.lazy.Spectra) of 10^7 rows;
        # chunks of a Zarr-backed view are Dask tasks under the dask engine (clustering.map_chunks)
        from functools import partial

        from toolkit.analyze.clustering import _chunks, chunk_rows, map_chunks

        some = np.zeros(n, dtype=bool)
        ranges = list(_chunks(n, chunk_rows()))
        for (a, b), (ok, vals) in zip(ranges, map_chunks(partial(_features_chunk, energy=energy, spec=spec), spectra,
                                                          ranges)):
            some[a:b] = ok
            new[a:b][ok] = vals
        fails.extend((table.ids[i], f"{prefix}spectrum", "spectrum entirely masked") for i in np.flatnonzero(~some))
        for j, name in enumerate(feats):
            fails.extend((table.ids[i], prefix + name, "not defined for this spectrum (no threshold crossing / peak)")
                         for i in np.flatnonzero(some & ~np.isfinite(new[:, j])))
    names = [*table.names, *(prefix + f for f in feats)]
    return DescriptorTable(table.ids, names, np.hstack([table.values, new]), fails)
