"""How well an interpretation recovers a benchmark's planted drivers, against a chance baseline.

:func:`recovery_score` scores an attribution.json dict against a benchmark truth (the dataset
attribute ``benchmark_truth`` of ``data.source: benchmark`` or ``realbench``; docs/benchmark.md,
"Recovery score"). The rules:

1. **Drivers** come from ``truth["drivers"]`` (realbench: name -> accepted descriptor names,
   ``defined_by`` columns, ``type``, ``features``) or, for the prototype truth, from
   ``truth["features"][f]["drivers"]``: one driver per descriptor pattern (``anion:*``,
   ``cation_class:*``, ``bond_length_mean``, ``coordination:*``), acting on the features that list it
   as ``primary`` (or as a driver where no primary is given). Distractors: ``truth["distractors"]``.
2. **Defining clusters.** Only clusters with at least ``MIN_CLUSTER`` (5) members are scored. A
   categorical driver defines a cluster when one of its indicators (one per class value, and their
   union; a product of columns for ``combine: all``) is carried by >= 70 % of the cluster's members while the
   overall rate (over every clustered material) is <= 50 % and the cluster's rate is at least twice
   the overall rate. A continuous driver defines a cluster when the cluster mean is >= 1 SD (of all
   clustered materials) away from the overall mean. Per-material values come from ``table``: planted
   values (a mapping with ``ids`` and the driver's ``factor``) are preferred, else the descriptor
   columns ``defined_by`` of a :class:`~toolkit.analyze.descriptors.DescriptorTable`.
3. **Named.** A defining cluster names its driver when one of its top-3 descriptors (or one of
   their aliases) is an accepted descriptor name of the driver (``family:*`` = any of the family).
4. **Figures** per layer: ``recall`` = named / defining (cluster, driver) pairs; ``coverage`` =
   drivers named in at least one of their defining clusters / all drivers (a driver no cluster
   isolates counts as not named); ``distractor_rate`` = share of defining clusters whose top 3
   holds a distractor. ``chance_recall`` / ``chance_coverage``: the same with 3 descriptors drawn at
   random (without replacement) from each cluster's tested set, ``CHANCE_DRAWS`` seeded draws.
5. **Feature rankings** (``attribution["drivers"][feature]["descriptors"]``, optional): a driver is
   named for a feature it acts on when an accepted name is in that ranking's top 3 (causes only:
   entries with ``rank: null`` are skipped); chance as above over the tested descriptors; the
   distractor rate is the share of scored features whose top 3 holds a distractor.
6. **Hierarchy** (when split membership is given): a driver *separates* an explained split when one of
   its indicators is carried by >= 70 % of one child and <= 30 % of the other (categorical), or the
   children's means differ by >= 1 SD (continuous); it is named when the split's top 3 significant
   descriptors (both sides, in the split's ranking) name it. Recall over (split, driver) pairs, chance
   from 3 random tested descriptors.
7. **Overall**: pooled recall and chance over every layer's pairs, coverage of the best layer and
   coverage over all layers together (a driver named in any layer), mean distractor rate;
   ``summary`` is one headline line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

TOP_K = 3
MIN_CLUSTER = 5
CAT_MIN_RATE, CAT_MAX_OVERALL, CAT_MIN_LIFT = 0.70, 0.50, 2.0
CONT_MIN_SD = 1.0
CHANCE_DRAWS = 1000


# ----------------------------------------------------------------------------- truth
def _family(name: str) -> str:
    return name.split(":", 1)[0]


def matches(name: str, pattern: str) -> bool:
    """``pattern`` ``family:*`` matches every descriptor of the family; otherwise equality."""
    if pattern.endswith(":*"):
        return ":" in name and _family(name) == pattern[:-2]
    return name == pattern


def _names_match(names: list[str], patterns: list[str]) -> bool:
    return any(matches(n, p) for n in names for p in patterns)


def drivers_of(truth: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """(drivers, distractors) of a truth dict, prototype or realbench format, as
    ``name -> {"type", "descriptors", "defined_by", "combine", "factor", "baseline", "features"}``."""
    if truth.get("drivers"):
        drivers = {n: {"combine": "any", "baseline": [], **d} for n, d in truth["drivers"].items()}
    else:
        from toolkit.analyze.descriptors import is_categorical

        feats = truth.get("features", {})
        drivers = {}
        for f, spec in feats.items():
            for pat in spec.get("drivers", []):
                name = _family(pat) if pat.endswith(":*") else pat
                cat = pat.endswith(":*") or is_categorical(pat)
                d = drivers.setdefault(name, {"type": "categorical" if cat else "continuous", "descriptors": [pat],
                                              "defined_by": [pat], "combine": "any", "factor": name,
                                              "baseline": [], "features": []})
                if pat in (spec.get("primary") or spec.get("drivers", [])) and f not in d["features"]:
                    d["features"].append(f)
    distractors = {n: dict(d) for n, d in (truth.get("distractors") or {}).items()}
    return drivers, distractors


# ----------------------------------------------------------------------------- per-material values
def _as_str(col: np.ndarray) -> np.ndarray:
    """Any array (object, fixed-width or numpy StringDType) as fixed-width unicode."""
    return np.array([str(x) for x in np.asarray(col).tolist()], dtype=str)


def _floats(xs: list) -> list[float]:
    out = []
    for x in xs:
        try:
            out.append(float(x))
        except (TypeError, ValueError):
            pass
    return out


class _Values:
    """Per-material values from a DescriptorTable (``ids``, ``names``, ``values``) or a mapping
    ``{"ids": [...], <factor or descriptor>: array}`` of planted values."""

    def __init__(self, table: Any):
        if isinstance(table, Mapping):
            self.ids = [str(i) for i in table["ids"]]
            self.cols = {k: np.asarray(v) for k, v in table.items() if k != "ids"}
        else:
            self.ids = [str(i) for i in table.ids]
            vals = np.asarray(table.values, dtype=np.float64)
            self.cols = {n: vals[:, j] for j, n in enumerate(table.names)}
        self.row = {i: k for k, i in enumerate(self.ids)}

    def expand(self, pattern: str) -> list[str]:
        return sorted(n for n in self.cols if matches(n, pattern)) if pattern.endswith(":*") else \
            ([pattern] if pattern in self.cols else [])

    def indicators(self, d: dict) -> tuple[list[tuple[str, np.ndarray]], str]:
        """[(label, float array 0/1 with NaN)], and where they came from: one indicator per class
        value (or column), plus their union ("any") when there are several."""
        ind, src = self._indicators(d)
        if len(ind) > 1:
            x = np.stack([v for _, v in ind])
            union = np.where(np.isnan(x).all(axis=0), np.nan, np.nanmax(np.nan_to_num(x, nan=0.0), axis=0))
            ind.append(("any of " + ", ".join(lab for lab, _ in ind), union))
        return ind, src

    def _indicators(self, d: dict) -> tuple[list[tuple[str, np.ndarray]], str]:
        f = d.get("factor")
        if f and f in self.cols:
            col = self.cols[f]
            base = {str(b) for b in d.get("baseline", [])}
            if col.dtype.kind in "fiub":
                x = col.astype(np.float64)
                vals = sorted({v for v in x[np.isfinite(x)].tolist()} - set(_floats(d.get("baseline", []))))
                return [(f"{f}={v:g}", np.where(np.isfinite(x), (x == v).astype(float), np.nan)) for v in vals], "planted"
            s = _as_str(col)
            miss = np.isin(s, ["", "None", "nan"])
            vals = sorted(set(s[~miss].tolist()) - base)
            return [(f"{f}={v}", np.where(miss, np.nan, (s == v).astype(float))) for v in vals], "planted"
        cols = [n for p in d.get("defined_by", d["descriptors"]) for n in self.expand(p)]
        if not cols:
            return [], "missing"
        if d.get("combine") == "all":
            if len(cols) < len(d.get("defined_by", [])):
                return [], "missing"
            x = np.prod([self.cols[c].astype(np.float64) for c in cols], axis=0)
            return [(" & ".join(cols), (x > 0.5).astype(float) + np.where(np.isfinite(x), 0, np.nan))], "descriptors"
        out = []
        for c in cols:
            x = self.cols[c].astype(np.float64)
            out.append((c, np.where(np.isfinite(x), (x > 0.5).astype(float), np.nan)))
        return out, "descriptors"

    def continuous(self, d: dict) -> tuple[np.ndarray | None, str]:
        f = d.get("factor")
        if f and f in self.cols and self.cols[f].dtype.kind in "fiub":
            return self.cols[f].astype(np.float64), "planted"
        for p in d.get("defined_by", d["descriptors"]):
            for c in self.expand(p):
                return self.cols[c].astype(np.float64), "descriptors"
        return None, "missing"


def _defines(d: dict, vals: _Values, pop: np.ndarray, members: np.ndarray, cache: dict) -> list[str]:
    """Labels of the driver's indicators (or ``mean``) that define the cluster ``members`` (row indices)."""
    key = id(d)
    if key not in cache:
        if d["type"] == "continuous":
            x, src = vals.continuous(d)
            if x is None:
                cache[key] = (None, src)
            else:
                xp = x[pop][np.isfinite(x[pop])]
                cache[key] = ((x, float(xp.mean()) if len(xp) else np.nan, float(xp.std()) if len(xp) > 1 else 0.0), src)
        else:
            ind, src = vals.indicators(d)
            cache[key] = ([(lab, x, float(np.nanmean(x[pop])) if np.isfinite(x[pop]).any() else np.nan)
                           for lab, x in ind], src)
    stat, _ = cache[key]
    if stat is None:
        return []
    if d["type"] == "continuous":
        x, mu, sd = stat
        xc = x[members][np.isfinite(x[members])]
        if len(xc) < MIN_CLUSTER or not sd > 0:
            return []
        return ["mean"] if abs(xc.mean() - mu) >= CONT_MIN_SD * sd else []
    out = []
    for lab, x, p in stat:
        xc = x[members][np.isfinite(x[members])]
        if len(xc) < MIN_CLUSTER or not np.isfinite(p):
            continue
        r = float(xc.mean())
        if r >= CAT_MIN_RATE and p <= CAT_MAX_OVERALL and r >= CAT_MIN_LIFT * p:
            out.append(lab)
    return out


