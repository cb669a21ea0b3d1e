"""The command-line flags eqloop's commands share: one table, one meaning per flag.

:data:`FLAGS` defines each shared flag once (its spelling, argparse keywords and the config
field it sets); ``eqloop train``, ``eqloop finetune``, ``eqloop eval`` and ``eqloop tune``
add the ones they take with :func:`add_flag` (a command may change a flag's default or help,
never what it means), and :func:`flag_values` turns the given ones into config values,
which the config loader applies after ``--config`` and ``--set``
(:func:`eqloop.config.load_config_data`). The training commands take the same run flags
(:func:`add_run_arguments`): the run directory and its policy (``--out-dir``, ``--resume``,
``--overwrite``), the length and seed of the run, the device, the progress bar,
``--compile`` and ``--print-config``. Importing this module does not import torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FLAGS", "Flag", "add_flag", "add_run_arguments", "flag_values"]


@dataclass(frozen=True)
class Flag:
    """A shared command-line flag.

    Attributes:
        options: its ``add_argument`` keywords (action, type, help, ...).
        field: the config field it sets (None: it sets none, e.g. ``--print-config``).
        value: what a ``store_true`` flag sets its field to when given (None: the flag's
            own value).
    """

    options: dict[str, Any] = field(default_factory=dict)
    field: str | None = None
    value: Any = None


_TRUE = {"action": "store_true"}
FLAGS: dict[str, Flag] = {
    "--out-dir": Flag({"help": "run directory"}, "out_dir"),
    "--steps": Flag({"type": int, "help": "optimisation steps"}, "steps"),
    "--lam": Flag({"type": float, "help": "STARS penalty weight in [0, 1]"}, "lam"),
    "--seed": Flag({"type": int, "help": "random seed"}, "seed"),
    "--device": Flag({"help": "auto (default), cpu, cuda or cuda:<n>"}, "device"),
    "--no-progress": Flag({**_TRUE, "help": "hide the progress bar"}, "progress", False),
    "--compile": Flag(
        {
            **_TRUE,
            "help": "run the model's per-loop step compiled (torch.compile via "
            "eqloop.compile_model; the first steps compile, results equal eager ones to "
            "float tolerance)",
        },
        "compile",
        True,
    ),
    "--print-config": Flag({**_TRUE, "help": "print the config and exit"}),
}
"""Every flag more than one command takes, by its spelling."""


def add_flag(parser: Any, name: str, **changes: Any) -> None:
    """Add the shared flag ``name`` of :data:`FLAGS` to a parser or argument group.

    Args:
        parser: an ``argparse`` parser, group or mutually exclusive group.
        name: the flag, e.g. ``"--no-progress"``.
        **changes: ``add_argument`` keywords that differ for this command (``default``,
            ``help``).
    """
    parser.add_argument(name, **{**FLAGS[name].options, **changes})


def add_run_arguments(parser: argparse.ArgumentParser, *, out_dir_help: str) -> None:
    """Add the run flags of the training commands (``train``, ``finetune``) to a parser.

    Args:
        parser: the subcommand's parser.
        out_dir_help: what the command writes into its run directory.
    """
    add_flag(parser, "--out-dir", help=f"run directory ({out_dir_help})")
    for name in ("--steps", "--lam", "--seed", "--device"):
        add_flag(parser, name)
    run = parser.add_mutually_exclusive_group()
    run.add_argument(
        "--resume", action="store_true", help="continue the run in --out-dir (newest checkpoint)"
    )
    run.add_argument(
        "--overwrite", action="store_true", help="delete the run in --out-dir and start over"
    )
    for name in ("--no-progress", "--compile", "--print-config"):
        add_flag(parser, name)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config values the shared flags in ``args`` set (flags not given are left out).

    ``--resume`` or ``--overwrite`` sets both fields, so the explicit flag decides over a
    config file that sets the other one.
    """
    values: dict[str, Any] = {}
    for name, flag in FLAGS.items():
        given = getattr(args, name.removeprefix("--").replace("-", "_"), None)
        if flag.field is not None and given is not None and given is not False:
            values[flag.field] = given if flag.value is None else flag.value
    if getattr(args, "resume", False) or getattr(args, "overwrite", False):
        values.update(resume=args.resume, overwrite=args.overwrite)
    return values
