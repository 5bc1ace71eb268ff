"""`spectrolens analyze`: descriptors -> Ward clusters per layer -> attribution -> probes -> report.

``run(cfg, run_dir)`` reads ``RUN_DIR/dataset.zarr`` and (when present) ``RUN_DIR/embeddings.zarr``
and writes ``RUN_DIR/analyze/``: attribution.json (schema: docs/report.md; clusters at the default
level, the explained Ward tree ``hierarchy`` and the ``drivers`` of each spectral feature), clusters.csv,
descriptors.csv, descriptor_failures.csv, linkage/<layer>.npy, figures/*.png|svg and
report/index.html. Without an embeddings store only the reference-spectra baseline is analysed.

This module loads the inputs (:func:`load_inputs`) and orchestrates (:func:`analyze_inputs`); the
per-layer analysis, the figures and the attribution.json assembly are steps of
:mod:`toolkit.analyze.steps`, each testable alone.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# constants and benchmark_recovery are re-exported: they were defined here before the split into steps
from toolkit.analyze.lazy import Spectra, rows_of
from toolkit.analyze.steps import (FIGURES, FIT_MAX, MIN_CLUSTER_FOR_RECOVERY, PREDICTED, REFERENCE,  # noqa: F401
                                   SPECTRUM_STEP, LayerResult, analyze_layer, assemble_attribution,
                                   benchmark_recovery, onset_of, write_comparison_figure, write_layer_figures)
from toolkit.errors import SpectrolensError
from toolkit.layout import RunLayout
from toolkit.runtime import task_log, write_json, write_text

log = logging.getLogger(__name__)


class AnalyzeError(SpectrolensError, RuntimeError):
    """Inputs that cannot be analysed (the message names the file and the fix)."""


def _dataset(run_dir: Path):
    from toolkit.data.store import DatasetReader, StoreError

    path = RunLayout(run_dir).dataset
    try:
        return DatasetReader(path)
    except StoreError as e:
        raise AnalyzeError(f"analyze needs a finished dataset store: {e}") from e


def structure_arrays(reader) -> Any:
    """All structures of the dataset as :class:`~toolkit.analyze.descriptors.StructureArrays`."""
    from toolkit.analyze.descriptors import StructureArrays

    nums, frac, lat, counts, ids = [], [], [], [], []
    for p in range(reader.n_parts):
        a = reader.read_part(p).arrays
        nums.append(a["numbers"])
        frac.append(a["frac_coords"])
        lat.append(a["lattice"])
        counts.append(a["natoms"])
        ids.extend(str(x) for x in a["ids"])
    if ids != [str(x) for x in reader.ids]:
        raise AnalyzeError(f"{reader.path}: part order does not match the index; re-run prepare's finalize")
    natoms = np.concatenate(counts).astype(np.int64)
    off = np.zeros(len(natoms) + 1, dtype=np.int64)
    np.cumsum(natoms, out=off[1:])
    return StructureArrays(ids, np.concatenate(nums), np.concatenate(frac), np.concatenate(lat), off)


def _dataset_hash(reader) -> str:
    from toolkit.analyze.descriptors import dataset_hash
    from toolkit.data.store import part_attrs

    return dataset_hash({"n": len(reader), "parts": [part_attrs(reader.path, p).get("checksum") for p in range(reader.n_parts)]})


def descriptors_for(cfg, run_dir: Path, reader, rows: np.ndarray, predicted: Any):
    """Descriptor table of dataset rows ``rows`` (cached per dataset), with reference and predicted
    spectral descriptors appended."""
    from toolkit.analyze.descriptors import DescriptorTable, add_spectral, build_table, structural_descriptors

    a = cfg.analyze
    h = _dataset_hash(reader)
    coord = a.coordination if a.coordination != "auto" else (
        "crystalnn" if len(reader) <= a.crystalnn_max_materials else "cutoff")
    if a.engine == "dask":  # issue 20: Dask tasks filled the cache (toolkit.analyze.engine); stream it block by block
        from toolkit.analyze.dask_steps import structural_table

        table, computed = structural_table(cfg, run_dir, reader, rows), 0
    else:
        arrays = structure_arrays(reader)
        first, of = _one_per_structure(reader)  # records of one structure at several conditions share descriptors
        if first is not None:
            arrays = arrays.subset(first)
        tag = f"{h}-{coord}" + ("-per-structure" if first is not None else "")
        recs, computed = structural_descriptors(arrays, RunLayout(run_dir).analyze_dir / "descriptor_cache" / tag,
                                                workers=a.workers, coordination=coord)
        if first is not None:
            ids = [str(x) for x in reader.ids]
            recs = [{**recs[of[i]], "id": ids[i]} for i in range(len(ids))]
        table = build_table([recs[i] for i in rows])
    from toolkit.data.targets import spec_of

    spec = spec_of(reader)
    if spec.kind != "absorption":  # features of other targets (toolkit.data.targets), reference and predicted
        ref = Spectra(reader, np.where(reader.has_spectrum[rows], rows, -1), spec.n_outputs)
        table = add_spectral(table, reader.energy, ref, spec=spec)
        table = add_spectral(table, reader.energy, predicted, prefix="pred:", spec=spec)
        return table, {"dataset_hash": h, "coordination": coord, "blocks_computed": computed}
    # reference spectral descriptors: as stored by prepare (same function, toolkit.data.spectra)
    stored = {"onset": reader.column("descriptors/onset", rows), "edge_integral": reader.column("descriptors/edge_integral", rows)}
    peaks = reader.column("descriptors/peaks", rows)
    stored["peak_1"], stored["peak_2"] = peaks[:, 0], peaks[:, 1]
    ref = np.column_stack([stored[k] for k in ("onset", "edge_integral", "peak_1", "peak_2")]).astype(np.float64)
    fails = list(table.failures)
    for j, k in enumerate(("onset", "edge_integral", "peak_1", "peak_2")):
        fails.extend((table.ids[i], k, "not defined for the reference spectrum (masked or no crossing/peak)")
                     for i in np.flatnonzero(~np.isfinite(ref[:, j])))
    table = DescriptorTable(table.ids, [*table.names, "onset", "edge_integral", "peak_1", "peak_2"],
                            np.hstack([table.values, ref]), fails)
    attrs = reader.attrs
    table = add_spectral(table, reader.energy, predicted, prefix="pred:",
                         threshold=float(attrs.get("onset_threshold", cfg.data.onset_threshold)),
                         transform=attrs.get("transform", "log10_alpha"),
                         log_floor=float(attrs.get("log_floor", cfg.data.log_floor)))
    return table, {"dataset_hash": h, "coordination": coord, "blocks_computed": computed}


def _one_per_structure(reader) -> tuple[np.ndarray | None, np.ndarray | None]:
    """For a dataset with conditions (several records per structure, ``group/structure_id``): the first
    row of each structure and, per row, the position of its structure among those; (None, None) otherwise."""
    if not reader.condition_names:
        return None, None
    try:
        keys = np.array([str(x) for x in reader.column("group/structure_id")])
    except Exception:  # noqa: BLE001 - no structure keys: every record is its own structure
        return None, None
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first)  # structures in dataset order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[inv]


def _layers(cfg, emb, any_spectrum: bool = True) -> list[str]:
    avail = list(emb.attrs.get("layers", [])) if emb is not None else []
    default = [*avail] + ([REFERENCE] if any_spectrum else []) + ([PREDICTED] if emb is not None else [])
    want = cfg.analyze.layers or default
    if not want:
        raise AnalyzeError("nothing to analyse: no embeddings.zarr in the run directory (run `spectrolens embed`) "
                           "and no material of dataset.zarr has a reference spectrum")
    ok = set(default)
    bad = [n for n in want if n not in ok]
    if bad:
        raise AnalyzeError(f"analyze.layers: {bad} not available; choose from {sorted(ok)}")
    return list(want)


def _features(name: str, cfg, emb, reference: Any, has_spec: np.ndarray):
    """(feature array-like, mask of population rows it covers)."""
    if name == REFERENCE:
        return rows_of(reference, has_spec), has_spec
    if name == PREDICTED:
        return emb["prediction"], np.ones(len(has_spec), bool)
    key = f"layers/{name}/{cfg.analyze.pooling}"
    if key not in emb:
        raise AnalyzeError(f"embeddings store has no {key}; embed with pooling {cfg.analyze.pooling!r} or change analyze.pooling")
    return emb[key], np.ones(len(has_spec), bool)


@dataclass
class Inputs:
    """Everything the analysis reads, aligned to the analysed population (embedding rows)."""

    run_dir: Path
    reader: Any
    emb: Any
    rows: np.ndarray  # dataset row of each analysed material
    ids: list[str]
    has_spec: np.ndarray
    energy: np.ndarray
    # (N, G) spectra as lazy row views (toolkit.analyze.lazy.Spectra: read in chunks, never held whole)
    reference: Spectra | None  # reference spectra (NaN = masked / none); None if no material has one
    predicted: Spectra | None  # model predictions
    table: Any  # DescriptorTable
    dinfo: dict[str, Any]
    # ensembles (embeddings.zarr prediction_std, toolkit.embed): per-point recalibrated σ (N, G), and the onset
    # interval {onset, onset_std, onset_low, onset_high} (N,) each; None for one model
    predicted_std: Spectra | None = None
    predicted_onset: dict[str, np.ndarray] | None = None

    def __post_init__(self):  # spectra as lazy row views (arrays given by tests and callers are wrapped)
        self.reference, self.predicted = Spectra.of(self.reference), Spectra.of(self.predicted)
        self.predicted_std = Spectra.of(self.predicted_std)


def load_inputs(cfg, run_dir: Path) -> Inputs:
    """Open the stores and compute (or load cached) descriptors."""
    run_dir = Path(run_dir)
    reader = _dataset(run_dir)
    emb = None
    if RunLayout(run_dir).embeddings.exists():
        from toolkit.embed.store import open_embeddings

        emb = open_embeddings(run_dir)
        rows = np.asarray(emb["index"][:], dtype=np.int64)
    else:
        log.warning("analyze: %s has no embeddings.zarr; analysing the reference spectra only", run_dir)
        rows = np.arange(len(reader), dtype=np.int64)
    # the spectra stay where they are (toolkit.analyze.lazy): each step reads the rows it needs, in chunks
    predicted = Spectra(emb["prediction"]) if emb is not None else None
    table, dinfo = descriptors_for(cfg, run_dir, reader, rows, predicted)
    has_spec = reader.has_spectrum[rows]
    reference = Spectra(reader, np.where(has_spec, rows, -1)) if has_spec.any() else None
    return Inputs(run_dir, reader, emb, rows, [str(x) for x in reader.ids[rows]], has_spec,
                  reader.energy, reference, predicted, table, dinfo, *_ensemble_uncertainty(emb))


def _ensemble_uncertainty(emb) -> tuple[np.ndarray | None, dict[str, np.ndarray] | None]:
    """(prediction_std, onset interval) of an ensemble's embeddings store; (None, None) for one model."""
    from toolkit.embed.store import ONSET_KEYS

    if emb is None or "prediction_std" not in emb:
        return None, None
    onset = {k.removeprefix("prediction_"): np.asarray(emb[k][:], dtype=np.float64) for k in ONSET_KEYS if k in emb}
    return Spectra(emb["prediction_std"]), (onset if len(onset) == len(ONSET_KEYS) else None)