def _score_group(m: np.ndarray, top_flat: list[str], groups: list[list[str]], drivers: dict[str, dict], vals: _Values,
                 pop: np.ndarray, cache: dict, rng: np.random.Generator, sources: dict[str, str]):
    """One group of materials (a cluster, or a child of a hierarchy split) with the names of its top
    descriptors ``top_flat`` and its tested descriptors ``groups`` (each with its aliases):
    ``({driver: defining indicators}, [(driver, named, chance hits (CHANCE_DRAWS,))])``."""
    defined = {}
    for dn, d in drivers.items():
        labs = _defines(d, vals, pop, m, cache)
        sources[dn] = cache[id(d)][1]
        if labs:
            defined[dn] = labs
    if not defined:
        return defined, []
    draws = _draws(len(groups), TOP_K, rng, CHANCE_DRAWS)
    out = []
    for dn in defined:
        ok = _names_match(top_flat, drivers[dn]["descriptors"])
        hit = np.array([_names_match(g, drivers[dn]["descriptors"]) for g in groups], bool)
        out.append((dn, ok, hit[draws].any(axis=1) if draws.size else np.zeros(CHANCE_DRAWS, bool)))
    return defined, out


# ----------------------------------------------------------------------------- chance
def _draws(n: int, k: int, rng: np.random.Generator, r: int) -> np.ndarray:
    """(r, min(k, n)) indices: k distinct of range(n) per row, uniform."""
    k = min(k, n)
    if k == 0:
        return np.zeros((r, 0), dtype=np.int64)
    keys = rng.random((r, n))
    return np.argpartition(keys, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (r, 1))


