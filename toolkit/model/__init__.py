"""toolkit.model: ALIGNN (pure PyTorch; a DGL backend with the same parameters) and checkpoint I/O.

``build_model(cfg.model, output_features)`` -> ``nn.Module`` with
``forward(batch: GraphBatch) -> Tensor (B, output_features)``.
"""

from __future__ import annotations

from torch import nn

from toolkit.config import ModelConfig
from toolkit.model.alignn import ALIGNN
from toolkit.model.checkpoint import (
    CheckpointError,
    load_state_dict_file,
    load_upstream_checkpoint,
    save_state_dict_file,
    upstream_graph_config,
)

#: ``format`` of the model file ``train/best.pt`` (written by toolkit.train, read by embed and analyze)
MODEL_FORMAT = "spectrolens-model"

__all__ = ["ALIGNN", "CheckpointError", "MODEL_FORMAT", "build_model", "capture_modules", "layer_names",
           "load_state_dict_file", "load_upstream_checkpoint", "save_state_dict_file", "upstream_graph_config"]


def model_kwargs(cfg: ModelConfig, output_features: int | None = None) -> dict:
    """Constructor arguments of :class:`ALIGNN` from the config (output_features overrides)."""
    out = output_features if output_features is not None else cfg.output_features
    if out is None:
        raise ValueError("model.output_features is not set and no output size was given "
                         "(it defaults to the dataset's grid length)")
    return dict(alignn_layers=cfg.alignn_layers, gcn_layers=cfg.gcn_layers,
                atom_input_features=cfg.atom_input_features, edge_input_features=cfg.edge_input_features,
                triplet_input_features=cfg.triplet_input_features, embedding_features=cfg.embedding_features,
                hidden_features=cfg.hidden_features, output_features=int(out), cutoff=cfg.rbf_cutoff,
                link=cfg.link, conditions=len(cfg.conditions), condition_features=cfg.condition_features,
                condition_every_layer=cfg.condition_every_layer)


def build_model(cfg: ModelConfig, output_features: int | None = None) -> nn.Module:
    """The ALIGNN model of ``cfg`` (``cfg.backend``: "torch" or "dgl"; same state_dict either way)."""
    kw = model_kwargs(cfg, output_features)
    if cfg.backend == "dgl":
        if cfg.conditions:
            raise ValueError(f"model.conditions {cfg.conditions}: condition inputs need model.backend=torch")
        for k in ("conditions", "condition_features", "condition_every_layer"):
            kw.pop(k)
        from toolkit.model.dgl_backend import ALIGNNDGL

        return ALIGNNDGL(**kw)
    return ALIGNN(**kw)


def layer_names(model: nn.Module) -> list[str]:
    """Embedding layer names: ``alignn_1..N``, ``gcn_1..M``, ``readout``."""
    return list(capture_modules(model))


def capture_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Layer name -> module whose forward output to capture with a forward hook.

    ``alignn_i`` -> ``alignn_layers[i-1]`` (output ``(x, y, z)``; x = atom features (A, hidden)),
    ``gcn_i`` -> ``gcn_layers[i-1]`` (output ``(x, y)``), ``readout`` -> ``readout`` (output:
    the pooled (B, hidden) tensor that feeds ``fc``). Unwraps DDP / torch.compile wrappers.
    Atom features keep the batch's atom order; bond (y) and angle (z) features are in the model's
    internal order (sorted by destination, see ``alignn.sort_by_destination``).
    """
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    mods: dict[str, nn.Module] = {}
    for i, layer in enumerate(inner.alignn_layers, start=1):
        mods[f"alignn_{i}"] = layer
    for i, layer in enumerate(inner.gcn_layers, start=1):
        mods[f"gcn_{i}"] = layer
    mods["readout"] = inner.readout
    return mods
