"""The embed stage end to end on a real prepared dataset (structure-only MP structures) and a tiny model:
hooks, pooling, 1 vs 3 workers, SIGKILL + restart, checkpoint refusal, verify, the docs snippet."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import smallest_mp_jsonl
from toolkit import embed, sharded
from toolkit.cli import main as cli_main
from toolkit.config import PipelineConfig, load_config
from toolkit.data import prepare
from toolkit.data.loader import MaterialDataset, collate
from toolkit.data.store import DatasetReader
from toolkit.embed import hooks
from toolkit.embed import stage
from toolkit.embed import store as st
from toolkit.hpc import launch
from toolkit.model import build_model
from toolkit.train import checkpoint as ckpt

N_STRUCTURES = 30
MODEL = {"alignn_layers": 2, "gcn_layers": 2, "hidden_features": 16, "embedding_features": 8}


def _cfg(ckpt_path: Path, **embed_kw) -> PipelineConfig:
    e = {"shard_size": 8, "batch_size": 4, "workers": 1, "checkpoint": str(ckpt_path)}
    e.update(embed_kw)
    return load_config(None, {"model": MODEL, "embed": e})


def _save_checkpoint(path: Path, cfg: PipelineConfig, output_features: int, seed: int) -> None:
    """A checkpoint in the format toolkit.train writes as best.pt (random weights, fixed seed)."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, output_features)
    ckpt.atomic_save({"format": ckpt.MODEL_FORMAT, "version": ckpt.VERSION, "model": model.state_dict(),
                      "config": cfg.model_dump_json(), "output_features": output_features, "epoch": 0,
                      "val_mae": 1.0}, path)


