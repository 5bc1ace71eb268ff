"""Figures of predicted spectra (``predict.plot``): one PNG per material, or pages of 12 for many.

Each panel: the (mean) predicted spectrum on the model's grid, the ±2σ band of an ensemble (after
recalibration), the onset threshold, the onset with its interval, and the peaks.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

PER_PAGE = 12


def safe_name(text: str) -> str:
    """A file-name-safe version of a material id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:120] or "material"


def _panel(ax, res: dict, i: int, pred) -> None:
    e = res["energy"]
    y = res["spectrum"][i]
    ax.plot(e, y, color="C0", lw=1.2, label="predicted" if res["n_members"] == 1 else "ensemble mean")
    sd = res["spectrum_std"][i]
    if res["n_members"] > 1 and np.isfinite(sd).any():
        ax.fill_between(e, y - 2 * sd, y + 2 * sd, color="C0", alpha=0.25, lw=0, label="±2σ")
    if pred.transform == "log10_alpha":
        ax.axhline(pred.onset_threshold, color="0.6", lw=0.8, ls=":")
    on = res["onset"][i]
    if np.isfinite(on):
        ax.axvline(on, color="C3", lw=1, ls="--", label=f"onset {on:.2f} eV")
        lo, hi = res["onset_low"][i], res["onset_high"][i]
        if np.isfinite(lo) and np.isfinite(hi):
            ax.axvspan(lo, hi, color="C3", alpha=0.12, lw=0)
    for k in ("peak_1", "peak_2", "peak_3"):
        p = res[k][i]
        if np.isfinite(p):
            ax.plot([p], [np.interp(p, e, y)], "v", color="C2", ms=5)
    ax.set_title(f"{res['ids'][i]} ({res['formula'][i]})", fontsize=8)
    ax.set_xlabel("photon energy (eV)", fontsize=8)
    ax.set_ylabel("log10 α (cm$^{-1}$)" if pred.transform == "log10_alpha" else "α (cm$^{-1}$)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="lower right")


def plot_predictions(res: dict, pred, folder: Path, single_max: int = 24) -> list[Path]:
    """Write the figures of ``res`` (:func:`toolkit.predict.stage.load_result`) into ``folder``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(res["ids"])
    paths: list[Path] = []
    if n <= single_max:
        for i in range(n):
            fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
            _panel(ax, res, i, pred)
            p = folder / f"{safe_name(res['ids'][i])}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
        return paths
    for page, a in enumerate(range(0, n, PER_PAGE)):
        rows = list(range(a, min(a + PER_PAGE, n)))
        fig, axes = plt.subplots(4, 3, figsize=(14, 13), constrained_layout=True)
        for ax, i in zip(axes.ravel(), rows):
            _panel(ax, res, i, pred)
        for ax in axes.ravel()[len(rows):]:
            ax.axis("off")
        p = folder / f"page-{page + 1:04d}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths
