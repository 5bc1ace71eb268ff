"""Options of the ``explain`` stage and where its files live.

:class:`ExplainOptions` holds every setting with its default. ``options_from_config(cfg)`` reads them
from ``cfg.explain`` when the config has that section (any field it has overrides the default), so
this package works before and after ``ExplainConfig`` is added to :mod:`toolkit.config`.

Files (all under ``RUN_DIR/explain/``)::

    plan.json                     sampled materials (dataset rows, clusters), shards, options, checkpoint sha256
    reference.npz                 readout embeddings of training materials (extrapolation reference)
    shards/shard-000000.edits.csv     one row per valid edited structure (predicted feature shifts)
    shards/shard-000000.rejects.csv   edits skipped, with the reason
    shards/shard-000000.attr.json     integrated-gradient aggregates (+ full per-material attributions
                                      of the representatives)
    shards/shard-000000.done.json     completion record, written LAST (sha256 of the three files)
    edits.csv, rejects.csv        all shards, merged by finalize
    summary.csv                   one row per (edit kind, cluster, feature): mean ± std shift, agreement
    attributions.json             attributions aggregated by element, bond type, angle bin; representatives
    summary.json                  finalize's summary, written LAST (the stage's completion marker)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from toolkit.errors import SpectrolensError
from toolkit.layout import RunLayout


class ExplainError(SpectrolensError, RuntimeError):
    """The explain stage cannot proceed; the message names the file and the reason."""


#: spectral features whose predicted shift every edit records (see toolkit.explain.probes)
FEATURES = ("onset", "edge_integral", "peak_1", "peak_2", "peak_3", "peak_1_height", "peak_2_height",
            "peak_3_height", "target", "spectrum_mae")  # target: the headline feature of non-absorption targets

ATTRIBUTION_TARGETS = ("window", "onset", "edge_integral")

EDIT_TYPES = ("cation_substitution", "anion_substitution", "strain", "shell_strain", "polyanion_centre")


@dataclass
class ExplainOptions:
    """Settings of the explain stage (defaults; ``cfg.explain.<field>`` overrides each one)."""

    #: edit types to apply (subset of EDIT_TYPES)
    edits: list[str] = field(default_factory=lambda: list(EDIT_TYPES))
    #: uniform strains (fractions): -4, -2, +2, +4 %
    strains: list[float] = field(default_factory=lambda: [-0.04, -0.02, 0.02, 0.04])
    #: radial strains of one cation's first shell (fractions)
    shell_strains: list[float] = field(default_factory=lambda: [-0.04, 0.04])
    #: substitutions: rescale the lattice by the ionic-radius ratio of the bond (r_new + r_partner) / (r_old + r_partner)
    rescale: bool = True
    #: per substituted cation element: at most this many replacements of the same family and of other families
    max_same_family: int = 2
    max_other_family: int = 2
    #: materials per cluster (when analyze/clusters.csv exists); None = every material of every cluster
    per_cluster: int | None = 20
    #: clusters.csv column (layer) to take clusters from; None = "readout" if present, else the last column
    cluster_layer: str | None = None
    #: without clusters: this many materials sampled at random (seeded); None = all
    sample_size: int | None = 200
    seed: int = 0
    #: materials per shard (the unit of work; one completion record each)
    shard_size: int = 32
    #: structures per model batch
    batch_size: int = 32
    #: attributions of a linear target of the predicted spectrum (toolkit.explain.gradients.target_weights):
    #: "window" = mean predicted value over energy_window (eV; None = the material's predicted onset
    #: ± window_half_width, whole spectrum when the onset is undefined); "onset" = the linearised onset;
    #: "edge_integral" = the edge integral with its window held at the predicted onset
    attribution: bool = True
    attribution_target: str = "window"
    energy_window: tuple[float, float] | None = None
    window_half_width: float = 0.5
    #: Gauss-Legendre nodes of the integrated-gradients path integral
    ig_steps: int = 32
    #: per-material attributions are stored in full for this many materials per cluster (or overall)
    representatives: int = 2
    #: bins of the attribution aggregates: bond length (Å), bond angle (degrees)
    bond_bin: float = 0.5
    angle_bin: float = 15.0
    #: extrapolation reference: readout embeddings of at most this many training materials
    reference_size: int = 2000
    #: an edited structure is flagged as extrapolated when its distance to the nearest training material
    #: exceeds this many times the median nearest-neighbour distance among training materials
    extrapolation_factor: float = 2.0
    #: atoms closer than this (Å) reject an edited structure; None = data.min_distance
    min_distance: float | None = None
    checkpoint: Path | None = None
    device: str = "auto"
    workers: int = 1

    def to_json(self) -> dict:
        d = asdict(self)
        d["checkpoint"] = str(self.checkpoint) if self.checkpoint else None
        d["energy_window"] = list(self.energy_window) if self.energy_window else None
        return d

    def identity(self) -> dict:
        """The options that change results (a plan made with others is refused)."""
        d = self.to_json()
        for k in ("workers", "device", "batch_size"):
            d.pop(k)
        return d


def options_from_config(cfg: Any) -> ExplainOptions:
    """:class:`ExplainOptions` from ``cfg.explain`` (a pydantic section, dict or None): its fields override
    the defaults; ``checkpoint`` falls back to ``embed.checkpoint``."""
    sec = getattr(cfg, "explain", None)
    if sec is None and isinstance(cfg, dict):
        sec = cfg.get("explain")
    raw: dict = {}
    if sec is not None:
        raw = sec.model_dump() if hasattr(sec, "model_dump") else dict(sec)
    names = {f.name for f in fields(ExplainOptions)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ExplainError(f"explain: unknown option(s) {unknown}; known: {sorted(names)}")
    opts = ExplainOptions(**{k: v for k, v in raw.items() if v is not None or k in (
        "per_cluster", "sample_size", "energy_window", "cluster_layer", "min_distance", "checkpoint")})
    if opts.checkpoint is None and getattr(getattr(cfg, "embed", None), "checkpoint", None):
        opts.checkpoint = Path(cfg.embed.checkpoint)
    if opts.energy_window is not None:
        opts.energy_window = (float(opts.energy_window[0]), float(opts.energy_window[1]))
    bad = sorted(set(opts.edits) - set(EDIT_TYPES))
    if bad:
        raise ExplainError(f"explain.edits: unknown edit type(s) {bad}; known: {list(EDIT_TYPES)}")
    if opts.attribution_target not in ATTRIBUTION_TARGETS:
        raise ExplainError(f"explain.attribution_target must be one of {list(ATTRIBUTION_TARGETS)}, got "
                           f"{opts.attribution_target!r}")
    transform = getattr(getattr(cfg, "data", None), "transform", "log10_alpha")
    if opts.attribution and opts.attribution_target != "window" and transform != "log10_alpha":
        raise ExplainError(f"explain.attribution_target {opts.attribution_target!r} needs data.transform: "
                           f"log10_alpha (this run stores {transform!r}); use 'window'")
    return opts


# ----------------------------------------------------------------------------------------------- paths
def explain_dir(run_dir: Path) -> Path:
    return RunLayout(run_dir).explain_dir


def plan_path(run_dir: Path) -> Path:
    return explain_dir(run_dir) / "plan.json"


def reference_path(run_dir: Path) -> Path:
    return explain_dir(run_dir) / "reference.npz"


def shard_file(run_dir: Path, shard: int, kind: str) -> Path:
    """``kind``: edits.csv | rejects.csv | attr.json | done.json."""
    return explain_dir(run_dir) / "shards" / f"shard-{int(shard):06d}.{kind}"


def summary_path(run_dir: Path) -> Path:
    return RunLayout(run_dir).explain_summary


def table_path(run_dir: Path) -> Path:
    return explain_dir(run_dir) / "summary.csv"


def edits_path(run_dir: Path) -> Path:
    return explain_dir(run_dir) / "edits.csv"


def rejects_path(run_dir: Path) -> Path:
    return explain_dir(run_dir) / "rejects.csv"


def attributions_path(run_dir: Path) -> Path:
    return explain_dir(run_dir) / "attributions.json"


def is_complete(run_dir: Path) -> bool:
    """The stage's completion marker: summary.json with ``complete: true`` (:meth:`RunLayout.is_complete`)."""
    return RunLayout(run_dir).is_complete("explain")