@pytest.fixture(scope="module", autouse=True)
def single_threaded_workers():
    """Every worker process computes its shards with one thread. Bitwise equality across runs is a
    property of the per-shard computation only when the BLAS thread count is fixed (multi-threaded MKL
    may change its blocking, and so the rounding, with the thread count and machine load)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MKL_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_data):
    """dataset.zarr of the 30 smallest MP structures (no spectra: has_spectrum false) + a tiny checkpoint."""
    root = tmp_path_factory.mktemp("embed")
    src = smallest_mp_jsonl(shared_data, root / "structures.jsonl", N_STRUCTURES)
    data_run = root / "data"
    pcfg = load_config(None, {"data": {"source": "jsonl", "path": str(src), "shard_size": 16, "workers": 1}})
    prepare.run(pcfg, data_run)
    reader = DatasetReader(data_run / "dataset.zarr")
    assert len(reader) == N_STRUCTURES and not reader.has_spectrum.any()
    ck = root / "best.pt"
    _save_checkpoint(ck, _cfg(ck), len(reader.energy), seed=0)
    return {"root": root, "dataset": data_run / "dataset.zarr", "ckpt": ck, "G": len(reader.energy)}


def _run_dir(prepared, name: str) -> Path:
    d = prepared["root"] / name
    d.mkdir()
    (d / "dataset.zarr").symlink_to(prepared["dataset"])
    return d


def _arrays(g: zarr.Group, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for name, item in g.members():
        if name.startswith("_"):
            continue
        if isinstance(item, zarr.Group):
            out.update(_arrays(item, f"{prefix}{name}/"))
        else:
            out[f"{prefix}{name}"] = item[...]
    return out


@pytest.fixture(scope="module")
def reference(prepared):
    """One worker, all layers, mean/max/sum pooling, per-atom features."""
    run_dir = _run_dir(prepared, "ref")
    cfg = _cfg(prepared["ckpt"], pooling=["mean", "max", "sum"], per_atom=True)
    info = launch.run_sharded("embed", cfg, run_dir)
    assert info["n_shards"] == 4
    return {"run_dir": run_dir, "cfg": cfg, "arrays": _arrays(embed.open_embeddings(run_dir))}


def _tiny_model(prepared) -> torch.nn.Module:
    obj = ckpt.load(prepared["ckpt"], ckpt.MODEL_FORMAT)
    model = build_model(_cfg(prepared["ckpt"]).model, prepared["G"])
    model.load_state_dict(obj["model"])
    return model.eval()


def _all_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_removes_hooks_also_on_error(prepared):
    model = _tiny_model(prepared)
    batch = collate([MaterialDataset(prepared["dataset"])[i] for i in range(3)])
    with hooks.capture(model, ["gcn_2", "readout"]) as cap:
        assert _all_hooks(model) == 3  # gcn_2 forward hook, readout pre + forward hook
        with torch.inference_mode():
            model(batch)
        assert cap.atoms["gcn_2"].shape == (int(batch.n_atoms.sum()), 16)
    assert _all_hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.capture(model, None):
            assert _all_hooks(model) == 6
            raise RuntimeError("boom")
    assert _all_hooks(model) == 0
    with pytest.raises(ValueError, match="unknown layer"):
        hooks.resolve_layers(model, ["gcn_9"])


def test_pool_matches_per_graph_reduction():
    g = torch.Generator().manual_seed(1)
    counts = [3, 1, 5, 2]
    x = torch.randn(sum(counts), 7, generator=g)
    batch = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    parts = torch.split(x, counts)
    torch.testing.assert_close(hooks.pool(x, batch, 4, "mean"), torch.stack([p.mean(0) for p in parts]))
    torch.testing.assert_close(hooks.pool(x, batch, 4, "sum"), torch.stack([p.sum(0) for p in parts]))
    torch.testing.assert_close(hooks.pool(x, batch, 4, "max"), torch.stack([p.max(0).values for p in parts]))
    assert hooks.pool(x.bfloat16(), batch, 4, "mean").dtype == torch.float32
    with pytest.raises(ValueError, match="unknown pooling"):
        hooks.pool(x, batch, 4, "median")


def test_pooled_features_equal_a_direct_forward_pass(prepared, reference):
    """Independent computation: one material per forward pass, plain torch hooks, per-material reductions."""
    model = _tiny_model(prepared)
    ds = MaterialDataset(prepared["dataset"])
    arrays = reference["arrays"]
    for i in (0, 9, 17, 29):
        seen: dict[str, torch.Tensor] = {}
        handles = [model.alignn_layers[k].register_forward_hook(
            lambda m, a, out, k=k: seen.__setitem__(f"alignn_{k + 1}", out[0])) for k in range(2)]
        handles += [model.gcn_layers[k].register_forward_hook(
            lambda m, a, out, k=k: seen.__setitem__(f"gcn_{k + 1}", out[0])) for k in range(2)]
        handles.append(model.readout.register_forward_hook(lambda m, a, out: seen.__setitem__("readout", out)))
        with torch.no_grad():
            pred = model(collate([ds[i]]))
        for h in handles:
            h.remove()
        for layer in ("alignn_1", "alignn_2", "gcn_1", "gcn_2"):
            x = seen[layer].numpy()
            np.testing.assert_allclose(arrays[f"layers/{layer}/mean"][i], x.mean(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(arrays[f"layers/{layer}/max"][i], x.max(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(arrays[f"layers/{layer}/sum"][i], x.sum(0), rtol=1e-5, atol=1e-4)
            off = arrays[f"layers/{layer}/atom_offset"]
            np.testing.assert_allclose(arrays[f"layers/{layer}/atoms"][off[i]:off[i + 1]], x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(arrays["layers/readout/mean"][i], seen["readout"][0].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(arrays["layers/readout/max"][i], seen["gcn_2"].numpy().max(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(arrays["prediction"][i], pred[0].numpy(), rtol=1e-5, atol=1e-5)
    assert list(arrays["ids"]) == list(DatasetReader(prepared["dataset"]).ids)
    np.testing.assert_array_equal(arrays["index"], np.arange(N_STRUCTURES))


def test_store_metadata_and_logs(prepared, reference):
    root = embed.open_embeddings(reference["run_dir"])
    a = root.attrs
    assert a["format"] == "spectrolens-embeddings" and a["complete"] is True
    assert a["checkpoint_sha256"] == stage.file_sha256(prepared["ckpt"])
    assert a["layers"] == ["alignn_1", "alignn_2", "gcn_1", "gcn_2", "readout"]
    assert a["config"]["embed"]["pooling"] == ["mean", "max", "sum"]
    assert root["layers/gcn_1/mean"].shards == (8, 16)
    logs = reference["run_dir"] / "logs" / "embed"
    assert "shard 3 done" in (logs / "worker-0.log").read_text()
    assert "started 1 worker processes for 4 shards" in (logs / "driver.log").read_text()
    assert json.loads((reference["run_dir"] / "run_info.json").read_text())["stages"]["embed"]
    assert embed.verify(reference["cfg"], reference["run_dir"]) == 0


def test_three_concurrent_workers_give_identical_arrays(prepared, reference):
    run_dir = _run_dir(prepared, "three")
    cfg = _cfg(prepared["ckpt"], pooling=["mean", "max", "sum"], per_atom=True, workers=3)
    launch.run_sharded("embed", cfg, run_dir)
    got = _arrays(embed.open_embeddings(run_dir))
    assert set(got) == set(reference["arrays"])
    for key, ref in reference["arrays"].items():
        np.testing.assert_array_equal(got[key], ref, err_msg=key)
    for t in range(3):
        assert "finished" in (run_dir / "logs" / "embed" / f"worker-{t}.log").read_text()


# A real worker process (the production module), with zarr writes slowed down so that the test can
# SIGKILL it while a shard's arrays are half written.
_SLOW_WORKER = """
import sys, time, zarr
_orig = zarr.Array.__setitem__
def _slow(self, sel, value):
    _orig(self, sel, value)
    time.sleep(0.25)
