"""The ``explain`` stage: counterfactual probes and integrated-gradient attributions of the trained model.

A sharded stage (the contract: :mod:`toolkit.sharded`; units are *shards* of ``explain.shard_size``
sampled materials):

* :func:`plan` (idempotent; under the stage's plan lock): samples the materials (``per_cluster`` of each
  cluster of ``analyze/clusters.csv`` when it exists, else ``sample_size`` at random, seeded), picks the
  representatives, computes the extrapolation reference (``reference.npz``) and writes ``plan.json``.
  An existing plan made from another checkpoint, dataset or option set is refused (delete ``RUN_DIR/explain``).
* :func:`run_units`: per shard, the edits of every material (:mod:`toolkit.explain.edits`) run through the
  model batched (:mod:`toolkit.explain.probes`), attributions (:mod:`toolkit.explain.gradients`), then the
  shard's three files, then its completion record ``done.json`` LAST (a killed job leaves no record and the
  shard is rebuilt on the next run).
* :func:`finalize`: checks every shard, merges the tables, summarises per edit (and per cluster), aggregates
  the attributions, writes ``summary.json`` LAST (``complete: true``).
* :func:`run`: all of it in this process.

Files: :mod:`toolkit.explain.options`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.data.store import DatasetReader
from toolkit.explain import options as op
from toolkit.explain.options import (
    FEATURES,
    ExplainError,
    ExplainOptions,
    options_from_config,
)
from toolkit.layout import RunLayout
from toolkit.runtime import json_safe, select_device, write_json, write_text

log = logging.getLogger(__name__)

NAME = "explain"
UNIT = "shard"
Error = ExplainError
FORMAT_VERSION = 1


def workers(cfg: Any) -> int:
    return int(options_from_config(cfg).workers)


def device(cfg: Any) -> str:
    return str(options_from_config(cfg).device)


def checkpoint_path(cfg: Any, run_dir: Path) -> Path:
    """``explain.checkpoint``, else ``embed.checkpoint``, else ``RUN_DIR/train/best.pt``."""
    opts = options_from_config(cfg)
    return Path(opts.checkpoint) if opts.checkpoint else RunLayout(run_dir).best_checkpoint


def _reader(run_dir: Path) -> DatasetReader:
    path = RunLayout(run_dir).dataset
    if not (path / "zarr.json").is_file():
        raise ExplainError(f"{path} does not exist: run `spectrolens prepare` first")
    return DatasetReader(path)


def _load(cfg: Any, run_dir: Path, dev: torch.device):
    from toolkit.embed.extract import EmbedError, load_model

    try:
        return load_model(checkpoint_path(cfg, run_dir), dev)
    except EmbedError as e:
        raise ExplainError(str(e)) from None


# --------------------------------------------------------------------------------------------- plan
def _clusters(run_dir: Path, ids: list[str], layer: str | None) -> tuple[np.ndarray | None, str | None]:
    """Cluster label per dataset row (-1 = not clustered) from analyze/clusters.csv, and its column."""
    path = RunLayout(run_dir).analyze_dir / "clusters.csv"
    if not path.is_file():
        return None, None
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        return None, None
    header = rows[0]
    cols = header[2:]
    if not cols:
        return None, None
    col = layer or ("readout" if "readout" in cols else cols[-1])
    if col not in cols:
        raise ExplainError(f"explain.cluster_layer {col!r} is not a column of {path} ({cols})")
    j = header.index(col)
    pos = {m: i for i, m in enumerate(ids)}
    labels = np.full(len(ids), -1, dtype=np.int64)
    for r in rows[1:]:
        if r and r[0] in pos:
            labels[pos[r[0]]] = int(r[j])
    return labels, col


def sample_rows(n: int, labels: np.ndarray | None, opts: ExplainOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cluster of each row, representative flag) — sorted by cluster, then row; deterministic."""
    rng = np.random.default_rng(opts.seed)
    if labels is None:
        rows = np.arange(n)
        if opts.sample_size is not None and opts.sample_size < n:
            rows = np.sort(rng.choice(n, size=opts.sample_size, replace=False))
        clus = np.full(rows.size, -1, dtype=np.int64)
    else:
        parts, cl = [], []
        for c in np.unique(labels[labels >= 0]):
            members = np.nonzero(labels == c)[0]
            if opts.per_cluster is not None and members.size > opts.per_cluster:
                members = np.sort(rng.choice(members, size=opts.per_cluster, replace=False))
            parts.append(members)
            cl.append(np.full(members.size, c))
        rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        clus = np.concatenate(cl) if cl else np.zeros(0, np.int64)
    rep = np.zeros(rows.size, dtype=bool)
    for c in np.unique(clus):
        rep[np.nonzero(clus == c)[0][:opts.representatives]] = True
    return rows.astype(np.int64), clus.astype(np.int64), rep


