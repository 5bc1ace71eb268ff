"""Readers: one :class:`Source` per input kind, dispatched on ``cfg.source`` by :func:`open_source`.

Contract with the prepare stage (docs/architecture.md, docs/data.md):

* ``scan()`` is a cheap pass over the whole source returning the ordered, deterministic record keys
  to load and the rejects found at source level (duplicate ids, table rows without a file, files
  without a row, rows with the wrong number of values, NaN/inf/negative values, ...).
* ``load(keys)`` parses exactly those keys (any subset, any order) into :class:`Material` on the
  target grid, yielding a :class:`Reject` for every record that fails; it never raises for one bad
  record. Sources are plain picklable objects built from the config, so workers can re-create them.
* ``metadata()`` describes the source for the dataset attributes.

Source-level misconfiguration (missing path, wrong grid for the table) raises
:class:`toolkit.config.ConfigError` with a message saying what to change.
"""

from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

from toolkit.config import ConfigError, DataConfig
from toolkit.data.records import Material, Reject

__all__ = ["Source", "open_source", "Material", "Reject"]


@runtime_checkable
class Source(Protocol):
    name: str

    def scan(self) -> tuple[list[str], list[Reject]]:
        """Record keys to load (ordered, deterministic) and source-level rejects."""
        ...

    def load(self, keys: list[str]) -> Iterator[Material | Reject]:
        """Materials (or Rejects) for exactly these keys, in the given order."""
        ...

    def metadata(self) -> dict:
        """{"source": kind, "path": ..., "units": ..., "transform": ..., ...}"""
        ...


def open_source(cfg: DataConfig) -> Source:
    """The :class:`Source` for ``cfg.source`` (raises ConfigError on an unusable configuration)."""
    kind = cfg.source
    if kind == "benchmark":
        from toolkit.data.benchmark import BenchmarkSource

        return BenchmarkSource(cfg)
    if kind == "realbench":
        from toolkit.data.realbench import RealBenchSource

        return RealBenchSource(cfg)
    if kind != "jarvis" and cfg.path is None:
        raise ConfigError(f"data.source={kind!r} needs data.path (the file or folder to read)")
    if kind != "jarvis" and not cfg.path.exists():
        raise ConfigError(f"data.path {cfg.path} does not exist (data.source={kind!r})")
    if kind == "alignn":
        from toolkit.data.readers.alignn import AlignnSource

        return AlignnSource(cfg)
    if kind == "jsonl":
        from toolkit.data.readers.jsonl import JsonlSource

        return JsonlSource(cfg)
    if kind == "vasp":
        from toolkit.data.readers.vasp import VaspSource

        return VaspSource(cfg)
    if kind == "jarvis":
        from toolkit.data.readers.jarvis import JarvisSource

        return JarvisSource(cfg)
    if kind == "refractiveindex":
        from toolkit.data.readers.refractiveindex import RefractiveIndexSource

        return RefractiveIndexSource(cfg)
    raise ConfigError(f"unknown data.source {kind!r}")  # pragma: no cover - Literal-validated
