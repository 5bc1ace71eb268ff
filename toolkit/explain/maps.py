"""Per-material attribution maps: where in one crystal the trained model's prediction comes from.

For each representative material of the explain stage (``attributions.json`` ``representatives``: the
integrated-gradient attributions of every atom, bond and angle, :func:`toolkit.explain.gradients.
full_record`), :func:`attribution_map` draws

* left: the unit cell's atoms projected on the plane of its two longest lattice vectors, every atom a
  disc coloured by its attribution (diverging colour map, red = raises the target, blue = lowers it)
  and sized by its magnitude plus the attributions of the angles centred on it; every bond (the graph's
  directed edges summed per atom pair and periodic image) a segment from its first atom towards the
  neighbour's image, coloured and weighted by its attribution; the strongest bonds only (``max_bonds``);
* right: the attribution summed by element, by bond type (element pair) and by angle centre element,
  with the total against the prediction minus the baseline (completeness).

Bond geometry is recovered from the stored structure: the neighbour image is the lattice translation
(within ±2 cells) that reproduces the recorded bond length.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np


def _image_vectors(cart: np.ndarray, lattice: np.ndarray, src: np.ndarray, dst: np.ndarray,
                   length: np.ndarray) -> np.ndarray:
    """(E, 3) bond vectors: r_dst + t - r_src for the lattice translation t (components in -2..2)
    whose length is closest to the recorded one."""
    rng = np.arange(-2, 3)
    shifts = np.stack(np.meshgrid(rng, rng, rng, indexing="ij"), -1).reshape(-1, 3) @ lattice  # (125, 3)
    base = cart[dst] - cart[src]  # (E, 3)
    cand = base[:, None, :] + shifts[None, :, :]  # (E, 125, 3)
    err = np.abs(np.linalg.norm(cand, axis=2) - length[:, None])
    return cand[np.arange(len(src)), np.argmin(err, axis=1)]


def _plane(lattice: np.ndarray) -> np.ndarray:
    """(3, 2) orthonormal basis of the plane of the two longest lattice vectors."""
    order = np.argsort(-np.linalg.norm(lattice, axis=1))
    a, b = lattice[order[0]], lattice[order[1]]
    u = a / np.linalg.norm(a)
    v = b - (b @ u) * u
    v = v / (np.linalg.norm(v) or 1.0)
    return np.stack([u, v], axis=1)


def attribution_map(rec: dict[str, Any], lattice: np.ndarray, frac_coords: np.ndarray, max_bonds: int = 40):
    """The figure for one representative ``rec`` (module doc); ``lattice`` (3, 3) Å rows, ``frac_coords``
    (n, 3) of the structure the attributions were computed on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    lattice = np.asarray(lattice, dtype=np.float64)
    cart = np.asarray(frac_coords, dtype=np.float64) @ lattice
    atoms = rec["atoms"]
    elem = [a["element"] for a in atoms]
    a_attr = np.array([a["attribution"] for a in atoms], dtype=np.float64)
    bonds, angles = rec["bonds"], rec["angles"]
    src, dst = np.asarray(bonds["src"], dtype=np.int64), np.asarray(bonds["dst"], dtype=np.int64)
    b_attr = np.asarray(bonds["attribution"], dtype=np.float64)
    ang_centre = np.asarray(angles["centre"], dtype=np.int64)
    ang_attr = np.asarray(angles["attribution"], dtype=np.float64)
    site_total = a_attr + np.bincount(ang_centre, weights=ang_attr, minlength=len(atoms))[:len(atoms)]

    vec = _image_vectors(cart, lattice, src, dst, np.asarray(bonds["length"], dtype=np.float64)) if len(src) else \
        np.zeros((0, 3))
    pair: dict[tuple, list] = {}
    for e in range(len(src)):  # i->j and j->i (the reverse image) are one bond
        i, j = int(src[e]), int(dst[e])
        key = (i, j, *np.round(vec[e], 2)) if i <= j else (j, i, *np.round(-vec[e], 2))
        acc = pair.setdefault(key, [0.0, vec[e] if i <= j else -vec[e]])
        acc[0] += float(b_attr[e])
    items = sorted(pair.items(), key=lambda kv: -abs(kv[1][0]))[:max_bonds]

    P = _plane(lattice)
    xy = cart @ P
    vals = np.concatenate([site_total, [v for _, (v, _) in items]]) if items else site_total
    lim = float(np.max(np.abs(vals))) if vals.size and np.max(np.abs(vals)) > 0 else 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
    cmap = plt.get_cmap("RdBu_r")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10.5, 4.6), gridspec_kw={"width_ratios": [1.25, 1.0]})
    for (i, _j, *_), (v, d) in items:
        p0, p1 = xy[i], xy[i] + d @ P
        ax.plot([p0[0], p1[0]], [p0[1], p1[1]], color=cmap(norm(v)), lw=0.8 + 4.0 * abs(v) / lim,
                alpha=0.85, zorder=1, solid_capstyle="round")
    ax.scatter(xy[:, 0], xy[:, 1], s=60 + 500 * np.abs(site_total) / lim, c=cmap(norm(site_total)),
               edgecolors="0.2", linewidths=0.6, zorder=2)
    for k, (x, y) in enumerate(xy):
        ax.annotate(elem[k], (x, y), ha="center", va="center", fontsize=7, zorder=3)
    ax.set_aspect("equal")
    ax.set_xlabel("Å (along the longest lattice vector)")
    ax.set_ylabel("Å")
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, fraction=0.04, pad=0.02, label="attribution (target units)")
    ax.set_title(f"{rec.get('formula') or rec['id']} (cluster {rec.get('cluster')}): atoms + angles at each "
                 f"site, {len(items)} strongest bonds", fontsize=9)

    groups: dict[str, float] = defaultdict(float)
    for k, v in enumerate(a_attr):
        groups[f"atom {elem[k]}"] += float(v)
    for e in range(len(src)):
        a, b = sorted((elem[src[e]], elem[dst[e]]))
        groups[f"bond {a}-{b}"] += float(b_attr[e])
    for t in range(len(ang_centre)):
        groups[f"angle at {elem[ang_centre[t]]}"] += float(ang_attr[t])
    top = sorted(groups.items(), key=lambda kv: -abs(kv[1]))[:12][::-1]
    bx.barh([k for k, _ in top], [v for _, v in top], color=[cmap(norm(v)) for _, v in top], edgecolor="0.3")
    bx.axvline(0, color="0.4", lw=0.8)
    bx.tick_params(axis="y", labelsize=8)
    total, target, base = rec.get("total"), rec.get("target"), rec.get("baseline_target")
    sub = f"sum {total:.3g} vs prediction - baseline {target - base:.3g}" if None not in (total, target, base) else ""
    bx.set_title(f"by element, bond type, angle centre ({rec.get('target_kind', '')})\n{sub}", fontsize=9)
    fig.tight_layout()
    return fig
