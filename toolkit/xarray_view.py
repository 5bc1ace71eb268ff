"""``toolkit.open_run(RUN_DIR)``: a run directory as one lazily loaded :class:`xarray.Dataset`.

Dimensions: ``material`` (labelled by material id, the analysed population: the rows of
``embeddings.zarr``, else every material of ``dataset.zarr``), ``energy`` (eV), ``feature_<layer>``
(width of each layer), ``descriptor`` and ``clustering`` (when analyze has run).

| variable | dims | from | loaded |
|---|---|---|---|
| ``reference`` | material, energy | dataset.zarr ``parts/*/spectrum`` (dataset transform, NaN = masked) | lazily, the parts holding the rows asked for |
| ``has_spectrum``, ``formula``, ``dataset_row`` | material | dataset.zarr index / parts | eagerly (small) |
| ``prediction`` | material, energy | embeddings.zarr ``prediction`` | lazily (Zarr) |
| ``embedding_<layer>`` | material, feature_<layer> | embeddings.zarr ``layers/<layer>/<pooling>`` | lazily (Zarr) |
| ``cluster`` | material, clustering | analyze/clusters.csv (-1 = not clustered) | eagerly |
| ``descriptors`` | material, descriptor | analyze/descriptors.csv (NaN = missing) | eagerly |

Nothing is read until values are asked for (``.values``, ``.load()``, arithmetic); selecting first
(``ds.sel(material=[...])``, ``ds["reference"][:100]``) reads only what is selected. No dask needed
(``ds.chunk()`` works when dask is installed). Needs ``xarray`` (``pip install spectrolens[explore]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _rows_array(reader: Any, name: str, rows: np.ndarray):
    """A lazily indexed xarray array of dataset column ``name`` at dataset rows ``rows``
    (:meth:`toolkit.data.store.DatasetReader.column` reads only the parts of the rows asked for)."""
    from xarray.backends import BackendArray
    from xarray.core import indexing

    first = reader.column(name, rows[:1])

    class RowsArray(BackendArray):
        def __init__(self) -> None:
            self.shape = (len(rows), *first.shape[1:])
            self.dtype = first.dtype

        def __getitem__(self, key):
            return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._raw)

        def _raw(self, key: tuple) -> np.ndarray:
            k0, rest = key[0], tuple(key[1:])
            scalar = isinstance(k0, (int, np.integer))
            sel = np.atleast_1d(rows[k0])
            if len(sel) == 0:
                vals = np.empty((0, *self.shape[1:]), dtype=self.dtype)
            else:
                vals = reader.column(name, sel)
            vals = vals[(slice(None), *rest)] if rest else vals
            return vals[0] if scalar else vals

    return indexing.LazilyIndexedArray(RowsArray())


def open_run(run_dir: str | Path, pooling: str = "mean") -> Any:
    """The run directory ``run_dir`` as an :class:`xarray.Dataset` (see the module docstring); layers'
    activations pooled with ``pooling`` (one of embeddings.zarr's ``poolings``)."""
    import xarray as xr

    from toolkit.data.store import DatasetReader
    from toolkit.errors import SpectrolensError
    from toolkit.layout import RunLayout

    lay = RunLayout(Path(run_dir))
    if not lay.dataset.exists():
        raise SpectrolensError(f"{run_dir}: no dataset.zarr (run `spectrolens prepare` first)")
    reader = DatasetReader(lay.dataset)
    emb_ds = None
    layers: list[str] = []
    if lay.embeddings.exists():
        from toolkit.embed.store import open_embeddings

        root = open_embeddings(lay.embeddings)  # refuses an unfinished store
        rows = np.asarray(root["index"][:], dtype=np.int64)
        emb_ds = xr.open_zarr(lay.embeddings, chunks=None)
        layers = list(root.attrs.get("layers", []))
        if pooling not in root.attrs.get("poolings", [pooling]):
            raise SpectrolensError(f"embeddings.zarr has poolings {root.attrs.get('poolings')}, not {pooling!r}")
    else:
        rows = np.arange(len(reader), dtype=np.int64)
    ids = np.array([str(x) for x in reader.ids[rows]], dtype=object)
    energy = reader.energy
    ds = xr.Dataset(coords={"material": ("material", ids), "energy": ("energy", energy, {"units": "eV"})})
    ds["dataset_row"] = ("material", rows)
    ds["formula"] = ("material", np.array([str(x) for x in reader.column("formula", rows)], dtype=object))
    ds["has_spectrum"] = ("material", reader.has_spectrum[rows])
    transform = str(reader.attrs.get("transform", "log10_alpha"))
    ds["reference"] = xr.Variable(("material", "energy"), _rows_array(reader, "spectrum", rows),
                                  {"description": "reference spectrum (NaN = masked)", "transform": transform})
    if emb_ds is not None:
        # Variables, not DataArrays: no coordinate alignment, the Zarr-backed lazy arrays are kept as they are
        ds["prediction"] = emb_ds["prediction"].variable
        ds["prediction"].attrs.update({"description": "predicted spectrum", "transform": transform})
        for layer in layers:
            g = xr.open_zarr(lay.embeddings, group=f"layers/{layer}", chunks=None)
            ds[f"embedding_{layer}"] = g[pooling].rename({"feature": f"feature_{layer}"}).variable
            ds[f"embedding_{layer}"].attrs["description"] = f"activations of {layer}, {pooling} over atoms"

    _add_analysis(ds, lay.analyze_dir, ids)
    ds.attrs.update({"run_dir": str(Path(run_dir)), "transform": transform, "layers": layers, "pooling": pooling,
                     "format": "spectrolens-run"})
    return ds


def _add_analysis(ds: Any, analyze_dir: Path, ids: np.ndarray) -> None:
    """``cluster`` and ``descriptors`` from analyze's CSV files, aligned by material id (NaN / -1 where absent)."""
    import pandas as pd

    pos = {m: i for i, m in enumerate(ids)}
    clusters = analyze_dir / "clusters.csv"
    if clusters.is_file():
        t = pd.read_csv(clusters, dtype={"id": str})
        names = [c for c in t.columns if c not in ("id", "formula")]
        out = np.full((len(ids), len(names)), -1, dtype=np.int32)
        at = np.array([pos.get(m, -1) for m in t["id"]])
        ok = at >= 0
        out[at[ok]] = t[names].to_numpy()[ok]
        ds["cluster"] = (("material", "clustering"), out, {"description": "Ward cluster at the default level (-1: not clustered)"})
        ds.coords["clustering"] = names
    desc = analyze_dir / "descriptors.csv"
    if desc.is_file():
        t = pd.read_csv(desc, dtype={"id": str})
        names = [c for c in t.columns if c != "id"]
        out = np.full((len(ids), len(names)), np.nan)
        at = np.array([pos.get(m, -1) for m in t["id"]])
        ok = at >= 0
        out[at[ok]] = t[names].to_numpy(dtype=np.float64)[ok]
        ds["descriptors"] = (("material", "descriptor"), out, {"description": "analysis descriptors (docs/report.md; NaN = missing)"})
        ds.coords["descriptor"] = names
