"""The run directory layout: one place that knows where every stage's files live (a leaf module).

::

    RUN_DIR/
      config.yaml, run_info.json       resolved config; versions, git revision, seeds, hosts
      pipeline.json                    what the runner did with each stage (toolkit.hpc.records)
      dataset.zarr/                    prepare: structures, graphs, spectra, descriptors (docs/zarr.md)
      prepare/                         plan.json, scan_rejects.csv, parts/*.rejects.csv, rejects.csv, summary.json
      train/                           split.json, checkpoints/last.pt, best.pt, metrics.json, metrics.jsonl, tb/
      train/members/<k>/               ensembles: the same files for each member k (best.pt = member 0's)
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
from pathlib import Path

STAGES: tuple[str, ...] = ("prepare", "train", "embed", "analyze", "explain")
#: what `spectrolens run` does without --stages (explain is opt-in: it runs the model on many edited structures)
DEFAULT_STAGES: tuple[str, ...] = ("prepare", "train", "embed", "analyze")


def zarr_complete(store: Path) -> bool:
    """True when a Zarr v3 group's root attributes say ``complete: true`` (read without zarr)."""
    try:
        return json.loads((Path(store) / "zarr.json").read_text()).get("attributes", {}).get("complete") is True
    except (OSError, ValueError):
        return False


class RunLayout:
    """Paths of one run directory (plain attributes; no I/O on construction)."""

    def __init__(self, root: str | os.PathLike) -> None:
        r = self.root = Path(root)
        self.config, self.run_info, self.locks = r / "config.yaml", r / "run_info.json", r / ".locks"
        # prepare
        self.dataset, self.prepare_dir = r / "dataset.zarr", r / "prepare"
        self.prepare_plan = self.prepare_dir / "plan.json"
        self.prepare_summary = self.prepare_dir / "summary.json"
        self.rejects = self.prepare_dir / "rejects.csv"
        # train
        self.train_dir = r / "train"
        self.best_checkpoint = self.train_dir / "best.pt"
        self.last_checkpoint = self.train_dir / "checkpoints" / "last.pt"
        self.train_metrics = self.train_dir / "metrics.json"
        # ensembles (train.ensemble > 1): one train folder per member, same files as train/ itself
        self.members_dir = self.train_dir / "members"
        # embed, analyze
        self.embeddings = r / "embeddings.zarr"
        self.analyze_dir = r / "analyze"
        self.attribution = self.analyze_dir / "attribution.json"
        self.report = self.analyze_dir / "report" / "index.html"
        # explain (counterfactual probes, attributions)
        self.explain_dir = r / "explain"
        self.explain_summary = self.explain_dir / "summary.json"

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunLayout) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def member_dir(self, k: int) -> Path:
        """Train folder of ensemble member ``k`` (checkpoints/last.pt, best.pt, metrics.json, ...)."""
        return self.members_dir / f"{int(k):03d}"

    def member_best(self, k: int) -> Path:
        return self.member_dir(k) / "best.pt"

    def logs(self, stage: str) -> Path:
        return self.root / "logs" / stage

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
        if stage == "explain":
            try:
                return json.loads(self.explain_summary.read_text()).get("complete") is True
            except (OSError, ValueError):
                return False
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
