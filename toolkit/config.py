"""The one configuration schema of spectrolens.

A pipeline config is a YAML file (examples under ``jobs/``) validated by :class:`PipelineConfig`.
Every stage reads its own section; CLI overrides use dotted keys (``--set train.epochs=3``).
Each run directory records the resolved config (``config.yaml``), package versions, the git
revision and the seeds (``run_info.json``), see :func:`record_run`.

Section owners: ``data`` (toolkit.data), ``graph`` (toolkit.data.graphs), ``model`` (toolkit.model),
``train`` (toolkit.train), ``embed`` (toolkit.embed), ``analyze`` (toolkit.analyze),
``predict`` (toolkit.predict), ``executor``/``container`` (toolkit.hpc).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from toolkit.errors import SpectrolensError

SourceKind = Literal["benchmark", "realbench", "alignn", "jsonl", "vasp", "jarvis", "refractiveindex"]


class _Section(BaseModel):
    """Base: unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GridConfig(_Section):
    """Target photon-energy grid in eV (the study: 0.00-15.00 eV, 1,501 points)."""

    start: float = 0.0
    stop: float = 15.0
    num: int = Field(1501, ge=2)

    @model_validator(mode="after")
    def _check(self) -> "GridConfig":
        if not (math.isfinite(self.start) and math.isfinite(self.stop)):
            raise ValueError(f"grid.start and grid.stop must be finite numbers, got {self.start}, {self.stop}")
        if not self.stop > self.start:
            raise ValueError(f"grid.stop ({self.stop}) must be greater than grid.start ({self.start})")
        return self


class BenchmarkConfig(_Section):
    """The embedded ground-truth benchmark (see docs/benchmark.md)."""

    n_materials: int = Field(600, ge=10)
    seed: int = 0
    noise: float = Field(0.05, ge=0.0, description="std of additive noise on log10(alpha)")
    temperatures: list[float] = Field(default_factory=list, description="temperature-dependent benchmark (K): every "
                                      "structure is a record at each of these temperatures, its onset shifted by a "
                                      "Varshni law with a structure-dependent coefficient (docs/benchmark.md); the "
                                      "condition 'temperature' is then a model input. Empty: no conditions")

    @field_validator("temperatures")
    @classmethod
    def _temps(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(t) or t < 0 for t in v) or len(set(v)) != len(v):
            raise ValueError(f"temperatures must be distinct finite values >= 0 K, got {v}")
        return v


class TargetConfig(_Section):
    """What the dataset's values are (toolkit.data.targets, docs/targets.md): the absorption spectrum of
    the study (default), another spectrum on data.grid, or named scalars; and the per-record
    conditions fed to the model."""

    kind: Literal["absorption", "dielectric", "xas", "dos", "phonon_dos", "scalar"] = Field(
        "absorption", description="absorption: log10 alpha on data.grid; dielectric: eps2 (or eps1 and eps2 as two "
        "heads, names [epsilon_1, epsilon_2]); xas, dos, phonon_dos: one spectrum on data.grid; scalar: one value per "
        "name")
    names: list[str] | None = Field(None, description="head names (scalar: one per value of a row, in order, e.g. "
                                    "[band_gap]; dielectric: [epsilon_2] or [epsilon_1, epsilon_2]); default per kind")
    units: str | None = Field(None, description="units of the values (recorded and shown); default per kind")
    onset_fraction: float = Field(0.1, gt=0, lt=1, description="dielectric/xas: onset = first crossing of this "
                                  "fraction of the spectrum's maximum")
    conditions: list[str] = Field(default_factory=list, description="per-record condition fields (e.g. "
                                  "[temperature, pressure]) read from each record and fed to the model")

    @model_validator(mode="after")
    def _names(self) -> "TargetConfig":
        if self.names is not None:
            if not self.names or len(set(self.names)) != len(self.names):
                raise ValueError(f"target.names must be distinct and non-empty, got {self.names}")
            if self.kind == "dielectric" and not set(self.names) <= {"epsilon_1", "epsilon_2"}:
                raise ValueError(f"dielectric heads are epsilon_1 and/or epsilon_2, got {self.names}")
            if self.kind not in ("scalar", "dielectric") and len(self.names) != 1:
                raise ValueError(f"target.kind={self.kind} has one head, got names {self.names}")
        if len(set(self.conditions)) != len(self.conditions):
            raise ValueError(f"target.conditions must be distinct, got {self.conditions}")
        return self


