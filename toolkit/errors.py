"""The one base of user-facing errors (a leaf module).

Every error whose message already says what is wrong and what to change derives from
:class:`SpectrolensError`; the CLI prints those as one line without a traceback (exit 1; exit 2 for
:class:`~toolkit.config.ConfigError`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SpectrolensError(Exception):
    """An error explained to the user by its message (file, record, reason, fix)."""


class RunBusyError(SpectrolensError):
    """Another process holds the run directory (or the unit of work) this process asked for."""


class OutOfSpaceError(SpectrolensError, OSError):
    """A write failed for lack of space or permission; the message names the path."""


class StageFailedError(SpectrolensError, RuntimeError):
    """Units of a sharded stage failed; the message names each unit and its log."""


class DeviceError(SpectrolensError, RuntimeError):
    """The requested device cannot be used (e.g. ``cuda`` where torch sees no GPU)."""
