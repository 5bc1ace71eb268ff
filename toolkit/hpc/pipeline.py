"""The pipeline runner: ``spectrolens run PIPELINE.yaml`` and ``spectrolens demo``.

:func:`run_pipeline` records the run (config.yaml, run_info.json), skips stages whose outputs are
complete, and runs the rest (prepare -> train -> embed -> analyze) with the local executor or
submits them to SLURM (:mod:`toolkit.hpc.executors`). Re-running on the same run directory resumes:
complete stages are skipped, sharded stages skip their complete parts/shards, training resumes from
``train/checkpoints/last.pt``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from importlib import resources
from pathlib import Path

from toolkit.config import ConfigError, PipelineConfig, load_config, record_run
from toolkit.hpc import records, status
from toolkit.hpc import stages as st
from toolkit.hpc.executors import LocalExecutor, SlurmExecutor, job_ids
from toolkit.layout import DEFAULT_STAGES, RunLayout
from toolkit.runtime import exclusive_or_busy

log = logging.getLogger(__name__)


def resolve_run_dir(cfg: PipelineConfig, run_dir: Path | str | None) -> Path:
    rd = run_dir if run_dir is not None else cfg.run_dir
    if rd is None:
        raise ConfigError("no run directory: pass --run-dir DIR or set run_dir in the pipeline YAML")
    return Path(rd).expanduser().absolute()


def run_pipeline(cfg: PipelineConfig, run_dir: Path | str | None = None, executor: str | None = None,
                 stages: list[str] | None = None, wait: bool = True) -> int:
    """Run (local) or submit (slurm) the requested stages; returns a process exit code (0 = success).

    ``executor``: "local" | "slurm" (default ``cfg.executor.kind``). ``wait`` (slurm): block until
    every submitted job has finished and return 0 only if all completed; else return right after
    submission (``spectrolens status RUN_DIR`` follows the jobs)."""
    rd = resolve_run_dir(cfg, run_dir)
    kind = executor or cfg.executor.kind
    if kind not in ("local", "slurm"):
        raise ConfigError(f"executor {kind!r} is not one of local, slurm")
    wanted = st.check_stages(list(stages) if stages else list(DEFAULT_STAGES))
    cfg = cfg.model_copy(deep=True, update={"run_dir": rd})
    cfg.executor.kind = kind
    rd.mkdir(parents=True, exist_ok=True)
    # one runner per run directory: a second `spectrolens run` exits with "run directory busy (pid, host)"
    with exclusive_or_busy(rd, "runner", "another `spectrolens run`"):
        return _run_or_submit(cfg, rd, kind, wanted, wait)


def _run_or_submit(cfg: PipelineConfig, rd: Path, kind: str, wanted: list[str], wait: bool) -> int:
    _refuse_if_active(rd)
    record_run(cfg, rd)
    todo = []
    for s in wanted:
        if st.is_complete(s, rd):
            log.info("%s: complete in %s, skipping", s, rd)
            records.set_stage(rd, s, {"state": "skipped", "checked": records.now()}, kind)
        else:
            todo.append(s)
    if not todo:
        log.info("every requested stage is complete in %s", rd)
        return 0
    if kind == "local":
        return _run_local(cfg, rd, todo)
    return _submit_slurm(cfg, rd, todo, wait)


def _refuse_if_active(run_dir: Path) -> None:
    """Two runners on one run directory would write the same parts: refuse while jobs are live."""
    rec = records.load(run_dir)
    ids = [j for s in rec.get("stages", {}).values() if s.get("jobs") for j in job_ids(s)]
    if ids:
        try:
            live = status.slurm_states(ids)
        except status.StatusError as e:
            log.warning("cannot check earlier jobs of %s (%s); continuing", run_dir, e)
            return
        active = sorted(j for j, (state, _) in live.items() if state in ("pending", "running"))
        if active:
            raise ConfigError(f"{run_dir} still has pending/running jobs ({', '.join(active[:10])}); wait for them "
                              f"or scancel them before re-running (see `spectrolens status {run_dir}`)")
    for name, s in rec.get("stages", {}).items():
        if s.get("state") == "running" and status.pid_alive(s.get("pid")):
            raise ConfigError(f"{run_dir}: stage {name} is running locally (pid {s['pid']}); wait for it or stop it")


def _run_local(cfg: PipelineConfig, run_dir: Path, todo: list[str]) -> int:
    ex = LocalExecutor(cfg, run_dir, run_dir / "config.yaml")
    for i, s in enumerate(todo):
        t0 = time.perf_counter()
        rc = ex.run_stage(s)
        if rc != 0:
            for later in todo[i + 1:]:
                records.set_stage(run_dir, later, {"state": "cancelled", "reason": f"{s} failed"}, "local")
            print(f"spectrolens: stage {s} failed (exit {rc}); log: {run_dir / 'logs' / s / (s + '.log')}; "
                  f"re-run the same command to resume", file=sys.stderr)
            return 1
        log.info("%s: completed in %.1f s", s, time.perf_counter() - t0)
    return 0


def _submit_slurm(cfg: PipelineConfig, run_dir: Path, todo: list[str], wait: bool) -> int:
    ex = SlurmExecutor(cfg, run_dir)
    after: list[str] = []
    submitted: list[str] = []
    for s in todo:
        rec, after = ex.submit_stage(s, after)
        submitted += job_ids(rec)
    print(f"submitted {len(submitted)} SLURM jobs/tasks for {', '.join(todo)}; folder {ex.folder}; "
          f"follow with: spectrolens status {run_dir}")
    if not wait:
        return 0
    return wait_for_jobs(run_dir, submitted, cfg.executor.poll_seconds)


def wait_for_jobs(run_dir: Path, ids: list[str], poll_seconds: float, unknown_grace_s: float = 300.0) -> int:
    """Poll accounting until every job in ``ids`` is finished; print the status table; 0 if all completed."""
    t0 = time.monotonic()
    while True:
        live = status.slurm_states(ids)
        states = [live.get(j, ("unknown", ""))[0] for j in ids]
        pending = [j for j, s in zip(ids, states) if s not in status.TERMINAL]
        if not pending:
            break
        if all(live.get(j, ("unknown",))[0] == "unknown" for j in pending) and time.monotonic() - t0 > unknown_grace_s:
            log.error("jobs %s unknown to sacct and squeue for %.0f s; giving up waiting", pending, unknown_grace_s)
            break
        time.sleep(poll_seconds)
    rs = status.rows(run_dir)
    status.render(run_dir, rs, records.load(run_dir))
    return 0 if all(s == "completed" for s in (status.slurm_states(ids).get(j, ("unknown",))[0] for j in ids)) else 1


# ------------------------------------------------------------------------------------------ demo
DEMO_RESOURCE = "demo.yaml"  # toolkit/resources/demo.yaml: a byte-identical copy of jobs/demo.yaml (tested)


def demo_config(overrides: list[str] | dict | None = None) -> PipelineConfig:
    """The demo pipeline config (jobs/demo.yaml, shipped as package data) with overrides applied."""
    with resources.as_file(resources.files("toolkit").joinpath("resources", DEMO_RESOURCE)) as path:
        return load_config(path, overrides)


def demo(run_dir: Path | str, overrides: list[str] | None = None) -> int:
    """``spectrolens demo``: the whole pipeline on the embedded benchmark, locally; prints the report
    path, the benchmark recovery score and the training metrics."""
    cfg = demo_config(overrides)
    rd = Path(run_dir).expanduser().absolute()
    t0 = time.perf_counter()
    rc = run_pipeline(cfg, rd, executor="local")
    if rc != 0:
        return rc
    print(demo_summary(rd, time.perf_counter() - t0))
    return 0


def demo_summary(run_dir: Path, seconds: float | None = None) -> str:
    """The demo's closing lines: report path, benchmark recovery, test MAE / noise floor, onset R^2."""
    lay = RunLayout(run_dir)
    att = json.loads(lay.attribution.read_text())
    met_path = lay.train_metrics
    met = json.loads(met_path.read_text()) if met_path.is_file() else {}
    rec = att.get("benchmark_recovery")
    lines = [f"report: {run_dir / 'analyze' / 'report' / 'index.html'}"]
    if isinstance(rec, dict) and "summary" in rec:
        lines.append(f"benchmark {rec['summary']}")  # "benchmark recovery: ..."
    elif isinstance(rec, dict) and "overall" in rec:
        best = rec.get("best_layer")
        layer = rec.get("per_layer", {}).get(best, {})
        lines.append(f"benchmark recovery (precision@{rec.get('k', '?')} of planted drivers): {_fmt(rec['overall'])} "
                     f"overall; best layer {best}: {_fmt(layer.get('precision'))} (chance {_fmt(layer.get('chance'))})")
    else:
        lines.append(f"benchmark recovery: {rec}")
    if met:
        lines.append(f"train: test MAE {_fmt(met.get('test_spectrum_mae'))} = {_fmt(met.get('mae_over_noise_floor'))} x "
                     f"noise floor ({_fmt(met.get('noise_floor'))}); onset R^2 {_fmt(met.get('onset_r2'))}")
    if seconds is not None:
        lines.append(f"pipeline wall time: {seconds:.0f} s")
    return "\n".join(lines)


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