def _train_rows(run_dir: Path, reader: DatasetReader) -> np.ndarray:
    split = RunLayout(run_dir).train_dir / "split.json"
    ids = [str(x) for x in reader.ids]
    if split.is_file():
        try:
            train = set(json.loads(split.read_text())["train"])
            rows = np.array([i for i, m in enumerate(ids) if m in train], dtype=np.int64)
            if rows.size:
                return rows
        except (ValueError, KeyError):
            log.warning("explain: %s unreadable; the reference is every material with a spectrum", split)
    rows = np.nonzero(reader.has_spectrum)[0]
    return rows if rows.size else np.arange(len(reader))


def _reference(cfg: Any, run_dir: Path, reader: DatasetReader, opts: ExplainOptions, loaded) -> dict:
    """Readout embeddings of (up to reference_size) training materials: from embeddings.zarr when it holds
    ``layers/readout/mean`` of this checkpoint, else by running the model."""
    from toolkit.data.loader import MaterialDataset

    rows = _train_rows(run_dir, reader)
    if rows.size > opts.reference_size:
        rows = np.sort(np.random.default_rng([opts.seed, 1]).choice(rows, opts.reference_size, replace=False))
    emb = None
    source = "model"
    lay = RunLayout(run_dir)
    if lay.is_complete("embed"):
        try:
            from toolkit.embed.store import open_embeddings

            root = open_embeddings(run_dir)
            if root.attrs.get("checkpoint_sha256") == loaded.sha256 and "layers/readout/mean" in root:
                emb = np.asarray(root["layers/readout/mean"][...])[rows].astype(np.float32)
                source = "embeddings.zarr"
        except Exception as e:  # noqa: BLE001 - fall back to computing them
            log.info("explain: embeddings.zarr not usable for the reference (%s); computing", e)
    if emb is None:
        from toolkit.explain.probes import predict

        ds = MaterialDataset(lay.dataset)
        items = [ds.reader.material(int(r)) for r in rows]
        emb = predict(loaded.model, items, 64, loaded.device).readout
    from toolkit.explain.probes import Reference

    ref = Reference(emb)
    return {"embeddings": emb, "rows": rows, "nn_scale": ref.nn_scale, "source": source}