class RealBenchConfig(_Section):
    """The real-structure benchmark: real crystal structures, spectra from planted rules (docs/benchmark.md)."""

    mp: bool = Field(True, description="use the Materials Project structures shipped with the package")
    paths: list[Path] = Field(default_factory=list, description="folders of POSCAR files to add (read in place)")
    max_materials: int | None = Field(None, ge=1, description="keep only the first N structures (scan order)")
    seed: int = 0
    noise: float = Field(0.05, ge=0.0, description="std of additive noise on log10(alpha)")


class DataConfig(_Section):
    """`spectrolens prepare`: read a source into the canonical on-disk dataset."""

    source: SourceKind = "benchmark"
    path: Path | None = Field(None, description="file or folder of the source (not used by 'benchmark', 'realbench')")
    id_prop: str = Field("id_prop.csv", description="ALIGNN folders: name of the target table")
    grid: GridConfig = GridConfig()
    target: TargetConfig = TargetConfig()
    transform: Literal["log10_alpha", "alpha", "none", "log10", "unit_area"] = Field(
        "log10_alpha", description="absorption: log10_alpha (floored) or alpha; other targets: none (default), log10 "
        "(floored at log_floor) or unit_area (each head normalised to unit area)")
    log_floor: float = Field(2.0, description="floor of log10(alpha / cm^-1), as in the study (log10 transform: the floor)")
    onset_threshold: float = Field(4.0, description="onset = first crossing of this log10(alpha) value")
    min_distance: float = Field(0.5, gt=0, description="reject structures with atoms closer than this (Å)")
    strict: bool = Field(False, description="any rejected record makes prepare exit non-zero")
    cache_dir: Path | None = Field(None, description="download cache (JARVIS figshare, ...); default ~/.cache/spectrolens")
    jarvis_optics: Literal["mbj", "semilocal"] = Field(
        "mbj", description="jarvis: which optics block of the JVASP pages (TBmBJ or OptB88vdW)")
    structures: Path | None = Field(
        None, description="refractiveindex: JSONL of structures paired with the reference spectra by reduced formula")
    benchmark: BenchmarkConfig = BenchmarkConfig()
    realbench: RealBenchConfig = RealBenchConfig()
    shard_size: int = Field(256, ge=1, description="materials per store part (one part = one writer's unit)")
    workers: int = Field(2, ge=1, description="local worker processes")

    @field_validator("log_floor", "onset_threshold", "min_distance")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v}")
        return v

    @model_validator(mode="after")
    def _target(self) -> "DataConfig":
        """Transforms by target kind; the temperature benchmark makes temperature a condition."""
        from toolkit.data.targets import TRANSFORMS

        kind = self.target.kind
        if kind != "absorption" and "transform" not in self.model_fields_set and self.transform == "log10_alpha":
            object.__setattr__(self, "transform", "none")
        if self.transform not in TRANSFORMS[kind]:
            raise ValueError(f"data.transform={self.transform!r} does not apply to target.kind={kind!r} "
                             f"(choose from {list(TRANSFORMS[kind])})")
        if self.source == "benchmark" and self.benchmark.temperatures and "temperature" not in self.target.conditions:
            object.__setattr__(self.target, "conditions", [*self.target.conditions, "temperature"])
        if self.source in ("benchmark", "realbench") and kind != "absorption":
            raise ValueError(f"data.source={self.source!r} generates absorption spectra; target.kind={kind!r} needs "
                             f"a source with that data (alignn, jsonl, vasp, jarvis)")
        return self

    @model_validator(mode="after")
    def _path_required(self) -> "DataConfig":
        """Every source but the embedded benchmarks and JARVIS (downloaded to cache_dir) reads data.path."""
        if self.source not in ("benchmark", "realbench", "jarvis") and self.path is None:
            raise ValueError(f"data.source={self.source!r} needs data.path (the file or folder to read)")
        return self


