"""``spectrolens status RUN_DIR``: each stage and array task of a run, with the log of any failure.

SLURM runs: live states from accounting (``sacct``; ``squeue`` for jobs accounting has not seen
yet), for the job ids recorded in ``RUN_DIR/pipeline.json``. Local runs: the run directory's own
records. States are normalised to pending, running, completed, failed, cancelled (plus skipped:
complete before that run, and unknown). Exit code: 0 all completed, 1 something failed or was
cancelled, 3 still pending/running, 4 nothing recorded.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from toolkit.errors import SpectrolensError
from toolkit.hpc import records, stages

TERMINAL = frozenset({"completed", "failed", "cancelled", "skipped"})

_SLURM_STATE = {
    "PENDING": "pending", "REQUEUED": "pending", "REQUEUE_FED": "pending", "REQUEUE_HOLD": "pending",
    "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running",
    "RESIZING": "running", "STAGE_OUT": "running", "SIGNALING": "running",
    "COMPLETED": "completed", "CANCELLED": "cancelled", "REVOKED": "cancelled",
    "FAILED": "failed", "TIMEOUT": "failed", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed",
    "BOOT_FAIL": "failed", "DEADLINE": "failed", "PREEMPTED": "failed", "SPECIAL_EXIT": "failed",
}


class StatusError(SpectrolensError, RuntimeError):
    """SLURM accounting could not be queried (the message says which command failed and why)."""


@dataclass
class Row:
    stage: str
    task: str  # array task index, "finalize", "rank<k>" or "-"
    job_id: str
    state: str
    log: str | None  # the log to read (failure: the stderr with the traceback)
    detail: str = ""


def normalise(slurm_state: str) -> str:
    """``"CANCELLED by 0"`` -> ``"cancelled"``; unknown words -> ``"unknown"``."""
    word = slurm_state.split()[0].rstrip("+") if slurm_state.strip() else ""
    return _SLURM_STATE.get(word, "unknown")


def _expand(job_id: str) -> list[str]:
    """sacct/squeue ids: ``12_[0-3%2]`` / ``12_[1,3]`` (pending array tasks) -> ``12_0 ..``; others as is."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not m:
        return [job_id]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += [f"{base}_{i}" for i in range(int(a), int(b) + 1)]
        elif part:
            out.append(f"{base}_{part}")
    return out


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise StatusError(f"{cmd[0]} not found: run `spectrolens status` on a machine with the SLURM client tools")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise StatusError(f"{shlex.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def slurm_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """Job id (``J`` or array task ``A_t``) -> (normalised state, SLURM's words) from sacct, then squeue.

    Ids neither tool knows are absent from the result."""
    if not job_ids:
        return {}
    bases = sorted({j.split("_")[0] for j in job_ids}, key=int)
    out: dict[str, tuple[str, str]] = {}
    text = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(bases), "-o", "JobID,State,ExitCode"])
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 2:
            continue
        for jid in _expand(parts[0]):
            out[jid] = (normalise(parts[1]), parts[1])
    missing = [b for b in bases if not any(k == b or k.startswith(b + "_") for k in out)]
    if missing:
        text = _run(["squeue", "-h", "-j", ",".join(missing), "-o", "%i|%T"]) if shutil.which("squeue") else ""
        for line in text.splitlines():
            parts = line.split("|")
            if len(parts) == 2:
                for jid in _expand(parts[0]):
                    out[jid] = (normalise(parts[1]), parts[1])
    return out


def rows(run_dir: Path, rec: dict[str, Any] | None = None) -> list[Row]:
    """One row per stage (local) or per SLURM job / array task, in pipeline order."""
    rec = rec if rec is not None else records.load(run_dir)
    srecs = rec.get("stages", {})
    ids = [t["job_id"] for s in srecs.values() for j in s.get("jobs", []) for t in j.get("tasks", [])]
    ids += [str(j["job_id"]) for s in srecs.values() for j in s.get("jobs", [])]
    live = slurm_states(sorted(set(ids))) if any(s.get("jobs") for s in srecs.values()) else {}
    out: list[Row] = []
    for stage in stages.STAGES:
        s = srecs.get(stage)
        if s is None:
            continue
        if s.get("state") == "skipped" or not s.get("jobs"):
            state = s.get("state", "unknown")
            if state == "running" and not pid_alive(s.get("pid")):
                state, detail = "failed", "runner gone (killed?)"
            else:
                detail = "" if state != "skipped" else "complete before this run"
            log = s.get("log") if state in ("failed", "running", "cancelled") else None
            if s.get("returncode") not in (None, 0):
                detail = f"exit code {s['returncode']}"
            out.append(Row(stage, "-", "-", state, log, detail))
            continue
        for j in s["jobs"]:
            for t in j["tasks"]:
                jid = t["job_id"] if j["role"] in ("array", "single", "finalize") or len(j["tasks"]) == 1 \
                    else str(j["job_id"])
                state, raw = live.get(jid) or live.get(str(j["job_id"])) or ("unknown", "not in sacct/squeue")
                if j["role"] == "array":
                    task = str(t["task"])
                elif j["role"] == "ranks":
                    task = f"rank{t['task']}"
                else:
                    task = j["role"] if j["role"] == "finalize" else "-"
                detail = raw if state in ("failed", "cancelled", "unknown") else ""
                if state == "cancelled" and "DependencyNeverSatisfied" not in raw and _dependency_failed(live, s):
                    detail = f"{raw}: a job it depends on did not complete"
                log = t["stderr"] if state in ("failed", "cancelled", "running") else None
                out.append(Row(stage, task, jid, state, log, detail))
    return out


def _dependency_failed(live: dict[str, tuple[str, str]], stage_record: dict[str, Any]) -> bool:
    return any(live.get(a, ("",))[0] in ("failed", "cancelled") for a in stage_record.get("after", []))


def pid_alive(pid: int | None) -> bool:
    """Whether a local stage's process still exists (signal 0)."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError):
        return False


def summary_code(rs: list[Row]) -> int:
    if not rs:
        return 4
    if any(r.state in ("failed", "cancelled") for r in rs):
        return 1
    if any(r.state not in TERMINAL for r in rs):
        return 3
    return 0


def render(run_dir: Path, rs: list[Row], rec: dict[str, Any], out: TextIO = sys.stdout) -> None:
    print(f"{run_dir}  (executor: {rec.get('executor', '?')}, updated {rec.get('updated', '?')})", file=out)
    header = ("stage", "task", "job", "state", "log / detail")
    table = [header] + [(r.stage, r.task, r.job_id, r.state, " ".join(x for x in (r.log or "", r.detail) if x))
                        for r in rs]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4], file=out)
    failed = [r for r in rs if r.state == "failed" and r.log]
    for r in failed:
        print(f"\n{r.stage} {r.task} failed: see {r.log}", file=out)


def main(run_dir: Path) -> int:
    """Print the status table of ``run_dir``; returns the exit code described in the module docstring."""
    run_dir = Path(run_dir)
    if not records.path(run_dir).is_file():
        print(f"spectrolens status: {records.path(run_dir)} does not exist (no pipeline ran in {run_dir})",
              file=sys.stderr)
        return 4
    rec = records.load(run_dir)
    try:
        rs = rows(run_dir, rec)
    except StatusError as e:
        print(f"spectrolens status: {e}", file=sys.stderr)
        return 2
    render(run_dir, rs, rec)
    return summary_code(rs)
