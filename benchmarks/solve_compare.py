"""Compare fixed-point solvers side by side on synthetic maps and a LoopLM core.

Every registered solver (eqloop's own and the torchdeq / SciPy adapters) runs on the
same problems in the same process. Timings are interleaved across solvers and repeated,
and each solver's time per f-evaluation is divided by the time of one bare call of f
measured in the same rounds, so the ratios survive a noisy, shared machine.

Problems (sizes from ``--batch`` and ``--dim``):
  gauss-0.9 / gauss-0.99   f(z) = tanh(z W^T + x U^T), W Gaussian, ||W||_2 = 0.9 / 0.99
  sym-0.9 / sym-0.99       the same with W symmetric, spectral radius 0.9 / 0.99
  sym-0.99-weak            sym-0.99 with the injection x U^T scaled by 0.1 (hard: tanh
                           stays near its linear range, so the contraction is ~0.99)
  affine                   f(z) = z A^T + b with ||A||_2 = 0.95; answer (I - A)^{-1} b
  looplm                   the recurrent core of a LoopLM (d=128, post-sandwich LayerNorm,
                           random init with a 10x token embedding, or --checkpoint)
U has N(0, 1/d) entries and x ~ N(0, 1), so x U^T has unit scale per coordinate.

Usage:
    python benchmarks/solve_compare.py                        # full table (a few minutes)
    python benchmarks/solve_compare.py --quick --json out.json --plot out.png
    python benchmarks/solve_compare.py --solvers anderson,torchdeq.anderson --dim 512
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import solvers
from benchmarks.common import (
    PeakMemory,
    format_table,
    machine_info,
    print_written,
    write_json_atomic,
)
from eqloop.files import write_figure_atomic
from eqloop.plotting import pyplot

#: eqloop solver -> the torchdeq solver of the same kind, for wall-time ratios.
TORCHDEQ_TWIN = {
    "fixed_point": "torchdeq.fixed_point_iter",
    "anderson": "torchdeq.anderson",
    "broyden": "torchdeq.broyden",
}


@dataclass
class BenchProblem:
    """A fixed-point problem ``z = f(z, *args)`` for the benchmark.

    Attributes:
        name: short identifier used in tables and JSON.
        f: the map, (B, ...) -> (B, ...), called as ``f(z, *args)``.
        z0: (B, ...) initial guess.
        args: per-sample tensors passed after ``z``.
        answer: (B, ...) exact fixed point when known in closed form.
    """

    name: str
    f: Callable[..., Tensor]
    z0: Tensor
    args: tuple[Tensor, ...]
    answer: Tensor | None = None


def tanh_problem(
    name: str,
    *,
    symmetric: bool,
    rho: float,
    injection: float,
    batch: int,
    dim: int,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
) -> BenchProblem:
    """``f(z) = tanh(z W^T + x U^T)`` with W scaled to norm (or spectral radius) ``rho``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    if symmetric:
        a = (a + a.T) / 2
        w = a * (rho / torch.linalg.eigvalsh(a).abs().max())
    else:
        w = a * (rho / torch.linalg.matrix_norm(a, ord=2))
    u = torch.randn(dim, dim, generator=gen, dtype=torch.float64) * (injection / math.sqrt(dim))
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    w_t, u_t = (t.T.contiguous().to(device=device, dtype=dtype) for t in (w, u))

    def f(z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z @ w_t + x @ u_t)

    z0 = torch.zeros(batch, dim, dtype=dtype, device=device)
    return BenchProblem(name, f, z0, (x.to(device=device, dtype=dtype),))


