"""The ``prepare`` stage: a data source -> ``RUN_DIR/dataset.zarr`` (structures, graphs, spectra, descriptors).

Launcher contract (docs/architecture.md): :func:`plan` (idempotent: scan, plan file, store skeleton),
:func:`run_part` (one part; no-op when complete), :func:`finalize` (check parts, merge rejects,
index, ``complete: true``), :func:`run` (all three locally with ``cfg.data.workers`` processes).

Files under ``RUN_DIR/prepare/``: ``plan.json`` (keys per part and the config fingerprint),
``scan_rejects.csv``, ``parts/<part>.rejects.csv`` (written before the part's completion record),
and from finalize ``rejects.csv`` (every rejected record: source_file,record,reason) and
``summary.json`` (counts per source and reason).

A killed run leaves complete parts untouched; re-running rebuilds only incomplete parts. A config
that changes the data (source, grid, transform, graph parameters, ...) against an existing plan or
store is refused with a :class:`~toolkit.config.ConfigError`, never mixed in.
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from toolkit.config import ConfigError, PipelineConfig, record_run
from toolkit.data import store
from toolkit.data.graphs import graph_from_config
from toolkit.data.records import Material, Reject, read_rejects, write_rejects

log = logging.getLogger("spectrolens.prepare")

STORE_NAME = "dataset.zarr"
_GAP_KEYS = ("direct_gap", "indirect_gap")


def store_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / STORE_NAME


def _prep_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "prepare"


def fingerprint(cfg: PipelineConfig) -> dict:
    """Everything in the config that changes the prepared data (not workers, not strict)."""
    d = cfg.data
    fp: dict[str, Any] = {
        "source": d.source, "path": str(Path(d.path).resolve()) if d.path is not None else None,
        "id_prop": d.id_prop, "grid": d.grid.model_dump(), "transform": d.transform, "log_floor": d.log_floor,
        "onset_threshold": d.onset_threshold, "min_distance": d.min_distance, "shard_size": d.shard_size,
        "graph": cfg.graph.model_dump(),
    }
    if d.source == "benchmark":
        fp["benchmark"] = d.benchmark.model_dump()
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
            f"refusing to mix datasets. Use a new run directory, or delete {what.parent / STORE_NAME} and "
            f"{what.parent} to prepare again")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


@contextmanager
def _lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock so concurrent array tasks create the plan and store skeleton exactly once."""
    p = _prep_dir(run_dir)
    p.mkdir(parents=True, exist_ok=True)
    with open(p / ".plan.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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

    d = cfg.data
    attrs = {
        "n_parts": n_parts, "n_planned": n_keys, "grid": d.grid.model_dump(),
        "energy": energy_grid(d.grid.start, d.grid.stop, d.grid.num).tolist(), "units": "eV",
        "transform": d.transform, "log_floor": d.log_floor, "onset_threshold": d.onset_threshold,
        "source": source.metadata(), "graph": cfg.graph.model_dump(), "prepare_config": fingerprint(cfg),
    }
    if d.source == "benchmark":
        from toolkit.data.benchmark import benchmark_truth

        attrs["benchmark_truth"] = benchmark_truth(cfg)
    return json.loads(json.dumps(attrs, default=str))


def plan(cfg: PipelineConfig, run_dir: str | os.PathLike) -> int:
    """Scan the source, write ``prepare/plan.json`` and create the store skeleton (once); returns n_parts.

    Idempotent: an existing plan with the same fingerprint is reused (the source is not re-scanned);
    a different fingerprint raises ConfigError."""
    from toolkit.data.readers import open_source

    run_dir = Path(run_dir)
    fp = fingerprint(cfg)
    spath = store_path(run_dir)
    with _lock(run_dir):
        ppath = _prep_dir(run_dir) / "plan.json"
        if ppath.is_file():
            existing = json.loads(ppath.read_text())
            _refuse_if_changed(existing["fingerprint"], fp, ppath)
            if (spath / "zarr.json").is_file():
                _refuse_if_changed(store.root_attrs(spath).get("prepare_config", {}), fp, spath)
                return int(existing["n_parts"])
        elif (spath / "zarr.json").is_file():
            _refuse_if_changed(store.root_attrs(spath).get("prepare_config", {}), fp, spath)
        source = open_source(cfg.data)
        t0 = time.perf_counter()
        keys, rejects = source.scan()
        size = cfg.data.shard_size
        parts = [keys[i:i + size] for i in range(0, len(keys), size)]
        write_rejects(_prep_dir(run_dir) / "scan_rejects.csv", rejects)
        _write_json(ppath, {"fingerprint": fp, "n_parts": len(parts), "n_keys": len(keys),
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
        raise ValueError(f"spectrum has shape {np.shape(m.spectrum)}, the grid has {len(energy)} points")
    g = graph_from_config(s, cfg.graph, min_distance=cfg.data.min_distance)
    props = m.properties or {}
    if m.spectrum is not None:
        desc = spectral_descriptors(energy, np.asarray(m.spectrum, dtype=np.float64), threshold=cfg.data.onset_threshold,
                                    transform=cfg.data.transform, log_floor=cfg.data.log_floor, properties=props)
    else:
        desc = {k: float(props[k]) if props.get(k) is not None else np.nan for k in _GAP_KEYS}
    extras: dict[str, dict[str, float | str]] = {}
    factors: tuple[str, ...] = ()
    if m.source == "benchmark":
        from toolkit.data.benchmark import FACTORS as factors
    for k, v in props.items():
        sv = _scalar(v)
        if sv is not None:
            extras.setdefault("benchmark" if k in factors else "properties", {})[k] = sv
    return store.MaterialRecord(
        id=m.id, formula=m.formula, numbers=np.asarray(s.atomic_numbers), frac_coords=np.asarray(s.frac_coords),
        lattice=np.asarray(s.lattice.matrix), edge_src=g.edge_src, edge_dst=g.edge_dst, edge_vec=g.edge_vec,
        spectrum=None if m.spectrum is None else np.asarray(m.spectrum, dtype=np.float32),
        descriptors=desc, extras=extras)


def _part_rejects_path(run_dir: Path, part: int) -> Path:
    return _prep_dir(run_dir) / "parts" / f"{store.part_name(part)}.rejects.csv"


def run_part(cfg: PipelineConfig, run_dir: str | os.PathLike, part: int) -> None:
    """Build part ``part`` from scratch (no-op if it is complete): load its keys, build graphs and
    descriptors, write its rejects, write the part group, mark it complete last."""
    from toolkit.data.readers import open_source
    from toolkit.data.spectra import energy_grid

    run_dir = Path(run_dir)
    pl = load_plan(cfg, run_dir)
    if not 0 <= part < pl["n_parts"]:
        raise ConfigError(f"part {part} does not exist: the plan has {pl['n_parts']} parts (0..{pl['n_parts'] - 1})")
    spath = store_path(run_dir)
    if store.part_complete(spath, part):
        log.info("part %s already complete; skipped", store.part_name(part))
        return
    t0 = time.perf_counter()
    keys = pl["parts"][part]
    energy = energy_grid(cfg.data.grid.start, cfg.data.grid.stop, cfg.data.grid.num)
    source = open_source(cfg.data)
    records: list[store.MaterialRecord] = []
    rejects: list[Reject] = []
    seen = 0
    for item in source.load(keys):
        seen += 1
        if isinstance(item, Reject):
            rejects.append(item)
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
    attrs = store.write_part(spath, part, records, cfg.data.grid.num)
    log.info("part %s: %d materials, %d rejected, %d edges in %.1f s", store.part_name(part), len(records),
             len(rejects), attrs["n_edges"], time.perf_counter() - t0)


def run_task(cfg: PipelineConfig, run_dir: str | os.PathLike, task: int, n_tasks: int) -> list[int]:
    """Array task ``task`` of ``n_tasks``: plan (idempotent) and build parts ``u`` with ``u % n_tasks == task``."""
    n = plan(cfg, run_dir)
    mine = [u for u in range(n) if u % n_tasks == task]
    for u in mine:
        run_part(cfg, run_dir, u)
    return mine


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].strip() or reason


def finalize(cfg: PipelineConfig, run_dir: str | os.PathLike) -> dict:
    """Check every part is complete, merge rejects, write the index and summary, mark the store complete.

    Returns the summary (also ``prepare/summary.json``). A store that is already complete is left
    as it is and its summary returned."""
    run_dir = Path(run_dir)
    pl = load_plan(cfg, run_dir)
    spath = store_path(run_dir)
    sumpath = _prep_dir(run_dir) / "summary.json"
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
    n_rej = write_rejects(_prep_dir(run_dir) / "rejects.csv", rejects)
    index = store.write_index(spath, n_parts)
    n = int(index["ids"].shape[0])
    by_reason = Counter(_reason_kind(r.reason) for r in rejects)
    by_file = Counter(r.source_file for r in rejects)
    counts = {"planned": int(pl["n_keys"]) + int(pl["n_scan_rejects"]), "materials": n, "rejected": n_rej,
              "with_spectrum": int(index["has_spectrum"].sum()), "atoms": int(index["natoms"].sum()),
              "edges": int(index["nedges"].sum())}
    summary = {"source": cfg.data.source, "store": str(spath), "n_parts": n_parts, "n_materials": n,
               "n_rejected": n_rej, "counts": counts, "rejects_by_reason": dict(by_reason),
               "rejects_by_source_file": dict(by_file), "graph": cfg.graph.model_dump()}
    store.mark_complete(spath, {"n_materials": n, "counts": counts, "rejects_by_reason": dict(by_reason)})
    _write_json(sumpath, summary)
    log.info("prepare finalized: %d materials, %d rejected -> %s", n, n_rej, spath)
    if n == 0:
        log.warning("the dataset has no materials: every record was rejected (see %s)", _prep_dir(run_dir) / "rejects.csv")
    return summary


def _run_part_logged(cfg: PipelineConfig, run_dir: str, part: int) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_part(cfg, run_dir, part)
    return part


def _pool_context() -> mp.context.BaseContext:
    """forkserver (with the heavy imports preloaded once, so workers start warm), else spawn.
    Not fork: zarr's I/O threads and torch do not survive a fork of a threaded parent."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["toolkit.data.prepare", "toolkit.data.readers", "pymatgen.core", "zarr"])
        return ctx
    return mp.get_context("spawn")


_MPI_ENV = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"))


def mpi_world() -> tuple[int, int] | None:
    """(rank, world) when this process was started by an MPI launcher (mpiexec/mpirun: Open MPI,
    MPICH/Intel MPI) with more than one rank; None otherwise."""
    for rk, sz in _MPI_ENV:
        if rk in os.environ and sz in os.environ and int(os.environ[sz]) > 1:
            return int(os.environ[rk]), int(os.environ[sz])
    return None


def _run_mpi(cfg: PipelineConfig, run_dir: Path, rank: int, world: int) -> dict:
    """MPI ranks: every rank builds parts ``u % world == rank``; rank 0 finalizes; all return the summary."""
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - mpi4py is a base requirement
        raise ConfigError(f"started as MPI rank {rank} of {world} but mpi4py is not importable: {e}") from e
    comm = MPI.COMM_WORLD
    if comm.Get_size() != world:
        raise ConfigError(f"MPI environment says {world} ranks but MPI.COMM_WORLD has {comm.Get_size()}")
    error = None
    if rank == 0:
        record_run(cfg, run_dir, "prepare")
    try:
        mine = run_task(cfg, run_dir, rank, world)
        log.info("MPI rank %d of %d: built/checked parts %s", rank, world, mine)
    except Exception as e:  # every rank must reach the collective below, or the others hang
        error = f"rank {rank}: {type(e).__name__}: {e}"
    errors = [x for x in comm.allgather(error) if x]
    if errors:
        raise RuntimeError("prepare failed on MPI ranks (re-run to resume): " + "; ".join(errors))
    summary: dict | None = None
    if rank == 0:
        try:
            summary = finalize(cfg, run_dir)
        except Exception as e:
            summary = {"error": f"{type(e).__name__}: {e}"}
    summary = comm.bcast(summary, root=0)
    if "error" in summary:
        raise RuntimeError(f"prepare finalize failed on rank 0: {summary['error']}")
    return summary


def run(cfg: PipelineConfig, run_dir: str | os.PathLike) -> dict:
    """plan + every incomplete part on a local pool of ``cfg.data.workers`` processes + finalize.

    Under an MPI launcher (``mpiexec -n R spectrolens prepare ...``) each rank builds its share of
    the parts instead (see :func:`mpi_world`) and rank 0 finalizes."""
    from tqdm import tqdm

    run_dir = Path(run_dir)
    mpi = mpi_world()
    if mpi is not None:
        summary = _run_mpi(cfg, run_dir, *mpi)
        if mpi[0] == 0:
            _report_strict(cfg, run_dir, summary)
        return summary
    record_run(cfg, run_dir, "prepare")
    n_parts = plan(cfg, run_dir)
    spath = store_path(run_dir)
    sumpath = _prep_dir(run_dir) / "summary.json"
    if store.root_attrs(spath).get("complete") is True and sumpath.is_file():
        log.info("%s is already complete; nothing to do", spath)
        summary = json.loads(sumpath.read_text())
    else:
        todo = [p for p in range(n_parts) if not store.part_complete(spath, p)]
        log.info("prepare: %d of %d parts to build with %d workers", len(todo), n_parts, cfg.data.workers)
        failed: dict[int, str] = {}
        workers = min(cfg.data.workers, max(1, len(todo)))
        with tqdm(total=len(todo), desc="prepare parts", unit="part", disable=not todo) as bar:
            if workers <= 1:
                for p in todo:
                    run_part(cfg, run_dir, p)
                    bar.update()
            else:
                ctx = _pool_context()
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                    futs = {pool.submit(_run_part_logged, cfg, str(run_dir), p): p for p in todo}
                    for f in as_completed(futs):
                        try:
                            f.result()
                        except Exception as e:  # keep the other parts going; report all at the end
                            failed[futs[f]] = f"{type(e).__name__}: {e}"
                        bar.update()
        if failed:
            raise RuntimeError(f"prepare: {len(failed)} parts failed (re-run to retry them): " +
                               "; ".join(f"part {p}: {m}" for p, m in sorted(failed.items())))
        summary = finalize(cfg, run_dir)
    _report_strict(cfg, run_dir, summary)
    return summary


def _report_strict(cfg: PipelineConfig, run_dir: Path, summary: dict) -> None:
    """--strict: print every rejected record to stderr (the CLI then exits non-zero)."""
    if cfg.data.strict and summary.get("n_rejected", 0):
        rej = read_rejects(_prep_dir(run_dir) / "rejects.csv")
        print(f"spectrolens prepare --strict: {len(rej)} rejected records "
              f"(all in {_prep_dir(run_dir) / 'rejects.csv'}):", file=sys.stderr)
        for r in rej:
            print(f"  {r.source_file},{r.record},{r.reason}", file=sys.stderr)
