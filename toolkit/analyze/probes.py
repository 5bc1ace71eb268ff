"""Linear probes: how much of each descriptor a layer's activations encode.

For every layer and probe target, a linear model is fitted on the standardised activations and
scored out of fold (``folds``-fold cross-validation, materials missing the target left out):

Activations are standardised and, when wider than 64, projected on their first 64 principal
components, which keeps a probe cheap for 1,501-point spectra. The projection is fitted once per
layer on all probe rows: it is unsupervised (it sees no target), so fitting it outside the folds
leaks no target information, and it costs one randomized SVD per layer instead of one per target
and fold (at 20,000 rows x 1,501 points: 6 minutes -> seconds).

* continuous targets (``cn_mean``, bond lengths, angles, volume, ..., ``onset``): ``RidgeCV``
  (alpha chosen by efficient leave-one-out inside each training fold); score = out-of-fold R^2;
* categorical targets (0/1: ``anion:*``, ``coordination:*``, ``cation_class:*``, ``oxidation:*``
  with at least ``min_class`` materials on each side): ``RidgeClassifierCV``; score = out-of-fold
  ROC AUC of its decision function.

Ridge for both keeps a probe at one closed-form solve per alpha, so probes of a dozen layers
take seconds; the score is what matters here, not the classifier's calibration.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from toolkit.analyze.descriptors import DescriptorTable, family, is_categorical

CONTINUOUS_TARGETS = ("cn_mean", "bond_length_mean", "bond_length_min", "angle_XMX_mean", "angle_MXM_mean",
                      "volume_per_atom", "density", "electronegativity_diff", "onset", "peak_1")
CATEGORICAL_FAMILIES = ("anion", "coordination", "cation_class", "oxidation")
ALPHAS = np.logspace(-2, 4, 13)
MAX_COMPONENTS = 64


def probe_targets(table: DescriptorTable, min_class: int = 10, max_categorical: int = 24) -> list[str]:
    """Continuous targets present in the table plus the most balanced categorical ones."""
    conts = [*CONTINUOUS_TARGETS, *(n for n in table.names if n.startswith("target:"))]  # other targets' features
    out = [n for n in conts if n in table.names and np.isfinite(table.column(n)).sum() >= 2 * min_class]
    cats = []
    for n in table.names:
        if family(n) in CATEGORICAL_FAMILIES:
            col = table.column(n)
            col = col[np.isfinite(col)]
            pos = int(col.sum())
            if min(pos, col.size - pos) >= min_class:
                cats.append((min(pos, col.size - pos), n))
    cats.sort(key=lambda t: (-t[0], t[1]))
    return out + [n for _, n in cats[:max_categorical]]


def _project(x: np.ndarray) -> np.ndarray:
    """Standardised ``x`` on its first MAX_COMPONENTS principal components (unchanged when narrower)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    k = min(MAX_COMPONENTS, x.shape[1], max(1, int(0.5 * x.shape[0])))
    if k >= x.shape[1]:
        return x
    return PCA(n_components=k, svd_solver="randomized", random_state=0).fit_transform(StandardScaler().fit_transform(x))


def probe_layer(features: np.ndarray, table: DescriptorTable, targets: list[str], folds: int = 5,
                seed: int = 0) -> dict[str, dict[str, Any]]:
    """Out-of-fold probe score of each target from ``features`` (N, H) (NaN imputed by column mean)."""
    with threadpool_limits(1, user_api="blas"):  # small solves: threaded BLAS only adds contention
        return _probe_layer(np.asarray(features, dtype=np.float64), table, targets, folds, seed)


def _probe_layer(x: np.ndarray, table: DescriptorTable, targets: list[str], folds: int, seed: int) -> dict[str, dict[str, Any]]:
    from sklearn.linear_model import RidgeClassifierCV, RidgeCV
    from sklearn.metrics import r2_score, roc_auc_score
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    mean = np.nanmean(np.where(np.isfinite(x), x, np.nan), axis=0) if not np.isfinite(x).all() else None
    if mean is not None:
        x = np.where(np.isfinite(x), x, np.nan_to_num(mean)[None, :])
    x = _project(x)
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        y = table.column(t)
        ok = np.isfinite(y)
        xs, ys = x[ok], y[ok]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if is_categorical(t):
                ys = ys.astype(int)
                cv = StratifiedKFold(n_splits=min(folds, int(np.bincount(ys).min())), shuffle=True, random_state=seed)
                model = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=ALPHAS))
                dec = cross_val_predict(model, xs, ys, cv=cv, method="decision_function")
                out[t] = {"kind": "categorical", "metric": "roc_auc", "score": float(roc_auc_score(ys, dec)),
                          "n": int(ok.sum())}
            else:
                cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
                model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS))
                pred = cross_val_predict(model, xs, ys, cv=cv)
                out[t] = {"kind": "continuous", "metric": "r2", "score": float(r2_score(ys, pred)), "n": int(ok.sum())}
    return out
