"""The ``embed`` stage: layer activations of a trained model into ``RUN_DIR/embeddings.zarr``.

A sharded stage (the contract: :mod:`toolkit.sharded`; units are *shards* of ``embed.shard_size``
materials, one Zarr shard of every array each):

* :func:`plan` (idempotent; serialised by the launcher): creates ``RUN_DIR/embeddings.zarr`` with every
  array and all metadata, or checks that the existing store belongs to the same checkpoint and layout.
  A checkpoint whose output size differs from the dataset grid is refused here.
* :func:`run_units` (any worker: SLURM array task, MPI rank, local process; CPU or GPU): extracts the
  given shards through one sequential DataLoader (:func:`extract_shards`; batches never cross a shard
  boundary), so the model is loaded and data-loader workers are started once per call, not per shard.
  Each shard writes its whole Zarr shard of every array, then its completion record.
* Ensembles: when the run trained a finished ensemble, ``prediction`` is the members' mean with
  ``prediction_std`` and the onset interval beside it (:func:`toolkit.embed.extract.ensemble_members`);
  the layer activations are member 0's.
* :func:`finalize`: checks all shards, compacts per-atom features, marks complete, consolidates metadata.
* :func:`run`: all of it in this process. Where shards run in parallel is the launcher's choice
  (:func:`toolkit.hpc.launch.run_sharded`); this module imports nothing from it.
* :func:`verify`: reports missing shards and non-finite rows; returns a process exit code.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from toolkit.config import PipelineConfig, record_run
from toolkit.data.loader import MaterialDataset, collate
from toolkit.data.store import DatasetReader
from toolkit.embed import store as st
from toolkit.embed.extract import (
    EmbedError,
    checkpoint_path,
    embed_layers,
    ensemble_members,
    extract,
    file_sha256,
    load_model,
    resolve_device,
    use_bf16,
)
from toolkit.layout import RunLayout

log = logging.getLogger(__name__)

NAME = "embed"
UNIT = "shard"
PRELOAD = ("torch", "zarr", "toolkit.model")  # imported once by the local workers' fork server
Error = EmbedError


def workers(cfg: PipelineConfig) -> int:
    """Local worker processes of this stage (``embed.workers``)."""
    return cfg.embed.workers


def device(cfg: PipelineConfig) -> str:
    return cfg.embed.device


def _dataset(run_dir: Path) -> DatasetReader:
    path = RunLayout(run_dir).dataset
    if not (path / "zarr.json").is_file():
        raise EmbedError(f"{path} does not exist: run `spectrolens prepare` first")
    return DatasetReader(path)


def _layout(cfg: PipelineConfig, run_dir: Path, reader: DatasetReader) -> tuple[st.Layout, str, dict]:
    """The layout this config asks for, the checkpoint sha256 (model built on CPU once) and the ensemble's
    root attributes (empty for one model)."""
    ck = checkpoint_path(cfg, run_dir)
    loaded = load_model(ck, torch.device("cpu"))
    layers = embed_layers(loaded.model, cfg.embed.layers)
    n_atoms = int(reader.natoms.sum()) if cfg.embed.per_atom else 0
    ens = ensemble_members(cfg, run_dir)
    layout = st.Layout(n_materials=len(reader), shard_size=cfg.embed.shard_size,
                       hidden={layer: loaded.hidden for layer in layers}, poolings=list(cfg.embed.pooling),
                       prediction_size=loaded.output_features, per_atom=cfg.embed.per_atom,
                       dtype=cfg.embed.dtype, n_atoms=n_atoms, ensemble=ens.n if ens else 1)
    return layout, loaded.sha256, ({"ensemble_info": ens.attrs()} if ens else {})


def plan(cfg: PipelineConfig, run_dir: Path) -> int:
    """Create the store skeleton once (or check the existing one); returns the number of shards."""
    run_dir = Path(run_dir)
    path = st.store_path(run_dir)
    reader = _dataset(run_dir)
    if len(reader) == 0:
        raise EmbedError(f"{reader.path} holds no materials")
    layout, sha, ens_attrs = _layout(cfg, run_dir, reader)
    if layout.prediction_size != len(reader.energy):
        raise EmbedError(f"checkpoint {checkpoint_path(cfg, run_dir)} predicts {layout.prediction_size} values per "
                         f"material but {reader.path} has a grid of {len(reader.energy)} points; use the checkpoint "
                         f"trained on this dataset (or prepare the dataset on that model's grid)")
    attrs = {"checkpoint_sha256": sha, "checkpoint": str(checkpoint_path(cfg, run_dir)),
             "config": cfg.model_dump(mode="json"), "dataset": str(reader.path),
             "grid": reader.attrs.get("grid"), "transform": reader.attrs.get("transform"), **ens_attrs}
    created = st.create_store(path, layout, ids=reader.ids, index=np.arange(len(reader), dtype=np.int64),
                              attrs=attrs, natoms=reader.natoms, energy=reader.energy)
    if not created and st.open_root(path)["ids"][:].tolist() != reader.ids.tolist():
        raise st.EmbedStoreError(f"{path} was planned for other materials than {reader.path} now holds "
                                 f"(the dataset was re-prepared); delete {path} to extract again")
    if not created:
        _check_ensemble(path, dict(st.open_root(path).attrs), ens_attrs.get("ensemble_info"))
    if created:
        log.info("planned %s: %d materials, %d shards of %d, layers %s, poolings %s", path, layout.n_materials,
                 layout.n_shards, layout.shard_size, layout.layers, layout.poolings)
    return layout.n_shards


def _check_ensemble(path: Path, attrs: dict, info: dict | None) -> None:
    """Refuse to add shards of other ensemble members (or factors) to a store planned with these."""
    have = attrs.get("ensemble_info")
    keys = ("member_sha256", "recalibration_factor", "onset_recalibration_factor")
    if (have or info) and (not have or not info or any(have.get(k) != info.get(k) for k in keys)):
        raise st.EmbedStoreError(f"{path} holds predictions of another ensemble (members or recalibration factors "
                                 f"differ from train/metrics.json now); refusing to mix. Delete {path} to extract again")


def _loader(run_dir: Path, layout: st.Layout, shards: list[int], batch_size: int, num_workers: int,
            cuda: bool) -> DataLoader:
    """One sequential DataLoader over the rows of ``shards`` whose batches never cross a shard boundary,
    so data-loader workers (started once per task, not per shard) prefetch across shards."""
    batches = [list(range(a, min(a + batch_size, layout.rows(s).stop)))
               for s in shards for a in range(layout.rows(s).start, layout.rows(s).stop, batch_size)]
    return DataLoader(MaterialDataset(RunLayout(run_dir).dataset), batch_sampler=batches, collate_fn=collate,
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
    ens = ensemble_members(cfg, run_dir) if layout.ensemble > 1 else None
    if layout.ensemble > 1:
        _check_ensemble(path, attrs, ens.attrs() if ens else None)
    others = [load_model(p, device) for p in ens.paths[1:]] if ens else []
    data = _dataset(run_dir) if others else None  # grid, transform and onset threshold of the ensemble's onsets
    bs = cfg.embed.batch_size
    batches = iter(_loader(run_dir, layout, todo, bs, cfg.embed.num_workers, device.type == "cuda"))
    bf16 = use_bf16(cfg.embed, device)
    for s in todo:
        rows = layout.rows(s)
        log.info("shard %d started", s)
        t0 = time.perf_counter()
        n_batches = -(-(rows.stop - rows.start) // bs)
        seen, result = extract(loaded, itertools.islice(batches, n_batches), layout.layers, layout.poolings,
                               layout.per_atom, bf16, others=others, ensemble=ens,
                               energy=data.energy if data else None, data_attrs=data.attrs if data else None)
        if not np.array_equal(seen, np.arange(rows.start, rows.stop)):
            raise EmbedError(f"shard {s}: the loader returned rows {seen.min()}..{seen.max()} ({seen.size}), "
                             f"expected {rows.start}..{rows.stop - 1} in order")
        seconds = time.perf_counter() - t0
        st.write_shard(path, s, result, loaded.sha256,
                       extra={"seconds": round(seconds, 3), "device": str(device), "n_rows": rows.stop - rows.start})
        log.info("shard %d done: %d materials in %.2f s on %s", s, rows.stop - rows.start, seconds, device)
    return todo


def unit_done(run_dir: Path, shard: int) -> bool:
    """Shard ``shard`` has its completion record."""
    return st.is_done(st.store_path(run_dir), shard)


def run_units(cfg: PipelineConfig, run_dir: Path, shards: list[int]) -> None:
    """Extract ``shards`` (the caller holds their locks, see :mod:`toolkit.sharded`)."""
    extract_shards(cfg, run_dir, list(shards))


def run_shard(cfg: PipelineConfig, run_dir: Path, shard: int) -> None:
    """Extract one shard (no-op if its completion record exists). The store must be planned."""
    if not extract_shards(cfg, run_dir, [shard]):
        log.info("shard %d already complete", shard)


def outputs(run_dir: Path) -> list[tuple[str, Path]]:
    """What embed wrote (its closing summary, :func:`toolkit.sharded.closing_summary`)."""
    return [("embeddings", RunLayout(run_dir).embeddings)]


def finalize(cfg: PipelineConfig, run_dir: Path) -> dict:
    """All shards done -> compact per-atom arrays, mark complete, consolidate metadata (once)."""
    info = st.finalize_store(st.store_path(run_dir))
    log.info("finalized %s: %d materials, %d shards", st.store_path(run_dir), info["n_materials"], info["n_shards"])
    return info


def run(cfg: PipelineConfig, run_dir: Path) -> dict:
    """plan + every unfinished shard + finalize, in this process (library use). The command line and
    the pipeline extract shards in parallel through the launcher (:func:`toolkit.hpc.launch.run_sharded`)."""
    from toolkit import sharded

    record_run(cfg, Path(run_dir), NAME)
    return sharded.run_inline(NAME, cfg, run_dir)


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
    info = st.open_root(path).attrs.get("ensemble_info")
    if info and not stale:
        try:
            _check_ensemble(path, {"ensemble_info": info}, (e.attrs() if (e := ensemble_members(cfg, run_dir)) else None))
        except st.EmbedStoreError as err:
            stale = True
            lines.insert(1, f"  stale: {err}")
    print("\n".join(lines))
    return 0 if report.ok and not stale else 1
