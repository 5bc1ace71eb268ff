"""``analyze/chemiscope.json.gz``: the analysed materials as a chemiscope dataset
(https://chemiscope.org; ``pip install chemiscope``, or ``pip install spectrolens[explore]``).

One structure per analysed material (from ``dataset.zarr``; above ``analyze.chemiscope_max_materials``,
default 50,000, a seeded sample per cluster, which the file's description states), and as structure properties: ``id``,
``formula``, the 2-D map of every clustering (``<layer> PC1`` / ``<layer> PC2``, NaN where a
clustering does not cover the material, e.g. the reference-spectra baseline without a spectrum),
its cluster (``<layer> cluster``, -1 = not clustered), the colouring descriptors of the report's
interactive map (:func:`toolkit.analyze.interactive.descriptor_columns`: onsets, bond lengths,
coordination, density, anion/cation/coordination classes) and the reference and predicted spectra
(multidimensional properties over the ``energy`` parameter, every ~G/120-th energy). The default
view is the first model layer's map coloured by the reference onset.

Open it in the web viewer (https://chemiscope.org, "Load"), or in Jupyter:
``chemiscope.show_input("RUN_DIR/analyze/chemiscope.json.gz")``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def available() -> bool:
    try:
        import chemiscope  # noqa: F401
    except ImportError:
        return False
    return True


def selection(layer_results: list[Any], n: int, max_materials: int, seed: int, ids: Any) -> np.ndarray:
    """Population rows the file holds: all up to ``max_materials``, above it a seeded draw per cluster
    of the first model layer (:func:`toolkit.analyze.interactive.subsample`: every cluster keeps its
    share, the same materials as the report's interactive maps where those are subsampled too)."""
    from toolkit.analyze.interactive import subsample

    if n <= max_materials:
        return np.arange(n)
    lr = next((x for x in layer_results if not x.name.startswith("spectrum_")), layer_results[0] if layer_results else None)
    labels = np.asarray(lr.labels) if lr is not None else np.zeros(n, dtype=np.int32)
    return subsample(labels, max_materials, seed, ids)


def write(path: Path, inp: Any, layer_results: list[Any], formulas: np.ndarray, title: str = "spectrolens",
          max_materials: int = 50_000, seed: int = 0) -> Path:
    """Write the chemiscope dataset of the analysed population ``inp`` (:class:`toolkit.analyze.Inputs`)
    with the clusterings ``layer_results`` (:class:`toolkit.analyze.steps.LayerResult`) to ``path``: every
    material up to ``max_materials`` (the viewer's practical limit), above it a seeded sample per
    cluster (:func:`selection`; the metadata say so). Only the selected materials' structures and
    spectra are read."""
    import chemiscope
    from ase import Atoms

    from toolkit.analyze.interactive import SPECTRUM_POINTS, descriptor_columns
    from toolkit.analyze.lazy import rows_of
    from toolkit.runtime import atomic_write

    total = len(inp.ids)
    sel = selection(layer_results, total, max_materials, seed, inp.ids)
    rows = np.asarray(inp.rows)[sel]
    structures = []
    for r in rows:  # rows in dataset order: the reader's part cache serves consecutive materials
        m = inp.reader.material(int(r))
        structures.append(Atoms(numbers=np.asarray(m["numbers"], dtype=int), scaled_positions=m["frac_coords"],
                                cell=m["lattice"], pbc=True))
    n = len(structures)
    props: dict[str, dict[str, Any]] = {
        "id": {"target": "structure", "values": [str(inp.ids[i]) for i in sel], "description": "material id"},
        "formula": {"target": "structure", "values": [str(x) for x in np.asarray(formulas)[sel]],
                    "description": "reduced formula"}}
    first_map = None
    for lr in layer_results:
        if lr.clustering.coords is None:
            continue
        xy = np.full((total, 2), np.nan)
        xy[lr.mask] = lr.clustering.coords
        for j in (0, 1):
            props[f"{lr.name} PC{j + 1}"] = {"target": "structure", "values": xy[sel, j],
                                             "description": f"principal component {j + 1} of {lr.name} (the report's 2-D map)"}
        props[f"{lr.name} cluster"] = {"target": "structure", "values": lr.labels[sel].astype(np.float64),
                                       "description": f"Ward cluster of {lr.name} at the default level (-1: not clustered)"}
        if first_map is None or (first_map.startswith("spectrum_") and not lr.name.startswith("spectrum_")):
            first_map = lr.name
    for k, v in descriptor_columns(inp.table, sel).items():
        if v.dtype.kind in "US":
            props[k] = {"target": "structure", "values": [x or "missing" for x in v.tolist()],
                        "description": f"{k.split(':', 1)[1]} classes of the material"}
        else:
            props[k] = {"target": "structure", "values": np.asarray(v, dtype=np.float64),
                        "units": "eV" if "onset" in k or k == "edge_integral" else "",
                        "description": f"descriptor {k} (docs/report.md)"}
    energy = np.asarray(inp.energy, dtype=np.float64)
    step = max(1, len(energy) // SPECTRUM_POINTS)
    parameters = {"energy": {"values": energy[::step], "name": "photon energy", "units": "eV"}}
    unit = str(inp.reader.attrs.get("transform", "log10_alpha")) if hasattr(inp.reader, "attrs") else "log10_alpha"
    for k, s in (("reference spectrum", inp.reference), ("predicted spectrum", inp.predicted)):
        if s is not None:
            props[k] = {"target": "structure", "values": np.asarray(rows_of(s, sel)[:, ::step], dtype=np.float64),
                        "parameters": ["energy"], "units": unit, "description": f"{k} ({unit})"}
    settings = None
    if first_map is not None:
        settings = chemiscope.quick_settings(x=f"{first_map} PC1", y=f"{first_map} PC2",
                                             map_color="onset" if "onset" in props else f"{first_map} cluster",
                                             periodic=True)
    sampled = (f"{n} of the {total} materials analysed by spectrolens (a seeded sample per cluster: "
               f"analyze.chemiscope_max_materials = {max_materials})" if n < total else f"{n} materials analysed by spectrolens")
    meta = {"name": title, "description": f"{sampled}: 2-D maps (PCA) of each layer's "
            "activations, Ward clusters, structural descriptors, onsets and spectra (docs/report.md)."}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.json.gz")
    with warnings.catch_warnings():  # NaN = not defined for that material (hidden when that property is shown)
        warnings.filterwarnings("ignore", message=".*has NaNs.*")
        chemiscope.write_input(str(tmp), structures=structures, properties=props, parameters=parameters,
                               settings=settings, metadata=meta)
    atomic_write(path, lambda fh: fh.write(tmp.read_bytes()))
    tmp.unlink()
    return path
