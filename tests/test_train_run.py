"""The train stage end to end on a real prepared benchmark store (tiny model, one process).

Exact resume (epoch boundary and mid-epoch after a real SIGUSR1), LR schedule on the optimizer in
use, bad-config errors before any work, NaN/inf loss naming the material ids, finished runs skipped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from toolkit.config import ConfigError, PipelineConfig, load_config
from toolkit.data import prepare
from toolkit.data.store import DatasetReader, part_name
from toolkit.train import NonFiniteLossError, TrainingInterrupted, run
from toolkit.train import checkpoint as ckpt
from toolkit.train.loop import Trainer

TINY = [
    "data.source=benchmark", "data.benchmark.n_materials=40", "data.grid.num=101", "data.workers=1",
    "data.shard_size=16", "model.hidden_features=16", "model.embedding_features=16", "model.alignn_layers=1",
    "model.gcn_layers=1", "train.epochs=4", "train.batch_size=8", "train.progress=false", "train.seed=7",
    "train.learning_rate=0.003",
]


def tiny_cfg(*extra: str) -> PipelineConfig:
    return load_config(None, TINY + list(extra))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A run directory holding a prepared 40-material benchmark store (101-point grid)."""
    d = tmp_path_factory.mktemp("prepared")
    prepare.run(tiny_cfg(), d)
    return d


def fresh_run(prepared: Path, tmp_path: Path, name: str) -> Path:
    """A new run directory sharing the prepared store (copied: runs must not share train/)."""
    d = tmp_path / name
    d.mkdir()
    shutil.copytree(prepared / "dataset.zarr", d / "dataset.zarr")
    return d


