"""Spectra of the analysed population, read in row chunks when asked for and never held whole (issue 20).

At 10^7 materials the reference and the predicted spectra are 60 GB each (1,501 float32 points per
material); analyze used to read both into the driver. :class:`Spectra` stands for such an (N, G) array:
population row ``i`` is row ``rows[i]`` of its source (NaN where ``rows[i] < 0``), and indexing it reads
only the rows asked for:

* ``spec[a:b]`` reads one contiguous range (a chunk of a chunked pass);
* ``spec[idx]`` / ``spec[mask]`` reads the listed rows (a sample), in one pass over the source's chunks;
* ``spec[rows, cols]`` does the same, then selects columns;
* :meth:`Spectra.subset` gives a view of some rows without reading anything.

Sources: a NumPy or Zarr array (``embeddings.zarr`` ``prediction``, ``prediction_std``), or the
``spectrum`` column of a :class:`toolkit.data.store.DatasetReader` (read one 256-material part at a time).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Spectra:
    """A lazily read (N, G) float32 view of a source's rows (module docstring)."""

    def __init__(self, source: Any, rows: np.ndarray | None = None, n_points: int | None = None):
        self.source = source
        self._reader = hasattr(source, "column") and hasattr(source, "part_of")  # a DatasetReader
        n_src = len(source) if self._reader else int(source.shape[0])
        self.rows = np.arange(n_src, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        g = n_points if n_points is not None else (len(source.energy) if self._reader else int(source.shape[1]))
        self.shape = (len(self.rows), int(g))
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    @classmethod
    def of(cls, x: Any) -> Spectra | None:
        """``x`` as a :class:`Spectra` (an array is wrapped, None stays None)."""
        return x if x is None or isinstance(x, Spectra) else cls(x)

    def __len__(self) -> int:
        return self.shape[0]

    def subset(self, key: Any) -> Spectra:
        """The rows ``key`` (bool mask or indices) as a view; nothing is read."""
        return Spectra(self.source, self.rows[key], self.shape[1])

    def __getitem__(self, key: Any) -> np.ndarray:
        key, cols = key if isinstance(key, tuple) else (key, slice(None))
        scalar = not isinstance(key, slice) and np.ndim(key) == 0  # one row: returned as (G,)
        out = self._take(self.rows[[int(key)]] if scalar else self.rows[key])[:, cols]
        return out[0] if scalar else out

    def __array__(self, dtype=None, copy=None):  # np.asarray(spec): every row (small inputs, tests)
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def _take(self, src: np.ndarray) -> np.ndarray:
        out = np.full((len(src), self.shape[1]), np.nan, dtype=np.float32)
        ok = np.flatnonzero(src >= 0)
        if not len(ok):
            return out
        want = src[ok]
        uniq, inv = np.unique(want, return_inverse=True)
        out[ok] = self._read_sorted(uniq)[inv]
        return out

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (sorted, unique) of the source, float32."""
        if self._reader:
            return np.asarray(self.source.column("spectrum", idx), dtype=np.float32)
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if hi - lo == len(idx):  # a contiguous range: one slice
            return np.asarray(self.source[lo:hi], dtype=np.float32)
        if hasattr(self.source, "oindex"):  # Zarr: each chunk holding a wanted row is read once
            return np.asarray(self.source.oindex[idx], dtype=np.float32)
        return np.asarray(self.source[idx], dtype=np.float32)


def rows_of(spec: Any, mask: np.ndarray) -> Any:
    """The rows ``mask`` of a :class:`Spectra` (a view: nothing is read) or of an array; None stays None."""
    if spec is None:
        return None
    return spec.subset(mask) if isinstance(spec, Spectra) else spec[mask]
