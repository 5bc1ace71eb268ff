"""Every sharded stage ends with a one-screen summary of what it wrote and where (issue 21, item 4):
toolkit.sharded.closing_summary from the stage's summary counts and its outputs()."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from toolkit import sharded
from toolkit.config import load_config
from toolkit.data import prepare


def test_closing_summary_lists_counts_and_outputs(tmp_path):
    (tmp_path / "a.csv").write_text("x\n")
    mod = SimpleNamespace(NAME="demo", outputs=lambda rd: [("table", rd / "a.csv"), ("store", rd / "b.zarr")])
    text = sharded.closing_summary(mod, tmp_path, {"n_materials": 12, "n_rejects": 0, "complete": True, "n_x": "no"})
    lines = text.splitlines()
    assert lines[0] == "demo: done (materials 12, rejects 0)"
    assert lines[1].split() == ["table", str(tmp_path / "a.csv")]
    assert str(tmp_path / "b.zarr") in lines[2] and lines[2].endswith("(not written)")
    assert lines[-1].split() == ["logs", str(tmp_path / "logs" / "demo")]


def test_prepare_ends_with_its_summary(tmp_path, caplog):
    cfg = load_config(None, ["data.source=benchmark", "data.benchmark.n_materials=12", "data.grid.num=51",
                             "data.shard_size=6", "data.workers=1"])
    with caplog.at_level(logging.INFO, logger="toolkit.sharded"):
        sharded.run_inline(prepare, cfg, tmp_path)
    msg = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("prepare: done"))
    assert "materials 12" in msg
    for path in (tmp_path / "dataset.zarr", tmp_path / "prepare" / "rejects.csv", tmp_path / "prepare" / "summary.json"):
        assert str(path) in msg and path.exists()
    assert "(not written)" not in msg
