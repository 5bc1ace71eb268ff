"""Explain clusters by descriptors: enrichment tests, a surrogate classifier, spectral signatures,
agreement between layers, and recovery of the benchmark's planted drivers.

Tests (each cluster against the rest of the materials, materials missing the descriptor left out):

* categorical (0/1): Fisher's exact test (two-sided), odds ratio; effect = rank-biserial correlation,
  which for a 0/1 variable equals prevalence in the cluster minus prevalence outside;
* continuous: Mann-Whitney U (two-sided, normal approximation with tie and continuity correction);
  effect = rank-biserial correlation ``2U/(n1 n2) - 1`` (> 0: larger in the cluster).

Both are vectorised over clusters (one pass per descriptor), so their cost does not grow with the
number of clusters.

All p-values of one clustering (all clusters x descriptors) are Benjamini-Hochberg corrected
together (``scipy.stats.false_discovery_control``). Categorical descriptors that are identical on
the dataset (e.g. ``element:Te`` and ``anion:telluride`` when Te only occurs as an anion) are tested
once, under the first name in :data:`FAMILY_PRIORITY` order, the others listed as ``aliases``.
Ranking: by q (ascending), ties by |effect| (descending), as in enrichment analysis.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from scipy.stats import false_discovery_control
from threadpoolctl import threadpool_limits

from toolkit.analyze.descriptors import DescriptorTable, family, is_categorical, is_spectral

log = logging.getLogger(__name__)

FAMILY_PRIORITY = ("anion", "cation_class", "coordination", "oxidation", "element", "crystal_system", "spacegroup")
ALPHA = 0.05
# element fractions: redundant with element:<El> in tests (kept for probes/surrogate); oxidation_method:
# provenance of a material's oxidation states, not a property of the material: never ranked as a driver
UNTESTED = ("fraction", "oxidation_method")


def dedupe_categorical(table: DescriptorTable) -> tuple[list[str], dict[str, list[str]]]:
    """Structural descriptor names to test (not spectral, not ``fraction:*``), and the aliases of
    each kept name: categorical columns indistinguishable on this dataset, i.e. equal on every
    material where both are defined (e.g. ``oxidation:Te-2`` and ``anion:telluride``). The name
    earliest in FAMILY_PRIORITY is kept; aliases are tested once, under it."""
    def prio(n: str) -> tuple[int, str]:
        f = family(n)
        return (FAMILY_PRIORITY.index(f) if f in FAMILY_PRIORITY else len(FAMILY_PRIORITY), n)

    keep: list[str] = []
    aliases: dict[str, list[str]] = {}
    kept_cols: list[tuple[str, np.ndarray]] = []
    for name in sorted((n for n in table.names if not is_spectral(n) and family(n) not in UNTESTED), key=prio):
        if is_categorical(name):
            col = table.column(name)
            ok = np.isfinite(col)
            hit = next((k for k, kc in kept_cols
                        if np.array_equal(np.isfinite(kc) & ok, ok) and np.array_equal(kc[ok], col[ok])), None)
            if hit is not None:
                aliases[hit].append(name)
                continue
            kept_cols.append((name, col))
        keep.append(name)
        aliases[name] = []
    return keep, aliases


def _fisher_two_sided(a: np.ndarray, n_in: np.ndarray, k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Two-sided Fisher exact p-values of many 2x2 tables at once (as scipy.stats.fisher_exact: the
    sum of the hypergeometric probabilities of all tables at most as likely as the observed one,
    relative tolerance 1e-7). ``a``: successes in the cluster, ``n_in`` cluster size, ``k`` successes
    in all, ``n`` all; arrays of one length. Supports are padded and evaluated in chunks."""
    from scipy.special import gammaln

    def lchoose(x, y):
        return gammaln(x + 1) - gammaln(y + 1) - gammaln(x - y + 1)

    a, n_in, k, n = (np.asarray(v, dtype=np.float64) for v in (a, n_in, k, n))
    lo = np.maximum(0, n_in + k - n)
    hi = np.minimum(n_in, k)
    width = (hi - lo + 1).astype(np.int64)
    p = np.empty(len(a))
    order = np.argsort(width, kind="stable")
    i = 0
    while i < len(order):  # chunks of tests of similar support width, <= ~4M cells each
        w = int(width[order[i]])
        j = i + 1
        while j < len(order) and width[order[j]] * (j - i + 1) <= max(4_000_000, w):
            j += 1
        idx = order[i:j]
        wmax = int(width[idx].max())
        x = lo[idx, None] + np.arange(wmax)[None, :]
        valid = x <= hi[idx, None]
        lden = lchoose(n[idx], n_in[idx])[:, None]
        lp = lchoose(k[idx, None], x) + lchoose(n[idx, None] - k[idx, None], n_in[idx, None] - x) - lden
        lobs = (lchoose(k[idx], a[idx]) + lchoose(n[idx] - k[idx], n_in[idx] - a[idx]) - lden[:, 0])[:, None]
        keep = valid & (lp <= lobs + np.log1p(1e-7))
        p[idx] = np.minimum(1.0, np.where(keep, np.exp(lp), 0.0).sum(1))
        i = j
    return p


