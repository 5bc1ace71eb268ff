"""Checkpoint I/O: safe loading (``weights_only=True``), atomic saving, upstream ALIGNN import.

Checkpoints travel between users and clusters, so nothing here ever unpickles arbitrary objects:
a file that needs that is refused with an explanation.

``load_upstream_checkpoint(best_model.pt, config.json)`` imports a model trained with upstream
ALIGNN (``alignn_atomwise`` / ``alignn_atomwise_pure``), mapping its config.json to our
:class:`~toolkit.config.ModelConfig` and refusing anything our model would not reproduce exactly
(the classic ``alignn`` model with BatchNorm, extra heads, smooth cutoffs, attention convs, ...).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.config import GraphConfig, ModelConfig
from toolkit.errors import SpectrolensError
from toolkit.runtime import atomic_write


class CheckpointError(SpectrolensError, ValueError):
    """A checkpoint that cannot be loaded (safely or correctly); the message names file and reason."""


def save_state_dict_file(obj: Mapping[str, Any], path: str | Path) -> None:
    """Atomically write ``obj`` (tensors, numbers, strings, lists, dicts only) with ``torch.save``.

    Written to a temporary file in the same folder, fsynced, then renamed, so a job killed while
    saving leaves the previous file intact; a full disk raises :class:`~toolkit.errors.OutOfSpaceError`
    naming ``path`` and leaves no temporary file."""
    atomic_write(path, lambda fh: torch.save(dict(obj), fh))


#: torch.save's legacy (pre-zip) format starts with this number, pickled (protocol 2: LONG1, 10 bytes)
_LEGACY_MAGIC = b"\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")


def _not_a_torch_file(path: Path) -> str | None:
    """Why ``path`` is not a file written by ``torch.save`` (judged by its first bytes), or None."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04"):  # a zip archive: torch.save's format since PyTorch 1.6
        return None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and _LEGACY_MAGIC in head:
        return None  # the legacy torch pickle format
    return f"neither a zip archive written by torch.save nor a legacy torch pickle (it starts with {head[:8]!r})"


def load_state_dict_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``; raises :class:`CheckpointError`
    if the file is missing, not a torch checkpoint, or needs arbitrary unpickling."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        why = _not_a_torch_file(path)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None
    if why is not None:
        raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint: {why}; give the .pt file written by "
                              f"torch.save (e.g. the run's train/best.pt)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} refused: it contains Python objects other than tensors and plain "
            f"containers, and loading it would run arbitrary code (torch.load weights_only=True "
            f"failed: {str(e).splitlines()[0]}). Re-save it as a plain state_dict "
            f"(torch.save(model.state_dict(), ...)) where it was trained.") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict (state_dict)")
    return obj


# --- upstream ALIGNN import -------------------------------------------------------------------

_SUPPORTED_UPSTREAM = ("alignn_atomwise", "alignn_atomwise_pure")

# upstream config field -> ModelConfig field
_FIELD_MAP = {
    "alignn_layers": "alignn_layers",
    "gcn_layers": "gcn_layers",
    "atom_input_features": "atom_input_features",
    "edge_input_features": "edge_input_features",
    "triplet_input_features": "triplet_input_features",
    "embedding_features": "embedding_features",
    "hidden_features": "hidden_features",
    "output_features": "output_features",
    "link": "link",
}

# upstream fields whose non-default values change ``out`` in a way our model does not reproduce;
# value = (allowed value, why)
_MUST_EQUAL = {
    "classification": (False, "classification head (LogSoftmax over classes)"),
    "extra_features": (0, "extra per-graph feature branch (fc1/fc2/fc3)"),
    "atomwise_output_features": (0, "per-atom output head (fc_atomwise)"),
    "additional_output_features": (0, "additional output head (fc_additional_output)"),
    "use_cutoff_function": (False, "smooth cutoff envelope applied to bond lengths"),
    "include_pos_deriv": (False, "positions-derived bond vectors and on-the-fly line graph"),
    "conv_type": ("alignn", "attention convolutions (n_alignn / t_alignn)"),
    "zero_inflated": (False, "zero-inflated output"),
}


