"""The chunked steps of analyze that run as Dask tasks (issue 20; the engine: :mod:`toolkit.analyze.engine`).

* :func:`descriptors`: structural descriptors as tasks, each a group of the per-block cache files of
  :func:`toolkit.analyze.descriptors.structural_descriptors` (the same blocks, the same cache
  directory, the same per-material function: the local path then reads them without computing
  anything; a killed run resumes per block), then the chunked float32 store
  ``analyze/descriptors.zarr`` (``values`` (N, D), one task per chunk of ``analyze.chunk_rows`` rows,
  one writer per chunk, a completion record per chunk in ``_progress/``; ``attrs.names`` the columns
  in :func:`~toolkit.analyze.descriptors.build_table`'s order and semantics).
* :func:`cluster_moments`: per-cluster sufficient statistics (count of finite values, sum, sum of
  squares, float64) of any (N, D) Zarr array, one task per chunk through
  :func:`toolkit.analyze.clustering.map_chunks`. From them, exactly (no sampling): the spectral
  signatures' mean and standard deviation per cluster (of predicted or reference spectra), and the
  2x2 tables of every categorical descriptor (ones per cluster = sum), which are all a Fisher test
  needs. What they cannot give: percentiles (p10/p90 bands) and the Mann-Whitney rank tests of
  continuous descriptors; see docs/dask.md for what the stage does for those.

Nothing here is Dask-specific below the task boundary: every function runs in one process too (then
``client`` is None and the tasks run in turn).
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.layout import RunLayout

log = logging.getLogger(__name__)

STORE = "descriptors.zarr"


def coordination_of(cfg, n: int) -> str:
    """The neighbour finder analyze uses for ``n`` materials (the rule of ``toolkit.analyze.descriptors_for``)."""
    a = cfg.analyze
    return a.coordination if a.coordination != "auto" else ("crystalnn" if n <= a.crystalnn_max_materials else "cutoff")


def cache_dir(cfg, run_dir: Path, reader) -> tuple[Path, str, str]:
    """(descriptor cache directory, dataset hash, coordination): the directory the local path reads."""
    from toolkit.analyze import _dataset_hash

    h = _dataset_hash(reader)
    coord = coordination_of(cfg, len(reader))
    return RunLayout(run_dir).analyze_dir / "descriptor_cache" / f"{h}-{coord}", h, coord


def _block_file(cdir: Path, b: int) -> Path:
    return cdir / f"block-{b:06d}.json"


def descriptor_blocks_task(dataset: str, cdir: str, coordination: str, b0: int, b1: int, block: int
                           ) -> tuple[int, dict[str, int]]:
    """Compute the missing cache blocks b0..b1-1 (materials ``b*block`` ..) of ``dataset``; returns
    (blocks computed, {descriptor name: materials that have it}) over all the task's blocks."""
    from threadpoolctl import threadpool_limits

    from toolkit.analyze.descriptors import _block_worker, _save_block
    from toolkit.data.store import DatasetReader

    # one BLAS thread inside the task only: the task may run in the calling process (no client), whose
    # environment and thread pools must stay as they were (workers get OMP_NUM_THREADS=1 from the engine)
    reader = DatasetReader(dataset, cache_parts=2)
    n = len(reader)
    cpath = Path(cdir)
    computed = 0
    names: dict[str, int] = {}
    with threadpool_limits(1):
        for b in range(b0, b1):
            f = _block_file(cpath, b)
            if f.exists():
                recs = json.loads(f.read_text())
            else:
                items = []
                for i in range(b * block, min(n, (b + 1) * block)):
                    m = reader.material(i)
                    items.append((m["id"], m["numbers"], m["frac_coords"], m["lattice"]))
                _, recs = _block_worker((b, items, coordination))
                _save_block(cpath, b, recs)
                computed += 1
            for r in recs:
                for k in r["values"]:
                    names[k] = names.get(k, 0) + 1
    return computed, names


