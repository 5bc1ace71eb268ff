"""Documented structural edits (pymatgen) for the counterfactual probes.

Every edit of a structure is an :class:`Edit`: a type (``EDIT_TYPES``), a label that groups equal edits
across materials (``"S->Se"``, ``"+2%"``), details, and either the edited ``Structure`` or the reason it
was not made (``reason`` in the ``"<kind>: <specifics>"`` form of :func:`toolkit.data.readers.common.reason`).

Rules:

* **Oxidation states**: ``Composition.oxi_state_guesses`` of the reduced formula (the most probable
  guess); formulas of more than ``MAX_GUESS_ATOMS`` atoms, or without a guess, fall back to: elements of
  ``ANION_CHARGE`` are anions with that charge, every other element a cation with its most common positive
  oxidation state.
* **cation_substitution**: every element with a positive oxidation state q is replaced (all its sites) by
  candidates of ``CATION_POOL`` (the benchmark's cation table, :data:`toolkit.data.benchmark.CATIONS`) with the
  same charge q: up to ``max_same_family`` of the same periodic-table group (family) and up to
  ``max_other_family`` of other groups, each list ordered by closeness of the Shannon radius (CN 6).
* **anion_substitution**: each chalcogen (O, S, Se, Te) by the other chalcogens, each halogen (F, Cl, Br,
  I) by the other halogens.
* Substitutions with ``rescale``: the lattice is scaled isotropically by ``1 + w (f - 1)`` with
  ``f = (r_new + r_partner) / (r_old + r_partner)`` (Shannon radii at CN 6; r_partner = the mean radius of the
  counter-ions, anions for a cation and cations for an anion, weighted by count) and ``w`` = the fraction of
  that sublattice's sites the substituted element holds (a minority ion changes the cell less).
* **strain**: the lattice scaled uniformly by ``1 + s`` for each ``s`` of ``strains`` (fractional
  coordinates kept: every bond length changes by ``s``).
* **shell_strain**: for the first site of each cation element, its first shell (neighbours within
  ``SHELL_FACTOR`` x its nearest-neighbour distance) is moved radially so every centre–neighbour distance
  changes by ``s``; the rest of the structure is untouched. Where the shell holds two periodic images of
  one atom (small cells) the edit is made in the smallest n x n x n supercell (n <= 3) where it does not
  (``detail.supercell``); refused when even that fails.
* **polyanion_centre**: where a ``POLYANION_CENTRES`` element has >= 3 oxygen neighbours within
  ``POLYANION_BOND`` Å (a PO4 / SO4 / SiO4 unit), all such centres are replaced by another element of the
  same charge (P5+ -> As, V; S6+ -> Se, Cr; Si4+ -> Ge, Ti); geometry kept.

Every edited structure is checked with :func:`toolkit.data.readers.common.structure_problem` (atoms too
close, degenerate cell); a failing one becomes a reject with that reason.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any

import numpy as np
from pymatgen.core import Composition, Element, Lattice, Structure

from toolkit.data.benchmark import CATIONS
from toolkit.data.readers.common import reason, structure_problem

ANION_CHARGE = {"O": -2, "S": -2, "Se": -2, "Te": -2, "F": -1, "Cl": -1, "Br": -1, "I": -1, "N": -3}
CHALCOGENS = ("O", "S", "Se", "Te")
HALOGENS = ("F", "Cl", "Br", "I")
#: (element, oxidation state) of every cation substitution candidate
CATION_POOL: tuple[tuple[str, int], ...] = tuple(sorted(CATIONS))
POLYANION_CENTRES = {"P": (5, ("As", "V")), "S": (6, ("Se", "Cr")), "Si": (4, ("Ge", "Ti"))}
POLYANION_BOND = 1.9
SHELL_FACTOR = 1.2
MAX_GUESS_ATOMS = 24

log = logging.getLogger(__name__)


@dataclass
class Edit:
    """One edited structure (or why there is none)."""

    type: str
    label: str
    detail: dict[str, Any] = field(default_factory=dict)
    structure: Structure | None = None
    reason: str | None = None


def structure_from_record(rec: dict) -> Structure:
    """pymatgen Structure of a dataset material (``numbers``, ``frac_coords``, ``lattice``)."""
    return Structure(Lattice(np.asarray(rec["lattice"], dtype=np.float64)),
                     [int(z) for z in rec["numbers"]], np.asarray(rec["frac_coords"], dtype=np.float64))


@lru_cache(maxsize=4096)
def _guess(formula: str) -> tuple[tuple[str, float], ...]:
    comp = Composition(formula)
    if comp.num_atoms <= MAX_GUESS_ATOMS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                guesses = comp.oxi_state_guesses(max_sites=-1)
            if guesses:
                return tuple(sorted(guesses[0].items()))
        except Exception as e:  # noqa: BLE001 - fall back to the simple rule
            log.debug("oxi_state_guesses(%s) failed (%s); using the simple rule", formula, e)
    out = []
    for el in comp.elements:
        sym = el.symbol
        if sym in ANION_CHARGE and len(comp.elements) > 1:
            out.append((sym, float(ANION_CHARGE[sym])))
        else:
            pos = [o for o in el.common_oxidation_states if o > 0]
            out.append((sym, float(pos[0]) if pos else 0.0))
    return tuple(sorted(out))


def oxidation_states(structure: Structure) -> dict[str, int]:
    """Element symbol -> oxidation state (see the module docstring)."""
    return {k: round(v) for k, v in _guess(structure.composition.reduced_formula)}


@cache
def ionic_radius(symbol: str, charge: int) -> float | None:
    """Shannon radius at CN 6 (nearest tabulated CN), else pymatgen's average ionic radius; None if unknown."""
    from toolkit.data.benchmark import shannon_radius

    try:
        return shannon_radius(symbol, int(charge), 6)
    except (KeyError, ValueError, StopIteration):
        r = float(getattr(Element(symbol), "average_ionic_radius", 0) or 0)
        return r if r > 0 else None


