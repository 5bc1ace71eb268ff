"""The interactive 2-D map of each clustering in the report (Plotly, self-contained, offline).

One map per layer: the first two principal components of the layer (``ClusterResult.coords``), one
Plotly trace per cluster. In the page:

* hover a point: id, formula, cluster, reference onset;
* "colour by": cluster, or a descriptor (:data:`CONTINUOUS` on a viridis scale, grey = missing;
  :data:`CATEGORICAL` families as classes, e.g. the anion class);
* click a point: its reference and predicted spectrum (every ~G/:data:`SPECTRUM_POINTS`-th point of
  the energy grid) under the map; for an ensemble's prediction (``predicted_std``) with its ±2σ band;
* click a cluster in the legend or in the report's cluster list of that layer: its members (id,
  formula, onset), each clickable (double-click in the legend still isolates a cluster).

Above :data:`MAX_POINTS` materials (``analyze.interactive_max_points``) the map shows a seeded
random subsample drawn per cluster (every cluster keeps its share, at least one point); the page
says how many are shown. Nothing is dropped from the data: clusters.csv and attribution.json list
every material.

Data flow: :func:`from_layer` (the analyze stage, in memory) -> :func:`map_data` -> a dict of numpy
arrays, saved by :func:`save` as ``analyze/interactive/<layer>.npz`` so that
:func:`toolkit.analyze.rerender_report` can render the maps again (:func:`load_all`) without the
stores. :func:`fragments` turns the maps into HTML: one fragment per layer; the first carries
plotly.js (inline, ~4.8 MB, once per page), the page script (``window.spectrolens``:
``showMaterial(layer, id)``, ``showCluster(layer, c)``, ``showClusters(layer, [c...], label)``, ``colourBy(layer, key)``) and the spectra
of every shown material, stored once for all layers (int16-quantised, base64).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_POINTS = 20_000  # above this many materials a layer's map shows a seeded subsample per cluster
SPECTRUM_POINTS = 120  # spectra embedded for the click panel: about this many energies
CONTINUOUS = ("onset", "pred:onset", "edge_integral", "bond_length_mean", "cn_mean", "density",
              "volume_per_atom", "electronegativity_diff", "heavy_atom_fraction", "d_electrons_mean")
CATEGORICAL = ("anion", "cation_class", "coordination", "crystal_system")  # 0/1 families shown as classes
MAX_CLASSES = 9  # classes of a categorical colouring; the rest are "other"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
           "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")  # matplotlib tab10 / tab20, as the PNG map


# ----------------------------------------------------------------------------------------- data
def descriptor_columns(table: Any, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The colouring columns of a :class:`~toolkit.analyze.descriptors.DescriptorTable` (rows ``rows``):
    each present :data:`CONTINUOUS` descriptor, and ``class:<family>`` (str: the classes a material
    carries joined by '+', 'none', '' = missing) of each present :data:`CATEGORICAL` family."""
    sel = slice(None) if rows is None else rows
    out: dict[str, np.ndarray] = {}
    for n in CONTINUOUS:
        if n in table.names:
            out[n] = np.asarray(table.column(n)[sel], dtype=np.float32)
    for fam in CATEGORICAL:
        cols = [n for n in table.names if n.startswith(fam + ":")]
        if not cols:
            continue
        v = table.values[sel][:, [table.names.index(n) for n in cols]]
        names = np.array([n.split(":", 1)[1] for n in cols])
        lab = []
        for r in v:
            if not np.isfinite(r).any():
                lab.append("")
            else:
                on = [x for x in names[np.nan_to_num(r) > 0.5]]
                if len(on) > 1 and "halide" in on:  # anion:halide also marks every fluoride, chloride, ...
                    on.remove("halide")
                lab.append("+".join(on) if on else "none")
        out[f"class:{fam}"] = np.array(lab, dtype=str)
    return out


def subsample(labels: np.ndarray, max_points: int, seed: int, ids: Any = None) -> np.ndarray:
    """Sorted rows to display: all, or a seeded random draw per cluster (each cluster keeps its share of
    ``max_points``, at least one point). With ``ids`` the draw is by a seeded hash of each id, so the
    maps of different layers show mostly the same materials (their spectra are embedded once)."""
    n = len(labels)
    if n <= max_points:
        return np.arange(n)
    if ids is None:
        prio = np.random.default_rng(seed).permutation(n)
    else:
        prio = np.array([zlib.crc32(f"{seed}:{i}".encode()) for i in np.asarray(ids).tolist()], dtype=np.int64)
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        m = max(1, round(max_points * len(rows) / n))
        keep.append(rows[np.argsort(prio[rows], kind="stable")[:m]])
    return np.sort(np.concatenate(keep))


