"""Why an arithmetic run is stuck on its loss plateau: per-digit accuracy and attention.

A LoopLM trained on ``d``-digit addition (answers written least-significant digit first)
can sit on a loss plateau where it predicts only the final carry and the end token. This
script looks inside the final checkpoint of each run directory it is given and prints,
per answer digit ``j`` (least significant first):

- ``acc``: teacher-forced accuracy of that digit at the run's training depth;
- ``align@t``: for loop ``t``, the attention mass that the best head puts, from the query
  that predicts digit ``j``, on the two operand digits of the same significance (averaged
  over test problems). A model that adds digit by digit needs a head near 1.0 here in some
  loop; a uniform head over the prompt gives about ``2 / (prompt length)``.

With ``--loops`` it also reads why a run that learned the task loses it at depth: per
loop count, the teacher-forced accuracy of every answer digit and the share of its
wrong predictions that are one off (``|predicted - true| = 1`` modulo 10, a carry in the
wrong state) rather than another digit.

Usage:
    python experiments/plateau/run.py runs/stars_scaling/baseline/seed4 runs/.../seed5 \
        --json experiments/plateau/results/plateau.json
    python experiments/plateau/run.py runs/seeds10/stars/seed4 --loops 32,64,128 --problems 1000

The runs must be LoopLMs trained on the ``addition`` task with zero-padded operands
(TrainConfig's defaults), in either operand order (``reverse_operands``). Runs on one
thread; a few seconds per run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import Tensor, nn

from benchmarks.common import format_table, machine_info, print_written, write_json_atomic
from eqloop.cli import loop_counts
from eqloop.data.tokenizers import CharTokenizer
from eqloop.evaluation import EvalSet, make_test_set
from eqloop.models.looplm.modeling import CausalSelfAttention, LoopLM
from eqloop.training.checkpoint import load_model
from eqloop.training.config import TrainConfig

PROG = "experiments/plateau/run.py"  # the script in usage and error lines


def attention_probabilities(
    module: CausalSelfAttention, x: Tensor, rope: tuple[Tensor, Tensor] | None
) -> Tensor:
    """The causal attention weights that ``module`` computes for its input.

    Args:
        module: one attention layer of a LoopLM block.
        x: its input, (B, S, d).
        rope: ``(cos, sin)`` rotary tables as passed to the layer, or None.

    Returns:
        (B, heads, S, S) softmax weights; row ``q`` holds the weights of query ``q``.
    """
    q, k, _ = module.qkv_heads(x, rope)  # (B, heads, S, e) each, rotated as in the layer
    seq = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    future = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def load_addition_run(run: str) -> tuple[LoopLM, TrainConfig, EvalSet]:
    """The final model of ``run``, its config and its test set.

    Raises:
        ValueError: the run did not train the ``addition`` task.
    """
    model, checkpoint = load_model(run)
    config = TrainConfig.from_dict(checkpoint.config)
    if config.task != "addition":
        raise ValueError(f"run {run!r} trained task {config.task!r}; {PROG} reads 'addition'")
    return model, config, make_test_set(config)


def diagnose(run: str, problems: int = 256) -> dict[str, Any]:
    """Per-answer-digit accuracy and attention alignment of one run's final checkpoint.

    Args:
        run: a run directory or checkpoint of an ``addition`` LoopLM.
        problems: test problems to average over.

    Returns:
        ``{"run", "loops", "digit_accuracy": [per digit], "alignment": [per loop [per
        digit]], "uniform": 2 / prompt length}``; digits are least significant first.

    Raises:
        ValueError: the run is not an addition run with zero-padded, equal-length rows.
    """
    model, config, data = load_addition_run(run)
    inputs, targets = data.inputs[:problems], data.targets[:problems]
    prompt = data.prompts.shape[1]
    digits = config.digits
    loops = model.default_loops if config.depth.get("kind") != "fixed" else config.depth["t"]

    weights: list[Tensor] = []

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        weights.append(attention_probabilities(module, args[0], args[1] if len(args) > 1 else None))

    hooks = [
        m.register_forward_pre_hook(record)
        for m in model.modules()
        if isinstance(m, CausalSelfAttention)
    ]
    try:
        with torch.no_grad():
            logits = model(inputs, loops=loops)[:, prompt - 1 :]
    finally:
        for hook in hooks:
            hook.remove()
    correct = (logits.argmax(-1) == targets).float().mean(0)
    # The prompt "a_{d-1}..a_0+b_{d-1}..b_0=" (after an optional BOS) ends the row.
    start = prompt - (2 * digits + 2)
    alignment = []
    for probs in weights:
        row = []
        for j in range(digits):
            query = prompt - 1 + j
            if config.reverse_operands:  # "a_0..a_{d-1}+b_0..b_{d-1}="
                a, b = start + j, start + digits + 1 + j
            else:
                a, b = start + digits - 1 - j, start + 2 * digits - j
            mass = (probs[:, :, query, a] + probs[:, :, query, b]).mean(0)
            row.append(round(float(mass.max()), 3))
        alignment.append(row)
    return {
        "run": str(run),
        "loops": loops,
        "digit_accuracy": [round(float(c), 3) for c in correct[:digits]],
        "alignment": alignment,
        "uniform": round(2 / prompt, 3),
    }


def one_off_share(predicted: Tensor, target: Tensor) -> Tensor:
    """Per digit, the share of wrong predictions that are one off from the true digit.

    Args:
        predicted: (N, D) predicted digit values 0-9 (another token counts as wrong, not
            one off: pass -10 or any value more than one away).
        target: (N, D) the true digit values.

    Returns:
        (D,) for each digit position, among the problems it is wrong on, the share with
        ``(predicted - target) mod 10`` in {1, 9}; NaN for a position never wrong.
    """
    wrong = predicted != target
    off = (predicted - target).remainder(10)
    one_off = wrong & ((off == 1) | (off == 9))
    return one_off.sum(0).double() / wrong.sum(0).double()


def digit_errors(run: str, loops: Sequence[int], problems: int = 256) -> dict[str, Any]:
    """Per loop count, each answer digit's accuracy and how its errors are off.

    Args:
        run: a run directory or checkpoint of an ``addition`` LoopLM.
        loops: loop counts to read out at.
        problems: test problems to average over.

    Returns:
        ``{"run", "digits": {loops: {"accuracy": [per digit], "one_off": [per digit]}}}``,
        digits least significant first; ``one_off`` as :func:`one_off_share` (None for a
        digit with no error).
    """
    model, config, data = load_addition_run(run)
    inputs, targets = data.inputs[:problems], data.targets[:problems, : config.digits]
    prompt = data.prompts.shape[1]
    zero = CharTokenizer().encode("0")[0]
    out: dict[str, Any] = {"run": str(run), "digits": {}}
    for t in loops:
        with torch.no_grad():
            logits = model(inputs, loops=t)[:, prompt - 1 : prompt - 1 + config.digits]
        predicted, true = logits.argmax(-1) - zero, targets - zero
        predicted = torch.where((predicted >= 0) & (predicted <= 9), predicted, -10)
        shares = one_off_share(predicted, true)
        out["digits"][str(t)] = {
            "accuracy": [round(float(a), 3) for a in (predicted == true).double().mean(0)],
            "one_off": [None if s.isnan() else round(float(s), 3) for s in shares],
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (or checkpoints) to diagnose")
    p.add_argument("--problems", type=int, default=256, help="test problems to average over")
    p.add_argument(
        "--loops",
        type=loop_counts,
        default=None,
        help="comma-separated loop counts: per-digit accuracy and one-off errors at each "
        "(why a run that learned the task loses it at depth)",
    )
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.loops:
        results = [digit_errors(run, args.loops, args.problems) for run in args.runs]
        rows, columns = depth_error_table(results)
    else:
        results = [diagnose(run, args.problems) for run in args.runs]
        rows, columns = alignment_table(results)
    print(format_table(rows, columns))
    if args.json:
        payload = {"machine": machine_info(), "command": " ".join(sys.argv), "results": results}
        write_json_atomic(args.json, payload)
        print_written(args.json)
    return 0


def alignment_table(results: Sequence[dict[str, Any]]) -> tuple[list[dict], list[tuple]]:
    """Rows and columns of :func:`diagnose`'s table: a row per (run, digit)."""
    rows = []
    for r in results:
        for j, acc in enumerate(r["digit_accuracy"]):
            row = {"run": Path(r["run"]).name, "digit": j, "acc": acc}
            row.update({f"t{t + 1}": loop[j] for t, loop in enumerate(r["alignment"])})
            rows.append(row)
    loops = max(len(r["alignment"]) for r in results)
    columns = [("run", "run", "s"), ("digit", "digit", "d"), ("acc", "acc", ".3f")]
    columns += [(f"t{t}", f"align@{t}", ".2f") for t in range(1, loops + 1)]
    return rows, columns


def depth_error_table(results: Sequence[dict[str, Any]]) -> tuple[list[dict], list[tuple]]:
    """Rows and columns of :func:`digit_errors`' table: a row per (run, loops, digit)."""
    rows = []
    for r in results:
        for t, entry in r["digits"].items():
            for j, (acc, one_off) in enumerate(
                zip(entry["accuracy"], entry["one_off"], strict=True)
            ):
                rows.append(
                    {
                        "run": Path(r["run"]).name,
                        "loops": int(t),
                        "digit": j,
                        "acc": acc,
                        "one_off": "-" if one_off is None else f"{one_off:.2f}",
                    }
                )
    columns = [
        ("run", "run", "s"),
        ("loops", "loops", "d"),
        ("digit", "digit", "d"),
        ("acc", "acc", ".3f"),
        ("one_off", "errors one off", "s"),
    ]
    return rows, columns


if __name__ == "__main__":
    raise SystemExit(main())
