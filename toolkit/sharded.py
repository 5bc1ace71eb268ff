"""The sharded-stage contract: how every executor drives a stage whose work splits into units.

A sharded stage is a module (``toolkit.data.prepare``: units are *parts*; ``toolkit.embed.stage``:
units are *shards*; ``toolkit.explain.stage`` and ``toolkit.predict.stage`` the same) that defines::

    NAME: str                                  # stage name, e.g. "prepare"
    UNIT: str                                  # what a unit is called in messages ("part", "shard")
    Error: type[Exception]                     # the stage's own error type
    plan(cfg, run_dir) -> int                  # idempotent: plan file + store skeleton; returns n_units
    unit_done(run_dir, unit) -> bool           # the unit's completion record is there (and its data)
    run_units(cfg, run_dir, units) -> None     # build these units (the caller holds their locks)
    finalize(cfg, run_dir) -> dict             # check every unit, merge, mark complete LAST; idempotent
    workers(cfg) -> int                        # local worker processes (executor-independent default)
    device(cfg) -> str                         # "cpu" | "auto" | "cuda": whether workers want GPUs
    after_finalize(cfg, run_dir, summary)      # optional: e.g. prepare's --strict check (raises Error)
    outputs(run_dir) -> list[(label, path)]    # optional: what the stage wrote, for its closing summary

This module drives it the same way on every executor (:mod:`toolkit.hpc` decides only *where*:
local worker processes, MPI ranks, SLURM array tasks, inside a container or not):

* :func:`plan_once`: ``plan`` under the stage's plan lock (array tasks racing to plan do it once).
* :func:`run_task`: worker ``t`` of ``T`` takes the units ``u % T == t`` that are not done. **One
  writer per unit**: a unit is built only under its lock ``RUN_DIR/.locks/<stage>/<unit>.lock``;
  units another process holds (a double-submitted job, a requeue overlapping a manual re-run) are
  skipped at first, then waited for, and built here only if their holder died without finishing.
* :func:`finalize_once`: ``finalize`` under the stage's finalize lock, after checking every unit.
* :func:`run_inline`: the three in this process (library use, tests, one-task executors).

This module imports nothing from :mod:`toolkit.hpc`.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from toolkit.runtime import FileLock

log = logging.getLogger(__name__)

#: stage name -> module implementing the contract (a dotted module path also works: plug-in stages)
SHARDED: dict[str, str] = {"prepare": "toolkit.data.prepare", "embed": "toolkit.embed.stage",
                           "explain": "toolkit.explain.stage", "predict": "toolkit.predict.stage"}
_REQUIRED = ("NAME", "UNIT", "Error", "plan", "unit_done", "run_units", "finalize", "workers", "device")
CLAIM_CHUNK = 64  # units claimed (locks held) at a time by one task


def resolve(stage: str | ModuleType) -> ModuleType:
    """The module of a sharded stage, by name (``prepare``, ``embed``) or dotted module path."""
    if isinstance(stage, ModuleType):
        mod = stage
    else:
        path = SHARDED.get(stage, stage if "." in stage else None)
        if path is None:
            raise ValueError(f"stage {stage!r} is not sharded (sharded stages: {', '.join(SHARDED)})")
        mod = importlib.import_module(path)
    missing = [a for a in _REQUIRED if not hasattr(mod, a)]
    if missing:
        raise TypeError(f"{mod.__name__} does not implement the sharded-stage contract (missing {missing})")
    return mod


def unit_lock(run_dir: str | os.PathLike, mod: ModuleType, unit: int) -> FileLock:
    return FileLock(run_dir, f"{mod.NAME}/{mod.UNIT}-{int(unit):06d}")


def plan_once(stage: str | ModuleType, cfg: Any, run_dir: str | os.PathLike) -> int:
    """``plan`` under the stage's plan lock; returns the number of units."""
    mod = resolve(stage)
    with FileLock(run_dir, f"{mod.NAME}/plan"):
        return int(mod.plan(cfg, Path(run_dir)))


def done_units(stage: str | ModuleType, run_dir: str | os.PathLike, n_units: int) -> list[int]:
    mod = resolve(stage)
    return [u for u in range(n_units) if mod.unit_done(Path(run_dir), u)]


def _claim(mod: ModuleType, run_dir: Path, units: Iterable[int]) -> tuple[list[tuple[int, FileLock]], list[int]]:
    """Lock every unit of ``units`` that is not done and not held elsewhere: (held, busy elsewhere)."""
    held: list[tuple[int, FileLock]] = []
    busy: list[int] = []
    for u in units:
        if mod.unit_done(run_dir, u):
            continue
        lock = unit_lock(run_dir, mod, u)
        if not lock.acquire(blocking=False):
            busy.append(u)
            continue
        if mod.unit_done(run_dir, u):  # finished by its previous holder between the two checks
            lock.release()
            continue
        held.append((u, lock))
    return held, busy


