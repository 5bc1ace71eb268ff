"""Seeded fuzzing of the ALIGNN and JSON Lines readers with corrupted rows and files.

Each case is a small file of valid records mixed with corrupted ones (truncated lines, random and
non-UTF-8 bytes, wrong widths, NaN/inf/negative values, bad JSON, wrong types, missing keys, BOMs,
path tricks, duplicate ids, structures that only fail when built). For every case:

* scan and load never raise;
* the materials equal those of a clean read of the valid records alone (ids, order, spectra,
  properties, structures), so nothing valid is lost and nothing corrupted gets in;
* every record is accounted for: n_materials + n_rejects == n_records (each non-blank line gives
  exactly one material or reject; for ALIGNN, plus one 'no row' reject per structure file that no
  line names), and every reason is '<fixed kind>: <specifics>'.

Deterministic (numpy generators seeded by the case number); structures are tiny and their files
fixed, so the cost is dominated by the readers' own per-record work.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from test_readers_hardening import check_kinds, poscar

from toolkit.config import DataConfig
from toolkit.data.readers import open_source
from toolkit.data.records import Material, Reject

N_ALIGNN_CASES = 1500
N_JSONL_CASES = 1500
BOM = b"\xef\xbb\xbf"
NACL = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
KCL = Structure(Lattice.cubic(6.29), ["K", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
OVERLAP = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])


def pick(rng: np.random.Generator, options: list):
    """One of ``options`` (any Python objects), drawn with ``rng``."""
    return options[int(rng.integers(len(options)))]


def _split(items) -> tuple[list[Material], list[Reject]]:
    items = list(items)
    mats = [m for m in items if isinstance(m, Material)]
    rejects = [r for r in items if isinstance(r, Reject)]
    assert len(mats) + len(rejects) == len(items)
    return mats, rejects


def _same_materials(got: list[Material], want: list[Material]) -> None:
    assert [m.id for m in got] == [m.id for m in want]
    for a, b in zip(got, want):
        assert a.formula == b.formula and a.properties == b.properties and a.source == b.source
        if b.spectrum is None:
            assert a.spectrum is None
        else:
            assert a.spectrum.dtype == b.spectrum.dtype and np.array_equal(a.spectrum, b.spectrum, equal_nan=True)
        assert a.structure.species == b.structure.species
        assert np.array_equal(a.structure.lattice.matrix, b.structure.lattice.matrix)
        assert np.array_equal(a.structure.frac_coords, b.structure.frac_coords)


def _read(cfg: DataConfig, rng: np.random.Generator) -> tuple[list[str], list[Reject], list[Material], list[Reject]]:
    src = open_source(cfg)
    keys, scan_rejects = src.scan()
    if rng.random() < 0.5:  # what a worker process receives: the source re-created, keys in any order
        src = pickle.loads(pickle.dumps(src))
        order = rng.permutation(len(keys))
        mats, load_rejects = _split(src.load([keys[i] for i in order]))
        mats.sort(key=lambda m: keys.index(m.id))
    else:
        mats, load_rejects = _split(src.load(keys))
    assert len(mats) + len(load_rejects) == len(keys)
    check_kinds(scan_rejects + load_rejects)
    return keys, scan_rejects, mats, load_rejects


# =================================================================================== ALIGNN

ALIGNN_GRID = {"start": 0.0, "stop": 7.0, "num": 8}
# valid structure files: (name as written in a row, canonical id); the last is a link into the shared data
VALID_NAMES = [("POSCAR_a.vasp", "POSCAR_a.vasp"), ("./POSCAR_b.vasp", "POSCAR_b.vasp"),
               ("sub/../POSCAR_c.vasp", "POSCAR_c.vasp"), ("sub/POSCAR_d.vasp", "sub/POSCAR_d.vasp"),
               ("POSCAR_real.vasp", "POSCAR_real.vasp")]
LOAD_TIME_BAD = ["POSCAR_garbage.vasp", "POSCAR_overlap.vasp", "POSCAR_empty.vasp"]


@pytest.fixture(scope="module")
def alignn_folder(tmp_path_factory, shared_data: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("alignn_fuzz")
    folder, outside = root / "data", root / "outside"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    (folder / "POSCAR_a.vasp").write_text(poscar(NACL))
    (folder / "POSCAR_b.vasp").write_text(poscar(KCL))
    (folder / "POSCAR_c.vasp").write_text(poscar(KCL.copy().scale_lattice(KCL.volume * 1.1)))
    (folder / "sub" / "POSCAR_d.vasp").write_text(poscar(NACL.copy().scale_lattice(NACL.volume * 0.9)))
    (folder / "POSCAR_real.vasp").symlink_to(shared_data / "paper_structures" / "POSCAR_AlPO4_mp-7848.vasp")
    (folder / "POSCAR_garbage.vasp").write_text("not\na POSCAR\n")
    (folder / "POSCAR_overlap.vasp").write_text(poscar(OVERLAP))
    (folder / "POSCAR_empty.vasp").write_bytes(b"")
    (folder / "POSCAR_norow.vasp").write_text(poscar(NACL))
    (outside / "x.vasp").write_text(poscar(NACL))  # a valid POSCAR outside the folder
    (folder / "linkdir").symlink_to(outside, target_is_directory=True)
    return folder, outside


def _num(rng: np.random.Generator) -> str:
    return f"{rng.uniform(0.0, 6.0):.{int(rng.integers(0, 5))}f}"


def _alignn_case(rng: np.random.Generator, outside: Path, width: int) -> tuple[list[bytes], list[bytes]]:
    """(all lines, the valid lines) of one id_prop table; valid rows are the majority width."""
    n_valid = int(rng.integers(1, len(VALID_NAMES) + 1))
    chosen = [VALID_NAMES[i] for i in rng.choice(len(VALID_NAMES), n_valid, replace=False)]
    valid = [f"{name},{','.join(_num(rng) for _ in range(width))}".encode() for name, _ in chosen]
    lines: list[tuple[bytes, bool]] = [(v, True) for v in valid]
    n_bad = int(rng.integers(0, 6))
    n_width_changed = 0
    for _ in range(n_bad):
        kind = int(rng.integers(0, 14))
        name = pick(rng, VALID_NAMES)[0]
        vals = [_num(rng) for _ in range(width)]
        after = 0  # insert anywhere from this position on
        if kind == 0:  # truncated: cut before the last comma (a row with fewer values, or no values)
            row = f"{name},{','.join(vals)}".encode()
            if width > 1:
                if n_width_changed + 1 >= n_valid:
                    continue
                n_width_changed += 1
            bad = row[: int(rng.integers(1, row.rfind(b",") + 1))]
        elif kind == 1:  # random bytes with at least one byte that is never valid UTF-8
            raw = bytearray(rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8).tobytes())
            raw[int(rng.integers(len(raw)))] = 0xFF
            bad = bytes(b for b in raw if b != 0x0A)  # a \r in it ends a CSV line too
        elif kind == 2:  # one non-UTF-8 byte inside a valid-looking row
            row = f"{name},{','.join(vals)}".encode()
            i = int(rng.integers(0, len(row) + 1))
            bad = row[:i] + bytes([pick(rng, [0x80, 0xC0, 0xFE, 0xFF])]) + row[i:]
        elif kind == 3:  # wrong width
            if n_width_changed + 1 >= n_valid:
                continue
            n_width_changed += 1
            k = pick(rng, [-1, 1, 2]) if width > 1 else int(rng.integers(1, 3))
            bad = f"{name},{','.join(vals[: width + min(k, 0)] + [_num(rng) for _ in range(max(k, 0))])}".encode()
        elif kind == 4:  # NaN / inf / negative
            vals[int(rng.integers(width))] = pick(rng, ["nan", "NaN", "inf", "-inf", "-1.5", "-0.001", "1e999"])
            bad = f"{name},{','.join(vals)}".encode()
        elif kind == 5:  # not a number
            vals[int(rng.integers(width))] = pick(rng, ["abc", "1.2.3", "", "0x1p3", "1;5"])
            bad = f"{name},{','.join(vals)}".encode()
        elif kind == 6:  # no such file
            bad = f"POSCAR_missing{int(rng.integers(3))}.vasp,{','.join(vals)}".encode()
        elif kind == 7:  # path tricks leaving the folder
            trick = pick(rng, ["../outside/x.vasp", str(outside / "x.vasp"), "linkdir/x.vasp", "sub/../../outside/x.vasp",
                               "/etc/passwd", "..", "sub/..", "../data/POSCAR_a.vasp"])
            bad = f"{trick},{','.join(vals)}".encode()
        elif kind == 8:  # duplicate of a valid row, after it
            j = int(rng.integers(n_valid))
            bad = f"{chosen[j][0]},{','.join(vals)}".encode()
            after = [ln for ln, _ in lines].index(valid[j]) + 1
        elif kind == 9:  # a structure file that fails only when parsed or checked
            bad = f"{LOAD_TIME_BAD[int(rng.integers(len(LOAD_TIME_BAD)))]},{','.join(vals)}".encode()
        elif kind == 10:  # no name / no values
            bad = pick(rng, [f",{','.join(vals)}", name, f"{name},", f" ,{vals[0]}"]).encode()
        elif kind == 11:  # a BOM that is not the file's (see _write_lines)
            bad = BOM + f"{name},{','.join(vals)}".encode()
        elif kind == 12:  # a file name with a NUL or an unbalanced quote
            bad = pick(rng, [f"POSCAR_a\x00.vasp,{vals[0]}", f'"POSCAR_a.vasp,{vals[0]}']).encode()
        else:  # a name only differing by case/whitespace inside
            bad = f"poscar_a.vasp,{','.join(vals)}".encode()
        lines.insert(int(rng.integers(after, len(lines) + 1)), (bad, False))
    for _ in range(int(rng.integers(0, 3))):  # blank lines are not records
        lines.insert(int(rng.integers(0, len(lines) + 1)), (pick(rng, [b"", b"  ", b" , ,", b"\t"]), None))
    return [ln for ln, _ in lines], [ln for ln, ok in lines if ok]


def _write_lines(path: Path, lines: list[bytes], rng: np.random.Generator) -> None:
    """Lines with \\n or \\r\\n, with or without a final end of line, with or without a BOM (always
    with one when the first line starts with a BOM: that BOM is then inside the line, not the file's)."""
    eol = pick(rng, [b"\n", b"\n", b"\r\n"])
    bom = BOM if rng.random() < 0.3 or (lines and lines[0].startswith(BOM)) else b""
    path.write_bytes(bom + eol.join(lines) + (eol if rng.random() < 0.8 else b""))


def _nonblank_csv_lines(lines: list[bytes]) -> int:
    return sum(1 for ln in b"\n".join(lines).splitlines() if ln.strip(b" \t,"))


def test_alignn_reader_fuzz(alignn_folder: tuple[Path, Path]) -> None:
    folder, outside = alignn_folder
    files = sorted(p.relative_to(folder).as_posix() for p in folder.iterdir()
                   if p.name.startswith("POSCAR") and p.is_file())
    n_checked = 0
    for case in range(N_ALIGNN_CASES):
        rng = np.random.default_rng(case)
        width = 1 if case % 2 else ALIGNN_GRID["num"]
        lines, valid = _alignn_case(rng, outside, width)
        _write_lines(folder / "id_prop.csv", lines, rng)
        _write_lines(folder / "clean.csv", valid, rng)
        cfg = DataConfig(source="alignn", path=folder, grid=ALIGNN_GRID)
        keys, scan_rejects, mats, load_rejects = _read(cfg, rng)
        _, cscan, cmats, cload = _read(cfg.model_copy(update={"id_prop": "clean.csv"}), rng)
        assert not cload and all("no row" in r.reason for r in cscan) and len(cmats) == len(valid), case
        _same_materials(mats, cmats)
        # accounting: one outcome per non-blank line, one 'no row' reject per structure file no line names
        no_row = [r for r in scan_rejects if r.reason.startswith("no row:")]
        assert len(mats) + len(load_rejects) + len(scan_rejects) - len(no_row) == _nonblank_csv_lines(lines), case
        assert {r.record for r in no_row} <= set(files) - {m.id for m in mats} - set(keys), case
        named = {ln.decode("utf-8", "surrogateescape").lstrip("\ufeff").split(",", 1)[0].strip() for ln in lines}
        assert set(files) <= set(keys) | named | {os.path.normpath(n) for n in named if n} | {r.record for r in no_row}, case
        n_checked += 1
    assert n_checked == N_ALIGNN_CASES


# =================================================================================== JSON Lines

JSONL_GRID = {"start": 0.0, "stop": 7.5, "num": 16}


@pytest.fixture(scope="module")
def jsonl_structures(shared_data: Path) -> list[dict]:
    with (shared_data / "mp_structures" / "mp_structures.jsonl").open() as fh:
        agcl = next(json.loads(x) for x in fh if '"mp-1536202"' in x)
    return [NACL.as_dict(), KCL.as_dict(), agcl["structure"]]


def _valid_record(rng: np.random.Generator, rid, structures: list[dict]) -> dict:
    grid = np.linspace(JSONL_GRID["start"], JSONL_GRID["stop"], JSONL_GRID["num"])
    rec: dict = {"id" if rng.random() < 0.6 else pick(rng, ["material_id", "jid"]): rid,
                 "structure": structures[int(rng.integers(len(structures)))]}
    kind = int(rng.integers(0, 4))
    if kind == 1:
        rec["log10_alpha"] = np.round(rng.uniform(1.0, 6.0, grid.size), 3).tolist()
    elif kind == 2:
        e = np.sort(rng.uniform(-2.0, 10.0, int(rng.integers(2, 30))))
        e[0], e[-1] = min(e[0], 3.0), max(e[-1], 3.6)  # at least one grid point (3.0 or 3.5) inside
        rec["energy"] = np.round(e, 4).tolist()
        rec["alpha"] = np.round(10 ** rng.uniform(0, 6, e.size), 2).tolist()
    elif kind == 3:
        e = np.linspace(rng.uniform(-1, 2), rng.uniform(4, 9), int(rng.integers(2, 20)))
        rec["energy"] = e.tolist()
        rec["log10_alpha"] = rng.uniform(0, 6, e.size).tolist()
    for g in ("direct_gap", "indirect_gap"):
        if rng.random() < 0.4:
            rec[g] = pick(rng, [None, 0, round(float(rng.uniform(0, 8)), 3), int(rng.integers(0, 5))])
    if rng.random() < 0.3:
        rec["formula"] = "whatever"
    return rec


def _corrupt_record(rng: np.random.Generator, rec: dict, fresh_id: str) -> bytes:
    """A line that must be rejected: at scan (bad JSON, types, values) or at load (structure)."""
    rec = json.loads(json.dumps(rec))
    kind = int(rng.integers(0, 16))
    id_field = next(f for f in ("id", "material_id", "jid") if f in rec)
    if kind == 0:  # truncated line
        text = json.dumps(rec).encode()
        return text[: int(rng.integers(1, len(text)))]
    if kind == 1:  # random bytes, at least one never valid in UTF-8
        raw = bytearray(rng.integers(0, 256, int(rng.integers(1, 60)), dtype=np.uint8).tobytes())
        raw[int(rng.integers(len(raw)))] = 0xFF
        return bytes(b for b in raw if b != 0x0A)
    if kind == 2:  # a non-UTF-8 byte inside the line
        text = json.dumps(rec).encode()
        i = int(rng.integers(0, len(text) + 1))
        return text[:i] + bytes([pick(rng, [0x80, 0xC3, 0xFF])]) + text[i:]
    if kind == 3:  # bad JSON
        text = json.dumps(rec)
        return pick(rng, [text[:-1], text[:-1] + ",}", "{bad", text.replace(":", ";", 1), "{'id': 1}",
                           BOM.decode("utf-8") + text, text + "x"]).encode()
    if kind == 4:  # not an object
        return pick(rng, [b"[1, 2]", b"3", b"null", b'"x"', b"true", json.dumps([rec]).encode()])
    if kind == 5:  # wrong type of id
        rec[id_field] = pick(rng, [[1], {"a": 1}, True, 1.5])
    elif kind == 6:  # missing id / structure
        if rng.random() < 0.5:
            del rec[id_field]
        else:
            rec.pop("structure")
    elif kind == 7:  # wrong type of structure / spectrum / gap
        what = int(rng.integers(0, 4))
        if what == 0:
            rec["structure"] = pick(rng, ["NaCl", [1, 2], 3])
        elif what == 1:
            rec.pop("log10_alpha", None)
            rec["alpha"] = pick(rng, ["x", [["1"]] * 16, [1, "2"] * 8, [True] * 16, {"a": 1}])
        elif what == 2:
            rec["energy"] = pick(rng, ["x", [[1, 2]], None])
            rec.setdefault("alpha", [1.0, 2.0])
            rec.pop("log10_alpha", None)
        else:
            rec[pick(rng, ["direct_gap", "indirect_gap"])] = pick(rng, ["n/a", "1.2", [1.0], True, {"v": 1}])
    elif kind == 8:  # NaN / inf / negative values
        what = int(rng.integers(0, 4))
        if what == 0:
            rec[pick(rng, ["direct_gap", "indirect_gap"])] = pick(rng, [-0.5, math.nan, math.inf, -math.inf])
        else:
            rec.pop("log10_alpha", None)
            rec["energy"] = [0.5, 1.0, 2.0, 3.0]
            rec["alpha"] = [1.0, 2.0, 3.0, 4.0]
            target = "energy" if what == 1 else "alpha"
            rec[target][int(rng.integers(4))] = pick(rng, [math.nan, math.inf] if what == 1 else
                                                     [math.nan, math.inf, -math.inf, -1.0])
    elif kind == 9:  # wrong widths
        rec.pop("alpha", None)
        rec.pop("energy", None)
        n = pick(rng, [2, 15, 17, 40])
        rec["log10_alpha"] = [3.0] * n
        if rng.random() < 0.5:
            rec["energy"] = list(range(n + pick(rng, [-1, 1])))
    elif kind == 10:  # spectrum with no point on the grid, or one that overflows
        rec.pop("alpha", None)
        if rng.random() < 0.5:
            rec["energy"], rec["log10_alpha"] = [20.0, 21.0], [3.0, 4.0]
        else:
            rec["energy"], rec["log10_alpha"] = [0.0, 8.0], [3.0, 400.0]
    elif kind == 11:  # both spectrum fields, or energy alone
        if rng.random() < 0.5:
            rec["alpha"], rec["log10_alpha"] = [1.0] * 16, [1.0] * 16
            rec.pop("energy", None)
        else:
            rec.pop("alpha", None)
            rec.pop("log10_alpha", None)
            rec["energy"] = [1.0, 2.0]
    elif kind == 12:  # a huge integer, deep nesting
        return pick(rng, [b'{"id": "big", "structure": {}, "direct_gap": 1' + b"0" * 5000 + b"}",
                           b'{"id": "deep", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"])
    else:  # structures that fail only when built or checked (fresh ids: they keep their id at scan)
        rec[id_field] = fresh_id
        what = kind - 13
        if what == 0:
            rec["structure"] = {"lattice": {"matrix": "x"}, "sites": 3}
        elif what == 1:
            rec["structure"] = Structure(Lattice.cubic(3), [], []).as_dict()
        else:
            rec["structure"] = OVERLAP.as_dict()
    return json.dumps(rec).encode()


def _jsonl_case(rng: np.random.Generator, structures: list[dict], case: int) -> tuple[list[bytes], list[bytes]]:
    n_valid = int(rng.integers(0, 5))
    ids = [f"m{case}-{i}" if rng.random() < 0.8 else case * 10 + i for i in range(n_valid)]
    valid = [json.dumps(_valid_record(rng, rid, structures)).encode() for rid in ids]
    lines: list[tuple[bytes, bool | None]] = [(v, True) for v in valid]
    for k in range(int(rng.integers(0, 6))):
        base = _valid_record(rng, ids[int(rng.integers(n_valid))] if n_valid and rng.random() < 0.5 else f"x{k}",
                             structures)
        after = 0
        if n_valid and rng.random() < 0.15:  # duplicate id of a valid record, after it
            j = int(rng.integers(n_valid))
            bad = json.dumps(_valid_record(rng, ids[j], structures)).encode()
            after = [ln for ln, _ in lines].index(valid[j]) + 1
        else:
            bad = _corrupt_record(rng, base, f"bad{k}")
        lines.insert(int(rng.integers(after, len(lines) + 1)), (bad, False))
    for _ in range(int(rng.integers(0, 3))):
        lines.insert(int(rng.integers(0, len(lines) + 1)), (pick(rng, [b"", b"  ", b"\r"]), None))
    return [ln for ln, _ in lines], [ln for ln, ok in lines if ok]


def test_jsonl_reader_fuzz(tmp_path: Path, jsonl_structures: list[dict]) -> None:
    path, clean = tmp_path / "fuzz.jsonl", tmp_path / "clean.jsonl"
    n_records = n_materials = 0
    for case in range(N_JSONL_CASES):
        rng = np.random.default_rng(10_000 + case)
        lines, valid = _jsonl_case(rng, jsonl_structures, case)
        _write_lines(path, lines, rng)
        _write_lines(clean, valid, rng)
        cfg = DataConfig(source="jsonl", path=path, grid=JSONL_GRID)
        _, scan_rejects, mats, load_rejects = _read(cfg, rng)
        _, cscan, cmats, cload = _read(cfg.model_copy(update={"path": clean}), rng)
        assert not cscan and not cload and len(cmats) == len(valid), case
        _same_materials(mats, cmats)
        nonblank = sum(1 for ln in b"\n".join(lines).split(b"\n") if ln.strip())
        assert len(mats) + len(scan_rejects) + len(load_rejects) == nonblank, case
        n_records += nonblank
        n_materials += len(mats)
    assert n_materials > N_JSONL_CASES and n_records > 2 * n_materials  # not vacuous
