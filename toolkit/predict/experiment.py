"""Predicted vs measured absorption: match materials to refractiveindex.info spectra by reduced formula.

Reusable by any stage that has predicted spectra on a grid (``predict --compare-experiment``; the
analyze report can embed the same fragment): :func:`compare_spectra` takes arrays and returns a
:class:`Comparison` with one row per (material, measured page) match, the figures, and an HTML
fragment (a ``<section>`` with the table and the figures inlined as PNG data URIs, no external files).

Measured spectra come from :func:`toolkit.data.readers.refractiveindex.load_references` (α = 4πk/λ,
E = hc/λ) and are matched with :func:`~toolkit.data.readers.refractiveindex.match_references`.
A measured spectrum is put on the model's grid the way prepare does it (transform, then resample
without extrapolation), so the measured onset uses the same rule and threshold as the predicted one
(:func:`toolkit.data.spectra.onset_energy`). A measurement that starts above the threshold has no
onset in its range (NaN, said in ``note``). Every row gives the energy range each side covers:
the measurement's own range, the model grid, and their overlap, where ``spectrum_mae`` (mean
|predicted − measured| in stored units) is computed.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.data.readers.refractiveindex import load_references, match_references
from toolkit.data.spectra import apply_transform, onset_energy, resample, to_log10

COLUMNS = ("id", "formula", "reference", "reference_file", "measured_min_eV", "measured_max_eV", "grid_min_eV",
           "grid_max_eV", "overlap_min_eV", "overlap_max_eV", "overlap_points", "onset_pred_eV", "onset_low_eV",
           "onset_high_eV", "onset_measured_eV", "onset_diff_eV", "spectrum_mae", "note")


@dataclass
class Comparison:
    rows: list[dict]  # one per (material, measured page), COLUMNS
    html: str  # a self-contained <section> fragment
    figures: list[Path] = field(default_factory=list)
    n_references: int = 0  # usable measured pages read
    unmatched_formulas: list[str] = field(default_factory=list)  # predicted formulas without a measurement


def _f(x: float) -> float:
    return float(x) if x is not None and np.isfinite(x) else float("nan")


def compare_spectra(ids: list[str], formulas: list[str], energy: np.ndarray, spectrum: np.ndarray,
                    references: str | Path, *, onset: np.ndarray, onset_low: np.ndarray | None = None,
                    onset_high: np.ndarray | None = None, spectrum_std: np.ndarray | None = None,
                    transform: str = "log10_alpha", log_floor: float = 2.0, threshold: float = 4.0,
                    out_dir: str | Path | None = None, title: str = "Predicted vs measured absorption") -> Comparison:
    """Match predicted spectra (``spectrum`` (N, G) on ``energy``, stored units) to measured pages under
    ``references`` (a refractiveindex.info database folder) by reduced formula. ``out_dir``: also write
    ``comparison.csv``, ``figures/<id>.png`` and ``index.html`` there."""
    refs, _ = load_references(references)
    energy = np.asarray(energy, dtype=np.float64)
    n = len(ids)
    lo = onset_low if onset_low is not None else np.full(n, np.nan)
    hi = onset_high if onset_high is not None else np.full(n, np.nan)
    matched = match_references(list(formulas), refs) if n else {}
    rows: list[dict] = []
    curves: dict[int, list] = {}
    hit = np.array([i for i in range(n) if matched.get(formulas[i])], dtype=np.int64)
    # the matched rows only, in one read: ``spectrum`` may be a lazy view of millions (toolkit.analyze.lazy)
    pred = dict(zip(hit.tolist(), np.asarray(spectrum[hit], dtype=np.float64))) if len(hit) else {}
    for i in hit.tolist():
        for ref in matched[formulas[i]]:
            y_ref = apply_transform(ref.alpha, transform, log_floor)
            on_grid = resample(ref.energy, y_ref, energy)
            ok = np.isfinite(on_grid) & np.isfinite(pred[i])
            m_on = onset_energy(energy, to_log10(on_grid, transform, log_floor), threshold)
            note = ""
            if not ok.any():
                note = "measured range does not overlap the model grid"
            elif not np.isfinite(m_on):
                note = ("measured spectrum is above the threshold from its first point: onset below the measured range"
                        if np.nanmin(to_log10(on_grid, transform, log_floor)) >= threshold
                        else "measured spectrum never reaches the threshold")
            emin, emax = float(ref.energy[0]), float(ref.energy[-1])
            ov = energy[ok]
            rows.append({"id": ids[i], "formula": formulas[i], "reference": f"{ref.material}/{ref.metadata['page']}",
                         "reference_file": ref.metadata["file"], "measured_min_eV": emin, "measured_max_eV": emax,
                         "grid_min_eV": float(energy[0]), "grid_max_eV": float(energy[-1]),
                         "overlap_min_eV": float(ov[0]) if ov.size else float("nan"),
                         "overlap_max_eV": float(ov[-1]) if ov.size else float("nan"), "overlap_points": int(ok.sum()),
                         "onset_pred_eV": _f(onset[i]), "onset_low_eV": _f(lo[i]), "onset_high_eV": _f(hi[i]),
                         "onset_measured_eV": _f(m_on), "onset_diff_eV": _f(onset[i]) - _f(m_on),
                         "spectrum_mae": float(np.mean(np.abs(pred[i][ok] - on_grid[ok]))) if ok.any() else float("nan"),
                         "note": note})
            curves.setdefault(i, []).append((ref, y_ref, m_on))
    figs: list[tuple[str, bytes]] = []
    for i, refs_i in curves.items():
        figs.append((ids[i], _figure(energy, pred[i], None if spectrum_std is None else spectrum_std[i],
                                     _f(onset[i]), ids[i], formulas[i], refs_i, transform, threshold)))
    comp = Comparison(rows=rows, html=_html(rows, figs, title, len(refs)), n_references=len(refs),
                      unmatched_formulas=sorted({f for f in formulas if f not in matched}))
    if out_dir is not None:
        comp.figures = write_comparison(comp, figs, Path(out_dir))
    return comp


def compare_experiment(res: dict, pred, references: str | Path, out_dir: str | Path) -> Comparison:
    """:func:`compare_spectra` of a predict result (:func:`toolkit.predict.stage.load_result`)."""
    return compare_spectra(res["ids"], res["formula"], res["energy"], np.asarray(res["spectrum"]), references,
                           onset=res["onset"], onset_low=res["onset_low"], onset_high=res["onset_high"],
                           spectrum_std=np.asarray(res["spectrum_std"]) if res["n_members"] > 1 else None,
                           transform=pred.transform, log_floor=pred.log_floor, threshold=pred.onset_threshold,
                           out_dir=out_dir)


def _figure(energy, y, sd, onset, mid, formula, refs, transform, threshold) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
    ax.plot(energy, y, color="C0", lw=1.3, label="predicted")
    if sd is not None and np.isfinite(sd).any():
        ax.fill_between(energy, y - 2 * sd, y + 2 * sd, color="C0", alpha=0.25, lw=0, label="±2σ")
    if np.isfinite(onset):
        ax.axvline(onset, color="C0", ls="--", lw=0.9)
    for k, (ref, y_ref, m_on) in enumerate(refs):
        c = f"C{(k + 1) % 10}"
        ax.plot(ref.energy, y_ref, color=c, lw=1.1, label=f"measured {ref.metadata['page']}"[:40])
        ax.axvspan(max(ref.energy[0], energy[0]), min(ref.energy[-1], energy[-1]), color=c, alpha=0.06, lw=0)
        if np.isfinite(m_on):
            ax.axvline(m_on, color=c, ls=":", lw=0.9)
    if transform == "log10_alpha":
        ax.axhline(threshold, color="0.6", lw=0.7, ls=":")
    ax.set_xlim(energy[0], energy[-1])  # the model's grid; each measured range is in the table (and shaded here)
    ax.set_title(f"{mid} ({formula})", fontsize=9)
    ax.set_xlabel("photon energy (eV)", fontsize=8)
    ax.set_ylabel("log10 α (cm$^{-1}$)" if transform == "log10_alpha" else "α (cm$^{-1}$)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if not np.isfinite(v) else f"{v:.3f}"
    return html.escape(str(v))


def _html(rows: list[dict], figs: list[tuple[str, bytes]], title: str, n_refs: int) -> str:
    shown = ("id", "formula", "reference", "measured_min_eV", "measured_max_eV", "overlap_min_eV", "overlap_max_eV",
             "onset_pred_eV", "onset_low_eV", "onset_high_eV", "onset_measured_eV", "onset_diff_eV", "spectrum_mae", "note")
    diffs = [r["onset_diff_eV"] for r in rows if np.isfinite(r["onset_diff_eV"])]
    head = (f"<p>{len(rows)} match(es) of predicted materials with {n_refs} measured refractiveindex.info page(s) by "
            f"reduced formula; onset difference = predicted − measured"
            + (f", mean |difference| {np.mean(np.abs(diffs)):.3f} eV over {len(diffs)} match(es) with both onsets"
               if diffs else "") + ". Energy ranges: what each measurement covers and its overlap with the model grid.</p>")
    table = ["<table class='experiment'><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in shown)
             + "</tr></thead><tbody>"]
    for r in rows:
        table.append("<tr>" + "".join(f"<td>{_cell(r[c])}</td>" for c in shown) + "</tr>")
    table.append("</tbody></table>")
    imgs = "".join(f"<figure><img alt='{html.escape(m)}' src='data:image/png;base64,"
                   f"{base64.b64encode(png).decode()}'/><figcaption>{html.escape(m)}</figcaption></figure>"
                   for m, png in figs)
    return (f"<section class='experiment-comparison'><h2>{html.escape(title)}</h2>{head}{''.join(table)}"
            f"<div class='figures'>{imgs}</div></section>")


def write_comparison(comp: Comparison, figs: list[tuple[str, bytes]], out_dir: Path) -> list[Path]:
    """``comparison.csv``, ``figures/<id>.png`` and a standalone ``index.html`` in ``out_dir``."""
    from toolkit.predict.figures import safe_name
    from toolkit.runtime import atomic_write, write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    w.writeheader()
    for r in comp.rows:
        w.writerow({k: ("" if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()})
    write_text(out_dir / "comparison.csv", buf.getvalue())
    paths = []
    for mid, png in figs:
        p = out_dir / "figures" / f"{safe_name(mid)}.png"
        atomic_write(p, lambda fh, png=png: fh.write(png))
        paths.append(p)
    write_text(out_dir / "index.html", f"<!doctype html><html><head><meta charset='utf-8'><title>experiment</title>"
                                       f"</head><body>{comp.html}</body></html>")
    return paths
