"""The `obsfeed` command line: parse, load the config, dispatch to a stage, map errors to exit codes.

Exit codes: 0 ok; 2 bad input, config or a failed gate (one line naming what and where); 1 internal error.
Flags the CLI does not know are passed on to Beam (``--runner``, ``--direct_num_workers``, ...).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.orchestration.lock import root_lock
from pipelines.orchestration.logs import configure_logging
from pipelines.orchestration.registry import STAGES, freeze_config, run_stages
from schemas import run_dir as rd
from schemas.config import Config, load_config
from schemas.errors import ConfigError, ObsfeedUserError
from schemas.run_dir import RunDir
from transforms.runner import beam_args_with_defaults

logger = logging.getLogger("pipelines.orchestration.cli")   # also when run as __main__

IMPORTERS = {"coat": "pipelines.sources.coat", "hh-rlhf": "pipelines.sources.hh_rlhf"}
"""``obsfeed import SOURCE``: the module in ``pipelines`` with ``add_arguments(parser)`` and ``main(args)``."""
def _parse_stages(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage '{unknown[0]}' (choose from {', '.join(STAGES)})")
    return sorted(names, key=STAGES.index)


def make_parser() -> argparse.ArgumentParser:
    from pipelines.sources import simulator as simulate

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-format", choices=("text", "json"), default=argparse.SUPPRESS,
                        help="stderr as human-readable lines (default) or JSON lines for a scheduler")
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also show the libraries' own warnings and notices (Beam, scikit-learn, ...)")
    parser = argparse.ArgumentParser(prog="obsfeed", description=__doc__.splitlines()[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser

    def sub_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return add(name, parents=[common], **kwargs)

    sub.add_parser = sub_parser                               # every subcommand takes --log-format too
    sim = sub.add_parser("simulate", help="write simulated raw logs with ground truth")
    simulate.add_arguments(sim)
    r = sub.add_parser("run", help="run the pipeline (all stages by default) into a run directory")
    r.add_argument("config", type=Path)
    r.add_argument("run", type=Path)
    r.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    _train_arguments(r)
    _schedule_arguments(r)
    for name in STAGES:
        s = sub.add_parser(name, help=f"run the {name} stage on RUN (config from RUN/config.toml)")
        s.add_argument("run", type=Path)
        if name == "train":
            _train_arguments(s)
        if name == "fit":
            s.add_argument("--from", dest="from_date", type=_date, default=None,
                           help="with --to, RUN is a scheduled root: fit on its published days FROM..TO into "
                                "RUN/fits/FROM_TO (for --models-from)")
            s.add_argument("--to", dest="to_date", type=_date, default=None)
            s.add_argument("--config", type=Path, default=None,
                           help="with --from/--to: the config to fit with (default: the last day's)")
    u = sub.add_parser("unlock", help="remove the stale lock a killed run left on a run directory or scheduled root")
    u.add_argument("root", type=Path)
    u.add_argument("--force", action="store_true",
                   help="also when the holder ran on another host (make sure it has stopped)")
    im = sub.add_parser("import", help="turn a public dataset into the input contract (plus its ground truth)")
    sources = im.add_subparsers(dest="source", required=True)
    for name, module in IMPORTERS.items():
        importlib.import_module(module).add_arguments(sources.add_parser(name))
    rs = sub.add_parser("runs", help="list the runs under a folder with their status and headline figures")
    rs.add_argument("root", type=Path)
    ev = sub.add_parser("evaluate", help="metrics vs ground truth (simulator) for a finished run")
    ev.add_argument("run", type=Path)
    ev.add_argument("--truth", type=Path, default=None, help="truth.parquet (default: [input].truth)")
    ev.add_argument("--placebo", action="store_true",
                    help="also refit with each confounder and the observed flag shuffled within strata: the effects "
                         "and the weighted-vs-naive difference should be 0 within noise (reported, not gated; "
                         "needs no ground truth)")
    return parser


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="train on this device (overrides train.device; auto = cuda when present)")
    parser.add_argument("--resume", action="store_true",
                        help="train: continue from the last epoch checkpoint of a failed attempt (same inputs and "
                             "settings only)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="train: N data-parallel processes on this machine (launches torchrun: one per GPU, or "
                             "gloo processes on CPU); an optimiser step then takes N x train.batch_size rows")


def _schedule_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--date", type=_date, default=None,
                        help="scheduled run: process this logical day (UTC) into RUN as a root of date partitions")
    parser.add_argument("--from", dest="from_date", type=_date, default=None,
                        help="backfill the days FROM..TO (inclusive), one at a time; days already ok are skipped")
    parser.add_argument("--to", dest="to_date", type=_date, default=None)
    parser.add_argument("--force", action="store_true", help="re-run days that are already ok")
    parser.add_argument("--models-from", type=Path, default=None,
                        help="score with the models fitted earlier in this run / day / fit directory (no fit)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config and inputs, print the plan, write nothing")


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _days(args: argparse.Namespace) -> list[dt.date] | None:
    """The days a scheduled command names (--date, or --from with --to), or None for a plain run."""
    from pipelines.orchestration.schedule import days_between

    if args.date and (args.from_date or args.to_date):
        raise ConfigError("--date and --from/--to: give one or the other")
    if bool(args.from_date) != bool(args.to_date):
        raise ConfigError("--from and --to go together")
    if args.date:
        return [args.date]
    return days_between(args.from_date, args.to_date) if args.from_date else None


def _with_train_flags(cfg: Config, args: argparse.Namespace) -> tuple[Config, dict[str, dict[str, Any]]]:
    """The config with ``--device`` applied, and the stage options ``--resume`` asks for."""
    if args.device is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": args.device})})
    return cfg, ({"train": {"resume": True}} if args.resume else {})


def _distributed_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``obsfeed train RUN --nproc N``: this same command under ``torchrun`` with N local processes, after checking
    that the machine has N devices (GPUs for CUDA, cores for gloo)."""
    import subprocess

    import torch

    from pipelines import train

    n = args.nproc
    run = RunDir(args.run)
    if not run.config_path.exists():
        raise ConfigError(f"{run.config_path}: not found (is {run.root} a run directory made by `obsfeed run`?)")
    cfg, _ = _with_train_flags(load_config(run.config_path), args)
    device = cfg.train.device
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    have = torch.cuda.device_count() if cuda else len(os.sched_getaffinity(0))
    if n > have:
        raise ConfigError(f"--nproc {n}: this machine has {have} {'CUDA devices' if cuda else 'CPU cores'}")
    train.preflight(cfg, run)                           # bad settings: one line and exit 2 here, not N tracebacks
    rest, skip = [], False
    for token in argv:                                  # the same arguments, less --nproc
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            rest.append(token)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "pipelines.orchestration.cli", *rest]
    return subprocess.run(command, check=False).returncode


