"""The ``prepare`` stage: a data source -> ``RUN_DIR/dataset.zarr`` (structures, graphs, spectra, descriptors).

A sharded stage (the contract: :mod:`toolkit.sharded`; units are *parts* of ``data.shard_size``
records): :func:`plan` (scan, plan file, store skeleton), :func:`unit_done`, :func:`run_units` /
:func:`run_part` (build parts from scratch), :func:`finalize` (check parts, merge rejects, index,
summary, then ``complete: true`` last), :func:`run` (all of it in this process). Where the parts are
built (local worker processes, MPI ranks, SLURM array tasks) is the launcher's choice
(:mod:`toolkit.hpc.launch`); this module imports nothing from it.

Files under ``RUN_DIR/prepare/``: ``plan.json`` (keys per part and the config fingerprint),
``scan_rejects.csv``, ``parts/<part>.rejects.csv`` (written before the part's completion record),
and from finalize ``rejects.csv`` (every rejected record: source_file,record,reason) and
``summary.json`` (counts per source and reason).

A killed run leaves complete parts untouched; re-running rebuilds only incomplete parts. A config
that changes the data (source, grid, transform, graph parameters, ...) against an existing plan or
store is refused with a :class:`~toolkit.config.ConfigError`, never mixed in.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.config import ConfigError, PipelineConfig, record_run
from toolkit.data import store
from toolkit.data.graphs import graph_from_config
from toolkit.data.records import Material, Reject, read_rejects, write_rejects
from toolkit.errors import SpectrolensError
from toolkit.layout import RunLayout
from toolkit.runtime import write_json

log = logging.getLogger("spectrolens.prepare")

NAME = "prepare"
UNIT = "part"
PRELOAD = ("toolkit.data.readers", "pymatgen.core", "zarr")  # imported once by the local workers' fork server
_GAP_KEYS = ("direct_gap", "indirect_gap")


class PrepareError(SpectrolensError, RuntimeError):
    """prepare cannot finish as asked (the message names the part, file or setting)."""


Error = PrepareError


def store_path(run_dir: str | os.PathLike) -> Path:
    return RunLayout(run_dir).dataset


def _prep_dir(run_dir: str | os.PathLike) -> Path:
    return RunLayout(run_dir).prepare_dir


def workers(cfg: PipelineConfig) -> int:
    """Local worker processes of this stage (``data.workers``)."""
    return cfg.data.workers


def device(cfg: PipelineConfig) -> str:
    return "cpu"


def fingerprint(cfg: PipelineConfig) -> dict:
    """Everything in the config that changes the prepared data (not workers, not strict)."""
    d = cfg.data
    fp: dict[str, Any] = {
        "source": d.source, "path": str(Path(d.path).resolve()) if d.path is not None else None,
        "id_prop": d.id_prop, "grid": d.grid.model_dump(), "transform": d.transform, "log_floor": d.log_floor,
        "onset_threshold": d.onset_threshold, "min_distance": d.min_distance, "shard_size": d.shard_size,
        "graph": cfg.graph.model_dump(),
    }
    if d.target.model_dump() != type(d.target)().model_dump():  # only non-default targets (older plans stay valid)
        fp["target"] = d.target.model_dump()
    if d.source == "benchmark":
        fp["benchmark"] = d.benchmark.model_dump()
        if not d.benchmark.temperatures:
            fp["benchmark"].pop("temperatures")
    if d.source == "realbench":
        fp["realbench"] = d.realbench.model_dump(mode="json")
    return json.loads(json.dumps(fp))


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _refuse_if_changed(old: dict, new: dict, what: Path) -> None:
    changes = _diff(old, new)
    if changes:
        raise ConfigError(
            f"{what} was prepared with a different data/graph configuration ({'; '.join(changes)}); "
            f"refusing to mix datasets. Use a new run directory, or delete {what.parent / 'dataset.zarr'} and "
            f"{what.parent} to prepare again")


def load_plan(cfg: PipelineConfig, run_dir: str | os.PathLike) -> dict:
    """The plan of ``run_dir`` (raises ConfigError if missing or made with another config)."""
    path = _prep_dir(run_dir) / "plan.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run `spectrolens prepare` (or prepare.plan) first")
    plan = json.loads(path.read_text())
    _refuse_if_changed(plan["fingerprint"], fingerprint(cfg), path)
    return plan


def _root_attrs(cfg: PipelineConfig, source: Any, n_parts: int, n_keys: int) -> dict:
    from toolkit.data.spectra import energy_grid

    from toolkit.data.targets import TargetSpec

    d = cfg.data
    spec = TargetSpec.from_config(d)
    attrs = {
        "n_parts": n_parts, "n_planned": n_keys, "grid": d.grid.model_dump(),
        "energy": spec.axis(energy_grid(d.grid.start, d.grid.stop, d.grid.num)).tolist(), "units": spec.x_units,
        "target": spec.to_attrs(),
        "transform": d.transform, "log_floor": d.log_floor, "onset_threshold": d.onset_threshold,
        "source": source.metadata(), "graph": cfg.graph.model_dump(), "prepare_config": fingerprint(cfg),
    }
    if d.source == "benchmark":
        from toolkit.data.benchmark import benchmark_truth

        attrs["benchmark_truth"] = benchmark_truth(cfg)
    if d.source == "realbench":
        from toolkit.data.realbench import realbench_truth

        attrs["benchmark_truth"] = realbench_truth(cfg)
    return json.loads(json.dumps(attrs, default=str))


def plan(cfg: PipelineConfig, run_dir: str | os.PathLike) -> int:
    """Scan the source, write ``prepare/plan.json`` and create the store skeleton (once); returns n_parts.

    Idempotent: an existing plan with the same fingerprint is reused (the source is not re-scanned);
    a different fingerprint raises ConfigError. Concurrent callers are serialised by the launcher
    (:func:`toolkit.sharded.plan_once`)."""
    from toolkit.data.readers import open_source

    run_dir = Path(run_dir)
    fp = fingerprint(cfg)
    spath = store_path(run_dir)
    ppath = _prep_dir(run_dir) / "plan.json"
    skeleton = store.skeleton_complete(spath)  # False also for a skeleton a kill left half written: redone
    if ppath.is_file():
        existing = json.loads(ppath.read_text())
        _refuse_if_changed(existing["fingerprint"], fp, ppath)
        if skeleton:
            _refuse_if_changed(store.root_attrs(spath).get("prepare_config", {}), fp, spath)
            return int(existing["n_parts"])
    elif skeleton:
        _refuse_if_changed(store.root_attrs(spath).get("prepare_config", {}), fp, spath)
    source = open_source(cfg.data)
    t0 = time.perf_counter()
    keys, rejects = source.scan()
    size = cfg.data.shard_size
    parts = [keys[i:i + size] for i in range(0, len(keys), size)]
    write_rejects(_prep_dir(run_dir) / "scan_rejects.csv", rejects)
    write_json(ppath, {"fingerprint": fp, "n_parts": len(parts), "n_keys": len(keys),
                        "n_scan_rejects": len(rejects), "scan_seconds": time.perf_counter() - t0, "parts": parts})
    store.create_store(spath, _root_attrs(cfg, source, len(parts), len(keys)))
    log.info("prepare plan: %d records in %d parts of <= %d, %d rejected at scan -> %s",
             len(keys), len(parts), size, len(rejects), spath)
    return len(parts)


def _scalar(v: Any) -> float | str | None:
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    if isinstance(v, str):
        return v
    return None


def material_record(cfg: PipelineConfig, m: Material, energy: np.ndarray) -> store.MaterialRecord:
    """Graph, descriptors and extras of one material (raises on a material that cannot be used)."""
    from toolkit.data.spectra import spectral_descriptors

    s = m.structure
    if m.spectrum is not None and np.shape(m.spectrum) != (len(energy),):
        raise ValueError(f"target has shape {np.shape(m.spectrum)}, the dataset's target has {len(energy)} values")
    g = graph_from_config(s, cfg.graph, min_distance=cfg.data.min_distance)
    props = m.properties or {}
    if m.spectrum is not None and cfg.data.target.kind == "absorption":
        desc = spectral_descriptors(energy, np.asarray(m.spectrum, dtype=np.float64), threshold=cfg.data.onset_threshold,
                                    transform=cfg.data.transform, log_floor=cfg.data.log_floor, properties=props)
    else:
        desc = {k: float(props[k]) if props.get(k) is not None else np.nan for k in _GAP_KEYS}
    extras: dict[str, dict[str, float | str]] = {}
    factors: tuple[str, ...] = ()
    if m.source == "benchmark":
        from toolkit.data.benchmark import FACTORS as factors
    elif m.source == "realbench":
        from toolkit.data.realbench import FACTORS as factors
    conditions = set(cfg.data.target.conditions)
    for k, v in props.items():
        sv = _scalar(v)
        if sv is not None:
            group = ("conditions" if k in conditions else "group" if k == "structure_id"
                     else "benchmark" if k in factors else "properties")
            extras.setdefault(group, {})[k] = sv
    return store.MaterialRecord(
        id=m.id, formula=m.formula, numbers=np.asarray(s.atomic_numbers), frac_coords=np.asarray(s.frac_coords),
        lattice=np.asarray(s.lattice.matrix), edge_src=g.edge_src, edge_dst=g.edge_dst, edge_vec=g.edge_vec,
        spectrum=None if m.spectrum is None else np.asarray(m.spectrum, dtype=np.float32),
        descriptors=desc, extras=extras)


def condition_problem(m: Material, names: tuple[str, ...]) -> str | None:
    """Why a record lacks a usable value of a condition the dataset needs (data.target.conditions), or None."""
    for name in names:
        v = (m.properties or {}).get(name)
        try:
            ok = v is not None and not isinstance(v, bool) and np.isfinite(float(v))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            return (f"missing condition: field {name!r} is {'absent' if v is None else repr(v)}; every record needs "
                    f"a finite value of each data.target.conditions {list(names)}")
    return None


def _part_rejects_path(run_dir: Path, part: int) -> Path:
    return _prep_dir(run_dir) / "parts" / f"{store.part_name(part)}.rejects.csv"


def unit_done(run_dir: str | os.PathLike, part: int) -> bool:
    """Part ``part`` is complete (its completion record is there and so are its arrays)."""
    return store.part_complete(store_path(run_dir), part)


def run_units(cfg: PipelineConfig, run_dir: str | os.PathLike, parts: list[int]) -> None:
    """Build ``parts`` (each from scratch; the caller holds their locks, see :mod:`toolkit.sharded`)."""
    from toolkit.data.readers import open_source

    run_dir = Path(run_dir)
    pl = load_plan(cfg, run_dir)
    source = open_source(cfg.data)
    for part in parts:
        run_part(cfg, run_dir, part, plan=pl, source=source)


def run_part(cfg: PipelineConfig, run_dir: str | os.PathLike, part: int, *, plan: dict | None = None,
             source: Any = None) -> None:
    """Build part ``part`` from scratch (no-op if it is complete): load its keys, build graphs and
    descriptors, write its rejects, write the part group, mark it complete last."""
    from toolkit.data.readers import open_source
    from toolkit.data.spectra import energy_grid
    from toolkit.data.targets import TargetSpec

    run_dir = Path(run_dir)
    pl = plan if plan is not None else load_plan(cfg, run_dir)
    if not 0 <= part < pl["n_parts"]:
        raise ConfigError(f"part {part} does not exist: the plan has {pl['n_parts']} parts (0..{pl['n_parts'] - 1})")
    spath = store_path(run_dir)
    if store.part_complete(spath, part):
        log.info("part %s already complete; skipped", store.part_name(part))
        return
    t0 = time.perf_counter()
    keys = pl["parts"][part]
    spec = TargetSpec.from_config(cfg.data)
    energy = spec.axis(energy_grid(cfg.data.grid.start, cfg.data.grid.stop, cfg.data.grid.num))
    source = source if source is not None else open_source(cfg.data)
    records: list[store.MaterialRecord] = []
    rejects: list[Reject] = []
    seen = 0
    for item in source.load(keys):
        seen += 1
        if isinstance(item, Reject):
            rejects.append(item)
            continue
        problem = condition_problem(item, spec.conditions)
        if problem:
            prov = item.provenance or {}
            rejects.append(Reject(str(prov.get("file", item.source)), str(prov.get("record", item.id)), problem))
            continue
        try:
            records.append(material_record(cfg, item, energy))
        except Exception as e:  # one bad material never stops the run, and is never dropped silently
            prov = item.provenance or {}
            rejects.append(Reject(str(prov.get("file", item.source)), str(prov.get("record", item.id)),
                                  f"graph/descriptor construction failed: {type(e).__name__}: {e}"))
    if seen != len(keys):
        rejects.append(Reject(str(source.metadata().get("path")), f"part {store.part_name(part)}",
                              f"reader returned {seen} records for {len(keys)} keys"))
    write_rejects(_part_rejects_path(run_dir, part), rejects)
    attrs = store.write_part(spath, part, records, spec.n_outputs)
    log.info("part %s: %d materials, %d rejected, %d edges in %.1f s", store.part_name(part), len(records),
             len(rejects), attrs["n_edges"], time.perf_counter() - t0)


def _reason_kind(reason: str, record: str = "") -> str:
    """The kind of a reject reason for counting: the text before the first colon (readers write
    "<kind>: <specifics>"), with the record's own name and a formula masked where a reason has no colon."""
    kind = reason.split(":", 1)[0].strip() or reason
    if record:
        kind = re.sub(rf"(?<![\w-]){re.escape(record)}(?![\w-])", "<record>", kind)
    return re.sub(r"formula \S+", "formula <formula>", kind)


