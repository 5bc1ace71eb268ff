"""recovery_score: planted drivers vs hand-built attribution dicts, with a chance baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from toolkit.analyze.descriptors import DescriptorTable
from toolkit.analyze.recovery import recovery_score
from toolkit.config import load_config
from toolkit.data.benchmark import benchmark_truth
from toolkit.data.realbench import realbench_truth

FILLER = [f"element:{el}" for el in ("Li", "Na", "K", "Mg", "Ca", "Sr", "Ba", "Zn", "Cd", "Ga", "In", "Sn", "Pb",
                                     "Bi", "Ti", "Zr", "Nb", "Ta", "Mo", "W", "Fe", "Co", "Ni", "Cu", "Ag")] + \
         ["density", "electronegativity_diff", "spacegroup:P2_1/c", "crystal_system:monoclinic"]
DRIVER_NAMES = ["anion:oxide", "anion:halide", "anion:sulfide", "anion:selenide", "cation_class:lone_pair_p",
                "cation_class:d10", "cation_class:d0", "cation_class:partial_d", "coordination:octahedral",
                "bond_length_mean", "bridge_linear_fraction", "angle_MXM_mean", "polyanion:PO4", "polyanion:SO4",
                "polyanion:SiO4", "volume_per_atom", "cn_mean"]
TESTED = DRIVER_NAMES + FILLER
GROUPS = ["selenide", "lone_pair", "open_d", "long_bonds", "linear", "phosphate"]


@pytest.fixture(scope="module")
def planted():
    """200 materials: six pure groups of 20 (one per planted driver) and 80 mixed background."""
    rng = np.random.default_rng(0)
    n = 200
    group = np.array([GROUPS[i // 20] if i < 120 else "background" for i in range(n)])
    anion = np.array(["oxide", "halide", "sulfide"] * 67)[:n].astype(object)
    anion[group == "selenide"] = "selenide"
    chem = np.where(np.arange(n) % 4 == 0, "d10", "none").astype(object)
    chem[group == "lone_pair"] = "lone_pair_p"
    open_d = (group == "open_d").astype(float)
    bond = rng.normal(2.2, 0.1, n)
    bond[group == "long_bonds"] = 3.0
    lin = np.zeros(n)
    lin[group == "linear"] = 0.8
    poly = np.where(group == "phosphate", np.where(np.arange(n) % 2 == 0, "PO4", "SO4"), "none")  # union defines
    vals = {"ids": [f"m{i:03d}" for i in range(n)], "anion": anion, "cation_chemistry": chem,
            "octahedral_open_d": open_d, "bond_length_mean": bond, "bridge_linear_fraction": lin, "polyanion": poly,
            "volume_per_atom": 8.0 * bond + rng.normal(0, 0.1, n)}
    return vals, group


TOP_OF = {"selenide": "anion:selenide", "lone_pair": "cation_class:lone_pair_p", "open_d": "cation_class:partial_d",
          "long_bonds": "bond_length_mean", "linear": "bridge_linear_fraction", "phosphate": "polyanion:PO4"}


def _attribution(clusters: dict[str, tuple[list[str], list[str]]], drivers: dict | None = None) -> dict:
    """{"layers": {"L": {"tested", "clusters": {c: {"members", "descriptors"}}}}} from (members, top names)."""
    cl = {c: {"size": len(m), "members": m, "descriptors": [{"descriptor": d} for d in top]}
          for c, (m, top) in clusters.items()}
    out = {"layers": {"L": {"tested": TESTED, "aliases": {}, "clusters": cl}}}
    if drivers:
        out["drivers"] = drivers
    return out


def _perfect(vals, group, swap: dict[str, list[str]] | None = None):
    ids = np.array(vals["ids"])
    clusters = {}
    for k, g in enumerate([*GROUPS, "background"]):
        top = (swap or {}).get(g) or ([TOP_OF[g], "element:Li", "density"] if g in TOP_OF else FILLER[:3])
        clusters[str(k)] = (ids[group == g].tolist(), top)
    return clusters


def test_perfect_explanation_scores_one_and_beats_chance(planted):
    vals, group = planted
    truth = realbench_truth(load_config(None, ["data.source=realbench"]))
    ranking = {"onset": {"descriptors": [{"descriptor": "anion:oxide", "rank": 1}, {"descriptor": "bond_length_mean", "rank": 2},
                                         {"descriptor": "cation_class:d10", "rank": 3}]},
               "edge_integral": {"descriptors": [{"descriptor": "bridge_linear_fraction", "rank": 1}]},
               "peak_1": {"descriptors": [{"descriptor": "coordination:octahedral", "rank": 1}]},
               "peak_2": {"descriptors": [{"descriptor": "volume_per_atom", "rank": None},
                                          {"descriptor": "polyanion:PO4", "rank": 1}]}}
    res = recovery_score(truth, _attribution(_perfect(vals, group), ranking), vals, seed=0)
    json.dumps(res)
    o = res["overall"]
    L = res["per_layer"]["L"]
    assert L["drivers_defining"] == sorted(truth["drivers"]), L["clusters"]
    assert o["coverage"] == 1.0 and o["recall"] == 1.0 and L["n_pairs"] == 6
    assert 0 < o["chance_recall"] < 0.5 and 0 < o["chance_coverage"] < 0.5
    assert o["distractor_rate"] == 0.0
    assert all(d["named"] and d["named_in_feature_ranking"] for d in res["per_driver"].values())
    assert o["feature_coverage"] == 1.0 and o["feature_chance"] < 0.5
    assert o["feature_distractor_rate"] == 0.0  # rank: null riders are not causes
    assert isinstance(res["summary"], str) and "6/6" in res["summary"]
    # the same seed gives the same chance figures
    again = recovery_score(truth, _attribution(_perfect(vals, group), ranking), vals, seed=0)
    assert again["overall"]["chance_recall"] == o["chance_recall"]


def test_shallow_two_cluster_anion_split_has_low_coverage(planted):
    vals, _ = planted
    truth = realbench_truth(load_config(None, ["data.source=realbench"]))
    ids = np.array(vals["ids"])
    ox = np.asarray(vals["anion"]) == "oxide"
    att = _attribution({"0": (ids[ox].tolist(), ["anion:oxide", "density", "element:Li"]),
                        "1": (ids[~ox].tolist(), ["anion:oxide", "density", "element:Li"])})
    res = recovery_score(truth, att, vals)
    o = res["overall"]
    assert o["coverage"] == pytest.approx(1 / 6) and res["per_layer"]["L"]["drivers_named"] == ["anion_class"]
    assert not res["per_driver"]["polyanion"]["named"] and res["per_driver"]["polyanion"]["defining_clusters"] == 0


def test_distractor_in_top3_raises_the_distractor_rate(planted):
    vals, group = planted
    truth = realbench_truth(load_config(None, ["data.source=realbench"]))
    base = recovery_score(truth, _attribution(_perfect(vals, group)), vals)
    swapped = _perfect(vals, group, swap={"long_bonds": ["volume_per_atom", "element:Li", "density"]})
    res = recovery_score(truth, _attribution(swapped), vals)
    assert base["overall"]["distractor_rate"] == 0.0
    assert res["overall"]["distractor_rate"] == pytest.approx(1 / 6)
    assert not res["per_driver"]["bond_length_mean"]["named"] and res["overall"]["coverage"] == pytest.approx(5 / 6)


def test_prototype_truth_with_descriptor_table_and_labels():
    """The prototype benchmark's truth (features -> driver patterns) scored from descriptor columns."""
    truth = benchmark_truth(load_config(None, []))
    rng = np.random.default_rng(1)
    n = 120
    lab = np.repeat(np.arange(4), 30)
    cols = {"anion:oxide": (lab == 0).astype(float), "anion:halide": (lab != 0).astype(float),
            "coordination:cubic": (lab == 1).astype(float), "coordination:octahedral": (lab != 1).astype(float),
            "cation_class:d10": (lab == 2).astype(float), "cation_class:alkali": (lab != 2).astype(float),
            "bond_length_mean": np.where(lab == 3, 3.2, 2.3) + rng.normal(0, 0.05, n)}
    names = sorted(cols)
    table = DescriptorTable([f"b{i}" for i in range(n)], names, np.column_stack([cols[k] for k in names]))
    tops = {0: ["anion:oxide"], 1: ["coordination:cubic"], 2: ["element:Zn"], 3: ["bond_length_mean"]}
    att = {"layers": {"L": {"tested": names + ["element:Zn", "density"],
                            "clusters": {str(c): {"descriptors": [{"descriptor": d} for d in tops[c]]} for c in range(4)}}}}
    res = recovery_score(truth, att, table, labels={"L": lab})
    pd = res["per_driver"]
    assert set(pd) == {"anion", "cation_class", "bond_length_mean", "coordination"}
    assert pd["anion"]["named"] and pd["coordination"]["named"] and pd["bond_length_mean"]["named"]
    assert not pd["cation_class"]["named"] and pd["cation_class"]["defining_clusters"] == 1
    assert res["overall"]["coverage"] == 0.75 and res["overall"]["recall"] == 0.75
    assert pd["coordination"]["features"] == ["edge_integral", "peak_1"] and pd["anion"]["values_from"] == "descriptors"
    assert res["overall"]["distractor_rate"] is None or res["overall"]["distractor_rate"] == 0.0
