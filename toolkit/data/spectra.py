"""Spectral processing shared by every source.

Units: photon energy E in eV; absorption coefficient α in cm^-1; wavelength λ in µm (only where
noted); ε = ε1 + iε2 and n + iκ dimensionless. The dataset stores ``log10_alpha`` =
log10(max(α, 10**log_floor)) by default (the study: floor 2, i.e. α < 100 cm^-1 reads as 2).

Resampling never extrapolates: target-grid points outside the source's energy range, or next to a
NaN source value, are NaN (masked).

Descriptors (all in eV unless stated; NaN when they cannot be computed):

* ``onset``: first energy where log10 α reaches ``threshold`` (default 4), linearly interpolated
  between the last grid point below and the first at/above it. If the first unmasked grid point
  already is at/above the threshold and it is the grid start, the onset is the grid start (metals);
  if it follows a masked region, the onset is unknown (NaN).
* ``edge_integral``: ∫ (log10 α − log_floor) dE from onset to onset + 1 eV (units: eV, i.e.
  decades·eV), trapezoidal on 101 interpolated points; NaN if the window leaves the grid or
  touches a masked point.
* ``peaks``: energies of the (up to) 3 most prominent maxima of log10 α found by
  :func:`scipy.signal.find_peaks` (prominence ≥ 0.1 decades, width ≥ 0.1 eV), sorted by energy,
  NaN-padded; ``peak_1`` = peaks[0].
* ``direct_gap`` / ``indirect_gap``: not derivable from α alone; passed through from the source
  (``Material.properties``) when given.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.signal import find_peaks

#: h·c in eV·cm (α[cm^-1] = 4π κ E / HC_EV_CM)
HC_EV_CM = 1.23984198e-4
#: h·c in eV·µm (E[eV] = HC_EV_UM / λ[µm])
HC_EV_UM = 1.23984198

Transform = Literal["log10_alpha", "alpha"]


def energy_grid(start: float = 0.0, stop: float = 15.0, num: int = 1501) -> np.ndarray:
    """The uniform target grid in eV (float64), e.g. ``energy_grid(**cfg.grid.model_dump())``."""
    return np.linspace(float(start), float(stop), int(num))


def resample(energy: np.ndarray, values: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``values(energy)`` onto ``target`` without extrapolation.

    ``energy`` (eV) need not be sorted; duplicate energies keep their first value. ``values`` may be
    (N,) or (N, K) (columns resampled together). Target points outside [min, max] of ``energy``, or
    whose bracketing source points include a NaN, are NaN.
    """
    e = np.asarray(energy, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if e.ndim != 1 or v.shape[0] != e.shape[0]:
        raise ValueError(f"energy {e.shape} and values {v.shape} do not match")
    finite_e = np.isfinite(e)
    e, v = e[finite_e], v[finite_e]
    order = np.argsort(e, kind="stable")
    e, v = e[order], v[order]
    keep = np.ones(e.shape[0], dtype=bool)
    keep[1:] = np.diff(e) > 0
    e, v = e[keep], v[keep]
    out_shape = t.shape + v.shape[1:]
    if e.shape[0] < 2:
        return np.full(out_shape, np.nan)
    i = np.clip(np.searchsorted(e, t, side="right") - 1, 0, e.shape[0] - 2)
    frac = (t - e[i]) / (e[i + 1] - e[i])
    lo, hi = v[i], v[i + 1]
    f = frac.reshape(frac.shape + (1,) * (v.ndim - 1))
    with np.errstate(invalid="ignore"):
        out = lo + f * (hi - lo)
    exact_lo, exact_hi = frac == 0, frac == 1  # on a source point: its value alone (a NaN neighbour is irrelevant)
    out[exact_lo] = lo[exact_lo]
    out[exact_hi] = hi[exact_hi]
    out[(t < e[0]) | (t > e[-1])] = np.nan
    return out.reshape(out_shape)


def nk_from_eps(eps1: np.ndarray, eps2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Refractive index n and extinction coefficient κ from ε1, ε2 (n + iκ = sqrt(ε))."""
    e1 = np.asarray(eps1, dtype=np.float64)
    e2 = np.asarray(eps2, dtype=np.float64)
    mod = np.hypot(e1, e2)
    n = np.sqrt(np.maximum((mod + e1) / 2.0, 0.0))
    k = np.sqrt(np.maximum((mod - e1) / 2.0, 0.0))
    return n, k


def eps_from_nk(n: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ε1 = n² − κ², ε2 = 2nκ."""
    n = np.asarray(n, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    return n * n - k * k, 2.0 * n * k


def alpha_from_k(energy: np.ndarray, k: np.ndarray) -> np.ndarray:
    """α [cm^-1] = 2ωκ/c = 4π κ E / (h c) with E in eV (equivalently 4πκ/λ)."""
    return 4.0 * np.pi * np.asarray(k, dtype=np.float64) * np.asarray(energy, dtype=np.float64) / HC_EV_CM


def alpha_from_eps(energy: np.ndarray, eps1: np.ndarray, eps2: np.ndarray) -> np.ndarray:
    """α [cm^-1] from the dielectric function at photon energies ``energy`` (eV)."""
    _, k = nk_from_eps(eps1, eps2)
    return alpha_from_k(energy, k)


def energy_from_wavelength_um(wavelength_um: np.ndarray) -> np.ndarray:
    """E [eV] = h c / λ with λ in µm (vacuum)."""
    return HC_EV_UM / np.asarray(wavelength_um, dtype=np.float64)


def log10_alpha(alpha: np.ndarray, log_floor: float = 2.0) -> np.ndarray:
    """log10(max(α, 10**log_floor)); NaN stays NaN (α in cm^-1)."""
    a = np.asarray(alpha, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isnan(a), np.nan, np.log10(np.maximum(a, 10.0 ** log_floor)))


def apply_transform(alpha: np.ndarray, transform: Transform = "log10_alpha", log_floor: float = 2.0) -> np.ndarray:
    """α (cm^-1) -> the dataset's stored quantity (``log10_alpha`` floored, or ``alpha`` as is)."""
    if transform == "log10_alpha":
        return log10_alpha(alpha, log_floor)
    if transform == "alpha":
        return np.asarray(alpha, dtype=np.float64)
    raise ValueError(f"unknown transform {transform!r}")


def to_log10(values: np.ndarray, transform: Transform = "log10_alpha", log_floor: float = 2.0) -> np.ndarray:
    """Stored values in ``transform`` units -> floored log10 α (for descriptors)."""
    v = np.asarray(values, dtype=np.float64)
    return v if transform == "log10_alpha" else log10_alpha(v, log_floor)


def onset_energy(energy: np.ndarray, log_alpha: np.ndarray, threshold: float = 4.0) -> np.ndarray | float:
    """Onset energy (eV): interpolated first crossing of ``threshold`` by log10 α.

    ``log_alpha`` is (G,) or (B, G) on the common grid ``energy`` (G,); see the module docstring for
    the masked-start rules. Returns a float for 1-D input, an array (B,) otherwise.
    """
    e = np.asarray(energy, dtype=np.float64)
    y = np.atleast_2d(np.asarray(log_alpha, dtype=np.float64))
    valid = np.isfinite(y)
    above = valid & (y >= threshold)
    has = above.any(axis=1)
    j = np.argmax(above, axis=1)
    rows = np.arange(y.shape[0])
    jm = np.maximum(j - 1, 0)
    y1, y0 = y[rows, j], y[rows, jm]
    prev_ok = (j > 0) & valid[rows, jm] & (y0 < threshold)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = (threshold - y0) / (y1 - y0)
        crossing = e[jm] + frac * (e[j] - e[jm])
    out = np.where(has & prev_ok, crossing, np.where(has & (j == 0), e[0], np.nan))
    return float(out[0]) if np.ndim(log_alpha) == 1 else out


def _interp_rows(e: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Row-wise linear interpolation of y (B, G) at x (B, K) on the sorted common grid e (G,)."""
    i = np.clip(np.searchsorted(e, x, side="right") - 1, 0, e.shape[0] - 2)
    f = (x - e[i]) / (e[i + 1] - e[i])
    rows = np.arange(y.shape[0])[:, None]
    lo, hi = y[rows, i], y[rows, i + 1]
    with np.errstate(invalid="ignore"):
        out = np.where(f == 0, lo, lo + f * (hi - lo))
    return np.where((x >= e[0]) & (x <= e[-1]), out, np.nan)


def edge_integral(energy: np.ndarray, log_alpha: np.ndarray, onset: np.ndarray | float, *,
                  log_floor: float = 2.0, width: float = 1.0) -> np.ndarray | float:
    """∫_{onset}^{onset+width} (log10 α − log_floor) dE in eV·decades (trapezoid, 101 points).

    NaN when the onset is NaN, the window leaves the grid or touches a masked value."""
    e = np.asarray(energy, dtype=np.float64)
    y = np.atleast_2d(np.asarray(log_alpha, dtype=np.float64))
    on = np.atleast_1d(np.asarray(onset, dtype=np.float64))
    x = on[:, None] + np.linspace(0.0, width, 101)[None, :]
    vals = _interp_rows(e, y, np.where(np.isfinite(x), x, e[0])) - log_floor
    vals = np.where(np.isfinite(x), vals, np.nan)
    out = np.trapezoid(vals, dx=width / 100.0, axis=1)
    return float(out[0]) if np.ndim(log_alpha) == 1 else out


def noise_sigma(log_alpha: np.ndarray) -> float:
    """Robust estimate of the point-to-point noise SD of a 1-D spectrum: 1.4826 x the median absolute
    deviation of its second differences / sqrt(6) (a smooth band contributes almost nothing to second
    differences, white noise of SD s gives SD s sqrt(6)). 0 for fewer than 5 finite points."""
    y = np.asarray(log_alpha, dtype=np.float64)
    y = y[np.isfinite(y)]
    if y.size < 5:
        return 0.0
    d2 = np.diff(y, 2)
    return float(1.4826 * np.median(np.abs(d2 - np.median(d2))) / np.sqrt(6.0))


#: a peak must stand out of the spectrum's own noise by this many SDs (see peak_positions)
PEAK_NOISE_SIGMAS = 6.0


def peak_positions(energy: np.ndarray, log_alpha: np.ndarray, *, n: int = 3, prominence: float = 0.1,
                   min_width_ev: float = 0.1, noise_sigmas: float = PEAK_NOISE_SIGMAS) -> np.ndarray:
    """Energies (eV) of the ``n`` most prominent peaks of a 1-D log10 α, sorted by energy, NaN-padded.

    A peak needs a prominence of at least ``max(prominence, noise_sigmas x noise_sigma(spectrum))``,
    so on a noisy spectrum (a measurement, a benchmark with noise) noise maxima are not taken for
    bands; on smooth spectra (DFT, model predictions) the bound is ``prominence``. Masked points are
    filled with the spectrum's minimum so they never form peaks themselves."""
    e = np.asarray(energy, dtype=np.float64)
    y = np.asarray(log_alpha, dtype=np.float64)
    out = np.full(n, np.nan)
    finite = np.isfinite(y)
    if finite.sum() < 3:
        return out
    filled = np.where(finite, y, np.nanmin(y))
    step = float(np.median(np.diff(e))) if e.shape[0] > 1 else 1.0
    prom = max(prominence, noise_sigmas * noise_sigma(y))
    idx, props = find_peaks(filled, prominence=prom, width=max(min_width_ev / step, 1.0))
    ok = finite[idx]
    idx, prom = idx[ok], props["prominences"][ok]
    if idx.size:
        top = np.sort(idx[np.argsort(-prom, kind="stable")[:n]])
        out[: top.size] = e[top]
    return out


def _gap(props: dict, key: str) -> float:
    v = props.get(key)
    return float(v) if v is not None else float("nan")


def spectral_descriptors(energy: np.ndarray, spectrum: np.ndarray, *, threshold: float = 4.0,
                         transform: Transform = "log10_alpha", log_floor: float = 2.0,
                         properties: dict | None = None) -> dict:
    """Descriptors of one spectrum on ``energy`` (eV): onset, edge_integral, direct_gap,
    indirect_gap, peaks (array of 3). ``properties`` supplies source-given gaps (eV)."""
    y = to_log10(spectrum, transform, log_floor)
    on = onset_energy(energy, y, threshold)
    props = properties or {}
    return {
        "onset": on,
        "edge_integral": edge_integral(energy, y, on, log_floor=log_floor),
        "direct_gap": _gap(props, "direct_gap"),
        "indirect_gap": _gap(props, "indirect_gap"),
        "peaks": peak_positions(energy, y),
    }
