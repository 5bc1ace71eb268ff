"""One signal per slot: fold descriptors that say the same thing into one entry of a ranking.

A cluster of Tl(I) sulfides is significantly enriched in ``oxidation:Tl+1``, ``element:Tl``,
``cation_class:lone_pair_p``, ``anion:sulfide`` and ``element:S``: five tests, two facts. Ranked by q
alone, the first three places go to one fact, and a second driver of the cluster (here the anion or
the bond length) falls out of the top 3 a reader looks at. :func:`condense` walks a ranking (a
cluster's enrichment tests, or one side of a hierarchy split) and merges an entry into an earlier
*head* when the two are the same signal on the dataset:

* **redundant**: |Spearman| >= ``rho`` between the two descriptors over all materials (a sample of at
  most ``max_rows``), e.g. ``element:S`` / ``anion:sulfide`` or ``volume_per_atom`` / ``bond_length_mean``
  (never a cation with an anion descriptor: :func:`_axis`);
* **nested**: both 0/1, both more prevalent in the group, and the carriers of one are (>= ``nest``)
  carriers of the other on one axis (:meth:`SignalIndex.nested`), e.g. ``oxidation:Tl+1`` within
  ``cation_class:lone_pair_p``, ``anion:iodide`` within ``anion:halide``.

Which one heads the merged entry (:meth:`SignalIndex.prefer`), in this order:

1. a descriptor the driver ranking (:mod:`toolkit.analyze.drivers`) flags as riding along with another
   (``confounded_with``, judged for the spectral feature where it is most important) yields to one
   that is not: the correlated proxy is listed, the tested cause heads;
2. of two nested 0/1 descriptors, the general one heads when it covers the group as well (its
   prevalence in the group at least the specific one's minus ``cover_slack``): "lone-pair cations
   (Tl+1)" rather than "Tl+1"; within one family the specific class heads when it covers the group as
   well ("iodides" says "halides"), else the general one ("halides (with bromides)");
3. a chemical class (anion, cation class, coordination, polyanion families) heads an element or
   oxidation-state identity, or a symmetry label;
4. of two descriptors of the same standing, the one the spectra depend on at least twice as much
   (its largest permutation importance over the spectral features, :func:`importances`) heads:
   "long bonds (with large volume per atom)" when the onset follows the bond length;
5. otherwise the earlier (better ranked) entry.

An entry related to members of several groups merges them (one signal seen through several
descriptors: ``anion:halide`` - ``anion:bromide`` - ``element:Br``). The head keeps its own statistics
and lists the merged names under ``covers`` (in ranking order); the merged group takes the place of
its best-ranked member. Folded names are *not* aliases: aliases
(:func:`toolkit.analyze.attribution.dedupe_categorical`) are identical columns, ``covers`` are
different descriptors carrying the same signal here. Entries that are not significant are kept as
they are, after the condensed significant ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from toolkit.analyze.descriptors import DescriptorTable, family, is_categorical

RHO = 0.8  # |Spearman| at which two descriptors are one signal
NEST = 0.95  # share of a 0/1 descriptor's carriers that carry the other: nested
IMPORTANCE_RATIO = 0.5  # of two proxies, the one the spectra depend on at least twice as much heads
COVER_SLACK = 0.05  # the general class heads when it covers the group at least this close to the specific one
MAX_ROWS = 20_000  # materials used for the relations (a seeded sample above)
#: families that name a chemical class (preferred as heads over identities and symmetry labels)
CLASS_FAMILIES = ("anion", "cation_class", "coordination", "polyanion", "oxidation_class")
IDENTITY_FAMILIES = ("element", "oxidation", "spacegroup", "crystal_system")


def importances(drivers: dict[str, Any] | None) -> dict[str, float]:
    """Each descriptor's largest permutation importance over the spectral features of the driver
    ranking (reference and ``pred:``), riders included: how much the spectra depend on it at most."""
    out: dict[str, float] = {}
    for res in (drivers or {}).values():
        for r in res.get("descriptors") or []:
            out[r["descriptor"]] = max(out.get(r["descriptor"], 0.0), float(r.get("importance") or 0.0))
    return out


def riders(drivers: dict[str, Any] | None) -> set[str]:
    """Descriptors flagged ``confounded_with`` by the driver ranking in the spectral feature where
    their importance is largest (over the reference features and the ``pred:`` ones)."""
    best: dict[str, tuple[float, bool]] = {}
    for res in (drivers or {}).values():
        for r in res.get("descriptors") or []:
            imp = float(r.get("importance") or 0.0)
            cur = best.get(r["descriptor"])
            if cur is None or imp > cur[0]:
                best[r["descriptor"]] = (imp, r.get("confounded_with") is not None)
    return {d for d, (_, rider) in best.items() if rider}


class SignalIndex:
    """Relations between the tested descriptors ``names`` of ``table`` (Spearman correlation over at
    most ``max_rows`` materials; carriers of the 0/1 descriptors), and the rider set."""

    def __init__(self, table: DescriptorTable, names: list[str], rider_set: set[str] | None = None,
                 seed: int = 0, max_rows: int = MAX_ROWS, rho: float = RHO, nest: float = NEST,
                 cover_slack: float = COVER_SLACK, importance: dict[str, float] | None = None) -> None:
        from toolkit.analyze.drivers import _spearman_matrix

        n = len(table.ids)
        rows = np.arange(n) if n <= max_rows else np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))
        names = [nm for nm in names if nm in table.names]
        x = table.select(names).values[rows] if names else np.zeros((len(rows), 0))
        self.index = {nm: j for j, nm in enumerate(names)}
        self.corr = _spearman_matrix(x) if names else np.zeros((0, 0))
        cat = np.array([is_categorical(nm) for nm in names], dtype=bool)
        self.carrier = {nm: np.nan_to_num(x[:, j], nan=0.0) > 0.5 for j, nm in enumerate(names) if cat[j]}
        self.riders = set(rider_set or ())
        self.importance = dict(importance or {})
        self.rho, self.nest, self.cover_slack = rho, nest, cover_slack

    # -- relations
    def correlated(self, a: str, b: str) -> bool:
        """|Spearman| >= rho, except for a cation and an anion descriptor (:func:`_axis`): a cation and
        an anion that always come together here are still two findings."""
        i, j = self.index.get(a), self.index.get(b)
        if i is None or j is None or abs(self.corr[i, j]) < self.rho:
            return False
        return not (a in self.carrier and b in self.carrier and {_axis(a), _axis(b)} == {"anion", "cation"})

    def within(self, a: str, b: str) -> bool:
        """Whether (nearly) every carrier of 0/1 descriptor ``a`` carries ``b``."""
        ca, cb = self.carrier.get(a), self.carrier.get(b)
        if ca is None or cb is None or not ca.any():
            return False
        return float((ca & cb).sum()) / float(ca.sum()) >= self.nest

    def nested(self, a: str, b: str) -> tuple[str, str] | None:
        """(specific, general) when one 0/1 descriptor's carriers lie within the other's on one axis:
        an element or oxidation state within a class or another identity (``oxidation:Tl+1`` within
        ``cation_class:lone_pair_p`` or ``element:Tl``), or two classes of one family (``anion:iodide``
        within ``anion:halide``), never across axes (:func:`_axis`: a Tl compound that happens to be a
        sulfide in every case stays two findings). Classes of different families never nest (a
        phosphate is an oxide, but the PO4 unit is a finding of its own)."""
        for spec, gen in ((a, b), (b, a)):
            same_axis = _axis(spec) == _axis(gen) and (family(spec) in IDENTITY_FAMILIES or family(spec) == family(gen))
            if same_axis and self.within(spec, gen) and not self.within(gen, spec):
                return spec, gen
        return None

    # -- which heads a merged group
    def prefer(self, h: str, r: str, prev: Callable[[str], float]) -> str:
        """The head of the group of ``h`` (current head) and ``r`` (module doc, rules 1-5)."""
        if (h in self.riders) != (r in self.riders):
            return r if h in self.riders else h
        nest = self.nested(h, r)
        if nest is not None:
            spec, gen = nest
            if family(spec) == family(gen):  # "iodides" says "halides" too, when they are the group's halides
                return spec if prev(spec) >= prev(gen) - self.cover_slack else gen
            return gen if prev(gen) >= prev(spec) - self.cover_slack else spec
        ch, cr = _class_rank(h), _class_rank(r)
        if ch != cr:
            return h if ch < cr else r
        ih, ir = self.importance.get(h, 0.0), self.importance.get(r, 0.0)
        if max(ih, ir) > 0 and min(ih, ir) < IMPORTANCE_RATIO * max(ih, ir):
            return h if ih > ir else r
        return h

    def condense(self, ranked: list[dict], *, significant: Callable[[dict], bool],
                 side: Callable[[dict], Any], prev: Callable[[dict], float],
                 enriched: Callable[[dict], bool]) -> list[dict]:
        """``ranked`` with the significant entries of one signal merged (module doc). ``side(r)``: the
        direction of an entry (enriched / depleted, or the child it is higher in); only entries of the
        same side merge. ``prev(r)``: prevalence of a 0/1 descriptor in the group (its side);
        ``enriched(r)``: a 0/1 descriptor more prevalent in the group (only those merge by nesting)."""
        groups: list[list[dict]] = []
        by_name = {r["descriptor"]: r for r in ranked}
        pv = lambda nm: prev(by_name[nm])

        def related(a: dict, b: dict) -> bool:
            if side(a) != side(b):
                return False
            if self.correlated(a["descriptor"], b["descriptor"]):
                return True
            return enriched(a) and enriched(b) and self.nested(a["descriptor"], b["descriptor"]) is not None

        for r in ranked:
            if not significant(r):
                continue
            hits = [gi for gi, g in enumerate(groups) if any(related(m, r) for m in g)]
            if not hits:
                groups.append([r])
                continue
            # r links every group it relates to (one signal seen through several descriptors): merge them
            merged = [m for gi in hits for m in groups[gi]] + [r]
            merged.sort(key=lambda m: ranked.index(m))
            groups[hits[0]] = merged
            for gi in reversed(hits[1:]):
                del groups[gi]
        heads = []
        for g in groups:
            h = g[0]
            for m in g[1:]:
                if self.prefer(h["descriptor"], m["descriptor"], pv) == m["descriptor"]:
                    h = m
            heads.append(h)
        out = []
        for h, g in zip(heads, groups):
            e = dict(h)
            covers = [m["descriptor"] for m in g if m is not h]
            if covers:
                e["covers"] = covers
            out.append(e)
        return out + [r for r in ranked if not significant(r)]


def _axis(name: str) -> str:
    """What a 0/1 descriptor is about: ``anion`` (anion classes, anion elements), ``cation`` (cation
    classes, oxidation states, other elements), else its family."""
    from toolkit.analyze.descriptors import ANION_CLASS

    f, _, val = name.partition(":")
    if f == "element":
        return "anion" if val in ANION_CLASS else "cation"
    return {"anion": "anion", "cation_class": "cation", "oxidation": "cation"}.get(f, f)


def _class_rank(name: str) -> int:
    f = family(name)
    if f in CLASS_FAMILIES:
        return 0
    return 2 if f in IDENTITY_FAMILIES else 1


def condense_cluster(index: SignalIndex, ranked: list[dict], alpha: float) -> list[dict]:
    """One cluster's enrichment ranking (:func:`toolkit.analyze.attribution.enrichment`) condensed:
    entries of one signal merged, enriched and depleted 0/1 descriptors kept apart (and continuous
    ones by the sign of their effect)."""
    return index.condense(ranked, significant=lambda r: r["q"] < alpha, side=lambda r: r["effect"] > 0,
                          prev=lambda r: float(r.get("in_cluster", 0.0)) if r.get("test") == "fisher" else 0.0,
                          enriched=lambda r: r.get("test") == "fisher" and r["effect"] > 0)


def condense_split(index: SignalIndex, descs: list[dict], alpha: float) -> list[dict]:
    """One hierarchy split's descriptors (:func:`toolkit.analyze.hierarchy.explain_tree`) condensed
    per side (``direction``); prevalence = the 0/1 descriptor's mean on the side it is higher."""
    def prev(d: dict) -> float:
        if d.get("kind") != "categorical":
            return 0.0
        m = [v for v in (d.get("mean") or []) if v is not None]
        return float(max(m)) if m else 0.0

    return index.condense(descs, significant=lambda d: d["q"] < alpha, side=lambda d: d["direction"], prev=prev,
                          enriched=lambda d: d.get("kind") == "categorical")