def affine_problem(
    *, batch: int, dim: int, seed: int, dtype: torch.dtype, device: torch.device
) -> BenchProblem:
    """``f(z) = z A^T + b`` with ||A||_2 = 0.95; the answer solves ``(I - A) z = b``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    a = a * (0.95 / torch.linalg.matrix_norm(a, ord=2))
    b = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    answer = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - a, b.T).T
    a_t = a.T.contiguous().to(device=device, dtype=dtype)

    def f(z: Tensor, b: Tensor) -> Tensor:
        return z @ a_t + b

    z0 = torch.zeros(batch, dim, dtype=dtype, device=device)
    cast = {"device": device, "dtype": dtype}
    return BenchProblem("affine", f, z0, (b.to(**cast),), answer.to(**cast))


def looplm_problem(
    *,
    batch: int,
    seq_len: int,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
    checkpoint: str | None,
) -> BenchProblem:
    """The recurrent core of a LoopLM (its ``core_map``) over (B, S, d) states."""
    from eqloop.models.looplm.modeling import LoopLM, LoopLMConfig

    if checkpoint is not None:
        from eqloop.training.checkpoint import load_model

        model, _ = load_model(checkpoint)
    else:
        torch.manual_seed(seed)
        config = LoopLMConfig(
            vocab_size=16,
            d_model=128,
            n_heads=4,
            d_ff=256,
            max_seq_len=seq_len,
            norm_placement="post_sandwich",
        )
        model = LoopLM(config)
        with torch.no_grad():
            # At init the embeddings (std 0.02) barely reach the normalised state and the
            # core wanders; a 10x stronger injection makes it contract, as trained cores do.
            model.tok_emb.weight.mul_(10.0)
    model = model.to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    vocab, max_len = model.config.vocab_size, model.config.max_seq_len
    tokens = torch.randint(0, vocab, (batch, min(seq_len, max_len)), generator=gen).to(device)
    with torch.no_grad():
        f, z0 = model.core_map(tokens)
    # The map's parts, so that the solvers may drop converged rows with their arguments.
    return BenchProblem("looplm", f.step, z0, f.args)


def build_problems(args: argparse.Namespace) -> list[BenchProblem]:
    """The problems selected on the command line."""
    common = {"batch": args.batch, "seed": args.seed, "dtype": args.dtype, "device": args.device}
    makers: dict[str, Callable[[], BenchProblem]] = {
        "gauss-0.9": lambda: tanh_problem(
            "gauss-0.9", symmetric=False, rho=0.9, injection=1.0, dim=args.dim, **common
        ),
        "gauss-0.99": lambda: tanh_problem(
            "gauss-0.99", symmetric=False, rho=0.99, injection=1.0, dim=args.dim, **common
        ),
        "sym-0.9": lambda: tanh_problem(
            "sym-0.9", symmetric=True, rho=0.9, injection=1.0, dim=args.dim, **common
        ),
        "sym-0.99": lambda: tanh_problem(
            "sym-0.99", symmetric=True, rho=0.99, injection=1.0, dim=args.dim, **common
        ),
        "sym-0.99-weak": lambda: tanh_problem(
            "sym-0.99-weak", symmetric=True, rho=0.99, injection=0.1, dim=args.dim, **common
        ),
        "affine": lambda: affine_problem(dim=args.dim, **common),
        "looplm": lambda: looplm_problem(
            seq_len=args.seq_len, checkpoint=args.checkpoint, **common
        ),
    }
    unknown = sorted(set(args.problems) - set(makers))
    if unknown:
        raise SystemExit(f"unknown problem(s) {unknown}; choose from {sorted(makers)}")
    return [makers[name]() for name in args.problems]


def solve_once(problem: BenchProblem, solver: str, args: argparse.Namespace) -> solvers.SolveResult:
    """One solve, without autograd."""
    with torch.no_grad():
        return solvers.solve(
            problem.f,
            problem.z0,
            solver,
            max_iter=args.max_iter,
            tol=args.tol,
            stop_mode=args.stop_mode,
            args=problem.args,
        )


def bare_call_seconds(problem: BenchProblem, calls: int) -> float:
    """Mean time of one call of f at z0, over ``calls`` back-to-back calls."""
    with torch.no_grad():
        _sync(problem.z0)
        start = time.perf_counter()
        for _ in range(calls):
            out = problem.f(problem.z0, *problem.args)
        _sync(out)
    return (time.perf_counter() - start) / calls


def _sync(t: Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def measure_problem(
    problem: BenchProblem, names: list[str], args: argparse.Namespace, progress: tqdm
) -> list[dict[str, Any]]:
    """Solve ``problem`` with every solver; return one result row per solver."""
    results = {name: solve_once(problem, name, args) for name in names}  # also warms up
    times: dict[str, list[float]] = {name: [] for name in names}
    bare: list[float] = []
    for _ in range(args.repeats):  # interleaved, so load changes hit every solver alike
        bare.append(bare_call_seconds(problem, calls=20))
        for name in names:
            start = time.perf_counter()
            result = solve_once(problem, name, args)
            _sync(result.z)
            times[name].append(time.perf_counter() - start)
            progress.update(1)
    bare_s = statistics.median(bare)
    rows = []
    for name in names:
        res = results[name]
        with PeakMemory() as mem:
            solve_once(problem, name, args)
        wall = statistics.median(times[name])
        row = {
            "problem": problem.name,
            "solver": name,
            "nfe": res.nfe,
            "mean_nstep": float(res.nstep.float().mean()),
            "converged": float(res.converged.float().mean()),
            "status": res.status,
            "max_rel_residual": float(res.rel_residual.max()),
            "max_abs_residual": float(res.abs_residual.max()),
            "wall_ms": wall * 1e3,
            "per_eval_over_bare": wall / res.nfe / bare_s,
            "peak_mem_mb": mem.peak_bytes / 2**20,
            "bare_call_us": bare_s * 1e6,
            "median_rel_trace": res.rel_trace.median(dim=0).values.tolist(),
        }
        if problem.answer is not None:
            err = torch.linalg.vector_norm((res.z - problem.answer).flatten(1), dim=1)
            row["max_error_vs_answer"] = float(err.max())
        rows.append(row)
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Wall time relative to torchdeq's solver of the same kind, and nfe vs naive."""
    by_solver = {row["solver"]: row for row in rows}
    naive = by_solver.get("fixed_point")
    for row in rows:
        twin = by_solver.get(TORCHDEQ_TWIN.get(row["solver"], ""))
        row["time_vs_torchdeq"] = row["wall_ms"] / twin["wall_ms"] if twin else None
        row["nfe_vs_naive"] = row["nfe"] / naive["nfe"] if naive else None


