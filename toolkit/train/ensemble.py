"""Ensembles (``train.ensemble: N``): statistics over members, calibration, and the ensemble report.

Members are N models trained on the same split with seeds ``train.seed + k`` (initial weights, data
order); member 0 is the model a single run with the same config trains. The ensemble's prediction is
the mean spectrum over members; its uncertainty the per-point standard deviation over members
(``ddof=1``). The ensemble's onset is the **mean of the members' onsets** and its uncertainty their
standard deviation: centre and spread of the interval come from the same sample of member onsets
(the onset of the mean spectrum, a non-linear function of it, is another statistic, off-centre to
that spread; it was also slightly less accurate, docs/training.md). :func:`summarize` is the one place
that turns (M, N, G) member predictions into what train, ``predict`` and ``embed`` report.

Calibration: a ±zσ interval is calibrated when a fraction ``NOMINAL[z]`` of the reference values
fall inside it (68.27 % at 1σ, 95.45 % at 2σ, as for a normal error). Members of an ensemble usually
agree more than they are right, so the raw σ is too small; one factor ``s`` (spectra) and one
``s_onset`` (onsets) are fitted on the **validation** split (:func:`fit_scale`), then coverage is
measured on the **test** split before and after scaling. ``predict`` and ``embed`` multiply σ by these
factors. The factor is a split-conformal quantile: with n validation ratios r = |error|/σ, ``s`` is the
⌈(n+1)·0.9545⌉-th smallest r, divided by 2. For new values exchangeable with the validation ones, the
±2σ interval then covers at least 95.45 % in expectation *whatever n is* (the plain 95.45 % quantile
of n values covers only about n/(n+1) of that, and is noisy: with 40 validation onsets it fell to 85 %
on the test split). When n < 0.9545/(1-0.9545) ≈ 21 the rank exceeds n and the largest ratio is used
(``conformal_exact: false`` in the calibration record): the guarantee then needs more validation data.

Numbers only (numpy): :mod:`toolkit.predict` and :mod:`toolkit.embed` use the same functions on new
structures.
"""

from __future__ import annotations

import math

import numpy as np

from toolkit.data.spectra import onset_energy, to_log10

#: fraction of a normal distribution within ±z standard deviations
NOMINAL = {1: 0.6827, 2: 0.9545}
SIGMA_FLOOR = 1e-8  # a member spread of exactly 0 would make every error "infinitely many sigma"


def member_seed(seed: int, k: int) -> int:
    """Seed of ensemble member ``k`` (member 0 = the single-model seed)."""
    return int(seed) + int(k)


def mean_std(preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof=1; NaN for one member) over axis 0 of ``preds`` (M, N, G)."""
    p = np.asarray(preds, dtype=np.float64)
    mean = p.mean(axis=0)
    std = p.std(axis=0, ddof=1) if p.shape[0] > 1 else np.full(mean.shape, np.nan)
    return mean, std


def member_onsets(energy: np.ndarray, preds: np.ndarray, threshold: float, transform: str = "log10_alpha",
                  log_floor: float = 2.0, mask: np.ndarray | None = None) -> np.ndarray:
    """(M, N) onsets (eV) of every member's spectra (``mask``: (N, G) points to keep, e.g. the reference's)."""
    out = []
    for p in np.asarray(preds, dtype=np.float64):
        y = to_log10(p, transform, log_floor)
        if mask is not None:
            y = np.where(mask, y, np.nan)
        out.append(np.atleast_1d(onset_energy(energy, y, threshold)))
    return np.stack(out) if out else np.zeros((0, 0))


def ensemble_onset(onsets: np.ndarray) -> np.ndarray:
    """(N,) the ensemble's onset: the mean of the members' onsets ``onsets`` (M, N) over the members that
    have one (NaN where none has)."""
    o = np.asarray(onsets, dtype=np.float64)
    n = np.isfinite(o).sum(axis=0)
    return np.where(n > 0, np.where(np.isfinite(o), o, 0).sum(0) / np.maximum(n, 1), np.nan)


def onset_spread(onsets: np.ndarray) -> np.ndarray:
    """(N,) standard deviation (ddof=1) of the members' onsets where at least 2 members have one, else NaN."""
    o = np.asarray(onsets, dtype=np.float64)
    ok = np.isfinite(o)
    n = ok.sum(axis=0)
    mean = ensemble_onset(o)
    var = np.where(ok, (o - mean) ** 2, 0).sum(0) / np.maximum(n - 1, 1)
    return np.where(n >= 2, np.sqrt(var), np.nan)


