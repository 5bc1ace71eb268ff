"""Multi-resolution clustering and the explained Ward tree (toolkit.analyze.hierarchy): the default
level follows from N, levels are tree cuts, the top split of a planted two-level structure is named
by the top factor and the next splits by the second (q < 0.05), in the exact and the scalable
(micro-cluster) mode, and the vectorised split tests equal scipy's per-split tests."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ttest_ind

from toolkit.analyze import hierarchy as hy
from toolkit.analyze.clustering import cluster, cut_nodes, leaf_labels, leaf_order, size_k
from toolkit.analyze.report import hierarchy_html

NAMES = ["anion:oxide", "coordination:octahedral", "element:Na", "density"]
CAT = np.array([True, True, True, False])


def _two_level(n_per: int = 100, seed: int = 0):
    """Four groups: factor A (oxide or not) separates them far apart (dim 0), factor B (octahedral
    or not) separates each A-group in two (dim 1, closer); descriptors: A, B, and two noise columns."""
    rng = np.random.default_rng(seed)
    a = np.repeat([0, 0, 1, 1], n_per)
    b = np.repeat([0, 1, 0, 1], n_per)
    x = np.column_stack([16.0 * a, 6.0 * b, np.zeros(len(a))]) + rng.normal(size=(len(a), 3))
    vals = np.column_stack([a, b, rng.integers(0, 2, len(a)), rng.normal(size=len(a))]).astype(float)
    vals[::17, 3] = np.nan  # missing values are left out of their tests
    return x.astype(np.float32), vals, a, b


def _check_two_levels(h: dict, n: int) -> None:
    root = h["splits"][0]
    assert root["parent"] is None and root["size"] == n and sorted(root["sizes"]) == [n // 2, n // 2]
    top = root["descriptors"][0]
    assert top["descriptor"] == "anion:oxide" and top["q"] < 1e-10 and abs(top["effect"]) > 0.95
    assert top["family"] == "anion" and top["direction"] in root["children"]
    second = [sp for sp in h["splits"] if sp["parent"] == root["node"]]
    assert len(second) == 2 and {sp["parent_side"] for sp in second} == set(root["children"])
    for sp in second:
        d = sp["descriptors"][0]
        assert d["descriptor"] == "coordination:octahedral" and d["q"] < 0.05 and abs(d["effect"]) > 0.8
        assert sp["depth"] == 1
    assert h["n_tests"] > 0 and h["n_splits"] == len(h["splits"])


def test_default_level_k_from_n():
    assert size_k(815, 25, 100) == 33 and size_k(2681, 25, 200) == 107
    assert size_k(60, 25, 6) == 2 and size_k(10, 25, 100) == 2 and size_k(10**6, 25, 100) == 100
    assert size_k(10**6, 25, 10**5, n_leaves=2000) == 2000
    x, *_ = _two_level(50)
    res = cluster(x, n_clusters="size", target_cluster_size=25, max_clusters=100)
    assert res.n_clusters == 8 and res.criterion.startswith("size") and len(res.nodes) == 8
    assert np.bincount(res.labels).sum() == 200


def test_levels_are_cuts_of_the_tree():
    x, _, a, b = _two_level(60)
    res = cluster(x, n_clusters=4, max_clusters=20)
    z = res.linkage
    order, start, stop = leaf_order(z)
    assert sorted(order) == list(range(len(x))) and stop[-1] - start[-1] == len(x)
    for k in (1, 2, 4, 9):
        nodes = cut_nodes(z, k)
        lab = leaf_labels(z, nodes)
        assert len(nodes) == k and (lab >= 0).all() and len(np.unique(lab)) == k
    # clusters are tree nodes numbered in leaf order, and recover the four planted groups
    assert np.array_equal(leaf_labels(z, res.nodes)[res.leaf_of], res.labels)
    assert len({(i, j) for i, j in zip(a, b)}) == len(np.unique(res.labels)) == 4
    lv = hy.levels(z, res.leaf_sizes, [2, 8], res.n_clusters)
    assert [v["k"] for v in lv] == [2, 4, 8] and [v["default"] for v in lv] == [False, True, False]
    assert all(sum(v["sizes"]) == len(x) for v in lv) and lv[1]["nodes"] == res.nodes


@pytest.mark.parametrize("mode", ["exact", "scalable"])
def test_planted_two_level_taxonomy(mode, tmp_path):
    x, vals, _, _ = _two_level(100)
    kw = {"scalable_threshold": 100, "n_micro": 60} if mode == "scalable" else {}
    res = cluster(x, n_clusters=4, **kw)
    assert res.mode == mode
    h = hy.explain_tree(res.linkage, res.leaf_of, res.leaf_sizes, vals, NAMES, CAT, min_split_size=20)
    _check_two_levels(h, len(x))
    if mode == "scalable":
        assert h["n_leaves"] <= 60 and h["n_materials"] == len(x)
    p = hy.paths(res.linkage, h, res.nodes)
    words = {" → ".join(v) for v in p.values()}
    assert any(w.startswith("oxides") and "octahedral" in w for w in words), words
    page = hierarchy_html(h)
    assert page.count("<details") == h["n_splits"] and "oxides" in page and "<script" not in page


def test_split_tests_equal_scipy():
    """The cumulative-sum tests of one split equal a direct computation: prevalence difference for
    0/1 columns, and Welch's t-test p / standardized mean difference for continuous ones."""
    rng = np.random.default_rng(3)
    n = 300
    vals = np.column_stack([rng.integers(0, 2, n), rng.normal(size=n) + np.r_[np.zeros(120), np.ones(180)]]).astype(float)
    vals[::11, 1] = np.nan
    cnt, s, s2 = hy.leaf_stats(vals, np.arange(n), n)
    cum = [np.vstack([np.zeros((1, 2)), np.cumsum(v, 0)]) for v in (cnt, s, s2)]
    r = hy.split_tests(*cum, (np.array([0]), np.array([120])), (np.array([120]), np.array([n])), np.array([True, False]))
    ia, ib = vals[:120], vals[120:]
    assert r["effect"][0, 0] == pytest.approx(ia[:, 0].mean() - ib[:, 0].mean())
    ca, cb = ia[np.isfinite(ia[:, 1]), 1], ib[np.isfinite(ib[:, 1]), 1]
    assert r["p"][0, 1] == pytest.approx(ttest_ind(ca, cb, equal_var=False).pvalue, rel=1e-6)
    sd = np.sqrt(((len(ca) - 1) * ca.var(ddof=1) + (len(cb) - 1) * cb.var(ddof=1)) / (len(ca) + len(cb) - 2))
    assert r["effect"][0, 1] == pytest.approx((ca.mean() - cb.mean()) / sd)


