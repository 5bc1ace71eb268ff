"""analyze.compare_experiment: a run whose materials include formulas measured in the
refractiveindex.info data (../shared/data/refractiveindex) gets a "predicted vs measured" section in
its report, with the table, the measured energy ranges and one figure per match (issue 17, item 4)."""

from __future__ import annotations

import csv
import shutil

import pytest
from conftest import untrained_checkpoint

from toolkit import analyze, embed
from toolkit.config import load_config
from toolkit.data import prepare

STRUCTURES = ("Al2O3_mp-1143", "As2Se3_mp-1078443", "AlPO4_mp-7848", "Ag2SO4_mp-5625", "Ag2CO3_mp-4691",
              "AgNO3_mp-552185", "Al2CdS4_mp-9993", "Al2CdSe4_mp-3807")


@pytest.mark.slow  # prepare + embed + analyze of 8 real structures, ~40 s on 2 cores
def test_report_compares_predictions_with_measured_spectra(tmp_path, shared_data):
    from toolkit.data.readers.refractiveindex import load_references

    folder = tmp_path / "poscars"
    folder.mkdir()
    for n in STRUCTURES:
        shutil.copy(shared_data / "paper_structures" / f"POSCAR_{n}.vasp", folder)
    ri = shared_data / "refractiveindex"
    run = tmp_path / "run"
    cfg = load_config(None, {
        "data": {"source": "realbench", "realbench": {"mp": False, "paths": [str(folder)]}, "grid": {"num": 301},
                 "workers": 1},
        "model": {"alignn_layers": 1, "gcn_layers": 1, "hidden_features": 16, "embedding_features": 8},
        "embed": {"workers": 1, "checkpoint": str(tmp_path / "best.pt")},
        "analyze": {"workers": 1, "compare_experiment": str(ri), "n_clusters": 2, "permutation_repeats": 1,
                    "probe_folds": 2, "drivers": False, "chemiscope": False}})
    prepare.run(cfg, run)
    untrained_checkpoint(cfg, run, tmp_path / "best.pt")
    embed.run(cfg, run)
    analyze.run(cfg, run)
    rows = list(csv.DictReader((run / "analyze" / "experiment" / "comparison.csv").open()))
    refs, _ = load_references(ri)
    measured = {r.formula for r in refs}
    assert {r["formula"] for r in rows} == {"Al2O3", "As2Se3"} <= measured  # the matched formulas, no others
    assert all(float(r["measured_min_eV"]) < float(r["measured_max_eV"]) for r in rows)
    page = (run / "analyze" / "report" / "index.html").read_text()
    section = page.split('id="experiment"', 1)[1].split("<h2 id=", 1)[0]
    assert "<table" in section and "Al2O3" in section and "As2Se3" in section
    assert section.count("data:image/png;base64,") == len({r["id"] for r in rows})  # one figure per matched material
    # re-rendered (explain finishing later) from the saved fragment: the section survives
    analyze.rerender_report(run)
    again = (run / "analyze" / "report" / "index.html").read_text()
    assert again.split('id="experiment"', 1)[1].split("<h2 id=", 1)[0] == section
