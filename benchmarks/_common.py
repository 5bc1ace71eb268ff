"""Shared helpers of the benchmark scripts: machine description, medians, peak memory, JSON output.

Every script under benchmarks/ accepts ``--json PATH``; ``benchmarks/run_all`` collects those files
into benchmarks/results/all.json and the table in docs/performance.md.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import argparse

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPECTROLENS_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO))
from toolkit.runtime import MALLOC_ENV  # noqa: E402  (one definition: glibc malloc tuning)


def add_step_args(ap: "argparse.ArgumentParser") -> None:
    """Arguments shared by the model-step and training-throughput benchmarks (the study's model)."""
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "paper_structures", help="folder of POSCAR files")
    ap.add_argument("--structures", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=6, help="even: the two sides alternate order (_common.alternating)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--outputs", type=int, default=1501)
    ap.add_argument("--json", type=Path, default=None, help="also write the result as JSON (benchmarks/collect.py)")
    ap.add_argument("--no-malloc-tuning", action="store_true")


def tune_malloc(disabled: bool = False) -> None:
    """Re-exec this script with glibc malloc tuned (platform facts: stable, comparable CPU timings)."""
    if not disabled and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPU (if torch sees one), versions."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["alignn"] = version("alignn")
    except Exception:  # noqa: BLE001 - optional
        info["alignn"] = None
    return info


def alternating(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Results of each ``runs`` callable over ``repeats`` rounds, alternating their order (A B, B A,
    A B, ...). In one process the second of two back-to-back runs is measurably slower (about 5 % for
    the training step: allocator and cache state left by the first), so a fixed order biases the
    ratio; alternating cancels it when ``repeats`` is even."""
    out: dict[str, list[Any]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            out[k].append(runs[k]())
    return out


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            rss[int(d.name)] = int((d / "statm").read_text().split()[1]) * page
            children.setdefault(ppid, []).append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


class PeakMemory:
    """Samples the summed RSS of a process tree (default: this process) in a background thread."""

    def __init__(self, pid: int | None = None, interval: float = 0.2):
        self.pid = pid or os.getpid()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss_bytes(self.pid))

    @property
    def peak_gib(self) -> float:
        return self.peak / 2**30


def emit(name: str, rows: list[dict[str, Any]], params: dict[str, Any], json_path: Path | None) -> None:
    """Print a table of rows and, if asked, write ``{name, date, machine, params, rows}`` as JSON.

    A row: ``{"what": str, "unit": str, "ours": float, "upstream": float | None, "ratio": float | None}``
    where ratio is ours/upstream for throughputs (higher is better) as stated in ``what``.
    """
    print(f"\n== {name} ==  ({', '.join(f'{k}={v}' for k, v in params.items())})")
    for r in rows:
        up = r.get("upstream")
        ratio = r.get("ratio")
        print(f"  {r['what']:<48} ours {r['ours']:>12.4g} {r.get('unit', ''):<14}"
              + (f" upstream {up:>12.4g}" if up is not None else "")
              + (f"  ratio {ratio:.2f}x" if ratio is not None else ""))
    if json_path:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"name": name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                         "machine": machine_info(), "params": params, "rows": rows}, indent=2))