def _top(ranked: list[dict], k: int = TOP_K) -> list[list[str]]:
    """Names (each with its aliases) of the top k ranked causes (``rank: null`` entries skipped)."""
    out = []
    for r in ranked:
        if "rank" in r and r["rank"] is None:
            continue
        out.append([r["descriptor"], *(r.get("aliases") or [])])
        if len(out) == k:
            break
    return out


def _flat(names: list[list[str]]) -> list[str]:
    return [n for group in names for n in group]


def planted_values(reader: Any, truth: dict, indices: np.ndarray | None = None) -> dict[str, Any]:
    """The ``table`` mapping of planted values from a dataset store reader
    (:class:`toolkit.data.store.DatasetReader`): ``{"ids": [...], <factor>: array}`` for every driver
    and distractor factor of ``truth`` found as ``benchmark/<factor>`` (or ``properties/<factor>``)."""
    drivers, distractors = drivers_of(truth)
    idx = np.arange(len(reader.ids)) if indices is None else np.asarray(indices, dtype=np.int64)
    out: dict[str, Any] = {"ids": [str(i) for i in np.asarray(reader.ids)[idx]]}
    for d in [*drivers.values(), *distractors.values()]:
        f = d.get("factor")
        if not f or f in out:
            continue
        for group in ("benchmark", "properties"):
            try:
                col = np.asarray(reader.column(f"{group}/{f}", idx))
            except Exception:  # noqa: BLE001, S112 - StoreError / KeyError: not stored under this group
                continue
            out[f] = col if col.dtype.kind in "fiub" else _as_str(col)
            break
    return out


