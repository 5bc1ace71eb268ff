"""What ``predict`` runs: one model or an ensemble, with the graph settings and energy grid it was trained on.

:func:`load_predictor` accepts

* a spectrolens run directory: the ensemble members ``train/members/<k>/best.pt`` when there are any,
  else ``train/best.pt``; the recalibration factors of ``train/metrics.json`` (``calibration``) scale
  the ensemble's standard deviations (``predict.recalibrate``);
* a spectrolens model file (``best.pt`` or a training checkpoint ``last.pt``): its own saved config
  gives the graph settings, grid, transform and onset threshold;
* an upstream ALIGNN ``best_model.pt`` (or its folder) with ``config.json`` (``predict.upstream_config``,
  default: beside the .pt): :func:`toolkit.model.load_upstream_checkpoint` and
  :func:`toolkit.model.upstream_graph_config`; the grid is ``data.grid`` (start, stop) with the model's
  number of outputs, the transform and threshold those of ``data``.

Models are loaded once per process (cache keyed by the files' sizes and times) and moved to the device.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toolkit.config import DataConfig, GraphConfig, PipelineConfig
from toolkit.data.graphs import _CGCNN_JSON as CGCNN_JSON
from toolkit.data.spectra import energy_grid
from toolkit.data.targets import TargetSpec
from toolkit.errors import SpectrolensError
from toolkit.layout import RunLayout
from toolkit.model import load_upstream_checkpoint, upstream_graph_config
from toolkit.model.checkpoint import (
    CheckpointError,
    load_model_file,
    load_state_dict_file,
)

log = logging.getLogger(__name__)


class PredictError(SpectrolensError, RuntimeError):
    """``predict`` cannot proceed; the message names the file and the reason."""


@dataclass
class Predictor:
    """Models (one, or an ensemble's members) in eval mode, and everything needed to read their output."""

    models: list[nn.Module]
    kind: str  # "run" | "spectrolens" | "upstream"
    paths: list[Path]  # the model files
    graph: GraphConfig
    energy: np.ndarray  # (G,) eV
    transform: str
    log_floor: float
    onset_threshold: float
    std_scale: float = 1.0  # recalibration factor of the per-point std (ensembles)
    onset_std_scale: float = 1.0
    identity: str = ""  # sha256 over the model files
    spec: Any = None  # toolkit.data.targets.TargetSpec of the training data (None: absorption)
    conditions: tuple[str, ...] = ()  # condition inputs of the model (model.conditions)
    info: dict = field(default_factory=dict)

    @property
    def n_members(self) -> int:
        return len(self.models)

    @property
    def max_z(self) -> int:
        """Largest atomic number with its own CGCNN atom features (heavier elements share Z=100's row)."""
        return _embedded_max_z()

    def to(self, device: torch.device) -> "Predictor":
        self.models = [m.to(device) for m in self.models]
        return self


@lru_cache(maxsize=1)
def _embedded_max_z() -> int:
    """Largest Z with its own CGCNN atom features (the table's source file; upstream: 100). Heavier
    elements get Z=100's row in ALIGNN: the model cannot tell them apart, so predict rejects them."""
    return max(int(k) for k in json.loads(CGCNN_JSON.read_text()))


def _sha(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _grid(data: DataConfig, n_out: int, where: str) -> np.ndarray:
    g = data.grid
    if g.num != n_out:
        log.warning("%s predicts %d values but data.grid has %d points: using %d points on %g..%g eV",
                    where, n_out, g.num, n_out, g.start, g.stop)
    return energy_grid(g.start, g.stop, n_out)


def _from_spectrolens_files(paths: list[Path], kind: str) -> Predictor:
    models, saved_cfg, outs = [], None, set()
    for p in paths:
        model, saved, out = load_model_file(p)
        models.append(model)
        outs.add(out)
        saved_cfg = saved_cfg or saved
    if len(outs) != 1:
        raise PredictError(f"ensemble members {', '.join(map(str, paths))} predict different numbers of values {outs}")
    cfg = PipelineConfig.model_validate({k: saved_cfg[k] for k in ("data", "graph", "model") if k in saved_cfg})
    n_out = outs.pop()
    spec = TargetSpec.from_config(cfg.data)
    if spec.kind != "absorption" and spec.n_outputs == n_out:  # the store's x-axis (heads, scalars)
        g = cfg.data.grid
        energy = spec.axis(energy_grid(g.start, g.stop, g.num))
    else:
        energy = _grid(cfg.data, n_out, str(paths[0]))
    return Predictor(models=models, kind=kind, paths=paths, graph=cfg.graph, energy=energy,
                     transform=cfg.data.transform, log_floor=cfg.data.log_floor,
                     onset_threshold=cfg.data.onset_threshold, spec=spec, conditions=tuple(cfg.model.conditions))


def _run_models(lay: RunLayout) -> list[Path]:
    """The model files of a run: the members its finished ensemble report lists (train/metrics.json), else
    train/best.pt. Members of an unfinished ensemble are never used (their best.pt may be from an early epoch)."""
    try:
        metrics = json.loads(lay.train_metrics.read_text())
    except (OSError, ValueError):
        metrics = {}
    members = metrics.get("members") if isinstance(metrics.get("members"), list) else []
    if members:
        files = [lay.member_best(int(m["member"])) for m in members]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise PredictError(f"{lay.train_metrics} lists ensemble members whose best.pt is missing: {missing}")
        return files
    if lay.best_checkpoint.is_file():
        if lay.members_dir.is_dir() and not lay.train_metrics.is_file():
            log.warning("%s: the ensemble in %s is not finished; predicting with %s alone", lay.root, lay.members_dir,
                        lay.best_checkpoint)
        return [lay.best_checkpoint]
    raise PredictError(f"{lay.root} holds no trained model (no {lay.best_checkpoint}, no finished ensemble in "
                       f"{lay.members_dir}): run `spectrolens train` first")


def _calibration(run: Path) -> tuple[float, float]:
    """(spectrum, onset) recalibration factors of a run's train/metrics.json (1 when absent)."""
    try:
        cal = json.loads(RunLayout(run).train_metrics.read_text()).get("calibration") or {}
    except (OSError, ValueError):
        return 1.0, 1.0
    s = cal.get("recalibration_factor")
    so = cal.get("onset_recalibration_factor")
    return (float(s) if isinstance(s, (int, float)) and s > 0 else 1.0,
            float(so) if isinstance(so, (int, float)) and so > 0 else 1.0)


def _upstream(pt: Path, config_json: Path | None, cfg: PipelineConfig) -> Predictor:
    cj = Path(config_json) if config_json else pt.parent / "config.json"
    if not cj.is_file():
        raise PredictError(f"{pt} is not a spectrolens checkpoint and there is no upstream ALIGNN config.json "
                           f"{'at ' + str(cj) if config_json else 'beside it'}: pass the config of its training run "
                           f"(--upstream-config / predict.upstream_config)")
    model, mcfg = load_upstream_checkpoint(pt, cj, backend=cfg.model.backend)
    n_out = int(mcfg.output_features or 1)
    return Predictor(models=[model], kind="upstream", paths=[pt], graph=upstream_graph_config(cj),
                     energy=_grid(cfg.data, n_out, str(pt)), transform=cfg.data.transform,
                     log_floor=cfg.data.log_floor, onset_threshold=cfg.data.onset_threshold,
                     info={"upstream_config": str(cj)})


_CACHE: dict[tuple, Predictor] = {}


def _key(paths: list[Path], device: torch.device, extra: tuple) -> tuple:
    return tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths) + (str(device),) + extra


def load_predictor(cfg: PipelineConfig, device: torch.device | str = "cpu") -> Predictor:
    """The predictor of ``cfg.predict.checkpoint`` on ``device`` (see the module docstring)."""
    pc = cfg.predict
    ck = pc.checkpoint
    if ck is None:
        raise PredictError("no model given: set --checkpoint (a run directory, a spectrolens .pt or an upstream "
                           "ALIGNN best_model.pt)")
    ck = Path(ck)
    if not ck.exists():
        raise PredictError(f"checkpoint {ck} does not exist")
    device = torch.device(device)
    scale = (1.0, 1.0)
    if ck.is_dir():
        lay = RunLayout(ck)
        if (ck / "best_model.pt").is_file() and not lay.train_dir.is_dir():
            files, kind = [ck / "best_model.pt"], "upstream"
        else:
            files, kind = _run_models(lay), "run"
            if pc.recalibrate and len(files) > 1:
                scale = _calibration(ck)
    else:
        try:
            obj = load_state_dict_file(ck)
        except CheckpointError as e:
            raise PredictError(str(e)) from None
        kind = "spectrolens" if str(obj.get("format", "")).startswith("spectrolens") else "upstream"
        files = [ck]
        del obj
    key = _key(files, device, (kind, str(pc.upstream_config), scale, cfg.data.grid.model_dump_json(),
                               cfg.model.backend))
    if key in _CACHE:
        return _CACHE[key]
    try:
        pred = (_upstream(files[0], pc.upstream_config, cfg) if kind == "upstream"
                else _from_spectrolens_files(files, kind))
    except CheckpointError as e:
        raise PredictError(str(e)) from None
    pred.std_scale, pred.onset_std_scale = scale
    pred.identity = _sha(files)
    pred.to(device)
    _CACHE.clear()
    _CACHE[key] = pred
    log.info("model: %s (%s, %d member(s)), grid %g..%g eV (%d points), graph cutoff %g, k=%d", ck, kind,
             pred.n_members, pred.energy[0], pred.energy[-1], len(pred.energy), pred.graph.cutoff, pred.graph.max_neighbors)
    return pred
