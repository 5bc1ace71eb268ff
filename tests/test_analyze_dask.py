"""analyze.engine = dask (issue 20): the same analysis as the single-process path on a real Dask
LocalCluster of 2 worker processes (same clusters, same attribution), the chunked descriptor store and
its restart per block/chunk, the per-chunk sufficient statistics, and Dask workers started as SLURM jobs
on the real test cluster (tests/slurm_cluster.sh)."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import untrained_checkpoint
from test_slurm import slurm_cluster  # noqa: F401  (the real SLURM cluster fixture of tests/test_slurm.py)

from toolkit import analyze
from toolkit.config import load_config

pytest.importorskip("distributed")

N = 240
MODEL = {"alignn_layers": 1, "gcn_layers": 1, "hidden_features": 16, "embedding_features": 8}
# micro-cluster Ward on both engines (N > scalable_threshold), 4 chunks of 64 rows per clustered array
ANALYZE = {"workers": 1, "permutation_repeats": 1, "probe_folds": 2, "max_clusters": 10, "coordination": "cutoff",
           "scalable_threshold": 100, "micro_clusters": 12, "chunk_rows": 64, "drivers": False, "chemiscope": False,
           "layers": ["readout", "spectrum_predicted"]}


def _cfg(tmp: Path, **over):
    return load_config(None, {
        "data": {"benchmark": {"n_materials": N}, "shard_size": 120, "workers": 1},
        "model": MODEL, "embed": {"shard_size": 120, "batch_size": 40, "workers": 1, "checkpoint": str(tmp / "best.pt")},
        "analyze": {**ANALYZE, **over}})


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A prepared and embedded run (nothing analysed yet)."""
    from toolkit import embed
    from toolkit.data import prepare

    root = tmp_path_factory.mktemp("dask")
    run = root / "run"
    cfg = _cfg(root)
    prepare.run(cfg, run)
    untrained_checkpoint(cfg, run, root / "best.pt")
    embed.run(cfg, run)
    return root, run


