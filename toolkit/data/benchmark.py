"""The embedded ground-truth benchmark: prototype crystals with rule-made absorption spectra.

Every material is generated on demand from ``(seed, index)`` alone, so ``load(keys)`` of any subset,
in any order, in any process, returns identical records, and 10^5 materials cost seconds.

Generation of material ``i`` (all rules and constants are documented in docs/benchmark.md):

1. ``rng = numpy.random.default_rng([seed, i])``; pick a prototype uniformly (rocksalt, zincblende,
   wurtzite, CsCl, fluorite, antifluorite, rutile, CdI2, corundum, perovskite, spinel), then an anion
   allowed for it, then charge-balanced cations allowed for it (radius-ratio / tolerance-factor rules).
2. Bond length ``d0`` (Å) of the active cation (the only cation, or the octahedral B site) = Shannon
   ionic radius of the cation at the prototype's coordination + anion radius (pymatgen data).
   The prototype cell is scaled so its shortest active-cation–anion distance is ``d0``, then
   strained isotropically by ``s ~ U(-3 %, +3 %)``: ``d = d0 (1 + s)``; atoms are displaced by
   N(0, 0.01 Å) per Cartesian component.
3. Noise-free spectrum on the target grid (log10 α, α in cm^-1)::

       y(E) = floor + H σ((E − E0)/w + s0) + h1 G(E; p1, 0.6) + h2 G(E; p2, 0.8)
       E0 = A[anion] + C̄ − β (d̄ − 2.4 Å)      C̄: C[cation_class] averaged over the formula's cations
                                             d̄: mean first-shell cation–anion bond length (Å)
       w  = W[coordination],  p1 = E0 + D1[coordination],  p2 = p1 + D2[anion]

   with σ the logistic function, G a unit-height Gaussian, s0 = logit((threshold − floor)/H) so the
   edge crosses the onset threshold exactly at E0 (before the peak tails), H = 3.5 decades.
4. Observed spectrum = y + N(0, noise²) per grid point (seeded by (seed, i)); no floor clipping
   after the noise, so the noise is exactly Gaussian and :func:`noise_floor` is exact.

The truth (:func:`benchmark_truth`) names the drivers of each spectral feature with the descriptor
names of docs/architecture.md, and every Material carries its planted factors in ``properties``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

import numpy as np
from pymatgen.core import Composition, Element, Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from toolkit.data.records import Material, Reject
from toolkit.data.spectra import energy_grid, onset_energy

# ---------------------------------------------------------------------------------------------
# Chemistry
# ---------------------------------------------------------------------------------------------

#: anion element -> (anion class, charge)
ANIONS: dict[str, tuple[str, int]] = {
    "O": ("oxide", -2), "S": ("sulfide", -2), "Se": ("selenide", -2), "Te": ("telluride", -2),
    "F": ("halide", -1), "Cl": ("halide", -1), "Br": ("halide", -1), "I": ("halide", -1),
    "N": ("nitride", -3),
}

#: (cation element, oxidation state) -> cation class (descriptor family ``cation_class:*``)
CATIONS: dict[tuple[str, int], str] = {
    **{(el, 1): "alkali" for el in ("Li", "Na", "K", "Rb", "Cs")},
    ("Cu", 1): "d10", ("Ag", 1): "d10", ("Tl", 1): "lone_pair_p",
    **{(el, 2): "alkaline_earth" for el in ("Mg", "Ca", "Sr", "Ba")},
    ("Zn", 2): "d10", ("Cd", 2): "d10", ("Hg", 2): "d10",
    **{(el, 2): "partial_d" for el in ("Mn", "Fe", "Co", "Ni")},
    ("Sn", 2): "lone_pair_p", ("Pb", 2): "lone_pair_p",
    ("Al", 3): "other", ("Ga", 3): "d10", ("In", 3): "d10", ("Sc", 3): "d0", ("Y", 3): "d0",
    ("Cr", 3): "partial_d", ("Fe", 3): "partial_d", ("La", 3): "rare_earth", ("Gd", 3): "rare_earth",
    ("Lu", 3): "rare_earth", ("Bi", 3): "lone_pair_p", ("Sb", 3): "lone_pair_p",
    ("Ti", 4): "d0", ("Zr", 4): "d0", ("Hf", 4): "d0", ("Ge", 4): "d10", ("Sn", 4): "d10",
    ("Mn", 4): "partial_d",
}

#: ionic radii (Å) pymatgen's Shannon table lacks
_RADIUS_FALLBACK = {("Sn", 2): 0.93}
_ROMAN = {2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII", 9: "IX", 10: "X", 12: "XII"}


def cation_class(element: str, oxidation: int) -> str:
    """The benchmark's cation class of ``element`` in ``oxidation`` state ('other' if not listed)."""
    return CATIONS.get((element, oxidation), "other")


