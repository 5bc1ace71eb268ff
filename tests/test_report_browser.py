"""The HTML report opens in a real headless Chromium without console errors, loads nothing from
the network, shows every figure (decoded <img> elements), and its screenshot is written.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in, fd 4
out, NUL-separated JSON), so console messages, uncaught exceptions, log entries and network
requests are read as structured events rather than scraped from logs."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolkit.config import load_config
from toolkit.data import prepare

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe", "--window-size=1280,2400", "--hide-scrollbars"]


class DevTools:
    """Minimal Chrome DevTools Protocol client over --remote-debugging-pipe."""

    def __init__(self, user_data_dir: Path):
        to_r, to_w = os.pipe()      # we write, chromium reads on fd 3
        from_r, from_w = os.pipe()  # chromium writes on fd 4, we read
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=lambda: (os.dup2(to_r, 3), os.dup2(from_w, 4)))
        os.close(to_r)
        os.close(from_w)
        self.w = os.fdopen(to_w, "wb", buffering=0)
        self.r = os.fdopen(from_r, "rb", buffering=0)
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self.buf:
            left = deadline - time.time()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise TimeoutError("no answer from chromium over the DevTools pipe")
            chunk = self.r.read(1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed the DevTools pipe: {self.proc.stderr.read().decode()[-2000:]}")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        req = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            req["sessionId"] = session
        self.w.write(json.dumps(req).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        for m in self.events:
            if m.get("method") == method:
                return m
        while True:
            m = self._read(deadline)
            self.events.append(m)
            if m.get("method") == method:
                return m

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - closing best effort; the process is killed below
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    sets = ["data.benchmark.n_materials=60", "data.shard_size=60", "data.workers=1", "analyze.workers=1",
            "analyze.permutation_repeats=2", "analyze.probe_folds=3", "analyze.max_clusters=6"]
    prepare.run(load_config(None, sets), root)
    # the stage through the real command line, in its own process
    args = [sys.executable, "-m", "toolkit.cli", "analyze", "--run-dir", str(root)]
    for s in sets:
        args += ["--set", s]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "analyze" / "report" / "index.html"


def _open_in_chromium(page: Path, tmp_path: Path, actions: tuple[str, ...] = ()) -> tuple[dict, list, list, bytes]:
    """Load ``page`` in headless Chromium: (DOM state, console/log errors, requested URLs, screenshot PNG).
    ``actions``: JavaScript expressions evaluated in order after the load (promises awaited); their
    values are ``state["actions"]`` (an expression that throws fails the call)."""
    dt = DevTools(tmp_path / "profile")
    try:
        target = dt.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sess = dt.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            dt.call(f"{domain}.enable", session=sess)
        dt.call("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 2400, "deviceScaleFactor": 1,
                                                       "mobile": False}, session=sess)
        dt.call("Page.navigate", {"url": page.as_uri()}, session=sess)
        dt.wait_event("Page.loadEventFired")
        state = dt.call("Runtime.evaluate", {"returnByValue": True, "expression": """({
            images: document.images.length,
            decoded: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 100).length,
            title: document.title, summaries: document.querySelectorAll('ul.summary li').length,
            text: document.body.innerText,
            tables: document.querySelectorAll('table').length})"""},
                        session=sess)["result"]["value"]
        state["actions"] = []
        for expr in actions:
            r = dt.call("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True},
                        session=sess)
            if "exceptionDetails" in r:
                raise AssertionError(f"{expr[:200]} threw: {r['exceptionDetails']}")
            state["actions"].append(r["result"].get("value"))
        shot = dt.call("Page.captureScreenshot", {"format": "png"}, session=sess)["data"]
    finally:
        dt.close()
    errors = [e for e in dt.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    requests = [e["params"]["request"]["url"] for e in dt.events if e.get("method") == "Network.requestWillBeSent"]
    return state, errors, requests, base64.b64decode(shot)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/setup.sh --test installs it)")
def test_report_renders_without_console_errors(report, tmp_path):
    state, errors, requests, png = _open_in_chromium(report, tmp_path)
    out = tmp_path / "report.png"
    out.write_bytes(png)
    if os.environ.get("SPECTROLENS_KEEP_SCREENSHOT"):
        shutil.copy(out, os.environ["SPECTROLENS_KEEP_SCREENSHOT"])
    assert not errors, errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert state["images"] == 6 and state["decoded"] == 6, state  # 5 figures of one clustering + layer comparison
    assert state["summaries"] >= 2 and "spectrolens analysis" in state["title"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000


def _map_uri() -> str:
    """A real attribution map (toolkit.explain.maps) of rock-salt NaCl with made-up attributions, as a data URI."""
    import base64
    import io

    import matplotlib.pyplot as plt
    import numpy as np
    from pymatgen.core import Lattice, Structure

    from toolkit.data.graphs import structure_graph
    from toolkit.explain.maps import attribution_map

    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    g = structure_graph(s)
    rec = {"id": "NaCl", "formula": "NaCl", "cluster": 0, "target_kind": "window",
           "atoms": [{"site": i, "element": sp.symbol, "attribution": 0.1 * (-1) ** i} for i, sp in enumerate(s.species)],
           "bonds": {"src": g.edge_src.tolist(), "dst": g.edge_dst.tolist(),
                     "length": np.linalg.norm(g.edge_vec, axis=1).tolist(), "attribution": np.linspace(-1, 1, len(g.edge_src)).tolist()},
           "angles": {"centre": [], "angle_deg": [], "attribution": []}, "target": 1.0, "baseline_target": 0.0, "total": 1.0}
    fig = attribution_map(rec, s.lattice.matrix, s.frac_coords)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/setup.sh --test installs it)")
def test_report_with_counterfactuals_renders_without_console_errors(report, tmp_path, monkeypatch):
    """The report as explain's finalize re-renders it (saved figures + attribution.json + the
    counterfactual tables) opens without errors and shows the counterfactual section."""
    import toolkit.analyze as analyze

    run_dir = report.parents[2]
    table = {"columns": ["type", "label", "feature", "n", "mean"],
             "rows": [{"type": "anion_substitution", "label": "S->O", "feature": "onset", "n": 7, "mean": 2.27}]}
    explain = {"available": True, "counts": {"n_materials": 7, "n_edits": 40, "n_rejects": 2, "n_extrapolated": 1},
               "headline": ["replacing S by O raises the predicted onset by 2.27 ± 0.28 eV in 7 of 7 materials"],
               "onset_effects": table["rows"], "effects": table, "effects_by_cluster": table,
               "rejects": {"columns": ["reason", "count"], "rows": [{"reason": "overlapping atoms", "count": 2}]},
               "attribution_elements": {"columns": ["key", "mean_per_material"], "rows": [{"key": "O", "mean_per_material": 0.4}]},
               "attribution_quality": {"n_materials": 7, "completeness_error_max": 1e-4, "completeness_error_median": 1e-7,
                                       "share_mean": {"atoms": 0.6, "bonds": 0.3, "angles": 0.1}}}
    explain["maps"] = [{"id": "NaCl", "formula": "NaCl", "cluster": 0, "data_uri": _map_uri()}]
    monkeypatch.setattr(analyze, "_explain", lambda rd: explain)
    page = analyze.rerender_report(run_dir)
    state, errors, requests, png = _open_in_chromium(page, tmp_path)
    assert not errors, errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert state["images"] == 7 and state["decoded"] == 7, state  # the saved figures came back + one attribution map
    assert "What the model learned" in state["text"] and "attribution maps of representative" in state["text"]
    assert "replacing S by O raises the predicted onset" in state["text"]  # rendered, not only in the source
    assert "descriptor ranking vs. the model's counterfactuals" in (page.read_text())
