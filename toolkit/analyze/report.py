"""The self-contained HTML report (``RUN_DIR/analyze/report/index.html``) and plain-language
cluster summaries. Figures are embedded as PNG data URIs; the page loads nothing from the network
(its Content-Security-Policy forbids it) and runs only its own inline scripts: the interactive maps
(:mod:`toolkit.analyze.interactive`, plotly.js embedded)."""

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


def _word(name: str) -> str | None:
    """Short words for a 0/1 descriptor name (``anion:oxide`` -> ``oxides``), None for others."""
    fam, _, val = name.partition(":")
    if fam in _WORDS and val:
        return _WORDS[fam].format(val.replace("_", " ") if fam in ("cation_class", "coordination") else val)
    return None


def _covers(r: dict[str, Any], n: int = 2) -> str:
    """`` (with Tl+1, Tl)``: the first ``n`` descriptors folded under a ranking entry
    (:mod:`toolkit.analyze.signals`), '' when none."""
    cov = r.get("covers") or []
    if not cov:
        return ""
    words = [_word(c) or c for c in cov[:n]]
    return f" (with {', '.join(words)}{', ...' if len(cov) > n else ''})"


def phrase(r: dict[str, Any]) -> str:
    """Short words for one test result, e.g. ``Te`` / ``octahedral cations`` / ``high cn_mean (6.0 vs 4.0)``,
    followed by the descriptors folded under it (``lone pair p cations (with Tl+1, Tl)``)."""
    w = _word(r["descriptor"])
    if w is not None:
        return w + _covers(r)
    word = "high" if r["effect"] > 0 else "low"
    return f"{word} {r['descriptor']} ({r['in_cluster']:.3g} vs {r['rest']:.3g})" + _covers(r)


def split_phrase(d: dict[str, Any]) -> str:
    """Short words for a descriptor that is higher (more prevalent) on one side of a split, e.g.
    ``oxides`` / ``partial d cations`` / ``high bond_length_mean``, with what it covers."""
    w = _word(d["descriptor"])
    if d.get("kind", "categorical" if w else "continuous") == "categorical" and w is not None:
        return w + _covers(d)
    return f"high {d['descriptor']}" + _covers(d)


def cluster_summary(c: int, size: int, onset: dict | None, ranked: list[dict], n: int = 3,
                    feature: tuple[str, str] = ("onset", "eV")) -> str:
    """"cluster 7: 41 materials, onset 1.6 ± 0.3 eV, enriched in Te (q = 1e-09), ..."; ``feature``: the
    name and units of the headline feature (another target's, e.g. ("band_gap", "eV"))."""
    parts = [f"cluster {c}: {size} materials"]
    label, units = feature
    if onset and onset.get("n"):
        parts.append(f"{label} {onset['mean']:.3g} ± {onset['std']:.2g}{' ' + units if units else ''}"
                     if label != "onset" else f"onset {onset['mean']:.1f} ± {onset['std']:.1f} eV")
    else:
        parts.append(f"{label} unknown")
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


def _split_side(sp: dict[str, Any], side: int, alpha: float) -> str:
    ds = [d for d in sp["descriptors"] if d["direction"] == side and d["q"] < alpha]
    if not ds:
        return "no significant descriptor"
    return "; ".join(f"{split_phrase(d)} ({'Δ share' if d['kind'] == 'categorical' else 'SMD'} "
                     f"{abs(d['effect']):.2f}, q = {_fmt_q(d['q'])})" for d in ds[:3])