@lru_cache(maxsize=None)
def shannon_radius(element: str, oxidation: int, cn: int) -> float:
    """Shannon ionic radius (Å) at coordination ``cn``; nearest tabulated CN (high spin) if missing."""
    if (element, oxidation) in _RADIUS_FALLBACK:
        return _RADIUS_FALLBACK[(element, oxidation)]
    table = Element(element).data.get("Shannon radii", {}).get(str(oxidation))
    if not table:
        raise KeyError(f"no Shannon radius for {element}{oxidation:+d}")
    romans = {v: k for k, v in _ROMAN.items()}
    avail = sorted((romans[k], k) for k in table if k in romans)
    _, key = min(avail, key=lambda t: (abs(t[0] - cn), -t[0]))
    entry = table[key]
    spin = entry.get("", entry.get("High Spin", next(iter(entry.values()))))
    return float(spin["ionic_radius"])


# ---------------------------------------------------------------------------------------------
# Prototypes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prototype:
    """A structure template: unit-bond-length cell, fractional coords, site roles ('A', 'B', 'X').

    ``active`` is the role whose cation drives the spectrum; ``cn`` the coordination number of each
    cation role; ``coordination`` the active cation's coordination class."""

    name: str
    lattice: np.ndarray  # (3, 3), scaled so the shortest active-cation–anion distance is 1
    frac: np.ndarray  # (n, 3)
    roles: tuple[str, ...]
    stoich: dict[str, int]  # role -> count per formula unit
    cn: dict[str, int]
    active: str
    coordination: str
    anions: tuple[str, ...]
    bond_ratio: float = 1.0  # mean first-shell cation–anion bond length / shortest active bond


def _fcc(a: float) -> np.ndarray:
    return a / 2 * np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=float)


def _hex(a: float, c: float) -> np.ndarray:
    return Lattice.hexagonal(a, c).matrix


