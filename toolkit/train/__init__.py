"""The ``train`` stage: (distributed) ALIGNN training on RUN_DIR/dataset.zarr that resumes exactly.

``run(cfg, run_dir)`` is called once per rank; it discovers rank/world itself (torchrun, SLURM, MPI,
or a single process; see :mod:`toolkit.train.distributed`). Outputs in ``RUN_DIR/train``: split.json,
checkpoints/last.pt, best.pt, metrics.jsonl/.csv, tb/, metrics.json, test_predictions.csv,
rank<k>.json (weights hash per rank); logs in ``RUN_DIR/logs/train/rank<k>.log``.

``train.ensemble: N`` (> 1) trains N members one after another, member ``k`` with seed ``train.seed + k``
into ``RUN_DIR/train/members/<k>/`` (the same files; each resumes on its own, finished ones are skipped),
then writes the ensemble's metrics and calibration to ``train/metrics.json`` (:mod:`toolkit.train.ensemble`)
and copies member 0's ``best.pt`` to ``train/best.pt``. ``run(..., member=k)`` trains member ``k`` alone
(one unit of a SLURM array, one writer per member folder; log ``logs/train/member<k>-rank<r>.log``) and
writes no ensemble report; a later ``run`` without ``member`` finds every member finished and writes it.

On SIGUSR1/SIGTERM (plus any ``extra_stop_signals`` the launcher names, e.g. submitit's preemption
signal) the loop saves a checkpoint at the next batch boundary, then hands the signal to the handler
that was installed before (the launcher's requeue; :class:`toolkit.hpc.stages.TrainJob`). This module
imports nothing from :mod:`toolkit.hpc` and nothing from submitit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from toolkit.config import ConfigError, PipelineConfig
from toolkit.layout import RunLayout
from toolkit.runtime import task_log, write_json
from toolkit.model.kernels import kernel_status
from toolkit.train import distributed as D
from toolkit.train.checkpoint import CheckpointError
from toolkit.train.loop import NonFiniteLossError, StopFlag, Trainer, TrainingInterrupted, weights_sha256
from toolkit.train.metrics import MetricsLog
from toolkit.train.split import resolve_split, save_split

__all__ = ["run", "TrainingInterrupted", "NonFiniteLossError", "CheckpointError"]

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _stop_signals(flag: StopFlag, extra: tuple[int, ...] = ()):
    """Route SIGUSR1/SIGTERM (and ``extra``, e.g. submitit's preemption signal) to ``flag``; keep the
    previous handlers.

    Yields the previous handlers so that, after the checkpoint is saved, the launcher's own handler
    can be called (it requeues the job)."""
    if threading.current_thread() is not threading.main_thread():
        yield {}
        return
    sigs = set(STOP_SIGNALS) | set(extra)
    previous = {s: signal.signal(s, flag) for s in sigs}
    try:
        yield previous
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _chain_previous_handler(previous: dict, signum: int) -> None:
    """After our checkpoint: hand the signal to the handler that was there before (the launcher's requeue)."""
    h = previous.get(signum)
    if callable(h) and h not in (signal.default_int_handler,):
        h(signum, None)


def run(cfg: PipelineConfig, run_dir: Path, *, stop_after_epoch: int | None = None,
        extra_stop_signals: tuple[int, ...] = (), member: int | None = None) -> dict:
    """Train (or resume, or skip a finished run). Returns the final metrics (rank 0) or ``{}``.

    ``stop_after_epoch``: checkpoint and return after this many completed epochs (time-sliced jobs, tests).
    ``extra_stop_signals``: signals that also mean "checkpoint and stop" (the launcher's).
    ``member``: ensembles only: train this member alone (its own metrics on rank 0), no ensemble report."""
    from toolkit.train.data import open_training_data

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    train_dir = layout.train_dir
    denv = D.discover()
    device = D.select_device(cfg.train.device, denv)
    backend = D.select_backend(cfg.train.dist_backend, device)
    if member is not None and not 0 <= member < cfg.train.ensemble:
        raise ConfigError(f"ensemble member {member} does not exist: train.ensemble is {cfg.train.ensemble}")
    with task_log(run_dir, "train", f"rank{denv.rank}" if member is None else f"member{member}-rank{denv.rank}"):
        if device.type == "cpu":
            threads, why = D.cpu_threads()
            torch.set_num_threads(threads)
            log.info("CPU training with %d intra-op thread(s): %s", threads, why)
            if cfg.model.backend == "torch":
                log.info("message passing: %s", kernel_status())
        if layout.is_complete("train"):
            log.info("training in %s is finished (metrics.json and best.pt exist): not retraining; delete %s "
                     "to train again", train_dir, train_dir)
            return json.loads(layout.train_metrics.read_text())
        ds = open_training_data(cfg, run_dir)  # validates store vs config before any work
        cfg = ds.with_conditions(cfg)  # model.conditions = the dataset's (recorded in config and checkpoints)
        split = resolve_split(cfg.train, ds.ids, ds.has_spectrum, train_dir / "split.json", ds.groups)
        if denv.is_main:
            from toolkit.config import record_run

            save_split(split, train_dir / "split.json")
            record_run(cfg, run_dir, stage="train")
        D.init_process_group(denv, backend, cfg.train.dist_timeout_minutes)
        try:
            if cfg.train.ensemble > 1:
                return _train_ensemble(cfg, run_dir, denv, device, ds, split, stop_after_epoch, extra_stop_signals,
                                       member)
            return _train(cfg, run_dir, train_dir, denv, device, ds, split, stop_after_epoch, extra_stop_signals)[1]
        finally:
            D.destroy_process_group()


def member_config(cfg: PipelineConfig, k: int) -> PipelineConfig:
    """The config ensemble member ``k`` trains with: ``train.seed + k`` (weights, data order)."""
    from toolkit.train.ensemble import member_seed

    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": member_seed(cfg.train.seed, k)})})


def _train_ensemble(cfg, run_dir, denv, device, ds, split, stop_after_epoch, extra_stop_signals,
                    only: int | None = None) -> dict:
    """Members one after another in ``train/members/<k>/`` (each resumable on its own; finished ones are
    skipped), then (rank 0) the ensemble report: ``train/metrics.json`` with the ensemble's test metrics,
    each member's, and the calibration; ``train/best.pt`` = member 0's (what embed loads).
    ``only``: train that member alone and return its metrics (no report)."""
    layout = RunLayout(run_dir)
    n = cfg.train.ensemble
    for k in range(n) if only is None else [only]:
        mdir = layout.member_dir(k)
        if (mdir / "metrics.json").is_file() and (mdir / "best.pt").is_file():
            log.info("ensemble member %d/%d is finished (%s)", k + 1, n, mdir)
            if only is not None:
                return json.loads((mdir / "metrics.json").read_text()) if denv.is_main else {}
            continue
        log.info("ensemble member %d/%d: seed %d, %s", k + 1, n, member_config(cfg, k).train.seed, mdir)
        mdir.mkdir(parents=True, exist_ok=True)
        finished, got = _train(member_config(cfg, k), run_dir, mdir, denv, device, ds, split, stop_after_epoch,
                               extra_stop_signals)
        if not finished:
            return {}
        if only is not None:
            return got
    out: dict = {}
    if denv.is_main:
        out = _ensemble_report(cfg, run_dir, device, ds, split)
    D.barrier()
    return out


def _ensemble_report(cfg, run_dir: Path, device, ds, split) -> dict:
    """Rank 0: every member on the validation and test splits -> ensemble metrics, calibration, metrics.json."""
    from toolkit.data.loader import make_loader
    from toolkit.model import build_model
    from toolkit.train import ensemble as E
    from toolkit.runtime import atomic_write
    from toolkit.train.checkpoint import load
    from toolkit.train.metrics import onset_metrics, write_predictions_csv

    layout = RunLayout(run_dir)
    n = cfg.train.ensemble
    members = [layout.member_best(k) for k in range(n)]
    loaders = {name: make_loader(ds.store_path, split.indices(name, ds.ids), batch_size=cfg.train.batch_size,
                                 shuffle=False) for name in ("val", "test") if len(getattr(split, name))}
    if "test" not in loaders:
        raise ConfigError("train.ensemble > 1 needs a test split to measure the ensemble (train.split)")
    ev = Trainer(cfg, build_model(cfg.model, ds.output_features), None, layout.train_dir, D.DistEnv(),
                 device, ds.energy, ds.output_features)  # evaluation only (no loaders: no schedule)
    preds: dict[str, list[np.ndarray]] = {name: [] for name in loaders}
    got: dict[str, dict] = {}
    for path in members:
        model = build_model(cfg.model, ds.output_features).to(device)
        model.load_state_dict(load(path)["model"])
        for name, loader in loaders.items():
            got[name] = ev.evaluate(loader, model=model, collect=True, reduce=False)
            preds[name].append(got[name]["pred"])
    thr = ds.onset_threshold
    res = {name: E.split_errors(ds.energy, np.stack(preds[name]), got[name]["target"], thr) for name in loaders}
    test, target = res["test"], got["test"]["target"]
    mask = np.isfinite(target)

    def mae(pred: np.ndarray) -> float:
        return float(np.abs(np.where(mask, pred - np.nan_to_num(target), 0)).sum() / max(int(mask.sum()), 1))

    member_rows = []
    for k, p in enumerate(preds["test"]):
        on = onset_metrics(ds.energy, p, target, thr)
        member_rows.append({"member": k, "seed": member_config(cfg, k).train.seed, "test_spectrum_mae": mae(p),
                            "onset_r2": on["onset_r2"], "onset_mae_eV": on["onset_mae"], "checkpoint": str(members[k])})
    on = test["onset"]
    per_mat = np.where(mask, np.abs(test["err"]), 0.0).sum(1) / np.maximum(mask.sum(1), 1)
    write_predictions_csv(layout.train_dir / "test_predictions.csv", got["test"]["ids"], per_mat, on["onset_true"],
                          on["onset_pred"])
    val = res.get("val") or test
    if "val" not in res:
        log.warning("no validation split: the recalibration factor is fitted on the test split itself")
    cal = E.calibration(val, test)
    out = {"epochs": cfg.train.epochs, "ensemble": n, "test_spectrum_mae": mae(test["mean"]),
           "test_n_materials": int(target.shape[0]), "onset_r2": on["onset_r2"], "onset_mae_eV": on["onset_mae"],
           "onset_n": on["onset_n"], "onset_n_missing": on["onset_n_missing"], "onset_threshold": thr,
           "counts": {"train": len(split.train), "val": len(split.val), "test": len(split.test),
                      "excluded_no_spectrum": len(split.excluded_no_spectrum), "unassigned": len(split.unassigned)},
           "members": member_rows,
           "single_member": {"test_spectrum_mae": member_rows[0]["test_spectrum_mae"],
                             "onset_r2": member_rows[0]["onset_r2"], "onset_mae_eV": member_rows[0]["onset_mae_eV"]},
           "member_mean": {"test_spectrum_mae": float(np.mean([r["test_spectrum_mae"] for r in member_rows])),
                           "onset_r2": float(np.nanmean([r["onset_r2"] for r in member_rows]))},
           "calibration": cal}
    nf = ds.noise_floor()
    if nf is not None:
        out["noise_floor"] = nf
        out["mae_over_noise_floor"] = out["test_spectrum_mae"] / nf if nf > 0 else math.inf
    src = members[0].read_bytes()  # embed and analyze read train/best.pt: member 0's model
    atomic_write(layout.best_checkpoint, lambda fh: fh.write(src))
    write_json(layout.train_metrics, out)
    log.info("ensemble of %d: test spectrum MAE %.4f (member 0: %.4f), onset R2 %.3f (member 0: %.3f); "
             "±2σ coverage %.3f raw, %.3f after recalibration x%.2f", n, out["test_spectrum_mae"],
             member_rows[0]["test_spectrum_mae"], out["onset_r2"], member_rows[0]["onset_r2"],
             cal["test_spectrum_coverage_2sigma_raw"], cal["test_spectrum_coverage_2sigma"],
             cal["recalibration_factor"])
    return out


def _train(cfg, run_dir, train_dir, denv, device, ds, split, stop_after_epoch, extra_stop_signals) -> tuple[bool, dict]:
    """Train one model into ``train_dir`` (``RUN_DIR/train``, or an ensemble member's folder); returns
    (finished, final metrics on rank 0)."""
    from toolkit.model import build_model

    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, ds.output_features)
    if cfg.train.init_output_bias:  # overwritten by a resumed checkpoint; consumes no random numbers
        with torch.no_grad():
            model.fc.bias.copy_(torch.from_numpy(ds.mean_spectrum(split.indices("train", ds.ids))))
    if cfg.model.conditions:  # standardise the conditions with the training records' (buffers, saved with the model)
        model.set_condition_scale(ds.conditions(split.indices("train", ds.ids)))
    loaders = ds.loaders(split, denv, cfg, pin_memory=device.type == "cuda")
    flag = StopFlag()
    trainer = Trainer(cfg, model, loaders, train_dir, denv, device, ds.energy, ds.output_features, flag)
    resumed = trainer.resume()
    # rank 0 alone owns metrics.jsonl/csv/tb: several ranks rewriting one file race on its temporary name
    metrics = MetricsLog(train_dir, trainer.state.epoch if resumed else 0) if denv.is_main else None
    try:
        with _stop_signals(flag, tuple(extra_stop_signals)) as previous:
            try:
                state = trainer.fit(metrics, stop_after_epoch=stop_after_epoch)
            except TrainingInterrupted as e:
                log.warning("stopped by signal %s; checkpoint %s; re-run the same command to resume",
                            signal.Signals(e.signum).name, e.checkpoint)
                _chain_previous_handler(previous, e.signum)
                raise
    finally:
        if metrics is not None:
            metrics.close()
    _write_rank_hash(trainer, train_dir, denv)
    if not state.finished:
        log.info("stopped after epoch %d of %d as asked; re-run to continue", state.epoch, cfg.train.epochs)
        return False, {}
    out: dict = {}
    if denv.is_main:
        out = _final_report(cfg, trainer, ds, split, train_dir)
    D.barrier()
    return True, out


def _write_rank_hash(trainer: Trainer, train_dir: Path, denv: D.DistEnv) -> None:
    write_json(train_dir / f"rank{denv.rank}.json",
               {"rank": denv.rank, "world_size": denv.world_size, "launcher": denv.launcher,
                "epoch": trainer.state.epoch, "step": trainer.state.step,
                "weights_sha256": weights_sha256(trainer.raw_model)})


def _final_report(cfg, trainer: Trainer, ds, split, train_dir: Path) -> dict:
    from toolkit.model import build_model
    from toolkit.train.checkpoint import load

    best = build_model(cfg.model, ds.output_features).to(trainer.device)
    best.load_state_dict(load(trainer.best_path)["model"])
    res = trainer.test_report(best, ds.onset_threshold, ds.spec)
    out = {"epochs": cfg.train.epochs, "steps": trainer.state.step, "best_epoch": trainer.state.best_epoch,
           "best_val_mae": trainer.state.best_val, "world_size": trainer.env.world_size,
           "counts": {"train": len(split.train), "val": len(split.val), "test": len(split.test),
                      "excluded_no_spectrum": len(split.excluded_no_spectrum), "unassigned": len(split.unassigned)},
           **res}
    nf = ds.noise_floor()
    if nf is not None:
        out["noise_floor"] = nf
        out["mae_over_noise_floor"] = res["test_spectrum_mae"] / nf if nf > 0 else math.inf
    write_json(train_dir / "metrics.json", out)  # = RunLayout.train_metrics (or a member's)
    log.info("test spectrum MAE %.4f, onset R2 %.3f, onset MAE %.3f eV%s", res["test_spectrum_mae"],
             res["onset_r2"], res["onset_mae_eV"],
             f", {out['mae_over_noise_floor']:.2f}x noise floor" if nf is not None else "")
    files = [("best model", trainer.best_path), ("metrics", train_dir / "metrics.json"),
             ("per epoch", train_dir / "metrics.jsonl"), ("test predictions", train_dir / "test_predictions.csv"),
             ("resume state", train_dir / "checkpoints")]
    log.info("train: done (%d epochs, best epoch %s)\n%s", cfg.train.epochs, trainer.state.best_epoch,
             "\n".join(f"  {k:<17} {p}" + ("" if Path(p).exists() else "  (not written)") for k, p in files))
    return out
