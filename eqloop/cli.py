"""The ``eqloop`` command: ``eqloop train``, ``eqloop eval`` and ``eqloop tune``.

Examples::

    eqloop train --config add3.json --set lam=0.1 --set depth.hi=16 --out-dir runs/stars
    torchrun --standalone --nproc_per_node=2 -m eqloop.cli train --config add3.json
    eqloop eval --checkpoint runs/stars runs/fixed --solver anderson --json eval.json \\
        --plot eval.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eqloop.finetune import cli as finetune_cli

__all__ = ["add_config_arguments", "build_parser", "main"]

# Copies of eqloop.evaluate.DECODES / DEFAULT_LOOPS (checked by the tests), so that
# building the parser and --help do not import torch, datasets and the solvers.
_DECODES = ("greedy", "forced")
_DEFAULT_LOOPS = (1, 2, 4, 8, 16, 32, 64, 128)


def add_config_arguments(parser: argparse.ArgumentParser, *, file_help: str, example: str) -> None:
    """Add the ``--config FILE`` and repeatable ``--set KEY=VALUE`` options to a CLI.

    Args:
        parser: the (sub)command's parser; ``--set`` values land in ``overrides``.
        file_help: help text of ``--config``.
        example: example overrides shown in the help of ``--set``.
    """
    parser.add_argument("--config", type=Path, help=file_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a field (JSON value or string); dotted keys reach nested fields, "
        f"e.g. {example}",
    )


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a LoopLM with STARS (random loops + Jacobian penalty)",
        description=(
            "Train a LoopLM on an arithmetic task. Settings come from the defaults, then "
            "--config, then --set overrides, then the explicit flags. Under torchrun "
            "(torchrun --standalone --nproc_per_node=N -m eqloop.cli train ...) it runs "
            "DistributedDataParallel."
        ),
    )
    add_config_arguments(
        p,
        file_help="JSON or TOML file with TrainConfig fields",
        example='--set model.d_model=64 --set depth.hi=16 --set \'depth={"kind":"fixed","t":8}\'',
    )
    p.add_argument("--out-dir", help="run directory (checkpoints, metrics.jsonl)")
    p.add_argument("--steps", type=int, help="optimisation steps")
    p.add_argument("--lam", type=float, help="STARS penalty weight in [0, 1]")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument(
        "--resume", action="store_true", help="continue from out_dir's latest checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")


def _add_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy vs loops, equilibrium and contraction diagnostics of checkpoints",
        description=(
            "Exact-match accuracy (greedy decoding) at each loop count and, with --solver, "
            "at the equilibrium; latent diagnostics per depth (||z_t - z_{t-1}||, ||z_t||, "
            "spectral radius) and the share of test sequences whose estimated "
            "rho(J(z*)) < 1. Writes JSON and a PNG plot."
        ),
    )
    p.add_argument(
        "--checkpoint", nargs="+", required=True, help="step_* or run directories (latest)"
    )
    p.add_argument(
        "--loops",
        type=lambda s: [int(t) for t in s.split(",")],
        default=list(_DEFAULT_LOOPS),
        help="comma-separated loop counts (default %(default)s)",
    )
    p.add_argument("--solver", help="also solve to equilibrium, e.g. anderson, broyden")
    p.add_argument("--max-iter", type=int, default=100, help="solver budget (default 100)")
    p.add_argument("--tol", type=float, default=1e-4, help="solver tolerance (default 1e-4)")
    p.add_argument("--n-test", type=int, help="test problems (default: the run's n_test)")
    p.add_argument("--decode", choices=_DECODES, default="greedy", help="default greedy")
    p.add_argument("--no-diagnostics", action="store_true", help="accuracy only")
    p.add_argument("--diagnostic-samples", type=int, default=256, help="sequences for rho")
    p.add_argument("--rho-iters", type=int, default=30, help="power-iteration steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write the accuracy/rho plot here (PNG)")


def _add_tune(sub: Any) -> None:
    p = sub.add_parser("tune", help="Optuna study over the STARS hyperparameters", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of eqloop.tune")


def build_parser() -> argparse.ArgumentParser:
    """The ``eqloop`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="eqloop", description="Looped LMs as equilibrium models: train, evaluate, tune."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_tune(sub)
    finetune_cli.add_parser(sub)
    return parser


def _train(args: argparse.Namespace) -> int:
    from eqloop.config import load_config
    from eqloop.train import train

    flags = {
        "out_dir": args.out_dir,
        "steps": args.steps,
        "lam": args.lam,
        "seed": args.seed,
        "resume": True if args.resume else None,
        "progress": False if args.no_progress else None,
    }
    overrides = list(args.overrides)
    overrides += [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    config = load_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    result = train(config)
    if result.get("checkpoint"):  # rank 0
        print(json.dumps(result, indent=2))
    return 0


def _summary(result: dict[str, Any]) -> str:
    acc = "  ".join(f"{t}:{a:.3f}" for t, a in result["accuracy"].items())
    lines = [f"{result['checkpoint']} (step {result['step']})", f"  accuracy  {acc}"]
    eq = result.get("equilibrium")
    if eq is not None:
        line = f"  equilibrium ({eq['solver']})  accuracy {eq['accuracy']:.3f}"
        if "contraction" in eq:
            c = eq["contraction"]
            line += (
                f"  converged {eq['converged']:.3f}  rho<1 share {c['share_rho_below_1']:.3f}"
                f"  median rho {c['rho']['q50']:.3f}"
            )
        lines.append(line)
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    from eqloop.evaluate import evaluate_checkpoint, plot_results

    results = []
    for path in args.checkpoint:
        result = evaluate_checkpoint(
            path,
            loops=args.loops,
            solver=args.solver,
            solver_options={"max_iter": args.max_iter, "tol": args.tol},
            n_test=args.n_test,
            decode=args.decode,
            diagnostics=not args.no_diagnostics,
            diagnostic_samples=args.diagnostic_samples,
            rho_iters=args.rho_iters,
            device=args.device,
        )
        print(_summary(result))
        results.append(result)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot is not None:
        plot_results(results, args.plot)
    return 0


def _tune(args: argparse.Namespace) -> int:
    try:
        from eqloop import tune
    except ModuleNotFoundError as err:
        if err.name != "eqloop.tune":
            raise
        print("eqloop tune: eqloop.tune is not available in this installation", file=sys.stderr)
        return 2
    return int(tune.main(args.args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eqloop`` command; returns the exit status.

    Invalid settings (unknown keys, bad values, corrupted checkpoints) end with a one-line
    error message and status 2 instead of a traceback.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tune"]:  # REMAINDER would drop leading options: hand them over as is
        args = argparse.Namespace(command="tune", args=argv[1:])
    else:
        args = parser.parse_args(argv)
    handlers = {"train": _train, "eval": _eval, "tune": _tune, "finetune": finetune_cli.run}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        parser.exit(2, f"eqloop {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