def _from_spacegroup(sg: str, lattice: Lattice, species: list[str], coords: list[list[float]],
                     role_of: dict[str, str]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # spglib deprecation chatter
        s = Structure.from_spacegroup(sg, lattice, species, coords)
        p = SpacegroupAnalyzer(s, symprec=1e-3).get_primitive_standard_structure()
    return p.lattice.matrix, p.frac_coords, tuple(role_of[site.specie.symbol] for site in p)


def _normalise(name: str, lattice: np.ndarray, frac: np.ndarray, roles: tuple[str, ...], **kw: Any) -> Prototype:
    """Scale the cell so the shortest active-cation–anion distance is 1 Å."""
    s = Structure(Lattice(lattice), ["Na" if r != "X" else "Cl" for r in roles], frac)
    act = [i for i, r in enumerate(roles) if r == kw["active"]]
    anion = np.array([r == "X" for r in roles])
    dm = s.distance_matrix[act][:, anion]
    scale = 1.0 / float(dm.min())
    s.scale_lattice(s.volume * scale ** 3)
    return Prototype(name=name, lattice=np.asarray(lattice) * scale, frac=np.asarray(frac, dtype=float),
                     roles=roles, bond_ratio=_mean_bond(s, roles), **kw)


def _mean_bond(s: Structure, roles: tuple[str, ...], shell: float = 1.15) -> float:
    """Mean cation–anion bond length over every cation's first shell (bonds within ``shell`` x that
    cation's shortest anion distance), counting each bond once per cation (periodic images included)."""
    centers, neighbors, _, dists = s.get_neighbor_list(r=2.5 * (s.volume / len(s)) ** (1 / 3))
    roles_arr = np.array(roles)
    pair = (roles_arr[centers] != "X") & (roles_arr[neighbors] == "X")
    c, d = centers[pair], dists[pair]
    nearest = np.full(len(roles), np.inf)
    np.minimum.at(nearest, c, d)
    first = d <= shell * nearest[c]
    return float(d[first].mean())


@lru_cache(maxsize=1)
def prototypes() -> tuple[Prototype, ...]:
    """The benchmark's structure prototypes (built once per process)."""
    ch = ("O", "S", "Se", "Te")
    hal = ("F", "Cl", "Br", "I")
    ax = {"stoich": {"A": 1, "X": 1}}
    out = [
        _normalise("rocksalt", _fcc(1.0), np.array([[0, 0, 0], [0.5, 0.5, 0.5]]), ("A", "X"), **ax,
                   cn={"A": 6}, active="A", coordination="octahedral", anions=ch + hal + ("N",)),
        _normalise("zincblende", _fcc(1.0), np.array([[0, 0, 0], [0.25, 0.25, 0.25]]), ("A", "X"), **ax,
                   cn={"A": 4}, active="A", coordination="tetrahedral", anions=ch + hal + ("N",)),
        _normalise("cscl", np.eye(3), np.array([[0, 0, 0], [0.5, 0.5, 0.5]]), ("A", "X"), **ax,
                   cn={"A": 8}, active="A", coordination="cubic", anions=hal),
        _normalise("wurtzite", _hex(1.0, 1.633),
                   np.array([[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, 0.375], [2 / 3, 1 / 3, 0.875]]),
                   ("A", "A", "X", "X"), **ax, cn={"A": 4}, active="A", coordination="tetrahedral",
                   anions=ch + ("N",)),
        _normalise("fluorite", _fcc(1.0), np.array([[0, 0, 0], [0.25, 0.25, 0.25], [0.75, 0.75, 0.75]]),
                   ("A", "X", "X"), stoich={"A": 1, "X": 2}, cn={"A": 8}, active="A", coordination="cubic",
                   anions=("O", "F", "Cl")),
        _normalise("antifluorite", _fcc(1.0), np.array([[0, 0, 0], [0.25, 0.25, 0.25], [0.75, 0.75, 0.75]]),
                   ("X", "A", "A"), stoich={"A": 2, "X": 1}, cn={"A": 4}, active="A", coordination="tetrahedral",
                   anions=ch),
        _normalise("rutile", np.diag([1.0, 1.0, 0.644]),
                   np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.305, 0.305, 0], [0.695, 0.695, 0],
                             [0.805, 0.195, 0.5], [0.195, 0.805, 0.5]]),
                   ("A", "A", "X", "X", "X", "X"), stoich={"A": 1, "X": 2}, cn={"A": 6}, active="A",
                   coordination="octahedral", anions=("O", "F")),
        _normalise("cdi2", _hex(1.0, 1.6), np.array([[0, 0, 0], [1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]]),
                   ("A", "X", "X"), stoich={"A": 1, "X": 2}, cn={"A": 6}, active="A", coordination="octahedral",
                   anions=("S", "Se", "Te", "Cl", "Br", "I")),
        _normalise("corundum", *_from_spacegroup(
            "R-3c", Lattice.hexagonal(4.76, 12.99), ["Al", "O"], [[0, 0, 0.352], [0.306, 0, 0.25]],
            {"Al": "A", "O": "X"}), stoich={"A": 2, "X": 3}, cn={"A": 6}, active="A", coordination="octahedral",
            anions=("O", "S")),
        _normalise("perovskite", np.eye(3),
                   np.array([[0.5, 0.5, 0.5], [0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]]),
                   ("A", "B", "X", "X", "X"), stoich={"A": 1, "B": 1, "X": 3}, cn={"A": 12, "B": 6}, active="B",
                   coordination="octahedral", anions=("O", "F", "Cl", "Br", "I")),
        _normalise("spinel", *_from_spacegroup(
            "Fd-3m", Lattice.cubic(8.08), ["Mg", "Al", "O"], [[0, 0, 0], [0.625, 0.625, 0.625],
                                                              [0.388, 0.388, 0.388]],
            {"Mg": "A", "Al": "B", "O": "X"}), stoich={"A": 1, "B": 2, "X": 4}, cn={"A": 4, "B": 6}, active="B",
            coordination="octahedral", anions=("O", "S", "Se")),
    ]
    return tuple(out)