# ----------------------------------------------------------------------------- the score
def recovery_score(truth: dict, attribution: dict, table: Any, labels: dict[str, np.ndarray] | None = None,
                   seed: int = 0, split_members: dict[str, Any] | None = None) -> dict[str, Any]:
    """Recovery of ``truth``'s planted drivers by ``attribution`` (attribution.json dict) with a
    chance baseline (module docstring; docs/benchmark.md "Recovery score").

    ``table``: per-material values, a DescriptorTable or a mapping ``{"ids": [...], <factor>: array}``
    of planted values (the store's ``benchmark/<factor>``). ``labels``: optional ``layer -> cluster
    label per row of table`` used for clusters without ``members``. ``split_members``: optional
    ``layer -> (node -> rows of table)`` under which the hierarchy's splits are scored too (each child
    of a split as a group named by the split's descriptors higher on its side). Returns a JSON-able dict:
    ``summary`` (one line), ``overall``, ``per_layer``, ``per_driver``, ``features``, ``hierarchy``,
    ``rules``."""
    drivers, distractors = drivers_of(truth)
    dist_names = [p for d in distractors.values() for p in d.get("descriptors", [])]
    vals = _Values(table)
    rng = np.random.default_rng(seed)
    per_layer: dict[str, Any] = {}
    pooled = {"pairs": 0, "named": 0, "chance": 0.0}
    named_any: dict[str, list[str]] = {n: [] for n in drivers}
    defined_any: dict[str, int] = {n: 0 for n in drivers}
    sources: dict[str, str] = {}
    all_tested: set[str] = set()
    for lname, L in (attribution.get("layers") or {}).items():
        tested_layer = list(L.get("tested") or [])
        all_tested.update(tested_layer)
        aliases = L.get("aliases") or {}
        clusters = L.get("clusters") or {}
        by_label: dict[str, np.ndarray] = {}
        if labels is not None and lname in labels:
            lab = np.asarray(labels[lname])
            order = np.argsort(lab, kind="stable")
            uniq, first = np.unique(lab[order], return_index=True)
            by_label = {str(u): order[a:b] for u, a, b in zip(uniq.tolist(), first, [*first[1:], len(lab)])}
        mem: dict[str, np.ndarray] = {}
        for c, cl in clusters.items():
            if cl.get("members") is not None:
                rows = np.asarray([vals.row[str(i)] for i in cl["members"] if str(i) in vals.row], dtype=np.int64)
            else:
                rows = by_label.get(str(c), np.zeros(0, dtype=np.int64))
            mem[c] = np.asarray(rows, dtype=np.int64)
        pop = np.unique(np.concatenate([m for m in mem.values()])) if mem else np.zeros(0, np.int64)
        cache: dict = {}
        rows_out: dict[str, Any] = {}
        pairs: list[tuple[str, str, bool]] = []
        chance_hits = []  # (r,) per pair
        cover_draw = {n: np.zeros(CHANCE_DRAWS, bool) for n in drivers}
        dist_hits = []
        for c, cl in clusters.items():
            m = mem[c]
            if len(m) < MIN_CLUSTER:
                continue
            top = _top(cl.get("descriptors") or [])
            for g in top:
                for a in aliases.get(g[0], []):
                    if a not in g:
                        g.append(a)
            top_flat = _flat(top)
            tested = list(cl.get("tested") or tested_layer or [r["descriptor"] for r in cl.get("descriptors") or []])
            defined, scored = _score_group(m, top_flat, [[t, *aliases.get(t, [])] for t in tested], drivers,
                                           vals, pop, cache, rng, sources)
            if not defined:
                continue
            named_here, dist_here = [], _names_match(top_flat, dist_names)
            for dn, ok, ch in scored:
                chance_hits.append(ch)
                cover_draw[dn] |= ch
                pairs.append((c, dn, ok))
                defined_any[dn] += 1
                if ok:
                    named_here.append(dn)
                    if lname not in named_any[dn]:
                        named_any[dn].append(lname)
            dist_hits.append(dist_here)
            rows_out[c] = {"size": len(m), "defined_by": defined, "top": [g[0] for g in top],
                           "named": named_here, "distractor_in_top": bool(dist_here)}
        n_pairs, n_named = len(pairs), sum(ok for _, _, ok in pairs)
        chance_recall = float(np.mean(np.mean(chance_hits, axis=0))) if chance_hits else None
        named_drivers = sorted({dn for _, dn, ok in pairs if ok})
        per_layer[lname] = {
            "n_clusters_scored": int(sum(len(mm) >= MIN_CLUSTER for mm in mem.values())),
            "n_defining_clusters": len(rows_out), "n_pairs": n_pairs,
            "recall": n_named / n_pairs if n_pairs else None, "chance_recall": chance_recall,
            "coverage": len(named_drivers) / len(drivers) if drivers else None,
            "chance_coverage": float(np.mean(np.sum([v for v in cover_draw.values()], axis=0) / len(drivers)))
            if drivers else None,
            "drivers_named": named_drivers,
            "drivers_defining": sorted({dn for _, dn, _ in pairs}),
            "distractor_rate": float(np.mean(dist_hits)) if dist_hits else None,
            "clusters": rows_out,
        }
        pooled["pairs"] += n_pairs
        pooled["named"] += n_named
        pooled["chance"] += float(np.sum(np.mean(chance_hits, axis=1))) if chance_hits else 0.0

    feats = _feature_scores(attribution.get("drivers") or {}, drivers, dist_names, sorted(all_tested), rng)
    hier = _hierarchy_scores(attribution, split_members, drivers, dist_names, vals, rng) if split_members else \
        _hierarchy_note(attribution.get("hierarchy"))
    n_drv = len(drivers)
    best = max(per_layer, key=lambda n: (per_layer[n]["coverage"] or 0, per_layer[n]["recall"] or 0)) if per_layer else None
    covered = sorted(n for n, ls in named_any.items() if ls)
    dr = [v["distractor_rate"] for v in per_layer.values() if v["distractor_rate"] is not None]
    overall = {
        "recall": pooled["named"] / pooled["pairs"] if pooled["pairs"] else None,
        "chance_recall": pooled["chance"] / pooled["pairs"] if pooled["pairs"] else None,
        "n_pairs": pooled["pairs"],
        "best_layer": best,
        "coverage": per_layer[best]["coverage"] if best else 0.0,
        "chance_coverage": per_layer[best]["chance_coverage"] if best else None,
        "coverage_any_layer": len(covered) / n_drv if n_drv else None,
        "drivers_named_any_layer": covered,
        "distractor_rate": float(np.mean(dr)) if dr else None,
        "feature_coverage": feats["coverage"], "feature_chance": feats["chance"],
        "feature_distractor_rate": feats["distractor_rate"],
    }
    per_driver = {n: {"type": d["type"], "kind": d.get("kind"), "features": d.get("features", []),
                      "descriptors": d["descriptors"], "values_from": sources.get(n, "not scored"),
                      "defining_clusters": defined_any[n], "named_in_layers": named_any[n],
                      "named": bool(named_any[n]),
                      "named_in_feature_ranking": feats["per_driver"].get(n)}
                  for n, d in drivers.items()}
    return {"version": 2, "summary": _summary(overall, per_layer, n_drv, feats, hier), "overall": overall,
            "per_layer": per_layer, "per_driver": per_driver, "features": feats, "hierarchy": hier,
            "distractors": sorted(distractors),
            "rules": {"top_k": TOP_K, "min_cluster": MIN_CLUSTER, "categorical": {
                "min_cluster_rate": CAT_MIN_RATE, "max_overall_rate": CAT_MAX_OVERALL, "min_lift": CAT_MIN_LIFT},
                "continuous_min_sd": CONT_MIN_SD, "chance_draws": CHANCE_DRAWS, "seed": seed}}