def _family(symbol: str) -> int:
    return int(Element(symbol).group)


def cation_candidates(symbol: str, charge: int, max_same: int, max_other: int) -> list[tuple[str, str]]:
    """[(replacement, "same_family" | "other_family")] for cation ``symbol`` of charge ``charge``."""
    r0 = ionic_radius(symbol, charge) or 0.0
    pool = [el for el, q in CATION_POOL if q == charge and el != symbol]

    def key(el: str) -> tuple[float, str]:
        r = ionic_radius(el, charge)
        return (abs((r if r is not None else 9.0) - r0), el)

    fam = _family(symbol)
    same = sorted((el for el in pool if _family(el) == fam), key=key)[:max_same]
    other = sorted((el for el in pool if _family(el) != fam), key=key)[:max_other]
    return [(el, "same_family") for el in same] + [(el, "other_family") for el in other]


def anion_candidates(symbol: str) -> list[str]:
    for group in (CHALCOGENS, HALOGENS):
        if symbol in group:
            return [el for el in group if el != symbol]
    return []


def _rescale_factor(structure: Structure, ox: dict[str, int], old: str, new: str) -> float:
    q = ox[old]
    cations = q > 0
    counts = structure.composition.element_composition.get_el_amt_dict()
    partners = {el: n for el, n in counts.items() if (ox.get(el, 0) < 0 if cations else ox.get(el, 0) > 0)}
    same_side = {el: n for el, n in counts.items() if (ox.get(el, 0) > 0 if cations else ox.get(el, 0) < 0)}
    r_old, r_new = ionic_radius(old, q), ionic_radius(new, q)
    rp = [(ionic_radius(el, ox[el]), n) for el, n in partners.items()]
    rp = [(r, n) for r, n in rp if r is not None]
    if r_old is None or r_new is None or not rp:
        return 1.0
    r_partner = sum(r * n for r, n in rp) / sum(n for _, n in rp)
    f = (r_new + r_partner) / (r_old + r_partner)
    w = counts[old] / max(sum(same_side.values()), counts[old])
    return 1.0 + w * (f - 1.0)


def substitute(structure: Structure, old: str, new: str, scale: float = 1.0) -> Structure:
    s = structure.copy()
    s.replace_species({old: new})
    if scale != 1.0:
        s.scale_lattice(s.volume * scale ** 3)
    return s


def _check(edit: Edit, min_distance: float) -> Edit:
    if edit.structure is not None:
        problem = structure_problem(edit.structure, min_distance)
        if problem:
            edit.reason, edit.structure = problem, None
    return edit


def _shell(structure: Structure, site: int) -> tuple[list, str | None]:
    r = 3.5
    nbrs = []
    for _ in range(4):
        nbrs = structure.get_neighbors(structure[site], r)
        if nbrs:
            break
        r *= 1.5
    if not nbrs:
        return [], reason("no first shell", f"site {site} has no neighbour within {r:.1f} Å")
    d1 = min(n.nn_distance for n in nbrs)
    return [n for n in nbrs if n.nn_distance <= SHELL_FACTOR * d1], None


SUPERCELLS = (1, 2, 3)