#: radius-ratio windows r_cation / r_anion per coordination number (loosened Pauling rules)
RADIUS_RATIO = {4: (0.15, 0.62), 6: (0.30, 0.95), 8: (0.60, 1.40), 12: (0.70, 2.0)}


def _charges(proto: Prototype, anion_charge: int) -> list[dict[str, int]]:
    """Charge-balanced cation oxidation states per role."""
    neg = -anion_charge * proto.stoich["X"]
    if "B" not in proto.stoich:
        q, r = divmod(neg, proto.stoich["A"])
        return [{"A": q}] if r == 0 and 1 <= q <= 4 else []
    return [{"A": qa, "B": qb} for qa in (1, 2, 3) for qb in (2, 3, 4)
            if qa * proto.stoich["A"] + qb * proto.stoich["B"] == neg]


@lru_cache(maxsize=1)
def recipes() -> dict[str, dict[str, list[tuple[tuple[str, int], ...]]]]:
    """prototype -> anion element -> allowed cation assignments ((element, ox) per cation role)."""
    out: dict[str, dict[str, list[tuple[tuple[str, int], ...]]]] = {}
    for p in prototypes():
        by_anion: dict[str, list[tuple[tuple[str, int], ...]]] = {}
        for an in p.anions:
            q_x = ANIONS[an][1]
            r_x = shannon_radius(an, q_x, 6)
            combos: list[tuple[tuple[str, int], ...]] = []
            for charges in _charges(p, q_x):
                per_role = {}
                for role, q in charges.items():
                    lo, hi = RADIUS_RATIO[p.cn[role]]
                    per_role[role] = [(el, ox) for (el, ox) in CATIONS if ox == q
                                      and lo <= shannon_radius(el, ox, p.cn[role]) / r_x <= hi]
                if "B" in charges:
                    for a in per_role["A"]:
                        for b in per_role["B"]:
                            if a[0] == b[0]:
                                continue
                            ra, rb = shannon_radius(*a, p.cn["A"]), shannon_radius(*b, p.cn["B"])
                            t = (ra + r_x) / (math.sqrt(2) * (rb + r_x))
                            if p.name != "perovskite" or 0.80 <= t <= 1.10:
                                combos.append((a, b))
                else:
                    combos.extend((a,) for a in per_role["A"])
            if combos:
                by_anion[an] = sorted(combos)
        out[p.name] = by_anion
    return out


# ---------------------------------------------------------------------------------------------
# Spectral rules
# ---------------------------------------------------------------------------------------------

#: onset base by anion class (eV)
ONSET_ANION = {"halide": 6.0, "oxide": 4.6, "nitride": 3.6, "sulfide": 3.1, "selenide": 2.5, "telluride": 2.0}
#: onset shift by cation class of the active cation (eV)
ONSET_CATION = {"alkali": 1.4, "alkaline_earth": 1.2, "rare_earth": 0.8, "other": 0.8, "d0": 0.4, "d10": 0.0,
                "lone_pair_p": -0.6, "partial_d": -1.0}
