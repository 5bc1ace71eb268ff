"""What a dataset's target is: its kind, heads, units, grid, transform and conditions, and the
features every stage reads from it (train metrics, analyze, predict, explain).

The model always predicts one vector of ``n_outputs`` values per material (and per condition
values). A :class:`TargetSpec` says what those values are:

* ``absorption`` (default, the study): log10 α (or α) on the energy grid; features onset (first
  crossing of ``data.onset_threshold``), edge_integral, peak_1, peak_2 (:mod:`toolkit.data.spectra`).
* ``dielectric``, ``xas``: edge-like spectra in linear units on the energy grid (ε2; ε1 and ε2 as two
  heads; μ(E)); features ``target:onset`` (first crossing of ``data.target.onset_fraction`` x the
  spectrum's maximum), ``target:peak_1``, ``target:peak_2``, ``target:centre`` (first moment), plus
  ``target:eps1_low`` (ε1 at the lowest grid energy) when ε1 is a head.
* ``dos``, ``phonon_dos``: densities of states; features ``target:centre``, ``target:width``
  (second central moment, square root), ``target:skew`` and ``target:peak_1`` (the maximum).
* ``scalar``: one or several named values (band gap, formation energy, ...); the feature of each
  head is ``target:<name>``.

Several heads of one spectral kind (ε1 and ε2) are stored side by side: the stored vector is the
heads concatenated, each on the same grid, and the x-axis of the store (``energy`` attr) is the grid
repeated. Absorption features keep their historical names (``onset``...), every other feature is
prefixed ``target:`` so it never collides with a structural descriptor (a scalar target named
``density`` is ``target:density``).

Conditions (temperature, pressure, ...) are per-record scalars fed to the model as a state vector
(:mod:`toolkit.model.alignn`); their names are part of the spec.

Numbers only (numpy); no pymatgen, so GPU nodes can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

KINDS = ("absorption", "dielectric", "xas", "dos", "phonon_dos", "scalar")
EDGE_KINDS = ("dielectric", "xas")
DOS_KINDS = ("dos", "phonon_dos")
DEFAULT_NAMES = {"absorption": ["log10_alpha"], "dielectric": ["epsilon_2"], "xas": ["mu"], "dos": ["dos"],
                 "phonon_dos": ["phonon_dos"], "scalar": ["target"]}
DEFAULT_UNITS = {"absorption": "log10(alpha / cm^-1)", "dielectric": "1", "xas": "arb. units",
                 "dos": "states/eV", "phonon_dos": "states/THz", "scalar": ""}
X_AXIS = {"absorption": ("energy", "eV"), "dielectric": ("energy", "eV"), "xas": ("energy", "eV"),
          "dos": ("energy", "eV"), "phonon_dos": ("frequency", "THz"), "scalar": ("target", "")}
TRANSFORMS = {"absorption": ("log10_alpha", "alpha"), "dielectric": ("none", "log10", "unit_area"),
              "xas": ("none", "log10", "unit_area"), "dos": ("none", "log10", "unit_area"),
              "phonon_dos": ("none", "log10", "unit_area"), "scalar": ("none", "log10")}
PREFIX = "target:"


@dataclass(frozen=True)
class Head:
    """One named block of the target vector: values ``offset .. offset + size``."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class TargetSpec:
    kind: str = "absorption"
    heads: tuple[Head, ...] = (Head("log10_alpha", 0, 1501),)
    units: str = DEFAULT_UNITS["absorption"]
    transform: str = "log10_alpha"
    log_floor: float = 2.0
    onset_threshold: float = 4.0
    onset_fraction: float = 0.1
    conditions: tuple[str, ...] = field(default_factory=tuple)

    # -- shape ---------------------------------------------------------------------------------
    @property
    def n_outputs(self) -> int:
        return int(sum(h.size for h in self.heads))

    @property
    def spectral(self) -> bool:
        """Values on a grid (every kind but scalar)."""
        return self.kind != "scalar"

    @property
    def x_name(self) -> str:
        return X_AXIS[self.kind][0]

    @property
    def x_units(self) -> str:
        return X_AXIS[self.kind][1]

    def head(self, name: str) -> Head | None:
        return next((h for h in self.heads if h.name == name), None)

    def axis(self, grid: np.ndarray) -> np.ndarray:
        """x value of every output: the grid once per head (spectra), 0..n-1 (scalars)."""
        if not self.spectral:
            return np.arange(self.n_outputs, dtype=np.float64)
        return np.concatenate([np.asarray(grid, dtype=np.float64)] * len(self.heads))

    def feature_head(self) -> Head:
        """The head the spectral features are read from: ε2 when ε1 and ε2 are both heads, else the last."""
        return self.head("epsilon_2") or self.heads[-1]

    # -- features ------------------------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        if self.kind == "absorption":
            return ["onset", "edge_integral", "peak_1", "peak_2"]
        if self.kind in EDGE_KINDS:
            names = ["onset", "peak_1", "peak_2", "centre"] + (["eps1_low"] if self.head("epsilon_1") else [])
            return [PREFIX + n for n in names]
        if self.kind in DOS_KINDS:
            return [PREFIX + n for n in ("centre", "width", "skew", "peak_1")]
        return [PREFIX + h.name for h in self.heads]

    @property
    def primary(self) -> str:
        """The headline feature (onset of absorption; the first scalar; a DOS's centre)."""
        if self.kind in DOS_KINDS:
            return PREFIX + "centre"
        return self.feature_names[0]

    def features(self, x: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
        """Feature name -> (N,) float64 of every row of ``values`` (N, n_outputs) on the store's x-axis
        ``x`` (n_outputs,) (NaN where a feature is undefined: masked, no crossing, no peak)."""
        v = np.atleast_2d(np.asarray(values, dtype=np.float64))
        if v.shape[1] != self.n_outputs:
            raise ValueError(f"values have {v.shape[1]} columns, the target has {self.n_outputs} outputs")
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "absorption":
            return _absorption_features(x, v, self)
        if self.kind == "scalar":
            return {PREFIX + h.name: v[:, h.offset] for h in self.heads}
        h = self.feature_head()
        e, y = x[h.offset:h.offset + h.size], v[:, h.offset:h.offset + h.size]
        if self.transform == "log10":
            y = 10.0 ** y
        out = _moments(e, y)
        if self.kind in DOS_KINDS:
            return {PREFIX + "centre": out["centre"], PREFIX + "width": out["width"], PREFIX + "skew": out["skew"],
                    PREFIX + "peak_1": _argmax_position(e, y)}
        feats = {PREFIX + "onset": _fraction_onset(e, y, self.onset_fraction)}
        peaks = _peaks(e, y)
        feats[PREFIX + "peak_1"], feats[PREFIX + "peak_2"] = peaks[:, 0], peaks[:, 1]
        feats[PREFIX + "centre"] = out["centre"]
        h1 = self.head("epsilon_1")
        if h1 is not None:
            feats[PREFIX + "eps1_low"] = v[:, h1.offset]
        return feats

    def apply_transform(self, values: np.ndarray) -> np.ndarray:
        """Raw values (linear units, heads concatenated) -> stored values, for non-absorption kinds
        (absorption's log10 α is applied by the readers, :func:`toolkit.data.spectra.apply_transform`)."""
        v = np.asarray(values, dtype=np.float64).copy()
        if self.transform == "log10":
            return np.log10(np.maximum(v, 10.0 ** self.log_floor))
        if self.transform == "unit_area":
            for h in self.heads:
                seg = v[..., h.offset:h.offset + h.size]
                area = np.nansum(np.abs(seg), axis=-1, keepdims=True)
                v[..., h.offset:h.offset + h.size] = np.where(area > 0, seg / np.where(area > 0, area, 1.0), np.nan)
        return v

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_attrs(self) -> dict[str, Any]:
        return {"kind": self.kind, "heads": [{"name": h.name, "offset": h.offset, "size": h.size} for h in self.heads],
                "units": self.units, "transform": self.transform, "log_floor": self.log_floor,
                "onset_threshold": self.onset_threshold, "onset_fraction": self.onset_fraction,
                "conditions": list(self.conditions), "features": self.feature_names,
                "x_name": self.x_name, "x_units": self.x_units}

    @classmethod
    def from_attrs(cls, attrs: dict) -> TargetSpec:
        """The spec of a dataset store (root attrs); stores written before targets existed are absorption."""
        t = attrs.get("target")
        if not t:
            n = len(attrs.get("energy", [])) or 1501
            return cls(heads=(Head("log10_alpha", 0, n),), transform=attrs.get("transform", "log10_alpha"),
                       log_floor=float(attrs.get("log_floor", 2.0)),
                       onset_threshold=float(attrs.get("onset_threshold", 4.0)))
        return cls(kind=t["kind"], heads=tuple(Head(h["name"], int(h["offset"]), int(h["size"])) for h in t["heads"]),
                   units=t.get("units", ""), transform=t.get("transform", "none"),
                   log_floor=float(t.get("log_floor", 2.0)), onset_threshold=float(t.get("onset_threshold", 4.0)),
                   onset_fraction=float(t.get("onset_fraction", 0.1)), conditions=tuple(t.get("conditions", ())))

    @classmethod
    def from_config(cls, data_cfg: Any) -> TargetSpec:
        """The spec a ``data`` config section prepares (:class:`toolkit.config.DataConfig`)."""
        t = data_cfg.target
        names = list(t.names or DEFAULT_NAMES[t.kind])
        size = 1 if t.kind == "scalar" else int(data_cfg.grid.num)
        heads = tuple(Head(n, i * size, size) for i, n in enumerate(names))
        return cls(kind=t.kind, heads=heads, units=t.units if t.units is not None else DEFAULT_UNITS[t.kind],
                   transform=data_cfg.transform, log_floor=float(data_cfg.log_floor),
                   onset_threshold=float(data_cfg.onset_threshold), onset_fraction=float(t.onset_fraction),
                   conditions=tuple(t.conditions))


def spec_of(reader_or_attrs: Any) -> TargetSpec:
    """The :class:`TargetSpec` of a dataset reader (``.attrs``) or of root attrs."""
    attrs = getattr(reader_or_attrs, "attrs", reader_or_attrs)
    return TargetSpec.from_attrs(dict(attrs))


def is_feature(name: str) -> bool:
    """A target feature column of a descriptor table (reference or ``pred:``), of any kind."""
    base = name.removeprefix("pred:")
    return base.startswith(PREFIX) or base in ("onset", "edge_integral", "peak_1", "peak_2")


# -- feature functions ---------------------------------------------------------------------------
def _absorption_features(x: np.ndarray, v: np.ndarray, spec: TargetSpec) -> dict[str, np.ndarray]:
    from toolkit.data.spectra import (
        edge_integral,
        onset_energy,
        peak_positions,
        to_log10,
    )

    y = to_log10(v, spec.transform, spec.log_floor)
    on = np.atleast_1d(onset_energy(x, y, spec.onset_threshold))
    edge = np.atleast_1d(edge_integral(x, y, on, log_floor=spec.log_floor))
    peaks = np.full((len(y), 2), np.nan)
    for i, row in enumerate(y):
        if np.isfinite(row).sum() >= 3:
            peaks[i] = peak_positions(x, row)[:2]
    return {"onset": on, "edge_integral": edge, "peak_1": peaks[:, 0], "peak_2": peaks[:, 1]}


def _moments(e: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Centre, width (SD) and skewness of each row as a distribution over ``e`` (negative and masked
    values count as 0; NaN for a row with no weight)."""
    w = np.where(np.isfinite(y), np.maximum(y, 0.0), 0.0)
    tot = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = (w * e).sum(axis=1) / tot
        d = e[None, :] - mu[:, None]
        var = (w * d ** 2).sum(axis=1) / tot
        sd = np.sqrt(var)
        skew = (w * d ** 3).sum(axis=1) / tot / sd ** 3
    bad = tot <= 0
    return {"centre": np.where(bad, np.nan, mu), "width": np.where(bad, np.nan, sd),
            "skew": np.where(bad | (sd <= 0), np.nan, skew)}


def _argmax_position(e: np.ndarray, y: np.ndarray) -> np.ndarray:
    ok = np.isfinite(y).any(axis=1)
    idx = np.argmax(np.where(np.isfinite(y), y, -np.inf), axis=1)
    return np.where(ok, e[idx], np.nan)


def _fraction_onset(e: np.ndarray, y: np.ndarray, fraction: float) -> np.ndarray:
    """First crossing of ``fraction`` x the row's maximum (interpolated), the onset of a linear spectrum."""
    from toolkit.data.spectra import onset_energy

    top = np.nanmax(np.where(np.isfinite(y), y, -np.inf), axis=1)
    ok = np.isfinite(top) & (top > 0)
    scaled = y / np.where(ok, top, 1.0)[:, None]
    out = np.atleast_1d(onset_energy(e, scaled, fraction))
    return np.where(ok, out, np.nan)


def _peaks(e: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, 2) positions of the two most prominent peaks (prominence >= 5 % of the maximum, and above
    the row's own noise; :func:`toolkit.data.spectra.peak_positions`)."""
    from toolkit.data.spectra import peak_positions

    out = np.full((len(y), 2), np.nan)
    for i, row in enumerate(y):
        fin = np.isfinite(row)
        if fin.sum() < 3:
            continue
        top = float(np.nanmax(row))
        if top <= 0:
            continue
        out[i] = peak_positions(e, row / top, n=2, prominence=0.05)
    return out