def _feature_scores(rankings: dict, drivers: dict[str, dict], dist_names: list[str], tested_all: list[str],
                    rng: np.random.Generator) -> dict[str, Any]:
    per_feature: dict[str, Any] = {}
    per_driver: dict[str, bool | None] = {}
    hits, chances, dist = [], [], []
    for dn, d in drivers.items():
        res = []
        for f in d.get("features", []):
            R = rankings.get(f)
            if not R or not R.get("descriptors"):
                continue
            top = _top(R["descriptors"])
            ok = _names_match(_flat(top), d["descriptors"])
            tested = list(R.get("tested") or tested_all or [r["descriptor"] for r in R["descriptors"]])
            draws = _draws(len(tested), TOP_K, rng, CHANCE_DRAWS)
            hit = np.array([_names_match([t], d["descriptors"]) for t in tested], bool)
            ch = float(hit[draws].any(axis=1).mean()) if draws.size else 0.0
            pf = per_feature.setdefault(f, {"top": [g[0] for g in top], "named": [], "not_named": [],
                                            "distractor_in_top": _names_match(_flat(top), dist_names)})
            (pf["named"] if ok else pf["not_named"]).append(dn)
            res.append(ok)
            hits.append(ok)
            chances.append(ch)
        per_driver[dn] = any(res) if res else None
    for pf in per_feature.values():
        dist.append(pf["distractor_in_top"])
    scored = [v for v in per_driver.values() if v is not None]
    return {"per_feature": per_feature, "per_driver": per_driver,
            "coverage": sum(scored) / len(drivers) if scored and drivers else None,
            "recall": float(np.mean(hits)) if hits else None,
            "chance": float(np.mean(chances)) if chances else None,
            "distractor_rate": float(np.mean(dist)) if dist else None}


