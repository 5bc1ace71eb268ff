"""Run stages inside an Apptainer (or Singularity) image: ``apptainer exec --nv --bind ... IMAGE python``.

With ``container: {image: PATH}`` in the pipeline config, every stage's Python runs inside the image:
the local executor prefixes its subprocess command lines with :func:`exec_prefix`, and the SLURM
executor hands :func:`python_command` to submitit as its ``python`` (so the SAME submitit job,
unpickled by ``python -m submitit.core._submit``, runs inside the container under ``srun``).
The run directory, the data source, the cache, explicit split/checkpoint files and
``container.binds`` are bound in at the same paths, so every path in the config stays valid.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from toolkit.config import ConfigError, PipelineConfig

PYTHON_IN_IMAGE = "python"  # the image's interpreter (containers/spectrolens.def installs the package into it)


def enabled(cfg: PipelineConfig) -> bool:
    return cfg.container.image is not None


def bind_paths(cfg: PipelineConfig, run_dir: Path) -> list[str]:
    """Host paths to bind (same path inside), deduplicated, in a stable order.

    Files are bound through their parent directory (a data file, a split file, a checkpoint)."""
    out: list[str] = []

    def add(p: Path | str | None, is_dir: bool | None = None) -> None:
        if p is None:
            return
        p = Path(p).expanduser().absolute()
        if is_dir is False or (is_dir is None and p.exists() and not p.is_dir()):
            p = p.parent
        s = str(p)
        if s not in out:
            out.append(s)

    add(run_dir, True)
    add(cfg.data.path)
    add(cfg.data.cache_dir, True)
    add(cfg.train.split_file, False)
    add(cfg.embed.checkpoint, False)
    for b in cfg.container.binds:  # "SRC[:DST[:OPTS]]" passed through as written
        if b not in out:
            out.append(b)
    return out


def exec_prefix(cfg: PipelineConfig, run_dir: Path, check: bool = True) -> list[str]:
    """``[runtime, "exec", "--nv", "--bind", "a,b", IMAGE]``; raises ConfigError if the image is missing
    (``check``) so a typo fails at submission, not in every job."""
    c = cfg.container
    if c.image is None:
        raise ConfigError("container.image is not set")
    image = Path(c.image).expanduser().absolute()
    if check and not image.exists():
        raise ConfigError(f"container.image {image} does not exist (build it: docs/hpc.md, 'Apptainer')")
    return [c.runtime, "exec", "--nv", "--bind", ",".join(bind_paths(cfg, run_dir)), str(image)]


def python_command(cfg: PipelineConfig, run_dir: Path, check: bool = True) -> str:
    """The shell command submitit uses to start Python inside the container (its ``python`` parameter)."""
    return shlex.join([*exec_prefix(cfg, run_dir, check), PYTHON_IN_IMAGE])


def wrap(cfg: PipelineConfig, run_dir: Path, python_argv: list[str]) -> list[str]:
    """A local command line ``[python, args...]`` -> itself, or run inside the container when configured.

    ``python_argv[0]`` is the host interpreter; inside the image it becomes the image's ``python``."""
    if not enabled(cfg):
        return python_argv
    runtime = cfg.container.runtime
    if shutil.which(runtime) is None:
        raise ConfigError(f"container.image is set but {runtime!r} is not on PATH on {_host()}; install "
                          f"Apptainer or remove container.image")
    return [*exec_prefix(cfg, run_dir), PYTHON_IN_IMAGE, *python_argv[1:]]


def _host() -> str:
    import platform

    return platform.node()