def run(cfg, run_dir: Path) -> dict[str, Any]:
    """The analyze stage (one process; cfg.analyze.workers processes for descriptors). Logs to
    ``RUN_DIR/logs/analyze/job.log`` (local CLI and SLURM job alike)."""
    from toolkit.analyze.engine import engine  # issue 20: analyze.engine local | dask (docs/dask.md)

    with task_log(run_dir, "analyze", "job"), engine(cfg, run_dir):
        return analyze_inputs(cfg, load_inputs(cfg, run_dir))


def analyze_inputs(cfg, inp: Inputs) -> dict[str, Any]:
    """Cluster every selected layer, attribute, probe, and write attribution.json, clusters.csv,
    linkage files, figures and the report into ``RUN_DIR/analyze`` (steps: toolkit.analyze.steps)."""
    from toolkit.analyze import attribution as attr
    from toolkit.analyze import probes as prb
    from toolkit.analyze.report import render

    t0 = time.time()
    layer_names = _layers(cfg, inp.emb, bool(inp.has_spec.any()))  # validate before writing anything
    layout = RunLayout(inp.run_dir)
    out, figdir = layout.analyze_dir, layout.analyze_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    inp.table.write(out / "descriptors.csv", out / "descriptor_failures.csv")
    names, aliases = attr.dedupe_categorical(inp.table)
    targets = prb.probe_targets(inp.table)
    onset = onset_of(inp.table)
    # every layer's clustering that reads a Zarr array starts now as a Dask task (dask engine; the layers
    # then cluster side by side on the workers while the driver ranks the drivers); local engine: None
    started = _start_clusterings(cfg, inp, layer_names)
    drivers = None
    if cfg.analyze.drivers:
        from toolkit.analyze.drivers import rank_drivers

        t1 = time.time()
        drivers = rank_drivers(inp.table, names, seed=cfg.analyze.seed, max_rows=FIT_MAX)
        log.info("analyze: drivers of %d spectral features in %.1f s", len(drivers), time.time() - t1)
    signals = None
    if cfg.analyze.condense:
        from toolkit.analyze.signals import SignalIndex, importances, riders

        signals = SignalIndex(inp.table, names, riders(drivers), seed=cfg.analyze.seed, max_rows=FIT_MAX,
                              importance=importances(drivers))
    results: list[LayerResult] = []
    figures: dict[str, dict[str, str]] = {}
    # --- interactive maps (issue 21): toolkit.analyze.interactive, saved as analyze/interactive/<layer>.npz ---
    from toolkit.analyze import interactive

    formulas = inp.reader.column("formula", inp.rows)
    imaps: dict[str, dict] = {}
    # --- end interactive maps ---
    for name in layer_names:
        x, mask = _features(name, cfg, inp.emb, inp.reference, inp.has_spec)
        pre = started.get(name)
        lr = analyze_layer(cfg, inp, name, x, mask, names, targets, signals,
                           clustering=pre.result() if pre is not None else None)
        if lr is None:
            continue
        results.append(lr)
        _write_linkage(out / "linkage", lr)
        figures[name] = write_layer_figures(lr, inp.energy, onset, figdir)
        m = interactive.from_layer(lr, inp, formulas, max_points=cfg.analyze.interactive_max_points, seed=cfg.analyze.seed)
        if m is not None:  # interactive map (issue 21)
            imaps[name] = interactive.save(out / "interactive", m)
    result = assemble_attribution(cfg, inp, results, names, aliases, truth=inp.reader.attrs.get("benchmark_truth"),
                                  drivers=drivers)
    result["novelty"] = _novelty(cfg, inp, formulas, out)
    cond = _conditions(inp, results)
    if cond is not None:
        result["conditions"] = cond
    figures["_global"] = write_comparison_figure(result["layer_comparison"]["ami_vs_reference"], result["probes"], figdir)
    write_json(layout.attribution, result)
    _write_clusters(out / "clusters.csv", inp.ids, inp.reader, inp.rows, {lr.name: lr.labels for lr in results})
    experiment = _experiment(cfg, inp, formulas)
    render(result, figures, layout.report, f"spectrolens analysis: {inp.run_dir.name}", explain=_explain(inp.run_dir),
           interactive=imaps, experiment=experiment)
    chem = _chemiscope(cfg, inp, results, formulas)  # issue 21: analyze/chemiscope.json.gz
    log.info("analyze: done in %.1f s -> %s", time.time() - t0, out)
    log.info("%s", _summary(layout, results, chem))
    return result


