"""How predictions move along a condition (temperature, pressure, ...): attribution.json ``conditions``.

A dataset with conditions (``data.target.conditions``) holds one record per structure and condition
value, each with the structure's key (``group/structure_id``). For every condition this module reports:

* **per cluster** (of the readout layer's default clustering, else the first layer analysed): the mean
  reference and predicted headline feature (the onset of absorption, a scalar target, ...) at each
  condition value (the distinct values when there are at most :data:`MAX_LEVELS`, else quantile bins),
  and the **within-structure slope** d(feature)/d(condition): the least-squares slope of the feature
  against the condition after subtracting each structure's own mean, pooled over the cluster's
  structures (so differences between structures never pass for a condition effect);
* **per structure** the same slope from the predictions and from the references, and their agreement
  (correlation, MAE of the predicted shift from the lowest condition value);
* **against a planted law** (benchmarks whose truth names the condition, e.g. the Varshni benchmark):
  the predicted shift of every record from its structure's lowest-condition record against the true
  shift (``benchmark/onset_shift``), its MAE, and the MAE of the best structure-blind law (the mean true
  shift at each condition value, fitted on the same records), which the model must beat to have
  learned a structure-dependent law rather than an average trend.

Numbers only; the report section is :func:`html_section`.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

MAX_LEVELS = 12


def _levels(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(level index of each value, level centres): distinct values, or quantile bins above MAX_LEVELS."""
    u = np.unique(v[np.isfinite(v)])
    if u.size <= MAX_LEVELS:
        idx = np.searchsorted(u, v)
        return np.where(np.isfinite(v), idx, -1), u
    edges = np.quantile(v[np.isfinite(v)], np.linspace(0, 1, MAX_LEVELS + 1))
    idx = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, MAX_LEVELS - 1)
    centres = np.array([np.nanmean(v[idx == k]) if (idx == k).any() else np.nan for k in range(MAX_LEVELS)])
    return np.where(np.isfinite(v), idx, -1), centres


