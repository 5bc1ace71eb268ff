"""Integrated gradients of one scalar of the predicted spectrum onto atoms, bonds and angles.

Inputs attributed: the three embeddings that start the network, ``x0 = atom_embedding(CGCNN(Z))`` (A, H),
``y0 = edge_embedding(RBF(|r|))`` (E, H) for the atom-graph edges (bonds) and
``z0 = angle_embedding(RBF(cos θ))`` (T, H) for the line-graph edges (angles). The rest of the network is
:func:`head` (the ALIGNN forward after the embeddings, identical to ``ALIGNN.forward``).

Baseline: all three embeddings zero (same graph, no information about elements, bond lengths or angles).
Path integral ``IG_i = x_i ∫_0^1 ∂F/∂x_i(α x) dα`` by Gauss–Legendre quadrature with ``steps`` nodes (all
path points of one material run as one batch of copies). Attribution of an atom / bond / angle = sum over
its H embedding components. Completeness: the sum of every attribution of a material equals
``F(input) − F(baseline)`` up to the quadrature error (``completeness_error`` is recorded per material).

Target F: a linear functional ``w · prediction`` of the predicted spectrum (:func:`target_weights`), so
completeness is exact up to quadrature:

* ``window``: the mean predicted value (stored units, log10 α by default) over the grid points inside the
  energy window — ``energy_window`` if set, else the material's predicted onset ± ``window_half_width`` eV
  (the whole spectrum when the onset is undefined);
* ``onset``: the linearised onset. With E* the predicted onset and s the slope of the linearly interpolated
  log10 α at E*, a change δy of the prediction moves the onset by ``-δy(E*) / s`` (first order), so
  F = E* − (y(E*) − threshold) / s, with y(E*) the interpolation between the two grid points around E*;
* ``edge_integral``: ∫ (y − floor) dE over [E*, E* + 1 eV] of the interpolated prediction, with the window
  held at the predicted onset (the descriptor's 101-point trapezoid).

``onset`` and ``edge_integral`` need a defined onset and ``data.transform: log10_alpha``; materials without one
fall back to the whole-spectrum ``window`` target (recorded per material as ``target_kind``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from toolkit.data.graphs import bond_cosines
from toolkit.data.loader import collate
from toolkit.model.alignn import ALIGNN, sort_by_destination
from toolkit.model.kernels import torch_graph


@dataclass
class Attribution:
    """Attributions of one material (bonds and angles in the model's internal order)."""

    atoms: np.ndarray  # (A,)
    bonds: np.ndarray  # (E,)
    angles: np.ndarray  # (T,)
    bond_src: np.ndarray  # (E,) local atom index
    bond_dst: np.ndarray
    bond_length: np.ndarray  # (E,) Å
    angle_centre: np.ndarray  # (T,) local atom index of the shared atom
    angle_deg: np.ndarray  # (T,) degrees
    target: float  # F(input)
    baseline_target: float  # F(baseline)

    @property
    def total(self) -> float:
        return float(self.atoms.sum() + self.bonds.sum() + self.angles.sum())

    @property
    def completeness_error(self) -> float:
        """|sum of attributions − (F(input) − F(baseline))|."""
        return abs(self.total - (self.target - self.baseline_target))


def _inner(model: torch.nn.Module) -> ALIGNN:
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    if not isinstance(inner, ALIGNN) or type(inner).prepare_graphs is not ALIGNN.prepare_graphs:
        raise TypeError("integrated gradients need the torch-backend ALIGNN (toolkit.model.alignn.ALIGNN)")
    return inner


def graphs(model: ALIGNN, batch):
    """(g, lg, edge_index, edge_vec, line_index) in the model's internal (destination-sorted) order."""
    edge_index, r, line_index = sort_by_destination(batch.edge_index, batch.edge_vec, batch.line_index)
    g = torch_graph(edge_index[0], edge_index[1], batch.atomic_numbers.shape[0])
    lg = torch_graph(line_index[0], line_index[1], edge_index.shape[1])
    return g, lg, edge_index, r, line_index


def embeddings(model: ALIGNN, batch, r: torch.Tensor, line_index: torch.Tensor):
    """The model's atom, bond and angle embeddings (:meth:`ALIGNN.embeddings`); zeros for the angles of a
    model without ALIGNN layers, so that every input has an attribution."""
    x, y, z = model.embeddings(batch, r, line_index)
    return x, y, (x.new_zeros((line_index.shape[1], x.shape[1])) if z is None else z)


def head(model: ALIGNN, g, lg, batch, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``ALIGNN.forward`` after the embeddings (:meth:`ALIGNN.head`)."""
    return model.head(g, lg, batch, x, y, z)


def window_mask(energy: np.ndarray, onset: float | None, window: tuple[float, float] | None,
                half_width: float) -> np.ndarray:
    """Grid points of the target window (see the module docstring)."""
    e = np.asarray(energy, dtype=np.float64)
    if window is not None:
        m = (e >= window[0]) & (e <= window[1])
    elif onset is not None and np.isfinite(onset):
        m = np.abs(e - onset) <= half_width
    else:
        m = np.ones_like(e, dtype=bool)
    if not m.any():  # a window between grid points: the nearest point
        m[int(np.argmin(np.abs(e - (np.mean(window) if window is not None else (onset or e[0])))))] = True
    return m


def _interp_weights(energy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(len(x), G) matrix of linear interpolation of a grid function at energies ``x`` (inside the grid)."""
    e = np.asarray(energy, dtype=np.float64)
    i = np.clip(np.searchsorted(e, x, side="right") - 1, 0, e.size - 2)
    f = (x - e[i]) / (e[i + 1] - e[i])
    w = np.zeros((x.size, e.size))
    w[np.arange(x.size), i] = 1.0 - f
    w[np.arange(x.size), i + 1] += f
    return w


def target_weights(kind: str, energy: np.ndarray, prediction: np.ndarray, onset: float | None, *,
                   window: tuple[float, float] | None = None, half_width: float = 0.5, threshold: float = 4.0,
                   log_floor: float = 2.0) -> tuple[np.ndarray, str]:
    """Weights ``w`` (G,) of the target ``F = w · prediction`` (+ a constant) and the target kind used."""
    e = np.asarray(energy, dtype=np.float64)
    ok = onset is not None and np.isfinite(onset) and e[0] < onset < e[-1]
    if kind == "onset" and ok:
        x = np.array([float(onset)])
        i = int(np.clip(np.searchsorted(e, onset, side="right") - 1, 0, e.size - 2))
        slope = float((prediction[i + 1] - prediction[i]) / (e[i + 1] - e[i]))
        if np.isfinite(slope) and slope > 0:
            return -_interp_weights(e, x)[0] / slope, "onset"
    if kind == "edge_integral" and ok and onset + 1.0 <= e[-1]:
        x = float(onset) + np.linspace(0.0, 1.0, 101)
        trap = np.full(101, 0.01)
        trap[[0, -1]] = 0.005
        return trap @ _interp_weights(e, x), "edge_integral"
    if kind not in ("window", "onset", "edge_integral"):
        raise ValueError(f"unknown attribution target {kind!r}")
    if kind != "window":
        window, onset = None, None  # no onset: the whole spectrum
    m = window_mask(e, onset, window, half_width)
    return m / m.sum(), "window"


def integrated_gradients(model: torch.nn.Module, item: dict, mask: np.ndarray, steps: int = 32,
                         device: torch.device | str = "cpu", max_angles: int = 400_000) -> Attribution:
    """Integrated gradients of ``w · prediction`` for one material (collate ``item``): ``mask`` is a boolean
    grid mask (w = its uniform mean) or the weights ``w`` (G,) themselves (:func:`target_weights`)."""
    m = _inner(model)
    dev = torch.device(device)
    nodes, weights = np.polynomial.legendre.leggauss(int(steps))
    alphas, weights = (nodes + 1.0) / 2.0, weights / 2.0
    w_np = np.asarray(mask)
    w_np = w_np / w_np.sum() if w_np.dtype == bool else w_np.astype(np.float64)
    wt = torch.as_tensor(w_np, dtype=torch.float32, device=dev)
    one = collate([item]).to(dev)
    with torch.no_grad():
        g1, lg1, ei1, r1, li1 = graphs(m, one)
        x1, y1, z1 = embeddings(m, one, r1, li1)
        target = float(head(m, g1, lg1, one, x1, y1, z1)[0].float() @ wt)
        base = float(head(m, g1, lg1, one, torch.zeros_like(x1), torch.zeros_like(y1), torch.zeros_like(z1))
                     [0].float() @ wt)
    A, E, T = x1.shape[0], y1.shape[0], z1.shape[0]
    per_chunk = max(1, min(len(alphas), max_angles // max(T, 1)))
    ga, gb, gc = torch.zeros_like(x1), torch.zeros_like(y1), torch.zeros_like(z1)
    for a0 in range(0, len(alphas), per_chunk):
        al = torch.as_tensor(alphas[a0:a0 + per_chunk], dtype=x1.dtype, device=dev)
        w = torch.as_tensor(weights[a0:a0 + per_chunk], dtype=x1.dtype, device=dev)
        k = al.shape[0]
        batch = collate([item] * k).to(dev)
        g, lg, _, _, _ = graphs(m, batch)  # copies stay contiguous and in the single-copy order
        xs = (al[:, None, None] * x1[None]).reshape(k * A, -1).requires_grad_(True)
        ys = (al[:, None, None] * y1[None]).reshape(k * E, -1).requires_grad_(True)
        zs = (al[:, None, None] * z1[None]).reshape(k * T, -1).requires_grad_(True)
        with torch.enable_grad():
            out = head(m, g, lg, batch, xs, ys, zs).float() @ wt
            gx, gy, gz = torch.autograd.grad((out * w).sum(), (xs, ys, zs))
        ga += gx.reshape(k, A, -1).sum(0)
        gb += gy.reshape(k, E, -1).sum(0)
        gc += gz.reshape(k, T, -1).sum(0)
    cos = bond_cosines(r1, li1) if T else r1.new_zeros(0)
    return Attribution(
        atoms=(x1 * ga).sum(1).double().cpu().numpy(), bonds=(y1 * gb).sum(1).double().cpu().numpy(),
        angles=(z1 * gc).sum(1).double().cpu().numpy(),
        bond_src=ei1[0].cpu().numpy(), bond_dst=ei1[1].cpu().numpy(),
        bond_length=torch.linalg.vector_norm(r1, dim=1).double().cpu().numpy(),
        angle_centre=ei1[1][li1[0]].cpu().numpy() if T else np.zeros(0, np.int64),
        angle_deg=np.degrees(np.arccos(np.clip(cos.double().cpu().numpy(), -1, 1))),
        target=target, baseline_target=base)


def aggregate(att: Attribution, symbols: list[str], bond_bin: float, angle_bin: float) -> dict[str, dict[str, list]]:
    """{"element": {El: [sum, count]}, "bond": {"A-B|lo-hi Å": [...]}, "angle": {"El|lo-hi°": [...]}}."""
    out: dict[str, dict[str, list]] = {"element": {}, "bond": {}, "angle": {}}

    def add(group: str, key: str, v: float) -> None:
        s = out[group].setdefault(key, [0.0, 0])
        s[0] += float(v)
        s[1] += 1

    for i, v in enumerate(att.atoms):
        add("element", symbols[i], v)
    for e, v in enumerate(att.bonds):
        a, b = sorted((symbols[att.bond_src[e]], symbols[att.bond_dst[e]]))
        lo = np.floor(att.bond_length[e] / bond_bin) * bond_bin
        add("bond", f"{a}-{b}|{lo:.2f}-{lo + bond_bin:.2f}", v)
    for t, v in enumerate(att.angles):
        lo = min(np.floor(att.angle_deg[t] / angle_bin) * angle_bin, 180.0 - angle_bin)
        add("angle", f"{symbols[att.angle_centre[t]]}|{lo:g}-{lo + angle_bin:g}", v)
    return out


def full_record(att: Attribution, symbols: list[str]) -> dict:
    """Per-material attributions for storage (representatives)."""
    return {"atoms": [{"site": i, "element": symbols[i], "attribution": float(v)} for i, v in enumerate(att.atoms)],
            "bonds": {"src": att.bond_src.tolist(), "dst": att.bond_dst.tolist(),
                      "length": np.round(att.bond_length, 4).tolist(), "attribution": att.bonds.tolist()},
            "angles": {"centre": att.angle_centre.tolist(), "angle_deg": np.round(att.angle_deg, 3).tolist(),
                       "attribution": att.angles.tolist()},
            "target": att.target, "baseline_target": att.baseline_target, "total": att.total,
            "completeness_error": att.completeness_error}
