"""JARVIS-DFT: structures from the figshare ``dft_3d`` dataset, spectra from JVASP web-page XML.

* Structures: ``jarvis.db.figshare.data("dft_3d", store_dir=<cache>)`` (downloads the zip once,
  then reads it offline from ``data.cache_dir``, default ``~/.cache/spectrolens/jarvis``).
* Spectra: ``data.path`` = a JVASP-<n>.xml page or a folder of them. The block chosen by
  ``data.jarvis_optics`` (``main_optics_mbj`` or ``main_optics_semilocal``) gives ``energies`` (eV)
  and the six ε1/ε2 components (``real_1..6``, ``imag_1..6`` = xx yy zz xy yz zx); the diagonal is
  averaged and converted to α = 2ωκ/c. ``opto_dir_gap`` / ``opto_indir_gap`` become
  ``properties["direct_gap"]`` / ``["indirect_gap"]`` (eV).
* Without ``data.path`` every dft_3d entry is a structure-only record (spectrum None).

Rejects: a page without the optics block, a page whose jid has no dft_3d entry, malformed XML.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
from pymatgen.core import Lattice, Structure

from toolkit.config import DataConfig
from toolkit.data.readers.common import build_material, reason
from toolkit.data.readers.vasp import optics_target
from toolkit.data.records import Material, Reject

DATASET = "dft_3d"


def default_cache_dir(cfg: DataConfig) -> Path:
    """``data.cache_dir``/jarvis, or ~/.cache/spectrolens/jarvis."""
    base = Path(cfg.cache_dir) if cfg.cache_dir else Path(os.path.expanduser("~/.cache/spectrolens"))
    return base / "jarvis"


@lru_cache(maxsize=2)
def load_dft_3d(store_dir: str) -> dict[str, dict]:
    """jid -> dft_3d entry, through jarvis-tools' figshare loader (download on first use)."""
    from jarvis.db.figshare import data

    Path(store_dir).mkdir(parents=True, exist_ok=True)
    return {str(e["jid"]): e for e in data(DATASET, store_dir=store_dir)}


def atoms_to_structure(atoms: dict) -> Structure:
    """A jarvis ``Atoms.to_dict()`` (lattice_mat, coords, elements, cartesian) -> pymatgen Structure."""
    return Structure(Lattice(np.asarray(atoms["lattice_mat"], dtype=float)), list(atoms["elements"]),
                     np.asarray(atoms["coords"], dtype=float), coords_are_cartesian=bool(atoms.get("cartesian")))


def _numbers(text: str | None) -> np.ndarray:
    s = (text or "").strip().strip("'\"")
    return np.array([float(x) for x in s.split(",") if x.strip()], dtype=np.float64) if s else np.empty(0)


def parse_optics_page(path: Path, which: str = "mbj") -> dict:
    """Optics of a JVASP page: {"energy", "real" (N,6), "imag" (N,6), "direct_gap", "indirect_gap"}.

    Raises ValueError naming what is missing."""
    block = "main_optics_mbj" if which == "mbj" else "main_optics_semilocal"
    info = "main_optics_mbj_info" if which == "mbj" else "main_optics_info"
    root = ET.parse(path).getroot()
    node = root.find(f".//{block}/{info}")
    if node is None:
        raise ValueError(f"page has no <{block}><{info}> block (data.jarvis_optics={which!r})")
    energy = _numbers(node.findtext("energies"))
    real = [_numbers(node.findtext(f"real_{i}")) for i in range(1, 7)]
    imag = [_numbers(node.findtext(f"imag_{i}")) for i in range(1, 7)]
    if energy.size < 2 or any(c.size != energy.size for c in real[:3] + imag[:3]):
        raise ValueError(f"<{block}> energies/real_1-3/imag_1-3 are missing or of different lengths")
    pad = [c if c.size == energy.size else np.zeros(energy.size) for c in real[3:] + imag[3:]]

    def gap(tag: str) -> float | None:
        t = node.findtext(tag)
        try:
            return float(t) if t not in (None, "", "na") else None
        except ValueError:
            return None

    return {"energy": energy, "real": np.column_stack(real[:3] + pad[:3]),
            "imag": np.column_stack(imag[:3] + pad[3:]), "direct_gap": gap("opto_dir_gap"),
            "indirect_gap": gap("opto_indir_gap")}


class JarvisSource:
    """Reader joining JARVIS dft_3d structures with JVASP optics pages."""

    name = "jarvis"

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.path = Path(cfg.path) if cfg.path else None
        self.store_dir = str(default_cache_dir(cfg))

    def _pages(self) -> dict[str, Path]:
        assert self.path is not None
        files = [self.path] if self.path.is_file() else sorted(self.path.glob("JVASP-*.xml"))
        return {p.stem: p for p in files}

    def scan(self) -> tuple[list[str], list[Reject]]:
        db = load_dft_3d(self.store_dir)
        if self.path is None:
            return sorted(db, key=_jid_order), []
        keys, rejects = [], []
        for jid, page in self._pages().items():
            if jid in db:
                keys.append(jid)
            else:
                rejects.append(Reject(str(page), jid, f"no {DATASET} entry for {jid} (structure missing)"))
        return sorted(keys, key=_jid_order), rejects

    def load(self, keys: list[str]) -> Iterator[Material | Reject]:
        db = load_dft_3d(self.store_dir)
        pages = self._pages() if self.path is not None else {}
        for jid in keys:
            entry = db.get(jid)
            src = str(pages.get(jid, f"{self.store_dir}/{DATASET}"))
            if entry is None:
                yield Reject(src, jid, f"no {DATASET} entry for {jid} (structure missing)")
                continue
            try:
                structure = atoms_to_structure(entry["atoms"])
            except Exception as e:  # noqa: BLE001
                yield Reject(src, jid, reason("unreadable atoms", f"dft_3d entry: {type(e).__name__}: {e}"))
                continue
            spectrum, props, prov = None, {}, {"dataset": DATASET}
            if self.path is not None:
                page = pages.get(jid)
                if page is None:
                    yield Reject(src, jid, reason("no optics page", "no JVASP page for this jid in data.path"))
                    continue
                try:
                    optics = parse_optics_page(page, self.cfg.jarvis_optics)
                except Exception as e:  # noqa: BLE001 - malformed page is a per-record reject
                    yield Reject(str(page), jid, reason("unusable optics page", f"{type(e).__name__}: {e}"))
                    continue
                spectrum, nan_rows, problem = optics_target(self.cfg, optics["energy"], optics["real"], optics["imag"])
                if problem:
                    yield Reject(str(page), jid, problem)
                    continue
                props = {k: optics[k] for k in ("direct_gap", "indirect_gap") if optics[k] is not None}
                prov.update({"optics": self.cfg.jarvis_optics, "nan_rows": int(nan_rows.sum())})
            yield build_material(self.cfg, id=jid, structure=structure, spectrum=spectrum, source_file=src,
                                 record=jid, source=self.name, provenance=prov, properties=props)

    def metadata(self) -> dict:
        return {"source": self.name, "path": str(self.path) if self.path else None, "dataset": DATASET,
                "cache_dir": self.store_dir, "optics": self.cfg.jarvis_optics, "units": "eV",
                "transform": self.cfg.transform, "log_floor": self.cfg.log_floor}


def _jid_order(jid: str) -> tuple[str, int]:
    head, _, num = jid.rpartition("-")
    return (head, int(num)) if num.isdigit() else (jid, -1)
