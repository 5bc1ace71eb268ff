"""Report figures (matplotlib, Agg backend). Every function returns a Figure and copes with missing
descriptors (NaN onsets, no element columns, no significant tests) by drawing what exists and
saying what is missing on the figure itself. :func:`save` writes PNG + SVG and returns a PNG
data URI for the self-contained HTML report."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from scipy.cluster.hierarchy import dendrogram as _dendrogram  # noqa: E402

DPI = 90
MAX_PANELS = 12  # per-cluster panel figures (spectra, element maps) draw the largest clusters only


def _largest(items: dict, sizes: dict[int, int] | None, cap: int = MAX_PANELS) -> tuple[dict, str]:
    """The ``cap`` largest clusters of ``items`` (by ``sizes``; all when few), in cluster order, and a
    title note saying how many were left out (every cluster is in attribution.json)."""
    if len(items) <= cap:
        return items, ""
    sizes = sizes or {}
    keep = sorted(sorted(items, key=lambda c: -sizes.get(c, 0))[:cap])
    return {c: items[c] for c in keep}, f" ({cap} largest of {len(items)} clusters)"


def _cmap(k: int):
    return plt.get_cmap("tab20" if k > 10 else "tab10")


def png_data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI (the report embeds every figure this way)."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def save(fig, figdir: Path, name: str) -> dict[str, str]:
    """Write ``name``.png and ``name``.svg into ``figdir``; return paths and a PNG data URI."""
    figdir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    png = buf.getvalue()
    (figdir / f"{name}.png").write_bytes(png)
    fig.savefig(figdir / f"{name}.svg", format="svg", bbox_inches="tight")
    plt.close(fig)
    return {"png": str(figdir / f"{name}.png"), "svg": str(figdir / f"{name}.svg"),
            "data_uri": png_data_uri(png)}


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.35", wrap=True)


def dendrogram(z: np.ndarray, k: int, title: str):
    """Top of the Ward dendrogram (at most 40 leaves shown) coloured by the k-cluster cut."""
    fig, ax = plt.subplots(figsize=(9, 3.6))
    n_leaves = z.shape[0] + 1
    thr = 0.5 * (z[-(k - 1), 2] + z[-k, 2]) if 1 < k < n_leaves else 0.0
    _dendrogram(z, ax=ax, truncate_mode="lastp", p=min(40, n_leaves), color_threshold=thr,
                above_threshold_color="0.6", no_labels=False, leaf_font_size=7)
    if thr:
        ax.axhline(thr, ls="--", color="k", lw=0.8)
    ax.set_ylabel("Ward distance")
    ax.set_title(f"{title}: Ward dendrogram, cut at k = {k} (leaf labels: materials per branch)")
    return fig


def embedding_map(coords: np.ndarray, labels: np.ndarray, onset: np.ndarray | None, title: str, axis: str = "PC"):
    """2-D map (PCA or UMAP) coloured by cluster (left) and by reference onset (right; grey = missing)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    k = int(labels.max()) + 1
    cm = _cmap(k)
    for c in range(k):
        m = labels == c
        axes[0].scatter(coords[m, 0], coords[m, 1], s=8, color=cm(c % cm.N), label=str(c), alpha=0.8, lw=0)
    axes[0].legend(title="cluster", fontsize=7, markerscale=2, ncol=1 if k <= 8 else (2 if k <= 20 else 3), loc="best")
    axes[0].set_title(f"{title}: 2-D map by cluster")
    ax = axes[1]
    ok = np.isfinite(onset) if onset is not None else np.zeros(len(labels), bool)
    ax.scatter(coords[~ok, 0], coords[~ok, 1], s=8, color="0.8", lw=0, label="onset missing")
    if ok.any():
        sc = ax.scatter(coords[ok, 0], coords[ok, 1], s=8, c=onset[ok], cmap="viridis", lw=0)
        fig.colorbar(sc, ax=ax, label="onset (eV)")
    else:
        _note(ax, "onset missing for every material")
    if (~ok).any():
        ax.legend(fontsize=7, loc="best")
    ax.set_title("by reference onset")
    for a in axes:
        a.set_xlabel(f"{axis} 1")
        a.set_ylabel(f"{axis} 2")
    return fig


