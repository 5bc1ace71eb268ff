"""The ``train`` stage: (distributed) ALIGNN training on RUN_DIR/dataset.zarr that resumes exactly.

``run(cfg, run_dir)`` is called once per rank; it discovers rank/world itself (torchrun, SLURM, MPI,
or a single process; see :mod:`toolkit.train.distributed`). Outputs in ``RUN_DIR/train``: split.json,
checkpoints/last.pt, best.pt, metrics.jsonl/.csv, tb/, metrics.json, test_predictions.csv,
rank<k>.json (weights hash per rank); logs in ``RUN_DIR/logs/train/rank<k>.log``.

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

from toolkit.config import PipelineConfig
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
        extra_stop_signals: tuple[int, ...] = ()) -> dict:
    """Train (or resume, or skip a finished run). Returns the final metrics (rank 0) or ``{}``.

    ``stop_after_epoch``: checkpoint and return after this many completed epochs (time-sliced jobs, tests).
    ``extra_stop_signals``: signals that also mean "checkpoint and stop" (the launcher's)."""
    from toolkit.train.data import open_training_data

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    train_dir = layout.train_dir
    denv = D.discover()
    device = D.select_device(cfg.train.device, denv)
    backend = D.select_backend(cfg.train.dist_backend, device)
    with task_log(run_dir, "train", f"rank{denv.rank}"):
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
        split = resolve_split(cfg.train, ds.ids, ds.has_spectrum, train_dir / "split.json")
        if denv.is_main:
            from toolkit.config import record_run

            save_split(split, train_dir / "split.json")
            record_run(cfg, run_dir, stage="train")
        D.init_process_group(denv, backend, cfg.train.dist_timeout_minutes)
        try:
            return _train(cfg, run_dir, train_dir, denv, device, ds, split, stop_after_epoch, extra_stop_signals)
        finally:
            D.destroy_process_group()


def _train(cfg, run_dir, train_dir, denv, device, ds, split, stop_after_epoch, extra_stop_signals) -> dict:
    from toolkit.model import build_model

    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, ds.output_features)
    if cfg.train.init_output_bias:  # overwritten by a resumed checkpoint; consumes no random numbers
        with torch.no_grad():
            model.fc.bias.copy_(torch.from_numpy(ds.mean_spectrum(split.indices("train", ds.ids))))
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
        return {}
    out: dict = {}
    if denv.is_main:
        out = _final_report(cfg, trainer, ds, split, train_dir)
    D.barrier()
    return out


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
    res = trainer.test_report(best, ds.onset_threshold)
    out = {"epochs": cfg.train.epochs, "steps": trainer.state.step, "best_epoch": trainer.state.best_epoch,
           "best_val_mae": trainer.state.best_val, "world_size": trainer.env.world_size,
           "counts": {"train": len(split.train), "val": len(split.val), "test": len(split.test),
                      "excluded_no_spectrum": len(split.excluded_no_spectrum), "unassigned": len(split.unassigned)},
           **res}
    nf = ds.noise_floor()
    if nf is not None:
        out["noise_floor"] = nf
        out["mae_over_noise_floor"] = res["test_spectrum_mae"] / nf if nf > 0 else math.inf
    write_json(RunLayout(train_dir.parent).train_metrics, out)
    log.info("test spectrum MAE %.4f, onset R2 %.3f, onset MAE %.3f eV%s", res["test_spectrum_mae"],
             res["onset_r2"], res["onset_mae_eV"],
             f", {out['mae_over_noise_floor']:.2f}x noise floor" if nf is not None else "")
    return out