def hierarchy_html(hier: dict[str, Any], max_depth: int = 8, max_splits: int = 150, layer: str = "") -> str:
    """The explained Ward tree as nested ``<details>`` from the top split down: every split shows what
    each child is richer in, and the splits below a child are nested under it. Each child carries the
    default-level clusters it holds (``data-clusters``), so the interactive map lists its members on a
    click (toolkit.analyze.interactive)."""
    cc = hier.get("child_clusters") or {}

    def node(c: int) -> str:
        cl = cc.get(str(c))
        if cl is None:
            return f"node {c}"
        return (f'<span class="tree-node" data-layer="{html.escape(layer)}" data-clusters="{",".join(map(str, cl))}" '
                f'title="click: list its materials (clusters {html.escape(", ".join(map(str, cl)))})">node {c}</span>')
    splits = hier.get("splits", [])
    if not splits:
        return (f"<p>No split with both children of at least {hier.get('min_split_size')} materials "
                "(analyze.min_split_size).</p>")
    by_node = {sp["node"]: sp for sp in splits}
    under: dict[int | None, list[int]] = {}  # child node (side of a split) -> explained splits below it
    for sp in splits:
        under.setdefault(sp.get("parent_side"), []).append(sp["node"])
    alpha = hier.get("alpha", ALPHA)
    shown = [0]

    def render_split(sp: dict[str, Any], depth: int) -> str:
        shown[0] += 1
        head = f"{sp['size']} materials → " + " | ".join(f"node {c} ({n})" for c, n in zip(sp["children"], sp["sizes"]))
        body = ["<ul>"]
        for c in sp["children"]:
            body.append(f"<li>{node(c)}: {html.escape(_split_side(sp, c, alpha))}")
            if depth < max_depth:
                for k in under.get(c, []):
                    if shown[0] >= max_splits:
                        body.append("<p class='meta'>(further splits in attribution.json)</p>")
                        break
                    body.append(render_split(by_node[k], depth + 1))
            body.append("</li>")
        body.append("</ul>")
        opn = " open" if depth < 2 else ""
        return f"<details{opn}><summary>{html.escape(head)}</summary>{''.join(body)}</details>"

    return "".join(render_split(by_node[r], 0) for r in under.get(None, []))


def drivers_html(drivers: dict[str, Any] | None, top: int = 10) -> str:
    """Tables of the driver ranking per spectral feature (families, descriptors, confounding)."""
    if not drivers:
        return "<p>Driver ranking not computed (analyze.drivers is off).</p>"
    out = []
    for feat, D in drivers.items():
        out.append(f"<h3>{html.escape(feat)}</h3>")
        if not D.get("model"):
            out.append(f"<p>{html.escape(D.get('reason', 'not computed'))}</p>")
            continue
        m = D["model"]
        out.append(f"<p class='meta'>{html.escape(m['model'])}, hold-out R² {m['r2_holdout']:.2f} "
                   f"({m['n']} materials, {m['n_descriptors']} descriptors); importance = {html.escape(m['importance'])}.</p>")
        fam = ", ".join(f"{f['family']} {f['importance']:.3f}" for f in D["families"][:6])
        out.append(f"<p>Families: {html.escape(fam)}.</p>")
        rows = [[r["rank"] if r["rank"] is not None else "–", r["descriptor"], r["family"], f"{r['importance']:.3f}",
                 f"{r['importance_std']:.3f}", f"{r['conditional_importance']:.3f}", f"{r['marginal']:+.2f}",
                 "" if r["within_strata_importance"] is None else f"{r['within_strata_importance']:.3f}",
                 f"rides along with {r['confounded_with']}" if r["confounded_with"] else ""]
                for r in [*D["descriptors"][:top], *[r for r in D["descriptors"][top:] if r["confounded_with"]]]]
        out.append(_table(["rank", "descriptor", "family", "importance", "std", "conditional", "marginal ρ",
                           "within strata", "confounding"], rows))
        st = D.get("strata") or {}
        if st.get("strata"):
            sfam = ", ".join(f"{f['family']} {f['importance']:.3f}" for f in st["families"][:5])
            strata = ", ".join(f"{x['stratum']} (n={x['n']})" for x in st["strata"])
            within = ", ".join(f"{k} {v:.3f}" for k, v in list(st.get("importance", {}).items())[:5])
            out.append(f"<p>Within strata of {html.escape(str(st['by']))} ({html.escape(strata)}): families "
                       f"{html.escape(sfam)}; descriptors {html.escape(within)}.</p>")
    return "\n".join(out)


