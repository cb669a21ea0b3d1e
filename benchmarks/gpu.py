"""GPU speed and memory of eqloop at Ouro-1.4B's shape and at the arithmetic LoopLM's shape.

One command, meant for one H100 (under 8 minutes), with random weights (nothing is
downloaded). Two models:

  ouro     Ouro-1.4B's shape (``OURO_14B`` of benchmarks/common.py, from
           PRETRAINED.md: vocabulary 49152, hidden 2048, FFN 5632, 24 layers, 16 heads,
           16 KV heads, 4 loops; 1.43B parameters) built from ``eqloop.models``'s
           ``OuroConfig`` with ``init_weights``;
  looplm   the arithmetic LoopLM (``TrainConfig().model``: d=64, 8 heads, FFN 256,
           prelude + post-sandwich core + coda, 8 loops).

Workloads (a row per variant; rows of one group are timed interleaved):

  step     one training step at ``--step-loops`` (4, 8, 16) loops, float32 master weights under bf16
           autocast, AdamW (lr 1e-6) over every weight; time and peak memory.
           ``stars_unrolled``: eqloop.recipes.finetune's ``Objective`` with the STARS penalty on
           (lam 0.1, its float32 JSRR on the whole batch), i.e. the fine-tuning step;
           ``implicit_ift``: ``eqloop.fixed_point`` with ``loops`` plain iterations
           without a graph (tol 0), one with, the head, the cross-entropy, and the IFT
           adjoint solve (plain iteration to ``--adjoint-tol``, at most
           ``--adjoint-max-iter`` VJPs: bf16 autocast does not resolve the float32
           default of ~1e-6); ``adjoint_vjps`` and ``adjoint_status`` report it.
  solve    the core solved to ``--solve-tol`` (relative residual) by ``anderson`` and by
           ``fixed_point`` (plain iteration), at most ``--solve-max-iter`` f-evaluations,
           no_grad, bf16 weights: wall time, f-evaluations, converged fraction.
  forward  an unrolled forward pass at the model's default depth, no_grad, bf16 weights:
           tokens/s of ``eager``, ``compile`` (``torch.compile(model)``) and
           ``reduce-overhead`` (``torch.compile(model, mode="reduce-overhead")``, CUDA
           graphs).
  decode   greedy generation with the KV cache (Ouro only; the LoopLM has no cache), bf16
           weights: new tokens/s (batch x new tokens over the whole call, prefill
           included) of ``eager`` and ``compile``.

Timing: the variants of a group run in turn, round after round with a rotating order
(``benchmarks.common.interleaved_times``); every call ends with
``torch.cuda.synchronize()``; the median is reported, after ``--warmup`` untimed calls
(compilation and CUDA-graph recording happen in the first calls, reported as
``first_call_s``). Peak memory: the extra bytes a call allocates above what was allocated
before it (``benchmarks.common.extra_peak_bytes``: the CUDA allocator's
``max_memory_allocated``; on the CPU a dispatch-mode count, for the step rows only).

Failures stay in their row: an exception (a compile error, out of memory, a timeout) makes
the row ``status: "error"`` with the message, and the run goes on. Time is bounded: the
first calls of a variant (compilation) get ``--compile-timeout`` seconds, repeats are cut
to what the remaining time allows, and once ``--budget`` seconds have passed since the
start no further variant starts (``status: "skipped"``). ``--compile-backend none``
skips the compiled variants.

JSON (``--json``): ``machine`` (benchmarks.common.machine_info, with ``device`` and
``cuda``), ``command``, ``wall_seconds``, ``settings`` (the options), ``models`` (name ->
``parameters``, ``config``, ``shapes``) and ``results``, one row per variant: ``model``,
``workload``, ``variant``, ``loops`` (None for solve), ``tokens`` (B x S of the batch;
decode: B x new tokens), ``status`` ("ok" | "error" | "skipped") and ``error`` (None, or
the exception's type and first line); when ok also ``repeats``, ``times_s``,
``median_ms``, ``first_call_s``, ``tokens_per_s`` (not for solve), ``peak_mib`` (CUDA;
CPU: step rows), step ``adjoint_vjps``/``adjoint_status`` (implicit), solve ``nfe``,
``converged``, ``solve_status``, ``max_rel_residual``, ``tol``, ``max_iter``. A model
that could not be built has one row with ``workload: "build"``.

Without CUDA the full run says so in one line and exits 0. ``--quick`` runs tiny shapes
on the CPU with the same code (the test suite's smoke run).

Usage:
    python benchmarks/gpu.py --json benchmarks/results/gpu.json     # one H100, < 8 minutes
    python benchmarks/gpu.py --quick --compile-backend none --json /tmp/gpu.json  # seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import signal
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    OURO_14B,
    command_line,
    extra_peak_bytes,
    format_table,
    interleaved_times,
    machine_info,
    print_written,
    write_json_atomic,
)
from eqloop.core.backward import ConvergenceWarning
from eqloop.core.implicit import fixed_point
from eqloop.models import OuroConfig, OuroForCausalLM
from eqloop.models.looplm.modeling import LoopLM
from eqloop.recipes.finetune.config import FinetuneConfig
from eqloop.recipes.finetune.train import Objective
from eqloop.training.config import TrainConfig

MiB = 2.0**20
MODELS = ("ouro", "looplm")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "none")
NO_CUDA = "gpu.py: CUDA is not available; nothing measured (--quick runs the CPU smoke test)"

#: The tiny Ouro of --quick (OURO_14B's keys).
OURO_QUICK = {"vocab": 128, "hidden": 32, "ffn": 64, "layers": 2, "heads": 4}

#: Batch shapes per model: forward (batch x seq), decode (batch, prompt, new tokens),
#: training step and solve (batch x seq). The full Ouro step (512 tokens at 16 loops)
#: needs about 60 GiB (experiments/finetune_stars/results/finetune_memory.json: 3.6 GiB of
#: bf16 activations per loop and 1k tokens, 14.6 GiB of penalty per 1k tokens, 21.4 GiB
#: of weights, gradients and AdamW states).
SHAPES: dict[bool, dict[str, dict[str, int]]] = {
    False: {
        "ouro": dict(
            batch=8,
            seq=512,
            decode_batch=8,
            prompt=128,
            new_tokens=64,
            step_batch=2,
            step_seq=256,
            solve_batch=4,
            solve_seq=256,
        ),
        "looplm": dict(
            batch=256, seq=32, step_batch=256, step_seq=32, solve_batch=256, solve_seq=32
        ),
    },
    True: {
        "ouro": dict(
            batch=2,
            seq=16,
            decode_batch=2,
            prompt=8,
            new_tokens=4,
            step_batch=2,
            step_seq=8,
            solve_batch=2,
            solve_seq=8,
        ),
        "looplm": dict(batch=4, seq=16, step_batch=4, step_seq=16, solve_batch=4, solve_seq=16),
    },
}

COLUMNS = [
    ("model", "model", ""),
    ("workload", "workload", ""),
    ("variant", "variant", ""),
    ("loops", "loops", "d"),
    ("tokens", "tokens", "d"),
    ("median_ms", "median ms", ".2f"),
    ("tokens_per_s", "tokens/s", ".0f"),
    ("peak_mib", "peak MiB", ".1f"),
    ("first_call_s", "first call s", ".2f"),
    ("nfe", "f-evals", "d"),
    ("status", "status", ""),
]


# ------------------------------------------------------------------------ time budget


class Skipped(Exception):
    """A variant not run (time budget spent, or compilation switched off)."""


class Budget:
    """The run's time budget, counted from its creation."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def remaining(self) -> float:
        """Seconds left."""
        return self.seconds - (time.perf_counter() - self.start)

    def repeats(self, round_seconds: float, wanted: int) -> int:
        """Timed rounds that fit the remaining time (at least one, at most ``wanted``)."""
        if round_seconds <= 0:
            return wanted
        return max(1, min(wanted, int(self.remaining() / round_seconds)))

    @contextmanager
    def limit(self, seconds: float) -> Iterator[None]:
        """Run the block for at most ``seconds`` (and the remaining budget).

        Raises:
            Skipped: before the block, when the budget is spent.
            TimeoutError: in the block, when the time is up (SIGALRM; where signals are
                unavailable, e.g. off the main thread, the block runs unbounded).
        """
        limit = min(seconds, self.remaining())
        if limit <= 0:
            raise Skipped(f"the time budget of {self.seconds:.3g} s was spent")
        main_thread = threading.current_thread() is threading.main_thread()
        if not hasattr(signal, "setitimer") or not main_thread:
            yield
            return

        def alarm(signum: int, frame: Any) -> None:
            raise TimeoutError(f"took longer than {limit:.3g} s")

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