def last_state(run_dir: Path) -> dict:
    return ckpt.load(run_dir / "train" / "checkpoints" / "last.pt", ckpt.TRAIN_FORMAT)


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = last_state(a), last_state(b)
    assert sa["step"] == sb["step"] and sa["epoch"] == sb["epoch"]
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    for k, v in sa["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, sb["optimizer"]["state"][k][name]), (k, name)
    ha = json.loads((a / "train" / "rank0.json").read_text())["weights_sha256"]
    hb = json.loads((b / "train" / "rank0.json").read_text())["weights_sha256"]
    assert ha == hb


def test_train_writes_outputs_and_exact_resume_at_epoch_boundary(prepared, tmp_path, caplog):
    cfg = tiny_cfg()
    a = fresh_run(prepared, tmp_path, "straight")
    out = run(cfg, a)
    assert out["test_n_materials"] == 4 and out["counts"] == {"train": 32, "val": 4, "test": 4,
                                                              "excluded_no_spectrum": 0, "unassigned": 0}
    assert math.isfinite(out["test_spectrum_mae"]) and out["noise_floor"] == pytest.approx(0.05 * math.sqrt(2 / math.pi))
    assert out["mae_over_noise_floor"] == pytest.approx(out["test_spectrum_mae"] / out["noise_floor"])
    t = a / "train"
    for f in ("split.json", "best.pt", "metrics.jsonl", "metrics.csv", "metrics.json", "test_predictions.csv"):
        assert (t / f).is_file(), f
    assert any((t / "tb").iterdir()) and (a / "logs" / "train" / "rank0.log").read_text()
    rows = [json.loads(x) for x in (t / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["val_mae"]) for r in rows)
    preds = (t / "test_predictions.csv").read_text().splitlines()
    assert preds[0].startswith("id,spectrum_mae") and len(preds) == 5
    split = json.loads((t / "split.json").read_text())
    assert sorted(x.split(",")[0] for x in preds[1:]) == sorted(split["test"])
    best = torch.load(t / "best.pt", weights_only=True)  # what embed loads
    assert best["format"] == ckpt.MODEL_FORMAT and best["output_features"] == 101
    assert PipelineConfig.model_validate_json(best["config"]).model.hidden_features == 16

    b = fresh_run(prepared, tmp_path, "resumed")
    assert run(cfg, b, stop_after_epoch=2) == {}
    assert last_state(b)["epoch"] == 2 and not (b / "train" / "metrics.json").exists()
    caplog.set_level("INFO")
    out_b = run(cfg, b)
    assert "resumed from" in caplog.text
    assert_same_weights(a, b)
    assert out_b["test_spectrum_mae"] == out["test_spectrum_mae"]
    rows_b = [json.loads(x) for x in (b / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in rows_b] == [r["train_loss"] for r in rows]

    caplog.clear()
    mtime = (b / "train" / "best.pt").stat().st_mtime_ns
    assert run(cfg, b)["test_spectrum_mae"] == out["test_spectrum_mae"]  # finished: not retrained
    assert "not retraining" in caplog.text and (b / "train" / "best.pt").stat().st_mtime_ns == mtime


def test_sigusr1_mid_epoch_checkpoints_and_resumes_exactly(prepared, tmp_path, monkeypatch):
    cfg = tiny_cfg("train.batch_size=4", "train.epochs=2")
    a = fresh_run(prepared, tmp_path, "straight")
    run(cfg, a)

    b = fresh_run(prepared, tmp_path, "signalled")
    real_step = Trainer._train_step

    def step_then_signal(self, batch):  # a real signal, delivered to this process after step 11 (epoch 2 of 8-step epochs)
        loss = real_step(self, batch)
        if self.state.step == 11:
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss

    monkeypatch.setattr(Trainer, "_train_step", step_then_signal)
    chained: list[tuple[int, bool]] = []  # the handler that was there before (submitit's requeue under submitit)

    def previous(signum, frame):
        chained.append((signum, (b / "train" / "checkpoints" / "last.pt").exists()))

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        with pytest.raises(TrainingInterrupted) as exc:
            run(cfg, b)
        assert signal.getsignal(signal.SIGUSR1) is previous  # handlers restored
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert exc.value.code == 75 and exc.value.signum == signal.SIGUSR1
    assert chained == [(signal.SIGUSR1, True)]  # called once, after the checkpoint was written
    st = last_state(b)
    assert (st["epoch"], st["batch_in_epoch"], st["step"]) == (1, 3, 11)  # saved at the next batch boundary
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    run(cfg, b)
    assert_same_weights(a, b)


def test_lr_follows_one_cycle_schedule_on_the_optimizer_in_use(prepared, tmp_path):
    from toolkit.model import build_model
    from toolkit.train.data import open_training_data
    from toolkit.train.distributed import DistEnv
    from toolkit.train.metrics import MetricsLog
    from toolkit.train.split import resolve_split

    lr = 0.01
    cfg = tiny_cfg("train.epochs=3", f"train.learning_rate={lr}", "train.weight_decay=0", "train.grad_clip=null")
    d = fresh_run(prepared, tmp_path, "lr")
    ds = open_training_data(cfg, d)
    split = resolve_split(cfg.train, ds.ids, ds.has_spectrum, d / "train" / "split.json")
    (d / "train").mkdir(exist_ok=True)

    def trainer() -> Trainer:
        torch.manual_seed(0)
        return Trainer(cfg, build_model(cfg.model, ds.output_features), ds.loaders(split, DistEnv(), cfg),
                       d / "train", DistEnv(), torch.device("cpu"), ds.energy, ds.output_features)

    tr = trainer()
    total = tr.total_steps
    assert total == 3 * 4  # 32 training materials, batch 8, 3 epochs
    peak = 0.3 * total - 1  # torch's OneCycleLR (cos, pct_start 0.3, div 25, final_div 1e4), written out

    def expected(s: int) -> float:
        lo, end = lr / 25, lr / 25 / 1e4
        if s <= peak:
            return lr + (lo - lr) / 2 * (1 + math.cos(math.pi * s / peak))
        return end + (lr - end) / 2 * (1 + math.cos(math.pi * (s - peak) / (total - 1 - peak)))

    tr.fit(MetricsLog(d / "train", 0, tensorboard=False))
    assert tr.lr_trace == pytest.approx([expected(s) for s in range(total)], rel=1e-9)
    assert 0.98 * lr < max(tr.lr_trace) <= lr and tr.lr_trace[0] == pytest.approx(lr / 25)

    # the optimizer that steps is the scheduled one: Adam's first update is lr(0) * g/|g| per weight
    tr = trainer()
    w0 = tr.raw_model.fc.weight.detach().clone()
    tr._train_step(next(iter(tr.loaders.train)))
    step = (tr.raw_model.fc.weight.detach() - w0).abs().max().item()
    assert step == pytest.approx(lr / 25, rel=1e-3)  # not the un-scheduled lr (0.01)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(expected(1), rel=1e-9)


def test_config_data_mismatch_fails_before_any_work(prepared, tmp_path):
    d = fresh_run(prepared, tmp_path, "bad")
    with pytest.raises(ConfigError, match=r"model.output_features=1501 but .* 101 grid points"):
        run(tiny_cfg("model.output_features=1501"), d)
    with pytest.raises(ConfigError, match="training set is empty"):
        run(tiny_cfg("train.split=[0,0.5,0.5]"), d)
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"train": ["bench-00001", "nope-1"], "val": [], "test": []}))
    with pytest.raises(ConfigError, match=r"not in the dataset.*nope-1"):
        run(tiny_cfg(f"train.split_file={f}"), d)
    assert not (d / "train").exists()  # nothing was written
    with pytest.raises(ConfigError, match="spectrolens prepare"):
        run(tiny_cfg(), tmp_path / "empty")


