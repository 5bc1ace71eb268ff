"""Explain clusters by descriptors: enrichment tests, a surrogate classifier, spectral signatures,
agreement between layers, and recovery of the benchmark's planted drivers.

Tests (each cluster against the rest of the materials, materials missing the descriptor left out):

* categorical (0/1): Fisher's exact test (two-sided), odds ratio; effect = rank-biserial correlation,
  which for a 0/1 variable equals prevalence in the cluster minus prevalence outside;
* continuous: Mann-Whitney U (two-sided); effect = rank-biserial correlation ``2U/(n1 n2) - 1``
  (> 0: larger in the cluster).

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
from scipy.stats import false_discovery_control, fisher_exact, mannwhitneyu
from threadpoolctl import threadpool_limits

from toolkit.analyze.descriptors import DescriptorTable, family, is_categorical, is_spectral

log = logging.getLogger(__name__)

FAMILY_PRIORITY = ("anion", "cation_class", "coordination", "oxidation", "element", "crystal_system", "spacegroup")
ALPHA = 0.05
UNTESTED = ("fraction",)  # element fractions: redundant with element:<El> in tests; kept for probes/surrogate


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


def _test(col: np.ndarray, member: np.ndarray, categorical: bool) -> dict[str, Any] | None:
    ok = np.isfinite(col)
    xin, xout = col[ok & member], col[ok & ~member]
    if len(xin) < 2 or len(xout) < 2:
        return None
    if categorical:
        a, c = int(xin.sum()), int(xout.sum())
        b, d = len(xin) - a, len(xout) - c
        if a + c == 0 or b + d == 0:
            return None
        odds, p = fisher_exact([[a, b], [c, d]])
        pin, pout = a / len(xin), c / len(xout)
        return {"test": "fisher", "p": float(p), "effect": float(pin - pout), "odds_ratio": float(odds),
                "in_cluster": float(pin), "rest": float(pout), "n_in": len(xin), "n_rest": len(xout)}
    if np.ptp(col[ok]) == 0:
        return None
    u, p = mannwhitneyu(xin, xout, alternative="two-sided")
    return {"test": "mannwhitney", "p": float(p), "effect": float(2.0 * u / (len(xin) * len(xout)) - 1.0),
            "in_cluster": float(np.median(xin)), "rest": float(np.median(xout)), "n_in": len(xin), "n_rest": len(xout)}


def enrichment(labels: np.ndarray, table: DescriptorTable, names: list[str] | None = None) -> dict[int, list[dict]]:
    """Per cluster: ranked list of test results (dicts with descriptor, test, p, q, effect, ...)."""
    names = names if names is not None else [n for n in table.names if not is_spectral(n)]
    results: list[tuple[int, dict]] = []
    clusters = np.unique(labels)
    cols = {n: table.column(n) for n in names}
    for c in clusters:
        member = labels == c
        for n in names:
            r = _test(cols[n], member, is_categorical(n))
            if r is not None:
                r["descriptor"] = n
                results.append((int(c), r))
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
    """HistGradientBoosting classifier of cluster membership from descriptors (NaN handled natively);
    permutation importances (drop in balanced accuracy) on a stratified 30 % hold-out."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.inspection import permutation_importance
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import train_test_split

    if not names or len(np.unique(labels)) < 2:
        return {"features": [], "importances": {}, "holdout_balanced_accuracy": None, "reason": "nothing to fit"}
    x = table.select(names).values
    counts = np.bincount(labels)
    strat = labels if counts[counts > 0].min() >= 2 else None
    xtr, xte, ytr, yte = train_test_split(x, labels, test_size=0.3, random_state=seed, stratify=strat)
    clf = HistGradientBoostingClassifier(max_iter=60, learning_rate=0.15, random_state=seed)
    with warnings.catch_warnings(), threadpool_limits(1):  # small fits: threads only add contention
        warnings.simplefilter("ignore")
        clf.fit(xtr, ytr)
        acc = balanced_accuracy_score(yte, clf.predict(xte))
        pi = permutation_importance(clf, xte, yte, n_repeats=repeats, random_state=seed, n_jobs=1,
                                    scoring="balanced_accuracy")
    order = np.argsort(-pi.importances_mean)
    return {"model": "HistGradientBoostingClassifier", "holdout_balanced_accuracy": float(acc),
            "scoring": "balanced_accuracy", "repeats": repeats,
            "importances": {names[i]: {"mean": float(pi.importances_mean[i]), "std": float(pi.importances_std[i])}
                            for i in order}}


SIGNATURE_MAX = 20_000  # spectra per cluster used for the spectral signature (a seeded sample above)


def spectral_signature(labels: np.ndarray, energy: np.ndarray, reference: np.ndarray | None,
                       predicted: np.ndarray | None, onset: np.ndarray | None, seed: int = 0) -> dict[int, dict]:
    """Per cluster: mean and 10/90 % percentile band of reference and predicted spectra (log10 α on
    the energy grid, NaN-aware), and the onset distribution (eV). Clusters larger than
    ``SIGNATURE_MAX`` use a seeded random sample of that many members for the spectra (recorded as
    ``spectra_sampled``), which bounds the memory at 20,000 x grid float64 per cluster."""
    out: dict[int, dict] = {}
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        m = labels == c
        sig: dict[str, Any] = {"size": int(m.sum())}
        rows = np.flatnonzero(m)
        if len(rows) > SIGNATURE_MAX:
            rows = np.sort(rng.choice(rows, size=SIGNATURE_MAX, replace=False))
            sig["spectra_sampled"] = SIGNATURE_MAX
        for key, spec in (("reference", reference), ("predicted", predicted)):
            if spec is None:
                continue
            s = np.asarray(spec[rows], dtype=np.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                sig[key] = {"mean": np.nanmean(s, 0), "std": np.nanstd(s, 0), "p10": np.nanpercentile(s, 10, 0),
                            "p90": np.nanpercentile(s, 90, 0)}
        if onset is not None:
            o = onset[m]
            o = o[np.isfinite(o)]
            sig["onset"] = ({"n": int(o.size), "mean": float(o.mean()), "std": float(o.std()),
                             "median": float(np.median(o)), "q25": float(np.percentile(o, 25)),
                             "q75": float(np.percentile(o, 75))} if o.size else {"n": 0})
        out[int(c)] = sig
    return out


def element_enrichment(labels: np.ndarray, table: DescriptorTable) -> dict[int, dict[str, float]]:
    """Per cluster and element: log2 of (prevalence in cluster + 0.5/n) / (prevalence outside + 0.5/n)."""
    els = [n for n in table.names if family(n) == "element"]
    out: dict[int, dict[str, float]] = {}
    for c in np.unique(labels):
        m = labels == c
        d = {}
        for n in els:
            col = table.column(n)
            ok = np.isfinite(col)
            pin = (col[ok & m].sum() + 0.5) / (np.sum(ok & m) + 1.0)
            pout = (col[ok & ~m].sum() + 0.5) / (np.sum(ok & ~m) + 1.0)
            d[n.split(":", 1)[1]] = float(np.log2(pin / pout))
        out[int(c)] = d
    return out


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
