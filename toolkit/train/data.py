"""What training needs from RUN_DIR/dataset.zarr: ids, grid, config checks, and the data loaders.

All checks that compare the config with the data run here, before any process group or model exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.config import ConfigError, PipelineConfig
from toolkit.data.store import DatasetReader, StoreError
from toolkit.data.targets import TargetSpec, spec_of
from toolkit.layout import RunLayout
from toolkit.train.distributed import DistEnv
from toolkit.train.loop import Loaders
from toolkit.train.split import Split

log = logging.getLogger(__name__)


def source_kind(attrs: dict) -> str | None:
    """The store's source kind (``attrs['source']`` is the source's metadata dict or its name)."""
    src = attrs.get("source")
    return src.get("source") if isinstance(src, dict) else src


@dataclass
class TrainingData:
    store_path: Path
    reader: DatasetReader
    ids: list[str]
    has_spectrum: np.ndarray
    energy: np.ndarray  # (G,) eV
    output_features: int
    onset_threshold: float
    spec: TargetSpec | None = None  # what the values are (toolkit.data.targets)
    groups: list[str] | None = None  # structure of each record when several records share one (conditions)

    def with_conditions(self, cfg: PipelineConfig) -> PipelineConfig:
        """``cfg`` with ``model.conditions`` = the dataset's conditions (data.target.conditions); a config
        that names other conditions is refused."""
        have = list(self.spec.conditions) if self.spec is not None else []
        want = list(cfg.model.conditions)
        if want and want != have:
            raise ConfigError(f"model.conditions={want} but the dataset {self.store_path} has conditions {have}: "
                              f"leave model.conditions empty to follow the dataset")
        if have and not want:
            log.info("model inputs: conditions %s (state vector of %d values)", have, len(have))
            return cfg.model_copy(update={"model": cfg.model.model_copy(update={"conditions": have})})
        return cfg

    def conditions(self, indices: np.ndarray) -> np.ndarray:
        """(n, C) raw condition values of the given records."""
        names = self.spec.conditions if self.spec is not None else ()
        return np.column_stack([self.reader.column(f"conditions/{c}", indices) for c in names]) if names else \
            np.zeros((len(indices), 0))

    def noise_floor(self) -> float | None:
        """The noise floor (MAE of a perfect predictor, target units) of a benchmark with planted noise
        (``data.source: benchmark`` or ``realbench``: the ``benchmark_truth.noise`` attribute), or None."""
        truth = self.reader.attrs.get("benchmark_truth")
        if source_kind(self.reader.attrs) != "benchmark" and not (isinstance(truth, dict) and truth.get("kind") == "realbench"):
            return None
        from toolkit.data.benchmark import noise_floor

        if not isinstance(truth, dict) or "noise" not in truth:
            log.warning("%s has source=benchmark but no benchmark_truth.noise attribute: no noise floor",
                        self.store_path)
            return None
        return noise_floor(float(truth["noise"]))

    def mean_spectrum(self, indices: np.ndarray) -> np.ndarray:
        """Mean target spectrum (G,) of the given materials over their unmasked points (target units)."""
        spec = self.reader.column("spectrum", indices).astype(np.float64)
        cnt = np.isfinite(spec).sum(0)
        mean = np.where(cnt > 0, np.nansum(spec, 0) / np.maximum(cnt, 1), np.nanmean(spec))
        return mean.astype(np.float32)

    def loaders(self, split: Split, denv: DistEnv, cfg: PipelineConfig, pin_memory: bool = False) -> Loaders:
        """Training: the block-shuffle sampler, a disjoint equal-size slice per rank (resumable mid-epoch).
        Validation: rank ``r`` takes every ``world``-th material (no padding, so no material counts twice).
        Test: everything, for rank 0's final report. ``pin_memory`` (on a GPU): batches are collated
        into page-locked memory, so the trainer's ``non_blocking`` copy overlaps the previous step."""
        from toolkit.data.loader import make_loader

        tc = cfg.train
        kw = dict(batch_size=tc.batch_size, num_workers=tc.num_workers, pin_memory=pin_memory)
        train = make_loader(self.store_path, split.indices("train", self.ids), shuffle=True, seed=tc.seed,
                            rank=denv.rank, world=denv.world_size, **kw)
        val_idx = split.indices("val", self.ids)[denv.rank::denv.world_size]
        val = make_loader(self.store_path, val_idx, shuffle=False, **kw) if len(val_idx) else None
        test_idx = split.indices("test", self.ids)
        test = make_loader(self.store_path, test_idx, shuffle=False, **kw) if len(test_idx) else None
        sampler = train.sampler
        bs = tc.batch_size
        return Loaders(train=train, val=val, test=test, steps_per_epoch=len(train), set_epoch=sampler.set_epoch,
                       sampler_state=lambda batches_done: sampler.state_dict(consumed=batches_done * bs),
                       load_sampler_state=sampler.load_state_dict)


def open_training_data(cfg: PipelineConfig, run_dir: Path) -> TrainingData:
    """Open the run's dataset and check the config against it; :class:`ConfigError` says what to change."""
    store = RunLayout(run_dir).dataset
    if not store.exists():
        raise ConfigError(f"no dataset at {store}: run `spectrolens prepare` with this run directory first")
    try:
        reader = DatasetReader(store)
    except StoreError as e:
        raise ConfigError(str(e)) from e
    energy = reader.energy
    g = int(energy.shape[0])
    of = cfg.model.output_features
    if of is not None and of != g:
        raise ConfigError(f"model.output_features={of} but the dataset {store} has {g} grid points "
                          f"(data.grid.num={reader.attrs.get('grid', {}).get('num', g)}): set model.output_features="
                          f"{g} (or null to follow the dataset), or re-prepare with data.grid.num={of}")
    n_spec = int(reader.has_spectrum.sum())
    if n_spec == 0:
        raise ConfigError(f"the dataset {store} has {len(reader)} materials but none with a spectrum: nothing "
                          f"to train on (structure-only sources can be embedded with an existing checkpoint)")
    thr = float(reader.attrs.get("onset_threshold", cfg.data.onset_threshold))
    spec = spec_of(reader)
    groups = None
    if spec.conditions:
        try:
            groups = [str(x) for x in reader.column("group/structure_id")]
        except StoreError:
            log.warning("%s has conditions but no group/structure_id: records are split one by one, so one "
                        "structure can be in training and test at different conditions", store)
    return TrainingData(store, reader, [str(x) for x in reader.ids], reader.has_spectrum, energy, g, thr, spec,
                        groups)
