"""Lazy spectra (issue 20): analyze reads the reference and predicted spectra row chunk by row chunk
(``toolkit.analyze.lazy.Spectra``) instead of holding them whole; every read gives the rows an
in-memory array gives, and the steps that read spectra give the same results from either."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from toolkit.analyze import attribution as attr
from toolkit.analyze.clustering import use_chunk_map
from toolkit.analyze.descriptors import DescriptorTable, add_spectral
from toolkit.analyze.lazy import Spectra, rows_of


class CountingArray:
    """A Zarr array that records the rows each read covers (to show what a view reads)."""

    def __init__(self, arr):
        self.arr, self.shape, self.read = arr, arr.shape, 0

    def __getitem__(self, key):
        out = self.arr[key]
        self.read += len(out)
        return out

    @property
    def oindex(self):
        outer = self

        class _O:
            def __getitem__(self, idx):
                out = outer.arr.oindex[idx]
                outer.read += len(out)
                return out
        return _O()


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(103, 11)).astype(np.float32)
    z = zarr.create_array(str(tmp_path / "p.zarr"), shape=x.shape, chunks=(16, 11), dtype="float32")
    z[:] = x
    return x, z


def test_views_read_only_the_rows_asked_for_and_equal_the_array(store):
    x, z = store
    src = CountingArray(z)
    s = Spectra(src)
    assert s.shape == x.shape and len(s) == 103 and src.read == 0  # nothing read on construction
    np.testing.assert_array_equal(s[10:40], x[10:40])
    assert src.read == 30
    idx = np.array([90, 3, 3, 57])  # unsorted, with a repeat
    np.testing.assert_array_equal(s[idx], x[idx])
    mask = np.arange(103) % 7 == 0
    np.testing.assert_array_equal(s[mask], x[mask])
    np.testing.assert_array_equal(s[idx, ::3], x[idx, ::3])
    np.testing.assert_array_equal(s[5], x[5])
    np.testing.assert_array_equal(s[idx, np.array([0, 4])], x[idx][:, [0, 4]])  # an index array of columns
    sub = s.subset(mask)  # a view of a view: composed row maps, still nothing read
    before = src.read
    assert sub.shape == (int(mask.sum()), 11) and src.read == before
    np.testing.assert_array_equal(sub[[1, 2]], x[np.flatnonzero(mask)[[1, 2]]])
    np.testing.assert_array_equal(np.asarray(rows_of(s, mask)), x[mask])
    np.testing.assert_array_equal(rows_of(x, mask), x[mask])
    assert rows_of(None, mask) is None


def test_rows_without_a_source_row_read_as_nan(store):
    x, z = store
    rows = np.array([4, -1, 7, -1])
    s = Spectra(z, rows)
    got = s[:]
    assert np.isnan(got[[1, 3]]).all()
    np.testing.assert_array_equal(got[[0, 2]], x[[4, 7]])
    assert np.isnan(Spectra(z, np.full(3, -1))[[0, 2]]).all()


def test_spectral_signature_from_views_equals_arrays_including_sampled_clusters(store, monkeypatch):
    x, z = store
    labels = np.arange(103) % 3
    energy = np.linspace(0, 15, 11)
    onset = np.linspace(1, 3, 103)
    want = attr.spectral_signature(labels, energy, x, x + 1, onset, predicted_std=np.abs(x))
    got = attr.spectral_signature(labels, energy, Spectra(z), Spectra(z, np.arange(103)), onset,
                                  predicted_std=Spectra(z))
    for c in want:
        np.testing.assert_allclose(got[c]["reference"]["mean"], want[c]["reference"]["mean"], rtol=1e-6)
        np.testing.assert_allclose(got[c]["reference"]["p90"], want[c]["reference"]["p90"], rtol=1e-6)
        assert got[c]["onset"] == want[c]["onset"] and "spectra_sampled" not in got[c]
    # small caps: clusters are sampled; a cluster reads its sample only, the same rows either way
    monkeypatch.setattr(attr, "SIGNATURE_MAX", 10)
    monkeypatch.setattr(attr, "SIGNATURE_MIN", 5)
    monkeypatch.setattr(attr, "SIGNATURE_TOTAL", 18)
    src = CountingArray(z)
    got = attr.spectral_signature(labels, energy, Spectra(src), None, onset)
    want = attr.spectral_signature(labels, energy, x, None, onset)
    assert src.read == 18  # 3 clusters x 6: the union of the samples, read once
    for c in want:
        assert got[c]["spectra_sampled"] == want[c]["spectra_sampled"] == 6 and got[c]["size"] in (34, 35)
        np.testing.assert_allclose(got[c]["reference"]["std"], want[c]["reference"]["std"], rtol=1e-6)


def test_add_spectral_in_chunks_equals_one_pass(store):
    rng = np.random.default_rng(1)
    energy = np.linspace(0, 15, 151)
    spectra = (2 + 4 / (1 + np.exp(-(energy[None, :] - rng.uniform(2, 8, (40, 1))) * 3))
               + 0.02 * rng.normal(size=(40, 151)))
    spectra[5] = np.nan  # entirely masked
    spectra[9] = 1.0  # never crosses the threshold
    spectra = spectra.astype(np.float32)  # as stored
    ids = [f"m{i}" for i in range(40)]
    base = DescriptorTable(ids, ["density"], rng.normal(size=(40, 1)), [])
    one = add_spectral(base, energy, spectra, prefix="pred:")
    with use_chunk_map(None, 7):
        chunked = add_spectral(base, energy, Spectra(spectra), prefix="pred:")
    assert chunked.names == one.names
    np.testing.assert_array_equal(chunked.values, one.values)
    assert chunked.failures == one.failures and ("m5", "pred:spectrum", "spectrum entirely masked") in one.failures
    assert ("m9", "pred:onset", "not defined for this spectrum (no threshold crossing / peak)") in one.failures