def within_slopes(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[dict[str, float], float]:
    """Per group: least-squares slope of y on x (NaN with < 2 distinct x); and the pooled within-group slope."""
    out: dict[str, float] = {}
    sxy = sxx = 0.0
    for g in np.unique(groups):
        m = (groups == g) & np.isfinite(x) & np.isfinite(y)
        if m.sum() < 2 or np.ptp(x[m]) == 0:
            out[str(g)] = float("nan")
            continue
        dx, dy = x[m] - x[m].mean(), y[m] - y[m].mean()
        out[str(g)] = float((dx * dy).sum() / (dx * dx).sum())
        sxy += float((dx * dy).sum())
        sxx += float((dx * dx).sum())
    return out, (sxy / sxx if sxx > 0 else float("nan"))


def shift_from_lowest(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """y minus the y of the same group's record at the group's lowest x (NaN where undefined)."""
    out = np.full(len(y), np.nan)
    for g in np.unique(groups):
        m = np.flatnonzero(groups == g)
        ok = m[np.isfinite(x[m]) & np.isfinite(y[m])]
        if ok.size:
            base = ok[np.argmin(x[ok])]
            out[ok] = y[ok] - y[base]
    return out


def _r(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 6)


def condition_response(names: tuple[str, ...], values: dict[str, np.ndarray], groups: np.ndarray,
                       reference: np.ndarray, predicted: np.ndarray | None, labels: np.ndarray | None,
                       feature: str, layer: str | None, truth: dict | None = None,
                       true_shift: np.ndarray | None = None, held_out: np.ndarray | None = None) -> dict[str, Any]:
    """attribution.json ``conditions`` (see the module docstring). ``values``: condition name -> (N,)
    raw values; ``reference``/``predicted``: (N,) headline feature; ``labels``: (N,) cluster of each
    record (-1 = none); ``true_shift``: (N,) planted shift of the feature from the structure's lowest
    condition value (benchmarks), scored when ``truth`` names the condition, over every record
    (``recovery``) and over the records of ``held_out`` structures (``recovery_held_out``: the test split,
    structures the model never saw at any condition value)."""
    out: dict[str, Any] = {"feature": feature, "layer": layer, "conditions": {}}
    groups = np.array([str(g) for g in groups])
    for name in names:
        x = np.asarray(values[name], dtype=np.float64)
        lev, centres = _levels(x)
        res: dict[str, Any] = {"levels": [_r(c) for c in centres], "n_records": int(np.isfinite(x).sum()),
                               "n_structures": int(np.unique(groups).size)}
        series = {"reference": reference, "predicted": predicted}
        per_struct = {}
        for key, y in series.items():
            if y is None:
                continue
            slopes, pooled = within_slopes(x, y, groups)
            res[f"{key}_slope"] = _r(pooled)
            per_struct[key] = slopes
        if "predicted" in per_struct and "reference" in per_struct:
            a = np.array([per_struct["reference"][g] for g in per_struct["reference"]])
            b = np.array([per_struct["predicted"][g] for g in per_struct["reference"]])
            ok = np.isfinite(a) & np.isfinite(b)
            res["structure_slopes"] = {"n": int(ok.sum()),
                                       "correlation": _r(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 2 else None,
                                       "mae": _r(np.mean(np.abs(a[ok] - b[ok]))) if ok.any() else None}
        if labels is not None:
            clusters = {}
            for c in np.unique(labels[labels >= 0]):
                m = labels == c
                row: dict[str, Any] = {"size": int(m.sum())}
                for key, y in series.items():
                    if y is None:
                        continue
                    row[key] = [_r(np.nanmean(y[m & (lev == k)])) if (m & (lev == k) & np.isfinite(y)).any() else None
                                for k in range(len(centres))]
                    row[f"{key}_slope"] = _r(within_slopes(x[m], y[m], groups[m])[1])
                clusters[str(int(c))] = row
            res["clusters"] = clusters
        if truth is not None and name in (truth.get("conditions") or {}) and true_shift is not None \
                and predicted is not None:
            ts = np.asarray(true_shift, dtype=np.float64)
            res["recovery"] = recovery(x, groups, predicted, reference, ts, lev, truth["conditions"][name])
            if held_out is not None and np.any(held_out):
                h = np.asarray(held_out, bool)
                res["recovery_held_out"] = recovery(x[h], groups[h], np.asarray(predicted)[h], np.asarray(reference)[h],
                                                    ts[h], lev[h], truth["conditions"][name])
        out["conditions"][name] = res
    return out


def recovery(x: np.ndarray, groups: np.ndarray, predicted: np.ndarray, reference: np.ndarray,
             true_shift: np.ndarray, lev: np.ndarray, law: dict) -> dict[str, Any]:
    """Predicted vs planted shift of the feature along the condition (see the module docstring)."""
    pred_shift = shift_from_lowest(x, predicted, groups)
    ref_shift = shift_from_lowest(x, reference, groups)
    lowest = np.zeros(len(x), bool)
    for g in np.unique(groups):
        m = np.flatnonzero(groups == g)
        lowest[m[np.argmin(np.where(np.isfinite(x[m]), x[m], np.inf))]] = True
    ok = np.isfinite(pred_shift) & np.isfinite(true_shift) & ~lowest
    blind = np.full(len(x), np.nan)
    for k in np.unique(lev[ok]):
        sel = ok & (lev == k)
        blind[sel] = np.mean(true_shift[sel])  # the best law that ignores the structure
    err = np.abs(pred_shift - true_shift)[ok]
    ref_err = np.abs(ref_shift - true_shift)[ok & np.isfinite(ref_shift)]
    spread = float(np.std(true_shift[ok])) if ok.any() else float("nan")
    by_level = []
    for k in np.unique(lev[ok]):
        sel = ok & (lev == k)
        by_level.append({"level": int(k), "n": int(sel.sum()), "true_shift_mean": _r(np.mean(true_shift[sel])),
                         "predicted_shift_mean": _r(np.mean(pred_shift[sel])),
                         "mae": _r(np.mean(np.abs(pred_shift - true_shift)[sel]))})
    return {"law": law.get("rule"), "n": int(ok.sum()), "shift_mae": _r(err.mean()) if err.size else None,
            "structure_blind_mae": _r(np.mean(np.abs(blind - true_shift)[ok])) if ok.any() else None,
            "reference_shift_mae": _r(ref_err.mean()) if ref_err.size else None,
            "true_shift_sd": _r(spread),
            "correlation": _r(np.corrcoef(pred_shift[ok], true_shift[ok])[0, 1]) if ok.sum() > 2 else None,
            "by_level": by_level}


def html_section(cond: dict | None, units: str = "eV") -> str:
    """The report's "along the conditions" section (empty without conditions)."""
    if not cond or not cond.get("conditions"):
        return ""
    feat = cond["feature"]
    intro = (f"<h2>Along the conditions</h2><p>How the {html.escape(feat)} moves with each condition: "
             f"within-structure slopes (each structure's own records), per cluster of "
             f"<code>{html.escape(str(cond.get('layer')))}</code>.</p>")
    s = [intro]
    for name, res in cond["conditions"].items():
        s.append(f"<h3>{html.escape(name)}</h3><p>{res['n_records']} records of {res['n_structures']} structures; "
                 f"pooled slope: reference {res.get('reference_slope')}, predicted {res.get('predicted_slope')} "
                 f"{html.escape(units)} per unit of {html.escape(name)}.")
        ss = res.get("structure_slopes")
        if ss:
            s.append(f" Per-structure slopes, predicted vs reference: correlation {ss['correlation']}, "
                     f"MAE {ss['mae']} ({ss['n']} structures).")
        s.append("</p>")
        rec = res.get("recovery_held_out") or res.get("recovery")
        if rec:
            which = "held-out (test-split) structures" if res.get("recovery_held_out") else "all records"
            s.append(f"<p class='recovery'>Planted law: {html.escape(str(rec['law']))}. On {which}, predicted shift from each "
                     f"structure's lowest {html.escape(name)}: MAE <b>{rec['shift_mae']}</b> {html.escape(units)} over "
                     f"{rec['n']} records (true shifts SD {rec['true_shift_sd']}; the best structure-blind law: MAE "
                     f"{rec['structure_blind_mae']}; the noisy reference spectra themselves: {rec['reference_shift_mae']}"
                     f"), correlation {rec['correlation']}.</p>")
        levels = res["levels"]
        rows = []
        for c, row in sorted((res.get("clusters") or {}).items(), key=lambda kv: int(kv[0])):
            pred = row.get("predicted") or [None] * len(levels)
            ref = row.get("reference") or [None] * len(levels)
            cells = "".join(f"<td>{'' if p is None else f'{p:.3g}'} / {'' if r is None else f'{r:.3g}'}</td>"
                            for p, r in zip(pred, ref))
            rows.append(f"<tr><td>{c}</td><td>{row['size']}</td><td>{row.get('predicted_slope')}</td>"
                        f"<td>{row.get('reference_slope')}</td>{cells}</tr>")
        head = "".join(f"<th>{html.escape(name)} = {lv}</th>" for lv in levels)
        s.append(f"<table class='conditions'><thead><tr><th>cluster</th><th>records</th><th>slope (pred)</th>"
                 f"<th>slope (ref)</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
                 f"<p class='meta'>cells: mean predicted / reference {html.escape(feat)} at each level</p>")
    return "".join(s)
