"""Losses and metrics on spectra, and the per-epoch metrics log (JSONL + CSV + TensorBoard).

Units: spectra are in the dataset's target units (log10 α by default, so errors are in decades);
onset energies in eV.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from toolkit.runtime import json_safe


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean L1 (``l1``) or squared (``mse``) error over the points where ``mask`` is true (float32)."""
    diff = torch.where(mask, pred.float() - torch.nan_to_num(target.float()), torch.zeros((), device=pred.device))
    err = diff.abs() if kind == "l1" else diff.square()
    return err.sum() / mask.sum().clamp_min(1)


def abs_error_sums(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per material: sum of |pred - target| over unmasked points and the number of those points."""
    diff = torch.where(mask, (pred.float() - torch.nan_to_num(target.float())).abs(),
                       torch.zeros((), device=pred.device))
    return diff.sum(dim=1), mask.sum(dim=1)


def onset_metrics(energy: np.ndarray, pred: np.ndarray, target: np.ndarray, threshold: float) -> dict:
    """Onset energies (eV) of predicted and reference spectra with the same rule and the same mask.

    The prediction is masked where the reference is, so both onsets are computed on the same points.
    Returns per-material onsets and R^2 / MAE over materials where both onsets exist."""
    from toolkit.data.spectra import onset_energy

    pred_masked = np.where(np.isfinite(target), pred, np.nan)
    on_pred = np.atleast_1d(onset_energy(energy, pred_masked, threshold))
    on_true = np.atleast_1d(onset_energy(energy, target, threshold))
    return {"onset_pred": on_pred, "onset_true": on_true, **onset_scores(on_pred, on_true)}


def onset_scores(on_pred: np.ndarray, on_true: np.ndarray) -> dict:
    """R^2 and MAE (eV) of predicted onsets over the materials where both onsets exist, and the counts."""
    # lazy (with scipy): keeps `import toolkit.train` light
    from sklearn.metrics import r2_score

    ok = np.isfinite(on_pred) & np.isfinite(on_true)
    n_ok = int(ok.sum())
    r2 = float(r2_score(on_true[ok], on_pred[ok])) if n_ok >= 2 else float("nan")
    mae = float(np.mean(np.abs(on_pred[ok] - on_true[ok]))) if n_ok else float("nan")
    return {"onset_r2": r2, "onset_mae": mae, "onset_n": n_ok, "onset_n_missing": int(len(ok) - n_ok)}


def write_predictions_csv(path: Path, ids: Sequence[str], mae: np.ndarray, onset_true: np.ndarray,
                          onset_pred: np.ndarray, feature: str = "onset_{}_eV") -> None:
    """Per-material test errors: id, spectrum MAE (target units), reference/predicted onset and error (eV);
    ``feature``: the column pattern of another headline feature (e.g. ``target:band_gap_{}``)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "spectrum_mae", feature.format("true"), feature.format("pred"), feature.format("abs_error")])
        for i, m in enumerate(ids):
            w.writerow([m, f"{mae[i]:.6g}", f"{onset_true[i]:.6g}", f"{onset_pred[i]:.6g}",
                        f"{abs(onset_pred[i] - onset_true[i]):.6g}"])
    os.replace(tmp, path)


class MetricsLog:
    """Per-epoch rows in ``metrics.jsonl`` (the record), ``metrics.csv`` (regenerated) and TensorBoard.

    On resume, rows of epochs after the checkpoint's are dropped so every epoch appears once."""

    def __init__(self, train_dir: Path, resume_epoch: int, tensorboard: bool = True) -> None:
        self.jsonl = train_dir / "metrics.jsonl"
        self.csv = train_dir / "metrics.csv"
        self.rows: list[dict] = []
        if self.jsonl.exists():
            for line in self.jsonl.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row.get("epoch", 0) <= resume_epoch:
                        self.rows.append(row)
        self._rewrite()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(train_dir / "tb"), purge_step=resume_epoch + 1)

    def _rewrite(self) -> None:
        tmp = self.jsonl.with_name(f".{self.jsonl.name}.tmp")
        tmp.write_text("".join(json.dumps(json_safe(r)) + "\n" for r in self.rows))
        os.replace(tmp, self.jsonl)
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        tmp = self.csv.with_name(f".{self.csv.name}.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.csv)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._rewrite()
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k.replace("_", "/", 1), v, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def feature_metrics(spec, x: np.ndarray, pred: np.ndarray, target: np.ndarray) -> dict[str, dict]:
    """R^2 and MAE of every target feature (:attr:`toolkit.data.targets.TargetSpec.feature_names`: onset
    and peaks of a spectrum, moments of a DOS, each scalar) between predictions and references, with
    the prediction masked where the reference is (same points for both)."""
    from sklearn.metrics import r2_score

    pm = np.where(np.isfinite(target), pred, np.nan)
    fp, ft = spec.features(x, pm), spec.features(x, target)
    out: dict[str, dict] = {}
    for name in spec.feature_names:
        a, b = ft[name], fp[name]
        ok = np.isfinite(a) & np.isfinite(b)
        n = int(ok.sum())
        out[name] = {"r2": float(r2_score(a[ok], b[ok])) if n >= 2 and np.ptp(a[ok]) > 0 else float("nan"),
                     "mae": float(np.mean(np.abs(a[ok] - b[ok]))) if n else float("nan"), "n": n,
                     "n_missing": int(len(ok) - n)}
    return out
