"""The ``predict`` stage: spectra of new structures from a trained model or ensemble, into an output folder.

A sharded stage (the contract: :mod:`toolkit.sharded`; units are *shards* of ``predict.shard_size``
records), so large inputs run on local workers, MPI ranks or a SLURM array like ``embed``. The
"run directory" of the contract is the output folder ``OUT``:

* :func:`plan` (idempotent): loads the model once (a bad checkpoint fails here, before any worker),
  scans every input (:mod:`toolkit.predict.inputs`) into ``OUT/plan.json``: the record keys in order,
  the scan's rejects, the model's identity. A second plan on the same folder with other inputs or
  another model is refused.
* :func:`run_units`: reads each shard's records, checks them (:func:`check_item`), builds their
  graphs with the model's graph settings, runs every member batched on ``predict.device``
  (``toolkit.runtime.select_device``) with a progress bar, and writes ``OUT/shards/<u>.rejects.csv``
  then ``OUT/shards/<u>.npz`` (the completion record).
* :func:`finalize`: merges the shards into ``predictions.csv`` (one row per material),
  ``predictions.zarr`` (opens with ``xarray.open_zarr``: dims ``material`` x ``energy``, labelled),
  ``rejects.csv`` (file, record, reason of every structure not predicted), ``figures/`` (``predict.plot``),
  ``experiment/`` (``predict.compare_experiment``) and ``summary.json`` (``complete: true`` last).

Nothing here imports :mod:`toolkit.hpc`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.config import PipelineConfig, record_run
from toolkit.data.readers.common import duplicate_reason, reason
from toolkit.data.records import REJECT_COLUMNS, Reject, read_rejects, write_rejects
from toolkit.predict.models import PredictError, Predictor, load_predictor
from toolkit.runtime import (
    atomic_write,
    json_safe,
    select_device,
    write_json,
    write_text,
)

log = logging.getLogger(__name__)

NAME = "predict"
UNIT = "shard"
PRELOAD = ("torch", "pymatgen.core", "toolkit.model")
Error = PredictError
#: module path for :mod:`toolkit.sharded` / the launcher (predict is not one of the pipeline's stages)
MODULE = __name__

SCALARS = ("onset", "onset_std", "onset_low", "onset_high", "edge_integral", "peak_1", "peak_2", "peak_3",
           "spectrum_std_mean")
UNITS = {"onset": "eV", "onset_std": "eV", "onset_low": "eV", "onset_high": "eV", "edge_integral": "eV*decade",
         "peak_1": "eV", "peak_2": "eV", "peak_3": "eV"}


class Out:
    """Paths of a predict output folder (plain attributes)."""

    def __init__(self, root: str | Path) -> None:
        r = self.root = Path(root)
        self.plan, self.shards, self.summary = r / "plan.json", r / "shards", r / "summary.json"
        self.csv, self.zarr, self.rejects = r / "predictions.csv", r / "predictions.zarr", r / "rejects.csv"
        self.figures, self.experiment = r / "figures", r / "experiment"

    def shard(self, u: int) -> Path:
        return self.shards / f"{int(u):05d}.npz"

    def shard_rejects(self, u: int) -> Path:
        return self.shards / f"{int(u):05d}.rejects.csv"


def workers(cfg: PipelineConfig) -> int:
    return cfg.predict.workers


def device(cfg: PipelineConfig) -> str:
    return cfg.predict.device


def is_complete(out: str | Path) -> bool:
    try:
        return json.loads(Out(out).summary.read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------------------------------ plan
def _signature(cfg: PipelineConfig, pred: Predictor) -> dict:
    p = cfg.predict
    return {"inputs": [str(Path(i).resolve()) for i in p.inputs], "source": p.source,
            "checkpoint": str(Path(p.checkpoint).resolve()), "model_sha256": pred.identity,
            "min_atoms": p.min_atoms, "min_distance": p.min_distance or cfg.data.min_distance,
            "shard_size": p.shard_size, **({"conditions": json_safe(p.conditions)} if p.conditions else {})}


def plan(cfg: PipelineConfig, run_dir: Path) -> int:
    """Scan the inputs into ``OUT/plan.json`` once (or check the existing plan); returns the number of shards."""
    from toolkit.predict.inputs import open_input

    out = Out(run_dir)
    p = cfg.predict
    if not p.inputs:
        raise PredictError("no inputs: give structure files or folders (predict.inputs)")
    pred = load_predictor(cfg, "cpu")
    sig = _signature(cfg, pred)
    if out.plan.is_file():
        old = json.loads(out.plan.read_text())
        diff = [k for k in sig if old.get("signature", {}).get(k) != sig[k]]
        if diff:
            raise PredictError(f"{out.root} holds predictions planned with other settings ({', '.join(diff)} differ): "
                               f"use another output folder, or delete {out.root} to predict again")
        return int(old["n_units"])
    records: list[list] = []
    rejects: list[Reject] = []
    for i, path in enumerate(p.inputs):
        keys, rj = open_input(cfg, path).scan()
        records += [[i, k] for k in keys]
        rejects += rj
        log.info("input %s: %d records, %d rejected while scanning", path, len(keys), len(rj))
    n_units = math.ceil(len(records) / p.shard_size)
    write_json(out.plan, {"signature": sig, "records": records, "n_units": n_units,
                          "scan_rejects": [[r.source_file, r.record, r.reason] for r in rejects],
                          "energy": pred.energy.tolist(), "n_members": pred.n_members, "kind": pred.kind,
                          "model_files": [str(f) for f in pred.paths]})
    log.info("planned %s: %d records in %d shards of %d, %d member(s)", out.root, len(records), n_units, p.shard_size,
             pred.n_members)
    return n_units


def _plan(out: Out) -> dict:
    try:
        return json.loads(out.plan.read_text())
    except (OSError, ValueError) as e:
        raise PredictError(f"{out.plan} cannot be read ({e}): run predict again to plan") from None


def unit_done(run_dir: Path, shard: int) -> bool:
    return Out(run_dir).shard(shard).is_file()


# ------------------------------------------------------------------------------------------ one shard
def check_item(material: Any, pred: Predictor, min_atoms: int) -> str | None:
    """Why the model cannot take this material (None: it can): too few atoms, elements without atom features."""
    s = material.structure
    if len(s) < min_atoms:
        return reason("too few atoms", f"{len(s)} atom(s) (< predict.min_atoms = {min_atoms})")
    zmax = pred.max_z
    bad = sorted({(site.specie.Z, site.specie.symbol) for site in s if getattr(site.specie, "Z", 0) > zmax}) \
        if s.is_ordered else []
    if bad:
        return reason("element outside the model's embedding",
                      f"{', '.join(f'{el} (Z={z})' for z, el in bad)}: atom features exist for Z = 1..{zmax} only")
    return None


def predict_materials(materials: list, pred: Predictor, cfg: PipelineConfig, dev: Any,
                      desc: str = "predict") -> tuple[list, dict[str, np.ndarray], list[Reject]]:
    """Check, graph and predict ``materials`` (Material records) with every member of ``pred``.

    Returns (materials predicted, arrays: ``spectrum`` (n, G), ``spectrum_std`` (n, G), ``member_onset``
    (M, n), the :data:`SCALARS` (n,) and ``n_atoms``; rejects). Statistics: :mod:`toolkit.train.ensemble`;
    spectral features: :func:`toolkit.explain.probes.spectrum_features` (onset, edge, peaks)."""
    from tqdm.auto import tqdm

    from toolkit.explain.probes import predict as run_model
    from toolkit.explain.probes import spectrum_features, try_graph
    from toolkit.train import ensemble as E

    p = cfg.predict
    kept, items, rejects = [], [], []
    for m in materials:
        why = check_item(m, pred, p.min_atoms)
        item = None
        if why is None:
            try:
                item, why = try_graph(m.structure, pred.graph, len(items), m.id)
            except Exception as e:  # noqa: BLE001 - any structure the graph builder cannot take is a reject
                why = reason("no graph", f"{type(e).__name__}: {e}")
        if why is not None:
            prov = m.provenance or {}
            rejects.append(Reject(str(prov.get("file", "")), str(prov.get("record", m.id)), why))
            continue
        sets, why = condition_sets(m, pred.conditions, p.conditions)
        if why is not None:
            prov = m.provenance or {}
            rejects.append(Reject(str(prov.get("file", "")), str(prov.get("record", m.id)), why))
            continue
        for suffix, values in sets:  # one prediction per condition combination (none: one)
            kept.append(m if not suffix else replace(m, id=m.id + suffix))
            items.append(item if values is None else {**item, "conditions": values, "index": len(items),
                                                      "id": m.id + suffix})
    n, g, mcount = len(items), len(pred.energy), pred.n_members
    preds = np.zeros((mcount, n, g), dtype=np.float32)
    step = max(p.batch_size * 4, 1)
    with tqdm(total=n * mcount, desc=desc, unit="structure", disable=not n, leave=False) as bar:
        for k, model in enumerate(pred.models):
            for a in range(0, n, step):
                preds[k, a:a + step] = run_model(model, items[a:a + step], p.batch_size, dev, readout=False).spectrum
                bar.update(min(step, n - a))
    summ = E.summarize(pred.energy, preds, pred.onset_threshold, pred.transform, pred.log_floor, pred.std_scale,
                       pred.onset_std_scale)
    mean = summ["mean"]
    arrays: dict[str, np.ndarray] = {"spectrum": mean.astype(np.float32), "spectrum_std": summ["std"].astype(np.float32)}
    feats = spectrum_features(pred.energy, mean, pred) if n else {k: np.zeros(0) for k in
                                                                  ("onset", "edge_integral", "peak_1", "peak_2", "peak_3")}
    arrays["member_onset"] = summ["member_onset"].reshape(mcount, n)
    for k in ("onset", "onset_std", "onset_low", "onset_high"):  # the ensemble's onset: mean of the members' onsets
        arrays[k] = np.asarray(summ[k], dtype=np.float64).reshape(n)
    for k in ("edge_integral", "peak_1", "peak_2", "peak_3"):
        arrays[k] = np.asarray(feats[k], dtype=np.float64)
    arrays["spectrum_std_mean"] = (np.nanmean(arrays["spectrum_std"], axis=1) if mcount > 1 and n
                                   else np.full(n, np.nan))
    arrays["n_atoms"] = np.array([len(m.structure) for m in kept], dtype=np.int64)
    for j, c in enumerate(pred.conditions):
        arrays[f"condition:{c}"] = np.array([it["conditions"][j] for it in items], dtype=np.float64)
    spec = pred.spec
    if spec is not None and spec.kind != "absorption":  # no log10-alpha onset: the target's own features
        for k in ("onset", "onset_std", "onset_low", "onset_high", "edge_integral", "peak_1", "peak_2", "peak_3"):
            arrays[k] = np.full(n, np.nan)
        arrays["member_onset"] = np.full((mcount, n), np.nan)
        got = spec.features(pred.energy, mean) if n else {f: np.zeros(0) for f in spec.feature_names}
        for f in spec.feature_names:
            arrays[f] = np.asarray(got[f], dtype=np.float64)
    return kept, arrays, rejects


def condition_sets(m: Any, names: tuple[str, ...], asked: dict) -> tuple[list[tuple[str, np.ndarray | None]], str | None]:
    """The condition values to predict material ``m`` at: ``[(id suffix, (C,) values)]`` — every combination
    of ``predict.conditions`` (a value or a list per condition), else the record's own fields; ``[("", None)]``
    for a model without conditions; or a reject reason."""
    if not names:
        return [("", None)], None
    if asked:
        missing = [c for c in names if c not in asked]
        if missing:
            return [], reason("missing condition", f"the model takes conditions {list(names)}; predict.conditions "
                                                   f"lacks {missing}")
        grids = [np.atleast_1d(np.asarray(asked[c], dtype=np.float64)) for c in names]
        combos = np.array(np.meshgrid(*grids, indexing="ij")).reshape(len(names), -1).T
        return [("@" + ",".join(f"{c}={v:g}" for c, v in zip(names, row)), row) for row in combos], None
    props = m.properties or {}
    vals = []
    for c in names:
        v = props.get(c)
        try:
            v = float(v)
        except (TypeError, ValueError):
            v = float("nan")
        if not np.isfinite(v):
            return [], reason("missing condition", f"the model takes conditions {list(names)}: give predict.conditions "
                                                   f"(e.g. --set predict.conditions.{c}=300) or a field {c!r} per record")
        vals.append(v)
    return [("", np.asarray(vals))], None


def run_units(cfg: PipelineConfig, run_dir: Path, shards: list[int]) -> None:
    """Predict ``shards`` (the caller holds their locks, see :mod:`toolkit.sharded`)."""
    from toolkit.predict.inputs import open_input

    out = Out(run_dir)
    pl = _plan(out)
    dev = select_device(cfg.predict.device, setting="predict.device")
    pred = load_predictor(cfg, dev)
    if pred.identity != pl["signature"]["model_sha256"]:
        raise PredictError(f"the model files changed since {out.plan} was written: delete {out.root} and predict again")
    readers: dict[int, Any] = {}
    size = cfg.predict.shard_size
    for u in shards:
        t0 = time.monotonic()
        recs = pl["records"][u * size:(u + 1) * size]
        materials, rejects = [], []
        by_input: dict[int, list[str]] = {}
        for i, k in recs:
            by_input.setdefault(i, []).append(k)
        for i, keys in by_input.items():
            if i not in readers:
                readers[i] = open_input(cfg, cfg.predict.inputs[i])
            for m in readers[i].load(keys):
                (rejects if isinstance(m, Reject) else materials).append(m)
        kept, arrays, bad = predict_materials(materials, pred, cfg, dev, desc=f"predict shard {u}")
        rejects += bad
        out.shards.mkdir(parents=True, exist_ok=True)
        write_rejects(out.shard_rejects(u), rejects)
        meta = np.array([[m.id, m.formula, str(m.provenance.get("file", "")), str(m.provenance.get("record", m.id))]
                         for m in kept], dtype=str).reshape(len(kept), 4)

        def save(fh, arrays=arrays, meta=meta) -> None:
            np.savez(fh, meta=meta, **arrays)

        atomic_write(out.shard(u), save)
        log.info("shard %d: %d predicted, %d rejected in %.1f s on %s", u, len(kept), len(rejects),
                 time.monotonic() - t0, dev)


# ------------------------------------------------------------------------------------------ finalize
def load_result(run_dir: Path) -> dict:
    """All shards merged: ``ids``, ``formula``, ``file``, ``record`` (lists), ``energy`` (G,), the arrays of
    :func:`predict_materials` concatenated in plan order, duplicate ids moved to ``rejects``."""
    out = Out(run_dir)
    pl = _plan(out)
    missing = [u for u in range(pl["n_units"]) if not unit_done(run_dir, u)]
    if missing:
        raise PredictError(f"{out.root}: shards {missing[:10]} are not done: run predict again to finish them")
    energy = np.asarray(pl["energy"], dtype=np.float64)
    mcount = int(pl["n_members"])
    parts: dict[str, list[np.ndarray]] = {}
    meta: list[np.ndarray] = []
    rejects = [Reject(*r) for r in pl["scan_rejects"]]
    for u in range(pl["n_units"]):
        with np.load(out.shard(u)) as z:
            meta.append(z["meta"])
            for k in z.files:
                if k != "meta":
                    parts.setdefault(k, []).append(z[k])
        rejects += read_rejects(out.shard_rejects(u))
    g = len(energy)
    arrays = {k: (np.concatenate(v, axis=1) if k == "member_onset" else np.concatenate(v)) for k, v in parts.items()}
    if not parts:
        arrays = {"spectrum": np.zeros((0, g), np.float32), "spectrum_std": np.zeros((0, g), np.float32),
                  "member_onset": np.zeros((mcount, 0)), "n_atoms": np.zeros(0, np.int64),
                  **{k: np.zeros(0) for k in SCALARS}}
    m = np.concatenate(meta) if meta else np.zeros((0, 4), dtype=str)
    seen: dict[str, str] = {}
    keep = []
    for row, (i, _f, file, rec) in enumerate(m.tolist()):
        if i in seen:
            rejects.append(Reject(file, rec, duplicate_reason(i, seen[i])))
        else:
            seen[i] = f"{file} ({rec})"
            keep.append(row)
    keep_a = np.asarray(keep, dtype=np.int64)
    arrays = {k: (v[:, keep_a] if k == "member_onset" else v[keep_a]) for k, v in arrays.items()}
    m = m[keep_a] if len(m) else m
    return {"ids": m[:, 0].tolist(), "formula": m[:, 1].tolist(), "file": m[:, 2].tolist(),
            "record": m[:, 3].tolist(), "energy": energy, "n_members": mcount, "rejects": rejects,
            "plan": pl, **arrays}


def _fmt(x: float) -> str:
    return "" if not np.isfinite(x) else f"{x:.8g}"


def write_csv(path: Path, res: dict) -> None:
    """One row per material: id, formula, file, record, n_atoms, the scalar features, then the spectrum
    (columns ``spectrum_<E>eV``) and, for ensembles, its standard deviation (``std_<E>eV``)."""
    e = res["energy"]
    ens = res["n_members"] > 1
    head = ["id", "formula", "source_file", "record", "n_atoms", "n_members"] + [
        f"{k}_{UNITS[k]}" if k in UNITS and UNITS[k] == "eV" else k for k in SCALARS]
    extra = extra_columns(res)
    head += [k.replace(":", "_") for k in extra]
    head += [f"spectrum_{x:.4f}eV" for x in e] + ([f"std_{x:.4f}eV" for x in e] if ens else [])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(head)
    for i, mid in enumerate(res["ids"]):
        row = [mid, res["formula"][i], res["file"][i], res["record"][i], int(res["n_atoms"][i]), res["n_members"]]
        row += [_fmt(float(res[k][i])) for k in SCALARS]
        row += [_fmt(float(res[k][i])) for k in extra]
        row += [_fmt(float(x)) for x in res["spectrum"][i]]
        if ens:
            row += [_fmt(float(x)) for x in res["spectrum_std"][i]]
        w.writerow(row)
    write_text(path, buf.getvalue())


def extra_columns(res: dict) -> list[str]:
    """Per-material arrays beyond :data:`SCALARS`: the conditions (``condition:<name>``) of models with
    condition inputs and the features of non-absorption targets (``target:<feature>``)."""
    return sorted(k for k in res if k.startswith(("condition:", "target:")))


def write_zarr(path: Path, res: dict, attrs: dict) -> None:
    """``predictions.zarr`` (Zarr v3, written whole into a temporary folder, then renamed): coordinates
    ``material`` (ids) and ``energy`` (eV); ``spectrum``/``spectrum_std`` (material, energy); per material
    ``formula``, ``n_atoms`` and the :data:`SCALARS`; ``member_onset`` (member, material).
    ``xarray.open_zarr(path)`` gives a labelled Dataset."""
    import shutil
    import uuid

    import zarr

    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    n, g = len(res["ids"]), len(res["energy"])
    root = zarr.create_group(tmp, zarr_format=3, attributes=json_safe({"format": "spectrolens-predictions",
                                                                       "version": 1, **attrs}))

    def arr(name: str, data: np.ndarray, dims: tuple[str, ...], units: str | None = None, fill: Any = None) -> None:
        a = root.create_array(name, shape=data.shape, dtype=data.dtype, dimension_names=dims,
                              chunks=tuple(max(1, s) for s in data.shape), fill_value=fill)
        if data.size:
            a[...] = data
        if units:
            a.attrs["units"] = units

    arr("energy", np.asarray(res["energy"], dtype=np.float64), ("energy",), "eV", np.nan)
    arr("material", np.asarray(res["ids"], dtype=str).astype(np.dtypes.StringDType()), ("material",), fill="")
    arr("formula", np.asarray(res["formula"], dtype=str).astype(np.dtypes.StringDType()), ("material",), fill="")
    arr("n_atoms", np.asarray(res["n_atoms"], dtype=np.int64).reshape(n), ("material",), fill=0)
    arr("spectrum", np.asarray(res["spectrum"], dtype=np.float32).reshape(n, g), ("material", "energy"),
        attrs.get("transform"), np.nan)
    arr("spectrum_std", np.asarray(res["spectrum_std"], dtype=np.float32).reshape(n, g), ("material", "energy"),
        attrs.get("transform"), np.nan)
    for k in SCALARS:
        arr(k, np.asarray(res[k], dtype=np.float64).reshape(n), ("material",), UNITS.get(k), np.nan)
    for k in extra_columns(res):
        arr(k.replace(":", "_"), np.asarray(res[k], dtype=np.float64).reshape(n), ("material",), None, np.nan)
    arr("member_onset", np.asarray(res["member_onset"], dtype=np.float64).reshape(-1, n), ("member", "material"),
        "eV", np.nan)
    with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec": xarray reads it fast
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(tmp, zarr_format=3)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def outputs(run_dir: Path) -> list[tuple[str, Path]]:
    """What predict wrote (its closing summary, :func:`toolkit.sharded.closing_summary`)."""
    out = Out(run_dir)
    items = [("predictions", out.csv), ("zarr", out.zarr), ("rejects", out.rejects)]
    items += [(label, p) for label, p in (("figures", out.figures), ("experiment", out.experiment / "index.html"))
              if p.exists()]
    return items


def finalize(cfg: PipelineConfig, run_dir: Path) -> dict:
    """Merge every shard into the outputs (see the module docstring); mark complete last. Idempotent."""
    out = Out(run_dir)
    if is_complete(run_dir):
        return json.loads(out.summary.read_text())
    res = load_result(run_dir)
    pl = res["plan"]
    attrs = {"checkpoint": pl["signature"]["checkpoint"], "model_sha256": pl["signature"]["model_sha256"],
             "model_kind": pl["kind"], "model_files": pl["model_files"], "n_members": res["n_members"],
             "inputs": pl["signature"]["inputs"]}
    pred = load_predictor(cfg, "cpu")
    attrs.update({"transform": pred.transform, "log_floor": pred.log_floor, "onset_threshold": pred.onset_threshold,
                  "std_scale": pred.std_scale, "onset_std_scale": pred.onset_std_scale,
                  "onset_interval": "onset ± 2 onset_std (onset_low, onset_high)"})
    write_csv(out.csv, res)
    write_zarr(out.zarr, res, attrs)
    n_rej = write_rejects(out.rejects, res["rejects"])
    summary: dict[str, Any] = {"complete": False, "n_predicted": len(res["ids"]), "n_rejected": n_rej,
                               "rejects_by_reason": dict(Counter(r.reason.split(":")[0] for r in res["rejects"])),
                               **attrs, "outputs": {"csv": str(out.csv), "zarr": str(out.zarr),
                                                    "rejects": str(out.rejects)}}
    if cfg.predict.plot and res["ids"]:
        from toolkit.predict.figures import plot_predictions

        summary["outputs"]["figures"] = [str(p) for p in plot_predictions(res, pred, out.figures,
                                                                         cfg.predict.plot_single_max)]
    if cfg.predict.compare_experiment is not None:
        from toolkit.predict.experiment import compare_experiment

        comp = compare_experiment(res, pred, cfg.predict.compare_experiment, out.experiment)
        summary["experiment"] = {"n_matched": len(comp.rows), "table": str(out.experiment / "comparison.csv"),
                                 "html": str(out.experiment / "index.html")}
    write_json(out.summary, summary)  # first without, then with the completion mark (written last)
    summary["complete"] = True
    write_json(out.summary, summary)
    log.info("predicted %d materials (%d rejected): %s", summary["n_predicted"], n_rej, out.csv)
    return summary


def run(cfg: PipelineConfig, run_dir: Path) -> dict:
    """plan + every unfinished shard + finalize in this process (library use, one worker)."""
    from toolkit import sharded

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    record_run(cfg, Path(run_dir), NAME)
    return sharded.run_inline(MODULE, cfg, run_dir)


__all__ = ["NAME", "UNIT", "Error", "Out", "plan", "unit_done", "run_units", "finalize", "outputs", "workers", "device",
           "run",
           "load_result", "predict_materials", "check_item", "REJECT_COLUMNS"]