def block_rows(recs: list[dict], cols: list[str], dtype: Any = np.float32) -> np.ndarray:
    """(len(recs), len(cols)) rows (float32 unless ``dtype``) of the descriptor table with columns ``cols``, with
    :func:`~toolkit.analyze.descriptors.build_table`'s semantics (categorical families and
    ``fraction:*`` 0 where absent unless that family failed; NaN otherwise)."""
    from toolkit.analyze.descriptors import ZERO_DEFAULT, build_table, family

    local = build_table(recs)
    out = np.full((len(recs), len(cols)), np.nan, dtype=dtype)
    col = {k: j for j, k in enumerate(cols)}
    zero_cols = {f: [col[k] for k in cols if family(k) == f] for f in ZERO_DEFAULT}
    for i, r in enumerate(recs):
        failed = {f for f, _ in r["failures"]}
        if "*" in failed:
            continue
        for f, js in zero_cols.items():
            if f not in failed and js:
                out[i, js] = 0.0
    idx = [col[k] for k in local.names]
    out[:, idx] = local.values.astype(dtype)
    return out


def table_chunk_task(cdir: str, names: list[str], b0: int, b1: int) -> tuple[np.ndarray, list[str], list[list], list]:
    """Rows of cache blocks b0..b1-1 as float64 table rows over ``names`` (build_table's semantics),
    their ids, per-row failures, and per row the columns its record lists."""
    recs: list[dict] = []
    for blk in range(b0, b1):
        recs.extend(json.loads(_block_file(Path(cdir), blk).read_text()))
    col = {k: j for j, k in enumerate(names)}
    return (block_rows(recs, names, np.float64), [r["id"] for r in recs],
            [[(r["id"], fam, why) for fam, why in r["failures"]] for r in recs],
            [np.array([col[k] for k in r["values"]], dtype=np.int32) for r in recs])


