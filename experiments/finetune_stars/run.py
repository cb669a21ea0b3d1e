"""STARS fine-tuning in miniature: the STARS paper's Ouro/GSM8K pattern at CPU scale.

The paper fine-tunes Ouro-1.4B (trained at 4 loops) on GSM8K: after SFT at 4 loops
accuracy drops 20.47 points from its peak by 8 loops, after STARS 8.26 points, with a
peak 4.01 points higher. This script runs the same pattern on a model small enough for a
CPU, per seed:

1. **pre-train** a random-initialised Ouro-architecture model (``eqloop.models``'s
   tiny-checkpoint writer with a larger config: no input injection, every layer looped,
   the final norm inside the loop, an exit gate) from scratch with a fixed 4 loops on
   n-digit addition (answers least-significant digit first, ``eqloop.data``), until its
   accuracy peaks at the trained depth and drops beyond it;
2. **fine-tune** two copies for the same number of steps with ``eqloop finetune``'s
   machinery: (a) SFT at 4 loops, (b) STARS: loop counts clamp(round(LogNormal(1.7,
   0.4)), 1, 16) (the paper's Ouro setting) and the Jacobian penalty with weight ``lam``;
3. **evaluate** all three at loops 1..16 and at the Anderson equilibrium (exact match;
   teacher-forced argmax, which for unrolled loops gives the same verdict as greedy
   decoding, see ``eqloop.evaluation``), and report peak and drop at 8 and 16
   loops;
4. **time** an SFT step and a STARS step at the same loop count (interleaved medians).

Targets (issue 13): STARS's drop at 8 loops <= half of SFT's, its peak >= SFT's - 1
point, within 45 minutes on the 2-core CPU; a STARS step <= 1.3x an SFT step.

Resumable: every stage lives in ``--out-dir`` (checkpoints, saved models, evaluation
JSON; default ``runs/finetune_stars``) and a rerun skips what is done; ``--overwrite``
deletes each seed's directory first and runs it again. ``--quick`` is a seconds-long
smoke run (tests) in its own directory, ``runs/finetune_stars_quick``.

Usage:
    python experiments/finetune_stars/run.py \\
        --json experiments/finetune_stars/results/finetune_stars.json \\
        --plot experiments/finetune_stars/results/finetune_stars.png
    python experiments/finetune_stars/run.py --quick --json /tmp/q.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from benchmarks.common import (
    OURO_14B,
    format_table,
    machine_info,
    print_written,
    write_json_atomic,
)
from benchmarks.memory_depth import saved_bytes
from eqloop import pretrained
from eqloop.data import make_arithmetic_dataset
from eqloop.data.qa import PromptTemplate, encode_examples, load_jsonl, write_jsonl
from eqloop.evaluation import accuracy_vs_loops
from eqloop.files import write_figure_atomic
from eqloop.models.auto import load_for_finetuning
from eqloop.plotting import pyplot, style_axis
from eqloop.recipes.finetune.config import FinetuneConfig
from eqloop.recipes.finetune.train import MODEL_DIR, finetune, step_time_ratio

PROG = "experiments/finetune_stars/run.py"  # the script in usage and error lines

STAGES = ("pretrained", "sft", "stars")
TRAINED_LOOPS = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (one model each)")
    p.add_argument("--digits", type=int, default=2, help="operand digits of the addition task")
    p.add_argument("--n-train", type=int, default=8000, help="training problems")
    p.add_argument("--n-test", type=int, default=500, help="test problems")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the Ouro model")
    p.add_argument("--layers", type=int, default=2, help="layers (all looped)")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--init-std", type=float, default=0.1, help="initializer_range")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="pre-training learning rate")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--lam", type=float, default=0.1, help="STARS penalty weight")
    p.add_argument("--penalty-start", type=int, default=0, help="first fine-tuning step with it")
    p.add_argument(
        "--penalty-rows", type=int, default=16, help="sequences of each batch in the penalty"
    )
    p.add_argument("--depth", default="1.7,0.4,1,16", help="STARS log-normal mu,sigma,lo,hi")
    p.add_argument("--max-loops", type=int, default=16, help="evaluate loops 1..this")
    p.add_argument("--timing-steps", type=int, default=10, help="timed steps of each kind")
    p.add_argument(
        "--out-dir",
        default=None,
        help="stages (resumable); default runs/finetune_stars, with --quick "
        "runs/finetune_stars_quick",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete each seed's stages (data, models, evaluations) and run again",
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="write accuracy vs loops here (PNG)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds (tests)")
    p.add_argument(
        "--memory-json", default=None, help="only measure Ouro-1.4B's memory terms, write here"
    )
    args = p.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = "runs/finetune_stars_quick" if args.quick else "runs/finetune_stars"
    if args.quick:
        args.seeds, args.digits, args.n_train, args.n_test = "0", 1, 64, 16
        args.hidden, args.layers, args.heads = 16, 1, 2
        args.pretrain_steps, args.finetune_steps, args.batch_size = 4, 3, 16
        args.max_loops, args.timing_steps, args.penalty_rows = 8, 2, 8
    return args


# ------------------------------------------------------------------------------ stages


def write_data(out: Path, args: argparse.Namespace, seed: int) -> tuple[Path, Path]:
    """Train/test prompt/completion JSONL of n-digit addition (disjoint splits)."""
    files = (out / "train.jsonl", out / "test.jsonl")
    if all(f.is_file() for f in files):
        return files
    for file, split, n in zip(files, ("train", "test"), (args.n_train, args.n_test), strict=True):
        data = make_arithmetic_dataset("addition", args.digits, n, seed, split=split)
        records = [
            {"prompt": f"{q}=", "completion": a}
            for q, a in zip(data["question"], data["answer"], strict=True)
        ]
        write_jsonl(file, records)
    return files


def write_init(out: Path, args: argparse.Namespace, seed: int) -> Path:
    """The random Ouro-architecture model pre-training starts from."""
    path = out / "init"
    if (path / "config.json").is_file():
        return path
    return pretrained.write_tiny_checkpoint(
        path,
        arch="ouro",
        seed=seed,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        total_ut_steps=TRAINED_LOOPS,
        initializer_range=args.init_std,
        max_position_embeddings=64,
        overwrite=True,
    )


def stage_config(
    name: str, init: Path, train: Path, out: Path, args: argparse.Namespace, seed: int
) -> FinetuneConfig:
    """Pre-training and the two fine-tunes share everything but what the name says."""
    mu, sigma, lo, hi = (float(v) for v in args.depth.split(","))
    steps = args.pretrain_steps if name == "pretrained" else args.finetune_steps
    return FinetuneConfig(
        init_from=str(init),
        train_file=str(train),
        out_dir=str(out / name),
        seed=seed,
        mode="stars" if name == "stars" else "sft",
        loops=TRAINED_LOOPS,
        depth={"kind": "lognormal", "mu": mu, "sigma": sigma, "lo": int(lo), "hi": int(hi)},
        lam=args.lam,
        penalty_start=args.penalty_start,
        penalty_rows=args.penalty_rows,
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr if name == "pretrained" else args.finetune_lr,
        warmup_steps=max(1, steps // 20),
        betas=(0.9, 0.98),
        weight_decay=0.01,
        checkpoint_every=max(1, steps // 4),
        resume=True,
        progress=not args.no_progress,
        max_len=64,
        device="cpu",
    )


def evaluate_stage(model_dir: Path, test: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Exact match at loops 1..max_loops and at equilibrium, cached next to the model."""
    cache = model_dir.parent / "benchmark_eval.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        loops = sorted(int(t) for t in cached["accuracy"])
        if loops == list(range(1, args.max_loops + 1)) and cached["n"] == args.n_test:
            return cached
    loaded = load_for_finetuning(model_dir)
    result = accuracy_vs_loops(
        loaded.model,
        loaded.tokenizer,
        load_jsonl(test),
        loops=range(1, args.max_loops + 1),
        decode="forced",
        batch_size=512,
    )
    write_json_atomic(cache, result)
    return result


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Peak (over loops 1..max) and drops from it at 8 and 16 loops, in points."""
    acc = {int(k): 100 * v for k, v in result["accuracy"].items()}
    peak_loops = max(acc, key=lambda t: (acc[t], -t))
    row: dict[str, Any] = {"peak": acc[peak_loops], "peak_loops": peak_loops}
    for t in (4, 8, 16):
        row[f"acc{t}"] = acc.get(t)
        row[f"drop{t}"] = None if t not in acc else acc[peak_loops] - acc[t]
    eq = result.get("equilibrium")
    row["equilibrium"] = None if eq is None else 100 * eq["accuracy"]
    row["converged"] = None if eq is None else eq["converged"]
    return row


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Pre-train, fine-tune twice, evaluate and time one seed; returns its results."""
    out = Path(args.out_dir) / f"seed{seed}"
    if args.overwrite:  # everything below is this script's own output for the seed
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    train, test = write_data(out, args, seed)
    init = write_init(out, args, seed)
    times: dict[str, float] = {}
    start = time.perf_counter()
    base = finetune(stage_config("pretrained", init, train, out, args, seed))
    times["pretrained"] = base["train_time"]
    pre_model = out / "pretrained" / MODEL_DIR
    results = {"pretrained": evaluate_stage(pre_model, test, args)}
    for name in ("sft", "stars"):
        run = finetune(stage_config(name, pre_model, train, out, args, seed))
        times[name] = run["train_time"]
        results[name] = evaluate_stage(out / name / MODEL_DIR, test, args)
    timing = time_steps(pre_model, train, args, seed)
    return {
        "seed": seed,
        "results": results,
        "summary": {name: summarise(r) for name, r in results.items()},
        "train_time": times,
        "step_time": timing,
        "wall_time": time.perf_counter() - start,
    }


