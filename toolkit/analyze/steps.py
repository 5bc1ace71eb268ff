"""The analyze stage as small steps, each testable alone (orchestrated by
:func:`toolkit.analyze.analyze_inputs`):

* :func:`analyze_layer`: one clustering (a model layer or a spectra baseline) -> :class:`LayerResult`:
  Ward clusters at the default level, the explained Ward tree and its levels
  (:mod:`toolkit.analyze.hierarchy`), enrichment ranking, surrogate importances, spectral
  signatures, element enrichment and linear probes. No file I/O.
* :func:`write_layer_figures`, :func:`write_comparison_figure`: the only writers of figures
  (``figures/<layer>_<kind>.png|svg`` and ``figures/layer_comparison.png|svg``); they return the PNG
  data URIs the report embeds.
* :func:`assemble_attribution`: the attribution.json dict (schema: docs/report.md) from the layer
  results: per-layer JSON shaping, AMI between clusterings, global importance, descriptor failures,
  the hierarchy of every layer, the drivers of the spectral features (computed once per run by
  :func:`toolkit.analyze.drivers.rank_drivers`, independent of the layers) and the benchmark
  recovery. No file I/O.

Heavy libraries (sklearn, scipy.stats, matplotlib) are imported inside the steps.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from toolkit.analyze import Inputs
    from toolkit.analyze.clustering import ClusterResult
    from toolkit.analyze.descriptors import DescriptorTable

log = logging.getLogger(__name__)

REFERENCE = "spectrum_reference"
PREDICTED = "spectrum_predicted"
MIN_CLUSTER_FOR_RECOVERY = 5
FIT_MAX = 20_000  # surrogate classifier and probes are fitted on at most this many materials
SPECTRUM_STEP = 10  # spectral summaries in attribution.json keep every 10th grid point
FIGURES = ("dendrogram", "map", "spectra", "enrichment", "elements")  # per-layer figure kinds


@dataclass
class LayerResult:
    """Everything computed for one clustering; rows are those of the analysed population where
    ``mask`` is True (``labels`` covers all rows, -1 outside the mask)."""

    name: str
    clustering: ClusterResult
    mask: np.ndarray  # (N,) bool: population rows this clustering covers
    labels: np.ndarray  # (N,) int32 cluster of each population row, -1 = not covered
    member_ids: list[str]  # ids of the covered rows (order of clustering.labels)
    ranked: dict[int, list[dict]]  # per cluster: ranked enrichment tests (attribution.enrichment)
    n_tests: int
    surrogate: dict[str, Any]
    signature: dict[int, dict]  # attribution.spectral_signature
    elements: dict[int, dict[str, float]]  # attribution.element_enrichment
    probes: dict[str, dict[str, Any]]  # probes.probe_layer
    hierarchy: dict[str, Any] | None = None  # hierarchy.explain_tree + levels + cluster paths

    @property
    def coverage(self) -> int:
        return int(self.mask.sum())


def headline_feature(table: DescriptorTable) -> str | None:
    """The reference feature a cluster's distribution is told by: the absorption onset, else the first
    feature of another target (``target:band_gap``, ``target:centre`` ...), else None."""
    if "onset" in table.names:
        return "onset"
    return next((n for n in table.names if n.startswith("target:")), None)


def onset_of(table: DescriptorTable) -> np.ndarray:
    """Reference onset (eV) of every table row, or the headline feature of another target
    (:func:`headline_feature`); NaN for all when the table has neither."""
    name = headline_feature(table)
    return table.column(name) if name is not None else np.full(len(table.ids), np.nan)


def cluster_kwargs(a) -> dict[str, Any]:
    """Keyword arguments of :func:`toolkit.analyze.clustering.cluster` from ``cfg.analyze``."""
    return {"n_clusters": a.n_clusters, "max_clusters": a.max_clusters, "standardize": a.standardize,
            "pca_components": a.pca_components, "scalable_threshold": a.scalable_threshold,
            "n_micro": a.micro_clusters, "seed": a.seed, "threads": a.workers,
            "target_cluster_size": a.target_cluster_size, "projection": a.map_projection}


def analyze_layer(cfg, inp: Inputs, name: str, x: Any, mask: np.ndarray, names: list[str],
                  targets: list[str], signals: Any = None, clustering: Any = None) -> LayerResult | None:
    """Cluster features ``x`` (rows = population rows where ``mask``; numpy or zarr array), attribute
    the clusters to the descriptors ``names``, probe ``targets``. ``signals``: a
    :class:`toolkit.analyze.signals.SignalIndex` that condenses every cluster's ranking and every
    split's descriptors to one entry per signal (None: rankings as tested). ``clustering``: the
    :class:`~toolkit.analyze.clustering.ClusterResult` of ``x`` already computed (a Dask task started
    by the stage, :class:`toolkit.analyze.engine.Deferred`), or None to cluster here. None (with a
    warning) when fewer than 3 materials are covered."""
    from toolkit.analyze import attribution as attr
    from toolkit.analyze import probes as prb
    from toolkit.analyze.clustering import cluster
    from toolkit.analyze.descriptors import DescriptorTable
    from toolkit.analyze.lazy import rows_of

    a = cfg.analyze
    if mask.sum() < 3:
        log.warning("analyze: %s covers %d materials; skipped", name, int(mask.sum()))
        return None
    res = clustering if clustering is not None else cluster(x, **cluster_kwargs(a))
    labels = np.full(len(inp.ids), -1, dtype=np.int32)
    labels[mask] = res.labels
    table, ids = inp.table, inp.ids
    sub = (DescriptorTable(ids, table.names, table.values, []) if mask.all() else  # no N x D copy
           DescriptorTable([i for i, m in zip(ids, mask) if m], table.names, table.values[mask], []))
    ranked = attr.enrichment(res.labels, sub, names)
    hier = layer_hierarchy(res, sub, names, a, signals)
    cand: list[str] = []
    for rs in ranked.values():
        cand += [r["descriptor"] for r in rs[:10] if r["q"] < attr.ALPHA and r["descriptor"] not in cand]
    if signals is not None:
        from toolkit.analyze.signals import condense_cluster

        ranked = {c: condense_cluster(signals, rs, attr.ALPHA) for c, rs in ranked.items()}
    fit_rows = _subsample(len(sub.ids), a.seed)
    fit_sub = DescriptorTable([sub.ids[i] for i in fit_rows], sub.names, sub.values[fit_rows], [])
    surrogate = attr.surrogate_importance(res.labels[fit_rows], fit_sub, cand[:60], a.permutation_repeats, a.seed)
    unc = getattr(inp, "predicted_std", None), getattr(inp, "predicted_onset", None)  # ensembles only
    sig = attr.spectral_signature(res.labels, inp.energy, rows_of(inp.reference, mask), rows_of(inp.predicted, mask),
                                  onset_of(table)[mask], predicted_std=rows_of(unc[0], mask),
                                  predicted_onset={k: v[mask] for k, v in unc[1].items()} if unc[1] else None)
    elements = attr.element_enrichment(res.labels, sub)
    feats = np.asarray(x.oindex[fit_rows] if hasattr(x, "oindex") else x[fit_rows], dtype=np.float32)
    probes = prb.probe_layer(feats, fit_sub, targets, folds=a.probe_folds, seed=a.seed)
    log.info("analyze: %s -> %d clusters (%s)", name, res.n_clusters, res.mode)
    return LayerResult(name=name, clustering=res, mask=mask, labels=labels, member_ids=list(sub.ids), ranked=ranked,
                       n_tests=sum(len(v) for v in ranked.values()), surrogate=surrogate, signature=sig,
                       elements=elements, probes=probes, hierarchy=hier)


def layer_hierarchy(res: ClusterResult, sub: DescriptorTable, names: list[str], a, signals: Any = None) -> dict[str, Any]:
    """``hierarchy.<layer>``: the explained splits of the Ward tree (:func:`toolkit.analyze.hierarchy.
    explain_tree` on the tested descriptors; each split's descriptors condensed by ``signals``), the
    levels ``a.levels`` plus the default one, and the taxonomy path of every default-level cluster
    (``paths``: cluster -> list of steps)."""
    from toolkit.analyze import hierarchy as hy
    from toolkit.analyze.descriptors import is_categorical

    t = time.time()
    cols = [sub.names.index(n) for n in names]
    hier = hy.explain_tree(res.linkage, res.leaf_of, res.leaf_sizes, sub.values[:, cols], names,
                           np.array([is_categorical(n) for n in names], dtype=bool),
                           min_split_size=a.min_split_size, max_splits=a.max_splits)
    if signals is not None:
        from toolkit.analyze.signals import condense_split

        for sp in hier["splits"]:
            sp["descriptors"] = condense_split(signals, sp["descriptors"], hier["alpha"])
    hier["levels"] = hy.levels(res.linkage, res.leaf_sizes, list(a.levels or []), res.n_clusters)
    hier["child_clusters"] = hy.clusters_under(res.linkage, hier, res.nodes)
    p = hy.paths(res.linkage, hier, res.nodes)
    hier["paths"] = {str(c): p.get(nd, []) for c, nd in enumerate(res.nodes)}
    hier["seconds"] = round(time.time() - t, 3)
    return hier


# ----------------------------------------------------------------------------------------- figures
def write_layer_figures(lr: LayerResult, energy: np.ndarray, onset: np.ndarray, figdir: Path) -> dict[str, str]:
    """Write ``figdir/<layer>_<kind>.png|svg`` for each kind of :data:`FIGURES`; return
    ``{kind: PNG data URI}``. ``onset``: reference onset of every population row."""
    from toolkit.analyze import figures as figs

    res, name = lr.clustering, lr.name
    drawn = {"dendrogram": lambda: figs.dendrogram(res.linkage, res.n_clusters, name),
             "map": lambda: figs.embedding_map(res.coords, res.labels, onset[lr.mask], name,
                                               "UMAP" if res.preprocessing.get("map") == "umap" else "PC"),
             "spectra": lambda: figs.cluster_spectra(energy, lr.signature, name),
             "enrichment": lambda: figs.enrichment_heatmap(lr.ranked, name),
             "elements": lambda: figs.element_maps(lr.elements, name, {c: s["size"] for c, s in lr.signature.items()})}
    return {kind: figs.save(drawn[kind](), figdir, f"{name}_{kind}")["data_uri"] for kind in FIGURES}


def write_comparison_figure(ami: dict[str, float], probes: dict[str, dict], figdir: Path) -> dict[str, str]:
    """Write ``figdir/layer_comparison.png|svg``; return ``{"layers": PNG data URI}`` (the report's
    ``figures["_global"]``)."""
    from toolkit.analyze import figures as figs

    return {"layers": figs.save(figs.layer_comparison(ami, probes, "layer comparison"), figdir,
                                "layer_comparison")["data_uri"]}


# ----------------------------------------------------------------------------------------- attribution.json
def feature_label(reader: Any) -> tuple[str, str]:
    """(name, units) of the dataset's headline feature for cluster summaries: ("onset", "eV") for
    absorption; a scalar head's name and units; a DOS's centre."""
    from toolkit.data.targets import spec_of

    spec = spec_of(reader)
    if spec.kind == "absorption":
        return "onset", "eV"
    name = spec.primary.removeprefix("target:")
    return name, (spec.units if spec.kind == "scalar" else spec.x_units)


def _target_attrs(reader: Any) -> dict[str, Any]:
    from toolkit.data.targets import spec_of

    return spec_of(reader).to_attrs()


def layer_json(lr: LayerResult, names: list[str], aliases: dict[str, list[str]],
               feature: tuple[str, str] = ("onset", "eV")) -> dict[str, Any]:
    """``layers.<layer>`` of attribution.json, without the AMI keys (added by :func:`assemble_attribution`)."""
    from toolkit.analyze.report import cluster_summary

    member_ids = np.array(lr.member_ids)
    labels = lr.clustering.labels
    clusters = {}
    nodes = lr.clustering.nodes
    paths = (lr.hierarchy or {}).get("paths", {})
    for c in sorted(lr.ranked):
        s = lr.signature[c]
        spec = {k: {"mean": _ds(s[k]["mean"]), "std": _ds(s[k]["std"]),
                    **({"sigma": _ds(s[k]["sigma"])} if "sigma" in s[k] else {})}  # sigma: ensembles' mean σ
                for k in ("reference", "predicted") if k in s}
        if "predicted_onset" in s:  # ensembles: mean predicted onset and its ±2σ interval (eV)
            spec["predicted_onset"] = s["predicted_onset"]
        clusters[str(c)] = {"size": int(s["size"]), "node": int(nodes[c]) if c < len(nodes) else None,
                            "path": paths.get(str(c), []), "members": member_ids[labels == c].tolist(),
                            "summary": cluster_summary(c, s["size"], s.get("onset"), lr.ranked[c], feature=feature),
                            "spectral": {"onset": s.get("onset"), **spec},
                            "descriptors": _ranked_json(lr.ranked[c], aliases)}
    return {"clustering": lr.clustering.summary(), "linkage_file": f"linkage/{lr.name}.npy", "n_tests": lr.n_tests,
            "tested": names, "aliases": {k: v for k, v in aliases.items() if v},
            "clusters": clusters, "surrogate": lr.surrogate, "coverage": lr.coverage}


def compare_layers(labels: dict[str, np.ndarray], layers_out: dict[str, dict]) -> None:
    """Set ``ami_reference`` / ``ami_predicted`` of each ``layers_out`` entry: adjusted mutual
    information with the reference / predicted-spectra clustering on the rows both cover (None
    when that baseline was not clustered)."""
    from sklearn.metrics import adjusted_mutual_info_score

    for base, key in ((REFERENCE, "ami_reference"), (PREDICTED, "ami_predicted")):
        for name, lab in labels.items():
            if base in labels:
                both = (lab >= 0) & (labels[base] >= 0)
                layers_out[name][key] = float(adjusted_mutual_info_score(labels[base][both], lab[both]))
            else:
                layers_out[name][key] = None


def global_importance(layers_out: dict[str, dict]) -> dict[str, float]:
    """Mean surrogate permutation importance of each descriptor over the clusterings (0 where a
    clustering did not use it), largest first."""
    imp: dict[str, list[float]] = {}
    for L in layers_out.values():
        for d, v in L["surrogate"].get("importances", {}).items():
            imp.setdefault(d, []).append(v["mean"])
    return dict(sorted(((d, float(np.sum(v)) / len(layers_out)) for d, v in imp.items()), key=lambda t: -t[1]))


def assemble_attribution(cfg, inp: Inputs, layer_results: list[LayerResult], names: list[str],
                         aliases: dict[str, list[str]], truth: dict | None = None,
                         drivers: dict[str, Any] | None = None) -> dict[str, Any]:
    """The attribution.json dict (docs/report.md) of ``layer_results`` (in order); ``names`` and
    ``aliases`` as from :func:`toolkit.analyze.attribution.dedupe_categorical`; ``truth``: the
    benchmark's planted drivers (dataset attribute ``benchmark_truth``), None for real data;
    ``drivers``: :func:`toolkit.analyze.drivers.rank_drivers` (None: not computed)."""
    label = feature_label(inp.reader)
    layers_out = {lr.name: layer_json(lr, names, aliases, label) for lr in layer_results}
    compare_layers({lr.name: lr.labels for lr in layer_results}, layers_out)
    ami = {n: L["ami_reference"] for n, L in layers_out.items() if L.get("ami_reference") is not None}
    table, energy = inp.table, inp.energy
    failures_by: dict[str, int] = {}
    for _, d, _ in table.failures:
        failures_by[d] = failures_by.get(d, 0) + 1
    result: dict[str, Any] = {
        "format": "spectrolens-attribution", "version": 1, "run_dir": str(inp.run_dir),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "n_materials": len(inp.rows),
        "config": json.loads(cfg.analyze.model_dump_json()),
        "target": {**_target_attrs(inp.reader), "headline": {"name": label[0], "units": label[1]}},
        "energy_subsample": {"start": float(energy[0]), "step": float(energy[SPECTRUM_STEP] - energy[0]) if len(energy) > SPECTRUM_STEP else None,
                             "every": SPECTRUM_STEP, "n": len(energy[::SPECTRUM_STEP])},
        "descriptors": {"n_descriptors": len(table.names), "n_tested": len(names), "n_failures": len(table.failures),
                        "failures_by_descriptor": failures_by, **inp.dinfo},
        "layers": layers_out,
        "global_importance": global_importance(layers_out),
        "layer_comparison": {"ami_vs_reference": ami,
                             "ami_vs_predicted": {n: L["ami_predicted"] for n, L in layers_out.items() if L.get("ami_predicted") is not None}},
        "probes": {lr.name: lr.probes for lr in layer_results},
        "hierarchy": {lr.name: lr.hierarchy for lr in layer_results if lr.hierarchy is not None},
        "drivers": drivers,
        "benchmark_recovery": None,
    }
    if truth:
        result["benchmark_recovery"] = recovery(cfg, inp, truth, result, layer_results)
        log.info("analyze: %s", result["benchmark_recovery"]["summary"])
    return result


SPLIT_SCORE_MAX = 200_000  # the hierarchy's splits are scored up to this many materials (membership per node)


def recovery(cfg, inp: Inputs, truth: dict, result: dict[str, Any],
             layer_results: list[LayerResult] | None = None) -> dict[str, Any]:
    """The honest recovery score (:func:`toolkit.analyze.recovery.recovery_score`: per planted driver,
    defining clusters named, chance baseline, coverage, feature rankings, distractor rate) computed from
    the planted values stored with the data (else the descriptor table), plus the earlier
    precision@3 (``precision_at_3``, :func:`benchmark_recovery`) for comparison with older releases."""
    from toolkit.analyze.recovery import planted_values, recovery_score

    stored = hasattr(inp.reader, "column") and hasattr(inp.reader, "ids")  # a dataset store (not a test double)
    planted = planted_values(inp.reader, truth, inp.rows) if stored else {"ids": []}
    table = planted if len(planted) > 1 else inp.table
    splits = None
    if layer_results and len(inp.ids) <= SPLIT_SCORE_MAX:
        from toolkit.analyze.hierarchy import node_members

        splits = {}
        for lr in layer_results:
            res, glob = lr.clustering, np.flatnonzero(lr.mask)
            local = node_members(res.linkage, res.leaf_of, res.leaf_sizes)
            splits[lr.name] = lambda nd, local=local, glob=glob: glob[local(nd)]
    rec = recovery_score(truth, result, table, seed=cfg.analyze.seed, split_members=splits)
    legacy_truth = truth if truth.get("kind") != "realbench" else None
    rec["precision_at_3"] = benchmark_recovery(legacy_truth, result["layers"]) if legacy_truth else None
    return rec


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


# ----------------------------------------------------------------------------------------- helpers
def _subsample(n: int, seed: int) -> np.ndarray:
    """Sorted rows used to fit the surrogate and the probes: all, or FIT_MAX drawn at random."""
    if n <= FIT_MAX:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=FIT_MAX, replace=False))


def _ds(a: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), 4) for v in a[::SPECTRUM_STEP]]


def _ranked_json(rs: list[dict], aliases: dict[str, list[str]], top: int = 25) -> list[dict]:
    out = []
    for r in rs[:top]:
        d = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items() if k != "p"}
        d["p"] = r["p"]
        d["aliases"] = aliases.get(r["descriptor"], [])
        out.append(d)
    return out
