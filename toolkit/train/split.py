"""The train/validation/test split, by material id, reproducible and saved (RUN_DIR/train/split.json).

Rule (upstream ALIGNN's, so the study's 2,681 materials give 2144/268/268): sort the ids, permute them
with ``numpy.random.default_rng(seed)``, take ``int(f_train*N)`` for training, ``int(f_test*N)`` for
test (the last ones), ``int(f_val*N)`` for validation (just before test). What the integer rounding
leaves over is listed under ``unassigned`` and logged, never dropped silently. Structure-only materials
(no spectrum) are listed under ``excluded_no_spectrum`` and logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.config import ConfigError

log = logging.getLogger(__name__)

SETS = ("train", "val", "test")


@dataclass
class Split:
    """Material ids of each set (dataset order within a set is not implied)."""

    train: list[str]
    val: list[str]
    test: list[str]
    excluded_no_spectrum: list[str] = field(default_factory=list)
    unassigned: list[str] = field(default_factory=list)
    source: str = "fractions"  # "fractions" | path of the split file
    seed: int | None = None

    def to_json(self) -> dict:
        return {"train": self.train, "val": self.val, "test": self.test,
                "excluded_no_spectrum": self.excluded_no_spectrum, "unassigned": self.unassigned,
                "counts": {k: len(getattr(self, k)) for k in (*SETS, "excluded_no_spectrum", "unassigned")},
                "source": self.source, "seed": self.seed}

    def indices(self, name: str, ids: Sequence[str]) -> np.ndarray:
        """Row indices (in the dataset store) of set ``name``, sorted ascending."""
        pos = {m: i for i, m in enumerate(ids)}
        return np.sort(np.fromiter((pos[m] for m in getattr(self, name)), dtype=np.int64))


def make_split(ids: Sequence[str], has_spectrum: Sequence[bool] | np.ndarray, fractions: Sequence[float],
               seed: int, groups: Sequence[str] | None = None) -> Split:
    """Random split of the materials that have a spectrum (see module docstring for the rule).

    ``groups`` (one key per id, e.g. the structure of records measured at several temperatures): the
    rule is applied to the sorted group keys and every record follows its group, so no structure is
    in two sets (the fractions then count groups)."""
    if groups is not None:
        return _group_split(ids, has_spectrum, fractions, seed, groups)
    ids_arr = np.asarray(ids, dtype=object)
    mask = np.asarray(has_spectrum, dtype=bool)
    excluded = sorted(str(x) for x in ids_arr[~mask])
    usable = np.array(sorted(str(x) for x in ids_arr[mask]), dtype=object)
    n = len(usable)
    order = usable[np.random.default_rng(seed).permutation(n)] if n else usable
    n_train, n_val, n_test = (int(f * n) for f in fractions)
    train = order[:n_train]
    test = order[n - n_test:] if n_test else order[:0]
    val = order[n - n_test - n_val:n - n_test] if n_val else order[:0]
    unassigned = order[n_train:n - n_test - n_val]
    return Split([str(x) for x in train], [str(x) for x in val], [str(x) for x in test],
                 excluded, sorted(str(x) for x in unassigned), "fractions", seed)


def _group_split(ids, has_spectrum, fractions, seed, groups) -> Split:
    mask = np.asarray(has_spectrum, dtype=bool)
    g = np.asarray([str(x) for x in groups], dtype=object)
    keys = sorted({str(x) for x in g[mask]})
    by_group = make_split(keys, np.ones(len(keys), bool), fractions, seed)
    where = {k: name for name in (*SETS, "unassigned") for k in getattr(by_group, name)}
    sets: dict[str, list[str]] = {name: [] for name in (*SETS, "unassigned")}
    excluded = []
    for m, k, ok in zip(ids, g, mask):
        if ok:
            sets[where[str(k)]].append(str(m))
        else:
            excluded.append(str(m))
    return Split(sets["train"], sets["val"], sets["test"], sorted(excluded), sorted(sets["unassigned"]),
                 "fractions (grouped by structure)", seed)


def read_split_file(path: Path, ids: Sequence[str], has_spectrum: Sequence[bool] | np.ndarray) -> Split:
    """Load ``{train: [...], val: [...], test: [...]}``; every id must exist in the dataset and be in one set."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.split_file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.split_file {path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or any(not isinstance(raw.get(k), list) for k in SETS):
        raise ConfigError(f"train.split_file {path} must hold lists 'train', 'val' and 'test' of material ids")
    known = dict(zip(ids, np.asarray(has_spectrum, dtype=bool)))
    seen: dict[str, str] = {}
    sets: dict[str, list[str]] = {}
    excluded: list[str] = []
    for k in SETS:
        unknown = [str(m) for m in raw[k] if str(m) not in known]
        if unknown:
            raise ConfigError(f"train.split_file {path}: {len(unknown)} id(s) in '{k}' are not in the dataset, "
                              f"e.g. {unknown[:5]}; fix the file or prepare a dataset that holds them")
        dup = [str(m) for m in raw[k] if str(m) in seen]
        if dup:
            raise ConfigError(f"train.split_file {path}: id(s) {dup[:5]} appear in '{k}' and in "
                              f"'{seen[dup[0]]}' (or twice); each id must be in exactly one set")
        for m in raw[k]:
            seen[str(m)] = k
        sets[k] = [str(m) for m in raw[k] if known[str(m)]]
        excluded += [str(m) for m in raw[k] if not known[str(m)]]
    not_listed = sorted(set(known) - set(seen))
    if not_listed:
        log.info("split file %s leaves %d dataset material(s) out of all sets", path, len(not_listed))
    return Split(sets["train"], sets["val"], sets["test"], sorted(excluded), not_listed, str(path), None)


