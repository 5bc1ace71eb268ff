"""benchmarks/gpu_suite.py runs correctly on CPU at tiny sizes, so that the first GPU machine lent only
has to start it (issue 19). Real structures (the study's POSCARs), the production training step,
the embed stage's extraction, upstream's pure model when installed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow  # ~20-40 s on 2 cores
def test_gpu_suite_runs_on_cpu_at_tiny_sizes(tmp_path, shared_data):
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "suite.json"
    res = gpu_suite.main(["--device", "cpu", "--tiny", "--no-compile", "--data", str(shared_data / "paper_structures"),
                          "--json", str(out)])
    assert set(res["train"]) == {"fp32", "bf16"}
    for key, v in res["train"].items():
        assert "error" not in v, (key, v)
        big, ref = v["largest"], v["at_reference_batch"]
        assert big["batch"] in (4, 8) and big["structures_per_s"] > 0 and ref["batch"] == 4
        assert [t["batch"] for t in big["tried"]] == [4, 8]  # doubling search up to --max-batch
    ex = res["extraction"]
    assert ex["materials_per_s"] > 0 and ex["layers"] >= 3 and math.isfinite(ex["ratio_to_best_training"])
    assert 0 < res["loader"]["share"] < 1
    try:
        import alignn.models.alignn_atomwise_pure  # noqa: F401
        assert res["upstream_pure"]["structures_per_s"] > 0 and res["upstream_pure"]["ratio_ours_fp32"] > 0
    except ImportError:
        assert res["upstream_pure"] is None
    written = json.loads(out.read_text())
    assert written["name"] == "gpu_suite" and written["rows"] and written["details"]["extraction"]["batch"] == ex["batch"]
