"""The ``embed`` stage: plan / run_shard / finalize / run / verify (the launcher contract).

* :func:`plan` (driver, idempotent, safe to race): creates ``RUN_DIR/embeddings.zarr`` with every array
  and all metadata, or checks that the existing store belongs to the same checkpoint and layout.
* :func:`run_shard` (any worker: SLURM array task, MPI rank, local process; CPU or GPU): extracts
  material shard ``s`` (rows ``[s*S, (s+1)*S)`` of ``dataset.zarr``, in order), writes that whole Zarr
  shard of every array, then its completion record. A no-op for a completed shard.
* :func:`run_task`: worker ``t`` of ``T`` does the unfinished shards ``s`` with ``s % T == t`` through one
  sequential DataLoader (:func:`extract_shards`; batches never cross a shard boundary), so the model is
  loaded and data-loader workers are started once per task, not once per shard.
* :func:`finalize`: checks all shards, compacts per-atom features, marks complete, consolidates metadata.
* :func:`run`: record_run + plan + ``embed.workers`` local worker processes + finalize (tqdm on the
  driver; worker logs under ``RUN_DIR/logs/embed/``).
* :func:`verify`: reports missing shards and non-finite rows; returns a process exit code.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from toolkit.config import PipelineConfig, dump_config, record_run
from toolkit.data.loader import MaterialDataset, collate
from toolkit.data.store import DatasetReader
from toolkit.embed import store as st
from toolkit.embed.extract import (
    EmbedError,
    checkpoint_path,
    embed_layers,
    extract,
    file_sha256,
    load_model,
    resolve_device,
    use_bf16,
)

log = logging.getLogger(__name__)

DATASET = "dataset.zarr"


def log_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "logs" / "embed"


def _dataset(run_dir: Path) -> DatasetReader:
    path = Path(run_dir) / DATASET
    if not (path / "zarr.json").is_file():
        raise EmbedError(f"{path} does not exist: run `spectrolens prepare` first")
    return DatasetReader(path)


def _layout(cfg: PipelineConfig, run_dir: Path, reader: DatasetReader) -> tuple[st.Layout, str]:
    """The layout this config asks for, and the checkpoint sha256 (model built on CPU once)."""
    ck = checkpoint_path(cfg, run_dir)
    loaded = load_model(ck, torch.device("cpu"))
    layers = embed_layers(loaded.model, cfg.embed.layers)
    n_atoms = int(reader.natoms.sum()) if cfg.embed.per_atom else 0
    layout = st.Layout(n_materials=len(reader), shard_size=cfg.embed.shard_size,
                       hidden={layer: loaded.hidden for layer in layers}, poolings=list(cfg.embed.pooling),
                       prediction_size=loaded.output_features, per_atom=cfg.embed.per_atom,
                       dtype=cfg.embed.dtype, n_atoms=n_atoms)
    return layout, loaded.sha256


def plan(cfg: PipelineConfig, run_dir: Path) -> int:
    """Create the store skeleton once (or check the existing one); returns the number of shards."""
    run_dir = Path(run_dir)
    path = st.store_path(run_dir)
    reader = _dataset(run_dir)
    layout, sha = _layout(cfg, run_dir, reader)
    if len(reader) == 0:
        raise EmbedError(f"{run_dir / DATASET} holds no materials")
    attrs = {"checkpoint_sha256": sha, "checkpoint": str(checkpoint_path(cfg, run_dir)),
             "config": cfg.model_dump(mode="json"), "dataset": str(run_dir / DATASET),
             "grid": reader.attrs.get("grid"), "transform": reader.attrs.get("transform")}
    created = st.create_store(path, layout, ids=reader.ids, index=np.arange(len(reader), dtype=np.int64),
                              attrs=attrs, natoms=reader.natoms, energy=reader.energy)
    if not created and st.open_root(path)["ids"][:].tolist() != reader.ids.tolist():
        raise st.EmbedStoreError(f"{path} was planned for other materials than {run_dir / DATASET} now holds "
                                 f"(the dataset was re-prepared); delete {path} to extract again")
    if created:
        log.info("planned %s: %d materials, %d shards of %d, layers %s, poolings %s", path, layout.n_materials,
                 layout.n_shards, layout.shard_size, layout.layers, layout.poolings)
    return layout.n_shards


def _loader(run_dir: Path, layout: st.Layout, shards: list[int], batch_size: int, num_workers: int,
            cuda: bool) -> DataLoader:
    """One sequential DataLoader over the rows of ``shards`` whose batches never cross a shard boundary,
    so data-loader workers (started once per task, not per shard) prefetch across shards."""
    batches = [list(range(a, min(a + batch_size, layout.rows(s).stop)))
               for s in shards for a in range(layout.rows(s).start, layout.rows(s).stop, batch_size)]
    return DataLoader(MaterialDataset(Path(run_dir) / DATASET), batch_sampler=batches, collate_fn=collate,
                      num_workers=num_workers, pin_memory=cuda,
                      multiprocessing_context="spawn" if num_workers else None)


def extract_shards(cfg: PipelineConfig, run_dir: Path, shards: list[int]) -> list[int]:
    """Extract ``shards`` in order (skipping completed ones), writing each whole shard and its record."""
    run_dir = Path(run_dir)
    path = st.store_path(run_dir)
    todo = [s for s in shards if not st.is_done(path, s)]
    if not todo:
        return []
    attrs = dict(st.open_root(path).attrs)
    layout = st.layout_from_attrs(attrs)
    device = resolve_device(cfg.embed)
    loaded = load_model(checkpoint_path(cfg, run_dir), device)
    if loaded.sha256 != attrs["checkpoint_sha256"]:
        raise st.EmbedStoreError(
            f"{path} holds activations of checkpoint sha256 {attrs['checkpoint_sha256']}, but {loaded.path} has "
            f"sha256 {loaded.sha256}; refusing to mix two models in one store")
    bs = cfg.embed.batch_size
    batches = iter(_loader(run_dir, layout, todo, bs, cfg.embed.num_workers, device.type == "cuda"))
    bf16 = use_bf16(cfg.embed, device)
    for s in todo:
        rows = layout.rows(s)
        log.info("shard %d started", s)
        t0 = time.perf_counter()
        n_batches = -(-(rows.stop - rows.start) // bs)
        seen, result = extract(loaded, itertools.islice(batches, n_batches), layout.layers, layout.poolings,
                               layout.per_atom, bf16)
        if not np.array_equal(seen, np.arange(rows.start, rows.stop)):
            raise EmbedError(f"shard {s}: the loader returned rows {seen.min()}..{seen.max()} ({seen.size}), "
                             f"expected {rows.start}..{rows.stop - 1} in order")
        seconds = time.perf_counter() - t0
        st.write_shard(path, s, result, loaded.sha256,
                       extra={"seconds": round(seconds, 3), "device": str(device), "n_rows": rows.stop - rows.start})
        log.info("shard %d done: %d materials in %.2f s on %s", s, rows.stop - rows.start, seconds, device)
    return todo


def run_shard(cfg: PipelineConfig, run_dir: Path, shard: int) -> None:
    """Extract one shard (no-op if its completion record exists). The store must be planned."""
    if not extract_shards(cfg, run_dir, [shard]):
        log.info("shard %d already complete", shard)


def run_task(cfg: PipelineConfig, run_dir: Path, task: int, n_tasks: int) -> list[int]:
    """Worker ``task`` of ``n_tasks``: every unfinished shard ``s`` with ``s % n_tasks == task``."""
    if not 0 <= task < n_tasks:
        raise EmbedError(f"task {task} is not in [0, {n_tasks})")
    path = st.store_path(run_dir)
    layout = st.read_layout(path)
    mine = list(range(task, layout.n_shards, n_tasks))
    log.info("task %d/%d: %d shards, %d done before", task, n_tasks, len(mine),
             len(set(mine) & st.done_shards(path)))
    return extract_shards(cfg, run_dir, mine)


def finalize(cfg: PipelineConfig, run_dir: Path) -> dict:
    """All shards done -> compact per-atom arrays, mark complete, consolidate metadata (once)."""
    info = st.finalize_store(st.store_path(run_dir))
    log.info("finalized %s: %d materials, %d shards", st.store_path(run_dir), info["n_materials"], info["n_shards"])
    return info


def _worker_env(n_workers: int, task: int, device: str) -> dict[str, str]:
    """Environment of local worker ``task``: CPU threads split between workers; with several GPUs,
    worker t sees only GPU ``t % n_gpus`` (unless CUDA_VISIBLE_DEVICES is set already)."""
    env = dict(os.environ)
    if device != "cpu" and "CUDA_VISIBLE_DEVICES" not in env and torch.cuda.device_count() > 1:
        env["CUDA_VISIBLE_DEVICES"] = str(task % torch.cuda.device_count())
    threads = max(1, len(os.sched_getaffinity(0)) // n_workers)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", str(threads))
    from toolkit.hpc.executors import MALLOC_ENV  # stable CPU inference speed (docs/performance.md)

    return {**MALLOC_ENV, **env}


def worker_command(config_file: Path, run_dir: Path, task: int, n_tasks: int) -> list[str]:
    """Command line of one local worker process (``python -m toolkit.embed.worker``)."""
    return [sys.executable, "-m", "toolkit.embed.worker", "--config", str(config_file), "--run-dir", str(run_dir),
            "--task", str(task), "--tasks", str(n_tasks)]


def start_workers(cfg: PipelineConfig, run_dir: Path, n_tasks: int) -> list[tuple[subprocess.Popen, Path]]:
    """Start ``n_tasks`` worker processes, each logging to ``logs/embed/worker-<t>.log``."""
    logs = log_dir(run_dir)
    logs.mkdir(parents=True, exist_ok=True)
    config_file = logs / "config.yaml"
    tmp = logs / f".config.yaml.{os.getpid()}"
    tmp.write_text(dump_config(cfg))
    os.replace(tmp, config_file)
    procs = []
    for t in range(n_tasks):
        log_file = logs / f"worker-{t}.log"
        with open(log_file, "ab") as fh:
            procs.append((subprocess.Popen(worker_command(config_file, run_dir, t, n_tasks), stdout=fh,
                                           stderr=subprocess.STDOUT, env=_worker_env(n_tasks, t, cfg.embed.device)),
                          log_file))
    return procs


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def run(cfg: PipelineConfig, run_dir: Path) -> dict:
    """plan + ``embed.workers`` local processes (worker t does shards s % T == t) + finalize.

    The driver logs to ``logs/embed/driver.log``, worker t to ``logs/embed/worker-<t>.log``."""
    run_dir = Path(run_dir)
    log_dir(run_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir(run_dir) / "driver.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s driver: %(message)s"))
    handler.setLevel(logging.INFO)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        return _run(cfg, run_dir)
    finally:
        log.removeHandler(handler)
        handler.close()


def _run(cfg: PipelineConfig, run_dir: Path) -> dict:
    record_run(cfg, run_dir, "embed")
    n_shards = plan(cfg, run_dir)
    path = st.store_path(run_dir)
    if st.open_root(path).attrs.get("complete"):
        log.info("%s is already complete", path)
        return finalize(cfg, run_dir)
    n_tasks = min(cfg.embed.workers, n_shards)
    procs = start_workers(cfg, run_dir, n_tasks)
    log.info("started %d worker processes for %d shards (%d already done)", n_tasks, n_shards,
             len(st.done_shards(path)))
    failed: list[tuple[int, int, Path]] = []
    with tqdm(total=n_shards, desc="embed shards", unit="shard", initial=len(st.done_shards(path))) as bar:
        try:
            while True:
                running = [p for p, _ in procs if p.poll() is None]
                done = len(st.done_shards(path))
                bar.update(done - bar.n)
                if not running:
                    break
                time.sleep(0.2)
        except BaseException:
            for p, _ in procs:
                if p.poll() is None:
                    p.terminate()
            raise
    for t, (p, log_file) in enumerate(procs):
        if p.returncode != 0:
            failed.append((t, p.returncode, log_file))
    if failed:
        msg = "; ".join(f"worker {t} exited with {rc} (log {lf}):\n{_tail(lf)}" for t, rc, lf in failed)
        raise EmbedError(f"embed workers failed, finished shards are kept; re-run to do the rest. {msg}")
    return finalize(cfg, run_dir)


def verify(cfg: PipelineConfig, run_dir: Path) -> int:
    """Print what is missing or non-finite in ``embeddings.zarr``; 0 if complete and clean, else 1."""
    path = st.store_path(run_dir)
    try:
        report = st.verify_store(path)
    except st.EmbedStoreError as e:
        print(f"spectrolens embed --verify: {e}", file=sys.stderr)
        return 1
    lines = list(report.lines(path))
    stale = False
    ck = checkpoint_path(cfg, run_dir)
    if ck.is_file():
        have = st.open_root(path).attrs.get("checkpoint_sha256")
        sha = file_sha256(ck)
        if sha != have:
            stale = True
            lines.insert(1, f"  stale: store was made from checkpoint sha256 {have}, {ck} now has {sha}")
    print("\n".join(lines))
    return 0 if report.ok and not stale else 1