def _start_clusterings(cfg, inp: Inputs, layer_names: list[str]) -> dict[str, Any]:
    """{layer: :class:`~toolkit.analyze.engine.Deferred` clustering} for the layers whose features the
    Dask workers can read themselves (Zarr arrays; :func:`toolkit.analyze.engine.shippable`) when the
    stage runs on the dask engine; empty under the local engine (each layer clusters in turn)."""
    from toolkit.analyze.clustering import cluster
    from toolkit.analyze.engine import Deferred, current_client, shippable
    from toolkit.analyze.steps import cluster_kwargs

    if current_client() is None:
        return {}
    out = {}
    for name in layer_names:
        x, mask = _features(name, cfg, inp.emb, inp.reference, inp.has_spec)
        if shippable(x) and mask.sum() >= 3:
            out[name] = Deferred(cluster, (x,), cluster_kwargs(cfg.analyze), chunk_tasks=True)
    if out:
        log.info("analyze: clustering %s as Dask tasks", ", ".join(out))
    return out


def _novelty(cfg, inp: Inputs, formulas, out: Path) -> dict[str, Any]:
    """Distance of every material's readout embedding to the training data (:mod:`toolkit.analyze.novelty`);
    the ratios go to ``analyze/novelty.csv``, the summary to attribution.json ``novelty``."""
    from toolkit.analyze.novelty import far_from_training, split_masks

    key = f"layers/readout/{cfg.analyze.pooling}"
    if inp.emb is None or key not in inp.emb:
        return {"available": False, "reason": f"no {key} in embeddings.zarr"}
    train, val, source = split_masks(inp.run_dir, inp.ids, inp.has_spec)
    nov, ratio = far_from_training(np.asarray(inp.emb[key][...]), train, inp.ids, [str(f) for f in formulas],
                                   factor=cfg.analyze.novelty_factor, seed=cfg.analyze.seed, val=val,
                                   quantile=cfg.analyze.novelty_quantile)
    nov["training_from"] = source
    if ratio is not None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", "formula", "training", "distance_ratio", "far"])
        for i, (mid, t, r) in enumerate(zip(inp.ids, train, ratio)):
            w.writerow([mid, formulas[i], int(t), f"{r:.4f}", int(r > nov["factor"])])
        write_text(out / "novelty.csv", buf.getvalue())
        log.info("analyze: %d of %d materials outside the training split are far from it (readout distance > %.3g x "
                 "the typical nearest-neighbour distance; threshold: %s) -> %s", nov["n_far"], nov["n_other"],
                 nov["factor"], nov["threshold_method"], out / "novelty.csv")
    return nov