def shell_strain(structure: Structure, site: int, strain: float) -> tuple[Structure | None, str | None, dict]:
    """Move the first shell of ``site`` radially by ``strain``; (structure, reject reason, details).

    When the shell holds two periodic images of one atom (small cells), the edit is made in the smallest
    n x n x n supercell (n <= 3) where it does not: the model sees a local distortion in a larger cell."""
    for n in SUPERCELLS:
        s = structure if n == 1 else structure * (n, n, n)
        centre_site = site * n ** 3 if n > 1 else site  # pymatgen's supercell keeps images of a site together
        shell, why = _shell(s, centre_site)
        if why:
            return None, why, {}
        idx = [int(x.index) for x in shell]
        if len(set(idx)) == len(idx) and centre_site not in idx:
            break
    else:
        return None, reason("shell has periodic images", f"the first shell of site {site} holds two images of one "
                                                         f"atom even in a {n}x{n}x{n} supercell"), {}
    centre = s[centre_site].coords
    cart = s.cart_coords.copy()
    for x in shell:
        cart[x.index] = cart[x.index] + strain * (x.coords - centre)
    out = Structure(s.lattice, s.species, cart, coords_are_cartesian=True)
    return out, None, {"shell_size": len(shell), "supercell": n}


def polyanion_units(structure: Structure, ox: dict[str, int]) -> dict[str, list[int]]:
    """Centre element -> sites that are centres of an XO4-like unit (>= 3 O within POLYANION_BOND Å)."""
    out: dict[str, list[int]] = {}
    if "O" not in ox:
        return out
    for i, site in enumerate(structure):
        sym = site.specie.symbol
        if sym not in POLYANION_CENTRES or ox.get(sym, 0) <= 0:
            continue
        n_o = sum(1 for n in structure.get_neighbors(site, POLYANION_BOND) if n.specie.symbol == "O")
        if n_o >= 3:
            out.setdefault(sym, []).append(i)
    return out


def make_edits(structure: Structure, opts: Any, min_distance: float) -> list[Edit]:
    """Every edit ``opts`` asks for (an :class:`~toolkit.explain.options.ExplainOptions`), in a fixed order."""
    ox = oxidation_states(structure)
    present = sorted(ox, key=lambda el: Element(el).Z)
    edits: list[Edit] = []
    want = set(opts.edits)
    if "cation_substitution" in want:
        for el in present:
            q = ox[el]
            if q <= 0:
                continue
            cands = cation_candidates(el, q, opts.max_same_family, opts.max_other_family)
            if not cands:
                edits.append(Edit("cation_substitution", f"{el}->?", {"from": el, "charge": q},
                                  reason=reason("no candidate", f"no {el}{q:+d} replacement of the same charge")))
            for new, rel in cands:
                f = _rescale_factor(structure, ox, el, new) if opts.rescale else 1.0
                edits.append(_check(Edit("cation_substitution", f"{el}->{new}",
                                         {"from": el, "to": new, "charge": q, "relation": rel, "scale": f},
                                         substitute(structure, el, new, f)), min_distance))
    if "anion_substitution" in want:
        for el in present:
            if ox[el] >= 0:
                continue
            for new in anion_candidates(el):
                f = _rescale_factor(structure, ox, el, new) if opts.rescale else 1.0
                edits.append(_check(Edit("anion_substitution", f"{el}->{new}",
                                         {"from": el, "to": new, "charge": ox[el], "scale": f},
                                         substitute(structure, el, new, f)), min_distance))
    if "strain" in want:
        for s in opts.strains:
            st = structure.copy()
            st.scale_lattice(st.volume * (1.0 + s) ** 3)
            edits.append(_check(Edit("strain", f"{100 * s:+g}%", {"strain": s}, st), min_distance))
    if "shell_strain" in want:
        for el in present:
            if ox[el] <= 0:
                continue
            site = next(i for i, x in enumerate(structure) if x.specie.symbol == el)
            for s in opts.shell_strains:
                new, why, info = shell_strain(structure, site, s)
                edits.append(_check(Edit("shell_strain", f"{el} shell {100 * s:+g}%",
                                         {"site": site, "element": el, "strain": s, **info}, new, why),
                                    min_distance))
    if "polyanion_centre" in want:
        for centre, sites in polyanion_units(structure, ox).items():
            q, repl = POLYANION_CENTRES[centre]
            for new in repl:
                s = structure.copy()
                for i in sites:
                    s.replace(i, new)
                edits.append(_check(Edit("polyanion_centre", f"{centre}O4: {centre}->{new}",
                                         {"from": centre, "to": new, "charge": q, "n_units": len(sites)}, s),
                                    min_distance))
    return edits