@dataclass
class Run:
    """What every measurement needs: the options, the device and the budget."""

    args: argparse.Namespace
    device: torch.device
    budget: Budget
    rows: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------- compiled variants


def compile_model(model: nn.Module, mode: str | None, backend: str) -> Callable[..., Any]:
    """The compiled model the ``forward`` rows time.

    Switch point: ``eqloop.compile_model(model)`` (eqloop/core/compiling.py) once it exists.
    """
    if backend == "none":
        raise Skipped("--compile-backend none")
    options = {"mode": mode} if backend == "inductor" and mode is not None else {}
    return torch.compile(model, backend=backend, **options)


def compiled_generate(model: OuroForCausalLM, backend: str) -> Callable[..., Tensor]:
    """The compiled greedy decoding the ``decode`` rows time: today each decoder layer
    of a copy of the model is compiled in place (generation calls the layers, not the
    model's ``forward``).

    Switch point: ``functools.partial(model.generate, compile=True)`` once
    ``generate(..., compile=True)`` exists.
    """
    if backend == "none":
        raise Skipped("--compile-backend none")
    twin = copy.deepcopy(model)
    for layer in twin.model.layers:
        layer.compile(backend=backend)
    return twin.generate


# ------------------------------------------------------------------------ measurement


def describe(exc: BaseException) -> str:
    """One line naming an exception: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached device memory (between rows)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` followed by a device synchronisation, so that wall time covers its kernels."""

    def call() -> Any:
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return call


