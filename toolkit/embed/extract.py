"""Load the trained model once per process and run it over batches, collecting pooled activations.

The model comes from ``best.pt`` (``{format: "spectrolens-model", model, config, output_features}``,
written by toolkit.train, loaded with ``weights_only=True``); its identity is the sha256 of the file.
Inference: ``torch.inference_mode``, eval mode, bf16 autocast on GPU (``embed.precision``), batches
moved with ``non_blocking`` from pinned memory.

Ensembles (:func:`ensemble_members`): when the run's training finished an ensemble (``train.ensemble`` > 1,
the members listed in ``train/metrics.json``) and ``embed.checkpoint`` is not set, every member runs on
the same batches; ``prediction`` is their mean and the uncertainty arrays come from
:func:`toolkit.train.ensemble.summarize`. Layer activations stay member 0's (``train/best.pt``): the
hidden features of separately trained members are not aligned (feature j of one member means nothing
in another), so averaging them would mix unrelated coordinates.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterable

import numpy as np
import torch
from torch import nn

from toolkit.config import EmbedConfig, ModelConfig, PipelineConfig
from toolkit.data.batch import GraphBatch
from toolkit.embed.hooks import READOUT, capture, resolve_layers
from toolkit.embed.store import ONSET_KEYS, ShardResult
from toolkit.errors import SpectrolensError
from toolkit.layout import RunLayout
from toolkit.model import CheckpointError, build_model, load_state_dict_file

from toolkit.model import MODEL_FORMAT
from toolkit.runtime import select_device
from toolkit.runtime import use_bf16 as _use_bf16


class EmbedError(SpectrolensError, RuntimeError):
    """Extraction cannot proceed; the message names the file and the reason."""


@dataclass
class LoadedModel:
    """A model ready for inference and what identifies it."""

    model: nn.Module
    path: Path
    sha256: str
    model_cfg: ModelConfig
    output_features: int
    device: torch.device

    @property
    def hidden(self) -> int:
        return int(self.model_cfg.hidden_features)


def checkpoint_path(cfg: PipelineConfig, run_dir: Path) -> Path:
    """``embed.checkpoint`` or ``<run_dir>/train/best.pt``."""
    return Path(cfg.embed.checkpoint) if cfg.embed.checkpoint else RunLayout(run_dir).best_checkpoint


@dataclass
class Ensemble:
    """The members whose mean is the stored ``prediction`` (``paths[0]`` = member 0 = ``train/best.pt``'s
    model) and the recalibration factors of ``train/metrics.json``."""

    paths: list[Path]
    std_scale: float = 1.0
    onset_std_scale: float = 1.0

    @property
    def n(self) -> int:
        return len(self.paths)

    def attrs(self) -> dict:
        """The store's root attribute ``ensemble_info``."""
        return {"n_members": self.n, "member_checkpoints": [str(p) for p in self.paths],
                "member_sha256": [file_sha256(p) for p in self.paths],
                "recalibration_factor": self.std_scale, "onset_recalibration_factor": self.onset_std_scale,
                "recalibrated_from": "train/metrics.json calibration (fitted on the validation split)",
                "activations_from": "member 0 (activations of different members are not aligned)"}


def ensemble_members(cfg: PipelineConfig, run_dir: Path) -> Ensemble | None:
    """The run's finished ensemble (member discovery and factors of :mod:`toolkit.predict.models`), or None
    for one model (no ensemble, an unfinished one, or an explicit ``embed.checkpoint``)."""
    if cfg.embed.checkpoint:
        return None
    from toolkit.predict.models import _calibration, _run_models

    lay = RunLayout(run_dir)
    if not lay.best_checkpoint.is_file():
        return None  # load_model names the missing file
    files = _run_models(lay)
    if len(files) < 2:
        return None
    if file_sha256(files[0]) != file_sha256(lay.best_checkpoint):
        raise EmbedError(f"{lay.best_checkpoint} is not ensemble member 0's model ({files[0]}): the activations and "
                         f"the ensemble prediction would come from different models; re-run `spectrolens train`")
    s, so = _calibration(Path(run_dir))
    return Ensemble(files, s, so)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_device(ecfg: EmbedConfig) -> torch.device:
    """``embed.device`` through the one device rule (:func:`toolkit.runtime.select_device`)."""
    return select_device(ecfg.device, setting="embed.device")


def use_bf16(ecfg: EmbedConfig, device: torch.device) -> bool:
    """``embed.precision`` through the one precision rule (:func:`toolkit.runtime.use_bf16`)."""
    return _use_bf16(ecfg.precision, device.type)


_CACHE: dict[tuple, LoadedModel] = {}