def _tests_of_column(col: np.ndarray, labels: np.ndarray, k: int, categorical: bool) -> dict[str, np.ndarray] | None:
    """Every cluster (0..k-1) against the rest for one descriptor, vectorised over clusters."""
    from scipy.stats import norm, rankdata

    ok = np.isfinite(col)
    lab, v = labels[ok], col[ok]
    n = len(v)
    n_in = np.bincount(lab, minlength=k).astype(np.float64)
    n_out = n - n_in
    valid = (n_in >= 2) & (n_out >= 2)
    if categorical:
        a = np.bincount(lab, weights=v, minlength=k)
        tot = v.sum()
        c = tot - a
        if tot == 0 or tot == n:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            pin, pout = a / n_in, c / n_out
            odds = (a * (n_out - c)) / ((n_in - a) * c)
        p = np.full(k, np.nan)
        if valid.any():
            p[valid] = _fisher_two_sided(a[valid], n_in[valid], np.full(valid.sum(), tot), np.full(valid.sum(), n))
        return {"test": "fisher", "p": p, "effect": pin - pout, "odds_ratio": odds, "in_cluster": pin, "rest": pout,
                "n_in": n_in, "n_rest": n_out, "valid": valid}
    if n == 0 or np.ptp(v) == 0:
        return None
    r = rankdata(v)
    u = np.bincount(lab, weights=r, minlength=k) - n_in * (n_in + 1) / 2.0
    _, t = np.unique(v, return_counts=True)
    tie = float((t ** 3 - t).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = n_in * n_out / 2.0
        sigma = np.sqrt(n_in * n_out / 12.0 * ((n + 1) - tie / (n * (n - 1))))
        zz = (np.abs(u - mu) - 0.5) / sigma  # scipy's asymptotic method with continuity correction
        p = np.minimum(1.0, 2.0 * norm.sf(np.clip(zz, 0.0, None)))
        effect = 2.0 * u / (n_in * n_out) - 1.0
    order = np.argsort(lab, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(lab, minlength=k))])
    vs = v[order]
    med_in = np.array([np.median(vs[bounds[c]:bounds[c + 1]]) if bounds[c + 1] > bounds[c] else np.nan for c in range(k)])
    # median of the rest: from the sorted column, removing the cluster's values, via ranks is costly;
    # the rest's median is computed exactly only for valid clusters (k medians of N values at most)
    rest = np.full(k, np.nan)
    srt = np.sort(v)
    for c in np.flatnonzero(valid):
        mine = np.sort(vs[bounds[c]:bounds[c + 1]])
        rest[c] = _median_without(srt, mine)
    return {"test": "mannwhitney", "p": p, "effect": effect, "in_cluster": med_in, "rest": rest,
            "n_in": n_in, "n_rest": n_out, "valid": valid & np.isfinite(p) & (sigma > 0)}


