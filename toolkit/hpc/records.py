"""``RUN_DIR/pipeline.json``: what the runner did with each stage (the status command's input).

Layout::

    {"run_dir": ..., "executor": "local" | "slurm", "updated": ISO time,
     "stages": {STAGE: StageRecord},             # latest submission / run of each stage
     "history": [{"stamp": ..., "executor": ..., "stages": {...}}, ...]}   # every earlier one

A StageRecord (plain dict) has ``state`` (``skipped`` = complete before this run; local runs:
``running | completed | failed | cancelled``; SLURM: ``submitted``, live states come from sacct),
``stamp``, and either ``log``/``returncode``/``command`` (local) or ``jobs`` (SLURM): a list of
``{"role": "array" | "finalize" | "ranks" | "single", "job_id": str, "tasks": [{"task": t,
"job_id": "J_t", "stdout": path, "stderr": path}]}``. Writes are atomic (tmp + rename).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

FILENAME = "pipeline.json"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def stamp() -> str:
    """A fresh, sortable submission stamp (UTC, microseconds: unique per submission)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S_%fZ")


def path(run_dir: Path) -> Path:
    return Path(run_dir) / FILENAME


def load(run_dir: Path) -> dict[str, Any]:
    """The run's pipeline record (an empty one if the pipeline never ran there)."""
    p = path(run_dir)
    if not p.is_file():
        return {"run_dir": str(Path(run_dir).absolute()), "stages": {}, "history": []}
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); it is written atomically, so it was edited by hand") from e


def save(run_dir: Path, rec: dict[str, Any]) -> None:
    rec["updated"] = now()
    p = path(run_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{FILENAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec, indent=1, default=str))
    os.replace(tmp, p)


def set_stage(run_dir: Path, stage: str, record: dict[str, Any], executor: str) -> dict[str, Any]:
    """Replace ``stage``'s record (the previous one moves to ``history``) and save; returns the record."""
    rec = load(run_dir)
    old = rec["stages"].get(stage)
    if old is not None and old.get("state") != "skipped":
        rec.setdefault("history", []).append({"stage": stage, **old})
    rec["executor"] = executor
    rec["stages"][stage] = record
    save(run_dir, rec)
    return record


def update_stage(run_dir: Path, stage: str, **fields: Any) -> None:
    """Update fields of ``stage``'s current record in place and save."""
    rec = load(run_dir)
    rec["stages"].setdefault(stage, {}).update(fields)
    save(run_dir, rec)