def measure(
    run: Run,
    base: dict[str, Any],
    variants: dict[str, Callable[[], Callable[[], Any]]],
    *,
    peak: bool,
    details: Callable[[Any], dict[str, Any]] | None = None,
) -> None:
    """Time the variants of one group, interleaved, and append a row per variant.

    Args:
        run: the run (options, device, budget); rows are appended to ``run.rows``.
        base: fields shared by the group's rows (model, workload, loops, tokens).
        variants: name -> builder returning the call to time (compilation, if any,
            happens in its first call).
        peak: measure peak memory on the CPU too (always on CUDA).
        details: extra row fields from a call's output (e.g. a solve's f-evaluations).
    """
    args, device = run.args, run.device
    rows = {name: {**base, "variant": name, "status": "ok", "error": None} for name in variants}
    ready: dict[str, Callable[[], Any]] = {}
    round_seconds = 0.0
    for name, build in variants.items():
        row = rows[name]
        print(
            f"{base['model']} {base['workload']} {name} loops={base['loops']}",
            file=sys.stderr,
            flush=True,
        )
        try:
            with run.budget.limit(args.compile_timeout):
                fn = synced(build(), device)
                start = time.perf_counter()
                out = fn()
                row["first_call_s"] = last = time.perf_counter() - start
                for _ in range(args.warmup):
                    start = time.perf_counter()
                    out = fn()
                    last = time.perf_counter() - start
            if details is not None:
                row.update(details(out))
            out = None  # e.g. logits: not kept while the others run
        except Exception as exc:  # noqa: BLE001 - the row records it and the run goes on
            row["status"] = "skipped" if isinstance(exc, Skipped) else "error"
            row["error"] = describe(exc)
        if row["error"] is not None:
            free_memory(device)  # after the except clause dropped the traceback's frames
            continue
        ready[name] = fn
        round_seconds += last
    times, errors = interleaved_times(ready, run.budget.repeats(round_seconds, args.repeats))
    for name, fn in ready.items():
        row = rows[name]
        if name in errors:
            row["status"], row["error"] = "error", describe(errors[name])
            continue
        median = statistics.median(times[name])
        row.update(repeats=len(times[name]), times_s=times[name], median_ms=1e3 * median)
        if base.get("tokens") and base["workload"] != "solve":
            row["tokens_per_s"] = base["tokens"] / median
        if peak or device.type == "cuda":
            try:
                row["peak_mib"] = extra_peak_bytes(fn, device) / MiB
            except Exception as exc:  # noqa: BLE001 - as above
                row["status"], row["error"] = "error", f"peak memory: {describe(exc)}"
    ready.clear()
    errors.clear()  # their tracebacks hold the failed calls' tensors
    free_memory(device)
    run.rows.extend(rows.values())