def finalize(cfg: PipelineConfig, run_dir: str | os.PathLike) -> dict:
    """Check every part is complete, merge rejects, write the index and summary, mark the store
    complete (the completion mark is the last write).

    Returns the summary (also ``prepare/summary.json``). A store that is already complete is left
    as it is and its summary returned."""
    run_dir = Path(run_dir)
    pl = load_plan(cfg, run_dir)
    spath = store_path(run_dir)
    sumpath = RunLayout(run_dir).prepare_summary
    if store.root_attrs(spath).get("complete") is True and sumpath.is_file():
        return json.loads(sumpath.read_text())
    n_parts = int(pl["n_parts"])
    missing = [p for p in range(n_parts) if not store.part_complete(spath, p)]
    if missing:
        raise store.IncompleteStoreError(
            f"{spath}: {len(missing)} of {n_parts} parts are not complete ({missing[:20]}); re-run "
            f"`spectrolens prepare` (or the missing array tasks) to build them")
    rejects = read_rejects(_prep_dir(run_dir) / "scan_rejects.csv")
    for p in range(n_parts):
        rejects += read_rejects(_part_rejects_path(run_dir, p))
    n_rej = write_rejects(RunLayout(run_dir).rejects, rejects)
    index = store.write_index(spath, n_parts)
    n = int(index["ids"].shape[0])
    by_reason = Counter(_reason_kind(r.reason, r.record) for r in rejects)
    by_file = Counter(r.source_file for r in rejects)
    counts = {"planned": int(pl["n_keys"]) + int(pl["n_scan_rejects"]), "materials": n, "rejected": n_rej,
              "with_spectrum": int(index["has_spectrum"].sum()), "atoms": int(index["natoms"].sum()),
              "edges": int(index["nedges"].sum())}
    summary = {"source": cfg.data.source, "store": str(spath), "n_parts": n_parts, "n_materials": n,
               "n_rejected": n_rej, "counts": counts, "rejects_by_reason": dict(by_reason),
               "rejects_by_source_file": dict(by_file), "graph": cfg.graph.model_dump()}
    write_json(sumpath, summary)  # before the completion mark: a complete store always has its summary
    store.mark_complete(spath, {"n_materials": n, "counts": counts, "rejects_by_reason": dict(by_reason)})
    log.info("prepare finalized: %d materials, %d rejected -> %s", n, n_rej, spath)
    if n == 0:
        log.warning("the dataset has no materials: every record was rejected (see %s)", RunLayout(run_dir).rejects)
    return summary


