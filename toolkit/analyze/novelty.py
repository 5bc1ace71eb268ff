"""How far each analysed material is from the training data, in the model's own readout space.

A prediction (and an interpretation built on it) is trustworthy where the model has seen similar
materials. :func:`far_from_training` measures, for every material, the distance of its readout
embedding to the nearest *training* material's (the train split of ``train/split.json``; every material
with a spectrum when there is none), in units of the typical nearest-neighbour distance among training
materials (the median over at most ``max_reference`` of them, :class:`toolkit.explain.probes.Reference`,
the same yardstick as explain's extrapolation flag). Materials beyond ``factor`` (default 2) are
flagged; the report lists the farthest. Training materials themselves are at distance 0 and never
flagged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FACTOR = 2.0
MAX_REFERENCE = 5_000  # training embeddings kept as the reference (a seeded sample above)
SHOWN = 20


def training_mask(run_dir: Path, ids: list[str], has_spectrum: np.ndarray) -> tuple[np.ndarray, str]:
    """(bool per material, where it came from): the train split of ``train/split.json``, else every
    material with a spectrum."""
    from toolkit.layout import RunLayout

    split = RunLayout(run_dir).train_dir / "split.json"
    if split.is_file():
        try:
            train = {str(x) for x in json.loads(split.read_text())["train"]}
            mask = np.array([str(i) in train for i in ids], dtype=bool)
            if mask.any():
                return mask, "train/split.json"
        except (ValueError, KeyError):
            pass
    return np.asarray(has_spectrum, dtype=bool).copy(), "materials with a spectrum (no train/split.json)"


def far_from_training(readout: np.ndarray, train: np.ndarray, ids: list[str], formulas: list[str] | None = None,
                      factor: float = FACTOR, max_reference: int = MAX_REFERENCE,
                      seed: int = 0) -> tuple[dict[str, Any], np.ndarray | None]:
    """(``novelty`` of attribution.json: the flagged count and share and the ``SHOWN`` farthest flagged
    materials; the distance ratio of every material, aligned to ``ids``, None when not available)."""
    from toolkit.explain.probes import Reference

    x = np.asarray(readout, dtype=np.float32)
    train = np.asarray(train, dtype=bool)
    rows = np.flatnonzero(train)
    if rows.size < 2:
        return {"available": False, "reason": f"{rows.size} training material(s) in the analysed population"}, None
    if rows.size > max_reference:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_reference, replace=False))
    ref = Reference(x[rows])
    ratio = np.zeros(len(x))
    other = np.flatnonzero(~train)
    if other.size:
        ratio[other] = ref.ratio(x[other])
    far = np.flatnonzero(ratio > factor)
    order = far[np.argsort(-ratio[far], kind="stable")][:SHOWN]
    return {"available": True, "factor": factor, "nn_scale": ref.nn_scale, "n_reference": int(rows.size),
            "n_training": int(train.sum()), "n_other": int(other.size), "n_far": int(far.size),
            "share_far": float(far.size / max(other.size, 1)),
            "farthest": [{"id": str(ids[i]), "formula": str(formulas[i]) if formulas is not None else None,
                          "ratio": round(float(ratio[i]), 3)} for i in order]}, ratio
