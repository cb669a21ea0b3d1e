"""``eqloop tune``: its argument parser and entry point (``eqloop.cli`` forwards to it)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence

import optuna

from eqloop.config import add_config_arguments
from eqloop.training.flags import add_flag, flag_values
from eqloop.tune.config import DEFAULT_RANGES, OBJECTIVES, TuneConfig, load_tune_config
from eqloop.tune.report import REPORT_FILES
from eqloop.tune.study import load_study, requeue, run_study

_DESCRIPTION = """\
Optuna study whose trials are eqloop training runs (default: the STARS penalty weight lam,
log-uniform in [1e-3, 1]). Settings: defaults, then --config, then --set, then the flags.
More workers: run the same command again (elsewhere with a PostgreSQL storage); --n-trials
is the total for the study. Watch it: optuna-dashboard sqlite:///<study-dir>/study.db
"""


def trial_numbers(text: str) -> list[int]:
    """``"3,5"`` -> ``[3, 5]``: the type of ``--requeue``."""
    return [int(number) for number in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    """The ``eqloop tune`` argument parser."""
    p = argparse.ArgumentParser(
        prog="eqloop tune",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(
        p,
        file_help="JSON or TOML file with TuneConfig fields",
        example="--set base.steps=300 --set space.lam.high=0.5",
    )
    add = p.add_argument
    add("--study-name", help="study name (default stars-lam)")
    add("--study-dir", help="directory of the default storage, the trial runs and the outputs")
    add("--storage", help="sqlite:///PATH, postgresql://USER:PW@HOST/DB or journal:PATH")
    add("--n-trials", type=int, help="trials in total for the study (not per worker)")
    add("--objective", help=f"one of {', '.join(OBJECTIVES)} (default deep_accuracy)")
    add("--search", help=f"parameters to search, e.g. lam,lr (ranges: {', '.join(DEFAULT_RANGES)})")
    add(
        "--requeue",
        type=trial_numbers,
        metavar="N,..",
        help="first fail these RUNNING trials of a killed worker and queue them again (journal)",
    )
    add_flag(p, "--no-progress", help="no training progress bars or trial lines")
    add_flag(p, "--print-config")
    return p


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    """The :class:`TuneConfig` of parsed ``eqloop tune`` arguments."""
    own = {f.name for f in dataclasses.fields(TuneConfig)} & set(vars(args))
    values = {key: getattr(args, key) for key in sorted(own) if getattr(args, key) is not None}
    config = load_tune_config(args.config, args.overrides, {**values, **flag_values(args)})
    if args.search is not None:  # the named parameters, with their configured or default ranges
        names = [name.strip() for name in args.search.split(",") if name.strip()]
        if unknown := [n for n in names if n not in config.space and n not in DEFAULT_RANGES]:
            raise ValueError(
                f"--search {','.join(unknown)}: no range configured and no default "
                f"range; defaults exist for {list(DEFAULT_RANGES)}"
            )
        config.space = {name: config.space.get(name, {}) for name in names}
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``eqloop tune``; returns the exit status (2 on invalid settings)."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        verbosity = logging.INFO if config.progress else logging.WARNING  # a line per trial
        optuna.logging.set_verbosity(verbosity)
        if args.print_config:
            config.validate()
            print(json.dumps({**config.to_dict(), "space": config.param_space()}, indent=2))
            return 0
        if args.requeue:
            requeue(load_study(config)[0], args.requeue, config.max_retry)
        run_study(config)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"eqloop tune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eqloop tune: interrupted; the running trial was queued again", file=sys.stderr)
        return 130
    summary = json.loads((config.out_dir / REPORT_FILES["best_params"]).read_text())
    shown = ("trials", "pruning", "best", "pareto_front")
    print(json.dumps({key: summary[key] for key in shown if key in summary}, indent=2))
    written = [config.out_dir / name for name in REPORT_FILES.values()]
    print("\n".join(f"wrote {path}" for path in written if path.exists()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