def _run_held(mod: ModuleType, cfg: Any, run_dir: Path, held: list[tuple[int, FileLock]],
              failures: dict[int, str]) -> list[int]:
    """Build the held units together; if that fails, each unfinished one alone, so one failing unit
    never stops the others (its error is recorded in ``failures``). Releases every lock."""
    units = [u for u, _ in held]
    try:
        if units:
            try:
                mod.run_units(cfg, run_dir, units)
            except Exception as e:  # noqa: BLE001 - retried one by one below, errors reported at the end
                if len(units) == 1:
                    failures[units[0]] = f"{type(e).__name__}: {e}"
                    log.error("%s %s %d failed: %s", mod.NAME, mod.UNIT, units[0], failures[units[0]])
                    return []
                log.warning("%s: %ss %s failed together (%s: %s); building them one by one", mod.NAME, mod.UNIT,
                            units, type(e).__name__, e)
                for u in units:
                    if not mod.unit_done(run_dir, u):
                        try:
                            mod.run_units(cfg, run_dir, [u])
                        except Exception as e1:  # noqa: BLE001
                            failures[u] = f"{type(e1).__name__}: {e1}"
                            log.error("%s %s %d failed: %s", mod.NAME, mod.UNIT, u, failures[u])
        return [u for u in units if u not in failures]
    finally:
        for _, lock in held:
            lock.release()


def run_task(stage: str | ModuleType, cfg: Any, run_dir: str | os.PathLike, task: int, n_tasks: int) -> list[int]:
    """Worker ``task`` of ``n_tasks``: plan (once, locked), then build this worker's units that are not
    done, one writer per unit. Returns the units built by this call."""
    mod = resolve(stage)
    run_dir = Path(run_dir)
    if not 0 <= task < n_tasks:
        raise mod.Error(f"task {task} is not in [0, {n_tasks})")
    n = plan_once(mod, cfg, run_dir)
    mine = list(range(task, n, n_tasks))
    built: list[int] = []
    waiting: list[int] = []
    failures: dict[int, str] = {}
    for i in range(0, len(mine), CLAIM_CHUNK):
        held, busy = _claim(mod, run_dir, mine[i:i + CLAIM_CHUNK])
        waiting += busy
        built += _run_held(mod, cfg, run_dir, held, failures)
    if waiting:
        log.info("%s task %d/%d: %d %ss held by another process (%s); waiting for them", mod.NAME, task, n_tasks,
                 len(waiting), mod.UNIT, _holders(run_dir, mod, waiting[:3]))
    for u in waiting:  # blocks until the holder finishes or dies (a dead holder's lock is released)
        lock = unit_lock(run_dir, mod, u)
        lock.acquire(blocking=True)
        if mod.unit_done(run_dir, u):
            lock.release()
            continue
        log.warning("%s %s %d was left unfinished by its previous holder; building it here", mod.NAME, mod.UNIT, u)
        built += _run_held(mod, cfg, run_dir, [(u, lock)], failures)
    if failures:
        raise mod.Error(f"{mod.NAME} task {task}/{n_tasks}: {len(failures)} {mod.UNIT}(s) failed, the other "
                        f"{len(built)} were built and are kept (re-run to retry): " +
                        "; ".join(f"{mod.UNIT} {u}: {m}" for u, m in sorted(failures.items())))
    log.info("%s task %d/%d: %d of %d %ss built here, %d were done already", mod.NAME, task, n_tasks, len(built),
             len(mine), mod.UNIT, len(mine) - len(built))
    return built


def _holders(run_dir: Path, mod: ModuleType, units: list[int]) -> str:
    out = []
    for u in units:
        h = unit_lock(run_dir, mod, u).holder()
        out.append(f"{mod.UNIT} {u}: pid {h.get('pid', '?')} on {h.get('host', '?')}")
    return "; ".join(out)


def finalize_once(stage: str | ModuleType, cfg: Any, run_dir: str | os.PathLike) -> dict:
    """Check that every unit is done, then ``finalize`` under the stage's finalize lock (idempotent);
    ends with :func:`closing_summary` in the log."""
    mod = resolve(stage)
    run_dir = Path(run_dir)
    with FileLock(run_dir, f"{mod.NAME}/finalize"):
        summary = mod.finalize(cfg, run_dir)
    after = getattr(mod, "after_finalize", None)
    if after is not None:
        after(cfg, run_dir, summary)
    log.info("%s", closing_summary(mod, run_dir, summary))
    return summary


def closing_summary(mod: ModuleType, run_dir: Path, summary: dict) -> str:
    """One screen: the stage's headline counts (the scalar ``n_*`` entries of its summary) and every
    output it names (``outputs(run_dir)``), with paths."""
    counts = ", ".join(f"{k[2:].replace('_', ' ')} {v}" for k, v in summary.items()
                       if k.startswith("n_") and isinstance(v, (int, float)) and not isinstance(v, bool))
    lines = [f"{mod.NAME}: done" + (f" ({counts})" if counts else "")]
    outputs = getattr(mod, "outputs", None)
    for label, path in (outputs(run_dir) if outputs is not None else []):
        lines.append(f"  {label:<14} {path}" + ("" if Path(path).exists() else "  (not written)"))
    lines.append(f"  {'logs':<14} {run_dir / 'logs' / mod.NAME}")
    return "\n".join(lines)


def run_inline(stage: str | ModuleType, cfg: Any, run_dir: str | os.PathLike) -> dict:
    """plan + every unit + finalize in this process (one writer per unit still holds)."""
    mod = resolve(stage)
    run_task(mod, cfg, run_dir, 0, 1)
    return finalize_once(mod, cfg, run_dir)
