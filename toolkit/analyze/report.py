"""The self-contained HTML report (``RUN_DIR/analyze/report/index.html``) and plain-language
cluster summaries. Figures are embedded as PNG data URIs; the page loads nothing from the network
(its Content-Security-Policy forbids it) and runs no script."""

from __future__ import annotations

import html
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any


ALPHA = 0.05


def _fmt_q(q: float) -> str:
    return f"{q:.0e}" if q < 0.01 else f"{q:.2f}"


_WORDS = {"element": "{}", "anion": "{}s", "cation_class": "{} cations", "coordination": "{} cations",
          "oxidation": "{}", "spacegroup": "space group {}", "crystal_system": "{} cells", "fraction": "{}-rich"}


def phrase(r: dict[str, Any]) -> str:
    """Short words for one test result, e.g. ``Te`` / ``octahedral cations`` / ``high cn_mean (6.0 vs 4.0)``."""
    fam, _, val = r["descriptor"].partition(":")
    if fam in _WORDS:
        return _WORDS[fam].format(val.replace("_", " ") if fam in ("cation_class", "coordination") else val)
    word = "high" if r["effect"] > 0 else "low"
    return f"{word} {r['descriptor']} ({r['in_cluster']:.3g} vs {r['rest']:.3g})"


def cluster_summary(c: int, size: int, onset: dict | None, ranked: list[dict], n: int = 3) -> str:
    """"cluster 7: 41 materials, onset 1.6 ± 0.3 eV, enriched in Te (q = 1e-09), ..."."""
    parts = [f"cluster {c}: {size} materials"]
    if onset and onset.get("n"):
        parts.append(f"onset {onset['mean']:.1f} ± {onset['std']:.1f} eV")
    else:
        parts.append("onset unknown")
    sig = [r for r in ranked if r["q"] < ALPHA][:n]
    q = lambda r: f"{phrase(r)} (q = {_fmt_q(r['q'])})"  # noqa: E731
    up = [q(r) for r in sig if r["test"] == "fisher" and r["effect"] > 0]
    down = [q(r) for r in sig if r["test"] == "fisher" and r["effect"] <= 0]
    cont = [q(r) for r in sig if r["test"] == "mannwhitney"]
    if up:
        parts.append("enriched in " + " and ".join(up))
    if down:
        parts.append("depleted in " + " and ".join(down))
    if cont:
        parts.append("with " + " and ".join(cont))
    if not sig:
        parts.append("no descriptor significantly different from the rest")
    return ", ".join(parts)


def where_structure_becomes_spectrum(attribution: dict[str, Any]) -> str:
    """One sentence from the layer comparison and the probes (model layers only, not the baselines)."""
    layers = {n: L for n, L in attribution["layers"].items() if not n.startswith("spectrum_")}
    if not layers:
        return "No model layers were analysed (no embeddings): only the spectra baselines are shown."
    parts = []
    ami = {n: L["ami_reference"] for n, L in layers.items() if L.get("ami_reference") is not None}
    if ami:
        best = max(ami, key=ami.get)
        parts.append(f"The clusters of {best} agree best with the clusters of the reference spectra (AMI {ami[best]:.2f}"
                     f"; {', '.join(f'{n} {v:.2f}' for n, v in ami.items())}).")
    probes = attribution.get("probes", {})
    for target, what in (("cn_mean", "the mean coordination number"), ("bond_length_mean", "the mean bond length"),
                         ("onset", "the absorption onset")):
        sc = {n: probes[n][target]["score"] for n in layers if target in probes.get(n, {})}
        if sc:
            best = max(sc, key=sc.get)
            parts.append(f"{what.capitalize()} is linearly decodable best from {best} (R² {sc[best]:.2f}).")
    return " ".join(parts) or "No layer comparison is available."


def _table(header: list[str], rows: list[list[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def render(attribution: dict[str, Any], figures: dict[str, dict[str, str]], out: Path, title: str) -> Path:
    """Write the report; ``figures[layer][name]`` are data URIs, ``figures["_global"]["layers"]`` the
    layer-comparison figure."""
    tpl = Template(resources.files("toolkit.analyze").joinpath("templates/report.html").read_text())
    layers = attribution["layers"]
    nav = " ".join(f'<a href="#layer-{html.escape(n)}">{html.escape(n)}</a>' for n in layers)
    rec = attribution.get("benchmark_recovery")
    ov = [f"<p>{attribution['n_materials']} materials, {len(layers)} clusterings "
          f"({', '.join(html.escape(n) for n in layers)}). Descriptors: {attribution['descriptors']['n_descriptors']} "
          f"({attribution['descriptors']['n_failures']} missing values recorded in descriptor_failures.csv).</p>"]
    if rec:
        ov.append(f"<p>Benchmark recovery (precision@{rec['k']} of planted drivers among each cluster's top "
                  f"descriptors): overall {rec['overall']:.2f}; "
                  + ", ".join(f"{html.escape(k)} {v['precision']:.2f}" for k, v in rec["per_layer"].items()) + ".</p>")
    rows = [[n, L["clustering"]["n_clusters"], L["clustering"]["mode"],
             "" if L.get("ami_reference") is None else f"{L['ami_reference']:.2f}",
             "" if L["surrogate"].get("holdout_balanced_accuracy") is None else f"{L['surrogate']['holdout_balanced_accuracy']:.2f}"]
            for n, L in layers.items()]
    ov.append(_table(["clustering", "clusters", "mode", "AMI vs reference spectra", "surrogate balanced accuracy"], rows))
    ov.append(f"<p>{html.escape(where_structure_becomes_spectrum(attribution))}</p>")
    glob = figures.get("_global", {})
    lay = [_img(glob["layers"], "layer comparison")] if "layers" in glob else ["<p>No layer comparison.</p>"]
    probes = attribution.get("probes", {})
    if probes:
        targets = sorted({t for p in probes.values() for t in p})
        lay.append(_table(["layer", *targets], [[n, *(f"{p[t]['score']:.2f}" if t in p else "" for t in targets)]
                                                 for n, p in probes.items()]))
    sections = []
    for name, L in layers.items():
        f = figures.get(name, {})
        s = [f'<h2 id="layer-{html.escape(name)}">{html.escape(name)}</h2>',
             f"<p class='meta'>{html.escape(L['clustering']['criterion'])}; preprocessing: "
             f"{html.escape(str(L['clustering']['preprocessing']))}</p>",
             '<ul class="summary">' + "".join(f"<li>{html.escape(c['summary'])}</li>" for c in L["clusters"].values()) + "</ul>"]
        for key, alt in (("dendrogram", "dendrogram"), ("map", "2-D map of the embedding"),
                         ("spectra", "cluster mean spectra"), ("enrichment", "enrichment heatmap"),
                         ("elements", "element maps")):
            if key in f:
                s.append(f"<h3>{html.escape(alt)}</h3>" + _img(f[key], f"{name}: {alt}"))
        imp = list(L["surrogate"].get("importances", {}).items())[:10]
        if imp:
            s.append("<h3>surrogate classifier: permutation importances</h3>")
            s.append(_table(["descriptor", "importance (mean)", "std"], [[k, f"{v['mean']:.3f}", f"{v['std']:.3f}"] for k, v in imp]))
        sections.append("\n".join(s))
    meta = html.escape(f"run: {attribution.get('run_dir', '')}; generated {attribution.get('generated', '')}")
    page = tpl.substitute(title=html.escape(title), meta=meta, nav=nav, overview="\n".join(ov),
                          layers="\n".join(lay), sections="\n".join(sections))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