COLUMNS = [
    ("problem", "problem", ""),
    ("solver", "solver", ""),
    ("nfe", "f-evals", "d"),
    ("converged", "conv", ".2f"),
    ("max_rel_residual", "max rel res", ".1e"),
    ("wall_ms", "wall ms", ".1f"),
    ("per_eval_over_bare", "eval/bare", ".2f"),
    ("peak_mem_mb", "peak MB", ".2f"),
    ("time_vs_torchdeq", "t/torchdeq", ".2f"),
    ("nfe_vs_naive", "nfe/naive", ".2f"),
]


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Median relative residual vs f-evaluations, one panel per problem."""
    plt = pyplot()

    problems = list(dict.fromkeys(row["problem"] for row in rows))
    cols = min(3, len(problems))
    nrows = math.ceil(len(problems) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, problems, strict=False):
        for row in (r for r in rows if r["problem"] == name):
            trace = row["median_rel_trace"]
            ax.semilogy(range(1, len(trace) + 1), trace, label=row["solver"], lw=1.2)
        ax.set_title(name)
        ax.set_xlabel("f-evaluations")
        ax.set_ylabel("median relative residual")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(problems) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    write_figure_atomic(path, fig, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    all_problems = "gauss-0.9,gauss-0.99,sym-0.9,sym-0.99,sym-0.99-weak,affine,looplm"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--solvers",
        default=",".join(solvers.available()),
        help="comma-separated solver names (default: all registered)",
    )
    p.add_argument("--problems", default=all_problems, help="comma-separated problem names")
    p.add_argument("--batch", type=int, default=64, help="samples per batch")
    p.add_argument("--dim", type=int, default=256, help="state size of the synthetic maps")
    p.add_argument("--seq-len", type=int, default=16, help="sequence length of the looplm problem")
    p.add_argument("--max-iter", type=int, default=400, help="f-evaluation budget")
    p.add_argument("--tol", type=float, default=1e-5, help="tolerance")
    p.add_argument("--stop-mode", choices=("rel", "abs"), default="rel")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--checkpoint", default=None, help="LoopLM checkpoint for the looplm problem")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--plot", default=None, help="write residual-vs-evaluations plot (PNG)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and one repeat (used by tests): about 20 s of CPU, "
        "a minute or more of wall time on a busy 2-core machine",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.dim, args.seq_len = 8, 32, 8
        args.max_iter, args.repeats = min(args.max_iter, 100), 1
    args.solvers = [s for s in args.solvers.split(",") if s]
    unknown = sorted(set(args.solvers) - set(solvers.available()))
    if unknown:
        p.error(f"unknown solver(s) {unknown}; available: {', '.join(solvers.available())}")
    args.problems = [s for s in args.problems.split(",") if s]
    args.dtype = getattr(torch, args.dtype)
    args.device = torch.device(args.device)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the comparison, print the table, and write JSON / plot when asked."""
    args = parse_args(argv)
    problems = build_problems(args)
    rows: list[dict[str, Any]] = []
    total = len(problems) * len(args.solvers) * args.repeats
    with tqdm(total=total, desc="solve_compare", disable=None) as progress:
        for problem in problems:
            rows.extend(measure_problem(problem, args.solvers, args, progress))
    print(format_table(rows, COLUMNS))
    if args.json:
        settings = {
            k: str(v) if isinstance(v, (torch.dtype, torch.device)) else v
            for k, v in vars(args).items()
        }
        write_json_atomic(
            args.json, {"machine": machine_info(), "settings": settings, "results": rows}
        )
    if args.plot:
        plot(rows, args.plot)
    print_written(args.json, args.plot)
    return rows


if __name__ == "__main__":
    main()