def _train_rank(args: argparse.Namespace, beam_args: Sequence[str]) -> int:
    """A torchrun rank other than 0: train its share and write nothing; rank 0 holds the lock and the manifest."""
    from pipelines import train

    run = RunDir(args.run)
    cfg, options = _with_train_flags(load_config(run.config_path), args)
    train.execute(run, cfg, beam_args, **options.get("train", {}))
    return 0


def dispatch(args: argparse.Namespace, beam_args: Sequence[str], argv: Sequence[str] = ()) -> int:
    if args.command == "train" and args.nproc is not None:
        if args.nproc < 1:
            raise ConfigError(f"--nproc {args.nproc}: need at least 1")
        if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return _distributed_train(args, argv)
    if args.command == "train" and int(os.environ.get("RANK", "0")) != 0:
        return _train_rank(args, beam_args)
    if args.command == "import":
        for k, v in importlib.import_module(IMPORTERS[args.source]).main(args).items():
            print(f"{k:>24}: {v}")
        return 0
    if args.command == "simulate":
        from pipelines.sources import simulator as simulate

        for k, v in simulate.main(args).items():
            print(f"{k:>14}: {v}")
        return 0
    if args.command == "runs":
        from pipelines.orchestration.summary import runs_table

        if not args.root.is_dir():
            raise ConfigError(f"{args.root}: not a folder")
        if (args.root / rd.CATALOGUE).exists():                  # a scheduled root: its days
            from pipelines.orchestration.catalogue import read_catalogue
            from pipelines.orchestration.summary import catalogue_lines

            print("\n".join(catalogue_lines(read_catalogue(args.root))))
            return 0
        print("\n".join(runs_table(args.root)))
        return 0
    if args.command == "unlock":
        from pipelines.orchestration.lock import unlock

        print(unlock(args.root, force=args.force))
        return 0
    if args.command == "run":
        cfg, options = _with_train_flags(load_config(args.config), args)
        days = _days(args)
        if days is not None or args.dry_run or args.models_from or args.force:
            return _scheduled(args, cfg, days, options, beam_args)
        run = RunDir(args.run)
        stages = _parse_stages(args.stages)
        with root_lock(run.root):                    # one writer per run directory, config included
            freeze_config(run, cfg)
            run_stages(run, cfg, stages, beam_args_with_defaults(beam_args), options)
        from pipelines.orchestration.summary import print_run_summary

        print_run_summary(run)
        return 0
    if args.command == "fit" and args.config and not (args.from_date or args.to_date):
        raise ConfigError("fit --config goes with --from/--to (a plain fit uses RUN/config.toml)")
    if args.command == "fit" and (args.from_date or args.to_date):
        from pipelines.orchestration.schedule import fit_window

        if not (args.from_date and args.to_date):
            raise ConfigError("--from and --to go together")
        print(fit_window(args.run, args.from_date, args.to_date, beam_args_with_defaults(beam_args), args.config))
        return 0
    run = RunDir(args.run)
    if not run.config_path.exists():
        raise ConfigError(f"{run.config_path}: not found (is {run.root} a run directory made by `obsfeed run`?)")
    cfg = load_config(run.config_path)
    if args.command == "evaluate":
        from pipelines import evaluate

        evaluate.print_evaluation(evaluate.execute(run, cfg, truth=args.truth, placebo=args.placebo))
        return 0
    with root_lock(run.root):
        cfg = load_config(run.config_path)               # read again under the lock: another run may have rewritten it
        options: dict[str, dict[str, Any]] = {}
        if args.command == "train":
            cfg, options = _with_train_flags(cfg, args)
        run_stages(run, cfg, [args.command], beam_args_with_defaults(beam_args), options)
    return 0