def map_data(layer: str, ids: Any, formulas: Any, coords: np.ndarray, labels: np.ndarray,
             descriptors: dict[str, np.ndarray], energy: np.ndarray, reference: np.ndarray | None = None,
             predicted: np.ndarray | None = None, *, transform: str = "log10_alpha", max_points: int = MAX_POINTS,
             seed: int = 0, projection: str = "pca", predicted_std: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The arrays one layer's map needs (all rows aligned: the clustered materials, ``labels`` >= 0):
    the shown subsample (:func:`subsample`) of ids, formulas, coordinates, clusters, ``descriptors``
    (:func:`descriptor_columns`) and spectra on every ``step``-th energy; plus the size of every
    cluster over all materials."""
    labels = np.asarray(labels)
    keep = subsample(labels, max_points, seed, ids)
    step = max(1, len(energy) // SPECTRUM_POINTS)
    cl, sizes = np.unique(labels, return_counts=True)
    d: dict[str, np.ndarray] = {
        "layer": np.array(layer), "n_total": np.array(len(labels)), "max_points": np.array(max_points),
        "seed": np.array(seed), "transform": np.array(transform), "projection": np.array(projection),
        "id": np.array([str(x) for x in np.asarray(ids)[keep]], dtype=str),
        "formula": np.array([str(x) for x in np.asarray(formulas)[keep]], dtype=str),
        "xy": np.asarray(coords, dtype=np.float32)[keep],
        "cluster": labels[keep].astype(np.int32),
        "cluster_ids": cl.astype(np.int32), "cluster_sizes": sizes.astype(np.int64),
        "energy": np.asarray(energy, dtype=np.float32)[::step],
    }
    for k, v in descriptors.items():
        d[f"d:{k}"] = np.asarray(v)[keep]
    for k, s in (("reference", reference), ("predicted", predicted), ("predicted_std", predicted_std)):
        if s is not None:
            d[k] = np.asarray(s[keep][:, ::step] if not hasattr(s, "oindex") else s.oindex[keep, ::step], dtype=np.float32)
    return d


def from_layer(lr: Any, inp: Any, formulas: np.ndarray, *, max_points: int = MAX_POINTS, seed: int = 0) -> dict | None:
    """:func:`map_data` of a :class:`toolkit.analyze.steps.LayerResult` with the analysis
    :class:`toolkit.analyze.Inputs` (``formulas``: one per population row); None without coordinates."""
    from toolkit.analyze.lazy import rows_of

    res = lr.clustering
    if res.coords is None:
        return None
    m = lr.mask
    ids = np.asarray(inp.ids)[m]
    ref, pred = rows_of(inp.reference, m), rows_of(inp.predicted, m)  # lazy views: map_data reads its points' rows
    pstd = getattr(inp, "predicted_std", None)  # ensembles: the ±2σ band of the click panel
    return map_data(lr.name, ids, np.asarray(formulas)[m], res.coords, res.labels,
                    descriptor_columns(inp.table, np.flatnonzero(m)), inp.energy, ref, pred,
                    transform=str(inp.reader.attrs.get("transform", "log10_alpha")) if hasattr(inp.reader, "attrs") else "log10_alpha",
                    max_points=max_points, seed=seed, projection=str(res.preprocessing.get("map", "pca")),
                    predicted_std=rows_of(pstd, m))


def _file(directory: Path, layer: str) -> Path:
    return Path(directory) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', layer)}.npz"


def save(directory: Path, data: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    """Write ``directory/<layer>.npz`` (atomic); returns ``data``."""
    if data is None:
        return None
    from toolkit.runtime import atomic_write

    atomic_write(_file(directory, str(data["layer"])), lambda fh: np.savez_compressed(fh, **data))
    return data


def load_all(directory: Path, layers: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """The saved maps of ``layers`` (those that have a file)."""
    out = {}
    for name in layers:
        p = _file(directory, name)
        if p.is_file():
            with np.load(p, allow_pickle=False) as z:
                out[name] = {k: z[k] for k in z.files}
    return out


# ----------------------------------------------------------------------------------------- HTML
def _num(a: np.ndarray, digits: int = 4) -> list[float | None]:
    return [None if not np.isfinite(v) else float(f"{v:.{digits}g}") for v in np.asarray(a, dtype=np.float64)]


def _json(obj: Any) -> str:
    """JSON safe inside <script> (no '</')."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def _spectra_pool(maps: dict[str, dict[str, np.ndarray]]) -> tuple[dict[str, Any], dict[str, int]]:
    """Reference and predicted spectra (and the ensemble's σ of the prediction, when any map has it) of
    every shown material, once per id for all layers: int16 codes ``q`` (-32768 = missing) with value =
    lo + (q + 32767) * scale, base64 of (M, C, G') little-endian int16, C = ``channels`` (2 or 3)."""
    first = next(iter(maps.values()))
    kinds = ("reference", "predicted") + (("predicted_std",) if any("predicted_std" in d for d in maps.values()) else ())
    energy = first["energy"]
    index: dict[str, int] = {}
    blocks = []
    for d in maps.values():
        if len(d["energy"]) != len(energy):
            continue
        new = [i for i, mid in enumerate(d["id"]) if mid not in index]
        for i in new:
            index[str(d["id"][i])] = len(index)
        g = len(energy)
        blk = np.full((len(new), len(kinds), g), np.nan, dtype=np.float32)
        for j, k in enumerate(kinds):
            if k in d:
                blk[:, j] = d[k][new]
        blocks.append(blk)
    allv = np.concatenate(blocks) if blocks else np.zeros((0, len(kinds), len(energy)), np.float32)
    fin = np.isfinite(allv)
    lo = float(allv[fin].min()) if fin.any() else 0.0
    hi = float(allv[fin].max()) if fin.any() else 1.0
    scale = (hi - lo) / 65534 if hi > lo else 1.0
    q = np.full(allv.shape, -32768, dtype="<i2")
    q[fin] = (np.rint((allv[fin] - lo) / scale) - 32767).astype("<i2")
    pool = {"energy": _num(energy, 6), "lo": lo, "scale": scale, "g": len(energy), "channels": len(kinds),
            "transform": str(first.get("transform", "log10_alpha")),
            "data": base64.b64encode(q.tobytes()).decode()}
    return pool, index


def _figure_html(d: dict[str, np.ndarray], div_id: str) -> str:
    import plotly.graph_objects as go
    import plotly.io as pio

    onset = d.get("d:onset")
    n = len(d["id"])
    size = 6 if n <= 2000 else (4 if n <= 10_000 else 3)
    fig = go.Figure()
    sizes = dict(zip(d["cluster_ids"].tolist(), d["cluster_sizes"].tolist()))
    for c in np.unique(d["cluster"]):
        r = np.flatnonzero(d["cluster"] == c)
        ons = ["n/a" if onset is None or not np.isfinite(onset[i]) else f"{onset[i]:.2f} eV" for i in r]
        fig.add_trace(go.Scatter(
            x=d["xy"][r, 0], y=d["xy"][r, 1], mode="markers", name=f"{int(c)} ({sizes.get(int(c), len(r))})",
            marker={"size": size, "color": PALETTE[int(c) % (20 if len(sizes) > 10 else 10)], "opacity": 0.85},
            customdata=np.column_stack([d["id"][r], d["formula"][r], ons]),
            hovertemplate=(f"<b>%{{customdata[0]}}</b><br>%{{customdata[1]}}<br>cluster {int(c)}"
                           "<br>onset %{customdata[2]}<extra></extra>")))
    axis = "UMAP" if str(d.get("projection", "pca")) == "umap" else "PC"  # maps saved before the option: PCA
    fig.update_layout(height=520, margin={"l": 50, "r": 10, "t": 30, "b": 40}, template="plotly_white",
                      xaxis_title=f"{axis} 1", yaxis_title=f"{axis} 2", hovermode="closest", clickmode="event",
                      legend={"title": {"text": "cluster (size)<br>click: members"}, "itemclick": False,
                              "itemdoubleclick": "toggleothers"},
                      title={"text": f"{d['layer']}: 2-D map ({axis})", "font": {"size": 14}})
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def layer_fragment(d: dict[str, np.ndarray], spec_index: dict[str, int]) -> str:
    """The HTML of one layer's interactive map (needs the page script of :func:`fragments`)."""
    layer = str(d["layer"])
    key = re.sub(r"[^A-Za-z0-9_-]", "_", layer)
    n_total, n = int(d["n_total"]), len(d["id"])
    colours: dict[str, Any] = {}
    for k, v in d.items():
        if not k.startswith("d:"):
            continue
        name = k[2:]
        if v.dtype.kind in "US":
            lv, cnt = np.unique(v[v != ""], return_counts=True)
            top = [str(x) for x in lv[np.argsort(-cnt, kind="stable")][:MAX_CLASSES]]
            more = len(lv) > MAX_CLASSES
            codes = [top.index(x) if x in top else (len(top) if x else -1) for x in v.tolist()]
            colours[name] = {"kind": "categorical", "label": name.split(":", 1)[1] + " class",
                             "levels": top + (["other"] if more else []), "codes": codes}
        elif np.isfinite(v).any():
            colours[name] = {"kind": "continuous", "label": name, "values": _num(v)}
    data = {"layer": layer, "n_total": n_total, "n_shown": n, "ids": d["id"].tolist(), "formula": d["formula"].tolist(),
            "cluster": d["cluster"].tolist(), "spec": [spec_index.get(str(i), -1) for i in d["id"]],
            "sizes": {str(c): int(s) for c, s in zip(d["cluster_ids"], d["cluster_sizes"])},
            "onset": _num(d["d:onset"]) if "d:onset" in d else None, "colours": colours}
    if n < n_total:
        shown = (f"Showing a seeded random subsample of {n:,} of {n_total:,} materials, drawn per cluster "
                 f"(above {int(d['max_points']):,} materials, analyze.interactive_max_points; seed {int(d['seed'])}). "
                 "Every material is in clusters.csv and attribution.json.")
    else:
        shown = f"All {n_total:,} materials shown."
    opts = "".join(f'<option value="{html.escape(k)}">{html.escape(v["label"])}</option>' for k, v in colours.items())
    return (f'<div class="imap" id="imap-{key}" data-layer="{html.escape(layer)}">'
            f"<h3>interactive map</h3><p class='meta'>{html.escape(shown)} Hover a point for its id, formula, cluster "
            "and onset; click it for its spectra; click a cluster in the legend or in the list above to list its members "
            "(double-click in the legend: show only that cluster).</p>"
            f'<label>colour by <select class="imap-colour"><option value="">cluster</option>{opts}</select></label> '
            '<span class="imap-legend"></span>'
            + _figure_html(d, f"imap-plot-{key}")
            + '<div class="imap-detail"><p class="imap-title meta">Click a point to show its spectra.</p>'
            f'<div class="imap-spectrum" id="imap-spectrum-{key}"></div></div>'
            '<div class="imap-members"></div>'
            f'<script type="application/json" class="imap-data">{_json(data)}</script></div>')


def page_assets(pool: dict[str, Any]) -> str:
    """plotly.js (inline, no CDN), the shared spectra and the page script: once per page, before the maps."""
    from plotly.offline import get_plotlyjs

    return (f"<script>{get_plotlyjs()}</script>"
            f'<script type="application/json" id="sl-spectra">{_json(pool)}</script>'
            f"<script>{_PAGE_JS}</script>")


def fragments(maps: dict[str, dict[str, np.ndarray]], order: list[str] | None = None) -> dict[str, str]:
    """HTML fragment of every layer's map (in ``order``); the first one starts with :func:`page_assets`."""
    names = [n for n in (order or list(maps)) if n in maps]
    if not names:
        return {}
    maps = {n: maps[n] for n in names}
    pool, index = _spectra_pool(maps)
    out = {n: layer_fragment(maps[n], index) for n in names}
    out[names[0]] = page_assets(pool) + out[names[0]]
    return out


_PAGE_JS = r"""
(function () {
  "use strict";
  var SL = window.spectrolens = window.spectrolens || {};
  SL.maps = SL.maps || {};
  var VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];
  var CLASSES = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f"];
  var MISSING = "#d0d0d0";
  var pool = null;

  function rgb(h) { return [1, 3, 5].map(function (i) { return parseInt(h.substr(i, 2), 16); }); }
  function viridis(t) {
    t = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
    var i = Math.min(VIRIDIS.length - 2, Math.floor(t)), f = t - i, a = rgb(VIRIDIS[i]), b = rgb(VIRIDIS[i + 1]);
    return "rgb(" + [0, 1, 2].map(function (k) { return Math.round(a[k] + f * (b[k] - a[k])); }).join(",") + ")";
  }
  function el(tag, text, cls) { var e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }

  function spectraPool() {
    if (pool) return pool;
    var p = JSON.parse(document.getElementById("sl-spectra").textContent);
    var bin = atob(p.data), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    p.q = new Int16Array(bytes.buffer);
    pool = p;
    return p;
  }
  SL.spectrum = function (row) {
    var p = spectraPool(), g = p.g, nc = p.channels || 2, out = [];
    for (var j = 0; j < nc; j++) {
      var y = new Array(g), any = false;
      for (var k = 0; k < g; k++) {
        var q = p.q[(row * nc + j) * g + k];
        y[k] = q === -32768 ? null : p.lo + (q + 32767) * p.scale;
        if (y[k] !== null) any = true;
      }
      out.push(any ? y : null);
    }
    return {energy: p.energy, reference: out[0], predicted: out[1], std: nc > 2 ? out[2] : null, transform: p.transform};
  };

  function init(box) {
    var d = JSON.parse(box.querySelector("script.imap-data").textContent);
    var gd = box.querySelector(".plotly-graph-div");
    var st = {d: d, box: box, gd: gd, index: {}, traces: [], traceCluster: [], base: []};
    d.ids.forEach(function (id, i) { st.index[id] = i; });
    gd.data.forEach(function (tr, t) {
      var c = parseInt(String(tr.name).split(" ")[0], 10);
      st.traceCluster.push(c);
      st.base.push(tr.marker.color);
      st.traces.push(d.cluster.map(function (x, i) { return x === c ? i : -1; }).filter(function (i) { return i >= 0; }));
    });
    SL.maps[d.layer] = st;
    box.querySelector("select.imap-colour").addEventListener("change", function (e) { SL.colourBy(d.layer, e.target.value); });
    gd.on("plotly_click", function (ev) {
      var pt = ev && ev.points && ev.points[0];
      if (!pt) return;
      var id = pt.customdata ? pt.customdata[0] : d.ids[st.traces[pt.curveNumber][pt.pointNumber]];
      SL.showMaterial(d.layer, id);
    });
    gd.on("plotly_legendclick", function (ev) { SL.showCluster(d.layer, st.traceCluster[ev.curveNumber]); return false; });
    // the taxonomy tree of this layer: a click on a node lists the materials of the clusters it holds
    document.querySelectorAll('.tree-node[data-layer="' + d.layer + '"]').forEach(function (sp) {
      sp.style.cursor = "pointer";
      sp.style.textDecoration = "underline dotted";
      sp.addEventListener("click", function (e) {
        e.preventDefault();
        var cs = sp.dataset.clusters ? sp.dataset.clusters.split(",").map(Number) : [];
        SL.showClusters(d.layer, cs, sp.textContent);
        box.querySelector(".imap-members").scrollIntoView({block: "nearest"});
      });
    });
    // the report's cluster list of this layer (just above the map): a click lists the cluster's members
    var ul = box.previousElementSibling;
    while (ul && ul.tagName === "SCRIPT") ul = ul.previousElementSibling;  // the first map follows the page's scripts
    if (ul && ul.matches("ul.summary")) {
      ul.querySelectorAll("li").forEach(function (li) {
        var m = /^cluster (\d+):/.exec(li.textContent);
        if (!m) return;
        li.style.cursor = "pointer";
        li.title = "click: list the members of cluster " + m[1];
        li.addEventListener("click", function () {
          SL.showCluster(d.layer, parseInt(m[1], 10));
          box.querySelector(".imap-members").scrollIntoView({block: "nearest"});
        });
      });
    }
  }

  SL.colourBy = function (layer, key) {
    var st = SL.maps[layer], legend = st.box.querySelector(".imap-legend");
    legend.textContent = "";
    st.box.querySelector("select.imap-colour").value = key;
    if (!key) { Plotly.restyle(st.gd, {"marker.color": st.base}); return; }
    var spec = st.d.colours[key], colour;
    if (spec.kind === "continuous") {
      var v = spec.values.filter(function (x) { return x !== null; });
      var lo = Math.min.apply(null, v), hi = Math.max.apply(null, v), span = hi > lo ? hi - lo : 1;
      colour = function (i) { var x = spec.values[i]; return x === null ? MISSING : viridis((x - lo) / span); };
      var bar = el("span", "", "imap-bar");
      bar.style.cssText = "display:inline-block;width:160px;height:10px;vertical-align:middle;margin:0 .4em;background:linear-gradient(to right," + VIRIDIS.join(",") + ")";
      legend.append(el("span", spec.label + ": " + lo.toPrecision(3)), bar, el("span", hi.toPrecision(3) + " (grey: missing)"));
    } else {
      colour = function (i) { var c = spec.codes[i]; return c < 0 ? MISSING : CLASSES[c % CLASSES.length]; };
      spec.levels.forEach(function (name, c) {
        var sw = el("span", "\u25a0 ", ""); sw.style.color = CLASSES[c % CLASSES.length];
        var item = el("span", "", ""); item.append(sw, el("span", name + "  "));
        legend.append(item);
      });
      legend.append(el("span", "(grey: missing)"));
    }
    Plotly.restyle(st.gd, {"marker.color": st.traces.map(function (rows) { return rows.map(colour); })});
  };

  SL.showMaterial = function (layer, id) {
    var st = SL.maps[layer], i = st.index[id];
    if (i === undefined) return false;
    var d = st.d, box = st.box.querySelector(".imap-detail"), title = box.querySelector(".imap-title");
    var on = d.onset && d.onset[i] !== null ? d.onset[i].toFixed(2) + " eV" : "n/a";
    title.textContent = "";
    title.append(el("b", id), el("span", " " + d.formula[i] + ", cluster " + d.cluster[i] + ", onset " + on));
    var s = d.spec[i] >= 0 ? SL.spectrum(d.spec[i]) : null, traces = [];
    if (s && s.reference) traces.push({x: s.energy, y: s.reference, name: "reference", mode: "lines", line: {color: "#222"}});
    if (s && s.predicted) traces.push({x: s.energy, y: s.predicted, name: "predicted", mode: "lines", line: {color: "#d62728", dash: "dash"}});
    if (s && s.predicted && s.std) {  // ensemble: mean ± 2σ (recalibrated) as a filled band
      var band = function (sign) { return s.predicted.map(function (v, k) { return v === null || s.std[k] === null ? null : v + sign * 2 * s.std[k]; }); };
      traces.push({x: s.energy, y: band(-1), name: "predicted −2σ", mode: "lines", line: {width: 0}, showlegend: false, hoverinfo: "skip"});
      traces.push({x: s.energy, y: band(1), name: "predicted ±2σ", mode: "lines", line: {width: 0}, fill: "tonexty", fillcolor: "rgba(214,39,40,0.2)"});
    }
    if (!traces.length) title.append(el("span", " (no spectrum)"));
    var unit = s && s.transform === "log10_alpha" ? "log10 \u03b1" : (s ? s.transform : "");
    Plotly.react(box.querySelector(".imap-spectrum"), traces, {height: 300, margin: {l: 50, r: 10, t: 30, b: 40},
      title: {text: id + " " + d.formula[i], font: {size: 13}}, xaxis: {title: {text: "energy (eV)"}},
      yaxis: {title: {text: unit}}, template: "plotly_white"}, {displaylogo: false, responsive: true});
    return true;
  };

  SL.showCluster = function (layer, c) { return SL.showClusters(layer, [c], "cluster " + c); };

  SL.showClusters = function (layer, cs, label) {
    var st = SL.maps[layer], d = st.d, box = st.box.querySelector(".imap-members");
    var rows = [], want = {};
    cs.forEach(function (c) { want[c] = true; });
    d.cluster.forEach(function (x, i) { if (want[x]) rows.push(i); });
    box.textContent = "";
    var n = cs.reduce(function (a, c) { return a + (d.sizes[String(c)] || 0); }, 0) || rows.length;
    var what = cs.length === 1 ? label : label + " (clusters " + cs.join(", ") + ")";
    box.append(el("h4", what + ": " + n + " materials" + (rows.length < n ? " (" + rows.length + " shown on this map; all in clusters.csv)" : "")));
    var tbl = el("table"), head = el("tr");
    ["id", "formula", "onset (eV)"].forEach(function (h) { head.append(el("th", h)); });
    tbl.append(head);
    rows.slice(0, 1000).forEach(function (i) {
      var tr = el("tr"), a = el("a", d.ids[i]);
      a.href = "#"; a.addEventListener("click", function (e) { e.preventDefault(); SL.showMaterial(layer, d.ids[i]); });
      var td = el("td"); td.append(a);
      tr.append(td, el("td", d.formula[i]), el("td", d.onset && d.onset[i] !== null ? d.onset[i].toFixed(2) : ""));
      tbl.append(tr);
    });
    box.append(tbl);
    if (rows.length > 1000) box.append(el("p", "(first 1000 listed)", "meta"));
    return rows.length;
  };

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll(".imap").forEach(init);
  });
})();
"""