class GraphConfig(_Section):
    """Periodic k-nearest-neighbour atom graph + line graph, ALIGNN semantics (toolkit.data.graphs).

    Each atom keeps every neighbour up to its k-th neighbour's distance; edges are made
    undirected; the search radius is widened when an atom has fewer than k neighbours."""

    cutoff: float = Field(8.0, gt=0, description="initial neighbour-search radius (Å); widened as upstream ALIGNN does")
    max_neighbors: int = Field(12, ge=1, description="k: keep all neighbours up to the k-th neighbour's distance")
    dedupe_self_images: bool = Field(False, description="upstream ALIGNN lists bonds to an atom's own periodic "
                                     "images twice; true keeps them once")


class ModelConfig(_Section):
    """ALIGNN (upstream ``alignn_atomwise`` names and shapes)."""

    backend: Literal["torch", "dgl"] = "torch"
    alignn_layers: int = Field(4, ge=0)
    gcn_layers: int = Field(4, ge=0)
    atom_input_features: int = Field(92, description="CGCNN atom features (only 92 is supported)")
    edge_input_features: int = Field(80, ge=2, description="bond-length RBF bins")
    triplet_input_features: int = Field(40, ge=2, description="bond-angle cosine RBF bins (-1..1)")
    embedding_features: int = Field(64, ge=1)
    hidden_features: int = Field(256, ge=1)
    output_features: int | None = Field(None, description="default: the dataset grid length")
    rbf_cutoff: float = Field(8.0, gt=0, validation_alias=AliasChoices("rbf_cutoff", "cutoff"),
                              description="upper end of the bond-length RBF expansion (Å; upstream: 8). Not the "
                              "neighbour search radius (graph.cutoff); 'model.cutoff' is read as this")
    link: Literal["identity", "log", "logit"] = Field("identity", description="applied to fc output")
    conditions: list[str] = Field(default_factory=list, description="condition inputs (state vector, as MEGNet's "
                                  "state attributes); default: the dataset's data.target.conditions, set by train")
    condition_features: int = Field(32, ge=1, description="width of the condition embedding")
    condition_every_layer: bool = Field(False, description="also add the condition embedding to the atom features "
                                        "before every layer (otherwise: only at the readout)")


class TrainConfig(_Section):
    """`spectrolens train`: (distributed) training, checkpoints and resume (see docs/training.md)."""

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1, description="per process")
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    loss: Literal["l1", "mse"] = "l1"
    grad_clip: float | None = Field(1.0, description="max gradient norm; null disables")
    split: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train/val/test fractions")
    split_file: Path | None = Field(None, description="explicit split JSON {train: [ids], val: [...], test: [...]}")
    seed: int = 123
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    num_workers: int = Field(0, ge=0, description="data-loader worker processes per rank")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    max_checkpoint_minutes: float | None = Field(None, gt=0, description="also checkpoint mid-epoch this often")
    scheduler: Literal["onecycle", "none"] = Field("onecycle", description="one-cycle LR stepped per batch")
    pct_start: float = Field(0.3, gt=0, lt=1, description="one-cycle: fraction of steps spent warming up")
    dist_backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPU, gloo on CPU")
    dist_timeout_minutes: float = Field(30.0, gt=0, description="collective-operation timeout")
    progress: bool = Field(True, description="tqdm progress bar (rank 0 only)")
    init_output_bias: bool = Field(True, description="start the output layer's bias at the mean training spectrum")
    ensemble: int = Field(1, ge=1, description="members trained with seeds seed, seed+1, ...; >1: mean spectrum, "
                          "per-point std and calibration (docs/predict.md); members in train/members/<k>/")

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x < 0 for x in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"train.split must be three non-negative fractions summing to 1, got {list(v)}")
        return v


