"""Training checkpoints: atomic writes, ``weights_only`` loads, RNG state as tensors.

A training checkpoint (``train/checkpoints/last.pt``) holds everything needed to continue exactly::

    {format: "spectrolens-train-checkpoint", version: 1,
     model, optimizer, scheduler (state dicts), epoch (completed epochs), step (optimizer steps so far),
     batch_in_epoch (batches of epoch `epoch` already done; 0 at an epoch boundary), finished (bool),
     sampler (dict of ints), rng: [per-rank RNG state], world_size, best_val (float), best_epoch,
     output_features, config (JSON string of the whole PipelineConfig)}

``best.pt`` (what embed loads) holds ``{format: "spectrolens-model", version: 1, model, config,
output_features, epoch, val_mae}``. Only tensors and primitive containers are stored, so both load
with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from toolkit.model import MODEL_FORMAT
from toolkit.model.checkpoint import CheckpointError, load_state_dict_file, save_state_dict_file

__all__ = ["MODEL_FORMAT", "CheckpointError", "atomic_save", "load", "capture_rng", "restore_rng", "check_resumable"]

TRAIN_FORMAT = "spectrolens-train-checkpoint"
VERSION = 1

# Train-section fields that may change between a run and its resume without changing the result.
RESUME_SAFE_TRAIN_FIELDS = {"num_workers", "checkpoint_every", "max_checkpoint_minutes", "progress",
                            "dist_timeout_minutes", "device", "dist_backend", "ensemble"}


def atomic_save(obj: dict, path: Path) -> None:
    """Temporary file in the same folder + fsync + ``os.replace`` (toolkit.model.checkpoint's writer)."""
    save_state_dict_file(obj, path)


def load(path: Path, expect_format: str | None = None) -> dict:
    """``torch.load(weights_only=True)`` on CPU; raises :class:`CheckpointError` naming the file."""
    try:
        obj = load_state_dict_file(path)
    except CheckpointError:
        raise
    except Exception as e:  # e.g. a truncated/garbage file can make the unpickler raise IndexError
        raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint: {e!r}") from e
    if expect_format and obj.get("format") != expect_format:
        raise CheckpointError(f"checkpoint {path} is not a {expect_format} file (format: {obj.get('format')!r})")
    return obj


# ---------------------------------------------------------------- RNG state as tensors


def capture_rng() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors / ints (weights_only-safe)."""
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python_version": int(version),
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    assert np_kind == "MT19937"
    return state


def restore_rng(state: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate((state["python_version"], tuple(int(x) for x in state["python_mt"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- config compatibility


def check_resumable(saved_config_json: str, cfg_json: str, path: Path) -> None:
    """Refuse to resume when the model, data or result-changing train settings differ from the checkpoint's."""
    old, new = json.loads(saved_config_json), json.loads(cfg_json)
    diffs: list[str] = []
    for section in ("model", "graph"):
        for k in sorted(set(old.get(section, {})) | set(new.get(section, {}))):
            if old.get(section, {}).get(k) != new.get(section, {}).get(k):
                diffs.append(f"{section}.{k}: {old.get(section, {}).get(k)!r} -> {new.get(section, {}).get(k)!r}")
    for k in sorted(set(old.get("train", {})) | set(new.get("train", {}))):
        if k in RESUME_SAFE_TRAIN_FIELDS:
            continue
        if old.get("train", {}).get(k) != new.get("train", {}).get(k):
            diffs.append(f"train.{k}: {old.get('train', {}).get(k)!r} -> {new.get('train', {}).get(k)!r}")
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written with a different configuration ({'; '.join(diffs)}): "
            f"restore those settings to resume, or use a new run directory (or delete {path.parent.parent}) "
            f"to start over")