def _conditions(inp: Inputs, results: list[LayerResult]) -> dict[str, Any] | None:
    """attribution.json ``conditions`` (:mod:`toolkit.analyze.conditions`) for a dataset with conditions."""
    from toolkit.analyze.conditions import condition_response
    from toolkit.analyze.steps import headline_feature

    names = getattr(inp.reader, "condition_names", ())
    feat = headline_feature(inp.table)
    if not names or feat is None:
        return None
    try:
        groups = np.array([str(x) for x in inp.reader.column("group/structure_id", inp.rows)])
    except Exception:  # noqa: BLE001 - no structure keys: every record its own structure
        groups = np.array([str(x) for x in inp.ids])
    values = {c: inp.reader.column(f"conditions/{c}", inp.rows).astype(np.float64) for c in names}
    layer = next((lr for lr in results if lr.name == "readout"), results[0] if results else None)
    pred = inp.table.column(f"pred:{feat}") if f"pred:{feat}" in inp.table.names else None
    truth = inp.reader.attrs.get("benchmark_truth")
    true_shift = None
    if isinstance(truth, dict) and truth.get("conditions"):
        try:
            true_shift = inp.reader.column("benchmark/onset_shift", inp.rows).astype(np.float64)
            true_shift = true_shift - _lowest_shift(values[names[0]], groups, true_shift)
        except Exception:  # noqa: BLE001
            true_shift = None
    held_out = None
    split = RunLayout(inp.run_dir).train_dir / "split.json"
    if split.is_file():
        test = set(json.loads(split.read_text()).get("test", []))
        held_out = np.array([i in test for i in inp.ids])
    out = condition_response(tuple(names), values, groups, inp.table.column(feat), pred,
                             layer.labels if layer is not None else None, feat, layer.name if layer else None,
                             truth if isinstance(truth, dict) else None, true_shift, held_out)
    for name, res in out["conditions"].items():
        rec = res.get("recovery_held_out") or res.get("recovery")
        log.info("analyze: %s along %s: pooled slope %s (reference %s)%s", feat, name, res.get("predicted_slope"),
                 res.get("reference_slope"), f"; planted-law shift MAE {rec['shift_mae']} (structure-blind law "
                 f"{rec['structure_blind_mae']})" if rec else "")
    return out