#: which descriptor family each counterfactual edit type changes (the consistency table)
EDIT_FAMILY = {"anion_substitution": "anion", "cation_substitution": "cation chemistry", "strain": "bonds",
               "shell_strain": "coordination", "polyanion_centre": "polyanions"}
RANKED_MIN = 0.05   # a family "ranked" as an onset driver: permutation importance (drop in hold-out R^2) >= this
EFFECT_MIN = 0.1    # a counterfactual "effect": mean |predicted onset shift| >= this many eV
EFFECT_STRONG = 0.3  # an effect the ranking should not miss


def consistency(drivers: dict | None, effects: list[dict]) -> list[dict[str, Any]]:
    """The descriptor ranking of the onset next to the model's counterfactual onset shifts, per edit type:
    ``agree``; ``correlation, not a learned cause`` (ranked family, edits of it barely move the
    prediction); ``learned, not ranked`` (edits move the prediction, the family is not ranked)."""
    fam_imp = {f["family"]: f["importance"] for f in ((drivers or {}).get("onset") or {}).get("families", [])}
    out = []
    for etype, fam in EDIT_FAMILY.items():
        rows = [r for r in effects if r.get("type") == etype and r.get("feature") == "onset" and r.get("mean") is not None]
        if not rows:
            continue
        n = sum(int(r.get("n") or 0) for r in rows)
        shift = sum(abs(float(r["mean"])) * int(r.get("n") or 0) for r in rows) / max(n, 1)
        imp = fam_imp.get(fam)
        if imp is None:
            flag = "family not ranked (no descriptors of it tested)"
        elif imp >= RANKED_MIN and shift < EFFECT_MIN:
            flag = "correlation, not a learned cause"
        elif imp < RANKED_MIN and shift >= EFFECT_STRONG:
            flag = "learned, not ranked"
        else:
            flag = "agree"
        out.append({"edit": etype, "family": fam, "importance": imp, "mean_abs_shift_eV": shift, "n_edits": n,
                    "flag": flag})
    return out


def predicted_onset_html(po: dict | None) -> str:
    """A cluster's mean ensemble-predicted onset and ±2σ interval (attribution.json ``spectral.predicted_onset``)."""
    if not po or not po.get("n"):
        return ""
    return (f"<br><span class='meta'>predicted onset (ensemble) {po['onset']:.2f} eV, ±2σ interval "
            f"{po['onset_low']:.2f}–{po['onset_high']:.2f} eV (means over {po['n']} materials)</span>")


def novelty_html(nov: dict | None) -> str:
    """How many materials lie far from the training data (:mod:`toolkit.analyze.novelty`) and the farthest."""
    if not nov:
        return ""
    if not nov.get("available"):
        return f"<p class='meta'>Distance to the training data not computed ({html.escape(str(nov.get('reason')))}).</p>"
    s = [f"<p>Distance to the training data (readout embeddings, {html.escape(str(nov.get('training_from')))}): "
         f"{nov['n_far']} of {nov['n_other']} materials outside the training split are farther than "
         f"{nov['factor']:.3g} x the typical nearest-neighbour distance between training materials "
         f"({100 * nov['share_far']:.1f} %); predictions and cluster memberships there are extrapolations "
         f"(per material: analyze/novelty.csv). Threshold: {html.escape(str(nov.get('threshold_method', 'fixed')))}"
         + (f"; {nov['n_far_val']} of {nov['n_val']} validation and {nov['n_far_rest']} of {nov['n_rest']} other "
            f"held-out materials beyond it" if nov.get("n_val") else "") + ".</p>"]
    if nov.get("farthest"):
        s.append(_table(["material", "formula", "distance / typical"],
                        [[html.escape(r["id"]), html.escape(str(r.get("formula") or "")), f"{r['ratio']:.2f}"]
                         for r in nov["farthest"]]))
    return "\n".join(s)