class EmbedConfig(_Section):
    """`spectrolens embed`: layer activations of a trained model into ``embeddings.zarr``."""

    layers: list[str] | None = Field(None, description="layer names (alignn_1.., gcn_1.., readout); default all")
    pooling: list[Literal["mean", "max", "sum"]] = ["mean"]
    per_atom: bool = Field(False, description="also store per-atom features (ragged: atoms + atom_offset)")
    dtype: Literal["float32", "float16"] = "float32"
    batch_size: int = Field(64, ge=1)
    shard_size: int = Field(1024, ge=1, description="materials per Zarr shard = one worker's unit of work")
    workers: int = Field(1, ge=1, description="local worker processes")
    checkpoint: Path | None = Field(None, description="default: <run_dir>/train/best.pt")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    num_workers: int = Field(0, ge=0, description="data-loader worker processes per embed worker (GPU: 2-8)")

    @field_validator("pooling", "layers")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"duplicate names in {v}")
        if v is not None and not v:
            raise ValueError("must not be empty (omit the key for the default)")
        return v


class AnalyzeConfig(_Section):
    """`spectrolens analyze`: descriptors, Ward clustering per layer, attribution, probes, report
    (see docs/report.md)."""

    layers: list[str] | None = Field(None, description="layer names, plus 'spectrum_reference' / "
                                     "'spectrum_predicted' baselines; default: every captured layer + both baselines")
    pooling: Literal["mean", "max", "sum"] = "mean"
    n_clusters: int | Literal["size", "auto"] = Field(
        "size", description="clusters of each layer's default level: 'size' (default): round(N / target_cluster_size) "
        "clipped to [2, max_clusters]; 'auto': best mean silhouette over 2..max_clusters; or a number")
    target_cluster_size: int = Field(25, ge=2, description="n_clusters='size': materials per cluster people read "
                                     "(the study: 100 clusters for 2,681 materials, ~27 each)")
    max_clusters: int = Field(100, ge=2, description="upper bound of k ('size' and 'auto')")
    levels: list[int] | None = Field(None, description="extra resolutions (numbers of clusters) reported in "
                                     "attribution.json hierarchy.<layer>.levels besides the default level, e.g. [5, 20, 100]")
    min_split_size: int = Field(10, ge=2, description="the Ward tree is explained top-down at every split whose "
                                "two children each hold at least this many materials")
    max_splits: int = Field(500, ge=1, description="at most this many splits explained per layer (largest first)")
    drivers: bool = Field(True, description="rank the drivers of each spectral feature (attribution.json 'drivers')")
    map_projection: Literal["pca", "umap"] = Field("pca", description="the 2-D map of each layer (figures, "
                                                   "interactive map, chemiscope): PCA, or UMAP (umap-learn)")
    novelty_quantile: float = Field(0.95, gt=0, lt=1, description="far from the training data (analyze/novelty.csv, "
                                    "report): a material whose readout distance to the nearest training material, over "
                                    "the typical nearest-neighbour distance, exceeds the conformal quantile q of the "
                                    "validation materials' ratios, so ~(1-q) of in-distribution materials are flagged "
                                    "(no validation split: the training materials' leave-one-out ratios)")
    novelty_factor: float | None = Field(None, gt=0, description="override: flag materials beyond this fixed multiple "
                                         "of the typical nearest-neighbour distance instead of the calibrated threshold "
                                         "(novelty_quantile)")
    compare_experiment: Path | None = Field(None, description="refractiveindex.info database folder: compare the "
                                            "predicted spectra with measured ones of the same reduced formula in the "
                                            "report (analyze/experiment/; docs/predict.md)")
    condense: bool = Field(True, description="one entry per signal in cluster and split rankings: descriptors that "
                           "say the same thing on the data are folded under one head ('covers'; toolkit.analyze.signals)")
    standardize: bool = True
    pca_components: int | None = Field(None, ge=1)
    scalable_threshold: int = Field(20_000, ge=100, description="above this many materials use micro-cluster Ward "
                                    "(exact Ward needs 4*N^2 bytes: 1.6 GB at 20,000)")
    micro_clusters: int = Field(2000, ge=10)
    permutation_repeats: int = Field(5, ge=1)
    coordination: Literal["auto", "crystalnn", "cutoff"] = Field(
        "auto", description="neighbour finder for coordination/bond descriptors; auto: CrystalNN up to "
        "crystalnn_max_materials, else the minimum-distance rule (MinimumDistanceNN(tol=0.2)) with "
        "charge-balance oxidation states (docs/report.md)")
    crystalnn_max_materials: int = Field(20_000, ge=1)
    probe_folds: int = Field(5, ge=2)
    workers: int = Field(2, ge=1)
    seed: int = 0
    interactive_max_points: int = Field(20_000, ge=100, description="the report's interactive map of a layer shows "
                                        "every material up to this many, above it a seeded random subsample per cluster "
                                        "(the data are not subsampled; toolkit.analyze.interactive)")
    # --- issue 20: analyze on Dask (toolkit/analyze/engine.py, docs/dask.md) ---
    engine: Literal["local", "dask"] = Field(
        "local", description="local: one process (descriptors in `workers` processes); dask: descriptor blocks, "
        "the descriptor store, every layer's clustering (side by side; its feature statistics and micro-cluster "
        "assignment as tasks over the Zarr chunks), the predicted spectral descriptors and the driver ranking of "
        "each spectral feature run as Dask tasks (needs `pip install spectrolens[dask]`; docs/dask.md)")
    dask_cluster: Literal["auto", "local", "slurm"] = Field(
        "auto", description="engine=dask: where the Dask workers run: a LocalCluster on this machine, or SLURM jobs "
        "(dask-jobqueue SLURMCluster with executor.analyze's partition/account/time/cpus/memory); auto: slurm when "
        "executor.kind is slurm")
    dask_workers: int = Field(2, ge=1, description="engine=dask: worker processes (slurm: one SLURM job each)")
    dask_threads_per_worker: int = Field(1, ge=1, description="engine=dask: threads per worker process")
    dask_scheduler: str | None = Field(None, description="engine=dask: address of a running Dask scheduler "
                                       "(tcp://host:8786) to use instead of starting a cluster")
    chunk_rows: int = Field(16384, ge=32, description="materials per chunk of the chunked passes over features "
                            "(feature statistics, micro-cluster assignment; both engines) and per descriptor-store "
                            "chunk; engine=dask: one task per chunk, which bounds each worker's memory")
    # --- end issue 20 ---
    chemiscope: bool | Literal["auto"] = Field(
        "auto", description="write analyze/chemiscope.json.gz (structures, 2-D map of each layer, clusters, "
        "descriptors, onsets) for chemiscope: true (needs `pip install chemiscope`), false, or auto: when the "
        "chemiscope package is installed")
    chemiscope_max_materials: int = Field(50_000, ge=100, description="chemiscope.json.gz holds every analysed "
                                          "material up to this many, above it a seeded sample per cluster (the "
                                          "viewer's practical limit; the file's description says so)")