def _hierarchy_note(hier: Any) -> dict[str, Any]:
    """Why the hierarchy was not scored."""
    if not hier:
        return {"scored": False, "reason": "no hierarchy in the attribution"}
    return {"scored": False, "reason": "no split membership given (too many materials, or not requested)"}


def _separates(continuous: bool, v: Any, a: np.ndarray, b: np.ndarray, sd: float) -> bool:
    """Whether a driver separates the two children ``a`` and ``b`` (row indices) of a split: one of its
    indicators (``v``: list of 0/1 arrays) is carried by >= 70 % of one child and <= 30 % of the other
    (categorical), or the children's means of ``v`` (an array) differ by >= 1 SD ``sd`` of the layer's
    materials (continuous)."""
    if continuous:
        if v is None:
            return False
        xa, xb = v[a][np.isfinite(v[a])], v[b][np.isfinite(v[b])]
        return len(xa) >= MIN_CLUSTER and len(xb) >= MIN_CLUSTER and sd > 0 and \
            abs(xa.mean() - xb.mean()) >= CONT_MIN_SD * sd
    for x in v:
        xa, xb = x[a][np.isfinite(x[a])], x[b][np.isfinite(x[b])]
        if len(xa) < MIN_CLUSTER or len(xb) < MIN_CLUSTER:
            continue
        hi, lo = max(xa.mean(), xb.mean()), min(xa.mean(), xb.mean())
        if hi >= CAT_MIN_RATE and lo <= 1.0 - CAT_MIN_RATE:
            return True
    return False