def _clusters(run: Path) -> dict[str, np.ndarray]:
    with open(run / "analyze" / "clusters.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([int(r[k]) for r in rows]) for k in rows[0] if k not in ("id", "formula")}


@pytest.mark.slow  # prepare + embed of 240 materials, then analyze twice (~2 min on 2 cores)
def test_dask_local_cluster_matches_single_process(embedded, caplog):
    from sklearn.metrics import adjusted_rand_score

    root, run = embedded
    local_run, dask_run = root / "local", root / "dask"
    shutil.copytree(run, local_run)
    shutil.copytree(run, dask_run)
    res_local = analyze.run(_cfg(root, drivers=True), local_run)
    with caplog.at_level("INFO", logger="toolkit.analyze.engine"):
        res_dask = analyze.run(_cfg(root, drivers=True, engine="dask", dask_cluster="local", dask_workers=2), dask_run)
    # whole steps as tasks: both layers' clusterings (side by side, their chunked passes as tasks of their
    # own on both workers) and every spectral feature's driver ranking
    steps = [r.getMessage().split() for r in caplog.records if "ran as a Dask task" in r.getMessage()]
    clusterings = [int(m[m.index("chunk") - 1].lstrip("(")) for m in steps if m[2] == "cluster"]
    assert len(clusterings) == 2 and min(clusterings) > 0, steps
    assert [m[2] for m in steps].count("feature_drivers") == sum(1 for d in res_local["drivers"].values()
                                                                  if d["model"]), steps
    assert res_local["drivers"] == res_dask["drivers"]
    # descriptors.csv formatted in chunks as Dask tasks: the same bytes as in one process
    assert (dask_run / "analyze" / "descriptors.csv").read_bytes() == (local_run / "analyze" / "descriptors.csv").read_bytes()

    a, b = _clusters(local_run), _clusters(dask_run)
    assert set(a) == set(b) == {"readout", "spectrum_predicted"}
    for layer in a:
        assert res_dask["layers"][layer]["clustering"]["mode"] == "scalable"
        assert adjusted_rand_score(a[layer], b[layer]) >= 0.99, layer
    # the attribution: every cluster's ranked descriptors and the surrogate's importances
    for layer, L in res_local["layers"].items():
        D = res_dask["layers"][layer]
        assert L["clusters"].keys() == D["clusters"].keys()
        for c, cl in L["clusters"].items():
            assert cl["members"] == D["clusters"][c]["members"]
            assert [(r["descriptor"], round(r["q"], 9)) for r in cl["descriptors"]] == \
                   [(r["descriptor"], round(r["q"], 9)) for r in D["clusters"][c]["descriptors"]]
        assert L["surrogate"]["importances"] == D["surrogate"]["importances"]
    assert res_local["global_importance"] == res_dask["global_importance"]

    # the chunked float32 descriptor store holds the table analyze used (structural columns)
    from toolkit.analyze.dask_steps import open_descriptors

    values, names = open_descriptors(dask_run)
    assert values.dtype == np.float32 and values.shape[0] == N and values.chunks[0] == 64
    with open(dask_run / "analyze" / "descriptors.csv") as f:
        rows = list(csv.DictReader(f))
    for j, name in enumerate(names):
        col = np.array([float(r[name]) if r[name] not in ("", "nan") else np.nan for r in rows], dtype=np.float32)
        np.testing.assert_allclose(np.asarray(values[:, j]), col, rtol=1e-6, equal_nan=True, err_msg=name)


@pytest.mark.slow  # uses the module fixture (prepare + embed)
def test_descriptor_store_resumes_per_block_and_chunk(embedded):
    from toolkit.analyze import dask_steps

    root, run = embedded
    work = root / "resume"
    shutil.copytree(run, work)
    cfg = _cfg(root)
    first = dask_steps.descriptors(None, cfg, work)  # in this process (client None): the same tasks, in turn
    assert first["blocks_computed"] == (N + 31) // 32 and first["chunks_written"] == first["n_chunks"] == 4
    before = np.asarray(dask_steps.open_descriptors(work)[0][:])
    # a killed run: two cache blocks and one chunk record lost, the chunk's rows garbage
    cdir, _, _ = dask_steps.cache_dir(cfg, work, analyze._dataset(work))
    (cdir / "block-000002.json").unlink()
    (cdir / "block-000005.json").unlink()
    (work / "analyze" / "descriptors.zarr" / "_progress" / "chunk-000001").unlink()
    import zarr

    zarr.open_group(str(work / "analyze" / "descriptors.zarr"), mode="r+")["values"][64:128] = -1.0
    again = dask_steps.descriptors(None, cfg, work)
    assert again["blocks_computed"] == 2 and again["chunks_written"] == 1
    np.testing.assert_array_equal(np.asarray(dask_steps.open_descriptors(work)[0][:]), before)

    # the driver's table streamed from the cache equals the local path's build_table, for any row subset/order
    from toolkit.analyze.descriptors import build_table, structural_descriptors

    reader = analyze._dataset(work)
    recs, computed = structural_descriptors(analyze.structure_arrays(reader), cdir, workers=1, coordination="cutoff")
    assert computed == 0
    rows = np.array([200, 3, 150, 64, 65, 7])
    want = build_table([recs[i] for i in rows])
    got = dask_steps.structural_table(cfg, work, reader, rows)
    assert got.ids == want.ids and got.names == want.names and got.failures == want.failures
    np.testing.assert_array_equal(got.values, want.values)


def test_cluster_moments_are_exact_per_chunk(tmp_path):
    """Per-chunk sums reduced in order give each cluster's mean/std (spectral signatures) and the Fisher
    2x2 tables of 0/1 columns; also through Dask tasks on a LocalCluster."""
    import zarr
    from distributed import Client, LocalCluster

    from toolkit.analyze.attribution import spectral_signature
    from toolkit.analyze.clustering import use_chunk_map
    from toolkit.analyze.dask_steps import cluster_moments, fisher_tables, save_labels
    from toolkit.analyze.engine import DaskChunkMap

    rng = np.random.default_rng(3)
    n, g, k = 1000, 7, 5
    labels = rng.integers(0, k, n)
    labels[::50] = -1  # not covered
    spec = rng.normal(size=(n, g)) + labels[:, None]
    spec[rng.random((n, g)) < 0.05] = np.nan
    x = zarr.create_array(str(tmp_path / "x.zarr"), shape=(n, g), chunks=(128, g), dtype="float64")
    x[:] = spec
    lab = save_labels(tmp_path / "labels.zarr", labels, 128)
    local = cluster_moments(x, lab, k, 128)
    cov = labels >= 0
    sig = spectral_signature(labels[cov], np.arange(g, dtype=float), None, spec[cov], None)
    for c in range(k):
        np.testing.assert_allclose(local["mean"][c], sig[c]["predicted"]["mean"], rtol=1e-10)
        np.testing.assert_allclose(local["std"][c], sig[c]["predicted"]["std"], rtol=1e-8)
        np.testing.assert_array_equal(local["count"][c], np.isfinite(spec[labels == c]).sum(0))
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as lc, Client(lc) as client:
        mapper = DaskChunkMap(client)
        with use_chunk_map(mapper, 128):
            dist = cluster_moments(x, lab, k, 128)
    assert mapper.tasks == 8
    for key in ("count", "sum", "mean", "std"):
        np.testing.assert_array_equal(dist[key], local[key])  # same sums in the same order
    onehot = (labels[:, None] == np.arange(k)).astype(float)  # a 0/1 column per cluster, as "element:X" columns
    y = zarr.create_array(str(tmp_path / "y.zarr"), shape=(n, k), chunks=(128, k), dtype="float32")
    y[:] = onehot
    tables = fisher_tables(cluster_moments(y, lab, k, 128), [f"element:X{j}" for j in range(k)])
    t = tables["element:X2"]
    assert t["ones_in"][2] == (labels == 2).sum() and t["n_in"][2] == (labels == 2).sum()
    assert t["ones_rest"][2] == 0 and t["n_rest"][2] == cov.sum() - (labels == 2).sum()


def test_slurm_cluster_takes_the_stage_resources(tmp_path):
    from toolkit.analyze.engine import cluster_kind, slurm_cluster_kwargs

    cfg = load_config(None, {"analyze": {"engine": "dask", "dask_threads_per_worker": 2},
                             "executor": {"kind": "slurm", "analyze": {
                                 "partition": "cpu", "account": "proj1", "qos": "long", "time_min": 90,
                                 "cpus_per_task": 4, "mem_gb": 16, "additional": {"exclusive": "user"}}}})
    assert cluster_kind(cfg) == "slurm"
    kw = slurm_cluster_kwargs(cfg, tmp_path)
    assert (kw["cores"], kw["processes"], kw["memory"], kw["walltime"]) == (4, 1, "16GB", "01:30:00")
    assert (kw["queue"], kw["account"]) == ("cpu", "proj1")
    assert kw["job_extra_directives"] == ["--qos=long", "--exclusive=user"]
    assert kw["worker_extra_args"] == ["--nthreads", "2"]
    assert "job_directives_skip" not in kw
    assert cluster_kind(load_config(None, {"analyze": {"engine": "dask"}})) == "local"
    nomem = load_config(None, {"analyze": {"engine": "dask", "dask_cluster": "slurm"}})
    assert slurm_cluster_kwargs(nomem, tmp_path)["job_directives_skip"] == ["--mem"]


def test_missing_descriptor_store_is_a_clear_error(tmp_path):
    from toolkit.analyze import AnalyzeError
    from toolkit.analyze.dask_steps import open_descriptors

    with pytest.raises(AnalyzeError, match=r"descriptors\.zarr: no descriptor store"):
        open_descriptors(tmp_path)


# ------------------------------------------------------------------------------------- SLURM
@pytest.mark.slurm
@pytest.mark.slow
def test_dask_workers_start_as_slurm_jobs(slurm_cluster, tmp_path):  # noqa: F811
    """Two Dask workers submitted through the real test cluster's sbatch run the chunked column
    statistics; sacct shows their jobs."""
    import zarr

    from toolkit.analyze.clustering import column_stats, use_chunk_map
    from toolkit.analyze.engine import DaskChunkMap, dask_client

    cfg = load_config(None, {"analyze": {"engine": "dask", "dask_workers": 2, "chunk_rows": 64},
                             # an explicit --mem: without it a job may get the node's whole memory and the
                             # second worker waits (Resources) behind the first
                             "executor": {"kind": "slurm", "analyze": {"cpus_per_task": 1, "time_min": 10, "mem_gb": 1}}})
    rng = np.random.default_rng(0)
    data = rng.normal(size=(500, 6)).astype(np.float32)
    x = zarr.create_array(str(tmp_path / "x.zarr"), shape=data.shape, chunks=(64, 6), dtype="float32")
    x[:] = data
    with dask_client(cfg, tmp_path / "run") as client:
        try:
            client.wait_for_workers(1, timeout=300)  # slow under load
        except TimeoutError as e:
            queue = subprocess.run(["squeue", "-o", "%i %j %T %R"], check=False, capture_output=True, text=True).stdout
            raise AssertionError(f"no Dask worker started as a SLURM job: {e}\nsqueue:\n{queue}") from e
        try:  # the second job may wait (Resources) behind other tests' jobs on the 2-CPU test node: not required
            client.wait_for_workers(2, timeout=60)
        except TimeoutError:
            pass
        hosts = client.run(lambda: __import__("os").environ.get("SLURM_JOB_ID"))
        assert 1 <= len(hosts) <= 2 and all(hosts.values()), hosts  # every worker runs inside a SLURM job
        mapper = DaskChunkMap(client)
        with use_chunk_map(mapper, 64):
            mean, std, bad = column_stats(x)
        assert mapper.tasks == 8
        jobs = sorted(hosts.values())
    np.testing.assert_allclose(mean, data.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, data.astype(np.float64).std(0), rtol=1e-5)
    assert bad == 0
    out = subprocess.run(["sacct", "-n", "-X", "-j", ",".join(jobs), "-o", "JobID,JobName%40"],
                         capture_output=True, text=True, check=True).stdout
    assert all(j in out for j in jobs) and "spectrolens-analyze-dask" in out
    assert list((tmp_path / "run" / "logs" / "analyze" / "dask").glob("*.err")) or \
        list((tmp_path / "run" / "logs" / "analyze" / "dask").glob("*.out"))

