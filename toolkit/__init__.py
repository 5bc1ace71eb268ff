"""spectrolens: interpretable ALIGNN for optical absorption spectra, from laptop to SLURM."""

__version__ = "0.1.0"
