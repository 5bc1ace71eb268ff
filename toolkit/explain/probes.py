"""Run original and edited structures through the trained model, batched, and measure what changed.

Every structure goes through the production path: :func:`toolkit.data.graphs.graph_from_config` (the
run's ``graph`` settings) -> :func:`toolkit.data.loader.collate` -> the model, exactly as in training.

Features of a predicted spectrum (:func:`spectrum_features`; eV unless stated), from
:func:`toolkit.data.spectra.spectral_descriptors` with the run's threshold, transform and floor:
``onset``, ``edge_integral``, ``peak_1..3`` (energies of the three most prominent peaks, sorted by energy),
``peak_1..3_height`` (log10 α at those energies). An edit's shift of a feature = edited − original
(NaN where either is undefined; peaks are matched by rank). ``spectrum_mae`` = mean |edited − original|
over the whole grid (stored units).

Extrapolation: the readout embedding (the model's pooled vector before ``fc``) of every structure is
compared with the readout embeddings of training materials (``explain/reference.npz``):
``distance_ratio`` = distance to the nearest training material / median nearest-neighbour distance among the
training materials; above ``extrapolation_factor`` the edited structure is flagged ``extrapolated``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from toolkit.data.graphs import GraphError, graph_from_config
from toolkit.data.loader import collate
from toolkit.data.readers.common import reason
from toolkit.data.spectra import spectral_descriptors, to_log10
from toolkit.embed.hooks import capture

SPECTRUM_FEATURES = ("onset", "edge_integral", "peak_1", "peak_2", "peak_3", "peak_1_height", "peak_2_height",
                     "peak_3_height", "target")


def graph_item(structure: Any, graph_cfg: Any, index: int, ident: str) -> dict:
    """The collate item of ``structure`` (raises GraphError)."""
    g = graph_from_config(structure, graph_cfg)
    return {"numbers": g.numbers, "edge_src": g.edge_src.astype(np.int64), "edge_dst": g.edge_dst.astype(np.int64),
            "edge_vec": g.edge_vec, "index": int(index), "id": ident}


def try_graph(structure: Any, graph_cfg: Any, index: int, ident: str) -> tuple[dict | None, str | None]:
    try:
        return graph_item(structure, graph_cfg, index, ident), None
    except GraphError as e:
        return None, reason("no graph", str(e))


@dataclass
class Predictions:
    spectrum: np.ndarray  # (N, G) stored units
    readout: np.ndarray  # (N, H) float32 (empty (N, 0) when the model has no readout layer)


def predict(model: torch.nn.Module, items: list[dict], batch_size: int, device: torch.device,
            readout: bool = True) -> Predictions:
    """Predictions (and readout embeddings) of ``items``, in order, ``batch_size`` graphs per batch."""
    specs: list[np.ndarray] = []
    embs: list[np.ndarray] = []
    model.eval()
    with torch.inference_mode():
        for a in range(0, len(items), batch_size):
            batch = collate(items[a:a + batch_size]).to(device)
            if readout:
                with capture(model, ["readout"]) as cap:
                    out = model(batch)
                    embs.append(cap.pooled(batch, ["mean"])["readout/mean"].float().cpu().numpy())
            else:
                out = model(batch)
            specs.append(out.float().cpu().numpy())
    if not specs:
        return Predictions(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32))
    spec = np.concatenate(specs)
    return Predictions(spec, np.concatenate(embs) if embs else np.zeros((spec.shape[0], 0), np.float32))


def spectrum_features(energy: np.ndarray, spectra: np.ndarray, data_cfg: Any) -> dict[str, np.ndarray]:
    """Feature name -> (N,) values of predicted spectra (see the module docstring)."""
    n = spectra.shape[0]
    out = {k: np.full(n, np.nan) for k in SPECTRUM_FEATURES}
    target = getattr(data_cfg, "target", None)  # a DataConfig (explain) or a Predictor (predict: its own features)
    if target is not None and target.kind != "absorption":  # other targets: "target" = the headline feature
        from toolkit.data.targets import TargetSpec

        spec = TargetSpec.from_config(data_cfg)
        if n:
            out["target"] = np.asarray(spec.features(energy, spectra)[spec.primary], dtype=np.float64)
        return out
    thr, tr, floor = data_cfg.onset_threshold, data_cfg.transform, data_cfg.log_floor
    for i in range(n):
        d = spectral_descriptors(energy, spectra[i], threshold=thr, transform=tr, log_floor=floor)
        out["onset"][i] = d["onset"]
        out["edge_integral"][i] = d["edge_integral"]
        y = to_log10(spectra[i], tr, floor)
        for k, p in enumerate(d["peaks"][:3], start=1):
            out[f"peak_{k}"][i] = p
            if np.isfinite(p):
                out[f"peak_{k}_height"][i] = float(np.interp(p, energy, y))
    return out


class Reference:
    """Readout embeddings of training materials, for the distance to the training data."""

    def __init__(self, embeddings: np.ndarray, nn_scale: float | None = None):
        self.emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        self.nn_scale = float(nn_scale) if nn_scale is not None else self.median_nn()

    def median_nn(self) -> float:
        if self.emb.shape[0] < 2:
            return float("nan")
        d = torch.cdist(self.emb, self.emb)
        d.fill_diagonal_(float("inf"))
        return float(d.min(dim=1).values.median())

    def nearest(self, x: np.ndarray) -> np.ndarray:
        """Distance of each row of ``x`` to its nearest reference embedding."""
        if x.size == 0 or self.emb.shape[0] == 0:
            return np.full(x.shape[0], np.nan)
        out = []
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
        for a in range(0, xt.shape[0], 1024):
            out.append(torch.cdist(xt[a:a + 1024], self.emb).min(dim=1).values.numpy())
        return np.concatenate(out).astype(np.float64)

    def ratio(self, x: np.ndarray) -> np.ndarray:
        d = self.nearest(x)
        return d / self.nn_scale if self.nn_scale and np.isfinite(self.nn_scale) and self.nn_scale > 0 else d * np.nan


def probe_rows(materials: list[dict], model: torch.nn.Module, graph_cfg: Any, data_cfg: Any, energy: np.ndarray,
               opts: Any, device: torch.device, reference: Reference | None,
               make_edits: Callable[[Any], list] | None = None) -> tuple[list[dict], list[dict], dict[str, dict]]:
    """Counterfactual probes of ``materials`` (each ``{"row", "id", "formula", "cluster", "structure"}``).

    Returns (edit rows, reject rows, {id: original features + original prediction}) — one edit row per valid
    edited structure with the shift of every feature, in a fixed order (material, then edit)."""
    from toolkit.explain import edits as ed

    min_d = opts.min_distance if opts.min_distance is not None else data_cfg.min_distance
    make = make_edits or (lambda s: ed.make_edits(s, opts, min_d))
    items: list[dict] = []
    owners: list[tuple[int, Any]] = []  # (material position, Edit or None for the original)
    rejects: list[dict] = []
    for m_pos, m in enumerate(materials):
        item, why = try_graph(m["structure"], graph_cfg, len(items), m["id"])
        cond = m.get("conditions")  # models with condition inputs: every edit keeps the record's conditions
        if item is not None and cond is not None:
            item["conditions"] = cond
        if item is None:
            rejects.append({"id": m["id"], "cluster": m["cluster"], "type": "original", "label": "original",
                            "reason": why})
            continue
        items.append(item)
        owners.append((m_pos, None))
        for e in make(m["structure"]):
            if e.structure is not None:
                it, why = try_graph(e.structure, graph_cfg, len(items), f"{m['id']}|{e.label}")
                if it is not None and cond is not None:
                    it["conditions"] = cond
                if it is not None:
                    items.append(it)
                    owners.append((m_pos, e))
                    continue
                e.reason = why
            rejects.append({"id": m["id"], "cluster": m["cluster"], "type": e.type, "label": e.label,
                            "reason": e.reason})
    if not items:
        return [], rejects, {}
    pred = predict(model, items, opts.batch_size, device, readout=reference is not None)
    feats = spectrum_features(energy, pred.spectrum, data_cfg)
    ratio = reference.ratio(pred.readout) if reference is not None else np.full(len(items), np.nan)
    base_of: dict[int, int] = {}
    originals: dict[str, dict] = {}
    rows: list[dict] = []
    for k, (m_pos, e) in enumerate(owners):
        m = materials[m_pos]
        if e is None:
            base_of[m_pos] = k
            originals[m["id"]] = {"features": {f: float(feats[f][k]) for f in SPECTRUM_FEATURES},
                                  "prediction": pred.spectrum[k], "distance_ratio": float(ratio[k])}
            continue
        b = base_of[m_pos]
        row = {"id": m["id"], "formula": m["formula"], "cluster": m["cluster"], "type": e.type, "label": e.label,
               "detail": e.detail}
        for f in SPECTRUM_FEATURES:
            row[f"original_{f}"] = float(feats[f][b])
            row[f"delta_{f}"] = float(feats[f][k] - feats[f][b])
        row["delta_spectrum_mae"] = float(np.mean(np.abs(pred.spectrum[k] - pred.spectrum[b])))
        row["original_distance_ratio"] = float(ratio[b])
        row["distance_ratio"] = float(ratio[k])
        row["extrapolated"] = bool(np.isfinite(ratio[k]) and ratio[k] > opts.extrapolation_factor)
        rows.append(row)
    return rows, rejects, originals