def explain_html(explain: dict | None, drivers: dict | None) -> str:
    """The counterfactual section (``toolkit.explain.stage.explain_summary_for_report``); a note when absent."""
    if not explain or not explain.get("available"):
        why = (explain or {}).get("reason", "the explain stage has not run")
        return (f"<p class='meta'>No counterfactual probes ({html.escape(str(why))}). Run "
                f"<code>spectrolens explain --run-dir RUN_DIR</code> (docs/explain.md).</p>")
    c = explain["counts"]
    s = [f"<p>{c['n_edits']} edited structures of {c['n_materials']} materials through the trained model; "
         f"{c['n_rejects']} edits rejected (reasons below), {c['n_extrapolated']} flagged as far from the training "
         f"data (readout-embedding distance; the model extrapolates there).</p>",
         "<ul class='summary'>" + "".join(f"<li>{html.escape(h)}</li>" for h in explain["headline"]) + "</ul>"]
    rows = consistency(drivers, explain.get("onset_effects") or explain["effects"]["rows"])
    if rows:
        s.append("<h3>descriptor ranking vs. the model's counterfactuals (onset)</h3>")
        s.append(f"<p class='meta'>ranked: family permutation importance ≥ {RANKED_MIN}; effect: mean |shift| ≥ "
                 f"{EFFECT_MIN} eV (strong ≥ {EFFECT_STRONG} eV).</p>")
        s.append(_table(["edit", "family", "ranking importance", "mean |onset shift| (eV)", "edits", "verdict"], [
            [r["edit"], r["family"], "" if r["importance"] is None else f"{r['importance']:.3f}",
             f"{r['mean_abs_shift_eV']:.2f}", r["n_edits"], r["flag"]] for r in rows]))

    def table(key: str, title: str) -> None:
        t = explain.get(key) or {}
        if t.get("rows"):
            s.append(f"<h3>{html.escape(title)}</h3>")
            s.append(_table(t["columns"], [[_cell(r.get(col)) for col in t["columns"]] for r in t["rows"]]))

    table("effects", "predicted shifts per edit")
    table("effects_by_cluster", "onset shifts per cluster")
    q = explain.get("attribution_quality") or {}
    if q:
        s.append(f"<p class='meta'>Integrated gradients on {q.get('n_materials')} materials; completeness error "
                 f"median {_cell(q.get('completeness_error_median'))}, max {_cell(q.get('completeness_error_max'))}; "
                 f"share of the attribution on atoms / bonds / angles: "
                 f"{', '.join(f'{k} {v:.2f}' for k, v in (q.get('share_mean') or {}).items())}.</p>")
    maps = explain.get("maps") or []
    if maps:
        s.append("<h3>attribution maps of representative materials</h3>")
        s.append("<p class='meta'>Integrated gradients of the predicted target on every atom, bond and angle of one "
                 "material (red raises it, blue lowers it); atoms carry their own attribution plus that of the angles "
                 "centred on them; bars: sums by element, bond type and angle centre (docs/report.md).</p>")
        s.extend(_img(mp["data_uri"], f"attribution map of {mp.get('formula') or mp['id']} (cluster {mp['cluster']})")
                 for mp in maps)
    table("attribution_elements", "attribution by element")
    table("attribution_bonds", "attribution by bond type")
    table("attribution_angles", "attribution by angle bin")
    table("attribution_by_cluster", "attribution by cluster (mean per material of the two strongest keys)")
    table("rejects", "rejected edits")
    return "\n".join(s)


def _cell(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))


