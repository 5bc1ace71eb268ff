"""The embedded ground-truth benchmark (toolkit.data.benchmark): determinism, truth, noise model."""

from __future__ import annotations

import re

import numpy as np
import pytest

from toolkit.config import DataConfig, PipelineConfig
from toolkit.data import benchmark as bm
from toolkit.data.readers import open_source
from toolkit.data.readers.common import structure_problem
from toolkit.data.records import Material
from toolkit.data.spectra import energy_grid, spectral_descriptors

N = 220


@pytest.fixture(scope="module")
def cfg() -> DataConfig:
    return DataConfig(source="benchmark", benchmark={"n_materials": N, "seed": 7, "noise": 0.05})


@pytest.fixture(scope="module")
def materials(cfg: DataConfig) -> list[Material]:
    src = open_source(cfg)
    keys, rejects = src.scan()
    assert keys[0] == "bench-00000" and len(keys) == N and not rejects
    return list(src.load(keys))


def test_any_subset_any_order_is_identical(cfg: DataConfig, materials: list[Material]) -> None:
    src = open_source(cfg)
    again = list(src.load(["bench-00150", "bench-00003"]))
    for m, ref in zip(again, (materials[150], materials[3])):
        assert m.id == ref.id and m.formula == ref.formula
        assert np.array_equal(m.spectrum, ref.spectrum)
        assert np.array_equal(m.structure.cart_coords, ref.structure.cart_coords)
        assert m.properties == ref.properties
    other = next(iter(open_source(cfg.model_copy(update={"benchmark": cfg.benchmark.model_copy(
        update={"seed": 8})})).load(["bench-00003"])))
    assert not np.array_equal(other.spectrum, materials[3].spectrum)
    bad = list(src.load(["nonsense"]))
    assert bad[0].reason.startswith("not a benchmark key")


def test_structures_are_valid_and_varied(materials: list[Material]) -> None:
    assert all(structure_problem(m.structure, 0.5) is None for m in materials)
    props = [m.properties for m in materials]
    assert len({p["prototype"] for p in props}) == len(bm.prototypes())
    assert {p["anion"] for p in props} == set(bm.ONSET_ANION)
    assert {p["coordination"] for p in props} == set(bm.EDGE_WIDTH)
    assert len({m.formula for m in materials}) > N // 2
    for m in materials:
        # formula is charge balanced with the planted oxidation states
        ox = {el: q for (el, q) in bm.CATIONS if el in m.structure.composition.as_dict()}
        assert m.properties["cation"] in ox
        s = m.structure
        cat = [i for i, site in enumerate(s) if site.specie.symbol == m.properties["cation"]]
        an = [i for i, site in enumerate(s) if site.specie.symbol == m.properties["anion_element"]]
        # planted bond lengths = the structure's (± the 0.01 Å displacements): shortest active-cation–anion
        # distance, and the mean first-shell cation–anion bond over all cations
        assert s.distance_matrix[np.ix_(cat, an)].min() == pytest.approx(m.properties["bond_length_active"], abs=0.08)
        roles = tuple("X" if site.specie.symbol == m.properties["anion_element"] else "A" for site in s)
        assert bm._mean_bond(s, roles) == pytest.approx(m.properties["bond_length_mean"], abs=0.03)


def test_onset_follows_the_documented_rule_and_range(cfg: DataConfig, materials: list[Material]) -> None:
    e = energy_grid()
    onsets = np.array([m.properties["onset"] for m in materials])
    assert onsets.min() < 2.0 and onsets.max() > 7.0  # wide range (about 1-8 eV)
    for m in materials[:40]:
        p = m.properties
        shifts = [bm.ONSET_CATION[bm.cation_class(el, ox)] for (el, ox) in bm.CATIONS
                  if el in m.structure.composition.as_dict() and bm.cation_class(el, ox) == p["cation_class"]]
        assert shifts and (p["cation_shift"] == shifts[0] or p["prototype"] in ("perovskite", "spinel"))
        e0 = bm.onset_rule(p["anion"], p["cation_shift"], p["bond_length_mean"])
        assert p["onset_param"] == pytest.approx(e0)
        clean = bm.clean_spectrum(e, e0, p["coordination"], p["anion"])
        d = spectral_descriptors(e, clean, threshold=cfg.onset_threshold, log_floor=cfg.log_floor)
        assert p["onset"] == pytest.approx(d["onset"]) and abs(d["onset"] - e0) < 0.02
        assert p["peak_1"] == pytest.approx(e0 + bm.PEAK1_OFFSET[p["coordination"]], abs=0.05)
        noisy = spectral_descriptors(e, m.spectrum, threshold=cfg.onset_threshold, log_floor=cfg.log_floor)
        assert abs(noisy["onset"] - p["onset"]) < 0.25  # the noisy onset (first crossing) still tracks the planted one


def test_noise_is_gaussian_with_the_documented_floor(cfg: DataConfig, materials: list[Material]) -> None:
    e = energy_grid()
    resid = np.concatenate([
        m.spectrum - bm.clean_spectrum(e, m.properties["onset_param"], m.properties["coordination"],
                                       m.properties["anion"]) for m in materials])
    assert abs(resid.std() - 0.05) < 0.002 and abs(resid.mean()) < 0.002
    assert np.mean(np.abs(resid)) == pytest.approx(bm.noise_floor(0.05), rel=0.02)
    assert bm.noise_floor(0.05) == pytest.approx(0.05 * np.sqrt(2 / np.pi))
    assert bm.noise_floor(0.0) == 0.0


def test_truth_uses_architecture_descriptor_names(cfg: DataConfig) -> None:
    truth = bm.benchmark_truth(PipelineConfig(data=cfg))
    assert truth == bm.benchmark_truth(cfg)
    families = {"element", "anion", "cation_class", "coordination", "spacegroup", "crystal_system", "oxidation"}
    continuous = {"cn_mean", "bond_length_mean", "bond_length_min", "angle_XMX_mean", "angle_MXM_mean", "density",
                  "volume_per_atom", "electronegativity_diff", "onset", "edge_integral", "peak_1", "peak_2"}
    assert set(truth["features"]) <= continuous
    for feat in truth["features"].values():
        for name in feat["drivers"]:
            fam = re.match(r"^([a-z_]+):\*$", name)
            assert (fam and fam.group(1) in families) or name in continuous, name
    assert truth["features"]["onset"]["drivers"] == ["anion:*", "cation_class:*", "bond_length_mean"]
    assert truth["noise_floor"] == pytest.approx(bm.noise_floor(0.05))
    assert set(truth["factors"]) == set(bm.FACTORS)
    import json

    json.dumps(truth)  # storable as Zarr attributes


def test_transform_alpha_and_scale_keys() -> None:
    c = DataConfig(transform="alpha", benchmark={"n_materials": 100_000, "noise": 0.0})
    src = open_source(c)
    keys, _ = src.scan()
    assert len(keys) == 100_000 and keys[-1] == "bench-99999"
    (m,) = list(src.load(["bench-99999"]))
    assert m.spectrum.min() >= 100.0 * 0.999  # α floored at 10^2 cm^-1, noise-free
    assert bm.index_of(bm.key_of(123456)) == 123456