def _lowest_shift(x: np.ndarray, groups: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Each record's group's planted shift at the group's lowest condition value (so shifts count from there)."""
    out = np.zeros(len(x))
    for g in np.unique(groups):
        m = np.flatnonzero(groups == g)
        out[m] = shift[m[np.argmin(x[m])]]
    return out


EXPERIMENT_FRAGMENT = "experiment/fragment.html"  # under analyze/: the report's comparison section, kept for re-renders


def _experiment(cfg, inp: Inputs, formulas) -> str | None:
    """``analyze.compare_experiment``: the predicted spectra of the run's materials against measured
    refractiveindex.info spectra of the same reduced formula (:func:`toolkit.predict.experiment.
    compare_spectra`), written under ``analyze/experiment/`` (table, figures, the report's fragment);
    None when not asked or no predictions."""
    from toolkit.predict.experiment import compare_spectra

    out = RunLayout(inp.run_dir).analyze_dir / "experiment"
    frag = RunLayout(inp.run_dir).analyze_dir / EXPERIMENT_FRAGMENT
    frag.unlink(missing_ok=True)  # never keep an earlier analysis' comparison
    ref = cfg.analyze.compare_experiment
    if ref is None:
        return None
    if inp.predicted is None:
        log.warning("analyze: analyze.compare_experiment is set but the run has no predicted spectra (embed first)")
        return None
    attrs = inp.reader.attrs
    pred_onset = inp.table.column("pred:onset") if "pred:onset" in inp.table.names else None
    comp = compare_spectra([str(i) for i in inp.ids], [str(f) for f in formulas], inp.energy, inp.predicted,
                           ref, onset=pred_onset if pred_onset is not None else np.full(len(inp.ids), np.nan),
                           transform=attrs.get("transform", "log10_alpha"),
                           log_floor=float(attrs.get("log_floor", cfg.data.log_floor)),
                           threshold=float(attrs.get("onset_threshold", cfg.data.onset_threshold)), out_dir=out)
    write_text(frag, comp.html)
    log.info("analyze: %d predicted-vs-measured matches (%d measured pages) -> %s", len(comp.rows),
             comp.n_references, out)
    return comp.html


def _chemiscope(cfg, inp: Inputs, results: list[LayerResult], formulas) -> Path | None:
    """``analyze/chemiscope.json.gz`` (toolkit.analyze.chemiscope_export) as ``analyze.chemiscope`` says:
    true (the package must be installed), false, "auto" (when installed). The path, or None."""
    from toolkit.analyze import chemiscope_export

    want = cfg.analyze.chemiscope
    path = RunLayout(inp.run_dir).analyze_dir / "chemiscope.json.gz"
    if want is False or (want == "auto" and not chemiscope_export.available()):
        if want == "auto":
            log.info("analyze: chemiscope not installed; no chemiscope.json.gz (pip install chemiscope)")
        path.unlink(missing_ok=True)  # never leave an earlier analysis' file beside this one's results
        return None
    if not chemiscope_export.available():
        raise AnalyzeError("analyze.chemiscope is true but the chemiscope package is not installed: "
                           "pip install chemiscope (or set analyze.chemiscope=false)")
    t = time.time()
    a = cfg.analyze
    chemiscope_export.write(path, inp, results, formulas, title=f"spectrolens: {inp.run_dir.name}",
                            max_materials=a.chemiscope_max_materials, seed=a.seed)
    log.info("analyze: chemiscope dataset of %d of %d materials in %.1f s",
             min(len(inp.ids), a.chemiscope_max_materials), len(inp.ids), time.time() - t)
    return path


def _summary(layout: RunLayout, results: list[LayerResult], chem: Path | None) -> str:
    """What analyze wrote and where: one screen."""
    out = layout.analyze_dir
    rows = [("report", layout.report, "open in a browser (works offline)"),
            ("attribution", layout.attribution, "every number of the report (schema: docs/report.md)"),
            ("clusters", out / "clusters.csv", "cluster of every material per clustering"),
            ("descriptors", out / "descriptors.csv", "and descriptor_failures.csv"),
            ("figures", out / "figures", "PNG + SVG per clustering"),
            ("maps", out / "interactive", "data of the report's interactive maps"),
            ("chemiscope", chem, "chemiscope.show_input(path) or https://chemiscope.org" if chem else
             "not written (analyze.chemiscope)")]
    lines = [f"analyze: wrote {len(results)} clusterings ({', '.join(lr.name for lr in results)}):"]
    lines += [f"  {k:<12} {p if p is not None else '-'}  [{what}]" for k, p, what in rows]
    return "\n".join(lines)


def _explain(run_dir: Path) -> dict | None:
    """The explain stage's tables when it has completed in ``run_dir`` (else None)."""
    if not RunLayout(run_dir).is_complete("explain"):
        return None
    from toolkit.explain.stage import explain_summary_for_report

    return explain_summary_for_report(run_dir)


def rerender_report(run_dir: Path) -> Path | None:
    """Render ``analyze/report/index.html`` again from attribution.json, the saved figures and the explain
    stage's results (called when explain finishes after analyze); None when analyze has not run."""
    from toolkit.analyze.figures import png_data_uri
    from toolkit.analyze.report import render

    layout = RunLayout(run_dir)
    if not layout.attribution.is_file():
        return None
    result = json.loads(layout.attribution.read_text())
    figdir = layout.analyze_dir / "figures"

    def uri(name: str) -> str | None:
        p = figdir / f"{name}.png"
        return png_data_uri(p.read_bytes()) if p.is_file() else None

    figures = {n: {k: u for k in FIGURES if (u := uri(f"{n}_{k}"))} for n in result["layers"]}
    if (u := uri("layer_comparison")) is not None:
        figures["_global"] = {"layers": u}
    from toolkit.analyze.interactive import load_all  # interactive maps (issue 21)

    frag = layout.analyze_dir / EXPERIMENT_FRAGMENT
    return render(result, figures, layout.report, f"spectrolens analysis: {Path(run_dir).name}",
                  explain=_explain(Path(run_dir)), interactive=load_all(layout.analyze_dir / "interactive", list(result["layers"])),
                  experiment=frag.read_text() if frag.is_file() else None)


def _write_linkage(linkage_dir: Path, lr: LayerResult) -> None:
    """``linkage/<layer>.npy`` (scipy linkage) and, in scalable mode, ``<layer>.leaf_of.npy``."""
    linkage_dir.mkdir(parents=True, exist_ok=True)
    np.save(linkage_dir / f"{lr.name}.npy", lr.clustering.linkage)
    if lr.clustering.mode == "scalable":
        np.save(linkage_dir / f"{lr.name}.leaf_of.npy", lr.clustering.leaf_of)


def _write_clusters(path: Path, ids: list[str], reader, rows: np.ndarray, labels: dict[str, np.ndarray]) -> None:
    formula = reader.column("formula", rows)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "formula", *labels])
        for i, mid in enumerate(ids):
            w.writerow([mid, str(formula[i]), *(int(v[i]) for v in labels.values())])
    tmp.replace(path)
