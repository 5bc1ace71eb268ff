"""Distance to the training data in the readout space (toolkit.analyze.novelty): materials far from
every training material are flagged, training materials never are, the yardstick is the typical
nearest-neighbour distance among training materials, and the threshold is calibrated on the
validation materials so that about 5 % of in-distribution materials are flagged."""

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
    nov, ratio = far_from_training(x, mask, ids, formulas=["X"] * len(x), factor=2.0)  # fixed threshold
    assert nov["factor"] == 2.0 and "fixed" in nov["threshold_method"]
    assert nov["available"] and nov["n_training"] == 300 and nov["n_other"] == 45
    assert np.all(ratio[:300] == 0)  # training materials are never flagged
    assert np.median(ratio[300:340]) < 2.0 and np.all(ratio[340:] > 5.0)
    assert nov["n_far"] == int((ratio > 2.0).sum()) and {f"m{i}" for i in range(340, 345)} <= {
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


def _population(rng, n_train=300, n_val=100, n_test=200, n_far=5, dim=8):
    """Training, validation and test materials from one distribution (an elongated Gaussian, as readout
    embeddings are), plus ``n_far`` materials well outside it; masks of train and val."""
    scales = np.linspace(3.0, 0.3, dim)
    x = rng.normal(0, 1, (n_train + n_val + n_test, dim)) * scales
    far = rng.normal(0, 1, (n_far, dim)) * scales + np.r_[30.0, np.zeros(dim - 1)]
    train = np.r_[np.ones(n_train, bool), np.zeros(n_val + n_test + n_far, bool)]
    val = np.r_[np.zeros(n_train, bool), np.ones(n_val, bool), np.zeros(n_test + n_far, bool)]
    return np.vstack([x, far]), train, val


def test_threshold_calibrated_on_validation_flags_about_five_percent_of_in_distribution_materials():
    """Over 30 draws, the calibrated threshold flags on average ~5 % (at most 5 %, at least 5 % - 1/(n+1)
    in expectation: the conformal rank) of test materials from the training distribution, and every far
    material."""
    shares = []
    for seed in range(30):
        x, train, val = _population(np.random.default_rng(seed))
        ids = [f"m{i}" for i in range(len(x))]
        nov, ratio = far_from_training(x, train, ids, val=val, seed=seed)
        assert "validation" in nov["threshold_method"] and nov["quantile"] == 0.95 and nov["n_calibration"] == 100
        assert nov["n_val"] == 100 and nov["n_rest"] == 205
        test = slice(400, 600)
        shares.append(float((ratio[test] > nov["factor"]).mean()))
        assert np.all(ratio[600:] > nov["factor"])  # the far materials
        assert nov["n_far_val"] <= 5  # the ceil(101 * 0.95) = 96th of 100 ratios: at most 4 above it
    assert 0.03 <= np.mean(shares) <= 0.065, np.mean(shares)


def test_without_a_validation_split_the_training_leave_one_out_ratios_calibrate():
    shares = []
    for seed in range(20):
        x, train, _ = _population(np.random.default_rng(100 + seed))
        nov, ratio = far_from_training(x, train, [f"m{i}" for i in range(len(x))], seed=seed)
        assert "leave-one-out" in nov["threshold_method"] and nov["n_calibration"] == 300 and nov["n_val"] == 0
        shares.append(float((ratio[300:600] > nov["factor"]).mean()))
        assert np.all(ratio[600:] > nov["factor"])
    assert 0.02 <= np.mean(shares) <= 0.09, np.mean(shares)


def test_split_masks_read_train_and_val(tmp_path):
    from toolkit.analyze.novelty import split_masks

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "split.json").write_text(json.dumps({"train": ["a"], "val": ["b"], "test": ["c"]}))
    train, val, src = split_masks(tmp_path, ["a", "b", "c"], np.ones(3, bool))
    assert train.tolist() == [True, False, False] and val.tolist() == [False, True, False]
    assert src == "train/split.json"


def test_novelty_setting_is_validated():
    import pytest

    from toolkit.config import ConfigError, load_config

    cfg = load_config(None, [])
    assert cfg.analyze.novelty_quantile == 0.95 and cfg.analyze.novelty_factor is None
    assert load_config(None, ["analyze.novelty_factor=2"]).analyze.novelty_factor == 2.0
    for bad in ("analyze.novelty_quantile=1", "analyze.novelty_quantile=0", "analyze.novelty_factor=0"):
        with pytest.raises(ConfigError, match="novelty"):
            load_config(None, [bad])