def summarize(energy: np.ndarray, preds: np.ndarray, threshold: float, transform: str = "log10_alpha",
              log_floor: float = 2.0, std_scale: float = 1.0, onset_std_scale: float = 1.0,
              mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """What an ensemble says about N materials from its members' predictions ``preds`` (M, N, G):
    ``mean`` (N, G), ``std`` (N, G) x ``std_scale``, ``member_onset`` (M, N), ``onset`` (N,, the mean of
    the members' onsets), ``onset_std`` (N,) x ``onset_std_scale``, and the ±2σ interval ``onset_low``,
    ``onset_high``. ``mask`` (N, G): points to keep for the onsets (a reference's). One member: std NaN."""
    p = np.asarray(preds, dtype=np.float64)
    mean, std = mean_std(p)
    onsets = member_onsets(energy, p, threshold, transform, log_floor, mask=mask).reshape(p.shape[0], p.shape[1])
    onset = ensemble_onset(onsets)
    ostd = onset_spread(onsets) * onset_std_scale
    return {"mean": mean, "std": std * std_scale, "member_onset": onsets, "onset": onset, "onset_std": ostd,
            "onset_low": onset - 2 * ostd, "onset_high": onset + 2 * ostd}


def coverage(err: np.ndarray, sigma: np.ndarray, z: float, scale: float = 1.0) -> float:
    """Fraction of finite ``err`` with |err| <= z·scale·σ (σ floored at SIGMA_FLOOR); NaN if none."""
    e, s = np.asarray(err, dtype=np.float64).ravel(), np.asarray(sigma, dtype=np.float64).ravel()
    ok = np.isfinite(e) & np.isfinite(s)
    if not ok.any():
        return float("nan")
    return float(np.mean(np.abs(e[ok]) <= z * scale * np.maximum(s[ok], SIGMA_FLOOR)))


def conformal_rank(n: int, nominal: float = NOMINAL[2]) -> int:
    """1-based rank ⌈(n+1)·nominal⌉ of the split-conformal quantile among n calibration scores (may exceed n)."""
    return math.ceil((n + 1) * nominal - 1e-9)


def fit_scale(err: np.ndarray, sigma: np.ndarray, z: float = 2.0, nominal: float = NOMINAL[2]) -> float:
    """The factor s such that ±z·s·σ covers a fraction ``nominal`` of new values exchangeable with these: the
    split-conformal quantile of |err|/σ (see the module docstring), divided by z; 1 when nothing to fit."""
    e, s = np.asarray(err, dtype=np.float64).ravel(), np.asarray(sigma, dtype=np.float64).ravel()
    ok = np.isfinite(e) & np.isfinite(s)
    if ok.sum() < 2:
        return 1.0
    r = np.sort(np.abs(e[ok]) / np.maximum(s[ok], SIGMA_FLOOR))
    q = float(r[min(conformal_rank(r.size, nominal), r.size) - 1]) / z
    return q if math.isfinite(q) and q > 0 else 1.0


def _n_finite(err: np.ndarray, sigma: np.ndarray) -> int:
    return int((np.isfinite(np.asarray(err, dtype=np.float64)) & np.isfinite(np.asarray(sigma, dtype=np.float64))).sum())


def calibration(val: dict, test: dict) -> dict:
    """Coverage of ±1σ/±2σ on the test split, raw and after the factors fitted on the validation split.

    ``val``/``test``: ``{"err": (N, G) mean - reference (NaN where masked), "std": (N, G),
    "onset_err": (N,), "onset_std": (N,)}``."""
    s = fit_scale(val["err"], val["std"])
    so = fit_scale(val["onset_err"], val["onset_std"])
    n_pts, n_on = _n_finite(val["err"], val["std"]), _n_finite(val["onset_err"], val["onset_std"])
    out: dict = {"fitted_on": "val", "method": "split-conformal quantile of |error|/sigma, rank ceil((n+1)*0.9545)",
                 "nominal_1sigma": NOMINAL[1], "nominal_2sigma": NOMINAL[2],
                 "recalibration_factor": s, "onset_recalibration_factor": so,
                 "n_fit_points": n_pts, "n_fit_onsets": n_on,
                 "conformal_exact": bool(conformal_rank(n_pts) <= n_pts and conformal_rank(n_on) <= n_on)}
    for split, d in (("val", val), ("test", test)):
        for z in (1, 2):
            out[f"{split}_spectrum_coverage_{z}sigma_raw"] = coverage(d["err"], d["std"], z)
            out[f"{split}_spectrum_coverage_{z}sigma"] = coverage(d["err"], d["std"], z, s)
            out[f"{split}_onset_coverage_{z}sigma_raw"] = coverage(d["onset_err"], d["onset_std"], z)
            out[f"{split}_onset_coverage_{z}sigma"] = coverage(d["onset_err"], d["onset_std"], z, so)
    out["test_mean_spectrum_std"] = float(np.nanmean(test["std"])) * s if np.isfinite(test["std"]).any() else None
    out["test_mean_onset_std_eV"] = (float(np.nanmean(test["onset_std"])) * so
                                     if np.isfinite(test["onset_std"]).any() else None)
    return out


def split_errors(energy: np.ndarray, preds: np.ndarray, target: np.ndarray, threshold: float) -> dict:
    """Errors and spreads of an ensemble on one split: ``preds`` (M, N, G), ``target`` (N, G) NaN = masked.

    Onsets use the rule of :func:`toolkit.train.metrics.onset_metrics` (prediction masked where the
    reference is); the ensemble's onset is :func:`summarize`'s (the mean of the members' onsets)."""
    from toolkit.train.metrics import onset_metrics, onset_scores

    mask = np.isfinite(target)
    summ = summarize(energy, preds, threshold, mask=mask)
    mean, std = summ["mean"], summ["std"]
    err = np.where(mask, mean - np.nan_to_num(target), np.nan)
    on_true = onset_metrics(energy, mean, target, threshold)["onset_true"]
    on = {"onset_pred": summ["onset"], "onset_true": on_true, **onset_scores(summ["onset"], on_true)}
    return {"mean": mean, "std": np.where(mask, std, np.nan), "err": err, "onset": on,
            "onset_err": on["onset_pred"] - on["onset_true"], "onset_std": summ["onset_std"]}
