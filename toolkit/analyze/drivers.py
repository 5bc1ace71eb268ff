"""Which structural descriptors drive each spectral feature: a multivariate ranking with confounding
flags and a ranking within strata of the dominant factor (attribution.json ``drivers``).

For each spectral feature (``onset``, ``edge_integral``, ``peak_1``, ``peak_2`` of the reference
spectra and ``pred:<same>`` of the predictions), on the materials where it is defined (at most
``max_rows`` drawn at random):

1. **Model.** A ``HistGradientBoostingRegressor`` (NaN handled natively) of the feature from every
   tested structural descriptor, fitted on 70 %, scored on the 30 % hold-out (R^2).
2. **Importance.** Permutation importance on the hold-out: the drop in R^2 when a descriptor's
   column is shuffled (mean and SD over ``repeats``); a family's importance shuffles all of its
   columns together (rows permuted jointly), families named by
   :func:`toolkit.analyze.descriptors.descriptor_family`.
3. **Confounding.** ``marginal``: Spearman correlation of the descriptor with the feature. For a
   descriptor correlated (|Spearman| >= ``partner_rho``) with a more important descriptor X (its
   most correlated such "partner"), ``conditional_importance`` is the drop in R^2 when it is shuffled
   only *within bins of X* (the classes of X's family for a 0/1 X, else deciles), i.e. the information it adds once X is known.
   A descriptor whose marginal association is strong (|marginal| >= ``marginal_rho``) but whose
   conditional importance vanishes (< ``vanish`` x its marginal R^2 = marginal^2, and < 0.01 +
   ``vanish`` x X's importance) is reported as riding along with X (``confounded_with: X``) and
   not ranked as a cause (``rank: null``, listed after the ranked descriptors).
   The ranked causes list the *lead* of every family that matters first, families in the order of
   their joint importance (:func:`family_leads_first`), then the other descriptors by importance.
4. **Within strata.** The dominant family (highest family importance) defines strata: its classes
   (for a 0/1 family, the first class present in each material) or, for a continuous family, the
   quartiles of its most important descriptor. In every stratum with at least ``min_stratum``
   materials a model is fitted alone (70/30) and its permutation importances (drop in MSE divided by
   the variance of the feature over all materials, so strata are comparable) are averaged weighted
   by stratum size; secondary drivers hidden by the dominant one surface there.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from toolkit.analyze.descriptors import (
    DescriptorTable,
    descriptor_family,
    is_categorical,
)

log = logging.getLogger(__name__)

FEATURES = ("onset", "edge_integral", "peak_1", "peak_2")
TOP = 25  # descriptors per feature in attribution.json
LEAD_MIN = 0.01  # a family leads the ranking when its joint importance (drop in R^2) is at least this


def _model(seed: int):
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(max_iter=80, learning_rate=0.12, max_leaf_nodes=15, min_samples_leaf=10,
                                         early_stopping=False, random_state=seed)


def _fit(seed: int, x: np.ndarray, y: np.ndarray):
    """Fit the model; columns without any finite value in ``x`` are passed as constants (sklearn's
    binning fails on an all-missing column)."""
    bad = ~np.isfinite(x).any(0)
    if bad.any():
        x = x.copy()
        x[:, bad] = 0.0
    return _model(seed).fit(x, y)


def _spearman_matrix(x: np.ndarray) -> np.ndarray:
    """Spearman correlation of the columns of ``x`` (NaN imputed by the column median)."""
    from scipy.stats import rankdata

    med = np.nanmedian(np.where(np.isfinite(x), x, np.nan), axis=0)
    xi = np.where(np.isfinite(x), x, np.where(np.isfinite(med), med, 0.0)[None, :])
    r = rankdata(xi, axis=0)
    r -= r.mean(0)
    sd = np.sqrt((r * r).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (r.T @ r) / np.outer(sd, sd)
    return np.nan_to_num(c)


def _bins(col: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Group of every row: the value itself for few distinct values (a class), else a quantile bin;
    missing values form their own group."""
    ok = np.isfinite(col)
    out = np.full(len(col), -1, dtype=np.int64)
    vals = np.unique(col[ok])
    if len(vals) <= n_bins:
        out[ok] = np.searchsorted(vals, col[ok])
    elif ok.any():
        edges = np.unique(np.quantile(col[ok], np.linspace(0, 1, n_bins + 1)[1:-1]))
        out[ok] = np.searchsorted(edges, col[ok], side="right")
    return out


