"""Targets of eqloop's pretrained looped LMs, on a random ~20M-parameter Ouro-shaped model.

Three measurements, each on the same randomly initialised model (Ouro's architecture:
every layer looped, exit gate, untied head; 4 layers, d=512, 8 heads, FFN 1408,
vocabulary 8192, trained depth 4 loops: 21.2M parameters):

  decode    greedy generation of ``--new-tokens`` tokens from ``--batch`` prompts of
            ``--prompt-len`` tokens, with the per-(loop, layer) KV cache and by full
            recompute of the whole sequence for every token (``use_cache=False``, which
            also decodes every position, as a forward pass without a cache does).
            Timings interleave the two and take the median over ``--repeats``; the
            two outputs are checked to be identical. Target: cached >= 5x faster.
  memory    bytes autograd saves for backward during the forward pass of one training
            step through the Ouro core (``eqloop.fixed_point`` with the plain
            iteration, ``tol=0`` so every budget runs in full, then the head and the
            cross-entropy), at 4 and 16 loops, counted as in benchmarks/memory_depth.py
            (distinct non-parameter storages packed by ``saved_tensors_hooks``). Target:
            ``ift`` at 16 loops <= 1.1x its bytes at 4 loops; ``unroll`` for contrast.
  diagnose  wall time of ``eqloop.models.diagnose`` for 32 loops (8x the trained
            depth) of one 32-token sequence, with rho(J) by Arnoldi (20 vectors) at
            every loop. Target: under a minute.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/pretrained.py --json benchmarks/results/pretrained.json \\
        --plot benchmarks/results/pretrained.png      # ~10 minutes on a shared 2-core CPU
    python benchmarks/pretrained.py --quick --json out.json   # seconds, a tiny model
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import format_table, machine_info, print_written, write_json_atomic
from benchmarks.memory_depth import saved_bytes
from eqloop.core.implicit import fixed_point
from eqloop.models import OuroConfig, OuroForCausalLM, diagnose

MiB = 2.0**20
PARTS = ("decode", "memory", "diagnose")


def build_model(args: argparse.Namespace) -> OuroForCausalLM:
    """The random Ouro-shaped model, in eval mode."""
    config = OuroConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        total_ut_steps=args.loops,
    )
    model = OuroForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(args.seed))
    return model.eval()


def measure_decode(model: OuroForCausalLM, args: argparse.Namespace) -> dict[str, Any]:
    """Cached vs recomputed greedy decoding, interleaved; outputs must agree."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=gen)
    times: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, torch.Tensor] = {}
    model.generate(prompts, max_new_tokens=2)  # warm-up
    for _ in range(args.repeats):
        for cached in (True, False):
            start = time.perf_counter()
            outputs[cached] = model.generate(
                prompts, max_new_tokens=args.new_tokens, use_cache=cached
            )
            times[cached].append(time.perf_counter() - start)
    cached_s, recompute_s = statistics.median(times[True]), statistics.median(times[False])
    return {
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "cached_s": cached_s,
        "recompute_s": recompute_s,
        "speedup": recompute_s / cached_s,
        "cached_ms_per_token": 1000 * cached_s / args.new_tokens,
        "identical_outputs": bool(torch.equal(outputs[True], outputs[False])),
        "cached_times": times[True],
        "recompute_times": times[False],
    }