def test_changed_config_refuses_to_resume(prepared, tmp_path):
    d = fresh_run(prepared, tmp_path, "changed")
    run(tiny_cfg(), d, stop_after_epoch=1)
    with pytest.raises(ckpt.CheckpointError, match=r"train.learning_rate: 0.003 -> 0.01"):
        run(tiny_cfg("train.learning_rate=0.01"), d)
    last = d / "train" / "checkpoints" / "last.pt"
    state = last_state(d)
    state["world_size"] = 2  # as if written by a 2-rank run
    ckpt.atomic_save(state, last)
    with pytest.raises(ckpt.CheckpointError, match=r"2 rank\(s\), this run has 1"):
        run(tiny_cfg(), d)


def test_non_finite_loss_names_the_materials_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    cfg = tiny_cfg()
    d = fresh_run(prepared, tmp_path, "nan")
    run(cfg, d, stop_after_epoch=1)
    good = last_state(d)
    split = json.loads((d / "train" / "split.json").read_text())
    victim = split["train"][0]
    reader = DatasetReader(d / "dataset.zarr")
    row = int(np.nonzero(reader.ids == victim)[0][0])
    part, local = int(reader.part_of[row]), int(reader.local[row])
    spec = zarr.open_group(str(d / "dataset.zarr"), mode="r+")[f"parts/{part_name(part)}/spectrum"]
    vals = np.asarray(spec[...])
    vals[local] = 3e38  # finite in the store, overflows the loss sum to inf
    spec[...] = vals
    with pytest.raises(NonFiniteLossError, match=victim):
        run(cfg, d)
    after = last_state(d)
    assert after["step"] == good["step"]
    assert all(torch.equal(after["model"][k], good["model"][k]) for k in good["model"])


def test_trainjob_runs_under_submitit_and_requeues_itself(prepared, tmp_path):
    import submitit

    from toolkit.hpc.stages import TrainJob

    cfg = tiny_cfg("train.epochs=1")
    d = fresh_run(prepared, tmp_path, "submitit")
    job = TrainJob(cfg, d)
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert isinstance(again.function, TrainJob) and again.function.run_dir == d and again.function.cfg == cfg
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    ex.update_parameters(timeout_min=10)
    result = ex.submit(job).result()  # a real submitit job process
    assert result["test_n_materials"] == 4 and (d / "train" / "best.pt").is_file()


def test_bf16_autocast_path_trains(prepared, tmp_path):
    """The GPU default (bf16 autocast, fp32 loss and weights), forced on CPU here."""
    d = fresh_run(prepared, tmp_path, "bf16")
    out = run(tiny_cfg("train.precision=bf16", "train.epochs=1"), d)
    assert math.isfinite(out["test_spectrum_mae"])
    assert all(v.dtype == torch.float32 for v in torch.load(d / "train" / "best.pt", weights_only=True)["model"].values()
               if v.is_floating_point())
