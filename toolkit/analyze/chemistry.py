"""Chemistry behind the descriptors of :mod:`toolkit.analyze.descriptors`: oxidation states (with the
method that found them), cation classes, d-electron counts and polyanion units.

Everything here states how it was obtained or why it could not be: an oxidation assignment carries
its method (``bond_valence``, ``charge_balance``, ``charge_balance_mixed_valence``,
``charge_balance_all_states``) or the reasons every method failed; nothing is filled in silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

#: the anion's usual state, fixed in the last charge-balance attempt (``charge_balance_all_states``)
ANION_STATE = {"O": -2, "S": -2, "Se": -2, "Te": -2, "N": -3, "F": -1, "Cl": -1, "Br": -1, "I": -1}
#: p-block / metalloid centres of polyanion units (XO3, XO4, thio- and halo- analogues)
POLYANION_CENTRES = frozenset({"B", "C", "N", "Si", "Ge", "P", "As", "Sb", "S", "Se", "Te", "Cl", "Br", "I"})
#: high-valent transition-metal centres of oxo-tetrahedra (VO4, CrO4, MoO4, WO4, MnO4, ReO4, TcO4); d0 only
POLYANION_TM_CENTRES = frozenset({"V", "Cr", "Mo", "W", "Mn", "Tc", "Re"})
#: a p-block centre's bonds must be shorter than this x the sum of covalent radii (Cordero 2008,
#: pymatgen ``CovalentRadius``): P-O 1.54 vs 1.73 Å, S-O 1.47 vs 1.71, Si-O 1.62 vs 1.77, C-O 1.28 vs 1.39
POLYANION_BOND_FACTOR = 1.15
#: a transition-metal centre's bonds to O must be shorter than this (Å; MoO4 1.77, WO4 1.78, VO4 1.72,
#: CrO4 1.65 against 1.87-2.05 for tetrahedral Fe3+/Zn2+/Co2+/Mn2+ - O); other anions: + (r_X - r_O)
POLYANION_TM_MAX_BOND_O = 1.85
#: caps that keep the combinatorial charge-balance enumeration cheap
_MIXED_MAX_ATOMS = 40  # atoms of the doubled formula
_MAX_ENUMERATION = 200_000  # state combinations of the all-states attempt (:func:`_enumeration_cost`)


def _enumeration_cost(states: dict[str, list[int]], amounts: dict[str, int]) -> int:
    """Upper bound of the combinations ``oxi_state_guesses`` enumerates: per element the multisets of
    its states (or the distinct sums, whichever is fewer), multiplied over elements."""
    from math import comb

    cost = 1
    for el, n in amounts.items():
        st = states[el]
        cost *= min(comb(len(st) + n - 1, n), n * (max(st) - min(st)) + 1)
    return cost


@dataclass
class Oxidation:
    """An oxidation-state assignment of one structure.

    ``site``: per-site state (float; for a charge-balance assignment the element's average, since it
    does not say which site holds which state of a mixed-valence element), None when every method
    failed. ``states``: element -> multiset of integer states (per site of the cell for bond valence,
    per formula unit for charge balance; in both cases proportional to the composition).
    ``method``: how it was found. ``reason``: why every method failed (None on success), or, on a
    fallback, why the preferred method failed."""

    site: np.ndarray | None
    states: dict[str, list[int]] = field(default_factory=dict)
    method: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.site is not None

    def cations(self) -> set[str]:
        return {el for el, st in self.states.items() if any(s > 0 for s in st)}

    def anions(self) -> set[str]:
        return {el for el, st in self.states.items() if any(s < 0 for s in st)}


def bond_valence(structure) -> tuple[dict[str, list[int]] | None, np.ndarray | None, str | None]:
    """pymatgen ``BVAnalyzer().get_valences`` (states per site), or (None, None, reason)."""
    from pymatgen.analysis.bond_valence import BVAnalyzer

    try:
        val = BVAnalyzer().get_valences(structure)
    except Exception as e:  # noqa: BLE001 - ValueError for non charge-balanced / unknown sites, others
        return None, None, f"BVAnalyzer: {type(e).__name__}: {e}"[:200]
    states: dict[str, list[int]] = {}
    for sp, v in zip(structure.species, val):
        states.setdefault(sp.symbol, []).append(round(float(v)))
    return states, np.asarray(val, dtype=np.float64), None


def _guess(formula, max_sites, override=None) -> dict[str, tuple[int, ...]] | None:
    """Most probable charge-balanced combination of integer states per element (pymatgen's
    ``Composition.oxi_state_guesses``, whose private helper also returns the per-atom combination)."""
    from pymatgen.core import Composition

    comp = Composition(formula)
    try:
        try:
            _, combos = comp._get_oxi_state_guesses(False, max_sites, override or {}, 0)
        except (AttributeError, TypeError):  # helper changed: the public API gives element averages
            sols = comp.oxi_state_guesses(oxi_states_override=override, max_sites=max_sites)
            combos = [{el: (round(v),) for el, v in s.items()} for s in sols]
    except Exception:  # noqa: BLE001 - pymatgen raises various errors for exotic compositions
        return None
    return {str(el): tuple(int(x) for x in c) for el, c in combos[0].items()} if combos else None


@lru_cache(maxsize=65536)
def charge_balance(reduced_formula: str) -> tuple[dict[str, tuple[int, ...]] | None, str | None, str]:
    """(element -> integer states of one formula unit, method, reason) from the composition alone.

    Tried in order, the first that balances wins:

    1. ``charge_balance``: ``oxi_state_guesses`` on the reduced formula with pymatgen's default states
       (ICSD-frequent, else common ones);
    2. ``charge_balance_mixed_valence``: the same on the doubled formula, unreduced, so that one
       element can take two states (Sb2O4 = Sb3+ Sb5+, SrBiO3 = Sr2 Bi3+ Bi5+ O6, PtI3 = Pt2+ Pt4+ I6),
       with the most electronegative element the only anion, fixed at its usual state, and the others
       restricted to their positive default states (so a polyiodide such as CsI4 is not balanced with
       I5+, nor Se2Cl2 with Se2- Se4+; only when that element is O, S, Se, Te, N or a halogen);
    3. ``charge_balance_all_states``: the most electronegative element fixed at its usual anion state
       (O2-, S2-, N3-, halide-; only when it is one of those) and every other element allowed any
       positive state pymatgen lists (``Element.oxidation_states``; OsO4 = Os8+, RbIO4 = I7+,
       ICl = I+, AlICl6 = Al3+ I3+), on the reduced formula, then on the doubled one.

    A single element or an assignment with no positive state is a failure (no cation)."""
    from pymatgen.core import Composition, Element

    comp = Composition(reduced_formula)
    if len(comp.elements) == 1:
        return None, None, "charge balance: a single element has no cation"
    guess = _guess(reduced_formula, -50)
    method = "charge_balance"
    top = max(comp.elements, key=lambda e: e.X if np.isfinite(e.X) else -1).symbol
    if guess is None and top in ANION_STATE and 2 * comp.num_atoms <= _MIXED_MAX_ATOMS:
        default = {el.symbol: [s for s in (el.icsd_oxidation_states or el.common_oxidation_states) if s > 0]
                   for el in comp.elements}
        default[top] = [ANION_STATE[top]]
        if all(default.values()):
            guess, method = _guess(comp * 2, None, default), "charge_balance_mixed_valence"
    if guess is None:
        amounts = comp.get_el_amt_dict()
        override = {el: [ANION_STATE[el]] if el == top else [s for s in Element(el).oxidation_states if s > 0]
                    for el in amounts} if top in ANION_STATE else {}
        # the reduced formula (one state per element), then doubled (two states of an element)
        for k in (1, 2):
            if guess is None and override and all(override.values()) and \
                    _enumeration_cost(override, {el: k * int(a) for el, a in amounts.items()}) <= _MAX_ENUMERATION:
                guess, method = _guess(comp * k, None, override), "charge_balance_all_states"
    if guess is None:
        return None, None, f"charge balance: no assignment balances {reduced_formula}"
    if not any(s > 0 for st in guess.values() for s in st):
        return None, None, f"charge balance: every element of {reduced_formula} at 0 (no cation)"
    return guess, method, ""


def oxidation_states(structure, use_bond_valence: bool = True) -> Oxidation:
    """Bond valence first (when ``use_bond_valence``), else / then :func:`charge_balance` of the
    reduced formula (cached per formula)."""
    reasons = []
    if use_bond_valence:
        states, site, why = bond_valence(structure)
        if states is not None and any(s > 0 for st in states.values() for s in st):
            return Oxidation(site, states, "bond_valence", None)
        reasons.append(why or "BVAnalyzer: every site at 0 (no cation)")
    guess, method, why = charge_balance(structure.composition.reduced_formula)
    if guess is None:
        reasons.append(why)
        return Oxidation(None, {}, None, "; ".join(reasons))
    mean = {el: float(np.mean(st)) for el, st in guess.items()}
    site = np.array([mean[sp.symbol] for sp in structure.species], dtype=np.float64)
    return Oxidation(site, {el: list(st) for el, st in guess.items()}, method, "; ".join(reasons) or None)


def is_d_block(el) -> bool:
    """Transition metal with a valence d shell (groups 3-12 without the f-block La-Lu, Ac-Lr)."""
    return bool(el.is_transition_metal) and not (57 <= el.Z <= 71 or 89 <= el.Z <= 103)


def cation_classes(el, oxi: int | None) -> list[str]:
    """Classes of one cation species: alkali, alkaline_earth, rare_earth (Sc, Y, La-Lu) from the
    element; with an oxidation state: d0 / partial_d / d10 for d-block cations (d count = group -
    state), d10 also for p-block cations of period >= 4 that lost every valence s and p electron
    (Ga3+, In3+, Ge4+, Sn4+, Sb5+, Te6+, Tl3+, Pb4+, Bi5+, I7+), lone_pair_p for ns2 p-block cations
    (state = group - 12: Tl+, In+, Ge2+, Sn2+, Pb2+, As3+, Sb3+, Bi3+, Se4+, Te4+, I5+, Cl5+)."""
    out = []
    if el.is_alkali:
        out.append("alkali")
    if el.is_alkaline:
        out.append("alkaline_earth")
    if 57 <= el.Z <= 71 or el.symbol in ("Sc", "Y"):
        out.append("rare_earth")
    if oxi is not None and el.is_transition_metal and not (57 <= el.Z <= 71 or 89 <= el.Z <= 103):
        d = el.group - round(oxi)
        out.append("d0" if d == 0 else "d10" if d == 10 else "partial_d" if 0 < d < 10 else "other")
    elif oxi is not None and el.group in (13, 14, 15, 16, 17) and oxi > 0:
        o = round(oxi)
        if o == el.group - 12:
            out.append("lone_pair_p")
        elif o == el.group - 10 and el.Z >= 31:
            out.append("d10")
    if not out:
        out.append("other")
    return out


def d_electrons(oxi: Oxidation, elements) -> tuple[float, float] | str:
    """(mean, max) d-electron count (group - state) over the d-block cations (site-weighted), (0, 0)
    when the material has no d-block element; a reason string when it cannot be computed."""
    tm = [el for el in elements if is_d_block(el)]
    if not tm:
        return 0.0, 0.0
    if not oxi.ok:
        return f"no oxidation state ({oxi.reason})"
    d = [el.group - s for el in tm for s in oxi.states.get(el.symbol, []) if s > 0]
    if not d:
        return 0.0, 0.0  # d-block elements present, none of them a cation (e.g. an auride)
    d = np.clip(np.asarray(d, dtype=np.float64), 0, 10)
    return float(d.mean()), float(d.max())


@lru_cache(maxsize=256)
def _covalent_radius(symbol: str) -> float:
    from pymatgen.analysis.molecule_structure_comparator import CovalentRadius

    return float(CovalentRadius.radius.get(symbol, np.nan))


def polyanions(syms: np.ndarray, centre: np.ndarray, nbr: np.ndarray, dist: np.ndarray, anions: set[str],
               site_oxi: np.ndarray | None) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """Polyanion units from the bond arrays.

    A unit is a centre site (element in :data:`POLYANION_CENTRES`, or a d0 site of
    :data:`POLYANION_TM_CENTRES` - by its oxidation state when known, by its bond lengths alone when
    not) that is not an anion, has 3 or 4 neighbours, all of them anion sites (O, S, Se, Te, N or a
    halogen with a negative state), all at short bond
    lengths (:data:`POLYANION_BOND_FACTOR`, :data:`POLYANION_TM_MAX_BOND_O`). Named by centre + ligands
    (``PO4``, ``SO4``, ``CO3``, ``PS4``, ``PO3F``).

    Returns ({unit name: number of centre sites}, boolean mask of those anion sites,
    boolean mask of anion sites bound in a unit)."""
    from pymatgen.core import Element

    n = len(syms)
    is_anion = np.isin(syms, sorted(set(anions) & set(ANION_STATE)))
    if site_oxi is not None:
        is_anion &= site_oxi < 0
    bound = np.zeros(n, dtype=bool)
    cand_el = [s for s in set(syms.tolist()) if s in POLYANION_CENTRES or s in POLYANION_TM_CENTRES]
    if not cand_el or not len(centre) or not is_anion.any():
        return {}, is_anion, bound
    deg = np.bincount(centre, minlength=n)
    cand = np.isin(syms, cand_el) & ~is_anion & np.isin(deg, (3, 4))
    if site_oxi is not None:
        cand &= site_oxi > 0
    tm = np.isin(syms, sorted(POLYANION_TM_CENTRES))
    if site_oxi is not None and tm.any():  # d0 only
        groups = np.array([Element(s).group if t else 0 for s, t in zip(syms, tm)])
        cand &= ~tm | (np.rint(site_oxi) == groups)
    if not cand.any():
        return {}, is_anion, bound
    rcov = np.array([_covalent_radius(s) for s in syms])
    limit = np.where(tm[centre], POLYANION_TM_MAX_BOND_O + rcov[nbr] - _covalent_radius("O"),
                     POLYANION_BOND_FACTOR * (rcov[centre] + rcov[nbr]))
    bad = ~(is_anion[nbr] & (dist <= limit))  # NaN radius -> not short
    unit = cand & (np.bincount(centre, weights=bad.astype(np.float64), minlength=n) == 0)
    if not unit.any():
        return {}, is_anion, bound
    on = unit[centre]
    bound[nbr[on]] = True
    counts: dict[str, int] = {}
    for i in np.flatnonzero(unit):  # one per unit site (few), not per bond
        lig, k = np.unique(syms[nbr[centre == i]], return_counts=True)
        order = sorted(zip(lig.tolist(), k.tolist()), key=lambda t: (-t[1], t[0]))
        name = syms[i] + "".join(f"{el}{c if c > 1 else ''}" for el, c in order)
        counts[name] = counts.get(name, 0) + 1
    return counts, is_anion, bound
