"""Bad input never breaks a run nor reads outside the data folder (readers hardening).

Each test reproduces one defect of the ALIGNN / JSON Lines readers: path traversal in id_prop.csv,
one bad first row deciding the table width, encoding (BOM, non-UTF-8 bytes), per-record JSONL errors
raised out of ``load``, spectra with no point on the grid, invalid gaps, and reject reasons whose
kind (the text before the first colon) carries record-specific text so that counts do not group.
Every reject seen here goes through :func:`check_kinds`."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from toolkit.config import ConfigError, DataConfig, load_config
from toolkit.data.readers import open_source
from toolkit.data.records import Material, Reject

NACL = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
KCL = Structure(Lattice.cubic(6.29), ["K", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
GRID = {"start": 0.0, "stop": 4.9, "num": 50}  # small spectra: 50 values a row


def kind(reason: str) -> str:
    """The grouping key prepare uses for rejects_by_reason."""
    return reason.split(":", 1)[0].strip()


def check_kinds(rejects: list[Reject]) -> None:
    """Every reason is '<fixed kind>: <specifics>': the kind has no digits, quotes, paths or ids."""
    for r in rejects:
        assert ": " in r.reason, r
        k = kind(r.reason)
        assert k and not re.search(r"[0-9'\"/\\]", k), r
        assert r.record not in k, r
        assert Path(r.source_file).name not in k, r


def split(items) -> tuple[list[Material], list[Reject]]:
    items = list(items)
    mats = [m for m in items if isinstance(m, Material)]
    rejects = [r for r in items if isinstance(r, Reject)]
    assert len(mats) + len(rejects) == len(items)
    check_kinds(rejects)
    return mats, rejects


def scan(src) -> tuple[list[str], list[Reject]]:
    keys, rejects = src.scan()
    check_kinds(rejects)
    return keys, rejects


def by_record(rejects: list[Reject]) -> dict[str, str]:
    return {r.record: r.reason for r in rejects}


def poscar(s: Structure) -> str:
    from pymatgen.io.vasp import Poscar

    return Poscar(s).get_str()


def alignn_cfg(folder: Path, **over) -> DataConfig:
    return DataConfig(source="alignn", path=folder, **over)


def row(name: str, values) -> str:
    return name + "," + ",".join(f"{v:g}" for v in values)


# --------------------------------------------------------------------------- opened-files recorder

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


class opened_files:
    """Context manager recording every file path opened (builtins.open, io.open, os.open)."""

    def __enter__(self) -> list[str]:
        global _OPENED
        _OPENED = []
        return _OPENED

    def __exit__(self, *exc) -> None:
        global _OPENED
        _OPENED = None


# --------------------------------------------------------------------------- 1. path traversal

def test_alignn_names_outside_the_folder_are_rejected_and_never_opened(tmp_path: Path) -> None:
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    (data / "POSCAR_in.vasp").write_text(poscar(NACL))
    (data / "sub").mkdir()
    (data / "sub" / "POSCAR_nested.vasp").write_text(poscar(KCL))
    (outside / "x.vasp").write_text(poscar(KCL))  # would parse as a valid POSCAR
    (data / "linkdir").symlink_to(outside, target_is_directory=True)
    names = ["POSCAR_in.vasp", "sub/POSCAR_nested.vasp", "../outside/x.vasp", str(outside / "x.vasp"),
             "/etc/passwd", "linkdir/x.vasp", "sub/../../outside/x.vasp", "./sub/../POSCAR_in.vasp"]
    (data / "id_prop.csv").write_text("".join(row(n, [i + 1.0]) + "\n" for i, n in enumerate(names)))
    src = open_source(alignn_cfg(data))
    root = os.path.realpath(data)
    with opened_files() as opened:
        keys, rejects = scan(src)
        mats, bad = split(src.load(keys + ["../outside/x.vasp", "/etc/passwd"]))  # keys from a tampered plan
    assert keys == ["POSCAR_in.vasp", "sub/POSCAR_nested.vasp"]
    assert [m.id for m in mats] == keys and [m.properties["target"] for m in mats] == [1.0, 2.0]
    reasons = by_record(rejects)
    for i, n in enumerate(names[2:7], start=3):
        assert kind(reasons[f"line {i} ({n})"]) == "outside data folder", (n, reasons)
    # the same file named twice (through '.' and '..' inside the folder) is a duplicate, not a second material
    assert kind(reasons["line 8 (./sub/../POSCAR_in.vasp)"]) == "duplicate record"
    assert len(rejects) == 6
    assert [kind(r.reason) for r in bad] == ["outside data folder", "outside data folder"]
    assert str(data / "id_prop.csv") in opened and str(data / "POSCAR_in.vasp") in opened  # the recorder works
    assert all(os.path.realpath(p).startswith(root + os.sep) for p in opened if str(tmp_path) in p), opened
    assert not any(p == "/etc/passwd" or p.startswith(str(outside)) for p in opened), opened


def test_alignn_symlinked_structure_files_in_the_folder_stay_valid(tmp_path: Path, shared_data: Path) -> None:
    # The folder's own entries may be links to a shared store (the study layout); only the names in
    # the table are confined: no '..', no absolute path, no directory that resolves elsewhere.
    paper = sorted((shared_data / "paper_structures").glob("POSCAR_*.vasp"))[:2]
    for p in paper:
        (tmp_path / p.name).symlink_to(p)
    (tmp_path / "id_prop.csv").write_text("".join(row(p.name, [1.5]) + "\n" for p in paper))
    src = open_source(alignn_cfg(tmp_path))
    keys, rejects = scan(src)
    assert keys == [p.name for p in paper] and not rejects
    mats, bad = split(src.load(keys))
    assert len(mats) == 2 and not bad


# --------------------------------------------------------------------------- 2. table width

def _spectra_folder(tmp_path: Path, first: list[float], n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    names = [f"POSCAR_{i}.vasp" for i in range(n + 1)]
    for i, name in enumerate(names):
        (tmp_path / name).write_text(poscar(NACL if i % 2 else KCL))
    lines = [row(names[0], first)] + [row(nm, np.round(2 + rng.random(GRID["num"]), 3)) for nm in names[1:]]
    (tmp_path / "id_prop.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_alignn_one_value_first_row_does_not_reject_every_spectrum(tmp_path: Path) -> None:
    src = open_source(alignn_cfg(_spectra_folder(tmp_path, [3.0]), grid=GRID))
    keys, rejects = scan(src)
    assert keys == ["POSCAR_1.vasp", "POSCAR_2.vasp", "POSCAR_3.vasp"]
    assert [(r.record, kind(r.reason)) for r in rejects] == [("line 1 (POSCAR_0.vasp)", "wrong number of values")]
    assert "row has 1 values, expected 50" in rejects[0].reason
    assert src.metadata()["target_kind"] == "spectrum" and src.metadata()["values_per_row"] == 50
    mats, bad = split(src.load(keys))
    assert not bad and all(m.spectrum.shape == (50,) for m in mats)


def test_alignn_short_first_row_is_a_reject_not_a_config_error(tmp_path: Path) -> None:
    src = open_source(alignn_cfg(_spectra_folder(tmp_path, [2.5] * 49), grid=GRID))
    keys, rejects = scan(src)  # raised ConfigError "rows have 49 values" before
    assert len(keys) == 3 and [kind(r.reason) for r in rejects] == ["wrong number of values"]
    assert "49 values, expected 50" in rejects[0].reason


def test_alignn_scalar_table_width_is_the_majority(tmp_path: Path) -> None:
    names = [f"POSCAR_{i}.vasp" for i in range(5)]
    for name in names:
        (tmp_path / name).write_text(poscar(NACL))
    vals = [[1.0, 2.0], [1.5], [2.5], [3.5], [4.0, 5.0, 6.0]]
    (tmp_path / "id_prop.csv").write_text("".join(row(n, v) + "\n" for n, v in zip(names, vals)))
    src = open_source(alignn_cfg(tmp_path, grid=GRID))
    keys, rejects = scan(src)
    assert keys == names[1:4]
    assert [(r.record, kind(r.reason)) for r in rejects] == [
        ("line 1 (POSCAR_0.vasp)", "wrong number of values"), ("line 5 (POSCAR_4.vasp)", "wrong number of values")]
    assert src.metadata()["target_kind"] == "scalar"
    mats, _ = split(src.load(keys))
    assert [m.properties["target"] for m in mats] == [1.5, 2.5, 3.5]


def test_alignn_table_whose_majority_misses_the_grid_is_still_a_config_error(tmp_path: Path) -> None:
    folder = _spectra_folder(tmp_path, [2.5] * 50)
    with pytest.raises(ConfigError, match="50 values but data.grid.num is 1501"):
        open_source(alignn_cfg(folder)).scan()


# --------------------------------------------------------------------------- 3. encoding

def _scalar_folder(tmp_path: Path, n: int = 3) -> list[str]:
    names = [f"POSCAR_{i}.vasp" for i in range(n)]
    for name in names:
        (tmp_path / name).write_text(poscar(NACL))
    return names


def test_alignn_table_with_a_utf8_bom(tmp_path: Path) -> None:
    names = _scalar_folder(tmp_path)
    (tmp_path / "id_prop.csv").write_bytes(b"\xef\xbb\xbf" + "".join(row(n, [1.0]) + "\n" for n in names).encode())
    keys, rejects = scan(open_source(alignn_cfg(tmp_path)))
    assert keys == names and not rejects


def test_alignn_non_utf8_byte_is_a_reject_naming_its_line(tmp_path: Path) -> None:
    names = _scalar_folder(tmp_path)
    text = [row(n, [1.0 + i]).encode() for i, n in enumerate(names)]
    text[1] = text[1].replace(b",", b"\xff,", 1)  # "POSCAR_1.vasp\xff,2"
    (tmp_path / "id_prop.csv").write_bytes(b"\r\n".join(text) + b"\r\n")
    src = open_source(alignn_cfg(tmp_path))
    keys, rejects = scan(src)  # raised UnicodeDecodeError before
    assert keys == [names[0], names[2]]
    assert [(r.record, kind(r.reason)) for r in rejects] == [("line 2", "undecodable line"),
                                                             ("POSCAR_1.vasp", "no row")]
    assert "UTF-8" in rejects[0].reason
    mats, bad = split(src.load(keys))
    assert [m.properties["target"] for m in mats] == [1.0, 3.0] and not bad


def test_jsonl_non_utf8_line_and_bom(tmp_path: Path) -> None:
    lines = [json.dumps({"id": f"m{i}", "structure": NACL.as_dict()}).encode() for i in range(3)]
    lines[1] = lines[1].replace(b'"m1"', b'"m\xe91"')
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    src = open_source(DataConfig(source="jsonl", path=path))
    keys, rejects = scan(src)  # raised UnicodeDecodeError before
    assert keys == ["m0", "m2"] and [(r.record, kind(r.reason)) for r in rejects] == [("line 2", "undecodable line")]
    mats, bad = split(src.load(keys))
    assert [m.id for m in mats] == keys and not bad


# --------------------------------------------------------------------------- 4. JSON Lines records

def _jsonl(tmp_path: Path, recs: list[dict], name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_jsonl_invalid_gaps_are_rejects(tmp_path: Path) -> None:
    recs = [{"id": "ok", "structure": NACL.as_dict(), "direct_gap": 5.0, "indirect_gap": None},
            {"id": "na", "structure": NACL.as_dict(), "direct_gap": "n/a"},
            {"id": "neg", "structure": NACL.as_dict(), "indirect_gap": -0.5},
            {"id": "nan", "structure": NACL.as_dict(), "direct_gap": math.nan},
            {"id": "inf", "structure": NACL.as_dict(), "direct_gap": math.inf},
            {"id": "list", "structure": NACL.as_dict(), "direct_gap": [1.0]},
            {"id": "bool", "structure": NACL.as_dict(), "direct_gap": True},
            {"id": "ok2", "structure": KCL.as_dict(), "indirect_gap": 0}]
    src = open_source(DataConfig(source="jsonl", path=_jsonl(tmp_path, recs)))
    keys, rejects = scan(src)
    assert keys == ["ok", "ok2"]
    assert {r.record: kind(r.reason) for r in rejects} == {
        f"line {i} ({r['id']})": "invalid gap" for i, r in enumerate(recs, start=1) if r["id"] not in ("ok", "ok2")}
    # load() of any key, valid or not, yields one item per key and never raises
    mats, bad = split(src.load([r["id"] for r in recs]))
    assert [m.id for m in mats] == ["ok", "ok2"] and len(bad) == 6
    assert mats[0].properties == {"direct_gap": 5.0} and mats[1].properties == {"indirect_gap": 0.0}


def test_jsonl_spectrum_without_a_grid_point_is_a_reject(tmp_path: Path) -> None:
    e_in, e_out = [0.95, 2.0, 3.05], [20.0, 21.0, 22.0]
    recs = [{"id": "in", "structure": NACL.as_dict(), "energy": e_in, "alpha": [1e3, 1e4, 1e5]},
            {"id": "out", "structure": NACL.as_dict(), "energy": e_out, "alpha": [1e3, 1e4, 1e5]},
            {"id": "between", "structure": NACL.as_dict(), "energy": [1.01, 1.02], "alpha": [1e3, 1e4]},
            {"id": "overflow", "structure": NACL.as_dict(), "energy": e_in, "log10_alpha": [2, 400, 3]}]
    src = open_source(DataConfig(source="jsonl", path=_jsonl(tmp_path, recs), grid=GRID))
    keys, rejects = scan(src)
    assert keys == ["in"]
    assert {r.record: kind(r.reason) for r in rejects} == {
        "line 2 (out)": "spectrum outside grid", "line 3 (between)": "spectrum outside grid",
        "line 4 (overflow)": "non-finite values"}
    mats, bad = split(src.load(["in", "out"]))
    assert [m.id for m in mats] == ["in"] and np.isfinite(mats[0].spectrum).sum() == 21
    assert [kind(r.reason) for r in bad] == ["not a valid record"]


def test_jsonl_errors_at_load_time_are_rejects(tmp_path: Path) -> None:
    recs = [{"id": f"m{i}", "structure": NACL.as_dict()} for i in range(4)]
    path = _jsonl(tmp_path, recs)
    src = open_source(DataConfig(source="jsonl", path=path))
    keys, _ = scan(src)
    # the file changes between the plan and a part: line 2 becomes garbage, line 3 another record
    lines = path.read_text().splitlines()
    lines[1] = "{" + " " * (len(lines[1]) - 1)
    lines[2] = json.dumps({"id": "mX", "structure": NACL.as_dict()}).ljust(len(lines[2]))
    path.write_text("\n".join(lines) + "\n")
    mats, bad = split(src.load(keys))  # raised JSONDecodeError before
    assert [m.id for m in mats] == ["m0", "m3"]
    assert [(r.record, kind(r.reason)) for r in bad] == [("line 2 (m1)", "malformed JSON"),
                                                         ("line 3 (m2)", "changed record")]


def test_prepare_part_with_a_bad_gap_stores_the_valid_records(tmp_path: Path, shared_data: Path) -> None:
    from toolkit.data import prepare, store

    lines = (shared_data / "mp_structures" / "mp_structures.jsonl").read_text().splitlines()[:8]
    bad = json.loads(lines[3])
    bad["direct_gap"] = "n/a"
    lines[3] = json.dumps(bad)
    src = tmp_path / "gaps.jsonl"
    src.write_text("\n".join(lines) + "\n")
    sets = {"data.source": "jsonl", "data.path": str(src), "data.workers": 1, "data.shard_size": 8}
    summary = prepare.run(load_config(None, [f"{k}={v}" for k, v in sets.items()]), tmp_path / "run")
    assert summary["n_materials"] == 7 and summary["rejects_by_reason"] == {"invalid gap": 1}
    ids = [json.loads(x)["material_id"] for x in lines]
    assert [str(x) for x in store.DatasetReader(tmp_path / "run" / "dataset.zarr").ids] == ids[:3] + ids[4:]


# --------------------------------------------------------------------------- 5. reason kinds group

def test_reason_kinds_group_across_readers(tmp_path: Path) -> None:
    """The malformed cases of every reader: each reason is '<fixed kind>: <specifics>'."""
    a = tmp_path / "alignn"
    a.mkdir()
    for n in ("POSCAR_a.vasp", "POSCAR_norow.vasp", "POSCAR_garbage.vasp"):
        (a / n).write_text(poscar(NACL) if n != "POSCAR_garbage.vasp" else "not\na POSCAR\n")
    (a / "POSCAR_overlap.vasp").write_text(poscar(Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])))
    rows = ["POSCAR_a.vasp,1", "POSCAR_a.vasp,2", "POSCAR_missing.vasp,1", ",1", "POSCAR_x.vasp", "POSCAR_y.vasp,abc",
            "POSCAR_z.vasp,nan", "POSCAR_w.vasp,-1", "POSCAR_v.vasp,1,2", "../POSCAR_a.vasp,1", "POSCAR_garbage.vasp,1",
            "POSCAR_overlap.vasp,1"]
    (a / "id_prop.csv").write_text("\n".join(rows) + "\n")
    src = open_source(alignn_cfg(a))
    keys, rejects = scan(src)
    _, bad = split(src.load(keys + ["nope.vasp"]))
    kinds = {kind(r.reason) for r in rejects + bad}
    assert kinds == {"duplicate record", "missing file", "empty file name", "no values", "not a number",
                     "non-finite values", "negative values", "wrong number of values", "outside data folder", "no row",
                     "unreadable structure file", "overlapping atoms", "no valid row"}

    empty = Structure(Lattice.cubic(3), [], []).as_dict()
    recs = ["{bad", "[1, 2]", json.dumps({"structure": NACL.as_dict()}), json.dumps({"id": [1], "structure": {}}),
            json.dumps({"id": "s"}), json.dumps({"id": "e", "structure": NACL.as_dict(), "energy": [1, 2]}),
            json.dumps({"id": "b", "structure": NACL.as_dict(), "alpha": [1] * 1501, "log10_alpha": [1] * 1501}),
            json.dumps({"id": "t", "structure": NACL.as_dict(), "alpha": "x"}),
            json.dumps({"id": "w", "structure": NACL.as_dict(), "alpha": [1, 2, 3]}),
            json.dumps({"id": "l", "structure": NACL.as_dict(), "energy": [1, 2], "alpha": [1, 2, 3]}),
            json.dumps({"id": "empty", "structure": empty}), json.dumps({"id": "broken", "structure": {"sites": 3}}),
            json.dumps({"id": "broken", "structure": NACL.as_dict()})]
    path = tmp_path / "j.jsonl"
    path.write_text("\n".join(recs) + "\n")
    src = open_source(DataConfig(source="jsonl", path=path))
    keys, rejects = scan(src)
    _, bad = split(src.load(keys))
    kinds = {kind(r.reason) for r in rejects + bad}
    assert kinds == {"malformed JSON", "not a JSON object", "no id field", "invalid id", "missing structure",
                     "incomplete spectrum", "conflicting spectrum fields", "invalid spectrum", "wrong number of values",
                     "length mismatch", "empty cell", "unreadable structure", "duplicate record"}

    v = tmp_path / "vasp"
    (v / "x").mkdir(parents=True)
    (v / "x" / "vasprun.xml").write_text("<modeling><truncated")
    (v / "vasprun.xml.x").write_text("<modeling><truncated")
    src = open_source(DataConfig(source="vasp", path=v))
    keys, rejects = scan(src)
    _, bad = split(src.load(keys))
    assert [kind(r.reason) for r in rejects + bad] == ["duplicate record", "unreadable vasprun.xml"]

    ri = tmp_path / "ri" / "data" / "main"
    zero_k = "DATA:\n  - type: tabulated nk\n    data: |\n      0.5 2.0 0.0\n      0.6 2.1 0.0\n"
    not_formula = "DATA:\n  - type: tabulated k\n    data: |\n      0.5 0.1\n      0.6 0.2\n"
    for material, text in [("ZnS", zero_k), ("GaAs", "DATA: [oops"), ("BK7_glass", not_formula)]:
        (ri / material / "nk").mkdir(parents=True)
        (ri / material / "nk" / "Someone.yml").write_text(text)
    from toolkit.data.readers.refractiveindex import load_references

    refs, rejects = load_references(tmp_path / "ri")
    check_kinds(rejects)
    assert not refs and sorted(kind(r.reason) for r in rejects) == [
        "no absorption data", "not a chemical formula", "unusable refractiveindex page"]


def test_reject_counts_group_by_kind_without_record_names():
    from toolkit.data.prepare import _reason_kind

    assert _reason_kind("no dft_3d entry for JVASP-99 (structure missing)", "JVASP-99") == \
        _reason_kind("no dft_3d entry for JVASP-7 (structure missing)", "JVASP-7")
    assert _reason_kind("no refractiveindex.info reference for formula NaCl", "line 2 (nacl)") == \
        _reason_kind("no refractiveindex.info reference for formula ZnS", "line 5 (zns)")
    assert _reason_kind("graph/descriptor construction failed: ValueError: x", "a") == \
        "graph/descriptor construction failed"