def cluster_spectra(energy: np.ndarray, signature: dict[int, dict], title: str):
    """Mean reference (solid) and predicted (dashed) log10 α per cluster with the 10-90 % band of the
    reference and, for an ensemble's prediction (``predicted.sigma``), the ±2σ band of the predicted
    mean (hatched; σ = the cluster's mean recalibrated per-point σ) (at most MAX_PANELS panels: the
    largest clusters)."""
    signature, note = _largest(signature, {c: s["size"] for c, s in signature.items()})
    k = len(signature)
    ncol = min(4, k)
    nrow = (k + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), sharex=True, sharey=True, squeeze=False)
    cm = _cmap(k)
    for ax in axes.ravel()[k:]:
        ax.axis("off")
    for ax, (c, sig) in zip(axes.ravel(), sorted(signature.items())):
        drawn = False
        for key, ls in (("reference", "-"), ("predicted", "--")):
            s = sig.get(key)
            if s is None or not np.isfinite(s["mean"]).any():
                continue
            ax.plot(energy, s["mean"], ls, color=cm(c % cm.N), lw=1.2, label=key)
            if key == "reference":
                ax.fill_between(energy, s["p10"], s["p90"], color=cm(c % cm.N), alpha=0.25, lw=0)
            elif s.get("sigma") is not None:
                ax.fill_between(energy, s["mean"] - 2 * s["sigma"], s["mean"] + 2 * s["sigma"], facecolor="none",
                                edgecolor=cm(c % cm.N), hatch="////", lw=0, alpha=0.6, label="predicted ±2σ")
            drawn = True
        if not drawn:
            _note(ax, "no spectra")
        on = sig.get("onset", {})
        txt = f"onset {on['mean']:.2f}±{on['std']:.2f} eV" if on.get("n") else "onset missing"
        ax.set_title(f"cluster {c} (n={sig['size']}), {txt}", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("energy (eV)")
    for ax in axes[:, 0]:
        ax.set_ylabel("log10 α")
    ens = any((s.get("predicted") or {}).get("sigma") is not None for s in signature.values())
    bands = "10-90 % of reference" + ("; hatched: predicted ±2σ (ensemble)" if ens else "")
    fig.suptitle(f"{title}: cluster spectra (band: {bands}){note}", fontsize=10)
    fig.tight_layout()
    return fig


def enrichment_heatmap(ranked: dict[int, list[dict]], title: str, top: int = 4):
    """Signed -log10 q (sign = direction of the effect) of each cluster's top descriptors."""
    names: list[str] = []
    for rs in ranked.values():
        for r in rs[:top]:
            if r["descriptor"] not in names:
                names.append(r["descriptor"])
    clusters = sorted(ranked)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 0.35 * len(clusters) + 1.8))
    if not names:
        _note(ax, "no descriptor could be tested (all missing or constant)")
        ax.set_title(f"{title}: enrichment")
        return fig
    m = np.zeros((len(clusters), len(names)))
    for i, c in enumerate(clusters):
        for r in ranked[c]:
            if r["descriptor"] in names:
                m[i, names.index(r["descriptor"])] = np.sign(r["effect"]) * min(50.0, -np.log10(max(r["q"], 1e-300)))
    lim = max(1.0, float(np.abs(m).max()))
    im = ax.imshow(m, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim, lim), aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(clusters)), [str(c) for c in clusters], fontsize=7)
    ax.set_ylabel("cluster")
    fig.colorbar(im, ax=ax, label="±log10(1/q)  (+ enriched)")
    ax.set_title(f"{title}: enrichment of top descriptors")
    return fig


def _table_position(symbol: str) -> tuple[int, int] | None:
    from pymatgen.core import Element

    el = Element(symbol)
    if 57 <= el.Z <= 71:
        return 8, 3 + el.Z - 57
    if 89 <= el.Z <= 103:
        return 9, 3 + el.Z - 89
    return el.row, el.group


def element_maps(enrich: dict[int, dict[str, float]], title: str, sizes: dict[int, int] | None = None):
    """Periodic-table heatmap of log2 element enrichment, one panel per cluster (at most MAX_PANELS:
    the largest by ``sizes``)."""
    enrich, note = _largest(enrich, sizes)
    k = len(enrich)
    ncol = min(4, k)
    nrow = (k + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.8 * ncol, 3.0 * nrow), squeeze=False)
    for ax in axes.ravel()[k:]:
        ax.axis("off")
    vals = [v for d in enrich.values() for v in d.values()]
    lim = max(1.0, float(np.max(np.abs(vals)))) if vals else 1.0
    cmap = plt.get_cmap("RdBu_r")
    norm = TwoSlopeNorm(0.0, -lim, lim)
    for ax, (c, d) in zip(axes.ravel(), sorted(enrich.items())):
        ax.set_xlim(0.5, 18.5)
        ax.set_ylim(9.5, 0.5)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(f"cluster {c}", fontsize=8)
        if not d:
            _note(ax, "no element descriptors")
            continue
        for sym, v in d.items():
            pos = _table_position(sym)
            if pos is None:
                continue
            r, g = pos
            ax.add_patch(plt.Rectangle((g - 0.45, r - 0.45), 0.9, 0.9, color=cmap(norm(v))))
            ax.text(g, r, sym, ha="center", va="center", fontsize=5.5)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes.ravel().tolist(), shrink=0.6,
                 label="log2 enrichment")
    fig.suptitle(f"{title}: element enrichment per cluster{note}", fontsize=10)
    return fig


def layer_comparison(ami: dict[str, float], probes: dict[str, dict[str, dict]], title: str = "layers"):
    """AMI of each layer's clusters with the reference-spectra clusters, and the probe score heatmap."""
    layers = list(ami) or list(probes)
    targets: list[str] = []
    for p in probes.values():
        for t in p:
            if t not in targets:
                targets.append(t)
    fig, axes = plt.subplots(1, 2, figsize=(13, max(3.5, 0.3 * len(layers) + 2)),
                             gridspec_kw={"width_ratios": [1, 2.4]})
    ax = axes[0]
    if ami:
        ax.barh(range(len(ami)), list(ami.values()), color="tab:blue")
        ax.set_yticks(range(len(ami)), list(ami), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("AMI with reference-spectra clusters")
    else:
        _note(ax, "no reference spectra: no AMI")
    ax = axes[1]
    if targets and probes:
        pl = list(probes)
        m = np.full((len(pl), len(targets)), np.nan)
        for i, layer in enumerate(pl):
            for j, t in enumerate(targets):
                if t in probes[layer]:
                    s = probes[layer][t]["score"]
                    m[i, j] = s if probes[layer][t]["metric"] == "r2" else 2 * s - 1  # AUC -> Gini
        im = ax.imshow(np.clip(m, -0.2, 1.0), cmap="viridis", aspect="auto", vmin=-0.2, vmax=1.0)
        ax.set_xticks(range(len(targets)), targets, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(pl)), pl, fontsize=7)
        fig.colorbar(im, ax=ax, label="probe score (R², or 2·AUC−1)")
    else:
        _note(ax, "no probe targets (descriptors missing)")
    ax.set_title("linear probes: what each layer encodes")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