#: onset slope with the active bond length (eV/Å), reference length (Å)
BOND_SLOPE, BOND_REF = 1.5, 2.4
#: edge width w (eV) and first-peak offset D1 (eV) by coordination of the active cation
EDGE_WIDTH = {"tetrahedral": 0.50, "octahedral": 0.70, "cubic": 0.90}
PEAK1_OFFSET = {"tetrahedral": 1.8, "octahedral": 2.5, "cubic": 3.2}
#: second-peak offset from the first, D2 (eV), by anion class
PEAK2_OFFSET = {"halide": 3.0, "oxide": 2.6, "nitride": 2.2, "sulfide": 2.0, "selenide": 1.8, "telluride": 1.6}
#: edge height H (decades), peak heights h1, h2 (decades), peak widths (eV, Gaussian σ)
EDGE_HEIGHT, PEAK_HEIGHTS, PEAK_WIDTHS = 3.5, (0.7, 0.5), (0.6, 0.8)
#: onset clamp (eV): E0 is limited to [ONSET_MIN, ONSET_MAX] by a smooth (softplus) clamp
ONSET_MIN, ONSET_MAX = 0.8, 9.0
STRAIN, DISPLACEMENT = 0.03, 0.01


def noise_floor(noise: float) -> float:
    """MAE (decades of log10 α) of a perfect predictor under the benchmark's noise model.

    The observed value is truth + ε with ε ~ N(0, noise²) at every unmasked grid point, so the
    perfect predictor (the truth) has MAE = E|ε| = noise·sqrt(2/π)."""
    return float(noise) * math.sqrt(2.0 / math.pi)


def _soft_clamp(x: float, lo: float, hi: float, k: float = 0.3) -> float:
    """Smooth clamp of x into [lo, hi] (softplus with scale k eV at each end)."""
    x = lo + k * math.log1p(math.exp((x - lo) / k)) if x - lo < 20 * k else x
    return hi - k * math.log1p(math.exp((hi - x) / k)) if hi - x < 20 * k else x


def onset_rule(anion_class: str, cation_shift: float | str, bond_length_mean: float) -> float:
    """E0 (eV) = A[anion] + C̄ − β (d̄ − 2.4 Å), smoothly clamped to [0.8, 9] eV.

    C̄ is the cation shift averaged over the formula's cations (``cation_shift``; a class name gives
    C[class]), d̄ the mean first-shell cation–anion bond length (Å)."""
    c = ONSET_CATION[cation_shift] if isinstance(cation_shift, str) else float(cation_shift)
    raw = ONSET_ANION[anion_class] + c - BOND_SLOPE * (bond_length_mean - BOND_REF)
    return _soft_clamp(raw, ONSET_MIN, ONSET_MAX)


def clean_spectrum(energy: np.ndarray, e0: float, coordination: str, anion_class: str, *,
                   threshold: float = 4.0, log_floor: float = 2.0) -> np.ndarray:
    """Noise-free log10 α on ``energy`` (eV) following the module's rule."""
    frac = min(max((threshold - log_floor) / EDGE_HEIGHT, 0.05), 0.95)
    s0 = math.log(frac / (1 - frac))
    w = EDGE_WIDTH[coordination]
    p1 = e0 + PEAK1_OFFSET[coordination]
    p2 = p1 + PEAK2_OFFSET[anion_class]
    x = (energy - e0) / w + s0
    edge = EDGE_HEIGHT / (1.0 + np.exp(-np.clip(x, -60, 60)))
    peaks = (PEAK_HEIGHTS[0] * np.exp(-0.5 * ((energy - p1) / PEAK_WIDTHS[0]) ** 2)
             + PEAK_HEIGHTS[1] * np.exp(-0.5 * ((energy - p2) / PEAK_WIDTHS[1]) ** 2))
    return log_floor + edge + peaks


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

def _data_cfg(cfg: Any) -> Any:
    """Accept a PipelineConfig or its DataConfig."""
    return cfg.data if hasattr(cfg, "data") else cfg


@lru_cache(maxsize=None)
def _element(symbol: str) -> Composition:
    """A cached single-element species (a Composition skips pymatgen's per-site parsing)."""
    return Composition({Element(symbol): 1})


