"""The ``eqloop`` command: ``eqloop train``, ``eqloop eval`` and ``eqloop tune``.

Examples::

    eqloop train --config add3.json --set lam=0.1 --set depth.hi=16 --out-dir runs/stars
    torchrun --standalone --nproc_per_node=2 -m eqloop.cli train --config add3.json
    eqloop eval --checkpoint runs/stars runs/fixed --solver anderson --json eval.json \\
        --plot eval.png

Every error in the settings, the files or the checkpoints ends the command with one line
on stderr and exit status 2, before any work when the input allows it; Ctrl-C ends it
with status 130 (SIGTERM: 143), and a training run says where its checkpoint is and how
to resume it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from eqloop.config import add_config_arguments
from eqloop.core.defaults import EQUILIBRIUM_MAX_ITER, EQUILIBRIUM_TOL
from eqloop.recipes.finetune import cli as finetune_cli
from eqloop.recipes.pretrained import add_arguments as add_pretrained_arguments
from eqloop.training.flags import add_flag, add_run_arguments, flag_values

__all__ = ["build_parser", "main"]

# Copies of eqloop.evaluation.DECODES / DEFAULT_LOOPS (checked by the tests), so that
# building the parser and --help do not import torch and the solvers.
_DECODES = ("greedy", "forced")
_DEFAULT_LOOPS = (1, 2, 4, 8, 16, 32, 64, 128)


# Which ``eqloop eval`` flags apply where: each listed flag needs every entry of its tuple
# (the mode --checkpoint or --pretrained, or another flag); unlisted flags apply to both
# modes (--loops too: with --pretrained it takes one count N, as --max-loops N). Listed
# flags have no parser default (None: not given), so a flag given where it does not apply
# is an error naming what it needs; _EVAL_DEFAULTS fills them afterwards.
_EVAL_NEEDS: dict[str, tuple[str, ...]] = {
    "--n-test": ("--checkpoint",),
    "--decode": ("--checkpoint",),
    "--solver-start": ("--checkpoint", "--solver"),
    "--no-diagnostics": ("--checkpoint",),
    "--diagnostic-samples": ("--checkpoint",),
    "--pca": ("--checkpoint",),
    "--pca-problems": ("--checkpoint", "--pca"),
    "--pca-loops": ("--checkpoint", "--pca"),
    "--max-iter": ("--solver",),
    "--tol": ("--solver",),
    "--max-loops": ("--pretrained",),
    "--prompt": ("--pretrained",),
    "--dtype": ("--pretrained",),
    "--no-rho": ("--pretrained",),
    "--compile": ("--checkpoint",),
}
_MODES = {"--checkpoint": "--checkpoint runs", "--pretrained": "--pretrained checkpoints"}
_EVAL_DEFAULTS: dict[str, Any] = {
    "solver_start": 0,
    "max_iter": EQUILIBRIUM_MAX_ITER,
    "tol": EQUILIBRIUM_TOL,
    "decode": "greedy",
    "diagnostic_samples": 256,
    "pca_problems": 8,
    "pca_loops": 128,
    "compile": False,
}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def loop_counts(text: str) -> list[int]:
    """``--loops 1,2,4`` -> [1, 2, 4]."""
    try:
        counts = [int(item) for item in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated loop counts (integers >= 0) like 1,2,4,8; got {text!r}"
        )
    return counts


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a LoopLM with STARS (random loops + Jacobian penalty)",
        description=(
            "Train a LoopLM on an arithmetic task. Settings come from the defaults, then "
            "--config, then --set overrides, then the explicit flags. A run directory that "
            "already holds a run is continued with --resume or replaced with --overwrite, "
            "never silently reused. Ctrl-C or SIGTERM saves a checkpoint after the current "
            "step and prints the command that resumes. Under torchrun (torchrun --standalone "
            "--nproc_per_node=N -m eqloop.cli train ...) it runs DistributedDataParallel."
        ),
    )
    add_config_arguments(
        p,
        file_help="JSON (.json) or TOML (.toml) file with TrainConfig fields",
        example='--set model.d_model=64 --set depth.hi=16 --set \'depth={"kind":"fixed","t":8}\'',
    )
    add_run_arguments(p, out_dir_help="config.json, metrics.jsonl, checkpoints/")


def _add_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy vs loops, equilibrium and contraction diagnostics of checkpoints",
        description=(
            "Exact-match accuracy (greedy decoding) at each loop count and, with --solver, "
            "at the equilibrium; latent diagnostics per depth (||z_t - z_{t-1}||, ||z_t||, "
            "spectral radius rho) and the share of test sequences whose estimated "
            "rho(J(z*)) < 1. Prints a table per checkpoint; --json writes the results, "
            "--plot a PNG of accuracy and rho against loops. A checkpoint that fails is "
            "reported and the others are still evaluated and written."
        ),
    )
    what = p.add_argument_group("what to evaluate")
    what.add_argument("--checkpoint", nargs="+", help="step_* or run directories (newest)")
    what.add_argument("--n-test", type=int, help="test problems (default: the run's n_test)")
    loops = p.add_argument_group("loops and equilibrium")
    loops.add_argument(
        "--loops",
        type=loop_counts,
        help=f"comma-separated loop counts (default {','.join(map(str, _DEFAULT_LOOPS))}); "
        "with --pretrained one count N: diagnose loops 1..N (as --max-loops N)",
    )
    loops.add_argument("--solver", help="also solve to equilibrium, e.g. anderson, broyden")
    loops.add_argument(
        "--solver-start",
        type=int,
        help=f"loops run before the solver starts (default {_EVAL_DEFAULTS['solver_start']}: "
        "from the initial state); without input injection the start selects which fixed "
        "point is found",
    )
    loops.add_argument(
        "--max-iter",
        type=int,
        help=f"solver budget of f-evaluations (default {_EVAL_DEFAULTS['max_iter']})",
    )
    loops.add_argument(
        "--tol",
        type=float,
        help=f"solver tolerance on the relative residual (default {_EVAL_DEFAULTS['tol']})",
    )
    loops.add_argument("--decode", choices=_DECODES, help="default greedy")
    diagnostics = p.add_argument_group("diagnostics")
    diagnostics.add_argument(
        "--no-diagnostics", action="store_true", default=None, help="accuracy only"
    )
    diagnostics.add_argument(
        "--diagnostic-samples",
        type=int,
        help=f"sequences for the diagnostics (default {_EVAL_DEFAULTS['diagnostic_samples']})",
    )
    diagnostics.add_argument(
        "--rho-iters", type=int, default=30, help="power-iteration steps per rho estimate"
    )
    run = p.add_argument_group("run and output")
    add_flag(run, "--device", default="cpu", help="cpu (default), cuda, cuda:<n> or auto")
    add_flag(run, "--no-progress")
    add_flag(run, "--compile", default=None)  # None: not given (see _EVAL_NEEDS)
    run.add_argument("--json", type=Path, help="write the results (a JSON list) here")
    run.add_argument("--plot", type=Path, help="write the accuracy/rho plot here (PNG)")
    run.add_argument(
        "--pca",
        type=Path,
        help="write hidden-state trajectories on their first two principal components here "
        "(PNG, one panel per checkpoint; eqloop.evaluation.trajectory)",
    )
    run.add_argument(
        "--pca-problems",
        type=int,
        help=f"test problems in --pca (default {_EVAL_DEFAULTS['pca_problems']})",
    )
    run.add_argument(
        "--pca-loops",
        type=int,
        help=f"loops traced in --pca (default {_EVAL_DEFAULTS['pca_loops']})",
    )
    add_pretrained_arguments(p)  # eqloop eval --pretrained DIR: eqloop.recipes.pretrained


def _add_tune(sub: Any) -> None:
    p = sub.add_parser("tune", help="Optuna study over the STARS hyperparameters", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of eqloop.recipes.tune")


def build_parser() -> argparse.ArgumentParser:
    """The ``eqloop`` argument parser with its subcommands."""
    parser = _Parser(
        prog="eqloop", description="Looped LMs as equilibrium models: train, evaluate, tune."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_tune(sub)
    finetune_cli.add_parser(sub)
    return parser


# -------------------------------------------------------------------------------- train


def _train(args: argparse.Namespace) -> int:
    from eqloop.recipes.train import train
    from eqloop.training.config import load_config
    from eqloop.training.run_dir import run_recipe

    config = load_config(args.config, args.overrides, flag_values(args))
    return run_recipe("eqloop train", train, config, args, rank0_key="checkpoint")


# --------------------------------------------------------------------------------- eval


def _check_output(flag: str, path: Path | None) -> None:
    """An output path must be writable before the evaluation starts."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write into {parent}")