def time_steps(pre_model: Path, train: Path, args: argparse.Namespace, seed: int) -> dict:
    """Median SFT and STARS step times at the trained loop count, on fresh copies.

    The STARS step as configured (penalty on ``penalty_rows`` sequences of the batch) and
    with the penalty on the whole batch (the paper), each interleaved with SFT steps.
    """
    examples = load_jsonl(train)[: 8 * args.batch_size]
    config = stage_config("stars", pre_model, train, Path(args.out_dir), args, seed)
    out = {}
    for key, rows in (("configured", config.penalty_rows), ("whole_batch", None)):
        loaded = load_for_finetuning(pre_model)
        inputs, targets = encode_examples(examples, loaded.tokenizer, PromptTemplate(), max_len=64)
        out[key] = step_time_ratio(
            loaded,
            inputs,
            targets,
            dataclasses.replace(config, penalty_rows=rows),
            loops=TRAINED_LOOPS,
            steps=args.timing_steps,
        )
    return {**out["configured"], "whole_batch": out["whole_batch"]}


# ----------------------------------------------------------------------------- reporting


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean over seeds of every summary number, per stage."""
    out: dict[str, dict[str, float | None]] = {}
    for name in STAGES:
        rows = [s["summary"][name] for s in per_seed]
        out[name] = {
            key: statistics.fmean(r[key] for r in rows) if rows[0][key] is not None else None
            for key in rows[0]
        }
    return out


def targets(mean: dict[str, dict[str, float | None]], ratio: float, wall: float) -> dict:
    sft, stars = mean["sft"], mean["stars"]
    return {
        "stars_drop8_le_half_sft": stars["drop8"] <= 0.5 * sft["drop8"],
        "stars_peak_ge_sft_minus_1": stars["peak"] >= sft["peak"] - 1.0,
        "stars_step_le_1.3x_sft": ratio <= 1.3,
        "within_45_min": wall <= 45 * 60,
    }


def accuracy_table(per_seed: list[dict[str, Any]], max_loops: int) -> str:
    rows = []
    for seed in per_seed:
        for name in STAGES:
            result = seed["results"][name]
            row = {"stage": name, "seed": seed["seed"]}
            row.update({f"L{k}": 100 * v for k, v in result["accuracy"].items()})
            eq = result["equilibrium"]
            row["eq"] = None if eq is None else 100 * eq["accuracy"]
            rows.append(row)
    columns = [("stage", "model", "s"), ("seed", "seed", "d")]
    columns += [(f"L{t}", f"L{t}", ".1f") for t in range(1, max_loops + 1)]
    columns.append(("eq", "eq", ".1f"))
    return format_table(rows, columns)


def summary_table(mean: dict[str, dict[str, float | None]]) -> str:
    rows = [{"stage": name, **values} for name, values in mean.items()]
    columns = [
        ("stage", "model (mean over seeds)", "s"),
        ("peak", "peak", ".1f"),
        ("peak_loops", "at loops", ".1f"),
        ("acc4", "L4", ".1f"),
        ("acc8", "L8", ".1f"),
        ("acc16", "L16", ".1f"),
        ("drop8", "drop@8", ".1f"),
        ("drop16", "drop@16", ".1f"),
        ("equilibrium", "equilibrium", ".1f"),
    ]
    return format_table(rows, columns)


def plot(per_seed: list[dict[str, Any]], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"pretrained": "tab:gray", "sft": "tab:blue", "stars": "tab:red"}
    for name in STAGES:
        curves = [s["results"][name]["accuracy"] for s in per_seed]
        loops = sorted(int(k) for k in curves[0])
        values = torch.tensor([[100 * c[str(t)] for t in loops] for c in curves])
        mean = values.mean(0)
        ax.plot(loops, mean, marker="o", ms=3, color=colors[name], label=name)
        if len(curves) > 1:
            ax.fill_between(
                loops, values.min(0).values, values.max(0).values, color=colors[name], alpha=0.15
            )
        eq = [s["results"][name]["equilibrium"] for s in per_seed]
        if all(e is not None for e in eq):
            ax.scatter(
                [loops[-1] + 1.5],
                [statistics.fmean(100 * e["accuracy"] for e in eq)],
                marker="*",
                s=80,
                color=colors[name],
            )
    ax.axvline(TRAINED_LOOPS, color="k", lw=0.6, ls=":")
    ax.set_ylim(-3, 103)
    ax.set_xticks([*loops, loops[-1] + 1.5], [*map(str, loops), "eq"])
    ax.set_title("exact match vs loops (star: Anderson equilibrium); trained at 4 loops")
    style_axis(ax, "loops at test time", "exact match (%)")
    fig.tight_layout()
    write_figure_atomic(path, fig, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------ memory of Ouro-1.4B


def memory_estimate(path: str, tokens: int = 64) -> dict[str, Any]:
    """Measure activation bytes of one Ouro-1.4B-width layer; extrapolate to the model.

    One layer with the 1.4B's widths (d=2048, FFN 5632, 16 heads) runs on the CPU; the
    bytes saved for the backward are counted per token and loop (the difference of 8 and
    4 loops, so fixed costs cancel) with float32, with bf16 autocast and with per-loop
    gradient checkpointing, and the penalty's extra bytes (one float32 application of the
    map with its double-backward graph). Weights, gradients and AdamW states follow from
    the parameter count.
    """
    from eqloop.recipes.finetune.train import Objective

    c = OURO_14B
    layer = pretrained.write_tiny_checkpoint(
        Path(path) / "ouro14b_layer",
        arch="ouro",
        overwrite=True,
        hidden_size=c["hidden"],
        intermediate_size=c["ffn"],
        num_hidden_layers=1,
        num_attention_heads=c["heads"],
        num_key_value_heads=c["heads"],
        vocab_size=128,
        max_position_embeddings=512,
    )
    model = pretrained.load(layer)
    ids = torch.randint(4, 100, (1, tokens))
    per_token: dict[str, float] = {}

    def saved(objective: Objective, loops: int, penalty: bool) -> int:
        """Bytes one objective call at ``loops`` saves for the backward (fixed noise seed)."""
        gen = torch.Generator().manual_seed(0)
        return saved_bytes(objective.model, lambda: objective(ids, ids, loops, penalty, gen))

    for name, options in (
        ("fp32", {}),
        ("bf16", {"autocast": True}),
        ("bf16_checkpointed", {"autocast": True, "grad_checkpointing": True}),
    ):
        objective = Objective(model, lam=0.1, **options)
        four, eight = (saved(objective, t, False) for t in (4, 8))
        key = f"{name}_per_loop" if "checkpointed" in name else f"{name}_per_loop_layer"
        per_token[key] = (eight - four) / 4 / tokens
        if name == "bf16":
            per_token["penalty_per_layer"] = (saved(objective, 4, True) - four) / tokens
    d, f, v, n = c["hidden"], c["ffn"], c["vocab"], c["layers"]
    per_layer = 4 * d * d + 3 * d * f + 4 * d
    params = n * per_layer + 2 * v * d + d + (d + 1)  # layers, embeddings + head, norm, gate
    lora_r = 16
    lora = n * lora_r * (4 * (d + d) + 2 * (d + f) + (f + d))
    return {
        "measured_tokens": tokens,
        "bytes_per_token": per_token,
        "parameters": params,
        "lora_r16_parameters": lora,
        "gib": {
            "weights_fp32": params * 4 / 2**30,
            "weights_bf16": params * 2 / 2**30,
            "grads_fp32": params * 4 / 2**30,
            "adamw_fp32": params * 8 / 2**30,
            "lora_weights_grads_adamw": lora * 16 / 2**30,
            "activations_bf16_per_loop_per_1k_tokens": (
                per_token["bf16_per_loop_layer"] * n * 1024 / 2**30
            ),
            "checkpointed_state_per_loop_per_1k_tokens": (
                per_token["bf16_checkpointed_per_loop"] * 1024 / 2**30
            ),
            "penalty_per_1k_tokens": per_token["penalty_per_layer"] * n * 1024 / 2**30,
            "logits_fp32_per_1k_tokens": 2 * v * 4 * 1024 / 2**30,
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.memory_json:
        estimate = memory_estimate(args.out_dir)
        print(json.dumps(estimate, indent=2))
        write_json_atomic(args.memory_json, estimate)
        print_written(args.memory_json)
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    load_start = os.getloadavg()
    start = time.perf_counter()
    try:
        per_seed = [run_seed(seed, args) for seed in seeds]
    except ValueError as error:  # e.g. a stage directory that holds another config's run
        sys.exit(
            f"{PROG}: error: {error}. With this script: --overwrite runs the "
            f"seeds again from scratch, or --out-dir DIR runs them elsewhere (now {args.out_dir})"
        )
    wall = time.perf_counter() - start
    mean = aggregate(per_seed)
    ratio = statistics.median(s["step_time"]["ratio"] for s in per_seed)
    report = {
        "config": vars(args),
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "seeds": per_seed,
        "mean": mean,
        "step_time_ratio": ratio,
        "step_time_ratio_whole_batch": statistics.median(
            s["step_time"]["whole_batch"]["ratio"] for s in per_seed
        ),
        "wall_time": wall,
        "targets": targets(mean, ratio, wall),
    }
    print(accuracy_table(per_seed, args.max_loops))
    print()
    print(summary_table(mean))
    times = ", ".join(
        f"seed {s['seed']}: SFT {s['step_time']['step_time_sft'] * 1e3:.1f} ms, "
        f"STARS {s['step_time']['step_time_stars'] * 1e3:.1f} ms"
        for s in per_seed
    )
    whole = statistics.median(s["step_time"]["whole_batch"]["ratio"] for s in per_seed)
    print(
        f"\nstep time at {TRAINED_LOOPS} loops: {times}; STARS/SFT median ratio {ratio:.2f} "
        f"(penalty on {args.penalty_rows} of {args.batch_size} rows; whole batch: {whole:.2f})"
    )
    print(f"wall time {wall / 60:.1f} min; load average {load_start} -> {os.getloadavg()}")
    print("targets:", json.dumps(report["targets"]))
    if args.json:
        write_json_atomic(args.json, report)
    if args.plot:
        plot(per_seed, args.plot)
    print(f"stages in {args.out_dir}")
    print_written(args.json, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