def structural_table(cfg, run_dir: Path, reader, rows: np.ndarray, block: int | None = None):
    """The structural :class:`~toolkit.analyze.descriptors.DescriptorTable` of dataset rows ``rows``,
    equal to the local path's ``build_table`` of the cached records: the per-block cache (filled by
    :func:`descriptors`) is turned into float64 rows by tasks of ``analyze.chunk_rows`` materials on the
    engine's Dask workers (in this process without one) and copied into the table in order, at most a
    few chunks in flight: the driver holds the table, never the per-material records nor the
    structures. Columns: those of ``analyze/descriptors.zarr`` that at least one of ``rows`` has."""
    from collections import deque

    from toolkit.analyze import AnalyzeError
    from toolkit.analyze.descriptors import BLOCK, DescriptorTable

    block = block or BLOCK
    _, names = open_descriptors(run_dir)
    cdir, _, _ = cache_dir(cfg, run_dir, reader)
    n, m = len(reader), len(rows)
    pos = np.full(n, -1, dtype=np.int64)
    pos[np.asarray(rows, dtype=np.int64)] = np.arange(m)
    n_blocks = (n + block - 1) // block
    per = max(1, cfg.analyze.chunk_rows // block)
    calls = [(b, min(n_blocks, b + per)) for b in range(0, n_blocks, per) if (pos[b * block:(b + per) * block] >= 0).any()]
    missing = [b for b0, b1 in calls for b in range(b0, b1) if not _block_file(cdir, b).exists()]
    if missing:
        raise AnalyzeError(f"{cdir}: descriptor cache blocks {missing[:5]} missing after the descriptor step; re-run analyze")
    from toolkit.analyze.engine import current_client

    client = current_client()
    vals = np.empty((m, len(names)))
    seen = np.zeros(len(names), dtype=bool)
    ids: list[str | None] = [None] * m
    fails: list[list] = [[] for _ in range(m)]

    def use(b0: int, b1: int, fut: Any) -> None:
        v, cid, cf, has = fut.result() if fut is not None else table_chunk_task(str(cdir), names, b0, b1)
        p = pos[b0 * block:b0 * block + len(cid)]
        keep = np.flatnonzero(p >= 0)
        vals[p[keep]] = v[keep]
        for i in keep:
            ids[p[i]] = cid[i]
            fails[p[i]] = cf[i]
            seen[has[i]] = True

    window = 2 * len(client.scheduler_info()["workers"]) + 2 if client is not None else 1
    pending: deque = deque()
    for b0, b1 in calls:
        pending.append((b0, b1, client.submit(table_chunk_task, str(cdir), names, b0, b1, pure=False)
                        if client is not None else None))
        if len(pending) >= window:
            use(*pending.popleft())
    while pending:
        use(*pending.popleft())
    if any(i is None for i in ids):
        raise AnalyzeError(f"{cdir}: the descriptor cache does not cover every analysed material; delete it and re-run")
    keepc = np.flatnonzero(seen)
    return DescriptorTable([str(i) for i in ids], [names[j] for j in keepc], vals[:, keepc],
                           [x for fl in fails for x in fl])


def write_chunk_task(store: str, cdir: str, c: int, chunk_rows: int, block: int, n: int) -> int:
    """Write rows of chunk ``c`` of ``store/values`` from the cache blocks (one writer per chunk), then
    its completion record ``_progress/chunk-<c>``. Returns rows written."""
    import zarr

    root = zarr.open_group(store, mode="r+")
    cols = list(root.attrs["names"])
    a, b = c * chunk_rows, min(n, (c + 1) * chunk_rows)
    recs: list[dict] = []
    for blk in range(a // block, (b + block - 1) // block):
        recs.extend(json.loads(_block_file(Path(cdir), blk).read_text()))
    root["values"][a:b] = block_rows(recs, cols)
    (Path(store) / "_progress" / f"chunk-{c:06d}").write_text(json.dumps({"rows": [a, b], "at": time.time()}))
    return b - a


def _run(client: Any, fn, calls: list[tuple]) -> list[Any]:
    """Run ``fn(*args)`` for every call: as Dask tasks on ``client`` or in turn in this process."""
    if client is None:
        return [fn(*args) for args in calls]
    futs = [client.submit(fn, *args, pure=False) for args in calls]
    return client.gather(futs)


def descriptors(client: Any, cfg, run_dir: Path, block: int | None = None) -> dict[str, Any]:
    """Structural descriptors of the whole dataset as tasks on ``client`` (None: in turn here): the
    per-block cache (restartable per block) and ``analyze/descriptors.zarr`` (restartable per chunk).
    Returns a summary (blocks computed, chunks written, columns, seconds)."""
    import zarr

    from toolkit.analyze import _dataset
    from toolkit.analyze.descriptors import BLOCK, is_categorical

    block = block or BLOCK
    run_dir = Path(run_dir)
    reader = _dataset(run_dir)
    n = len(reader)
    cdir, h, coord = cache_dir(cfg, run_dir, reader)
    cdir.mkdir(parents=True, exist_ok=True)
    a = cfg.analyze
    n_blocks = (n + block - 1) // block
    # tasks: enough for every worker several times over, at most chunk_rows materials each
    workers = len(client.scheduler_info()["workers"]) if client is not None else 1
    per = max(1, min(a.chunk_rows // block, -(-n_blocks // (4 * workers))))
    t0 = time.time()
    calls = [(str(reader.path), str(cdir), coord, b, min(n_blocks, b + per), block) for b in range(0, n_blocks, per)]
    out = _run(client, descriptor_blocks_task, calls)
    computed = sum(c for c, _ in out)
    counts: dict[str, int] = {}
    for _, names in out:
        for k, v in names.items():
            counts[k] = counts.get(k, 0) + v
    cols = sorted(k for k, c in counts.items() if not is_categorical(k) or c >= 1)  # build_table(min_count=1)
    t1 = time.time()
    log.info("analyze[dask]: descriptors of %d materials: %d of %d blocks computed in %d tasks, %.1f s",
             n, computed, n_blocks, len(calls), t1 - t0)
    store = RunLayout(run_dir).analyze_dir / STORE
    chunk_rows = max(block, (a.chunk_rows // block) * block)  # whole cache blocks per chunk
    want = {"format": "spectrolens-descriptors", "version": 1, "dataset_hash": h, "coordination": coord,
            "n_materials": n, "chunk_rows": chunk_rows, "names": cols}
    fresh = True
    if (store / "zarr.json").exists():
        old = dict(zarr.open_group(str(store), mode="r").attrs)
        fresh = any(old.get(k) != v for k, v in want.items())
    if fresh:
        root = zarr.open_group(str(store), mode="w")
        root.create_array("values", shape=(n, len(cols)), chunks=(chunk_rows, max(1, len(cols))), dtype="float32",
                          fill_value=np.nan)
        root.attrs.update({**want, "complete": False})
        prog = store / "_progress"
        prog.mkdir(parents=True, exist_ok=True)
        for f in prog.glob("chunk-*"):
            f.unlink()
    n_chunks = (n + chunk_rows - 1) // chunk_rows
    todo = [c for c in range(n_chunks) if not (store / "_progress" / f"chunk-{c:06d}").exists()]
    _run(client, write_chunk_task, [(str(store), str(cdir), c, chunk_rows, block, n) for c in todo])
    zarr.open_group(str(store), mode="r+").attrs["complete"] = True
    log.info("analyze[dask]: %s: %d x %d float32, %d of %d chunks written, %.1f s", store, n, len(cols), len(todo),
             n_chunks, time.time() - t1)
    return {"blocks_computed": computed, "tasks": len(calls), "chunks_written": len(todo), "n_chunks": n_chunks,
            "columns": len(cols), "store": str(store), "seconds": round(time.time() - t0, 2)}


def open_descriptors(run_dir: Path) -> tuple[Any, list[str]]:
    """(``values`` Zarr array (N, D) float32, column names) of a complete ``analyze/descriptors.zarr``."""
    import zarr

    from toolkit.analyze import AnalyzeError

    store = RunLayout(run_dir).analyze_dir / STORE
    if not (store / "zarr.json").exists():
        raise AnalyzeError(f"{store}: no descriptor store; run analyze with analyze.engine=dask")
    root = zarr.open_group(str(store), mode="r")
    if not root.attrs.get("complete"):
        raise AnalyzeError(f"{store}: incomplete (a run was killed while writing it); re-run analyze to finish it")
    return root["values"], list(root.attrs["names"])


# ----------------------------------------------------------------------------------------- sufficient statistics
def _moments_chunk(x: Any, a: int, b: int, labels: Any, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k, D) finite counts, sums and sums of squares per cluster of rows a:b (labels < 0 skipped)."""
    from scipy.sparse import csr_matrix

    lab = np.asarray(labels[a:b], dtype=np.int64)
    blk = np.asarray(x[a:b], dtype=np.float64)
    keep = lab >= 0
    lab, blk = lab[keep], blk[keep]
    fin = np.isfinite(blk)
    blk = np.where(fin, blk, 0.0)
    ind = csr_matrix((np.ones(len(lab)), (lab, np.arange(len(lab)))), shape=(k, len(lab)))
    return np.asarray(ind @ fin.astype(np.float64)), np.asarray(ind @ blk), np.asarray(ind @ (blk * blk))


def cluster_moments(x: Any, labels: Any, k: int, chunk: int) -> dict[str, np.ndarray]:
    """Per-cluster count of finite values, mean and (population) standard deviation of every column of
    ``x`` (N, D), from per-chunk sums reduced in chunk order (:func:`toolkit.analyze.clustering.map_chunks`:
    Dask tasks under the dask engine when ``x`` is a Zarr array). ``labels`` (N,) array-like of cluster
    numbers 0..k-1 (-1: not covered); a Zarr array when the tasks run on other machines. Exact: the
    same figures as ``np.nanmean``/``np.nanstd`` per cluster up to float64 rounding."""
    from toolkit.analyze.clustering import _chunks, map_chunks

    n, d = x.shape
    cnt = np.zeros((k, d))
    s = np.zeros((k, d))
    s2 = np.zeros((k, d))
    for c1, c2, c3 in map_chunks(partial(_moments_chunk, labels=labels, k=k), x, list(_chunks(n, chunk))):
        cnt += c1
        s += c2
        s2 += c3
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(cnt > 0, s / cnt, np.nan)
        var = np.where(cnt > 0, s2 / cnt - mean ** 2, np.nan)
    return {"count": cnt, "sum": s, "mean": mean, "std": np.sqrt(np.clip(var, 0.0, None))}


def save_labels(path: Path, labels: np.ndarray, chunk: int) -> Any:
    """``labels`` as a chunked int32 Zarr array at ``path`` (what :func:`cluster_moments` tasks read)."""
    import zarr

    arr = zarr.create_array(str(path), shape=labels.shape, chunks=(chunk,), dtype="int32", overwrite=True)
    arr[:] = labels.astype(np.int32)
    return arr


def fisher_tables(moments: dict[str, np.ndarray], names: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """For each categorical (0/1) column: per cluster the 2x2 table's cells (ones and materials in the
    cluster, ones and materials outside) from :func:`cluster_moments` - all a Fisher test needs."""
    from toolkit.analyze.descriptors import is_categorical

    out = {}
    for j, name in enumerate(names):
        if not is_categorical(name):
            continue
        ones, tot = moments["sum"][:, j], moments["count"][:, j]
        out[name] = {"ones_in": ones, "n_in": tot, "ones_rest": ones.sum() - ones, "n_rest": tot.sum() - tot}
    return out