def _median_without(srt: np.ndarray, mine: np.ndarray) -> float:
    """Median of the sorted array ``srt`` with the (sorted) multiset ``mine`` removed."""
    m = len(srt) - len(mine)
    if m <= 0:
        return float("nan")

    def kth(i: int) -> float:  # i-th smallest of srt minus mine (binary search on the value)
        lo, hi = 0, len(srt) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            below = np.searchsorted(srt, srt[mid], side="right") - np.searchsorted(mine, srt[mid], side="right")
            if below >= i + 1:
                hi = mid
            else:
                lo = mid + 1
        return float(srt[lo])

    return kth(m // 2) if m % 2 else 0.5 * (kth(m // 2 - 1) + kth(m // 2))


def enrichment(labels: np.ndarray, table: DescriptorTable, names: list[str] | None = None) -> dict[int, list[dict]]:
    """Per cluster: ranked list of test results (dicts with descriptor, test, p, q, effect, ...).

    Vectorised over clusters: one pass per descriptor (counts / rank sums per cluster via
    ``bincount``), so the cost grows with N x D, not with the number of clusters; Fisher p-values of
    all clusters of a descriptor from one padded hypergeometric evaluation, Mann-Whitney p-values
    from the normal approximation with tie and continuity correction (scipy's ``asymptotic``)."""
    names = names if names is not None else [n for n in table.names if not is_spectral(n)]
    clusters = np.unique(labels)
    lab = np.searchsorted(clusters, labels)
    k = len(clusters)
    results: list[tuple[int, dict]] = []
    idx = {n: i for i, n in enumerate(table.names)}
    for name in names:
        r = _tests_of_column(np.asarray(table.values[:, idx[name]], dtype=np.float64), lab, k, is_categorical(name))
        if r is None:
            continue
        for c in np.flatnonzero(r["valid"]):
            d = {"test": r["test"], "p": float(r["p"][c]), "effect": float(r["effect"][c])}
            if r["test"] == "fisher":
                d["odds_ratio"] = float(r["odds_ratio"][c])
            d.update({"in_cluster": float(r["in_cluster"][c]), "rest": float(r["rest"][c]),
                      "n_in": int(r["n_in"][c]), "n_rest": int(r["n_rest"][c]), "descriptor": name})
            results.append((int(clusters[c]), d))
    if results:
        q = false_discovery_control(np.array([r["p"] for _, r in results]), method="bh")
        for (_, r), qq in zip(results, q):
            r["q"] = float(qq)
    out: dict[int, list[dict]] = {int(c): [] for c in clusters}
    for c, r in results:
        out[c].append(r)
    for c in out:
        out[c].sort(key=lambda r: (r["q"], -abs(r["effect"])))
    return out


def surrogate_importance(labels: np.ndarray, table: DescriptorTable, names: list[str], repeats: int = 5,
                         seed: int = 0) -> dict[str, Any]:
    """One random-forest classifier of cluster membership over all clusters of a layer (NaN handled
    natively); permutation importances (drop in balanced accuracy) on a 30 % hold-out (stratified
    when every cluster has two members). A forest's cost does not grow with the number of clusters
    (a gradient-boosted classifier fits one tree per class and iteration: 6x slower at k = 30)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import train_test_split

    if not names or len(np.unique(labels)) < 2:
        return {"features": [], "importances": {}, "holdout_balanced_accuracy": None, "reason": "nothing to fit"}
    x = table.select(names).values
    counts = np.bincount(labels)
    strat = labels if counts[counts > 0].min() >= 2 else None
    xtr, xte, ytr, yte = train_test_split(x, labels, test_size=0.3, random_state=seed, stratify=strat)
    clf = RandomForestClassifier(n_estimators=60, min_samples_leaf=1, random_state=seed, n_jobs=1)
    with warnings.catch_warnings(), threadpool_limits(1):  # small fits: threads only add contention
        warnings.simplefilter("ignore")
        clf.fit(xtr, ytr)
        acc = balanced_accuracy_score(yte, clf.predict(xte))
        imp = _permutation_balanced_accuracy(clf, xte, yte, repeats, seed, acc)
    mean, std = imp.mean(1), imp.std(1)
    order = np.argsort(-mean, kind="stable")
    return {"model": "RandomForestClassifier", "holdout_balanced_accuracy": float(acc),
            "scoring": "balanced_accuracy", "repeats": repeats,
            "importances": {names[i]: {"mean": float(mean[i]), "std": float(std[i])} for i in order}}


def _permutation_balanced_accuracy(clf, x: np.ndarray, y: np.ndarray, repeats: int, seed: int, base: float,
                                   batch_cells: int = 4_000_000) -> np.ndarray:
    """(D, repeats) drop in balanced accuracy when each column is shuffled (as sklearn's
    permutation_importance), the shuffled copies predicted in few stacked calls."""
    rng = np.random.default_rng(seed)
    n, d = x.shape
    classes, yi = np.unique(y, return_inverse=True)
    per_class = np.bincount(yi, minlength=len(classes)).astype(np.float64)
    jobs = [(j, r) for j in range(d) for r in range(repeats)]
    out = np.zeros((d, repeats))
    per = max(1, batch_cells // max(1, x.size))
    for s in range(0, len(jobs), per):
        chunk = jobs[s:s + per]
        xs = np.tile(x, (len(chunk), 1))
        for i, (j, _) in enumerate(chunk):
            xs[i * n:(i + 1) * n, j] = x[rng.permutation(n), j]
        hit = (clf.predict(xs) == np.tile(y, len(chunk))).reshape(len(chunk), n)
        for i, (j, r) in enumerate(chunk):
            recall = np.bincount(yi[hit[i]], minlength=len(classes)) / per_class
            out[j, r] = base - float(recall.mean())
    return out


SIGNATURE_MAX = 20_000  # spectra per cluster used for the spectral signature (a seeded sample above)
SIGNATURE_TOTAL = 200_000  # ... and per clustering: the cap per cluster is lowered to this / clusters
SIGNATURE_MIN = 2_000  # ... but never below this


def _nanpercentiles(s: np.ndarray, qs: tuple[float, ...]) -> list[np.ndarray]:
    """Column-wise percentiles ignoring NaN, = ``np.nanpercentile(s, q, axis=0)`` (linear
    interpolation) from one sort (numpy's nanpercentile loops over the columns in Python)."""
    srt = np.sort(s, axis=0)  # NaN sort last
    n = np.isfinite(s).sum(0)
    cols = np.arange(s.shape[1])
    out = []
    for q in qs:
        pos = np.maximum(n - 1, 0) * (q / 100.0)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
        frac = pos - lo
        v = srt[lo, cols] * (1 - frac) + srt[hi, cols] * frac
        v = np.where(frac == 0, srt[lo, cols], v)
        out.append(np.where(n > 0, v, np.nan))
    return out


def spectral_signature(labels: np.ndarray, energy: np.ndarray, reference: Any, predicted: Any,
                       onset: np.ndarray | None, seed: int = 0, predicted_std: Any = None,
                       predicted_onset: dict[str, np.ndarray] | None = None) -> dict[int, dict]:
    """Per cluster: mean and 10/90 % percentile band of reference and predicted spectra (log10 α on
    the energy grid, NaN-aware), and the onset distribution (eV). ``reference``/``predicted``/
    ``predicted_std``: (N, G) arrays or lazy row views (:class:`toolkit.analyze.lazy.Spectra`), read once
    each, for the union of the clusters' samples only. A cluster larger than its cap uses a seeded random
    sample of that many members for the spectra (recorded as ``spectra_sampled``): the cap is
    ``SIGNATURE_MAX``, lowered to ``SIGNATURE_TOTAL / clusters`` (at least ``SIGNATURE_MIN``) so that one
    clustering reads at most ~``SIGNATURE_TOTAL`` spectra whatever N. Sampling error of a sampled
    cluster's mean at one grid point: its standard deviation / sqrt(cap); of a percentile: sqrt(p(1-p)/cap)
    in rank (p = 0.1 and cap = 6,667 (30 clusters): 0.4 percentage points).

    Ensembles: ``predicted_std`` (N, G), the members' recalibrated per-point σ, gives ``predicted.sigma``
    (the cluster's mean σ per point: the ±2σ band of its predicted spectrum); ``predicted_onset``
    (``onset``, ``onset_std``, ``onset_low``, ``onset_high``, each (N,)) gives ``predicted_onset``: the
    cluster means of the ensemble onset, its σ and its ±2σ interval ends."""
    out: dict[int, dict] = {}
    rng = np.random.default_rng(seed)
    clusters = np.unique(labels)
    cap = min(SIGNATURE_MAX, max(SIGNATURE_MIN, SIGNATURE_TOTAL // max(len(clusters), 1)))
    sample: dict[int, np.ndarray] = {}
    for c in clusters:
        m = labels == c
        sig: dict[str, Any] = {"size": int(m.sum())}
        rows = np.flatnonzero(m)
        if len(rows) > cap:
            rows = np.sort(rng.choice(rows, size=cap, replace=False))
            sig["spectra_sampled"] = cap
        sample[int(c)] = rows
        if predicted_onset is not None:
            po = {k: np.asarray(v, dtype=np.float64)[m] for k, v in predicted_onset.items()}
            ok = np.isfinite(po["onset"]) & np.isfinite(po["onset_std"])
            sig["predicted_onset"] = ({"n": int(ok.sum()), **{k: float(v[ok].mean()) for k, v in po.items()}}
                                      if ok.any() else {"n": 0})
        if onset is not None:
            o = onset[m]
            o = o[np.isfinite(o)]
            sig["onset"] = ({"n": int(o.size), "mean": float(o.mean()), "std": float(o.std()),
                             "median": float(np.median(o)), "q25": float(np.percentile(o, 25)),
                             "q75": float(np.percentile(o, 75))} if o.size else {"n": 0})
        out[int(c)] = sig
    union = np.unique(np.concatenate(list(sample.values()))) if sample else np.zeros(0, np.int64)
    pos = {c: np.searchsorted(union, r) for c, r in sample.items()}
    for key, spec in (("reference", reference), ("predicted", predicted), ("sigma", predicted_std)):
        if spec is None or (key == "sigma" and predicted is None):
            continue
        block = spec[union]  # one read of the sampled rows (a pass over the source's chunks when lazy)
        for c, p in pos.items():
            s = np.asarray(block[p], dtype=np.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                if key == "sigma":
                    out[c]["predicted"]["sigma"] = np.nanmean(s, 0)
                    continue
                p10, p90 = _nanpercentiles(s, (10, 90))
                out[c][key] = {"mean": np.nanmean(s, 0), "std": np.nanstd(s, 0), "p10": p10, "p90": p90}
        del block
    return out


def element_enrichment(labels: np.ndarray, table: DescriptorTable) -> dict[int, dict[str, float]]:
    """Per cluster and element: log2 of (prevalence in cluster + 0.5/n) / (prevalence outside + 0.5/n)
    (vectorised: one indicator product for all clusters and elements)."""
    from scipy.sparse import csr_matrix

    els = [n for n in table.names if family(n) == "element"]
    clusters = np.unique(labels)
    if not els:
        return {int(c): {} for c in clusters}
    lab = np.searchsorted(clusters, labels)
    vals = table.select(els).values
    ok = np.isfinite(vals)
    ind = csr_matrix((np.ones(len(lab)), (lab, np.arange(len(lab)))), shape=(len(clusters), len(lab)))
    hit_in = np.asarray(ind @ np.where(ok, vals, 0.0))
    n_in = np.asarray(ind @ ok.astype(np.float64))
    hit_out, n_out = hit_in.sum(0) - hit_in, n_in.sum(0) - n_in
    lr = np.log2(((hit_in + 0.5) / (n_in + 1.0)) / ((hit_out + 0.5) / (n_out + 1.0)))
    sym = [n.split(":", 1)[1] for n in els]
    return {int(c): {e: float(v) for e, v in zip(sym, lr[i])} for i, c in enumerate(clusters)}


# ---------------------------------------------------------------- benchmark recovery
def matches(name: str, key: str, aliases: list[str] = ()) -> bool:
    """Does a descriptor (or one of its aliases) match a truth key (``family:*`` = whole family)?"""
    for n in (name, *aliases):
        if key.endswith(":*") and family(n) == key[:-2]:
            return True
        if n == key:
            return True
    return False


def precision_at_k(ranked: list[dict], truth: list[str], aliases: dict[str, list[str]], k: int = 3) -> float:
    """Fraction of the top-k ranked descriptors that match a planted driver."""
    top = ranked[:k]
    if not top:
        return 0.0
    return sum(any(matches(r["descriptor"], t, aliases.get(r["descriptor"], [])) for t in truth) for r in top) / len(top)
