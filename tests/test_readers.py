"""Readers on real files (../shared/data) and on small malformed files written into tmp_path."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from toolkit.config import load_config, ConfigError, DataConfig
from toolkit.data.readers import Source, open_source
from toolkit.data.records import Material, Reject, read_rejects, write_rejects
from toolkit.data.spectra import energy_grid, onset_energy


def _split(items) -> tuple[list[Material], list[Reject]]:
    items = list(items)
    return [m for m in items if isinstance(m, Material)], [r for r in items if isinstance(r, Reject)]


def _reasons(rejects: list[Reject]) -> dict[str, str]:
    return {r.record: r.reason for r in rejects}


ZNS = Structure(Lattice.cubic(5.41), ["Zn"] * 4 + ["S"] * 4,
                [[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0],
                 [.25, .25, .25], [.25, .75, .75], [.75, .25, .75], [.75, .75, .25]])
NACL = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
OVERLAP = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])  # 0.2 Å apart


# ---------------------------------------------------------------------------------------------- records

def test_rejects_file_round_trip(tmp_path: Path) -> None:
    rows = [Reject("a/b.vasp", "line 3 (b.vasp)", 'reason, with "quotes"'), Reject("x", "y", "z")]
    assert write_rejects(tmp_path / "prepare" / "rejects.csv", rows) == 2
    text = (tmp_path / "prepare" / "rejects.csv").read_text().splitlines()
    assert text[0] == "source_file,record,reason"
    assert read_rejects(tmp_path / "prepare" / "rejects.csv") == rows
    (tmp_path / "bad.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="not a rejects file"):
        read_rejects(tmp_path / "bad.csv")


# ---------------------------------------------------------------------------------------------- alignn

def test_alignn_sample_data_scalar_targets(shared_data: Path) -> None:
    src = open_source(DataConfig(source="alignn", path=shared_data / "alignn_sample" / "sample_data"))
    assert isinstance(src, Source)
    keys, rejects = src.scan()
    assert len(keys) == 50 and len(rejects) == 20  # 20 POSCARs without a row
    assert all("has no row" in r.reason for r in rejects)
    mats, bad = _split(src.load(keys))
    assert len(mats) == 50 and not bad
    assert all(m.spectrum is None and isinstance(m.properties["target"], float) for m in mats)
    assert mats[0].id == keys[0] and mats[0].formula == mats[0].structure.composition.reduced_formula
    assert src.metadata()["target_kind"] == "scalar"


def test_alignn_multi_column_table_needs_matching_grid(shared_data: Path) -> None:
    folder = shared_data / "alignn_sample" / "sample_data_multi_prop"
    with pytest.raises(ConfigError, match="300 values but data.grid.num is 1501"):
        open_source(DataConfig(source="alignn", path=folder)).scan()
    cfg = DataConfig(source="alignn", path=folder, transform="alpha", grid={"start": 0, "stop": 3, "num": 300})
    src = open_source(cfg)
    keys, rejects = src.scan()
    assert len(keys) == 50 and not rejects
    mats, _ = _split(src.load(keys[:3]))
    assert mats[0].spectrum.shape == (300,)


def _poscar(s: Structure) -> str:
    from pymatgen.io.vasp import Poscar

    return Poscar(s).get_str()


def test_alignn_study_format_and_every_malformed_case(shared_data: Path, tmp_path: Path) -> None:
    paper = sorted((shared_data / "paper_structures").glob("POSCAR_*.vasp"))[:4]
    for p in paper:
        (tmp_path / p.name).symlink_to(p)
    (tmp_path / "POSCAR_garbage.vasp").write_text("this is not\na POSCAR\n")
    (tmp_path / "POSCAR_overlap.vasp").write_text(_poscar(OVERLAP))
    (tmp_path / "POSCAR_norow.vasp").write_text(_poscar(NACL))
    rng = np.random.default_rng(1)
    rows = [np.round(np.maximum(2.0, 2.0 + rng.normal(2, 1, 1501)), 4) for _ in range(12)]
    rows[0][:5] = 1.5  # below the floor: raised to the floor
    fmt = lambda v: ",".join(f"{x:g}" for x in v)  # noqa: E731
    lines = [f"{p.name},{fmt(rows[i])}" for i, p in enumerate(paper)]
    lines += [
        f"POSCAR_garbage.vasp,{fmt(rows[4])}",
        f"POSCAR_overlap.vasp,{fmt(rows[5])}",
        f"{paper[0].name},{fmt(rows[6])}",  # duplicate id
        f"POSCAR_missing.vasp,{fmt(rows[7])}",  # no such file
        f"POSCAR_short.vasp,{fmt(rows[8][:1500])}",  # wrong width
        "POSCAR_nan.vasp," + fmt(np.r_[rows[9][:10], np.nan, rows[9][11:]]),
        "POSCAR_inf.vasp," + fmt(np.r_[rows[9][:10], np.inf, rows[9][11:]]),
        "POSCAR_neg.vasp," + fmt(np.r_[rows[9][:10], -1.0, rows[9][11:]]),
        "POSCAR_text.vasp," + fmt(rows[9][:1500]) + ",abc",
    ]
    (tmp_path / "id_prop.csv").write_text("\n".join(lines) + "\n")
    src = open_source(DataConfig(source="alignn", path=tmp_path))
    keys, rejects = src.scan()
    assert keys == [p.name for p in paper] + ["POSCAR_garbage.vasp", "POSCAR_overlap.vasp"]
    reasons = [r.reason for r in rejects]
    for expected in ["duplicate id", "does not exist", "1500 values, expected 1501", "non-finite", "non-finite",
                     "negative value", "is not a number", "has no row"]:
        assert any(expected in r for r in reasons), expected
    assert len(rejects) == 8
    worker = pickle.loads(pickle.dumps(src))  # what a worker process receives
    mats, bad = _split(worker.load(list(reversed(keys))))
    assert [m.id for m in mats] == [p.name for p in reversed(paper)]
    assert {r.record: r.reason.split(":")[0] for r in bad} == {
        "POSCAR_garbage.vasp": "unreadable structure file", "POSCAR_overlap.vasp": "overlapping atoms"}
    first = next(m for m in mats if m.id == paper[0].name)
    assert first.spectrum.dtype == np.float32 and first.spectrum.shape == (1501,)
    assert np.allclose(first.spectrum, np.maximum(rows[0], 2.0), atol=1e-4)
    assert first.provenance["n_floored"] == 5


def test_alignn_folder_without_table_is_a_config_error(shared_data: Path) -> None:
    with pytest.raises(ConfigError, match="id_prop"):
        open_source(DataConfig(source="alignn", path=shared_data / "paper_structures"))
    with pytest.raises(ConfigError, match="needs data.path"):  # the schema refuses it before any source opens
        load_config(None, ["data.source=alignn"])


# ---------------------------------------------------------------------------------------------- jsonl

def test_jsonl_structure_only_real_file(shared_data: Path) -> None:
    src = open_source(DataConfig(source="jsonl", path=shared_data / "mp_structures" / "mp_structures.jsonl"))
    keys, rejects = src.scan()
    assert len(keys) == 822 and not rejects
    mats, bad = _split(pickle.loads(pickle.dumps(src)).load(keys[-5:]))
    assert len(mats) == 5 and not bad and all(m.spectrum is None for m in mats)
    first = json.loads((shared_data / "mp_structures" / "mp_structures.jsonl").read_text().splitlines()[-5])
    assert mats[0].id == first["material_id"] and mats[0].formula == first["formula"]


def test_jsonl_spectra_and_malformed_lines(tmp_path: Path) -> None:
    grid = energy_grid()
    e_src = np.linspace(1.0, 10.0, 91)
    good = {"id": "zns", "structure": ZNS.as_dict(), "energy": e_src.tolist(), "alpha": (10 ** (2 + e_src / 2)).tolist(),
            "direct_gap": 3.6}
    lines = [
        json.dumps(good),
        json.dumps({"material_id": "nacl", "structure": NACL.as_dict(), "log10_alpha": (2 + grid / 3).tolist()}),
        json.dumps({"id": "plain", "structure": NACL.as_dict()}),
        "{not json",
        json.dumps({"structure": NACL.as_dict()}),
        json.dumps({"id": "zns", "structure": ZNS.as_dict()}),
        json.dumps({"id": "nostruct"}),
        json.dumps({"id": "len", "structure": NACL.as_dict(), "energy": [1, 2, 3], "alpha": [1, 2]}),
        json.dumps({"id": "neg", "structure": NACL.as_dict(), "energy": [1, 2, 3], "alpha": [1, -2, 3]}),
        json.dumps({"id": "nan", "structure": NACL.as_dict(), "energy": [1, 2, 3], "alpha": [1, float("nan"), 3]}),
        json.dumps({"id": "overlap", "structure": OVERLAP.as_dict()}),
        json.dumps({"id": "empty", "structure": Structure(Lattice.cubic(3), [], []).as_dict()}),
        json.dumps({"id": "broken", "structure": {"lattice": {"matrix": "x"}, "sites": 3}}),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    src = open_source(DataConfig(source="jsonl", path=path))
    keys, rejects = src.scan()
    assert keys == ["zns", "nacl", "plain", "overlap", "empty", "broken"]
    reasons = _reasons(rejects)
    assert "malformed JSON" in reasons["line 4"]
    assert "no id field" in reasons["line 5"]
    assert "duplicate id 'zns'" in reasons["line 6 (zns)"]
    assert "no 'structure'" in reasons["line 7 (nostruct)"]
    assert "'energy' has 3 values but 'alpha' has 2" in reasons["line 8 (len)"]
    assert "negative" in reasons["line 9 (neg)"]
    assert "non-finite" in reasons["line 10 (nan)"]
    mats, bad = _split(src.load(keys))
    assert [m.id for m in mats] == ["zns", "nacl", "plain"]
    assert {r.record: r.reason.split(":")[0] for r in bad} == {
        "line 11 (overlap)": "overlapping atoms", "line 12 (empty)": "empty cell", "line 13 (broken)": "unreadable structure"}
    zns = mats[0]
    inside = (grid >= 1.0) & (grid <= 10.0)
    assert np.isnan(zns.spectrum[~inside]).all() and np.isfinite(zns.spectrum[inside]).all()  # masked, not invented
    assert np.allclose(zns.spectrum[inside], 2 + grid[inside] / 2, atol=1e-5)
    assert zns.properties == {"direct_gap": 3.6}
    assert np.allclose(mats[1].spectrum, 2 + grid / 3, atol=1e-5) and mats[2].spectrum is None


# ---------------------------------------------------------------------------------------------- vasp

def test_vasp_loptics_nan_rows_and_dfpt(shared_data: Path, tmp_path: Path) -> None:
    jarvis = shared_data / "jarvis" / "jarvis"
    vdir = jarvis / "tests" / "testfiles" / "io" / "vasp"
    (tmp_path / "si").mkdir()
    (tmp_path / "si" / "vasprun.xml").symlink_to(jarvis / "examples/vasp/SiOptb88/MAIN-OPTICS-bulk@mp_149/vasprun.xml")
    for n in ("39", "42538"):
        (tmp_path / f"vasprun.xml.JVASP-{n}").symlink_to(vdir / f"vasprun.xml.JVASP-{n}")
    (tmp_path / "vasprun.xml.broken").write_text("<modeling><truncated")
    src = open_source(DataConfig(source="vasp", path=tmp_path))
    keys, rejects = src.scan()
    assert not rejects and len(keys) == 4
    mats, bad = _split(src.load(keys))
    assert {m.id for m in mats} == {"si", "JVASP-42538"}
    reasons = _reasons(bad)
    assert "LOPTICS is not set" in reasons["vasprun.xml.JVASP-39"] and "LEPSILON" in reasons["vasprun.xml.JVASP-39"]
    assert reasons["vasprun.xml.broken"].startswith("unreadable vasprun.xml")
    si = next(m for m in mats if m.id == "si")
    assert si.formula == "Si" and np.isfinite(si.spectrum).all()
    # Si (OptB88vdW, broadened): absorption reaches 10^4 /cm between 1 and 3 eV and ~10^6 above 4 eV
    assert 1.0 < onset_energy(energy_grid(), si.spectrum, 4.0) < 3.0 and si.spectrum.max() > 6.0
    ta = next(m for m in mats if m.id == "JVASP-42538")
    assert ta.formula == "Ta2CrNO5" and ta.provenance["nan_rows"] > 0
    masked = np.isnan(ta.spectrum)
    assert masked[0] and masked.sum() == ta.provenance["n_masked_grid_points"]
    assert np.isfinite(ta.spectrum[energy_grid() > 1.0]).all()


# ---------------------------------------------------------------------------------------------- jarvis

def _write_dft3d_zip(cache: Path, entries: list[dict]) -> None:
    """A small dft_3d zip in the exact layout jarvis-tools' figshare loader reads."""
    from jarvis.db.figshare import get_db_info

    tag = get_db_info()["dft_3d"][1]
    (cache / "jarvis").mkdir(parents=True)
    with zipfile.ZipFile(cache / "jarvis" / f"{tag}.zip", "w") as z:
        z.writestr(tag, json.dumps(entries))


