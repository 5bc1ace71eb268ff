"""One signal per slot (toolkit.analyze.signals): descriptors that say the same thing on the data are
folded under one head, and the head is the one a chemist (and the driver ranking) would pick."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.analyze.descriptors import DescriptorTable
from toolkit.analyze.signals import SignalIndex, condense_cluster, condense_split, riders

N = 400


@pytest.fixture(scope="module")
def table() -> DescriptorTable:
    """Materials: 0-39 Tl(I) sulfides, 40-79 Pb(II) oxides (lone-pair cations), 80-119 phosphates
    (oxides with P), 120-159 iodides, 160-199 chlorides, 200-209 other sulfides, the rest plain oxides
    of other cations; the volume per atom follows the bond length."""
    rng = np.random.default_rng(0)
    i = np.arange(N)
    tl, pb, po4, iod, chl = (i < 40), (i >= 40) & (i < 80), (i >= 80) & (i < 120), (i >= 120) & (i < 160), \
        (i >= 160) & (i < 200)
    sulfide = tl | ((i >= 200) & (i < 210))
    oxide = pb | po4 | (i >= 210)
    bond = rng.normal(2.2, 0.2, N) + 0.6 * iod
    cols = {
        "oxidation:Tl+1": tl, "element:Tl": tl | (i == 399), "oxidation:Pb+2": pb, "element:Pb": pb,
        "cation_class:lone_pair_p": tl | pb, "anion:sulfide": sulfide, "anion:oxide": oxide,
        "element:P": po4, "polyanion:PO4": po4, "anion:iodide": iod, "anion:halide": iod | chl,
        "bond_length_mean": bond, "volume_per_atom": 8.0 * bond + rng.normal(0, 0.2, N),
        "cn_mean": rng.normal(5, 1, N),
    }
    names = list(cols)
    return DescriptorTable([f"m{k}" for k in range(N)], names,
                           np.column_stack([np.asarray(cols[n], dtype=np.float64) for n in names]))


def _entry(name: str, q: float, effect: float, in_cluster: float = 1.0, test: str = "fisher") -> dict:
    return {"descriptor": name, "q": q, "effect": effect, "in_cluster": in_cluster, "test": test}


def test_identity_folds_under_the_class_that_covers_the_cluster(table):
    idx = SignalIndex(table, table.names)
    ranked = [_entry("oxidation:Tl+1", 1e-30, 0.9), _entry("element:Tl", 1e-29, 0.9),
              _entry("anion:sulfide", 1e-28, 0.9), _entry("cation_class:lone_pair_p", 1e-20, 0.8),
              _entry("cn_mean", 0.5, 0.05, test="mannwhitney")]
    out = condense_cluster(idx, ranked, 0.05)
    heads = [e["descriptor"] for e in out]
    # one slot for "the Tl(I) cation", headed by its class; the anion keeps its own slot; nothing dropped
    assert heads == ["cation_class:lone_pair_p", "anion:sulfide", "cn_mean"]
    assert out[0]["covers"] == ["oxidation:Tl+1", "element:Tl"]
    assert out[0]["q"] == 1e-20  # the head keeps its own statistics
    assert "covers" not in out[2]  # not significant: left as tested


def test_specific_identity_stays_head_when_the_class_covers_less_of_the_cluster(table):
    idx = SignalIndex(table, table.names)
    ranked = [_entry("oxidation:Pb+2", 1e-30, 0.9, in_cluster=1.0),
              _entry("cation_class:lone_pair_p", 1e-10, 0.5, in_cluster=0.6)]
    out = condense_cluster(idx, ranked, 0.05)
    assert [e["descriptor"] for e in out] == ["oxidation:Pb+2"] and out[0]["covers"] == ["cation_class:lone_pair_p"]


def test_structural_unit_is_not_folded_into_the_anion(table):
    """Phosphates are oxides, but the PO4 unit is a finding of its own (classes of different families
    never nest); element:P is the same signal as PO4 here and folds under the class."""
    idx = SignalIndex(table, table.names)
    ranked = [_entry("element:P", 1e-30, 0.9), _entry("anion:oxide", 1e-12, 0.6), _entry("polyanion:PO4", 1e-11, 0.9)]
    out = condense_cluster(idx, ranked, 0.05)
    assert [e["descriptor"] for e in out] == ["polyanion:PO4", "anion:oxide"]
    assert out[0]["covers"] == ["element:P"]


def test_specific_class_of_one_family_heads(table):
    idx = SignalIndex(table, table.names)
    out = condense_cluster(idx, [_entry("anion:halide", 1e-20, 0.7), _entry("anion:iodide", 1e-15, 0.9)], 0.05)
    assert [e["descriptor"] for e in out] == ["anion:iodide"] and out[0]["covers"] == ["anion:halide"]


def test_rider_yields_to_the_cause_it_rides_with(table):
    drivers = {"onset": {"descriptors": [
        {"descriptor": "bond_length_mean", "importance": 0.4, "confounded_with": None},
        {"descriptor": "volume_per_atom", "importance": 0.05, "confounded_with": "bond_length_mean"}]},
        "peak_2": {"descriptors": [{"descriptor": "volume_per_atom", "importance": 0.01, "confounded_with": None}]}}
    assert riders(drivers) == {"volume_per_atom"}  # judged where it matters most (onset)
    ranked = [_entry("volume_per_atom", 1e-20, 0.8, test="mannwhitney"),
              _entry("bond_length_mean", 1e-18, 0.8, test="mannwhitney")]
    plain = condense_cluster(SignalIndex(table, table.names), ranked, 0.05)
    assert [e["descriptor"] for e in plain] == ["volume_per_atom"]  # correlated: one slot, first ranked heads
    out = condense_cluster(SignalIndex(table, table.names, riders(drivers)), ranked, 0.05)
    assert [e["descriptor"] for e in out] == ["bond_length_mean"] and out[0]["covers"] == ["volume_per_atom"]


def test_enriched_and_depleted_are_kept_apart_and_axes_never_mix(table):
    idx = SignalIndex(table, table.names)
    # every Tl compound here but one is a sulfide (Spearman 0.9): still two findings (cation vs anion axis)
    assert idx.corr[idx.index["element:Tl"], idx.index["anion:sulfide"]] > 0.8
    out = condense_cluster(idx, [_entry("element:Tl", 1e-20, 0.9), _entry("anion:sulfide", 1e-19, 0.9),
                                 _entry("anion:oxide", 1e-10, -0.8)], 0.05)
    assert [e["descriptor"] for e in out] == ["element:Tl", "anion:sulfide", "anion:oxide"]
    assert not any(e.get("covers") for e in out)


def test_split_sides_condense_separately(table):
    idx = SignalIndex(table, table.names)
    descs = [{"descriptor": "oxidation:Tl+1", "kind": "categorical", "direction": 7, "mean": [0.5, 0.0], "q": 1e-9},
             {"descriptor": "anion:oxide", "kind": "categorical", "direction": 8, "mean": [0.0, 0.9], "q": 1e-9},
             {"descriptor": "cation_class:lone_pair_p", "kind": "categorical", "direction": 7, "mean": [0.5, 0.1], "q": 1e-8},
             {"descriptor": "cn_mean", "kind": "continuous", "direction": 8, "mean": [4.0, 5.0], "q": 0.3}]
    out = condense_split(idx, descs, 0.05)
    assert [d["descriptor"] for d in out] == ["cation_class:lone_pair_p", "anion:oxide", "cn_mean"]
    assert out[0]["covers"] == ["oxidation:Tl+1"]


def test_one_signal_through_several_descriptors_is_one_entry(table):
    """halide -> iodide (nested, one family) and iodide ~ a correlated proxy: the proxy joins the group
    even when it is ranked before the descriptor that links it; the general class heads when the group's
    materials are not all of the specific class."""
    idx = SignalIndex(table, table.names)
    ranked = [_entry("anion:halide", 1e-20, 0.7, in_cluster=1.0), _entry("bond_length_mean", 1e-19, 0.6, test="mannwhitney"),
              _entry("anion:iodide", 1e-15, 0.4, in_cluster=0.5)]
    out = condense_cluster(idx, ranked, 0.05)
    assert [e["descriptor"] for e in out] == ["anion:halide", "bond_length_mean"]
    assert out[0]["covers"] == ["anion:iodide"]
    # a group linked only through a later entry: volume ~ bond length, bond length first seen after volume
    ranked = [_entry("volume_per_atom", 1e-20, 0.8, test="mannwhitney"), _entry("cn_mean", 1e-19, 0.3, test="mannwhitney"),
              _entry("bond_length_mean", 1e-18, 0.8, test="mannwhitney")]
    out = condense_cluster(idx, ranked, 0.05)
    assert [e["descriptor"] for e in out] == ["volume_per_atom", "cn_mean"] and out[0]["covers"] == ["bond_length_mean"]


def test_the_proxy_the_spectra_depend_on_heads(table):
    """Two correlated continuous descriptors, neither flagged as a rider: the one with the larger
    importance in the driver ranking heads (bond length over volume), whatever the cluster order."""
    from toolkit.analyze.signals import importances

    drivers = {"onset": {"descriptors": [{"descriptor": "bond_length_mean", "importance": 0.32},
                                         {"descriptor": "volume_per_atom", "importance": 0.02}]},
               "peak_1": {"descriptors": [{"descriptor": "volume_per_atom", "importance": 0.08}]}}
    imp = importances(drivers)
    assert imp == {"bond_length_mean": 0.32, "volume_per_atom": 0.08}
    ranked = [_entry("volume_per_atom", 1e-20, 0.8, test="mannwhitney"),
              _entry("bond_length_mean", 1e-18, 0.8, test="mannwhitney")]
    out = condense_cluster(SignalIndex(table, table.names, importance=imp), ranked, 0.05)
    assert [e["descriptor"] for e in out] == ["bond_length_mean"] and out[0]["covers"] == ["volume_per_atom"]
