"""Data: readers, spectra, benchmark, graphs and the on-disk (Zarr) dataset."""