def _entry(jid: str, s: Structure) -> dict:
    from jarvis.core.atoms import Atoms

    atoms = Atoms(lattice_mat=s.lattice.matrix.tolist(), coords=s.frac_coords.tolist(),
                  elements=[site.specie.symbol for site in s], cartesian=False)
    return {"jid": jid, "atoms": atoms.to_dict(), "formula": s.composition.reduced_formula,
            "optb88vdw_bandgap": 0.5, "mbj_bandgap": 1.2}


def test_jarvis_dft3d_cache_and_optics_pages(shared_data: Path, tmp_path: Path) -> None:
    si = Structure(Lattice([[0, 2.734, 2.734], [2.734, 0, 2.734], [2.734, 2.734, 0]]), ["Si", "Si"],
                   [[0, 0, 0], [0.25, 0.25, 0.25]])
    _write_dft3d_zip(tmp_path / "cache", [_entry("JVASP-1002", si), _entry("JVASP-7", NACL)])
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "JVASP-1002.xml").symlink_to(shared_data / "jarvis/jarvis/db/JVASP-1002.xml")
    (pages / "JVASP-7.xml").write_text("<basic_info><main_optics_semilocal/></basic_info>")
    (pages / "JVASP-99.xml").symlink_to(shared_data / "jarvis/jarvis/db/JVASP-1002.xml")
    cfg = DataConfig(source="jarvis", path=pages, cache_dir=tmp_path / "cache")
    src = open_source(cfg)
    keys, rejects = src.scan()
    assert keys == ["JVASP-7", "JVASP-1002"]
    assert _reasons(rejects) == {"JVASP-99": "no dft_3d entry for JVASP-99 (structure missing)"}
    mats, bad = _split(pickle.loads(pickle.dumps(src)).load(keys))
    assert [m.id for m in mats] == ["JVASP-1002"] and "no <main_optics_mbj>" in bad[0].reason
    si_m = mats[0]
    assert si_m.formula == "Si" and si_m.properties == {"direct_gap": 3.124, "indirect_gap": 1.277}
    assert np.isfinite(si_m.spectrum).all()
    semi = next(iter(open_source(cfg.model_copy(update={"jarvis_optics": "semilocal"})).load(["JVASP-1002"])))
    assert semi.properties == {"direct_gap": 2.615, "indirect_gap": 0.731}
    # TBmBJ opens the gap: its absorption onset lies above the semilocal one
    e = energy_grid()
    assert onset_energy(e, si_m.spectrum, 4.0) > onset_energy(e, semi.spectrum, 4.0)
    all_src = open_source(DataConfig(source="jarvis", cache_dir=tmp_path / "cache"))
    keys_all, _ = all_src.scan()
    assert keys_all == ["JVASP-7", "JVASP-1002"]
    assert all(m.spectrum is None for m in all_src.load(keys_all))