def key_of(index: int, temperature: float | None = None) -> str:
    """Record key / material id of benchmark material ``index`` (at ``temperature`` K: ``bench-00012@300K``)."""
    base = f"bench-{index:05d}"
    return base if temperature is None else f"{base}@{temperature:g}K"


def parse_key(key: str) -> tuple[int, float | None]:
    """(index, temperature or None) of a key; raises ValueError for a malformed key."""
    base, _, temp = key.partition("@")
    if not base.startswith("bench-") or not base[6:].isdigit() or (temp and not temp.endswith("K")):
        raise ValueError(f"not a benchmark key: {key!r} (expected 'bench-<index>' or 'bench-<index>@<T>K')")
    try:
        t = float(temp[:-1]) if temp else None
    except ValueError:
        raise ValueError(f"not a benchmark key: {key!r} (temperature {temp!r} is not a number)") from None
    return int(base[6:]), t


def index_of(key: str) -> int:
    """The material index of a key (:func:`parse_key`); raises ValueError for a malformed key."""
    return parse_key(key)[0]


# ---------------------------------------------------------------------------------------------
# Temperature (benchmark.temperatures): a Varshni law with a structure-dependent coefficient
# ---------------------------------------------------------------------------------------------

#: Varshni alpha (meV/K) by anion class at the reference bond length: softer, heavier anions shift more
VARSHNI_ALPHA = {"halide": 0.3, "oxide": 0.5, "nitride": 0.7, "sulfide": 0.9, "selenide": 1.2, "telluride": 1.5}
VARSHNI_BOND = 1.0  # relative change of alpha per Å of bond_length_mean above BOND_REF (longer bonds: softer lattice)
VARSHNI_BETA = 300.0  # K


def varshni_alpha(anion_class: str, bond_length_mean: float) -> float:
    """alpha (meV/K) = VARSHNI_ALPHA[anion] x clip(1 + 1.0 /Å (d̄ - 2.4 Å), 0.4, 2.5)."""
    return VARSHNI_ALPHA[anion_class] * float(np.clip(1.0 + VARSHNI_BOND * (bond_length_mean - BOND_REF), 0.4, 2.5))


def varshni_shift(alpha_mev_per_k: float, temperature: float) -> float:
    """Onset shift (eV, <= 0) at ``temperature`` K: -alpha T^2 / (T + beta)."""
    t = float(temperature)
    return -1e-3 * alpha_mev_per_k * t * t / (t + VARSHNI_BETA)


def _choose(rng: np.random.Generator) -> tuple[Prototype, str, dict[str, tuple[str, int]]]:
    """Prototype, anion element and {role: (cation, oxidation)}, each uniform among the allowed."""
    protos = prototypes()
    proto = protos[int(rng.integers(len(protos)))]
    table = recipes()[proto.name]
    anions = sorted(table)
    anion = anions[int(rng.integers(len(anions)))]
    combo = table[anion][int(rng.integers(len(table[anion])))]
    return proto, anion, dict(zip(sorted(r for r in proto.stoich if r != "X"), combo))


def _structure(proto: Prototype, anion: str, cations: dict[str, tuple[str, int]], d: float,
               rng: np.random.Generator) -> Structure:
    """The prototype scaled to active bond length ``d`` (Å), atoms displaced by N(0, DISPLACEMENT²)."""
    lattice = proto.lattice * d
    species = [_element(anion if r == "X" else cations[r][0]) for r in proto.roles]
    disp = rng.normal(0.0, DISPLACEMENT, size=proto.frac.shape)
    return Structure(Lattice(lattice), species, proto.frac + disp @ np.linalg.inv(lattice))