# -------------------------------------------------------------------------- workloads


def build_model(name: str, quick: bool, device: torch.device, seed: int) -> nn.Module:
    """The random float32 model ``name`` on ``device``."""
    torch.manual_seed(seed)
    with torch.device(device):
        if name == "looplm":
            return LoopLM(TrainConfig().model)
        shape = OURO_QUICK if quick else OURO_14B
        config = OuroConfig(
            vocab_size=shape["vocab"],
            hidden_size=shape["hidden"],
            intermediate_size=shape["ffn"],
            num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"],
            num_key_value_heads=shape["heads"],
            max_position_embeddings=4096,
            rope_theta=1e6,
            total_ut_steps=4,
        )
        model = OuroForCausalLM(config)
        model.init_weights(torch.Generator(device=device).manual_seed(seed))
        return model


def random_tokens(
    model: nn.Module, shape: tuple[int, int], device: torch.device, seed: int
) -> Tensor:
    """(B, S) random token ids of ``model``'s vocabulary on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, shape, generator=gen).to(device)


def measure_steps(run: Run, name: str, model: nn.Module, shape: dict[str, int]) -> None:
    """STARS (unrolled) and implicit (IFT) training steps at every loop count."""
    device = run.device
    tokens = random_tokens(model, (shape["step_batch"], shape["step_seq"] + 1), device, 1)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    objective = Objective(model, lam=FinetuneConfig.lam, autocast=True)

    def stars(loops: int) -> Callable[[], Any]:
        def step() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss, *_ = objective(inputs, targets, loops, penalty_on=True)
            loss.backward()
            optimizer.step()
            return loss

        return step

    def implicit(loops: int) -> Callable[[], Any]:
        def step() -> Any:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                f, z0 = model.core_map(inputs)
                z, info = fixed_point(
                    f.step,
                    z0,
                    args=f.args,
                    solver="fixed_point",
                    backward="ift",
                    max_iter=loops,
                    tol=0.0,
                    backward_tol=run.args.adjoint_tol,
                    backward_max_iter=run.args.adjoint_max_iter,
                    return_result=True,
                )
                logits = model.readout(z)
            with warnings.catch_warnings():  # an unconverged adjoint: adjoint_status says so
                warnings.simplefilter("ignore", ConvergenceWarning)
                F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
            optimizer.step()
            return info

        return step

    def adjoint(out: Any) -> dict[str, Any]:
        if isinstance(out, Tensor) or out.backward is None:  # the STARS step's loss
            return {}
        return {"adjoint_vjps": out.backward.nfe, "adjoint_status": out.backward.status}

    tokens_per_step = inputs.numel()
    for loops in run.args.step_loops:
        base = {"model": name, "workload": "step", "loops": loops, "tokens": tokens_per_step}
        variants = {
            "stars_unrolled": lambda loops=loops: stars(loops),
            "implicit_ift": lambda loops=loops: implicit(loops),
        }
        measure(run, base, variants, peak=True, details=adjoint)
    optimizer.zero_grad(set_to_none=True)  # the AdamW states go with this function's frame


def measure_solve(run: Run, name: str, model: nn.Module, shape: dict[str, int]) -> None:
    """Anderson vs plain iteration to the tolerance."""
    tokens = random_tokens(model, (shape["solve_batch"], shape["solve_seq"]), run.device, 2)

    def solve(solver: str) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return model(
                    tokens,
                    solver=solver,
                    tol=run.args.solve_tol,
                    max_iter=run.args.solve_max_iter,
                    return_info=True,
                )

        return call

    def result(out: Any) -> dict[str, Any]:
        res = out[1].result
        return {
            "nfe": res.nfe,
            "converged": float(res.converged.float().mean()),
            "solve_status": res.status,
            "max_rel_residual": float(res.rel_residual.max()),
        }

    base = {
        "model": name,
        "workload": "solve",
        "loops": None,
        "tokens": tokens.numel(),
        "tol": run.args.solve_tol,
        "max_iter": run.args.solve_max_iter,
    }
    variants = {s: lambda s=s: solve(s) for s in ("anderson", "fixed_point")}
    measure(run, base, variants, peak=False, details=result)


def measure_forward(run: Run, name: str, model: nn.Module, shape: dict[str, int]) -> None:
    """Unrolled forward at the default depth: eager vs compiled vs reduce-overhead."""
    tokens = random_tokens(model, (shape["batch"], shape["seq"]), run.device, 3)
    loops = model.default_loops
    backend = run.args.compile_backend

    def forward(call: Callable[..., Any]) -> Callable[[], Any]:
        def fn() -> Any:
            with torch.no_grad():
                return call(tokens, loops)

        return fn

    base = {"model": name, "workload": "forward", "loops": loops, "tokens": tokens.numel()}
    variants = {
        "eager": lambda: forward(model),
        "compile": lambda: forward(compile_model(model, None, backend)),
        "reduce-overhead": lambda: forward(compile_model(model, "reduce-overhead", backend)),
    }
    measure(run, base, variants, peak=False)
    torch._dynamo.reset()  # drop the compiled graphs (and their CUDA-graph memory)


def measure_decode(run: Run, name: str, model: nn.Module, shape: dict[str, int]) -> None:
    """Greedy decoding with the KV cache: eager vs compiled."""
    if not isinstance(model, OuroForCausalLM):
        return  # the LoopLM has no KV cache
    prompts = random_tokens(model, (shape["decode_batch"], shape["prompt"]), run.device, 4)
    new = shape["new_tokens"]
    backend = run.args.compile_backend

    def decode(generate: Callable[..., Tensor]) -> Callable[[], Any]:
        return lambda: generate(prompts, max_new_tokens=new)

    base = {
        "model": name,
        "workload": "decode",
        "loops": model.default_loops,
        "tokens": prompts.shape[0] * new,
        "prompt_len": prompts.shape[1],
    }
    variants = {
        "eager": lambda: decode(model.generate),
        "compile": lambda: decode(compiled_generate(model, backend)),
    }
    measure(run, base, variants, peak=False)
    torch._dynamo.reset()


def stage(run: Run, model: str, workload: str, fn: Callable[[], Any]) -> Any:
    """``fn()``; an exception outside a variant's measurement (e.g. building the model or
    its optimizer) becomes one row of ``workload`` with the error, and None is returned."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded, and the run goes on
        status = "skipped" if isinstance(exc, Skipped) else "error"
        run.rows.append(
            {
                "model": model,
                "workload": workload,
                "variant": None,
                "loops": None,
                "status": status,
                "error": describe(exc),
            }
        )
    free_memory(run.device)  # after the except clause dropped the traceback's frames
    return None