def _partner_bins(x: np.ndarray, names: list[str], fam: list[str], e: int) -> np.ndarray:
    """Bins of the partner ``e``: for a 0/1 descriptor the class pattern of its whole family (e.g.
    the anion class, not only "halide or not"), else :func:`_bins`."""
    if not is_categorical(names[e]):
        return _bins(x[:, e])
    cols = [j for j in range(len(names)) if fam[j] == fam[e] and is_categorical(names[j])]
    sub = np.nan_to_num(x[:, cols], nan=-1.0)
    return np.unique(sub, axis=0, return_inverse=True)[1].ravel()


def _permute(x: np.ndarray, cols: list[int], rng, within: np.ndarray | None = None) -> np.ndarray:
    xp = x.copy()
    if within is None:
        perm = rng.permutation(len(x))
    else:  # shuffle rows only inside each group of ``within``
        perm = np.arange(len(x))
        for g in np.unique(within):
            idx = np.flatnonzero(within == g)
            perm[idx] = idx[rng.permutation(len(idx))]
    xp[:, cols] = x[perm][:, cols]
    return xp


def _perm_drop(model, x: np.ndarray, y: np.ndarray, groups: list[list[int]], repeats: int, rng, scale: float,
               within: list[np.ndarray | None] | None = None, batch_cells: int = 4_000_000) -> np.ndarray:
    """(len(groups), repeats) drop in MSE / ``scale`` when each group of columns is shuffled. The
    shuffled copies are stacked and predicted in few large calls (a call costs ~ a Python loop over
    the trees, so many small calls would dominate)."""
    base = float(np.mean((model.predict(x) - y) ** 2))
    out = np.zeros((len(groups), repeats))
    jobs = [(i, r) for i in range(len(groups)) for r in range(repeats)]
    per = max(1, batch_cells // max(1, x.size))
    for s in range(0, len(jobs), per):
        chunk = jobs[s:s + per]
        xs = np.vstack([_permute(x, groups[i], rng, within[i] if within is not None else None) for i, _ in chunk])
        err = ((model.predict(xs) - np.tile(y, len(chunk))) ** 2).reshape(len(chunk), len(y)).mean(1)
        for (i, r), e in zip(chunk, err):
            out[i, r] = (float(e) - base) / scale
    return out


def _split(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    cut = int(round(0.7 * n))
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def _strata(x: np.ndarray, names: list[str], fam: list[str], top_family: str, imp: np.ndarray) -> tuple[np.ndarray, list[str], str]:
    """(stratum of each row (-1 = none), stratum names, what defines them) for the dominant family."""
    cols = [j for j, f in enumerate(fam) if f == top_family]
    cat = [j for j in cols if is_categorical(names[j])]
    if cat:
        sub = np.nan_to_num(x[:, cat], nan=0.0)
        present = sub.max(1) > 0
        lab = np.where(present, np.argmax(sub > 0, axis=1), len(cat))
        return lab, [names[j] for j in cat] + [f"no {top_family} class"], top_family
    j = max(cols, key=lambda c: imp[c])
    col = x[:, j]
    ok = np.isfinite(col)
    edges = np.quantile(col[ok], [0.25, 0.5, 0.75]) if ok.any() else np.zeros(3)
    lab = np.where(ok, np.searchsorted(np.unique(edges), col, side="right"), -1)
    return lab, [f"{names[j]} quartile {i + 1}" for i in range(len(np.unique(edges)) + 1)], names[j]


def feature_drivers(x: np.ndarray, y: np.ndarray, names: list[str], seed: int = 0, repeats: int = 3,
                    marginal_rho: float = 0.2, partner_rho: float = 0.5, vanish: float = 0.25,
                    min_stratum: int = 50, top: int = TOP, lead_min: float = LEAD_MIN) -> dict[str, Any]:
    """``drivers.<feature>`` for descriptors ``x`` (n, D) and the feature ``y`` (n,), all finite y."""
    import sklearn.ensemble  # noqa: F401 - load OpenMP before threadpool_limits, or the limit misses it

    rng = np.random.default_rng(seed)
    n, d = x.shape
    fam = [descriptor_family(nm) for nm in names]
    tr, te = _split(n, rng)
    var = float(np.var(y[te])) or 1.0
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        model = _fit(seed, x[tr], y[tr])
        pred = model.predict(x[te])
        r2 = 1.0 - float(np.mean((pred - y[te]) ** 2)) / var
        imp = _perm_drop(model, x[te], y[te], [[j] for j in range(d)], repeats, rng, var)
        families = sorted(set(fam), key=fam.index)
        fimp = _perm_drop(model, x[te], y[te], [[j for j in range(d) if fam[j] == f] for f in families], repeats, rng, var)
        imp_m = imp.mean(1)
        # marginal association and the partners of the confounding check
        c = _spearman_matrix(np.column_stack([x, y]))
        marg = c[:d, d]
        corr = c[:d, :d]
        cand = [j for j in np.argsort(-imp_m)[:top]] + [j for j in range(d) if abs(marg[j]) >= marginal_rho]
        cand = list(dict.fromkeys(int(j) for j in cand))
        partner: dict[int, int] = {}
        for j in cand:
            better = [e for e in range(d) if e != j and imp_m[e] > imp_m[j] and abs(corr[j, e]) >= partner_rho]
            if better:
                partner[j] = max(better, key=lambda e: abs(corr[j, e]))
        pj = list(partner)
        cimp = _perm_drop(model, x[te], y[te], [[j] for j in pj], repeats, rng, var,
                          within=[_partner_bins(x[te], names, fam, partner[j]) for j in pj]).mean(1) if pj else np.zeros(0)
        cond = dict(zip(pj, cimp))
        strata = _within_strata(x, y, names, fam, families, fimp.mean(1), imp_m, seed, repeats, min_stratum, rng)
    rows = []
    for j in range(d):
        conf = None
        if j in partner:
            e = partner[j]
            if abs(marg[j]) >= marginal_rho and cond[j] < vanish * marg[j] ** 2 and cond[j] < 0.01 + vanish * imp_m[e]:
                conf = names[e]
        rows.append({"descriptor": names[j], "family": fam[j], "importance": round(float(imp_m[j]), 5),
                     "importance_std": round(float(imp[j].std()), 5),
                     "conditional_importance": round(float(cond.get(j, imp_m[j])), 5),
                     "conditioned_on": names[partner[j]] if j in partner else None,
                     "marginal": round(float(marg[j]), 4), "confounded_with": conf,
                     "within_strata_importance": strata["importance"].get(names[j]) if strata.get("importance") else None})
    by_importance = sorted((r for r in rows if r["confounded_with"] is None), key=lambda r: -r["importance"])
    riders = sorted((r for r in rows if r["confounded_with"] is not None), key=lambda r: -r["importance"])
    fam_rows = sorted(({"family": f, "importance": round(float(fimp[i].mean()), 5),
                        "importance_std": round(float(fimp[i].std()), 5)} for i, f in enumerate(families)),
                      key=lambda r: -r["importance"])
    ranked = family_leads_first(by_importance, fam_rows, lead_min)
    for i, r in enumerate(ranked):
        r["rank"] = i + 1
    for r in riders:
        r["rank"], r["lead"] = None, False
    keep = ranked[:top] + riders[:top]
    if strata.get("importance"):
        strata["importance"] = dict(sorted(strata["importance"].items(), key=lambda t: -t[1])[:top])
    return {"families": fam_rows, "descriptors": keep, "confounded": [r["descriptor"] for r in riders],
            "strata": strata,
            "model": {"model": "HistGradientBoostingRegressor", "r2_holdout": round(r2, 4), "n": int(n),
                      "n_train": len(tr), "n_test": len(te), "n_descriptors": int(d), "repeats": repeats,
                      "importance": "drop in hold-out R^2 when shuffled (permutation)"}}


def family_leads_first(by_importance: list[dict], fam_rows: list[dict], lead_min: float = 0.01) -> list[dict]:
    """The ranking of a feature's causes: first the *lead* of every family that matters (the family's
    most important ranked descriptor, families in the order of their joint importance, those whose
    joint importance is at least ``lead_min`` and above two SDs of its repeats), marked ``lead: true``;
    then every other ranked descriptor by its own importance.

    Why: permutation importance splits a factor's effect among the correlated columns that carry it
    (``anion:halide`` and ``anion:oxide`` both carry "the anion"), so a ranking by single columns puts
    two columns of the dominant factor before the second factor. Families are permuted jointly, so
    their order is the order of the factors."""
    first: dict[str, dict] = {}
    for r in by_importance:
        if r["importance"] > 0:
            first.setdefault(r["family"], r)
    leads = [first[f["family"]] for f in fam_rows
             if f["family"] in first and f["importance"] >= lead_min and f["importance"] > 2.0 * f["importance_std"]]
    for r in by_importance:
        r["lead"] = any(r is x for x in leads)
    return leads + [r for r in by_importance if not r["lead"]]


def _within_strata(x, y, names, fam, families, fimp, imp_m, seed, repeats, min_stratum, rng) -> dict[str, Any]:
    top_family = families[int(np.argmax(fimp))]
    lab, snames, by = _strata(x, names, fam, top_family, imp_m)
    var = float(np.var(y)) or 1.0
    d = x.shape[1]
    acc = np.zeros(d)
    fam_acc = np.zeros(len(families))
    used, total = [], 0
    groups_f = [[j for j in range(d) if fam[j] == f] for f in families]
    for s in np.unique(lab[lab >= 0]):
        rows = np.flatnonzero(lab == s)
        if len(rows) < min_stratum or np.ptp(y[rows]) == 0:
            continue
        tr, te = _split(len(rows), rng)
        tr, te = rows[tr], rows[te]
        m = _fit(seed, x[tr], y[tr])
        r2 = 1.0 - float(np.mean((m.predict(x[te]) - y[te]) ** 2)) / (float(np.var(y[te])) or 1.0)
        acc += len(rows) * _perm_drop(m, x[te], y[te], [[j] for j in range(d)], repeats, rng, var).mean(1)
        fam_acc += len(rows) * _perm_drop(m, x[te], y[te], groups_f, repeats, rng, var).mean(1)
        total += len(rows)
        used.append({"stratum": snames[s] if s < len(snames) else str(s), "n": len(rows), "r2_holdout": round(r2, 4)})
    if not used:
        return {"by": by, "family": top_family, "strata": [], "reason": f"no stratum with >= {min_stratum} materials"}
    acc /= total
    fam_acc /= total
    return {"by": by, "family": top_family, "strata": used, "n": int(total),
            "families": sorted(({"family": f, "importance": round(float(v), 5)} for f, v in zip(families, fam_acc)),
                               key=lambda r: -r["importance"]),
            "importance": {names[j]: round(float(acc[j]), 5) for j in range(d)}}


def rank_drivers(table: DescriptorTable, names: list[str], seed: int = 0, repeats: int = 3,
                 max_rows: int = 20_000, min_rows: int = 30, **kw) -> dict[str, Any]:
    """attribution.json ``drivers``: :func:`feature_drivers` of every spectral feature in ``table``
    (reference and ``pred:``), from the descriptors ``names`` (the tested, deduplicated ones)."""
    from toolkit.data.targets import is_feature

    ref = [f for f in table.names if is_feature(f) and not f.startswith("pred:")]  # onset...; target:* of other targets
    feats = [*ref, *(f"pred:{f}" for f in ref if f"pred:{f}" in table.names)]
    names = [nm for nm in names if nm in table.names]
    x_all = table.select(names).values if names else np.zeros((len(table.ids), 0))
    usable = [j for j in range(x_all.shape[1]) if np.isfinite(x_all[:, j]).any() and np.nanstd(x_all[:, j]) > 0]
    names = [names[j] for j in usable]
    x_all = x_all[:, usable]
    from toolkit.analyze.engine import Deferred

    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    for f in feats:  # each feature's ranking is a step of its own: a Dask task under the dask engine
        y = table.column(f)
        rows = np.flatnonzero(np.isfinite(y))
        if len(rows) < min_rows or not names or np.ptp(y[rows]) == 0:
            out[f] = {"reason": f"{len(rows)} materials with a finite {f} (need {min_rows}) or no descriptor",
                      "families": [], "descriptors": [], "confounded": [], "strata": {}, "model": None}
            continue
        if len(rows) > max_rows:
            rows = np.sort(rng.choice(rows, size=max_rows, replace=False))
        xs = x_all[rows]
        fin = np.isfinite(xs)
        lo = np.where(fin, xs, np.inf).min(0)
        hi = np.where(fin, xs, -np.inf).max(0)
        cols = np.flatnonzero((fin.sum(0) >= 2) & (hi > lo))  # defined and not constant on these materials
        step = Deferred(feature_drivers, (np.ascontiguousarray(xs[:, cols]), y[rows], [names[j] for j in cols]),
                        {"seed": seed, "repeats": repeats, **kw})
        out[f] = step if step.remote else step.result()  # local engine: one feature's sample at a time
    for f in feats:
        if isinstance(out[f], Deferred):
            out[f] = out[f].result()
        if out[f]["model"] is None:
            continue
        top = out[f]["descriptors"][:3]
        log.info("analyze: drivers of %s: %s (R^2 %.2f)", f, ", ".join(r["descriptor"] for r in top),
                 out[f]["model"]["r2_holdout"])
    return out