def test_min_split_size_and_max_splits():
    x, vals, *_ = _two_level(40)
    res = cluster(x, n_clusters=4)
    h = hy.explain_tree(res.linkage, res.leaf_of, res.leaf_sizes, vals, NAMES, CAT, min_split_size=15)
    assert h["splits"] and all(min(sp["sizes"]) >= 15 for sp in h["splits"])
    few = hy.explain_tree(res.linkage, res.leaf_of, res.leaf_sizes, vals, NAMES, CAT, min_split_size=15, max_splits=3)
    assert few["n_splits"] == 3 and [sp["node"] for sp in few["splits"]] == [sp["node"] for sp in h["splits"][:3]]
    none = hy.explain_tree(res.linkage, res.leaf_of, res.leaf_sizes, vals, NAMES, CAT, min_split_size=1000)
    assert none["splits"] == [] and "No split" in hierarchy_html(none)


def test_default_config_and_levels_of_a_layer(tmp_path):
    """analyze defaults to the size rule (k = round(120 / 25) = 5 here) and reports analyze.levels
    besides the default level in the layer's hierarchy."""
    from test_analyze import _cfg
    from test_analyze_steps import N, _inputs

    from toolkit.analyze import steps
    from toolkit.analyze.attribution import dedupe_categorical
    from toolkit.analyze.probes import probe_targets

    cfg = _cfg(tmp_path, workers=1, levels=[2, 6])
    a = cfg.analyze
    assert (a.n_clusters, a.target_cluster_size, a.min_split_size, a.drivers) == ("size", 25, 10, True)
    inp = _inputs(tmp_path)
    names, _ = dedupe_categorical(inp.table)
    lr = steps.analyze_layer(cfg, inp, "blobs", inp.emb["layers/blobs/mean"], np.ones(N, bool), names,
                             probe_targets(inp.table))
    assert lr.clustering.n_clusters == 5 and lr.clustering.criterion.startswith("size")
    assert [(v["k"], v["default"]) for v in lr.hierarchy["levels"]] == [(2, False), (5, True), (6, False)]
    assert lr.hierarchy["levels"][1]["nodes"] == lr.clustering.nodes and set(lr.hierarchy["paths"]) == set(map(str, range(5)))