def _upstream_model_section(cfg: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    if isinstance(cfg.get("model"), Mapping):
        return cfg["model"]
    if "name" in cfg:  # a bare model config
        return cfg
    raise CheckpointError(f"{where}: no 'model' section (expected upstream ALIGNN's config.json)")


def _read_upstream_config(config_json: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if isinstance(config_json, Mapping):
        return config_json, "upstream config"
    where = str(config_json)
    try:
        raw = json.loads(Path(config_json).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"upstream config {where} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"upstream config {where} is not valid JSON: {e}") from None
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"upstream config {where} must hold a JSON object")
    return raw, where


def upstream_graph_config(config_json: str | Path | Mapping[str, Any]) -> GraphConfig:
    """The :class:`GraphConfig` that reproduces the graphs of an upstream ALIGNN training run
    (``config.json``: ``neighbor_strategy``, ``cutoff``, ``max_neighbors``, ``use_canonize``).
    Only upstream's default k-nearest strategy with canonised (undirected) edges is reproduced;
    anything else raises :class:`CheckpointError`."""
    raw, where = _read_upstream_config(config_json)
    strategy = raw.get("neighbor_strategy", "k-nearest")
    if strategy != "k-nearest":
        raise CheckpointError(f"{where}: neighbor_strategy={strategy!r} is not supported; spectrolens builds "
                              f"upstream's 'k-nearest' graphs only (toolkit.data.graphs)")
    if raw.get("use_canonize", True) is not True:
        raise CheckpointError(f"{where}: use_canonize=false (directed k-NN edges) is not supported")
    kw = {k: raw[k] for k in ("cutoff", "max_neighbors") if raw.get(k) is not None}
    try:
        return GraphConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{where}: graph settings do not map to a valid graph config: {e}") from None


def upstream_model_config(config_json: str | Path | Mapping[str, Any]) -> ModelConfig:
    """Map an upstream ALIGNN ``config.json`` (TrainingConfig, or its ``model`` section) to
    :class:`ModelConfig`; raises :class:`CheckpointError` for models we cannot reproduce."""
    raw, where = _read_upstream_config(config_json)
    m = _upstream_model_section(raw, where)
    name = m.get("name")
    if name == "alignn":
        raise CheckpointError(
            f"{where}: model 'alignn' (classic alignn.models.alignn.ALIGNN) is not supported: it uses "
            f"BatchNorm with running statistics where alignn_atomwise uses LayerNorm; its parameters "
            f"have the same names, so loading it non-strictly would silently give wrong predictions. "
            f"Only {', '.join(_SUPPORTED_UPSTREAM)} checkpoints can be imported.")
    if name not in _SUPPORTED_UPSTREAM:
        raise CheckpointError(f"{where}: upstream model {name!r} is not supported "
                              f"(supported: {', '.join(_SUPPORTED_UPSTREAM)})")
    for key, (ok, what) in _MUST_EQUAL.items():
        if key in m and m[key] is not None and m[key] != ok:
            raise CheckpointError(f"{where}: model.{key}={m[key]!r} ({what}) is not supported; "
                                  f"only {key}={ok!r} is reproduced by this model")
    if m.get("atom_input_features", 92) != 92 or raw.get("atom_features", "cgcnn") != "cgcnn":
        raise CheckpointError(f"{where}: atom features {raw.get('atom_features')!r} with "
                              f"atom_input_features={m.get('atom_input_features')} are not supported; "
                              f"only CGCNN features (atom_features='cgcnn', 92 per element) are")
    if name == "alignn_atomwise_pure":
        zbl = m.get("use_zbl")
        calc = m.get("calculate_gradient", True) and m.get("gradwise_weight", 1.0) != 0
        if zbl or (zbl is None and calc):
            raise CheckpointError(f"{where}: alignn_atomwise_pure with ZBL repulsion added to its output "
                                  f"(use_zbl={zbl}, calculate_gradient={calc}) is not supported")
    kw = {ours: m[up] for up, ours in _FIELD_MAP.items() if up in m and m[up] is not None}
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{where}: model section does not map to a valid model config: {e}") from None


def _strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def upstream_state_dict(sd: Mapping[str, Any], where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Upstream ALIGNNAtomWise(Pure) state_dict -> ours: strips DDP/compile prefixes, unwraps
    ``{"model": state_dict}``, drops the pure model's ``_species_table`` (an inference-time lookup
    table, not a parameter), refuses BatchNorm running statistics (the classic model)."""
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    sd = _strip_prefixes(sd)
    bn = [k for k in sd if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    if bn:
        raise CheckpointError(
            f"{where}: holds BatchNorm running statistics ({bn[0]}, ...): it is a classic "
            f"alignn.models.alignn.ALIGNN checkpoint, not alignn_atomwise; loading it into the "
            f"LayerNorm model would silently give wrong predictions")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where}: entries that are not tensors: {bad[:5]}")
    return {k: v for k, v in sd.items() if k != "_species_table"}


def load_matching(model: nn.Module, sd: Mapping[str, torch.Tensor], where: str = "checkpoint") -> None:
    """``model.load_state_dict(sd, strict=True)`` with a readable error listing missing,
    unexpected and mis-shaped entries."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    shapes += [f"{k}: RBF centres differ (checkpoint {sd[k][0]:.3g}..{sd[k][-1]:.3g}, model "
               f"{own[k][0]:.3g}..{own[k][-1]:.3g})" for k in own
               if k.endswith("centers") and k in sd and sd[k].shape == own[k].shape
               and not torch.allclose(sd[k].float(), own[k].float(), atol=1e-6)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"shape/value mismatch {len(shapes)} (e.g. {shapes[:3]})")
        raise CheckpointError(f"{where} does not match the model: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def load_upstream_checkpoint(best_model_pt: str | Path, config_json: str | Path,
                             backend: str = "torch") -> tuple[nn.Module, ModelConfig]:
    """Load an upstream ALIGNN checkpoint (``best_model.pt`` + ``config.json``) into our model.

    Returns ``(model, model_config)``; the model is in eval mode on CPU (the matching graph
    settings: :func:`upstream_graph_config`). Raises
    :class:`CheckpointError` naming the file and the reason for anything that would not give the
    same predictions as upstream."""
    from toolkit.model import build_model

    cfg = upstream_model_config(config_json)
    cfg = cfg.model_copy(update={"backend": backend})
    sd = upstream_state_dict(load_state_dict_file(best_model_pt), str(best_model_pt))
    if cfg.output_features is None:  # upstream default is 1
        cfg = cfg.model_copy(update={"output_features": 1})
    model = build_model(cfg)
    load_matching(model, sd, f"checkpoint {best_model_pt} (config {config_json})")
    model.eval()
    return model, cfg


# --- spectrolens model files ----------------------------------------------------------------------

#: ``format`` values of files that hold a spectrolens model (``best.pt``; ``checkpoints/last.pt``)
SPECTROLENS_FORMATS = ("spectrolens-model", "spectrolens-train-checkpoint")


def load_model_file(path: str | Path, obj: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict, int]:
    """A model written by ``spectrolens train`` (``best.pt``, or a training checkpoint ``last.pt``).

    Returns ``(model in eval mode on CPU, the run's whole config as a dict, output_features)``; raises
    :class:`CheckpointError` naming the file and what is wrong. ``obj``: the already loaded file."""
    from toolkit.model import build_model

    path = Path(path)
    obj = load_state_dict_file(path) if obj is None else obj
    if obj.get("format") not in SPECTROLENS_FORMATS:
        raise CheckpointError(f"checkpoint {path} is not a spectrolens model (format: {obj.get('format')!r}; "
                              f"expected one of {', '.join(SPECTROLENS_FORMATS)})")
    try:
        saved = obj["config"]
        saved = json.loads(saved) if isinstance(saved, str) else dict(saved)
        model_cfg = ModelConfig.model_validate(saved["model"])
        out = int(obj["output_features"])
        model = build_model(model_cfg, out)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be used: {type(e).__name__}: {e}") from None
    load_matching(model, obj["model"], f"checkpoint {path}")
    model.eval()
    return model, saved, out
