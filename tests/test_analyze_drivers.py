"""Driver ranking per spectral feature (toolkit.analyze.drivers) on synthetic data where the feature
is y = f(anion class) + g(cn_mean, differently within each anion class) + noise, and a distractor
(density) follows the anion class: the anion family ranks first, the distractor is flagged as riding
along with the anion (not ranked as a cause), and cn_mean, nearly invisible marginally, surfaces
first within the anion strata."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.analyze.descriptors import DescriptorTable
from toolkit.analyze.drivers import rank_drivers

NAMES = ["anion:oxide", "anion:sulfide", "anion:halide", "cn_mean", "density", "angle_MXM_mean", "element:Na"]


@pytest.fixture(scope="module")
def ranked():
    rng = np.random.default_rng(0)
    n = 1200
    cls = rng.integers(0, 3, n)
    cn = rng.uniform(2, 8, n)
    density = cls + rng.normal(0, 0.35, n)  # the distractor: follows the anion class, no effect of its own
    y = np.array([0.0, 2.5, 5.0])[cls] + np.array([1.0, -1.0, 0.0])[cls] * (cn - 5) + rng.normal(0, 0.3, n)
    vals = np.column_stack([np.eye(3)[cls], cn, density, rng.normal(size=n), rng.integers(0, 2, n), y, y + 0.1])
    vals[::50, 3] = np.nan  # missing descriptors are handled by the model
    table = DescriptorTable([f"m{i}" for i in range(n)], [*NAMES, "onset", "pred:onset"], vals)
    return rank_drivers(table, NAMES, seed=0), np.corrcoef(cn, y)[0, 1]


def test_dominant_family_and_model(ranked):
    out, _ = ranked
    assert set(out) == {"onset", "pred:onset"}
    d = out["onset"]
    assert d["model"]["r2_holdout"] > 0.9 and d["model"]["n"] == 1200
    assert d["families"][0]["family"] == "anion"
    assert d["descriptors"][0]["family"] == "anion" and d["descriptors"][0]["rank"] == 1
    keys = {"descriptor", "family", "importance", "importance_std", "conditional_importance", "confounded_with",
            "marginal", "rank", "conditioned_on", "within_strata_importance", "lead"}
    assert all(set(r) == keys for r in d["descriptors"])


def test_family_leads_come_first(ranked):
    """The anion's effect is split among its three columns; the second factor (cn_mean, coordination)
    is ranked second as its family's lead, ahead of the anion's other columns."""
    d = ranked[0]["onset"]
    fams = [f["family"] for f in d["families"]]
    assert fams[:2] == ["anion", "coordination"]
    top = d["descriptors"][:2]
    assert [r["family"] for r in top] == ["anion", "coordination"] and all(r["lead"] for r in top)
    assert top[1]["descriptor"] == "cn_mean"
    rest = [r for r in d["descriptors"] if r["rank"] is not None and not r["lead"]]
    assert [r["importance"] for r in rest] == sorted((r["importance"] for r in rest), reverse=True)
    assert [r["rank"] for r in d["descriptors"] if r["rank"] is not None] == list(range(1, 1 + len(rest) + sum(
        r["lead"] for r in d["descriptors"] if r["rank"] is not None)))


def test_distractor_rides_along_with_the_top_driver(ranked):
    d = ranked[0]["onset"]
    row = {r["descriptor"]: r for r in d["descriptors"]}
    dens = row["density"]
    assert abs(dens["marginal"]) > 0.5  # strongly associated marginally ...
    assert dens["confounded_with"] is not None and dens["confounded_with"].startswith("anion:")  # ... but rides along
    assert dens["rank"] is None and d["confounded"] == ["density"]
    assert all(row[n]["confounded_with"] is None for n in ("anion:oxide", "anion:halide", "cn_mean"))


def test_secondary_driver_surfaces_within_strata(ranked):
    d, rho = ranked[0]["onset"], ranked[1]
    assert abs(rho) < 0.2  # cn_mean is nearly invisible marginally
    st = d["strata"]
    assert st["family"] == "anion" and len(st["strata"]) == 3 and st["n"] == 1200
    assert next(iter(st["importance"])) == "cn_mean" and st["families"][0]["family"] == "coordination"
    row = {r["descriptor"]: r for r in d["descriptors"]}
    assert row["cn_mean"]["within_strata_importance"] > 10 * max(abs(row[n]["within_strata_importance"])
                                                                for n in ("density", "angle_MXM_mean", "element:Na"))


def test_too_few_materials_is_reported():
    table = DescriptorTable(["a", "b", "c"], ["cn_mean", "onset"], np.array([[1.0, 2.0], [2.0, 3.0], [3.0, np.nan]]))
    out = rank_drivers(table, ["cn_mean"])
    assert out["onset"]["model"] is None and "materials" in out["onset"]["reason"]