def measure_memory(model: OuroForCausalLM, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Saved-for-backward bytes of a training step through the core, per mode and depth."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    tokens = torch.randint(0, args.vocab, (args.mem_batch, args.mem_seq + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    rows = []
    for mode in ("ift", "unroll"):
        for loops in args.mem_loops:

            def forward(mode: str = mode, loops: int = loops) -> None:
                f, z0 = model.core_map(inputs)
                z = fixed_point(f, z0, solver="fixed_point", backward=mode, max_iter=loops, tol=0.0)
                F.cross_entropy(model.readout(z).flatten(0, 1), targets.flatten())

            rows.append(
                {"mode": mode, "loops": loops, "saved_mib": saved_bytes(model, forward) / MiB}
            )
    for row in rows:
        base = next(r for r in rows if r["mode"] == row["mode"] and r["loops"] == args.mem_loops[0])
        row["vs_fewest_loops"] = row["saved_mib"] / base["saved_mib"]
    return rows


def measure_diagnose(
    model: OuroForCausalLM, args: argparse.Namespace
) -> tuple[dict[str, Any], Any]:
    """Wall time of the per-loop diagnostics."""
    gen = torch.Generator().manual_seed(args.seed + 3)
    tokens = torch.randint(0, args.vocab, (1, args.diag_seq), generator=gen)
    start = time.perf_counter()
    result = diagnose(
        model,
        tokens,
        loops=args.diag_loops,
        rho_iters=args.rho_iters,
        generator=torch.Generator().manual_seed(args.seed),
    )
    seconds = time.perf_counter() - start
    return {
        "loops": args.diag_loops,
        "seq_len": args.diag_seq,
        "rho_iters": args.rho_iters,
        "seconds": seconds,
        "rho_first_last": [result.rho[0], result.rho[-1]],
        "residual_first_last": [result.residual[0], result.residual[-1]],
    }, result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument(
        "--loops", type=int, default=4, help="the model's trained depth (total_ut_steps)"
    )
    p.add_argument("--batch", type=int, default=4, help="decode: prompts per batch")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="decode: timed repeats (median)")
    p.add_argument("--mem-batch", type=int, default=4)
    p.add_argument("--mem-seq", type=int, default=32)
    p.add_argument("--mem-loops", default="4,16", help="memory: loop counts, the first is the base")
    p.add_argument("--diag-loops", type=int, default=32)
    p.add_argument("--diag-seq", type=int, default=32)
    p.add_argument("--rho-iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--plot", default=None, help="write the diagnostics plot (PNG) here")
    p.add_argument("--quick", action="store_true", help="a tiny model and short runs (seconds)")
    args = p.parse_args(argv)
    args.parts = [s for s in args.parts.split(",") if s]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    args.mem_loops = [int(s) for s in args.mem_loops.split(",")]
    if args.quick:
        args.vocab, args.hidden, args.ffn, args.layers, args.heads, args.kv_heads = (
            128,
            32,
            64,
            2,
            4,
            2,
        )
        args.batch, args.prompt_len, args.new_tokens, args.repeats = 2, 8, 8, 1
        args.mem_batch, args.mem_seq, args.diag_loops, args.diag_seq, args.rho_iters = 2, 8, 6, 8, 4
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = build_model(args)
    load_before = os.getloadavg()
    out: dict[str, Any] = {
        "machine": {**machine_info(), "load_average_1_5_15": list(load_before)},
        "model": {
            "parameters": model.num_parameters(),
            "config": {
                k: v
                for k, v in vars(args).items()
                if k in ("vocab", "hidden", "ffn", "layers", "heads", "kv_heads", "loops")
            },
        },
        "quick": args.quick,
    }
    targets: dict[str, Any] = {}
    print(
        f"model: {model.num_parameters() / 1e6:.1f}M parameters; load average {load_before[0]:.1f}"
    )
    if "decode" in args.parts:
        decode = measure_decode(model, args)
        out["decode"] = decode
        targets["decode_speedup_ge_5"] = decode["speedup"] >= 5.0
        print(
            format_table(
                [decode],
                [
                    ("batch", "batch", "d"),
                    ("prompt_len", "prompt", "d"),
                    ("new_tokens", "new", "d"),
                    ("cached_s", "cached s", ".2f"),
                    ("recompute_s", "recompute s", ".2f"),
                    ("speedup", "speedup", ".1f"),
                    ("cached_ms_per_token", "ms/token", ".1f"),
                    ("identical_outputs", "same tokens", ""),
                ],
            )
        )
    if "memory" in args.parts:
        memory = measure_memory(model, args)
        out["memory"] = memory
        ift_ratio = next(
            r["vs_fewest_loops"]
            for r in memory
            if r["mode"] == "ift" and r["loops"] == args.mem_loops[-1]
        )
        targets["ift_saved_ratio_le_1.1"] = ift_ratio <= 1.1
        print(
            format_table(
                memory,
                [
                    ("mode", "mode", ""),
                    ("loops", "loops", "d"),
                    ("saved_mib", "saved MiB", ".2f"),
                    ("vs_fewest_loops", "x fewest", ".2f"),
                ],
            )
        )
    if "diagnose" in args.parts:
        timing, result = measure_diagnose(model, args)
        out["diagnose"] = timing
        out["diagnostics"] = result.to_dict() | {"per_sequence": None}
        targets["diagnose_under_60s"] = timing["seconds"] < 60.0
        print(result.table())
        print(f"diagnose: {timing['loops']} loops in {timing['seconds']:.1f} s")
        if args.plot:
            result.plot(args.plot)
            print_written(args.plot)
    out["targets_met"] = targets
    out["machine"]["load_average_after"] = list(os.getloadavg())
    print("targets:", ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()))
    if args.json:
        write_json_atomic(args.json, out)
        print_written(args.json)
    return out


if __name__ == "__main__":
    main()