def measure_model(run: Run, name: str) -> dict[str, Any]:
    """Every workload of one model; returns its description ({} if it was not built)."""
    args, shape = run.args, SHAPES[run.args.quick][name]

    def build() -> nn.Module:
        with run.budget.limit(args.compile_timeout):
            return build_model(name, args.quick, run.device, args.seed)

    model = stage(run, name, "build", build)
    if model is None:
        return {}
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": dataclasses.asdict(model.config),
        "shapes": shape,
    }
    stage(run, name, "step", lambda: measure_steps(run, name, model, shape))  # float32 weights
    model.to(torch.bfloat16).eval()  # the rest runs in bf16
    for workload, measure_workload in (
        ("solve", measure_solve),
        ("forward", measure_forward),
        ("decode", measure_decode),
    ):
        stage(run, name, workload, lambda m=measure_workload: m(run, name, model, shape))
    return info


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    p.add_argument("--device", default="cuda", help="CUDA device of the full run")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per group (median)")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed calls after the first (CUDA graphs record in these)",
    )
    p.add_argument(
        "--compile-backend",
        choices=COMPILE_BACKENDS,
        default="inductor",
        help="torch.compile backend of the compiled variants; none skips them",
    )
    p.add_argument(
        "--compile-timeout",
        type=float,
        default=150.0,
        help="seconds for a variant's first calls (compilation) before it fails",
    )
    p.add_argument(
        "--budget", type=float, default=450.0, help="seconds after which no further variant starts"
    )
    p.add_argument(
        "--solve-tol",
        type=float,
        default=1e-2,
        help="relative residual of the solve rows (bf16 resolves about 1e-2)",
    )
    p.add_argument("--solve-max-iter", type=int, default=50)
    p.add_argument("--step-loops", default="4,8,16", help="loop counts of the step rows")
    p.add_argument(
        "--adjoint-tol",
        type=float,
        default=1e-2,
        help="relative residual of the implicit step's adjoint solve",
    )
    p.add_argument(
        "--adjoint-max-iter",
        type=int,
        default=50,
        help="VJP budget of the implicit step's adjoint solve",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows and settings to this JSON file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes on the CPU, 2 and 4 step loops, two repeats, no "
        "warm-up, short solves (tests)",
    )
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    try:
        args.step_loops = [int(s) for s in args.step_loops.split(",") if s]
    except ValueError:
        p.error(f"--step-loops: comma-separated integers expected, got {args.step_loops!r}")
    if args.quick:
        args.repeats, args.warmup, args.step_loops = 2, 0, [2, 4]
        args.solve_max_iter, args.adjoint_max_iter = 10, 5
    if not args.step_loops or min(args.step_loops) < 1:
        p.error("--step-loops: loop counts must be >= 1")
    for name in ("repeats", "solve_max_iter", "adjoint_max_iter"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("warmup",):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0")
    for name in ("compile_timeout", "budget", "solve_tol", "adjoint_tol"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table and the errors, write JSON when asked."""
    args = parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    device = torch.device("cpu") if args.quick else torch.device(args.device)
    run = Run(args, device, Budget(args.budget))
    models = {}
    for name in args.models:
        models[name] = measure_model(run, name)
        free_memory(device)  # the model went with measure_model's frame
    print(format_table(run.rows, COLUMNS))
    for row in run.rows:
        if row["error"] is not None:
            print(
                f"{row['status']}: {row['model']} {row['workload']} {row['variant']}: "
                f"{row['error']}"
            )
    wall = time.perf_counter() - run.budget.start
    print(f"wall time {wall:.0f} s")
    if args.json:
        machine = machine_info()
        machine["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        machine["cuda"] = torch.version.cuda
        write_json_atomic(
            args.json,
            {
                "machine": machine,
                "command": command_line("benchmarks/gpu.py", argv),
                "wall_seconds": wall,
                "settings": {k: v for k, v in vars(args).items() if k != "json"},
                "models": models,
                "results": run.rows,
            },
        )
        print_written(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
