"""`spectrolens analyze`: descriptors -> Ward clusters per layer -> attribution -> probes -> report.

``run(cfg, run_dir)`` reads ``RUN_DIR/dataset.zarr`` and (when present) ``RUN_DIR/embeddings.zarr``
and writes ``RUN_DIR/analyze/``: attribution.json (schema: docs/report.md), clusters.csv,
descriptors.csv, descriptor_failures.csv, linkage/<layer>.npy, figures/*.png|svg and
report/index.html. Without an embeddings store only the reference-spectra baseline is analysed.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REFERENCE = "spectrum_reference"
PREDICTED = "spectrum_predicted"
MIN_CLUSTER_FOR_RECOVERY = 5
FIT_MAX = 20_000  # surrogate classifier and probes are fitted on at most this many materials
SPECTRUM_STEP = 10  # spectral summaries in attribution.json keep every 10th grid point


class AnalyzeError(RuntimeError):
    """Inputs that cannot be analysed (the message names the file and the fix)."""


def _dataset(run_dir: Path):
    from toolkit.data.store import DatasetReader, StoreError

    path = run_dir / "dataset.zarr"
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


def descriptors_for(cfg, run_dir: Path, reader, rows: np.ndarray, predicted: np.ndarray | None):
    """Descriptor table of dataset rows ``rows`` (cached per dataset), with reference and predicted
    spectral descriptors appended."""
    from toolkit.analyze.descriptors import DescriptorTable, add_spectral, build_table, structural_descriptors

    a = cfg.analyze
    h = _dataset_hash(reader)
    coord = a.coordination if a.coordination != "auto" else (
        "crystalnn" if len(reader) <= a.crystalnn_max_materials else "cutoff")
    recs, computed = structural_descriptors(structure_arrays(reader), run_dir / "analyze" / "descriptor_cache" / f"{h}-{coord}",
                                            workers=a.workers, coordination=coord)
    table = build_table([recs[i] for i in rows])
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


def _features(name: str, cfg, emb, reference: np.ndarray | None, has_spec: np.ndarray):
    """(feature array-like, mask of population rows it covers)."""
    if name == REFERENCE:
        return reference[has_spec], has_spec
    if name == PREDICTED:
        return emb["prediction"], np.ones(len(has_spec), bool)
    key = f"layers/{name}/{cfg.analyze.pooling}"
    if key not in emb:
        raise AnalyzeError(f"embeddings store has no {key}; embed with pooling {cfg.analyze.pooling!r} or change analyze.pooling")
    return emb[key], np.ones(len(has_spec), bool)


def _ranked_json(rs: list[dict], aliases: dict[str, list[str]], top: int = 25) -> list[dict]:
    out = []
    for r in rs[:top]:
        d = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items() if k != "p"}
        d["p"] = r["p"]
        d["aliases"] = aliases.get(r["descriptor"], [])
        out.append(d)
    return out


def benchmark_recovery(truth: dict, layers: dict[str, dict], k: int = 3) -> dict[str, Any]:
    """precision@k of planted drivers among each cluster's top-k descriptors (clusters with at least
    MIN_CLUSTER_FOR_RECOVERY materials), mean per clustering; overall = mean over clusterings;
    ``chance`` = precision of a random ranking (share of tested descriptors that match a driver)."""
    from toolkit.analyze.attribution import matches, precision_at_k

    drivers: list[str] = []
    for feat in truth.get("features", {}).values():
        for d in feat.get("drivers", []):
            if d not in drivers:
                drivers.append(d)
    per: dict[str, Any] = {}
    for name, L in layers.items():
        precs = {}
        for c, cl in L["clusters"].items():
            if cl["size"] >= MIN_CLUSTER_FOR_RECOVERY:
                ranked = cl["descriptors"]
                precs[c] = precision_at_k(ranked, drivers, {r["descriptor"]: r["aliases"] for r in ranked}, k)
        # chance level: share of the tested (deduplicated) descriptors that match a driver
        tested = L.get("tested", [])
        chance = float(np.mean([any(matches(n, t, L["aliases"].get(n, [])) for t in drivers) for n in tested])) if tested else None
        per[name] = {"precision": float(np.mean(list(precs.values()))) if precs else 0.0, "per_cluster": precs,
                     "chance": chance}
    vals = [v["precision"] for v in per.values()]
    best = max(per, key=lambda n: per[n]["precision"]) if per else None
    return {"k": k, "drivers": drivers, "per_layer": per, "overall": float(np.mean(vals)) if vals else 0.0,
            "best_layer": best, "min_cluster_size": MIN_CLUSTER_FOR_RECOVERY}


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
    reference: np.ndarray | None  # (N, G) float32 reference spectra (NaN = masked / none); None if no material has one
    predicted: np.ndarray | None  # (N, G) float32 model predictions
    table: Any  # DescriptorTable
    dinfo: dict[str, Any]


def load_inputs(cfg, run_dir: Path) -> Inputs:
    """Open the stores and compute (or load cached) descriptors."""
    run_dir = Path(run_dir)
    reader = _dataset(run_dir)
    emb = None
    if (run_dir / "embeddings.zarr").exists():
        from toolkit.embed.store import open_embeddings

        emb = open_embeddings(run_dir)
        rows = np.asarray(emb["index"][:], dtype=np.int64)
    else:
        log.warning("analyze: %s has no embeddings.zarr; analysing the reference spectra only", run_dir)
        rows = np.arange(len(reader), dtype=np.int64)
    predicted = np.asarray(emb["prediction"][:], dtype=np.float32) if emb is not None else None
    table, dinfo = descriptors_for(cfg, run_dir, reader, rows, predicted)
    has_spec = reader.has_spectrum[rows]
    reference = None
    if has_spec.any():  # read only the rows that have a spectrum
        reference = np.full((len(rows), len(reader.energy)), np.nan, dtype=np.float32)
        reference[has_spec] = reader.column("spectrum", rows[has_spec])
    return Inputs(run_dir, reader, emb, rows, [str(x) for x in reader.ids[rows]], has_spec,
                  reader.energy, reference, predicted, table, dinfo)


def run(cfg, run_dir: Path) -> dict[str, Any]:
    """The analyze stage (one process; cfg.analyze.workers processes for descriptors). Logs to
    ``RUN_DIR/logs/analyze/job.log`` (local CLI and SLURM job alike)."""
    from toolkit.hpc.stages import task_log

    with task_log(run_dir, "analyze", "job"):
        return analyze_inputs(cfg, load_inputs(cfg, run_dir))


def analyze_inputs(cfg, inp: Inputs) -> dict[str, Any]:
    """Cluster every selected layer, attribute, probe, and write attribution.json, clusters.csv,
    figures and the report into ``RUN_DIR/analyze``."""
    from sklearn.metrics import adjusted_mutual_info_score

    from toolkit.analyze import attribution as attr
    from toolkit.analyze import figures as figs
    from toolkit.analyze import probes as prb
    from toolkit.analyze.clustering import cluster
    from toolkit.analyze.descriptors import DescriptorTable
    from toolkit.analyze.report import cluster_summary, render

    t0 = time.time()
    run_dir, reader, emb, rows, ids, has_spec = inp.run_dir, inp.reader, inp.emb, inp.rows, inp.ids, inp.has_spec
    table, energy, reference, predicted = inp.table, inp.energy, inp.reference, inp.predicted
    layer_names = _layers(cfg, emb, bool(has_spec.any()))  # validate before writing anything
    out = run_dir / "analyze"
    out.mkdir(parents=True, exist_ok=True)
    a = cfg.analyze
    table.write(out / "descriptors.csv", out / "descriptor_failures.csv")
    onset = table.column("onset") if "onset" in table.names else np.full(len(ids), np.nan)
    names, aliases = attr.dedupe_categorical(table)
    figdir = out / "figures"
    figures: dict[str, dict[str, str]] = {}
    layers_out: dict[str, dict] = {}
    labels_all: dict[str, np.ndarray] = {}
    probes: dict[str, dict] = {}
    targets = prb.probe_targets(table)
    for name in layer_names:
        x, mask = _features(name, cfg, emb, reference, has_spec)
        if mask.sum() < 3:
            log.warning("analyze: %s covers %d materials; skipped", name, int(mask.sum()))
            continue
        res = cluster(x, n_clusters=a.n_clusters, max_clusters=a.max_clusters, standardize=a.standardize,
                      pca_components=a.pca_components, scalable_threshold=a.scalable_threshold,
                      n_micro=a.micro_clusters, seed=a.seed, threads=a.workers)
        labels = np.full(len(rows), -1, dtype=np.int32)
        labels[mask] = res.labels
        labels_all[name] = labels
        sub = (DescriptorTable(ids, table.names, table.values, []) if mask.all() else  # no N x D copy
               DescriptorTable([i for i, m in zip(ids, mask) if m], table.names, table.values[mask], []))
        ranked = attr.enrichment(res.labels, sub, names)
        n_tests = sum(len(v) for v in ranked.values())
        cand: list[str] = []
        for rs in ranked.values():
            cand += [r["descriptor"] for r in rs[:10] if r["q"] < attr.ALPHA and r["descriptor"] not in cand]
        fit_rows = _subsample(len(sub.ids), a.seed)
        fit_sub = DescriptorTable([sub.ids[i] for i in fit_rows], sub.names, sub.values[fit_rows], [])
        surrogate = attr.surrogate_importance(res.labels[fit_rows], fit_sub, cand[:60], a.permutation_repeats, a.seed)
        sig = attr.spectral_signature(res.labels, energy, reference[mask] if reference is not None else None,
                                      predicted[mask] if predicted is not None else None, onset[mask])
        enrich_el = attr.element_enrichment(res.labels, sub)
        member_ids = np.array(sub.ids)
        clusters = {}
        for c in sorted(ranked):
            s = sig[c]
            spec = {k: {"mean": _ds(s[k]["mean"]), "std": _ds(s[k]["std"])} for k in ("reference", "predicted") if k in s}
            clusters[str(c)] = {"size": int(s["size"]), "members": member_ids[res.labels == c].tolist(),
                                "summary": cluster_summary(c, s["size"], s.get("onset"), ranked[c]),
                                "spectral": {"onset": s.get("onset"), **spec},
                                "descriptors": _ranked_json(ranked[c], aliases)}
        (out / "linkage").mkdir(exist_ok=True)
        np.save(out / "linkage" / f"{name}.npy", res.linkage)
        if res.mode == "scalable":
            np.save(out / "linkage" / f"{name}.leaf_of.npy", res.leaf_of)
        layers_out[name] = {"clustering": res.summary(), "linkage_file": f"linkage/{name}.npy", "n_tests": n_tests,
                            "tested": names, "aliases": {k: v for k, v in aliases.items() if v},
                            "clusters": clusters, "surrogate": surrogate, "coverage": int(mask.sum())}
        f = {}
        f["dendrogram"] = figs.save(figs.dendrogram(res.linkage, res.n_clusters, name), figdir, f"{name}_dendrogram")["data_uri"]
        f["map"] = figs.save(figs.embedding_map(res.coords, res.labels, onset[mask], name), figdir, f"{name}_map")["data_uri"]
        f["spectra"] = figs.save(figs.cluster_spectra(energy, sig, name), figdir, f"{name}_spectra")["data_uri"]
        f["enrichment"] = figs.save(figs.enrichment_heatmap(ranked, name), figdir, f"{name}_enrichment")["data_uri"]
        f["elements"] = figs.save(figs.element_maps(enrich_el, name), figdir, f"{name}_elements")["data_uri"]
        figures[name] = f
        feats = np.asarray(x.oindex[fit_rows] if hasattr(x, "oindex") else x[fit_rows], dtype=np.float32)
        probes[name] = prb.probe_layer(feats, fit_sub, targets, folds=a.probe_folds, seed=a.seed)
        log.info("analyze: %s -> %d clusters (%s)", name, res.n_clusters, res.mode)
    # layer comparison
    for base, key in ((REFERENCE, "ami_reference"), (PREDICTED, "ami_predicted")):
        for name, lab in labels_all.items():
            if base in labels_all:
                both = (lab >= 0) & (labels_all[base] >= 0)
                layers_out[name][key] = float(adjusted_mutual_info_score(labels_all[base][both], lab[both]))
            else:
                layers_out[name][key] = None
    ami = {n: L["ami_reference"] for n, L in layers_out.items() if L.get("ami_reference") is not None}
    figures["_global"] = {"layers": figs.save(figs.layer_comparison(ami, probes, "layer comparison"), figdir,
                                              "layer_comparison")["data_uri"]}
    imp: dict[str, list[float]] = {}
    for L in layers_out.values():
        for d, v in L["surrogate"].get("importances", {}).items():
            imp.setdefault(d, []).append(v["mean"])
    global_imp = dict(sorted(((d, float(np.sum(v)) / len(layers_out)) for d, v in imp.items()), key=lambda t: -t[1]))
    failures_by: dict[str, int] = {}
    for _, d, _ in table.failures:
        failures_by[d] = failures_by.get(d, 0) + 1
    result: dict[str, Any] = {
        "format": "spectrolens-attribution", "version": 1, "run_dir": str(run_dir),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "n_materials": len(rows),
        "config": json.loads(a.model_dump_json()),
        "energy_subsample": {"start": float(energy[0]), "step": float(energy[SPECTRUM_STEP] - energy[0]) if len(energy) > SPECTRUM_STEP else None,
                             "every": SPECTRUM_STEP, "n": int(len(energy[::SPECTRUM_STEP]))},
        "descriptors": {"n_descriptors": len(table.names), "n_tested": len(names), "n_failures": len(table.failures),
                        "failures_by_descriptor": failures_by, **inp.dinfo},
        "layers": layers_out,
        "global_importance": global_imp,
        "layer_comparison": {"ami_vs_reference": ami,
                             "ami_vs_predicted": {n: L["ami_predicted"] for n, L in layers_out.items() if L.get("ami_predicted") is not None}},
        "probes": probes,
        "benchmark_recovery": None,
    }
    truth = reader.attrs.get("benchmark_truth")
    if truth:
        result["benchmark_recovery"] = benchmark_recovery(truth, layers_out)
        log.info("analyze: benchmark recovery precision@3 overall %.2f (best %s)",
                 result["benchmark_recovery"]["overall"], result["benchmark_recovery"]["best_layer"])
    _write_json(out / "attribution.json", result)
    _write_clusters(out / "clusters.csv", ids, reader, rows, labels_all)
    render(result, figures, out / "report" / "index.html", f"spectrolens analysis: {run_dir.name}")
    log.info("analyze: done in %.1f s -> %s", time.time() - t0, out)
    return result


def _subsample(n: int, seed: int) -> np.ndarray:
    """Sorted rows used to fit the surrogate and the probes: all, or FIT_MAX drawn at random."""
    if n <= FIT_MAX:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=FIT_MAX, replace=False))


def _ds(a: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), 4) for v in a[::SPECTRUM_STEP]]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _write_clusters(path: Path, ids: list[str], reader, rows: np.ndarray, labels: dict[str, np.ndarray]) -> None:
    formula = reader.column("formula", rows)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "formula", *labels])
        for i, mid in enumerate(ids):
            w.writerow([mid, str(formula[i]), *(int(v[i]) for v in labels.values())])
    tmp.replace(path)
