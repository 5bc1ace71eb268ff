"""How far each analysed material is from the training data, in the model's own readout space.

A prediction (and an interpretation built on it) is trustworthy where the model has seen similar
materials. :func:`far_from_training` measures, for every material, the distance of its readout
embedding to the nearest *training* material's (the train split of ``train/split.json``; every material
with a spectrum when there is none), in units of the typical nearest-neighbour distance among training
materials (the median over at most ``max_reference`` of them, :class:`toolkit.explain.probes.Reference`,
the same yardstick as explain's extrapolation flag). Training materials themselves are at distance 0 and
never flagged.

Which ratio counts as "far" is calibrated on in-distribution data, so that about ``1 - quantile`` of
materials like the training ones are flagged (``analyze.novelty_quantile``, default 0.95: ~5 %): the
threshold is the split-conformal ``quantile`` of the **validation** materials' ratios (the
⌈(n+1)·q⌉-th smallest of n; :func:`toolkit.train.ensemble.conformal_rank`, the rule the ensemble's
recalibration uses). Without a validation split, the training materials' leave-one-out ratios (each
one's nearest *other* training material) stand in for them; the model was fitted to those, so their
embeddings lie closer together than held-out ones and this fallback flags more (docs/report.md). ``analyze.novelty_factor`` set to a number
overrides the calibration with that fixed threshold. (A fixed 2x flagged 47 of 160 held-out materials
of the demo, most of them ordinary test materials.) The report lists the farthest flagged materials.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

QUANTILE = 0.95
MAX_REFERENCE = 5_000  # training embeddings kept as the reference (a seeded sample above)
SHOWN = 20


def split_masks(run_dir: Path, ids: list[str], has_spectrum: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """(training mask, validation mask, where they came from): the train and val splits of
    ``train/split.json``, else every material with a spectrum as training and no validation."""
    from toolkit.layout import RunLayout

    split = RunLayout(run_dir).train_dir / "split.json"
    if split.is_file():
        try:
            s = json.loads(split.read_text())
            train, val = {str(x) for x in s["train"]}, {str(x) for x in s.get("val", [])}
            mask = np.array([str(i) in train for i in ids], dtype=bool)
            if mask.any():
                return mask, np.array([str(i) in val for i in ids], dtype=bool), "train/split.json"
        except (ValueError, KeyError, TypeError):
            pass
    return (np.asarray(has_spectrum, dtype=bool).copy(), np.zeros(len(ids), dtype=bool),
            "materials with a spectrum (no train/split.json)")


def training_mask(run_dir: Path, ids: list[str], has_spectrum: np.ndarray) -> tuple[np.ndarray, str]:
    """(bool per material, where it came from): the train split of ``train/split.json``, else every
    material with a spectrum."""
    train, _, source = split_masks(run_dir, ids, has_spectrum)
    return train, source


def conformal_threshold(ratios: np.ndarray, quantile: float) -> float:
    """The ⌈(n+1)·quantile⌉-th smallest of the finite ``ratios`` (their largest when the rank exceeds n):
    a new ratio exchangeable with these exceeds it with probability at most ``1 - quantile``."""
    from toolkit.train.ensemble import conformal_rank

    r = np.sort(np.asarray(ratios, dtype=np.float64)[np.isfinite(ratios)])
    if r.size == 0:
        return float("nan")
    return float(r[min(conformal_rank(r.size, quantile), r.size) - 1])


def _leave_one_out(ref_emb: np.ndarray, nn_scale: float) -> np.ndarray:
    """Each reference embedding's distance to its nearest *other* one, over ``nn_scale``."""
    import torch

    x = torch.as_tensor(np.asarray(ref_emb, dtype=np.float32))
    out = []
    for a in range(0, x.shape[0], 1024):
        d = torch.cdist(x[a:a + 1024], x)
        d[torch.arange(d.shape[0]), torch.arange(a, a + d.shape[0])] = float("inf")
        out.append(d.min(dim=1).values.numpy())
    return np.concatenate(out).astype(np.float64) / nn_scale


def far_from_training(readout: np.ndarray, train: np.ndarray, ids: list[str], formulas: list[str] | None = None,
                      factor: float | None = None, max_reference: int = MAX_REFERENCE, seed: int = 0,
                      val: np.ndarray | None = None, quantile: float = QUANTILE) -> tuple[dict[str, Any], np.ndarray | None]:
    """(``novelty`` of attribution.json: the threshold and how it was chosen, the flagged count and share
    and the ``SHOWN`` farthest flagged materials; the distance ratio of every material, aligned to ``ids``,
    None when not available). ``val``: the validation materials the threshold is calibrated on (see the
    module docstring); ``factor``: a fixed threshold instead."""
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
    val = np.zeros(len(x), bool) if val is None else (np.asarray(val, dtype=bool) & ~train)
    if factor is not None:
        threshold, method, n_cal = float(factor), "analyze.novelty_factor (fixed)", 0
    elif val.sum() >= 1:
        threshold = conformal_threshold(ratio[val], quantile)
        method, n_cal = f"conformal {quantile:g} quantile of the validation materials' ratios", int(val.sum())
    else:
        loo = _leave_one_out(x[rows], ref.nn_scale)
        threshold = conformal_threshold(loo, quantile)
        method, n_cal = (f"conformal {quantile:g} quantile of the training materials' leave-one-out ratios "
                         "(no validation split)"), int(rows.size)
    far = np.flatnonzero(ratio > threshold) if np.isfinite(threshold) else np.zeros(0, dtype=np.int64)
    order = far[np.argsort(-ratio[far], kind="stable")][:SHOWN]
    test = ~train & ~val
    return {"available": True, "factor": threshold, "threshold_method": method,
            "quantile": None if factor is not None else quantile, "n_calibration": n_cal,
            "nn_scale": ref.nn_scale, "n_reference": int(rows.size),
            "n_training": int(train.sum()), "n_other": int(other.size), "n_far": int(far.size),
            "share_far": float(far.size / max(other.size, 1)),
            "n_val": int(val.sum()), "n_far_val": int((ratio[val] > threshold).sum()),
            "n_rest": int(test.sum()), "n_far_rest": int((ratio[test] > threshold).sum()),
            "farthest": [{"id": str(ids[i]), "formula": str(formulas[i]) if formulas is not None else None,
                          "ratio": round(float(ratio[i]), 3)} for i in order]}, ratio
