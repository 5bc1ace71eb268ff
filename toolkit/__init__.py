"""spectrolens: interpretable ALIGNN for optical absorption spectra, from laptop to SLURM."""

__version__ = "0.1.0"


def open_run(run_dir, pooling: str = "mean"):
    """A run directory as a lazily loaded ``xarray.Dataset``: embeddings per layer, reference and
    predicted spectra on the energy grid, clusters and descriptors, labelled by material id
    (:func:`toolkit.xarray_view.open_run`; docs/zarr.md). Needs xarray."""
    from toolkit.xarray_view import open_run as _open_run

    return _open_run(run_dir, pooling)
