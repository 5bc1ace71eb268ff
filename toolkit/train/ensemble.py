"""Ensembles (``train.ensemble: N``): statistics over members, calibration, and the ensemble report.

Members are N models trained on the same split with seeds ``train.seed + k`` (initial weights, data
order); member 0 is the model a single run with the same config trains. The ensemble's prediction is
the mean spectrum over members; its uncertainty the per-point standard deviation over members
(``ddof=1``); the onset's the standard deviation of the members' onsets.

Calibration: a ±zσ interval is calibrated when a fraction ``NOMINAL[z]`` of the reference values
fall inside it (68.27 % at 1σ, 95.45 % at 2σ, as for a normal error). Members of an ensemble usually
agree more than they are right, so the raw σ is too small; one factor ``s`` (spectra) and one
``s_onset`` (onsets) are fitted on the **validation** split so that the ±2σ coverage there is nominal
(:func:`fit_scale`: ``s`` = the 95.45 % quantile of |error|/σ, divided by 2), then coverage is measured
on the **test** split before and after scaling. ``predict`` multiplies σ by these factors.

Numbers only (numpy): :mod:`toolkit.predict` uses the same functions on new structures.
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


def onset_spread(onsets: np.ndarray) -> np.ndarray:
    """(N,) standard deviation (ddof=1) of the members' onsets where at least 2 members have one, else NaN."""
    o = np.asarray(onsets, dtype=np.float64)
    ok = np.isfinite(o)
    n = ok.sum(axis=0)
    mean = np.where(n > 0, np.where(ok, o, 0).sum(0) / np.maximum(n, 1), np.nan)
    var = np.where(ok, (o - mean) ** 2, 0).sum(0) / np.maximum(n - 1, 1)
    return np.where(n >= 2, np.sqrt(var), np.nan)


def coverage(err: np.ndarray, sigma: np.ndarray, z: float, scale: float = 1.0) -> float:
    """Fraction of finite ``err`` with |err| <= z·scale·σ (σ floored at SIGMA_FLOOR); NaN if none."""
    e, s = np.asarray(err, dtype=np.float64).ravel(), np.asarray(sigma, dtype=np.float64).ravel()
    ok = np.isfinite(e) & np.isfinite(s)
    if not ok.any():
        return float("nan")
    return float(np.mean(np.abs(e[ok]) <= z * scale * np.maximum(s[ok], SIGMA_FLOOR)))


def fit_scale(err: np.ndarray, sigma: np.ndarray, z: float = 2.0, nominal: float = NOMINAL[2]) -> float:
    """The factor s with coverage(err, σ, z, s) = nominal on these values (1 when nothing to fit)."""
    e, s = np.asarray(err, dtype=np.float64).ravel(), np.asarray(sigma, dtype=np.float64).ravel()
    ok = np.isfinite(e) & np.isfinite(s)
    if ok.sum() < 2:
        return 1.0
    r = np.abs(e[ok]) / np.maximum(s[ok], SIGMA_FLOOR)
    q = float(np.quantile(r, nominal)) / z
    return q if math.isfinite(q) and q > 0 else 1.0


def calibration(val: dict, test: dict) -> dict:
    """Coverage of ±1σ/±2σ on the test split, raw and after the factors fitted on the validation split.

    ``val``/``test``: ``{"err": (N, G) mean - reference (NaN where masked), "std": (N, G),
    "onset_err": (N,), "onset_std": (N,)}``."""
    s = fit_scale(val["err"], val["std"])
    so = fit_scale(val["onset_err"], val["onset_std"])
    out: dict = {"fitted_on": "val", "nominal_1sigma": NOMINAL[1], "nominal_2sigma": NOMINAL[2],
                 "recalibration_factor": s, "onset_recalibration_factor": so}
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
    reference is); the ensemble's onset is that of the mean spectrum."""
    from toolkit.train.metrics import onset_metrics

    mean, std = mean_std(preds)
    mask = np.isfinite(target)
    err = np.where(mask, mean - np.nan_to_num(target), np.nan)
    on = onset_metrics(energy, mean, target, threshold)
    spread = onset_spread(member_onsets(energy, preds, threshold, mask=mask))
    return {"mean": mean, "std": np.where(mask, std, np.nan), "err": err, "onset": on,
            "onset_err": on["onset_pred"] - on["onset_true"], "onset_std": spread}