def _scheduled(args: argparse.Namespace, cfg: Config, days: list[dt.date] | None, options: dict[str, Any],
               beam_args: Sequence[str]) -> int:
    """``obsfeed run --date / --from --to [--dry-run] [--models-from]``: days into a scheduled root."""
    from pipelines.orchestration import schedule
    stages = _parse_stages(args.stages)
    if days is None:
        raise ConfigError("--dry-run, --models-from and --force are for scheduled runs: add --date or --from/--to")
    if args.dry_run:
        plan = schedule.dry_run(cfg, args.run, days, force=args.force, models_from=args.models_from, stages=stages)
        if _json_logs(args):
            print(json.dumps(plan, default=str))
        else:
            print(f"plan for {plan['root']} (lock: {plan['lock']}; stages {', '.join(plan['stages'])}; "
                  f"late window {plan['late_window']} days; models: {plan['models_from'] or 'fitted per day'}):")
            for d in plan["days"]:
                print(f"  {d['day']}  {d['action']:<4}  (status {d['status'] or 'new'}, {d['attempts']} attempts)")
        return 0
    rows = schedule.run_days(cfg, args.run, days, stages=stages, beam_args=beam_args_with_defaults(beam_args),
                             options=options, force=args.force, models_from=args.models_from)
    from pipelines.orchestration.summary import catalogue_lines

    if _json_logs(args):
        for row in rows:
            print(json.dumps(row, default=str))
    else:
        print("\n".join(catalogue_lines(rows)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, beam_args = parser.parse_known_args(argv)
    if args.command in ("simulate", "evaluate", "runs", "import") and beam_args:
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    with configure_logging(getattr(args, "log_format", "text"), verbose=getattr(args, "verbose", False)):
        try:
            return dispatch(args, beam_args, argv)
        except ObsfeedUserError as e:
            return _fail(args.command, str(e), 2, error=type(e).__name__)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - anything else is ours (a Rust panic too): say so, with the traceback
            user = _user_error_inside(e)
            if user is not None:
                return _fail(args.command, str(user), 2, error=type(user).__name__)
            return _fail(args.command, f"internal error: {type(e).__name__}: {e}", 1,
                         traceback="".join(traceback.format_exception(e)))


def _json_logs(args: argparse.Namespace) -> bool:
    """``--log-format json``: stdout's plan and catalogue rows are JSON lines too."""
    return getattr(args, "log_format", "text") == "json"


def _fail(command: str, message: str, code: int, **fields: Any) -> int:
    """The command's last word, one record: ``obsfeed COMMAND: message`` (under the traceback of an internal
    error), or in JSON mode one object with the exit code, the error's type and the traceback as fields."""
    logger.error(message, extra={"command": command, "exit_code": code, **fields})
    return code


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
