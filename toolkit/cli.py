"""`spectrolens` command line.

Every stage command takes ``--config FILE`` (YAML, see jobs/), ``--run-dir DIR`` and any number of
``--set section.key=value`` overrides; the resolved config is validated against
:class:`toolkit.config.PipelineConfig` before any work starts.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from pathlib import Path

from toolkit.config import ConfigError, PipelineConfig, load_config
from toolkit.errors import SpectrolensError

log = logging.getLogger("spectrolens")


def _common(p: argparse.ArgumentParser, run_dir_required: bool = True) -> None:
    p.add_argument("--config", "-c", type=Path, help="pipeline YAML (see jobs/)")
    p.add_argument("--run-dir", "-r", type=Path, required=run_dir_required, help="run directory")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spectrolens", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log-level", default="INFO")
    sub = ap.add_subparsers(dest="command", required=True)

    stage_args = {  # stage command -> (help, extra arguments)
        "prepare": ("read a data source into the canonical Zarr dataset (+ graphs)", [
            (["--strict"], dict(action="store_true", help="exit non-zero if any record was rejected")),
            (["--part"], dict(type=int, default=None, help="build only this part (array-task use)"))]),
        "train": ("train ALIGNN on the prepared dataset (one rank; use torchrun/srun for DDP)", []),
        "embed": ("extract layer activations into embeddings.zarr", [
            (["--verify"], dict(action="store_true", help="report missing / non-finite rows; non-zero exit if any")),
            (["--shard"], dict(type=int, default=None, help="extract only this shard (array-task use)"))]),
        "analyze": ("cluster embeddings, attribute descriptors, write the report", []),
        "explain": ("counterfactual probes and atom/bond/angle attributions through the trained model", [
            (["--shard"], dict(type=int, default=None, help="only this shard (array-task use)"))]),
    }
    for name, (text, extra) in stage_args.items():
        p = sub.add_parser(name, help=text)
        _common(p)
        for flags, kw in extra:
            p.add_argument(*flags, **kw)

    p = sub.add_parser("run", help="run the whole pipeline (prepare -> train -> embed -> analyze)")
    p.add_argument("pipeline", type=Path, help="pipeline YAML")
    p.add_argument("--run-dir", "-r", type=Path, default=None)
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--executor", choices=["local", "slurm"], default=None, help="default: executor.kind")
    p.add_argument("--stages", default="prepare,train,embed,analyze",
                   help="comma-separated stages (prepare, train, embed, analyze, explain); explain is opt-in")
    p.add_argument("--no-wait", action="store_true", help="slurm: submit and return")

    p = sub.add_parser("predict", help="predict spectra of structures with a trained model or ensemble (docs/predict.md)")
    p.add_argument("inputs", type=Path, nargs="+", help="structure files/folders (CIF, POSCAR, pymatgen JSON, ASE .db), "
                   "a .jsonl file or an ALIGNN folder (any source prepare reads: --source)")
    p.add_argument("--checkpoint", "-k", type=Path, required=True,
                   help="a spectrolens run directory (its model or ensemble), a spectrolens .pt, or an upstream "
                        "ALIGNN best_model.pt (config.json beside it)")
    p.add_argument("--out", "-o", type=Path, required=True, help="output folder (predictions.csv, predictions.zarr, "
                   "rejects.csv, figures/, experiment/)")
    p.add_argument("--config", "-c", type=Path, help="pipeline YAML (predict, data and graph settings)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set predict.batch_size=64 (repeatable)")
    p.add_argument("--source", default=None, help="how to read the inputs (default: predict.source, 'auto')")
    p.add_argument("--upstream-config", type=Path, default=None, help="upstream ALIGNN config.json")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default: predict.device")
    p.add_argument("--batch-size", type=int, default=None, help="default: predict.batch_size")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default: predict.workers)")
    p.add_argument("--plot", action="store_true", help="write figures of the predicted spectra")
    p.add_argument("--compare-experiment", type=Path, default=None, metavar="PATH",
                   help="refractiveindex.info database folder: compare with measured spectra by reduced formula")
    p.add_argument("--shard", type=int, default=None, help="predict only this shard (array-task use)")

    p = sub.add_parser("status", help="show each stage and array task of a run from SLURM accounting")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("demo", help="full pipeline on the embedded benchmark, locally, in minutes")
    p.add_argument("--run-dir", "-r", type=Path, default=Path("runs/demo"))
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return ap


def _load(args: argparse.Namespace) -> PipelineConfig:
    extra = list(args.overrides)
    if getattr(args, "strict", False):
        extra.append("data.strict=true")
    return load_config(args.config, extra)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except ConfigError as e:
        print(f"spectrolens: {e}", file=sys.stderr)
        return 2
    except SpectrolensError as e:  # the message already says what is wrong and what to change
        print(f"spectrolens {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # out of space, read-only or not writable: one line naming the path
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        print(f"spectrolens {args.command}: cannot write {e.filename or ''}: {e.strerror}; free space or fix "
              f"permissions and re-run (finished work is kept)", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd in ("prepare", "embed", "explain"):
        cfg = _load(args)
        from toolkit.hpc import launch

        if getattr(args, "verify", False):
            from toolkit import embed

            return embed.verify(cfg, args.run_dir)
        unit = args.part if cmd == "prepare" else args.shard
        if unit is not None:
            launch.run_unit(cmd, cfg, args.run_dir, unit)
            return 0
        launch.run_sharded(cmd, cfg, args.run_dir)
        return 0
    if cmd == "train":
        cfg = _load(args)
        from toolkit import train

        train.run(cfg, args.run_dir)
        return 0
    if cmd == "analyze":
        cfg = _load(args)
        from toolkit import analyze

        analyze.run(cfg, args.run_dir)
        return 0
    if cmd == "run":
        from toolkit.hpc import pipeline

        cfg = load_config(args.pipeline, args.overrides)
        return pipeline.run_pipeline(cfg, run_dir=args.run_dir, executor=args.executor,
                                     stages=[s.strip() for s in args.stages.split(",") if s.strip()],
                                     wait=not args.no_wait)
    if cmd == "predict":
        return _predict(args)
    if cmd == "status":
        from toolkit.hpc import status

        return status.main(args.run_dir)
    if cmd == "demo":
        from toolkit.hpc import pipeline

        return pipeline.demo(args.run_dir, args.overrides)
    raise AssertionError(cmd)


def _predict(args: argparse.Namespace) -> int:
    """``spectrolens predict``: the flags fill the ``predict`` section (they win over --config/--set)."""
    flags = {"inputs": [str(p) for p in args.inputs], "checkpoint": str(args.checkpoint), "source": args.source,
             "upstream_config": args.upstream_config and str(args.upstream_config), "device": args.device,
             "batch_size": args.batch_size, "workers": args.workers,
             "compare_experiment": args.compare_experiment and str(args.compare_experiment),
             "plot": True if args.plot else None}
    extra = [f"predict.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    cfg = load_config(args.config, list(args.overrides) + extra)
    from toolkit.predict import stage

    from toolkit.runtime import mpi_world

    if args.shard is not None or cfg.predict.workers > 1 or (mpi_world() or (0, 1))[1] > 1:
        from toolkit.hpc import launch

        if args.shard is not None:
            launch.run_unit(stage.MODULE, cfg, args.out, args.shard)
            return 0
        summary = launch.run_sharded(stage.MODULE, cfg, args.out)
    else:
        summary = stage.run(cfg, args.out)
    print(f"predicted {summary['n_predicted']} material(s), rejected {summary['n_rejected']} "
          f"(see {stage.Out(args.out).rejects}): {stage.Out(args.out).csv}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