def _check_eval_flags(args: argparse.Namespace) -> None:
    """Refuse every flag given where it does not apply (:data:`_EVAL_NEEDS`), then fill in
    the defaults; with ``--pretrained``, ``--loops N`` is ``--max-loops N``.

    Raises:
        ValueError: a flag of the other mode, or one whose companion flag is missing,
            naming what it needs.
    """
    mode = "--pretrained" if args.pretrained is not None else "--checkpoint"
    given = {flag for flag in _EVAL_NEEDS if getattr(args, _dest(flag)) is not None}
    given |= {flag for flag in ("--solver", mode) if getattr(args, _dest(flag)) is not None}
    for flag in sorted(given & set(_EVAL_NEEDS)):
        for need in _EVAL_NEEDS[flag]:
            if need in _MODES and need != mode:
                raise ValueError(f"{flag} applies to {_MODES[need]} only, not to {mode}")
            if need not in given:
                raise ValueError(f"{flag} needs {need} (it has no effect without it)")
    if mode == "--pretrained" and args.loops is not None:
        if len(args.loops) != 1 or args.loops[0] < 1:
            raise ValueError(
                "with --pretrained, --loops takes one count N (loops 1..N are diagnosed, as "
                f"with --max-loops N), got {','.join(map(str, args.loops))}"
            )
        if args.max_loops is not None:
            raise ValueError("give one of --loops N and --max-loops N (the same setting)")
        args.max_loops, args.loops = args.loops[0], None
    if mode == "--checkpoint" and args.loops is None:
        args.loops = list(_DEFAULT_LOOPS)
    for name, default in _EVAL_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def _dest(flag: str) -> str:
    """The attribute argparse stores ``flag`` in: ``--max-loops`` -> ``max_loops``."""
    return flag.removeprefix("--").replace("-", "_")