def _checksum(values: Any) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan(cfg: Any, run_dir: Path) -> int:
    """Sample the materials, build the reference and write plan.json once (or check the existing plan)."""
    run_dir = Path(run_dir)
    opts = options_from_config(cfg)
    reader = _reader(run_dir)
    if len(reader) == 0:
        raise ExplainError(f"{reader.path} holds no materials")
    loaded = _load(cfg, run_dir, torch.device("cpu"))
    if loaded.output_features != len(reader.energy):
        raise ExplainError(f"checkpoint {loaded.path} predicts {loaded.output_features} values per material but "
                           f"{reader.path} has a grid of {len(reader.energy)} points")
    ids = [str(x) for x in reader.ids]
    identity = {"checkpoint_sha256": loaded.sha256, "dataset_ids": _checksum(ids), "options": opts.identity(),
                "graph": cfg.graph.model_dump(mode="json"), "version": FORMAT_VERSION}
    path = op.plan_path(run_dir)
    if path.is_file():
        have = json.loads(path.read_text())
        if have.get("identity") != json_safe(identity):
            diff = sorted(k for k in identity if json_safe(identity)[k] != have.get("identity", {}).get(k))
            raise ExplainError(f"{path} was planned with another {', '.join(diff)}; delete {op.explain_dir(run_dir)} "
                               f"to explain again")
        return int(have["n_shards"])
    labels, col = _clusters(run_dir, ids, opts.cluster_layer)
    rows, clus, rep = sample_rows(len(reader), labels, opts)
    if rows.size == 0:
        raise ExplainError("explain: no materials sampled (empty clusters.csv or sample_size 0)")
    ref = _reference(cfg, run_dir, reader, opts, loaded)
    op.explain_dir(run_dir).mkdir(parents=True, exist_ok=True)
    tmp = op.reference_path(run_dir).with_name(f".reference.{os.getpid()}.tmp.npz")
    np.savez(tmp, embeddings=ref["embeddings"], rows=ref["rows"], nn_scale=np.float64(ref["nn_scale"]))
    os.replace(tmp, op.reference_path(run_dir))  # atomic; plan.json (written next) is the plan's record
    n_shards = -(-rows.size // opts.shard_size)
    write_json(path, {"identity": identity, "n_shards": n_shards, "shard_size": opts.shard_size,
                      "rows": rows.tolist(), "ids": [ids[r] for r in rows], "clusters": clus.tolist(),
                      "representative": rep.tolist(), "cluster_column": col, "options": opts.to_json(),
                      "reference": {"n": int(ref["rows"].size), "nn_scale": ref["nn_scale"], "source": ref["source"]},
                      "checkpoint": str(loaded.path)})
    log.info("planned %s: %d materials in %d shards (clusters: %s)", path, rows.size, n_shards, col or "none")
    return n_shards


def _plan(run_dir: Path) -> dict:
    path = op.plan_path(run_dir)
    if not path.is_file():
        raise ExplainError(f"{path} does not exist: the stage was not planned")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------- shards
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_KINDS = ("edits.csv", "rejects.csv", "attr.json")


def unit_done(run_dir: Path, shard: int) -> bool:
    """The shard's completion record exists and its files are there with the recorded checksums."""
    done = op.shard_file(run_dir, shard, "done.json")
    try:
        rec = json.loads(done.read_text())
        return all(_sha(op.shard_file(run_dir, shard, k)) == rec["sha256"][k] for k in _KINDS)
    except (OSError, ValueError, KeyError):
        return False


EDIT_COLUMNS = ["id", "formula", "cluster", "type", "label", "detail",
                *[f"original_{f}" for f in FEATURES if f != "spectrum_mae"],
                *[f"delta_{f}" for f in FEATURES], "original_distance_ratio", "distance_ratio", "extrapolated"]
REJECT_COLUMNS = ["id", "cluster", "type", "label", "reason"]


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([json.dumps(json_safe(r[c]), sort_keys=True) if isinstance(r[c], dict)
                    else (repr(float(r[c])) if isinstance(r[c], float) else r[c]) for c in columns])
    return buf.getvalue()


def read_table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _materials(reader: DatasetReader, plan_: dict, rows: range) -> list[dict]:
    from toolkit.explain.edits import structure_from_record

    out = []
    for k in rows:
        rec = reader.material(int(plan_["rows"][k]))
        out.append({"row": int(plan_["rows"][k]), "id": rec["id"], "formula": rec["formula"],
                    "cluster": int(plan_["clusters"][k]), "representative": bool(plan_["representative"][k]),
                    "structure": structure_from_record(rec), "conditions": rec.get("conditions")})
    return out


def explain_materials(materials: list[dict], model: torch.nn.Module, cfg: Any, energy: np.ndarray,
                      opts: ExplainOptions, dev: torch.device, reference: Any) -> tuple[list, list, dict]:
    """Probes + attributions of ``materials`` -> (edit rows, reject rows, attribution record)."""
    from toolkit.explain import gradients as gr
    from toolkit.explain.probes import probe_rows, try_graph

    edits, rejects, originals = probe_rows(materials, model, cfg.graph, cfg.data, energy, opts, dev, reference)
    attr: dict[str, Any] = {"aggregates": {"element": {}, "bond": {}, "angle": {}}, "materials": [],
                            "representatives": []}
    if opts.attribution:
        for m in materials:
            if m["id"] not in originals:
                continue
            item, _ = try_graph(m["structure"], cfg.graph, 0, m["id"])
            if m.get("conditions") is not None:  # a model with condition inputs: the record's conditions
                item["conditions"] = m["conditions"]
            orig = originals[m["id"]]
            weights, kind = gr.target_weights(
                opts.attribution_target, energy, orig["prediction"], orig["features"]["onset"],
                window=opts.energy_window, half_width=opts.window_half_width, threshold=cfg.data.onset_threshold,
                log_floor=cfg.data.log_floor)
            a = gr.integrated_gradients(model, item, weights, opts.ig_steps, dev)
            symbols = [site.specie.symbol for site in m["structure"]]
            mine = attr.setdefault("by_cluster", {}).setdefault(str(m["cluster"]), {"element": {}, "bond": {}, "angle": {}})
            for group, vals in gr.aggregate(a, symbols, opts.bond_bin, opts.angle_bin).items():
                for key, (s, n) in vals.items():
                    for target in (attr["aggregates"], mine):  # the dataset, and the material's cluster
                        acc = target[group].setdefault(key, [0.0, 0, 0])
                        acc[0] += s
                        acc[1] += n
                        acc[2] += 1
            tot_abs = float(np.abs(a.atoms).sum() + np.abs(a.bonds).sum() + np.abs(a.angles).sum()) or 1.0
            attr["materials"].append({
                "id": m["id"], "cluster": m["cluster"], "target": a.target, "baseline_target": a.baseline_target,
                "total": a.total, "completeness_error": a.completeness_error,
                "target_kind": kind, "window_eV": [float(energy[weights != 0].min()), float(energy[weights != 0].max())],
                "share": {"atoms": float(np.abs(a.atoms).sum()) / tot_abs, "bonds": float(np.abs(a.bonds).sum()) / tot_abs,
                          "angles": float(np.abs(a.angles).sum()) / tot_abs}})
            if m["representative"]:
                attr["representatives"].append({"id": m["id"], "formula": m["formula"], "cluster": m["cluster"],
                                                "target_kind": kind, **gr.full_record(a, symbols)})
    return edits, rejects, attr


def run_units(cfg: Any, run_dir: Path, shards: list[int]) -> None:
    """Build ``shards`` (the caller holds their locks): three files each, then the completion record."""
    from toolkit.explain.probes import Reference

    run_dir = Path(run_dir)
    todo = [s for s in shards if not unit_done(run_dir, s)]
    if not todo:
        return
    plan_ = _plan(run_dir)
    opts = options_from_config(cfg)
    dev = select_device(opts.device, setting="explain.device")
    loaded = _load(cfg, run_dir, dev)
    if loaded.sha256 != plan_["identity"]["checkpoint_sha256"]:
        raise ExplainError(f"{op.plan_path(run_dir)} was planned with checkpoint sha256 "
                           f"{plan_['identity']['checkpoint_sha256']}, {loaded.path} has {loaded.sha256}; delete "
                           f"{op.explain_dir(run_dir)} to explain again")
    reader = _reader(run_dir)
    energy = reader.energy
    npz = np.load(op.reference_path(run_dir))
    reference = Reference(npz["embeddings"], float(npz["nn_scale"]))
    n = len(plan_["rows"])
    for s in todo:
        t0 = time.perf_counter()
        mats = _materials(reader, plan_, range(s * plan_["shard_size"], min(n, (s + 1) * plan_["shard_size"])))
        edits, rejects, attr = explain_materials(mats, loaded.model, cfg, energy, opts, dev, reference)
        texts = {"edits.csv": _csv(edits, EDIT_COLUMNS), "rejects.csv": _csv(rejects, REJECT_COLUMNS),
                 "attr.json": json.dumps(json_safe(attr), sort_keys=True)}
        for kind, text in texts.items():
            write_text(op.shard_file(run_dir, s, kind), text)
        seconds = time.perf_counter() - t0
        write_json(op.shard_file(run_dir, s, "done.json"), {
            "shard": s, "n_materials": len(mats), "n_edits": len(edits), "n_rejects": len(rejects),
            "sha256": {k: hashlib.sha256(t.encode()).hexdigest() for k, t in texts.items()},
            "seconds": round(seconds, 3), "device": str(dev)})
        log.info("explain shard %d: %d materials, %d edits, %d rejects in %.1f s", s, len(mats), len(edits),
                 len(rejects), seconds)


# --------------------------------------------------------------------------------------- finalize
def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


VERB = {"onset": ("raises", "lowers", "eV"), "edge_integral": ("raises", "lowers", "eV·decades"),
        "peak_1": ("raises", "lowers", "eV"), "peak_2": ("raises", "lowers", "eV"), "peak_3": ("raises", "lowers", "eV"),
        "peak_1_height": ("raises", "lowers", "decades"), "peak_2_height": ("raises", "lowers", "decades"),
        "peak_3_height": ("raises", "lowers", "decades"), "spectrum_mae": ("changes", "changes", ""),
        "target": ("raises", "lowers", "")}


def _phrase(typ: str, label: str) -> str:
    if typ in ("cation_substitution", "anion_substitution"):
        a, b = label.split("->")
        return f"replacing {a} by {b}"
    if typ == "strain":
        return f"a uniform strain of {label}"
    if typ == "shell_strain":
        el, _, amount = label.split(" ")
        return f"straining the first shell of {el} by {amount}"
    if typ == "polyanion_centre":
        unit, change = label.split(": ")
        a, b = change.split("->")
        return f"replacing the {unit} centre {a} by {b}"
    return label


def summarise(edits: list[dict], target: tuple[str, str] = ("target", "")) -> list[dict]:
    """One row per (edit type, label, cluster or 'all', feature): n, mean ± std shift, how many agree in sign."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in edits:
        groups[(r["type"], r["label"], "all")].append(r)
        if str(r["cluster"]) != "-1":
            groups[(r["type"], r["label"], str(r["cluster"]))].append(r)
    out = []
    for (typ, label, cluster), rs in sorted(groups.items()):
        n_extra = sum(str(r["extrapolated"]) in ("True", "true", "1") for r in rs)
        for feat in FEATURES:
            v = np.array([_f(r[f"delta_{feat}"]) for r in rs])
            v = v[np.isfinite(v)]
            if v.size == 0:
                continue
            mean, std = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
            sign = np.sign(mean)
            agree = int((np.sign(v) == sign).sum()) if sign != 0 else int((v == 0).sum())
            up, down, unit = VERB[feat]
            verb = up if mean > 0 else down
            what = "predicted spectrum" if feat == "spectrum_mae" else f"predicted {feat.replace('_', ' ')}"
            if feat == "target":  # the headline feature of a non-absorption target (``target``: name, units)
                what, unit = f"predicted {target[0].replace('_', ' ')}", target[1]
            if feat == "spectrum_mae":
                sentence = (f"{_phrase(typ, label)} changes the predicted spectrum by {mean:.3g} ± {std:.2g} "
                            f"(mean |Δ|) in {v.size} materials")
            else:
                sentence = (f"{_phrase(typ, label)} {verb} the {what} by {abs(mean):.2f} ± {std:.2f} {unit} in "
                            f"{agree} of {v.size} materials")
            if n_extra:
                sentence += f" ({n_extra} of {len(rs)} edited structures extrapolated)"
            out.append({"type": typ, "label": label, "cluster": cluster, "feature": feat, "n": int(v.size),
                        "mean": mean, "std": std, "median": float(np.median(v)), "n_same_sign": agree,
                        "n_extrapolated": n_extra, "n_edits": len(rs), "sentence": sentence})
    return out


def _target_label(cfg: Any) -> tuple[str, str]:
    """(name, units) of a non-absorption target's headline feature (explain's ``target`` feature)."""
    from toolkit.data.targets import TargetSpec

    spec = TargetSpec.from_config(cfg.data)
    return spec.primary.removeprefix("target:"), (spec.units if spec.kind == "scalar" else spec.x_units)


SUMMARY_COLUMNS = ["type", "label", "cluster", "feature", "n", "mean", "std", "median", "n_same_sign",
                   "n_extrapolated", "n_edits", "sentence"]


def _merge_attr(run_dir: Path, n_shards: int) -> dict:
    agg: dict[str, dict[str, list]] = {"element": {}, "bond": {}, "angle": {}}
    by_cluster: dict[str, dict[str, dict[str, list]]] = {}
    mats, reps = [], []

    def merge(into: dict[str, dict[str, list]], vals_by_group: dict) -> None:
        for group, vals in vals_by_group.items():
            for key, (tot, cnt, nm) in vals.items():
                acc = into[group].setdefault(key, [0.0, 0, 0])
                acc[0] += tot
                acc[1] += cnt
                acc[2] += nm

    for s in range(n_shards):
        a = json.loads(op.shard_file(run_dir, s, "attr.json").read_text())
        merge(agg, a["aggregates"])
        for c, groups in (a.get("by_cluster") or {}).items():
            merge(by_cluster.setdefault(c, {"element": {}, "bond": {}, "angle": {}}), groups)
        mats += a["materials"]
        reps += a["representatives"]
    n = max(len(mats), 1)
    n_in = defaultdict(int)
    for m in mats:
        n_in[str(m["cluster"])] += 1

    def table(group: str, src: dict | None = None, n_mat: int | None = None) -> list[dict]:
        src, n_mat = (agg, n) if src is None else (src, max(n_mat or 0, 1))
        rows = [{"key": k, "sum": t, "count": c, "n_materials": m, "mean_per_item": t / c if c else float("nan"),
                 "mean_per_material": t / n_mat} for k, (t, c, m) in src[group].items()]
        return sorted(rows, key=lambda r: -abs(r["mean_per_material"]))

    angle_only: dict[str, list] = {}
    for k, (t, c, m) in agg["angle"].items():
        b = k.split("|", 1)[1]
        acc = angle_only.setdefault(b, [0.0, 0])
        acc[0] += t
        acc[1] += c
    errs = np.array([m["completeness_error"] for m in mats]) if mats else np.zeros(0)
    return {"n_materials": len(mats), "element": table("element"), "bond": table("bond"), "angle": table("angle"),
            "angle_bin": sorted(({"key": k, "sum": t, "count": c, "mean_per_material": t / n}
                                 for k, (t, c) in angle_only.items()), key=lambda r: r["key"]),
            "completeness_error_max": float(errs.max()) if errs.size else None,
            "completeness_error_median": float(np.median(errs)) if errs.size else None,
            "share_mean": {k: float(np.mean([m["share"][k] for m in mats])) if mats else None
                           for k in ("atoms", "bonds", "angles")},
            "target_kinds": {k: sum(m["target_kind"] == k for m in mats) for k in sorted({m["target_kind"] for m in mats})},
            "by_cluster": {c: {"n_materials": n_in[c], **{g: table(g, groups, n_in[c])[:10] for g in groups}}
                           for c, groups in sorted(by_cluster.items(), key=lambda t: int(t[0]))},
            "materials": mats, "representatives": reps}


def finalize(cfg: Any, run_dir: Path) -> dict:
    """Every shard done -> merged tables, summary.csv, attributions.json, then summary.json LAST."""
    run_dir = Path(run_dir)
    plan_ = _plan(run_dir)
    n_shards = int(plan_["n_shards"])
    missing = [s for s in range(n_shards) if not unit_done(run_dir, s)]
    if missing:
        raise ExplainError(f"explain: {len(missing)} shard(s) not done ({missing[:10]}); re-run to build them")
    if op.is_complete(run_dir):
        return json.loads(op.summary_path(run_dir).read_text())
    edits, rejects = [], []
    for s in range(n_shards):
        edits += read_table(op.shard_file(run_dir, s, "edits.csv"))
        rejects += read_table(op.shard_file(run_dir, s, "rejects.csv"))
    write_text(op.edits_path(run_dir), _join_csv(run_dir, n_shards, "edits.csv"))
    write_text(op.rejects_path(run_dir), _join_csv(run_dir, n_shards, "rejects.csv"))
    table = summarise(edits, _target_label(cfg))
    write_text(op.table_path(run_dir), _csv(table, SUMMARY_COLUMNS))
    attr = _merge_attr(run_dir, n_shards)
    write_json(op.attributions_path(run_dir), attr)
    maps = _draw_maps(run_dir, attr["representatives"])
    reasons: dict[str, int] = defaultdict(int)
    for r in rejects:
        reasons[r["reason"].split(":", 1)[0]] += 1
    n_extra = sum(r["extrapolated"] == "True" for r in edits)
    headline = [r for r in table if r["cluster"] == "all" and r["feature"] == "onset"]
    headline.sort(key=lambda r: -abs(r["mean"]))
    summary = {"complete": True, "version": FORMAT_VERSION, "n_materials": len(plan_["rows"]), "n_shards": n_shards,
               "n_edits": len(edits), "n_rejects": len(rejects), "rejects_by_reason": dict(sorted(reasons.items())),
               "n_extrapolated": n_extra, "cluster_column": plan_.get("cluster_column"),
               "reference": plan_["reference"], "options": plan_["options"],
               "edits_by_type": {t: sum(r["type"] == t for r in edits) for t in op.EDIT_TYPES},
               "headline": [r["sentence"] for r in headline[:10]],
               "effects": [r for r in table if r["cluster"] == "all"],
               "attribution": {k: attr[k] for k in ("n_materials", "completeness_error_max",
                                                     "completeness_error_median", "share_mean", "target_kinds")},
               "maps": maps,
               "files": {"edits": "edits.csv", "rejects": "rejects.csv", "table": "summary.csv",
                         "attributions": "attributions.json"}}
    write_json(op.summary_path(run_dir), summary)
    log.info("explain finalized: %d edits, %d rejects, %d extrapolated", len(edits), len(rejects), n_extra)
    return summary


MAX_MAPS = 24  # attribution maps drawn at most: the representatives of the first clusters


def _draw_maps(run_dir: Path, reps: list[dict]) -> list[dict]:
    """Attribution maps (:func:`toolkit.explain.maps.attribution_map`) of the representatives of each
    cluster, at most MAX_MAPS, as ``explain/figures/map_<k>.png``; their index for summary.json."""
    import matplotlib.pyplot as plt

    from toolkit.explain.maps import attribution_map
    from toolkit.runtime import atomic_write

    if not reps:
        return []
    reader = _reader(run_dir)
    row_of = {str(x): i for i, x in enumerate(reader.ids)}
    # every cluster's representatives (explain.representatives each), clusters in order, at most MAX_MAPS
    chosen = sorted((r for r in reps if str(r["id"]) in row_of), key=lambda r: int(r["cluster"]))
    out = []
    figdir = op.explain_dir(run_dir) / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    for k, r in enumerate(chosen[:MAX_MAPS]):
        m = reader.material(row_of[str(r["id"])])
        fig = attribution_map(r, np.asarray(m["lattice"]), np.asarray(m["frac_coords"]))
        path = figdir / f"map_{k}.png"
        atomic_write(path, lambda fh, fig=fig: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
        out.append({"id": r["id"], "formula": r.get("formula"), "cluster": r["cluster"],
                    "target_kind": r.get("target_kind"), "file": f"figures/{path.name}"})
    return out


def outputs(run_dir: Path) -> list[tuple[str, Path]]:
    """What explain wrote (its closing summary, :func:`toolkit.sharded.closing_summary`)."""
    return [("edits", op.edits_path(run_dir)), ("shifts", op.table_path(run_dir)),
            ("attributions", op.attributions_path(run_dir)), ("rejects", op.rejects_path(run_dir)),
            ("maps", op.explain_dir(run_dir) / "figures"), ("summary", op.summary_path(run_dir)),
            ("report", RunLayout(run_dir).report)]


def after_finalize(cfg: Any, run_dir: Path, summary: dict) -> None:
    """Put the counterfactual tables (and their comparison with the driver ranking) into the analyze
    report when analyze has run in ``run_dir``."""
    from toolkit.analyze import rerender_report

    path = rerender_report(Path(run_dir))
    if path is not None:
        log.info("report updated with the counterfactual probes: %s", path)


def _join_csv(run_dir: Path, n_shards: int, kind: str) -> str:
    parts = [op.shard_file(run_dir, s, kind).read_text().splitlines(keepends=True) for s in range(n_shards)]
    return "".join(parts[0][:1] + [line for p in parts for line in p[1:]]) if parts else ""


def run(cfg: Any, run_dir: Path) -> dict:
    """plan + every unfinished shard + finalize, in this process."""
    from toolkit import sharded
    from toolkit.config import record_run

    record_run(cfg, Path(run_dir), NAME)
    return sharded.run_inline(__name__, cfg, run_dir)


def explain_summary_for_report(run_dir: Path, top: int = 15) -> dict:
    """Tables ready to render (lists of flat dicts with a ``columns`` order) from a finished explain stage;
    ``{"available": False, "reason": ...}`` when the stage has not completed."""
    from toolkit.analyze.figures import png_data_uri

    run_dir = Path(run_dir)
    if not op.is_complete(run_dir):
        return {"available": False, "reason": f"{op.summary_path(run_dir)} missing or incomplete"}
    summary = json.loads(op.summary_path(run_dir).read_text())
    attr = json.loads(op.attributions_path(run_dir).read_text())
    effects = [r for r in summary["effects"] if r["feature"] in ("onset", "edge_integral", "peak_1", "target", "spectrum_mae")]
    effects.sort(key=lambda r: (r["feature"] != "onset", -abs(r["mean"])))
    by_cluster = [r for r in read_table(op.table_path(run_dir)) if r["cluster"] != "all" and r["feature"] == "onset"]

    def fmt(rows: list[dict], cols: list[str]) -> dict:
        return {"columns": cols, "rows": [{c: r.get(c) for c in cols} for r in rows]}

    return {
        "available": True,
        "headline": summary["headline"],
        "onset_effects": [{"type": r["type"], "feature": r["feature"], "n": r["n"], "mean": r["mean"]}
                          for r in summary["effects"] if r["feature"] == "onset"],  # every edit, for the comparison
        "counts": {k: summary[k] for k in ("n_materials", "n_edits", "n_rejects", "n_extrapolated")},
        "effects": fmt(effects[:4 * top], ["type", "label", "feature", "n", "mean", "std", "n_same_sign",
                                           "n_extrapolated", "sentence"]),
        "effects_by_cluster": fmt(sorted(by_cluster, key=lambda r: (int(r["cluster"]), -abs(_f(r["mean"]))))[:4 * top],
                                  ["cluster", "type", "label", "n", "mean", "std", "n_same_sign", "sentence"]),
        "rejects": fmt([{"reason": k, "count": v} for k, v in summary["rejects_by_reason"].items()], ["reason", "count"]),
        "attribution_elements": fmt(attr["element"][:top], ["key", "mean_per_material", "mean_per_item", "count",
                                                            "n_materials"]),
        "attribution_bonds": fmt(attr["bond"][:top], ["key", "mean_per_material", "mean_per_item", "count",
                                                      "n_materials"]),
        "attribution_angles": fmt(attr["angle"][:top], ["key", "mean_per_material", "mean_per_item", "count",
                                                        "n_materials"]),
        "attribution_by_cluster": fmt([{"cluster": c, "n": v["n_materials"],
                                        **{f"top {g}": ", ".join(f"{r['key']} ({r['mean_per_material']:+.3g})"
                                                                 for r in v[g][:2]) for g in ("element", "bond", "angle")}}
                                       for c, v in (attr.get("by_cluster") or {}).items() if c != "-1"][:4 * top],
                                      ["cluster", "n", "top element", "top bond", "top angle"]),
        "attribution_quality": summary["attribution"],
        "maps": [{**mp, "data_uri": png_data_uri((op.explain_dir(run_dir) / mp["file"]).read_bytes())}
                 for mp in summary.get("maps", []) if (op.explain_dir(run_dir) / mp["file"]).is_file()],
        "representatives": [{"id": r["id"], "formula": r["formula"], "cluster": r["cluster"],
                             "top_atoms": sorted(r["atoms"], key=lambda a: -abs(a["attribution"]))[:5],
                             "completeness_error": r["completeness_error"]} for r in attr["representatives"]],
    }
