"""A tiny sharded stage for the launcher tests (the contract of toolkit.sharded, nothing else).

Unit ``u`` writes ``RUN_DIR/fake/unit-<u>.json`` ({unit, value = u*u, pid, host}) and appends one line
to ``RUN_DIR/fake/writes.log`` (so a test can count how often each unit was built); finalize writes
``RUN_DIR/fake/result.json``. ``FAKE_UNIT_SECONDS`` slows every unit down (concurrency tests);
``FAKE_FAIL_UNIT`` makes that unit raise.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from toolkit.errors import SpectrolensError
from toolkit.runtime import write_json

NAME = "fake"
UNIT = "unit"
N_UNITS = 6


class FakeError(SpectrolensError, RuntimeError):
    pass


Error = FakeError


def workers(cfg) -> int:
    return 2


def device(cfg) -> str:
    return "cpu"


def _dir(run_dir) -> Path:
    return Path(run_dir) / "fake"


def plan(cfg, run_dir) -> int:
    d = _dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    p = d / "plan.json"
    if not p.is_file():
        with open(d / "plans.log", "a") as fh:  # a test checks the plan ran once
            fh.write(f"{os.getpid()}\n")
        write_json(p, {"n_units": N_UNITS})
    return json.loads(p.read_text())["n_units"]


def unit_done(run_dir, unit: int) -> bool:
    return (_dir(run_dir) / f"unit-{unit}.json").is_file()


def run_units(cfg, run_dir, units: list[int]) -> None:
    for u in units:
        if os.environ.get("FAKE_FAIL_UNIT") == str(u):
            raise FakeError(f"unit {u} fails as asked")
        time.sleep(float(os.environ.get("FAKE_UNIT_SECONDS", "0")))
        with open(_dir(run_dir) / "writes.log", "a") as fh:
            fh.write(f"{u} {os.getpid()}\n")
        write_json(_dir(run_dir) / f"unit-{u}.json",
                   {"unit": u, "value": u * u, "pid": os.getpid(), "host": socket.gethostname()})


def finalize(cfg, run_dir) -> dict:
    n = plan(cfg, run_dir)
    missing = [u for u in range(n) if not unit_done(run_dir, u)]
    if missing:
        raise FakeError(f"units {missing} are not done")
    units = [json.loads((_dir(run_dir) / f"unit-{u}.json").read_text()) for u in range(n)]
    result = {"n_units": n, "sum": sum(x["value"] for x in units), "pids": [x["pid"] for x in units]}
    write_json(_dir(run_dir) / "result.json", result)
    return result