def render(attribution: dict[str, Any], figures: dict[str, dict[str, str]], out: Path, title: str,
           explain: dict | None = None, interactive: dict[str, dict] | None = None,
           experiment: str | None = None) -> Path:
    """Write the report; ``figures[layer][name]`` are data URIs, ``figures["_global"]["layers"]`` the
    layer-comparison figure; ``explain``: :func:`toolkit.explain.stage.explain_summary_for_report`;
    ``interactive``: the maps of :func:`toolkit.analyze.interactive.map_data` by layer; ``experiment``:
    the self-contained fragment of :func:`toolkit.predict.experiment.compare_spectra` (None: a note)."""
    tpl = Template(resources.files("toolkit.analyze").joinpath("templates/report.html").read_text())
    layers = attribution["layers"]
    nav = " ".join(f'<a href="#layer-{html.escape(n)}">{html.escape(n)}</a>' for n in layers)
    rec = attribution.get("benchmark_recovery")
    ov = [f"<p>{attribution['n_materials']} materials, {len(layers)} clusterings "
          f"({', '.join(html.escape(n) for n in layers)}). Descriptors: {attribution['descriptors']['n_descriptors']} "
          f"({attribution['descriptors']['n_failures']} missing values recorded in descriptor_failures.csv).</p>"]
    if rec and rec.get("summary"):
        ov.append(f"<p>Benchmark recovery: {html.escape(rec['summary'])}</p>")
        per = rec.get("per_driver") or {}
        if per:
            yes = {True: "yes", False: "no", None: "n/a"}
            ov.append(_table(["planted driver", "named by a cluster", "clusters it defines", "named in its feature's ranking"], [
                [html.escape(str(d)), yes[bool(v.get("named"))], v.get("defining_clusters", ""),
                 yes[v.get("named_in_feature_ranking")]] for d, v in per.items()]))
    ov.append(novelty_html(attribution.get("novelty")))
    from toolkit.analyze.conditions import html_section as _conditions_html

    ov.append(_conditions_html(attribution.get("conditions"), (attribution.get("target") or {}).get(
        "headline", {}).get("units", "eV")))
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
    # --- interactive maps (issue 21): toolkit.analyze.interactive; the first fragment carries plotly.js ---
    from toolkit.analyze.interactive import fragments as _imap_fragments
    imaps = _imap_fragments(interactive or {}, list(layers))
    # --- end interactive maps ---
    hier_all = attribution.get("hierarchy") or {}
    for name, L in layers.items():
        f = figures.get(name, {})
        s = [f'<h2 id="layer-{html.escape(name)}">{html.escape(name)}</h2>',
             f"<p class='meta'>{html.escape(L['clustering']['criterion'])}; preprocessing: "
             f"{html.escape(str(L['clustering']['preprocessing']))}</p>"]
        hier = hier_all.get(name)
        if hier:
            lv = ", ".join(f"k = {x['k']}" + (" (default)" if x["default"] else "") for x in hier.get("levels", []))
            s.append(f"<h3>taxonomy: the Ward tree explained top-down</h3><p class='meta'>{hier['n_splits']} splits "
                     f"with both children ≥ {hier['min_split_size']} materials; Δ share / SMD and q (Benjamini-Hochberg "
                     f"over all {hier['n_tests']} split tests) of the descriptors richer on each side. Levels: "
                     f"{html.escape(lv)}.</p>")
            s.append(f'<div class="tree">{hierarchy_html(hier, layer=name)}</div>')
        s.append(f"<h3>clusters at k = {L['clustering']['n_clusters']}</h3>")
        s.append('<ul class="summary">' + "".join(
            f"<li>{html.escape(c['summary'])}" + predicted_onset_html(c.get("spectral", {}).get("predicted_onset"))
            + (f"<br><span class='path'>{html.escape(' → '.join(c['path']))}</span>" if c.get("path") else "")
            + "</li>" for c in L["clusters"].values()) + "</ul>")
        s.append(imaps.get(name, ""))  # interactive map (issue 21)
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
                          layers="\n".join(lay), drivers=drivers_html(attribution.get("drivers")),
                          explain=explain_html(explain, attribution.get("drivers")),
                          experiment=experiment or ("<p class='meta'>No comparison with measured spectra: set "
                                                    "<code>analyze.compare_experiment</code> to a refractiveindex.info "
                                                    "database folder (docs/predict.md).</p>"),
                          sections="\n".join(sections))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
