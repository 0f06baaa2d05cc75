"""The `obsfeed` command line: parse, load the config, dispatch to a stage, map errors to exit codes.

Exit codes: 0 ok; 2 bad input, config or a failed gate (one line naming what and where); 1 internal error.
Flags the CLI does not know are passed on to Beam (``--runner``, ``--direct_num_workers``, ...).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from schemas import run_dir as rd
from schemas.config import Config, load_config
from schemas.errors import ConfigError, ObsfeedUserError
from schemas.run_dir import RunDir

STAGES = ("ingest", "fit", "score", "train", "report")
IMPORTERS = {"coat": "import_coat", "hh-rlhf": "import_hh_rlhf"}
"""``obsfeed import SOURCE``: the module in ``pipelines`` with ``add_arguments(parser)`` and ``main(args)``."""
DEFAULT_BEAM_ARGS = ("--runner=DirectRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1")
"""Beam's local FnApiRunner, in-process. Not ``multi_processing``: with 2 workers, Beam 2.77's parallel bundle
manager intermittently dropped part of a grouped input at 1M impressions (about one run in three; caught by
the ingest row-count invariant, reproduced with Beam alone). Pass ``--direct_running_mode=multi_processing
--direct_num_workers=2`` to run that way anyway; the invariant check stays on."""


def stage_function(name: str) -> Callable[..., dict[str, Any]]:
    """The ``run(run_dir, cfg, beam_args)`` of a stage, imported lazily (torch and Beam are heavy)."""
    return importlib.import_module(f"pipelines.{name}").run


def beam_args_with_defaults(beam_args: Sequence[str]) -> list[str]:
    """The caller's Beam flags; the local in-process runner only when no runner was named."""
    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args = [*DEFAULT_BEAM_ARGS, *args]
    return args


def log(msg: str) -> None:
    print(f"[obsfeed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_stages(run: RunDir, cfg: Config, stages: Sequence[str], beam_args: Sequence[str],
               options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run ``stages`` in order, recording each in the manifest; ``_SUCCESS`` last, only if every stage is ok.
    ``options``: stage name → keyword arguments for its ``run`` (e.g. ``{"train": {"resume": True}}``)."""
    from pipelines.manifest import read_manifest, record_stage
    from transforms.io import atomic_write_text

    success = run.path(rd.SUCCESS)
    success.unlink(missing_ok=True)
    results = {}
    for name in stages:
        log(f"{name}: started")
        fn, kwargs = stage_function(name), (options or {}).get(name, {})
        results[name] = record_stage(run, name, cfg.digest(), lambda fn=fn, kw=kwargs: fn(run, cfg, beam_args, **kw))
        log(f"{name}: done in {results[name]['wall_s']:.1f}s")
    manifest = read_manifest(run)
    if all(manifest.get("stages", {}).get(s, {}).get("status") == "ok" for s in STAGES):
        atomic_write_text(success, json.dumps({"run_id": run.run_id, "config_hash": cfg.digest(),
                                               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    return results


def freeze_config(run: RunDir, cfg: Config) -> None:
    """Keep the exact config used (input paths resolved) as ``RUN/config.toml``."""
    from transforms.io import atomic_write_text

    atomic_write_text(run.config_path, cfg.to_toml())


def _parse_stages(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage '{unknown[0]}' (choose from {', '.join(STAGES)})")
    return sorted(names, key=STAGES.index)


def make_parser() -> argparse.ArgumentParser:
    from pipelines import simulate

    parser = argparse.ArgumentParser(prog="obsfeed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="write simulated raw logs with ground truth")
    simulate.add_arguments(sim)
    r = sub.add_parser("run", help="run the pipeline (all stages by default) into a run directory")
    r.add_argument("config", type=Path)
    r.add_argument("run", type=Path)
    r.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    _train_arguments(r)
    for name in STAGES:
        s = sub.add_parser(name, help=f"run the {name} stage on RUN (config from RUN/config.toml)")
        s.add_argument("run", type=Path)
        if name == "train":
            _train_arguments(s)
    im = sub.add_parser("import", help="turn a public dataset into the input contract (plus its ground truth)")
    sources = im.add_subparsers(dest="source", required=True)
    for name, module in IMPORTERS.items():
        importlib.import_module(f"pipelines.{module}").add_arguments(sources.add_parser(name))
    rs = sub.add_parser("runs", help="list the runs under a folder with their status and headline figures")
    rs.add_argument("root", type=Path)
    ev = sub.add_parser("evaluate", help="metrics vs ground truth (simulator) for a finished run")
    ev.add_argument("run", type=Path)
    ev.add_argument("--truth", type=Path, default=None, help="truth.parquet (default: [input].truth)")
    return parser


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="train on this device (overrides train.device; auto = cuda when present)")
    parser.add_argument("--resume", action="store_true",
                        help="train: continue from the last epoch checkpoint of a failed attempt (same inputs and "
                             "settings only)")


def _with_train_flags(cfg: Config, args: argparse.Namespace) -> tuple[Config, dict[str, dict[str, Any]]]:
    """The config with ``--device`` applied, and the stage options ``--resume`` asks for."""
    if args.device is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": args.device})})
    return cfg, ({"train": {"resume": True}} if args.resume else {})


def dispatch(args: argparse.Namespace, beam_args: Sequence[str]) -> int:
    if args.command == "import":
        for k, v in importlib.import_module(f"pipelines.{IMPORTERS[args.source]}").main(args).items():
            print(f"{k:>24}: {v}")
        return 0
    if args.command == "simulate":
        from pipelines import simulate

        for k, v in simulate.main(args).items():
            print(f"{k:>14}: {v}")
        return 0
    if args.command == "runs":
        from pipelines.summary import runs_table

        if not args.root.is_dir():
            raise ConfigError(f"{args.root}: not a folder")
        print("\n".join(runs_table(args.root)))
        return 0
    if args.command == "run":
        cfg, options = _with_train_flags(load_config(args.config), args)
        run = RunDir(args.run)
        run.root.mkdir(parents=True, exist_ok=True)
        freeze_config(run, cfg)
        run_stages(run, cfg, _parse_stages(args.stages), beam_args_with_defaults(beam_args), options)
        from pipelines.summary import print_run_summary

        print_run_summary(run)
        return 0
    run = RunDir(args.run)
    if not run.config_path.exists():
        raise ConfigError(f"{run.config_path}: not found (is {run.root} a run directory made by `obsfeed run`?)")
    cfg = load_config(run.config_path)
    if args.command == "evaluate":
        from pipelines import evaluate

        evaluate.print_evaluation(evaluate.run(run, cfg, truth=args.truth))
        return 0
    options: dict[str, dict[str, Any]] = {}
    if args.command == "train":
        cfg, options = _with_train_flags(cfg, args)
    run_stages(run, cfg, [args.command], beam_args_with_defaults(beam_args), options)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR)  # Beam's import-time notices are not the user's business
    parser = make_parser()
    args, beam_args = parser.parse_known_args(argv)
    if args.command in ("simulate", "evaluate", "runs", "import") and beam_args:
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    try:
        return dispatch(args, beam_args)
    except ObsfeedUserError as e:
        print(f"obsfeed {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - anything else is ours: say so, with the traceback
        user = _user_error_inside(e)
        if user is not None:
            print(f"obsfeed {args.command}: {user}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"obsfeed {args.command}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _user_error_inside(e: BaseException) -> ObsfeedUserError | None:
    """A user error raised inside a Beam worker arrives wrapped; find it in the exception chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ObsfeedUserError):
            return e
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