class ExplainConfig(_Section):
    """`spectrolens explain`: counterfactual probes and atom/bond/angle attributions through the trained
    model (docs/explain.md)."""

    edits: list[Literal["cation_substitution", "anion_substitution", "strain", "shell_strain", "polyanion_centre"]] = \
        ["cation_substitution", "anion_substitution", "strain", "shell_strain", "polyanion_centre"]
    strains: list[float] = Field([-0.04, -0.02, 0.02, 0.04], description="uniform cell strains")
    shell_strains: list[float] = Field([-0.04, 0.04], description="strains of one cation's first shell")
    rescale: bool = Field(True, description="substitutions: rescale the lattice by the ionic-radius ratio")
    max_same_family: int = Field(2, ge=0, description="substitutes per cation from its own group")
    max_other_family: int = Field(2, ge=0, description="substitutes per cation from other groups (same charge)")
    per_cluster: int | None = Field(20, ge=1, description="materials sampled per cluster (analyze/clusters.csv)")
    cluster_layer: str | None = Field(None, description="clusters of this layer (default: the last column)")
    sample_size: int | None = Field(200, ge=1, description="materials sampled when there are no clusters")
    seed: int = 0
    shard_size: int = Field(32, ge=1, description="materials per shard (one worker's unit)")
    batch_size: int = Field(32, ge=1)
    attribution: bool = Field(True, description="integrated-gradients attributions to atoms, bonds, angles")
    attribution_target: Literal["window", "onset", "edge_integral"] = "window"
    energy_window: tuple[float, float] | None = Field(None, description="eV; default: around each onset")
    window_half_width: float = Field(0.5, gt=0)
    ig_steps: int = Field(32, ge=2)
    representatives: int = Field(2, ge=0, description="materials per cluster with per-atom attributions stored")
    bond_bin: float = Field(0.5, gt=0, description="Å")
    angle_bin: float = Field(15.0, gt=0, description="degrees")
    reference_size: int = Field(2000, ge=2, description="training materials used for the extrapolation distance")
    extrapolation_factor: float = Field(2.0, gt=0, description="flag edits farther than this x the typical distance")
    min_distance: float | None = Field(None, gt=0, description="default: data.min_distance")
    checkpoint: Path | None = Field(None, description="default: embed.checkpoint or <run_dir>/train/best.pt")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(1, ge=1, description="local worker processes")


