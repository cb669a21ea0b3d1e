"""``eqloop eval --pretrained DIR``: per-loop diagnostics of a checkpoint from the shell.

``eqloop.cli`` adds these options to its ``eval`` subcommand and hands the parsed
arguments to :func:`run`, which prints the table and writes the JSON and the plot.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

_DTYPES = ("float32", "float64", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--pretrained`` option and the options only it uses."""
    group = parser.add_argument_group(
        "pretrained looped LMs (Ouro, Huginn)",
        "per-loop residual, state norm, rho(J) (Arnoldi with --rho-iters vectors), KL between "
        "loops and Ouro's exit gate; --loops N (as --max-loops N), --solver, --max-iter, --tol, "
        "--device, --no-progress, --json and --plot apply too; the other eval flags are "
        "errors with --pretrained, and these options are errors with --checkpoint",
    )
    group.add_argument("--pretrained", type=Path, metavar="DIR", help="a checkpoint directory")
    group.add_argument(
        "--max-loops", type=int, metavar="N", help="diagnose loops 1..N (default 4x trained depth)"
    )
    group.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="a prompt to diagnose on (repeatable; default two generic sentences)",
    )
    group.add_argument("--dtype", choices=_DTYPES, help="parameter dtype (default: the files')")
    group.add_argument(
        "--no-rho", action="store_true", default=None, help="skip the Arnoldi estimates of rho(J)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the diagnostics of ``args.pretrained``; print the table; write JSON and plot.

    Raises:
        ValueError: bad options, an unusable checkpoint or a missing extra (the CLI
            prints it as one line).
    """
    import torch

    from eqloop.pretrained.diagnostics import diagnose_checkpoint
    from eqloop.training.config import check_device

    if args.max_loops is not None and args.max_loops < 1:
        raise ValueError(f"--max-loops must be >= 1, got {args.max_loops}")
    device = check_device(_option(args, "device", "cpu"))
    try:
        result = diagnose_checkpoint(
            args.pretrained,
            prompts=args.prompt,
            loops=args.max_loops,
            rho=not args.no_rho,
            rho_iters=_option(args, "rho_iters", 20),
            solver=_option(args, "solver", None),
            max_iter=_option(args, "max_iter", None),
            tol=_option(args, "tol", None),
            dtype=None if args.dtype is None else getattr(torch, args.dtype),
            device=device,
            json_path=_option(args, "json", None),
            plot_path=_option(args, "plot", None),
            progress=not getattr(args, "no_progress", False),
        )
    except ImportError as err:  # a missing extra (transformers for the tokenizer)
        raise ValueError(str(err)) from None
    print(f"{args.pretrained} ({result.model_type}, trained depth {result.trained_loops})")
    print(result.table())
    return 0


def _option(args: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value