def _check_eval_outputs(args: argparse.Namespace) -> None:
    """Refuse ``--json`` / ``--plot`` / ``--pca`` files that cannot be written.

    Raises:
        ValueError: an output that is a directory or in a missing one, ``--json`` and
            ``--plot`` naming the same file, or a plot without matplotlib.
    """
    _check_output("--json", args.json)
    _check_output("--plot", args.plot)
    _check_output("--pca", args.pca)
    if (
        args.json is not None
        and args.plot is not None
        and args.json.resolve() == args.plot.resolve()
    ):
        raise ValueError("--json and --plot name the same file")
    for flag in ("plot", "pca"):
        if getattr(args, flag) is not None and importlib.util.find_spec("matplotlib") is None:
            raise ValueError(f"--{flag} needs matplotlib: pip install 'eqloop[plots]'")


def _eval(args: argparse.Namespace) -> int:
    """``eqloop eval``: diagnose ``--pretrained`` or evaluate every ``--checkpoint``.

    Returns:
        The exit code: 0, 2 when a checkpoint failed, 130 when interrupted.
    """
    _check_eval_outputs(args)
    if (args.checkpoint is None) == (args.pretrained is None):
        raise ValueError("give --checkpoint (eqloop runs) or --pretrained DIR (Ouro, Huginn)")
    _check_eval_flags(args)
    if args.pretrained is not None:
        from eqloop.recipes.pretrained import run

        return run(args)
    from eqloop.evaluation import check_options
    from eqloop.training.checkpoint import resolve_checkpoint
    from eqloop.training.config import check_device
    from solvers import checks

    solver_options = {"max_iter": args.max_iter, "tol": args.tol, "start_loops": args.solver_start}
    settings = dict(
        loops=args.loops,
        solver=args.solver,
        solver_options=solver_options,
        decode=args.decode,
        diagnostic_samples=args.diagnostic_samples,
        rho_iters=args.rho_iters,
    )
    check_options(**settings)
    if args.n_test is not None:
        checks.integer("--n-test", args.n_test, low=1)
    if args.pca is not None:
        checks.integer("--pca-problems", args.pca_problems, low=1)
        checks.integer("--pca-loops", args.pca_loops, low=1)
    device = check_device(args.device)
    paths = [resolve_checkpoint(path) for path in args.checkpoint]
    results, failures, interrupted = _evaluate_checkpoints(args, paths, settings, device)
    _write_eval_outputs(args, results, failures, device)
    if interrupted:
        print(f"eqloop eval: interrupted; {len(results)} results kept", file=sys.stderr)
        return 130
    if failures:
        if len(paths) > 1:
            written = f"; the other results are in {args.json}" if args.json and results else ""
            print(
                f"eqloop eval: error: {len(failures)} of {len(paths)} checkpoints failed{written}",
                file=sys.stderr,
            )
        return 2
    return 0