class PredictConfig(_Section):
    """`spectrolens predict`: spectra of new structures from a trained model or ensemble (docs/predict.md)."""

    inputs: list[Path] = Field(default_factory=list, description="structure files/folders (CIF, POSCAR, pymatgen "
                               "JSON, ASE db) or a source that prepare reads (see source)")
    source: Literal["auto", "structures", "alignn", "jsonl", "vasp", "jarvis", "refractiveindex"] = Field(
        "auto", description="how to read inputs: auto (a .jsonl file -> jsonl, a folder with id_prop.csv -> alignn, "
        "else plain structure files), or a prepare source kind")
    checkpoint: Path | None = Field(None, description="a spectrolens run directory (ensemble members or "
                                    "train/best.pt), a spectrolens .pt, or an upstream ALIGNN best_model.pt")
    upstream_config: Path | None = Field(None, description="upstream ALIGNN config.json (default: next to "
                                         "best_model.pt)")
    batch_size: int = Field(32, ge=1)
    shard_size: int = Field(512, ge=1, description="records per shard (one worker's unit)")
    workers: int = Field(1, ge=1, description="local worker processes")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    min_atoms: int = Field(1, ge=1, description="structures with fewer atoms are rejects")
    min_distance: float | None = Field(None, gt=0, description="reject atoms closer than this (Å); default "
                                       "data.min_distance")
    recalibrate: bool = Field(True, description="ensembles: scale the std by the factor fitted on the "
                              "validation split (train/metrics.json)")
    plot: bool = Field(False, description="write figures of the predicted spectra")
    plot_single_max: int = Field(24, ge=0, description="up to this many materials: one figure each; more: pages")
    compare_experiment: Path | None = Field(None, description="refractiveindex.info database folder: compare "
                                            "with measured spectra by reduced formula")
    conditions: dict[str, float | list[float]] = Field(
        default_factory=dict, description="models with condition inputs (model.conditions): a value or a sweep per "
        "condition, e.g. {temperature: [0, 300, 600]}; every structure is predicted at every combination (ids get "
        "'@temperature=300'). Empty: each record's own condition fields (JSONL)")