def outputs(run_dir: str | os.PathLike) -> list[tuple[str, Path]]:
    """What prepare wrote (its closing summary, :func:`toolkit.sharded.closing_summary`)."""
    lay = RunLayout(run_dir)
    return [("dataset", lay.dataset), ("rejects", lay.rejects), ("summary", lay.prepare_summary)]


def after_finalize(cfg: PipelineConfig, run_dir: str | os.PathLike, summary: dict) -> None:
    """``data.strict``: print every rejected record to stderr and fail (the CLI exits non-zero)."""
    if cfg.data.strict and summary.get("n_rejected", 0):
        path = RunLayout(run_dir).rejects
        rej = read_rejects(path)
        lines = [f"spectrolens prepare --strict: {len(rej)} rejected records (all in {path}):"]
        lines += [f"  {r.source_file},{r.record},{r.reason}" for r in rej]
        print("\n".join(lines), file=sys.stderr)
        raise PrepareError(f"data.strict is set and {len(rej)} records were rejected; see {path}")


def run(cfg: PipelineConfig, run_dir: str | os.PathLike) -> dict:
    """plan + every incomplete part + finalize, in this process (library use). The command line and the
    pipeline build parts in parallel through the launcher (:func:`toolkit.hpc.launch.run_sharded`)."""
    from toolkit import sharded

    record_run(cfg, Path(run_dir), NAME)
    return sharded.run_inline(sys.modules[__name__], cfg, run_dir)