zarr.Array.__setitem__ = _slow
from toolkit.hpc.worker import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_shard_then_rerun_completes_without_missing_or_duplicates(prepared, reference):
    run_dir = _run_dir(prepared, "killed")
    cfg = _cfg(prepared["ckpt"], pooling=["mean"], workers=2)
    stage.plan(cfg, run_dir)
    path = st.store_path(run_dir)
    config_file = run_dir / "cfg.yaml"
    config_file.write_text(json.dumps(json.loads(cfg.model_dump_json())))
    cmd = [sys.executable, "-c", _SLOW_WORKER, "--stage", "embed", "--config", str(config_file), "--run-dir", str(run_dir),
           "--task", "0", "--tasks", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_write_of_shard_1 = path / "layers" / "alignn_1" / "mean" / "c" / "1" / "0"
    deadline = time.time() + 90
    while not first_write_of_shard_1.exists():
        assert proc.poll() is None, "worker exited before it was killed"
        assert time.time() < deadline, "worker never reached shard 1"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert st.done_shards(path) == {0}  # shard 1 has bytes on disk but no completion record
    rep = st.verify_store(path)
    assert rep.missing_shards == [1, 2, 3] and rep.missing_rows == 22
    assert embed.verify(cfg, run_dir) == 1
    rec0 = st.read_record(path, 0)

    launch.run_sharded("embed", cfg, run_dir)  # 2 workers do only the missing shards
    assert st.read_record(path, 0) == rec0  # the finished shard was not redone
    got = _arrays(embed.open_embeddings(run_dir))
    assert len(got) == 9  # ids, index, energy, prediction, 5 layers x mean
    for key, arr in got.items():
        np.testing.assert_array_equal(arr, reference["arrays"][key], err_msg=key)
    ids = got["ids"]
    assert len(ids) == N_STRUCTURES == len(set(ids.tolist()))
    assert embed.verify(cfg, run_dir) == 0


def test_other_checkpoint_is_refused_not_mixed(prepared, tmp_path):
    run_dir = _run_dir(prepared, "refuse")
    ck = tmp_path / "best.pt"
    cfg = _cfg(ck, layers=["gcn_2", "readout"])
    _save_checkpoint(ck, cfg, prepared["G"], seed=0)
    stage.plan(cfg, run_dir)
    stage.run_shard(cfg, run_dir, 0)
    _save_checkpoint(ck, cfg, prepared["G"], seed=1)  # retrained model, same path
    with pytest.raises(st.EmbedStoreError, match="refusing to mix"):
        stage.plan(cfg, run_dir)
    with pytest.raises(st.EmbedStoreError, match="refusing to mix"):
        stage.run_shard(cfg, run_dir, 1)
    with pytest.raises(st.EmbedStoreError, match="refusing to mix"):
        launch.run_sharded("embed", cfg, run_dir)
    assert st.done_shards(st.store_path(run_dir)) == {0}
    assert embed.verify(cfg, run_dir) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_failing_worker_is_reported_with_its_log(prepared):
    run_dir = _run_dir(prepared, "failing")
    cfg = _cfg(prepared["ckpt"], layers=["readout"], device="cuda")
    with pytest.raises(embed.EmbedError, match=r"(?s)worker 0 exited with 1 .*worker-0.log.*torch sees no GPU"):
        launch.run_sharded("embed", cfg, run_dir)
    assert st.done_shards(st.store_path(run_dir)) == set()
    assert embed.verify(cfg, run_dir) == 1


def test_store_of_other_materials_is_refused(prepared):
    run_dir = _run_dir(prepared, "other_ids")
    cfg = _cfg(prepared["ckpt"], layers=["readout"])
    stage.plan(cfg, run_dir)
    ids = zarr.open_group(st.store_path(run_dir), mode="r+")["ids"]
    changed = ids[:]
    changed[5] = "not-in-the-dataset"
    ids[:] = changed  # as if dataset.zarr had been re-prepared from other structures
    with pytest.raises(st.EmbedStoreError, match="other materials"):
        stage.plan(cfg, run_dir)


def test_cli_shard_and_verify(prepared, capsys):
    run_dir = _run_dir(prepared, "cli")
    args = ["--run-dir", str(run_dir), "--set", f"embed.checkpoint={prepared['ckpt']}", "--set", "embed.shard_size=16",
            "--set", "embed.layers=[readout]"] + [f"--set=model.{k}={v}" for k, v in MODEL.items()]
    assert cli_main(["embed", *args, "--shard", "1"]) == 0
    assert cli_main(["embed", *args, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "missing: 1 shards (16 rows): 0" in out and "NOT OK" in out
    assert cli_main(["embed", *args]) == 0
    assert cli_main(["embed", *args, "--verify"]) == 0
    assert "OK" in capsys.readouterr().out


def test_task_with_dataloader_workers_prefetching_across_shards(prepared, reference):
    """One task, one DataLoader with a (spawned) worker process over all its shards: same arrays."""
    run_dir = _run_dir(prepared, "loader_workers")
    cfg = _cfg(prepared["ckpt"], layers=["gcn_2", "readout"], num_workers=1, batch_size=3)
    stage.plan(cfg, run_dir)
    assert sharded.run_task("embed", cfg, run_dir, 1, 2) == [1, 3]
    assert sharded.run_task("embed", cfg, run_dir, 1, 2) == []  # done shards are skipped
    assert sharded.run_task("embed", cfg, run_dir, 0, 2) == [0, 2]
    stage.finalize(cfg, run_dir)
    got = embed.open_embeddings(run_dir)
    for key in ("layers/gcn_2/mean", "layers/readout/mean", "prediction"):
        np.testing.assert_allclose(got[key][:], reference["arrays"][key], rtol=1e-5, atol=1e-5, err_msg=key)
    with pytest.raises(embed.EmbedError, match="task 2 is not in"):
        sharded.run_task("embed", cfg, run_dir, 2, 2)


def test_bf16_autocast_path_runs_on_cpu(prepared, reference):
    """The GPU precision path (bf16 autocast, fp32 pooling) exercised on CPU: close to fp32, not equal."""
    run_dir = _run_dir(prepared, "bf16")
    cfg = _cfg(prepared["ckpt"], precision="bf16", layers=["gcn_2"], shard_size=32)
    stage.plan(cfg, run_dir)
    stage.run_shard(cfg, run_dir, 0)
    stage.finalize(cfg, run_dir)
    got = embed.open_embeddings(run_dir)["layers/gcn_2/mean"][:]
    ref = reference["arrays"]["layers/gcn_2/mean"]
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert not np.array_equal(got, ref)
    np.testing.assert_allclose(got, ref, atol=0.1 * float(np.abs(ref).max()))


def test_model_format_matches_train():
    from toolkit.embed.extract import MODEL_FORMAT

    assert MODEL_FORMAT == ckpt.MODEL_FORMAT


def test_bad_checkpoint_is_a_clear_error(prepared, tmp_path):
    run_dir = _run_dir(prepared, "badckpt")
    bad = tmp_path / "best.pt"
    torch.save({"format": "something-else", "model": {}}, bad)
    with pytest.raises(embed.EmbedError, match=f"{bad}.*is not a spectrolens-model file"):
        stage.plan(_cfg(bad), run_dir)
    with pytest.raises(embed.EmbedError, match="does not exist"):
        stage.plan(_cfg(tmp_path / "missing.pt"), run_dir)
    assert not st.store_path(run_dir).exists()


def _docs_snippet(repo_root: Path, lang: str) -> str:
    text = (repo_root / "docs" / "zarr.md").read_text()
    section = text[text.index("## embeddings.zarr"):]
    nxt = re.search(r"\n## ", section[3:])
    section = section[: nxt.start() + 3] if nxt else section
    blocks = re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)
    assert blocks, f"no ```{lang} block in the embeddings.zarr section of docs/zarr.md"
    return blocks[0]


def test_docs_snippet_opens_the_store(repo_root, reference):
    code = _docs_snippet(repo_root, "python")
    code = code.replace("runs/demo", str(reference["run_dir"]))
    env: dict = {}
    exec(compile(code, "docs/zarr.md", "exec"), env)
    np.testing.assert_array_equal(env["X"], reference["arrays"]["layers/gcn_2/mean"])
    assert list(env["ids"]) == list(reference["arrays"]["ids"])
    assert env["ds"]["mean"].shape == (N_STRUCTURES, 16)
    assert env["atoms_i"].shape[1] == 16


@pytest.mark.parametrize("repeat", range(3))
def test_two_concurrent_embed_commands_give_one_correct_store(prepared, reference, repo_root, repeat):
    """A double submission: two `spectrolens embed` processes (2 and 1 workers) started together on one run
    directory both finish, every shard is extracted exactly once, and the arrays equal a single run's."""
    run_dir = _run_dir(prepared, f"concurrent{repeat}")
    args = [sys.executable, "-m", "toolkit.cli", "embed", "--run-dir", str(run_dir),
            "--set", f"embed.checkpoint={prepared['ckpt']}", "--set", "embed.shard_size=8",
            "--set", "embed.batch_size=4", "--set", "embed.pooling=[mean,max,sum]", "--set", "embed.per_atom=true"]
    args += [f"--set=model.{k}={v}" for k, v in MODEL.items()]
    procs = [subprocess.Popen(args + ["--set", f"embed.workers={w}"], cwd=repo_root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in (2, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    got = _arrays(embed.open_embeddings(run_dir))
    assert set(got) == set(reference["arrays"])
    for key, ref in reference["arrays"].items():
        np.testing.assert_array_equal(got[key], ref, err_msg=key)
    logs = "".join(p.read_text() for p in (run_dir / "logs" / "embed").glob("task-*.log"))
    done = Counter(int(m) for m in re.findall(r"shard (\d+) done", logs))
    assert done == Counter(range(4))  # one writer per shard
    assert embed.verify(reference["cfg"], run_dir) == 0


def test_checkpoint_of_another_grid_is_refused_at_plan(prepared, tmp_path):
    run_dir = _run_dir(prepared, "othergrid")
    ck = tmp_path / "best.pt"
    cfg = _cfg(ck, layers=["readout"])
    _save_checkpoint(ck, cfg, prepared["G"] + 7, seed=0)
    with pytest.raises(embed.EmbedError, match=rf"predicts {prepared['G'] + 7} values .* grid of {prepared['G']} points"):
        stage.plan(cfg, run_dir)
    assert not st.store_path(run_dir).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_failing_worker_is_one_message_without_traceback_from_the_cli(prepared, repo_root):
    run_dir = _run_dir(prepared, "cli_failing")
    args = [sys.executable, "-m", "toolkit.cli", "embed", "--run-dir", str(run_dir),
            "--set", f"embed.checkpoint={prepared['ckpt']}", "--set", "embed.device=cuda",
            "--set", "embed.layers=[readout]"] + [f"--set=model.{k}={v}" for k, v in MODEL.items()]
    p = subprocess.run(args, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    first = [ln for ln in p.stderr.splitlines() if ln.startswith("spectrolens embed: EmbedError")]
    assert first and "worker-0.log" in first[0] and "worker 0 exited with 1" in first[0]