class StageResources(_Section):
    """SLURM resources of one stage (ignored by the local executor except `tasks`/`array_tasks`)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: int = Field(60, ge=1)
    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int = Field(2, ge=1)
    mem_gb: float | None = None
    array_tasks: int = Field(1, ge=1, description="prepare/embed: number of array tasks")
    array_parallelism: int = Field(64, ge=1)
    additional: dict[str, Any] = Field(default_factory=dict, description="extra sbatch parameters")
    srun_args: list[str] = Field(default_factory=list, description="extra srun arguments, e.g. ['--mpi=pmix']")


class ExecutorConfig(_Section):
    """Where stages run (`spectrolens run --executor`); per-stage SLURM resources (profiles: jobs/)."""

    kind: Literal["local", "slurm"] = "local"
    poll_seconds: float = Field(10.0, gt=0, description="slurm: seconds between sacct polls while waiting")
    prepare: StageResources = StageResources()
    train: StageResources = StageResources()
    embed: StageResources = StageResources()
    analyze: StageResources = StageResources()
    explain: StageResources = StageResources()


class ContainerConfig(_Section):
    image: Path | None = Field(None, description="Apptainer .sif; each stage runs in `apptainer exec --nv`")
    binds: list[str] = Field(default_factory=list)
    runtime: str = "apptainer"


class PipelineConfig(_Section):
    name: str = "spectrolens"
    run_dir: Path | None = None
    seed: int | None = Field(None, description="seeds every stage whose own seed is not given "
                             "(data.benchmark.seed, train.seed, analyze.seed)")
    data: DataConfig = DataConfig()
    graph: GraphConfig = GraphConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    embed: EmbedConfig = EmbedConfig()
    analyze: AnalyzeConfig = AnalyzeConfig()
    explain: ExplainConfig = ExplainConfig()
    predict: PredictConfig = PredictConfig()
    executor: ExecutorConfig = ExecutorConfig()
    container: ContainerConfig = ContainerConfig()

    @model_validator(mode="before")
    @classmethod
    def _spread_seed(cls, raw: Any) -> Any:
        """A top-level ``seed`` fills every stage seed that the config does not set itself."""
        if not isinstance(raw, dict) or raw.get("seed") is None:
            return raw
        raw = json.loads(json.dumps(raw, default=str))  # a deep copy of plain data
        for path in SEEDED:
            cur = raw
            for k in path[:-1]:
                nxt = cur.get(k)
                if nxt is None:
                    nxt = cur[k] = {}
                if not isinstance(nxt, dict):
                    break
                cur = nxt
            else:
                cur.setdefault(path[-1], raw["seed"])
        return raw


#: the stage seeds a top-level ``seed`` fills in
SEEDED: tuple[tuple[str, ...], ...] = (("data", "benchmark", "seed"), ("data", "realbench", "seed"), ("train", "seed"),
                                       ("analyze", "seed"), ("explain", "seed"))


class ConfigError(SpectrolensError, ValueError):
    """A configuration that cannot be used; the message says what to change."""


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(items: list[str] | None) -> dict:
    """``["train.epochs=3", "data.source=jsonl"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(out, key.strip(), yaml.safe_load(raw) if raw != "" else None)
    return out


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> PipelineConfig:
    """Load and validate a pipeline config; raises :class:`ConfigError` naming the file and field."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping at top level")
    ov = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    raw = _deep_merge(raw, ov)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        lines = [f"invalid configuration{where}:"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def _git_revision() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    names = ["spectrolens", "torch", "numpy", "scipy", "pymatgen", "jarvis-tools", "scikit-learn", "submitit",
             "zarr", "numcodecs", "pydantic", "mpi4py", "dgl", "alignn"]
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def record_run(cfg: PipelineConfig, run_dir: Path, stage: str | None = None) -> None:
    """Write ``config.yaml`` and ``run_info.json`` (versions, git revision, seeds, host) into run_dir.

    Safe for concurrent callers (ranks, array tasks, double submissions): atomic writes with unique
    temporary names, and the read-modify-write of run_info.json under a lock."""
    from toolkit.layout import RunLayout
    from toolkit.runtime import FileLock, write_json, write_text

    lay = RunLayout(run_dir)
    lay.root.mkdir(parents=True, exist_ok=True)
    write_text(lay.config, dump_config(cfg))
    with FileLock(lay.root, "run_info"):
        try:
            info = json.loads(lay.run_info.read_text()) if lay.run_info.exists() else {"stages": {}}
        except ValueError:
            info = {"stages": {}}
        info.update({
            "versions": package_versions(),
            "git_revision": _git_revision(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "seeds": {"pipeline": cfg.seed, "benchmark": cfg.data.benchmark.seed, "realbench": cfg.data.realbench.seed,
                      "train": cfg.train.seed, "analyze": cfg.analyze.seed},
        })
        if stage:
            info.setdefault("stages", {})[stage] = {"host": platform.node(), "pid": os.getpid()}
        write_json(lay.run_info, info, indent=2)
