"""Spectral processing against hand-computed cases (toolkit.data.spectra)."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.data import spectra as sp


def test_energy_grid_is_the_study_grid() -> None:
    e = sp.energy_grid()
    assert e.shape == (1501,) and e[0] == 0.0 and e[-1] == 15.0
    assert np.allclose(np.diff(e), 0.01)


def test_resample_interpolates_and_never_extrapolates() -> None:
    src_e = np.array([1.0, 2.0, 4.0])
    src_v = np.array([10.0, 20.0, 40.0])
    out = sp.resample(src_e, src_v, np.array([0.5, 1.0, 1.5, 3.0, 4.0, 4.5]))
    assert np.isnan(out[0]) and np.isnan(out[-1])  # outside [1, 4]: masked
    assert out[1:5].tolist() == [10.0, 15.0, 30.0, 40.0]


def test_resample_masks_neighbours_of_nan_and_handles_order_duplicates() -> None:
    src_e = np.array([3.0, 1.0, 2.0, 2.0, 4.0])  # unsorted, duplicate 2.0 (first kept)
    src_v = np.array([np.nan, 1.0, 2.0, 99.0, 4.0])
    out = sp.resample(src_e, src_v, np.array([1.5, 2.0, 2.5, 3.5, 4.0]))
    assert out[0] == 1.5 and out[1] == 2.0 and out[4] == 4.0
    assert np.isnan(out[2]) and np.isnan(out[3])  # bracketed by the NaN at 3 eV


def test_resample_columns_together() -> None:
    src = np.column_stack([np.arange(5.0), 2 * np.arange(5.0)])
    out = sp.resample(np.arange(5.0), src, np.array([0.5, 7.0]))
    assert out.shape == (2, 2)
    assert out[0].tolist() == [0.5, 1.0] and np.isnan(out[1]).all()


def test_eps_nk_round_trip_and_alpha() -> None:
    n, k = np.array([2.0, 1.5]), np.array([0.5, 0.0])
    e1, e2 = sp.eps_from_nk(n, k)
    assert np.allclose(e1, [3.75, 2.25]) and np.allclose(e2, [2.0, 0.0])
    n2, k2 = sp.nk_from_eps(e1, e2)
    assert np.allclose(n2, n) and np.allclose(k2, k)
    # α = 4πκE/(hc): κ = 0.5 at E = 2 eV -> 4π·0.5·2 / 1.23984198e-4 cm^-1
    alpha = sp.alpha_from_eps(np.array([2.0, 2.0]), e1, e2)
    assert alpha[0] == pytest.approx(4 * np.pi * 0.5 * 2 / 1.23984198e-4, rel=1e-12)
    assert alpha[1] == 0.0


def test_alpha_from_k_equals_4pi_k_over_lambda() -> None:
    lam_um = 0.5
    e = sp.energy_from_wavelength_um(np.array([lam_um]))
    assert e[0] == pytest.approx(2.479683960, rel=1e-9)
    alpha = sp.alpha_from_k(e, np.array([0.1]))
    assert alpha[0] == pytest.approx(4 * np.pi * 0.1 / (lam_um * 1e-4), rel=1e-9)  # λ in cm


def test_log10_alpha_floor_and_nan() -> None:
    out = sp.log10_alpha(np.array([0.0, 50.0, 1e5, np.nan]), log_floor=2.0)
    assert out[:3].tolist() == [2.0, 2.0, 5.0] and np.isnan(out[3])
    assert np.allclose(sp.apply_transform(np.array([1e3]), "alpha"), [1e3])
    assert np.allclose(sp.to_log10(np.array([1e3, 1.0]), "alpha", 2.0), [3.0, 2.0])


def test_onset_interpolated_crossing() -> None:
    e = sp.energy_grid()
    y = 2.0 + 0.7 * e  # crosses 4 at 2/0.7 eV, between grid points
    assert sp.onset_energy(e, y, 4.0) == pytest.approx(2.0 / 0.7, abs=1e-9)
    batch = np.stack([y, np.full_like(e, 2.0), np.full_like(e, 5.0)])
    on = sp.onset_energy(e, batch, 4.0)
    assert on[0] == pytest.approx(2.0 / 0.7) and np.isnan(on[1]) and on[2] == 0.0  # never / from start


def test_onset_after_mask_is_unknown() -> None:
    e = sp.energy_grid()
    y = np.full_like(e, 5.0)
    y[:10] = np.nan  # absorbing from the first unmasked point, which follows a masked region
    assert np.isnan(sp.onset_energy(e, y, 4.0))


def test_edge_integral_linear_case() -> None:
    e = sp.energy_grid()
    y = 2.0 + e  # onset at 2 eV (threshold 4); ∫_2^3 (y - 2) dE = ∫_2^3 E dE = 2.5
    on = sp.onset_energy(e, y, 4.0)
    assert on == pytest.approx(2.0)
    assert sp.edge_integral(e, y, on, log_floor=2.0) == pytest.approx(2.5, abs=1e-9)
    assert np.isnan(sp.edge_integral(e, y, 14.5, log_floor=2.0))  # window leaves the grid
    y2 = y.copy()
    y2[250] = np.nan  # 2.5 eV inside the window
    assert np.isnan(sp.edge_integral(e, y2, on, log_floor=2.0))


def test_peaks_find_prominent_maxima_not_noise() -> None:
    e = sp.energy_grid()
    rng = np.random.default_rng(0)
    y = 3.0 + 0.8 * np.exp(-0.5 * ((e - 3.0) / 0.3) ** 2) + 0.5 * np.exp(-0.5 * ((e - 7.0) / 0.4) ** 2)
    peaks = sp.peak_positions(e, y + rng.normal(0, 0.02, e.shape))
    assert abs(peaks[0] - 3.0) < 0.1 and abs(peaks[1] - 7.0) < 0.1 and np.isnan(peaks[2])
    assert np.isnan(sp.peak_positions(e, np.full_like(e, 2.0))).all()


def test_spectral_descriptors_keys_units_and_gap_passthrough() -> None:
    e = sp.energy_grid()
    y = 2.0 + e
    d = sp.spectral_descriptors(e, y, threshold=4.0, transform="log10_alpha", log_floor=2.0,
                                properties={"direct_gap": 1.5})
    assert set(d) == {"onset", "edge_integral", "direct_gap", "indirect_gap", "peaks"}
    assert d["onset"] == pytest.approx(2.0) and d["direct_gap"] == 1.5 and np.isnan(d["indirect_gap"])
    assert d["peaks"].shape == (3,)
    d_alpha = sp.spectral_descriptors(e, 10.0 ** y, threshold=4.0, transform="alpha", log_floor=2.0)
    assert d_alpha["onset"] == pytest.approx(2.0) and d_alpha["edge_integral"] == pytest.approx(2.5, abs=1e-6)