# ---------------------------------------------------------------------------------------------- refractiveindex

def test_read_refractiveindex_by_hand(shared_data: Path) -> None:
    from toolkit.data.readers.refractiveindex import read_refractiveindex

    path = shared_data / "refractiveindex/database/data/main/ZnS/nk/Querry.yml"
    ref = read_refractiveindex(path)
    import yaml

    rows = np.array(yaml.safe_load(path.read_text())["DATA"][0]["data"].split(), dtype=float).reshape(-1, 3)
    lam, k = rows[-1, 0], rows[-1, 2]  # the longest wavelength = the lowest energy
    assert ref.formula == "ZnS" and np.all(np.diff(ref.energy) >= 0)
    assert ref.energy[0] == pytest.approx(1.23984198 / lam)
    assert ref.alpha[0] == pytest.approx(4 * np.pi * k / (lam * 1e-4), rel=1e-9)


def test_refractiveindex_references_and_pairing(shared_data: Path, tmp_path: Path) -> None:
    from toolkit.data.readers.refractiveindex import load_references, match_references

    db = shared_data / "refractiveindex"
    refs, rejects = load_references(db)
    assert len(refs) + len(rejects) == 237
    assert sum("identically 0" in r.reason for r in rejects) == 12 and len(rejects) == 12
    matched = match_references(["ZnS", "Zn2S2", "NaCl"], refs)
    assert set(matched) == {"ZnS", "Zn2S2"} and len(matched["ZnS"]) == 3
    with pytest.raises(ConfigError, match="no crystal structure"):
        open_source(DataConfig(source="refractiveindex", path=db))
    structures = tmp_path / "s.jsonl"
    structures.write_text(json.dumps({"id": "zns", "structure": ZNS.as_dict()}) + "\n"
                          + json.dumps({"id": "nacl", "structure": NACL.as_dict()}) + "\n")
    src = open_source(DataConfig(source="refractiveindex", path=db / "database/data/main/ZnS", structures=structures))
    keys, rejects = src.scan()
    assert keys == ["zns"] and _reasons(rejects) == {"line 2 (nacl)": "no refractiveindex.info reference for formula NaCl"}
    (m,) = list(src.load(keys))
    assert m.formula == "ZnS" and m.provenance["reference"].endswith(".yml") and len(m.provenance["alternatives"]) == 2
    assert np.isfinite(m.spectrum).any() and m.spectrum.shape == (1501,)