def load_model(path: Path, device: torch.device) -> LoadedModel:
    """Build the model of checkpoint ``path`` (its own model config) in eval mode on ``device``.

    Cached per process (keyed by path, size, mtime, device) so a worker doing many shards loads once."""
    path = Path(path)
    if not path.is_file():
        raise EmbedError(f"model checkpoint {path} does not exist (train first, or set embed.checkpoint)")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, str(device))
    if key in _CACHE:
        return _CACHE[key]
    sha = file_sha256(path)
    try:
        obj = load_state_dict_file(path)
    except CheckpointError as e:
        raise EmbedError(str(e)) from None
    if obj.get("format") != MODEL_FORMAT:
        raise EmbedError(f"model checkpoint {path} is not a {MODEL_FORMAT} file (format: {obj.get('format')!r}); "
                         f"embed reads train/best.pt as written by `spectrolens train`")
    try:
        saved = obj["config"]
        saved = json.loads(saved) if isinstance(saved, str) else saved
        model_cfg = ModelConfig.model_validate(saved["model"])
        out = int(obj["output_features"])
        model = build_model(model_cfg, out)
        model.load_state_dict(obj["model"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise EmbedError(f"model checkpoint {path} cannot be used: {e}") from e
    model.eval().to(device)
    loaded = LoadedModel(model, path, sha, model_cfg, out, device)
    if len(_CACHE) >= 16:  # an ensemble's members stay loaded together
        _CACHE.clear()
    _CACHE[key] = loaded
    return loaded


def autocast(device: torch.device, bf16: bool) -> ContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def embed_layers(model: nn.Module, wanted: list[str] | None) -> list[str]:
    """Validated layer names in model order (``embed.layers``; None = all)."""
    try:
        return resolve_layers(model, wanted)
    except ValueError as e:
        raise EmbedError(str(e)) from None


def extract(loaded: LoadedModel, batches: Iterable[GraphBatch], layers: list[str], poolings: list[str],
            per_atom: bool, bf16: bool, others: list[LoadedModel] = (), ensemble: Ensemble | None = None,
            energy: np.ndarray | None = None, data_attrs: dict | None = None) -> tuple[np.ndarray, ShardResult]:
    """Run the model over ``batches`` in order; returns (dataset rows seen, ShardResult in that order).

    Pooled arrays are keyed ``layers/<layer>/<pooling>`` as in the store; per-atom arrays (all layers
    but the readout) are concatenated over the batches in atom order. ``others``: ensemble members 1..M-1
    (``loaded`` is member 0), run on the same batches; the prediction is then the ensemble's
    (:func:`toolkit.train.ensemble.summarize` with ``ensemble``'s factors, the dataset's ``energy`` and
    ``data_attrs`` transform/log_floor/onset_threshold)."""
    dev = loaded.device
    rows: list[np.ndarray] = []
    pooled: dict[str, list[np.ndarray]] = {}
    preds: list[list[np.ndarray]] = [[] for _ in range(1 + len(others))]
    atoms: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode(), capture(loaded.model, layers) as cap:
        for batch in batches:
            b = batch.to(dev, non_blocking=dev.type == "cuda")
            with autocast(dev, bf16):
                pred = loaded.model(b)
            for key, val in cap.pooled(b, poolings).items():
                pooled.setdefault(f"layers/{key}", []).append(val.cpu().numpy())
            preds[0].append(pred.float().cpu().numpy())
            for k, other in enumerate(others, start=1):  # after the captured pass: hooks see member 0 only
                with autocast(dev, bf16):
                    preds[k].append(other.model(b).float().cpu().numpy())
            if per_atom:
                for layer, val in cap.per_atom().items():
                    atoms.setdefault(layer, []).append(val.cpu().numpy())
            rows.append(batch.index.cpu().numpy())
    if not rows:
        raise EmbedError("no batches to extract")
    prediction, uncertainty = np.concatenate(preds[0]), {}
    if others:
        from toolkit.train.ensemble import summarize

        a = data_attrs or {}
        ens = ensemble or Ensemble([loaded.path, *(o.path for o in others)])
        summ = summarize(np.asarray(energy, dtype=np.float64), np.stack([np.concatenate(p) for p in preds]),
                         float(a.get("onset_threshold", 4.0)), a.get("transform", "log10_alpha"),
                         float(a.get("log_floor", 2.0)), ens.std_scale, ens.onset_std_scale)
        prediction = summ["mean"]
        uncertainty = {"prediction_std": summ["std"],
                       **{k: summ[k.removeprefix("prediction_")] for k in ONSET_KEYS}}
    result = ShardResult(pooled={k: np.concatenate(v) for k, v in pooled.items()}, prediction=prediction,
                         atoms={k: np.concatenate(v) for k, v in atoms.items() if k != READOUT},
                         uncertainty=uncertainty)
    return np.concatenate(rows), result