def _evaluate_checkpoints(
    args: argparse.Namespace, paths: list[Path], settings: dict[str, Any], device: str
) -> tuple[list[dict[str, Any]], list[dict[str, str]], bool]:
    """Evaluate each checkpoint in turn, printing its table; a failure skips to the next.

    Args:
        args: the parsed ``eqloop eval`` flags.
        paths: the resolved checkpoint files.
        settings: the checked evaluation options (``evaluate_checkpoint``'s keywords).
        device: the checked ``--device``.

    Returns:
        The results, the failures (checkpoint and error message) and whether Ctrl-C
        stopped the evaluation (the checkpoints after it are not evaluated).
    """
    from eqloop.evaluation import evaluate_checkpoint, format_result
    from eqloop.training.checkpoint import CheckpointError

    results: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for path in paths:
        try:
            result = evaluate_checkpoint(
                path,
                n_test=args.n_test,
                diagnostics=not args.no_diagnostics,
                device=device,
                progress=not args.no_progress,
                compile=args.compile,
                **settings,
            )
        except (CheckpointError, ValueError, TypeError) as err:
            failures.append({"checkpoint": str(path), "error": str(err)})
            print(f"eqloop eval: error: {err}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            failures.append({"checkpoint": str(path), "error": "interrupted"})
            return results, failures, True
        print(format_result(result))
        results.append(result)
    return results, failures, False


def _write_eval_outputs(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    failures: list[dict[str, str]],
    device: str,
) -> None:
    """Write ``--json`` (results and failures), ``--plot`` and ``--pca`` (results only)."""
    from eqloop.evaluation import plot_results
    from eqloop.files import write_text_atomic

    if args.json is not None:
        write_text_atomic(args.json, json.dumps([*results, *failures], indent=2) + "\n")
    if args.plot is not None and results:
        plot_results(results, args.plot)
    if args.pca is not None and results:
        from eqloop.evaluation import plot_checkpoint_trajectories

        done = [r["checkpoint"] for r in results]
        plot_checkpoint_trajectories(
            done, args.pca, problems=args.pca_problems, loops=args.pca_loops, device=device
        )


# --------------------------------------------------------------------------------- tune


def _tune(args: argparse.Namespace) -> int:
    try:
        from eqloop.recipes import tune
    except ModuleNotFoundError as err:
        if err.name == "optuna":
            raise ValueError("eqloop tune needs Optuna: pip install 'eqloop[tune]'") from None
        if err.name != "eqloop.recipes.tune":
            raise
        raise ValueError("eqloop.recipes.tune is not available in this installation") from None
    return int(tune.main(args.args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eqloop`` command; returns the exit status.

    Invalid settings (unknown keys, bad values, unusable paths or devices, damaged
    checkpoints) end with a one-line error message and status 2 instead of a traceback;
    warnings are printed as one line each.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tune"]:  # REMAINDER would drop leading options: hand them over as is
        args = argparse.Namespace(command="tune", args=argv[1:])
    else:
        args = parser.parse_args(argv)
    args.argv = argv
    prefix = f"eqloop {args.command}"
    handlers = {"train": _train, "eval": _eval, "tune": _tune, "finetune": finetune_cli.run}

    def show(message: Any, category: type[Warning], *rest: Any, **options: Any) -> None:
        print(f"{prefix}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return handlers[args.command](args)
        except KeyboardInterrupt:
            parser.exit(130, f"{prefix}: interrupted\n")
        except (ValueError, TypeError, OSError) as err:  # CheckpointError is a ValueError
            parser.exit(2, f"{prefix}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