def generate(cfg: Any, index: int, energy: np.ndarray | None = None, temperature: float | None = None) -> Material:
    """Benchmark material ``index`` for ``cfg`` (DataConfig or PipelineConfig); deterministic. At
    ``temperature`` (K) the whole spectrum is shifted by the material's Varshni law (the structure and
    its 0 K spectrum are those of the material; the noise is drawn per temperature)."""
    dc = _data_cfg(cfg)
    bc = dc.benchmark
    if energy is None:
        energy = energy_grid(dc.grid.start, dc.grid.stop, dc.grid.num)
    rng = np.random.default_rng([bc.seed, index])
    proto, anion, cations = _choose(rng)
    act_el, act_ox = cations[proto.active]
    an_class, an_q = ANIONS[anion]
    d0 = shannon_radius(act_el, act_ox, proto.cn[proto.active]) + shannon_radius(anion, an_q, 6)
    strain = float(rng.uniform(-STRAIN, STRAIN))
    d = d0 * (1.0 + strain)
    structure = _structure(proto, anion, cations, d, rng)
    cls = cation_class(act_el, act_ox)
    n_cat = sum(proto.stoich[r] for r in cations)
    c_shift = sum(proto.stoich[r] * ONSET_CATION[cation_class(*cations[r])] for r in cations) / n_cat
    d_mean = d * proto.bond_ratio
    e0 = onset_rule(an_class, c_shift, d_mean)
    e0_ground = e0
    alpha_t = varshni_alpha(an_class, d_mean)
    if temperature is not None:
        e0 = e0 + varshni_shift(alpha_t, temperature)
        rng = np.random.default_rng([bc.seed, index, int(round(temperature * 1000))])  # noise per temperature
    clean = clean_spectrum(energy, e0, proto.coordination, an_class,
                           threshold=dc.onset_threshold, log_floor=dc.log_floor)
    observed = clean + rng.normal(0.0, bc.noise, size=clean.shape) if bc.noise > 0 else clean
    if dc.transform == "alpha":
        observed = 10.0 ** observed
    on = float(onset_energy(energy, clean, dc.onset_threshold))
    p1 = e0 + PEAK1_OFFSET[proto.coordination]
    p2 = p1 + PEAK2_OFFSET[an_class]
    window = on + np.linspace(0.0, 1.0, 101)
    edge = clean_spectrum(window, e0, proto.coordination, an_class, threshold=dc.onset_threshold,
                          log_floor=dc.log_floor) - dc.log_floor
    inside = on + 1.0 <= energy[-1]
    props = {
        "prototype": proto.name, "anion": an_class, "anion_element": anion, "cation": act_el,
        "cation_oxidation": int(act_ox), "cation_class": cls, "coordination": proto.coordination,
        "bond_length_active": float(d), "bond_length_mean": float(d_mean), "cation_shift": float(c_shift),
        "strain": strain, "onset_param": float(e0), "onset": float(on),
        "edge_integral": float(np.trapezoid(edge, dx=0.01)) if inside else float("nan"),
        "peak_1": float(p1) if p1 <= energy[-1] else float("nan"),
        "peak_2": float(p2) if p2 <= energy[-1] else float("nan"),
    }
    key = key_of(index, temperature)
    if temperature is not None:
        props.update({"temperature": float(temperature), "structure_id": key_of(index), "varshni_alpha": alpha_t,
                      "onset_param_0K": float(e0_ground), "onset_shift": float(e0 - e0_ground)})
    return Material(id=key, structure=structure, formula=structure.composition.reduced_formula,
                    spectrum=observed.astype(np.float32), source="benchmark",
                    provenance={"file": "benchmark", "record": key, "seed": bc.seed, "index": index},
                    properties=props)


#: the planted per-material factors (Material.properties keys; the store's benchmark/<factor>)
FACTORS = ("prototype", "anion", "anion_element", "cation", "cation_oxidation", "cation_class", "coordination",
           "bond_length_active", "bond_length_mean", "cation_shift", "strain", "onset_param", "onset",
           "edge_integral", "peak_1", "peak_2", "varshni_alpha", "onset_param_0K", "onset_shift")