def save_split(split: Split, path: Path) -> None:
    """Write split.json atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(split.to_json(), indent=1))
    os.replace(tmp, path)


def load_saved_split(path: Path) -> Split:
    raw = json.loads(Path(path).read_text())
    return Split(raw["train"], raw["val"], raw["test"], raw.get("excluded_no_spectrum", []),
                 raw.get("unassigned", []), raw.get("source", "fractions"), raw.get("seed"))


def resolve_split(cfg_train, ids: Sequence[str], has_spectrum: Sequence[bool] | np.ndarray,
                  saved: Path, groups: Sequence[str] | None = None) -> Split:
    """The split of this run: the saved one if the run already has it, else from the file or fractions.

    Raises :class:`ConfigError` if the training set would be empty or a saved split names unknown ids."""
    if saved.is_file():
        split = load_saved_split(saved)
        known = set(ids)
        missing = [m for k in SETS for m in getattr(split, k) if m not in known]
        if missing:
            raise ConfigError(f"{saved} names {len(missing)} id(s) not in the dataset (e.g. {missing[:5]}): "
                              f"the dataset changed since this run started; use a new run directory")
        log.info("using the saved split %s", saved)
    elif cfg_train.split_file is not None:
        split = read_split_file(cfg_train.split_file, ids, has_spectrum)
    else:
        split = make_split(ids, has_spectrum, cfg_train.split, cfg_train.seed, groups)
    if split.excluded_no_spectrum:
        log.info("excluded %d structure-only material(s) (no spectrum) from training/validation/test",
                 len(split.excluded_no_spectrum))
    if split.unassigned:
        log.info("%d material(s) not in any set (integer rounding of the split fractions / not in the split "
                 "file); listed under 'unassigned' in split.json", len(split.unassigned))
    if not split.train:
        raise ConfigError(f"the training set is empty ({len(ids)} materials in the dataset, "
                          f"{len(split.excluded_no_spectrum)} without a spectrum): check train.split / "
                          f"train.split_file and the dataset")
    log.info("split: %d train / %d val / %d test", len(split.train), len(split.val), len(split.test))
    return split
