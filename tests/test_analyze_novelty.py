"""Distance to the training data in the readout space (toolkit.analyze.novelty): materials far from
every training material are flagged, training materials never are, the yardstick is the typical
nearest-neighbour distance among training materials."""

from __future__ import annotations

import json

import numpy as np

from toolkit.analyze.novelty import far_from_training, training_mask
from toolkit.analyze.report import novelty_html


def test_far_materials_are_flagged_and_ranked():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (300, 8))
    near = rng.normal(0, 1, (40, 8))  # from the training distribution
    far = rng.normal(0, 1, (5, 8)) + np.array([12.0] + [0.0] * 7)  # well outside it
    x = np.vstack([train, near, far])
    mask = np.r_[np.ones(300, bool), np.zeros(45, bool)]
    ids = [f"m{i}" for i in range(len(x))]
    nov, ratio = far_from_training(x, mask, ids, formulas=["X"] * len(x))
    assert nov["available"] and nov["n_training"] == 300 and nov["n_other"] == 45
    assert np.all(ratio[:300] == 0)  # training materials are never flagged
    assert np.median(ratio[300:340]) < 2.0 and np.all(ratio[340:] > 5.0)
    assert nov["n_far"] == int((ratio > 2.0).sum()) and set(f"m{i}" for i in range(340, 345)) <= {
        r["id"] for r in nov["farthest"]}
    assert [r["ratio"] for r in nov["farthest"]] == sorted((r["ratio"] for r in nov["farthest"]), reverse=True)
    assert nov["n_far"] <= 5 + 4  # a handful of the near ones may sit in the tail, not many
    text = novelty_html(nov)
    assert f"{nov['n_far']} of 45 materials" in text and all(f"m{i}" in text for i in range(340, 345))


def test_training_mask_from_the_split_else_spectra(tmp_path):
    ids = ["a", "b", "c"]
    mask, src = training_mask(tmp_path, ids, np.array([True, False, True]))
    assert mask.tolist() == [True, False, True] and "no train/split.json" in src
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "split.json").write_text(json.dumps({"train": ["b"], "val": ["a"], "test": ["c"]}))
    mask, src = training_mask(tmp_path, ids, np.array([True, True, True]))
    assert mask.tolist() == [False, True, False] and src == "train/split.json"
    nov, ratio = far_from_training(np.zeros((3, 2)), mask, ids)
    assert not nov["available"] and ratio is None and "1 training material" in nov["reason"]