def benchmark_truth(cfg: Any) -> dict:
    """The benchmark's ground truth for the dataset attributes: drivers of each spectral feature
    (descriptor names of docs/architecture.md), the rule constants and the noise model."""
    dc = _data_cfg(cfg)
    bc = dc.benchmark
    return {
        "version": 1,
        "seed": bc.seed, "n_materials": bc.n_materials, "noise": bc.noise, "noise_floor": noise_floor(bc.noise),
        "noise_model": "additive Gaussian N(0, noise^2) on log10(alpha) at every grid point, after the floor",
        "features": {
            "onset": {"drivers": ["anion:*", "cation_class:*", "bond_length_mean"],
                      "rule": "E0 = A[anion] + mean over cations of C[cation_class] - 1.5 eV/A * (bond_length_mean - "
                              "2.4 A), soft-clamped to [0.8, 9] eV"},
            "edge_integral": {"drivers": ["coordination:*"],
                              "rule": "edge width W[coordination] and first-peak offset D1[coordination]"},
            "peak_1": {"drivers": ["anion:*", "cation_class:*", "bond_length_mean", "coordination:*"],
                       "primary": ["coordination:*"], "rule": "p1 = E0 + D1[coordination]"},
            "peak_2": {"drivers": ["anion:*", "cation_class:*", "bond_length_mean", "coordination:*"],
                       "primary": ["anion:*"], "rule": "p2 = p1 + D2[anion]"},
        },
        "parameters": {
            "onset_anion": ONSET_ANION, "onset_cation_class": ONSET_CATION, "bond_slope_eV_per_A": BOND_SLOPE,
            "bond_ref_A": BOND_REF, "edge_width_eV": EDGE_WIDTH, "peak1_offset_eV": PEAK1_OFFSET,
            "peak2_offset_eV": PEAK2_OFFSET, "edge_height_decades": EDGE_HEIGHT,
            "peak_heights_decades": list(PEAK_HEIGHTS), "peak_widths_eV": list(PEAK_WIDTHS),
            "onset_clamp_eV": [ONSET_MIN, ONSET_MAX], "strain": STRAIN, "displacement_A": DISPLACEMENT,
        },
        "prototypes": [p.name for p in prototypes()],
        "factors": list(FACTORS),
        **({"conditions": {"temperature": {
            "temperatures_K": list(bc.temperatures), "drivers": ["anion:*", "bond_length_mean"],
            "rule": f"E0(T) = E0(0 K) - alpha T^2 / (T + {VARSHNI_BETA:g} K); alpha (meV/K) = A_T[anion] x "
                    f"clip(1 + {VARSHNI_BOND} /A (bond_length_mean - {BOND_REF} A), 0.4, 2.5); the whole spectrum shifts",
            "alpha_anion_meV_per_K": VARSHNI_ALPHA, "beta_K": VARSHNI_BETA}}} if bc.temperatures else {}),
    }


class BenchmarkSource:
    """``source: benchmark``: keys ``bench-00000`` .. ``bench-<n-1>`` generated on demand."""

    name = "benchmark"

    def __init__(self, cfg: Any):
        self.cfg = _data_cfg(cfg)

    def scan(self) -> tuple[list[str], list[Reject]]:
        temps = self.cfg.benchmark.temperatures or [None]
        return [key_of(i, t) for i in range(self.cfg.benchmark.n_materials) for t in temps], []

    def load(self, keys: list[str]) -> Iterator[Material | Reject]:
        energy = energy_grid(self.cfg.grid.start, self.cfg.grid.stop, self.cfg.grid.num)
        for key in keys:
            try:
                idx, temp = parse_key(key)
            except ValueError as e:
                yield Reject("benchmark", key, str(e))
                continue
            yield generate(self.cfg, idx, energy, temp)

    def metadata(self) -> dict:
        return {"source": self.name, "path": None, "units": "eV", "transform": self.cfg.transform,
                "log_floor": self.cfg.log_floor, "seed": self.cfg.benchmark.seed,
                "n_materials": self.cfg.benchmark.n_materials, "noise": self.cfg.benchmark.noise,
                "noise_floor": noise_floor(self.cfg.benchmark.noise)}