def _hierarchy_scores(attribution: dict, split_members: dict[str, Any], drivers: dict[str, dict],
                      dist_names: list[str], vals: _Values, rng: np.random.Generator) -> dict[str, Any]:
    """Every explained split whose children both hold >= MIN_CLUSTER materials: the drivers that
    separate its children (:func:`_separates`), named when one of the split's top 3 significant
    descriptors (both sides, in the split's ranking) names it; chance from 3 of the layer's tested
    descriptors drawn at random."""
    per_layer: dict[str, Any] = {}
    pairs = named = 0
    chance_sum = 0.0
    dist_hits: list[bool] = []
    # per-material values of every driver, once (not per split): an array (continuous) or 0/1 indicators
    cont = {dn: d["type"] == "continuous" for dn, d in drivers.items()}
    values = {dn: vals.continuous(d)[0] if cont[dn] else [x for _, x in vals.indicators(d)[0]]
              for dn, d in drivers.items()}
    for lname, H in (attribution.get("hierarchy") or {}).items():
        members = split_members.get(lname)
        L = (attribution.get("layers") or {}).get(lname) or {}
        if members is None or not H.get("splits"):
            continue
        aliases = L.get("aliases") or {}
        groups = [[t, *aliases.get(t, [])] for t in (L.get("tested") or [])]
        alpha = H.get("alpha", 0.05)
        pop = np.asarray(members(max(sp["node"] for sp in H["splits"])), dtype=np.int64)
        pop_sd = {}
        for dn, x in values.items():
            if cont[dn] and x is not None:
                xp = x[pop][np.isfinite(x[pop])]
                pop_sd[dn] = float(xp.std()) if len(xp) > 1 else 0.0
        draws = _draws(len(groups), TOP_K, rng, CHANCE_DRAWS)
        chance = {dn: float(np.array([_names_match(g, d["descriptors"]) for g in groups], bool)[draws].any(axis=1).mean())
                  if draws.size else 0.0 for dn, d in drivers.items()}  # 3 random tested descriptors name it
        lp = ln = 0
        lc = 0.0
        by_driver: dict[str, list[bool]] = {}
        for sp in H["splits"]:
            ca, cb = (np.asarray(members(c), dtype=np.int64) for c in sp["children"])
            if min(len(ca), len(cb)) < MIN_CLUSTER:
                continue
            top = [d for d in sp["descriptors"] if d["q"] < alpha][:TOP_K]
            top_flat = [n for d in top for n in (d["descriptor"], *aliases.get(d["descriptor"], []))]
            sep = [dn for dn in drivers if _separates(cont[dn], values[dn], ca, cb, pop_sd.get(dn, 0.0))]
            if not sep:
                continue
            dist_hits.append(_names_match(top_flat, dist_names))
            for dn in sep:
                ok = _names_match(top_flat, drivers[dn]["descriptors"])
                lp += 1
                ln += ok
                lc += chance[dn]
                by_driver.setdefault(dn, []).append(bool(ok))
        per_layer[lname] = {"n_pairs": lp, "recall": ln / lp if lp else None,
                            "chance_recall": lc / lp if lp else None,
                            "drivers_named": sorted(d for d, v in by_driver.items() if any(v)),
                            "per_driver": {d: {"splits": len(v), "named": int(sum(v))} for d, v in by_driver.items()}}
        pairs, named, chance_sum = pairs + lp, named + ln, chance_sum + lc
    return {"scored": True, "n_pairs": pairs, "recall": named / pairs if pairs else None,
            "chance_recall": chance_sum / pairs if pairs else None,
            "distractor_rate": float(np.mean(dist_hits)) if dist_hits else None, "per_layer": per_layer,
            "rule": "a driver separates a split when one of its indicators is carried by >= 70 % of one child and "
                    "<= 30 % of the other, or the children's means differ by >= 1 SD; named when the split's top 3 "
                    "significant descriptors name it"}


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _summary(o: dict, per_layer: dict, n_drv: int, feats: dict, hier: dict | None = None) -> str:
    named = len(o["drivers_named_any_layer"])
    s = (f"recovery: {named}/{n_drv} planted drivers named by a cluster they define "
         f"(best layer {o['best_layer']}: coverage {_f(o['coverage'])} vs chance {_f(o['chance_coverage'])}); "
         f"cluster recall {_f(o['recall'])} vs chance {_f(o['chance_recall'])} over {o['n_pairs']} defining "
         f"cluster-driver pairs; distractor rate {_f(o['distractor_rate'])}")
    if feats["coverage"] is not None:
        s += (f"; feature rankings name {_f(feats['coverage'])} of drivers (recall {_f(feats['recall'])} vs chance "
              f"{_f(feats['chance'])}, distractor rate {_f(feats['distractor_rate'])})")
    if hier and hier.get("scored") and hier.get("n_pairs"):
        s += (f"; hierarchy splits name the driver that separates them in {_f(hier['recall'])} of "
              f"{hier['n_pairs']} split-driver pairs (chance {_f(hier['chance_recall'])})")
    return s
