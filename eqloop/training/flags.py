"""The command-line flags every training command shares (``eqloop train``, ``eqloop finetune``).

One table, so both commands take the same flags with the same meaning: the run directory
and its policy (``--out-dir``, ``--resume``, ``--overwrite``), the length and seed of the
run, the device, the progress bar, ``--compile`` and ``--print-config``. Importing this module does
not import torch.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_run_arguments", "run_flag_values"]


def add_run_arguments(parser: argparse.ArgumentParser, *, out_dir_help: str) -> None:
    """Add the shared flags to a training command's parser.

    Args:
        parser: the subcommand's parser.
        out_dir_help: what the command writes into its run directory.
    """
    parser.add_argument("--out-dir", help=f"run directory ({out_dir_help})")
    parser.add_argument("--steps", type=int, help="optimisation steps")
    parser.add_argument("--lam", type=float, help="STARS penalty weight in [0, 1]")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--device", help="auto (default), cpu, cuda or cuda:<n>")
    run = parser.add_mutually_exclusive_group()
    run.add_argument(
        "--resume", action="store_true", help="continue the run in --out-dir (newest checkpoint)"
    )
    run.add_argument(
        "--overwrite", action="store_true", help="delete the run in --out-dir and start over"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the model's per-loop step compiled (torch.compile via eqloop.compile_model; "
        "the first steps compile, results equal eager ones to float tolerance)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")


def run_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config values the shared flags set (flags not given are left out).

    ``--resume`` or ``--overwrite`` sets both fields, so the explicit flag decides over a
    config file that sets the other one.
    """
    values: dict[str, Any] = {
        "out_dir": args.out_dir,
        "steps": args.steps,
        "lam": args.lam,
        "seed": args.seed,
        "device": args.device,
        "progress": False if args.no_progress else None,
        "compile": True if args.compile else None,
    }
    if args.resume or args.overwrite:
        values.update(resume=args.resume, overwrite=args.overwrite)
    return {k: v for k, v in values.items() if v is not None}
