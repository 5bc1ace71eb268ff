"""Capture layer activations with forward hooks, and pool them per graph (vectorised).

Layer names (docs/architecture.md): ``alignn_1..N`` = atom features ``x`` out of ``alignn_layers.{i-1}``
(which returns ``(x, y, z)``), ``gcn_1..M`` = ``x`` out of ``gcn_layers.{i-1}`` (returns ``(x, y)``),
``readout`` = the model's pooled vector before ``fc`` (output of the ``readout`` module, (B, H)).

``readout/mean`` is the readout module's own output (the model pools by mean, as upstream ALIGNN);
other poolings of ``readout`` pool the atom features that enter the readout module (captured by a
forward pre-hook), so they are defined whatever the readout's call signature. The readout has no
per-atom features of its own.

Usage::

    with capture(model, ["gcn_4", "readout"]) as cap:
        pred = model(batch)
        feats = cap.pooled(batch, ["mean", "max"])    # {"gcn_4/mean": (B, H), ...}
    # hooks are removed here, also if the forward raised
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from toolkit.data.batch import GraphBatch
from toolkit.model import capture_modules, layer_names

READOUT = "readout"
POOLINGS = ("mean", "max", "sum")


def pool(x: torch.Tensor, atom_batch: torch.Tensor, n_graphs: int, kind: str) -> torch.Tensor:
    """Pool atom rows ``x`` (A, H) into graph rows (B, H) by ``atom_batch`` (A,) graph index.

    ``kind``: mean | sum | max. Computed in float32 whatever the input dtype (bf16 autocast)."""
    x = x.float()
    h = x.shape[1]
    out = torch.zeros((n_graphs, h), dtype=torch.float32, device=x.device)
    if kind == "sum" or kind == "mean":
        out.index_add_(0, atom_batch, x)
        if kind == "mean":
            counts = torch.bincount(atom_batch, minlength=n_graphs).clamp_min(1).to(out.dtype)
            out /= counts[:, None]
        return out
    if kind == "max":
        idx = atom_batch[:, None].expand(-1, h)
        return out.scatter_reduce_(0, idx, x, reduce="amax", include_self=False)
    raise ValueError(f"unknown pooling {kind!r}; use one of {POOLINGS}")


def resolve_layers(model: nn.Module, wanted: list[str] | None) -> list[str]:
    """The layers to capture, in model order; ``None`` = all. Unknown names raise ValueError."""
    available = layer_names(model)
    if wanted is None:
        return available
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise ValueError(f"embed.layers: unknown layer(s) {unknown}; this model has {available}")
    return [a for a in available if a in wanted]


class Capture:
    """Holds the activations of the last forward pass: atom features (A, H) per message-passing layer,
    the readout output (B, H) and the atom features entering the readout (A, H)."""

    def __init__(self, model: nn.Module, layers: list[str] | None):
        self.layers = resolve_layers(model, layers)
        self.atoms: dict[str, torch.Tensor] = {}
        self.readout_out: torch.Tensor | None = None
        self.readout_in: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        modules = capture_modules(model)
        for layer in self.layers:
            mod = modules[layer]
            if layer == READOUT:
                self._handles.append(mod.register_forward_pre_hook(self._readout_pre, with_kwargs=True))
                self._handles.append(mod.register_forward_hook(self._readout_post))
            else:
                self._handles.append(mod.register_forward_hook(self._make_layer_hook(layer)))

    def _make_layer_hook(self, layer: str):
        def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
            x = out[0] if isinstance(out, (tuple, list)) else out
            self.atoms[layer] = x

        return hook

    def _readout_pre(self, _mod: nn.Module, args: tuple, kwargs: dict) -> None:
        self.readout_in = next((a for a in (*args, *kwargs.values())
                                if isinstance(a, torch.Tensor) and a.ndim == 2 and a.is_floating_point()), None)

    def _readout_post(self, _mod: nn.Module, _args: Any, out: Any) -> None:
        self.readout_out = out[0] if isinstance(out, (tuple, list)) else out

    def pooled(self, batch: GraphBatch, poolings: list[str]) -> dict[str, torch.Tensor]:
        """``{"<layer>/<pooling>": (B, H) float32}`` for the last forward pass."""
        b = batch.num_graphs
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            for kind in poolings:
                if layer == READOUT:
                    if self.readout_out is None:
                        raise RuntimeError("the readout module did not run in the last forward pass")
                    if kind == "mean":
                        out[f"{layer}/{kind}"] = self.readout_out.float()
                        continue
                    if self.readout_in is None or self.readout_in.shape[0] != batch.atomic_numbers.shape[0]:
                        raise RuntimeError(f"readout/{kind}: could not find the atom features entering the readout")
                    out[f"{layer}/{kind}"] = pool(self.readout_in, batch.atom_batch, b, kind)
                else:
                    out[f"{layer}/{kind}"] = pool(self._atoms_of(layer), batch.atom_batch, b, kind)
        return out

    def per_atom(self) -> dict[str, torch.Tensor]:
        """``{layer: (A, H) float32}`` atom features of the message-passing layers of the last pass."""
        return {layer: self._atoms_of(layer).float() for layer in self.layers if layer != READOUT}

    def _atoms_of(self, layer: str) -> torch.Tensor:
        if layer not in self.atoms:
            raise RuntimeError(f"layer {layer} did not run in the last forward pass")
        return self.atoms[layer]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextmanager
def capture(model: nn.Module, layers: list[str] | None = None) -> Iterator[Capture]:
    """Register capture hooks on ``model`` for ``layers`` (None = all); removes them on exit."""
    cap = Capture(model, layers)
    try:
        yield cap
    finally:
        cap.remove()
