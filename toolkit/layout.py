"""The run directory layout: one place that knows where every stage's files live (a leaf module).

::

    RUN_DIR/
      config.yaml, run_info.json       resolved config; versions, git revision, seeds, hosts
      pipeline.json                    what the runner did with each stage (toolkit.hpc.records)
      dataset.zarr/                    prepare: structures, graphs, spectra, descriptors (docs/zarr.md)
      prepare/                         plan.json, scan_rejects.csv, parts/*.rejects.csv, rejects.csv, summary.json
      train/                           split.json, checkpoints/last.pt, best.pt, metrics.json, metrics.jsonl, tb/
      embeddings.zarr/                 embed: activations per layer (docs/zarr.md)
      analyze/                         attribution.json, descriptors, figures, report/index.html
      logs/<stage>/                    one log per task, rank, worker or job
      .locks/                          one lock per unit of work (toolkit.runtime.FileLock)
      submitit/<stamp>/<stage>/        SLURM submissions (toolkit.hpc)

A stage is complete when its final outputs exist: :meth:`RunLayout.is_complete`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

STAGES: tuple[str, ...] = ("prepare", "train", "embed", "analyze")


def zarr_complete(store: Path) -> bool:
    """True when a Zarr v3 group's root attributes say ``complete: true`` (read without zarr)."""
    try:
        return json.loads((Path(store) / "zarr.json").read_text()).get("attributes", {}).get("complete") is True
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory (no I/O on construction)."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    # -- run-level files
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_info(self) -> Path:
        return self.root / "run_info.json"

    @property
    def locks(self) -> Path:
        return self.root / ".locks"

    def logs(self, stage: str) -> Path:
        return self.root / "logs" / stage

    # -- prepare
    @property
    def dataset(self) -> Path:
        return self.root / "dataset.zarr"

    @property
    def prepare_dir(self) -> Path:
        return self.root / "prepare"

    @property
    def prepare_plan(self) -> Path:
        return self.prepare_dir / "plan.json"

    @property
    def prepare_summary(self) -> Path:
        return self.prepare_dir / "summary.json"

    @property
    def rejects(self) -> Path:
        return self.prepare_dir / "rejects.csv"

    # -- train
    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def best_checkpoint(self) -> Path:
        return self.train_dir / "best.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.train_dir / "checkpoints" / "last.pt"

    @property
    def train_metrics(self) -> Path:
        return self.train_dir / "metrics.json"

    # -- embed
    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings.zarr"

    # -- analyze
    @property
    def analyze_dir(self) -> Path:
        return self.root / "analyze"

    @property
    def attribution(self) -> Path:
        return self.analyze_dir / "attribution.json"

    @property
    def report(self) -> Path:
        return self.analyze_dir / "report" / "index.html"

    # -- completion
    def is_complete(self, stage: str) -> bool:
        """Whether ``stage``'s final outputs exist (a completed stage is skipped on re-runs).

        prepare: dataset.zarr marked complete and its summary written; train: metrics.json and best.pt;
        embed: embeddings.zarr marked complete; analyze: attribution.json and the HTML report."""
        if stage == "prepare":
            return zarr_complete(self.dataset) and self.prepare_summary.is_file()
        if stage == "train":
            return self.train_metrics.is_file() and self.best_checkpoint.is_file()
        if stage == "embed":
            return zarr_complete(self.embeddings)
        if stage == "analyze":
            return self.attribution.is_file() and self.report.is_file()
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
