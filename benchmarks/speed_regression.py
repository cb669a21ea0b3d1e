"""Speed of this tree against a baseline revision, timed interleaved in one run.

Two trees are compared: this checkout (working tree, uncommitted changes included) and
a baseline revision extracted with ``git archive`` into a temporary directory. Each tree
gets one persistent worker process that imports its own copy of ``eqloop`` and
``solvers`` (through ``PYTHONPATH``), builds the same model from the same seed and warms
up. The parent then asks the workers in turn, round after round (alternating which tree
goes first), for ``--repeats`` timed runs of each workload, so that both trees see the
same machine load. Every run records the process's CPU time and the wall time; on a
machine shared with other jobs the wall time mostly measures the scheduler, while the
CPU time of a single-threaded run measures the code. Reported per workload: the median
CPU time of each tree over all runs, their ratio (current / baseline), the median of the
per-round ratios, and the ratio of the median wall times.

Workloads (the TrainConfig-default LoopLM: d=64, 8 heads, FFN 256, prelude + one
post-sandwich core block + coda; a batch of ``--batch`` random sequences of the length
of a 3-digit addition example):

  train   one ``eqloop.recipes.train.train_step`` (forward, backward, AdamW step) with
          ``--loops`` unrolled loops, backward "unroll", no penalty;
  solve   an equilibrium solve of the model's core in eval mode without a graph:
          ``model(tokens, solver="anderson", max_iter=--solve-iters, tol=0)``, i.e. a
          fixed number of Anderson iterations through ``eqloop.fixed_point``;
  stars   (``--compile`` only) the ``train`` step with the STARS penalty on (lam 0.1, one
          random probe vector): eagerly the paper's vjp penalty (double backward, what
          ``eqloop train`` runs by default), compiled the forward-mode penalty
          (``penalty_product="jvp"``, compiled as one graph with its backward, what
          ``eqloop train --compile --set penalty_product=jvp`` runs). Both estimate
          ``||J||_F^2 / n``.

With ``--compile`` the two sides are this tree run eager ("baseline" in the table) and
compiled ("current", inductor, before the warm-up: ``--compile step`` is
``eqloop.compile_model(model)``, the per-loop step, as ``eqloop train --compile`` runs it
at a random depth; ``--compile whole`` adds ``eqloop.training.whole_step.WholeStep``, the forward,
loss and jvp penalty as one graph for the fixed loop count, as ``eqloop train --compile``
runs it at a fixed depth; ``--compile model`` is ``torch.compile(model)``, the whole
forward), on
the ``train`` workload (``--workloads train stars`` adds the STARS step); the JSON also
holds each side's ``setup_s``: the wall time of building the model and running the
warm-up; ``setup_extra_s``, the compiled side's minus the eager side's, is the compile
time of all workloads, and ``compile_s`` per workload the compiled side's first call
minus the eager side's (the compile time of that workload's graphs).

Usage:
    OMP_NUM_THREADS=1 python benchmarks/speed_regression.py --compile step --loops 8 \\
        --json benchmarks/results/compiled_train_step.json   # eager vs compiled step
    OMP_NUM_THREADS=1 python benchmarks/speed_regression.py --compile step --loops 8 \\
        --workloads train stars --json benchmarks/results/compiled_stars_step.json
    OMP_NUM_THREADS=1 python benchmarks/speed_regression.py --compile whole --loops 8 \\
        --workloads train stars --json benchmarks/results/compiled_whole_step.json
    OMP_NUM_THREADS=1 python benchmarks/speed_regression.py \\
        --json benchmarks/results/speed_regression.json      # a few minutes
    python benchmarks/speed_regression.py --quick --baseline HEAD   # seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Any, cast

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    command_line,
    format_table,
    machine_info,
    print_written,
    write_json_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("train", "solve")
COMPILE_WORKLOADS = ("train", "stars")
DEFAULT_BASELINE = "99a4b31"  # main before the issue-9 redesign of the loop and the backward

COLUMNS = [
    ("workload", "workload", ""),
    ("baseline_ms", "baseline CPU ms", ".2f"),
    ("current_ms", "current CPU ms", ".2f"),
    ("ratio", "current / baseline", ".3f"),
    ("paired_ratio", "median round ratio", ".3f"),
    ("wall_ratio", "wall-time ratio", ".3f"),
    ("runs", "runs per tree", "d"),
]
COMPILE_COLUMNS = [
    ("compile_s", "compile s (first call)", ".1f"),
    ("setup_extra_s", "compile s (extra set-up)", ".1f"),
]

# The worker: builds the workloads from the tree on its PYTHONPATH, then answers one
# JSON request per line ({"workload": ..., "repeats": n}) with n [cpu, wall] times.
WORKER = r"""
import dataclasses, json, sys, time
start = time.perf_counter()
import torch
try:
    from eqloop.training.config import TrainConfig
    from eqloop.models.looplm.modeling import LoopLM
    from eqloop.recipes.train import train_step
except ImportError:  # a baseline revision from before the package layout of 2026-12-06
    from eqloop.config import TrainConfig
    from eqloop.model import LoopLM
    from eqloop.train import train_step

settings = json.loads(sys.argv[1])
torch.set_num_threads(settings["threads"])
torch.manual_seed(0)
config = TrainConfig()
model = LoopLM(config.model)
net = model  # what the training step runs forward
whole = None  # --compile whole: the fixed-depth loss compiled as one graph
if settings["compile"] in ("step", "whole"):
    from eqloop import compile_model
    compile_model(model, backend=settings["backend"])
elif settings["compile"] == "model":
    net = torch.compile(model, backend=settings["backend"])
if settings["compile"] == "whole":
    from eqloop.training.whole_step import WholeStep
    whole = WholeStep(model, lam=config.lam, backend=settings["backend"])
step_options = {} if whole is None else {"whole": whole}  # older trees lack the keyword
optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
g = torch.Generator().manual_seed(1)
inputs = torch.randint(0, config.model.vocab_size, (settings["batch"], 13), generator=g)
targets = torch.randint(0, config.model.vocab_size, (settings["batch"], 13), generator=g)
targets[:, :8] = -100
eval_model = LoopLM(config.model).eval()
# STARS: eagerly the paper's vjp penalty; compiled the jvp penalty, compiled as a whole.
compiled = settings["compile"] is not None
if "stars" in settings["workloads"]:  # older trees lack penalty_product
    stars_config = dataclasses.replace(
        config, penalty_product="jvp" if compiled else "vjp", compile=compiled
    )
pen_gen = torch.Generator().manual_seed(2)

def train():
    train_step(net, model, optimizer, inputs, targets, settings["loops"], config,
               penalty_on=False, **step_options)

def solve():
    with torch.no_grad():
        eval_model(inputs, solver="anderson", max_iter=settings["solve_iters"], tol=0.0)

def stars():
    train_step(net, model, optimizer, inputs, targets, settings["loops"], stars_config,
               penalty_on=True, generator=pen_gen, **step_options)

work = {"train": train, "solve": solve, "stars": stars}
first_call = {}
for i in range(settings["warmup"]):
    for name in settings["workloads"]:
        wall = time.perf_counter()
        work[name]()
        if i == 0:
            first_call[name] = time.perf_counter() - wall
ready = {"ready": True, "setup_s": time.perf_counter() - start, "first_call_s": first_call}
print(json.dumps(ready), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    fn, times = work[request["workload"]], []
    for _ in range(request["repeats"]):
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        times.append([time.process_time() - cpu, time.perf_counter() - wall])
    print(json.dumps(times), flush=True)
"""


class Worker:
    """A persistent timing process running the workloads of one tree."""

    def __init__(self, tree: Path, settings: dict[str, Any]) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(settings["threads"])}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(settings)],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.stdin = cast(IO[str], self.proc.stdin)  # both are pipes (PIPE above)
        self.stdout = cast(IO[str], self.proc.stdout)
        ready = self._read()  # the "ready" line, after the warm-up
        self.setup_s, self.first_call_s = ready["setup_s"], ready["first_call_s"]

    def _read(self) -> Any:
        line = self.stdout.readline()
        if not line:
            raise RuntimeError(f"a timing worker exited with code {self.proc.wait()}")
        return json.loads(line)

    def time(self, workload: str, repeats: int) -> list[list[float]]:
        """``repeats`` pairs of CPU and wall time (seconds) of ``workload``."""
        self.stdin.write(json.dumps({"workload": workload, "repeats": repeats}) + "\n")
        self.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(timeout=60)


def git(*args: str) -> str:
    """Output of a git command run in the repository."""
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"speed_regression: git {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def extract(revision: str, into: Path) -> str:
    """Write the ``eqloop`` and ``solvers`` packages of ``revision`` into ``into``.

    Returns:
        The full commit hash of ``revision``.
    """
    commit = git("rev-parse", "--verify", f"{revision}^{{commit}}")
    archive = into / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(
            ["git", "archive", commit, "eqloop", "solvers"], cwd=ROOT, stdout=out, check=True
        )
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(archive) as tar:
        tar.extractall(into, **safe)
    archive.unlink()
    return commit


def measure(trees: dict[str, Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Interleaved timings of every workload on both trees; one row per workload."""
    workloads = tuple(args.workloads)
    settings = dict(
        threads=args.threads,
        batch=args.batch,
        loops=args.loops,
        solve_iters=args.solve_iters,
        warmup=args.warmup,
        workloads=workloads,
        backend=args.backend,
    )
    workers = {
        name: Worker(tree, {**settings, "compile": args.compile if name == "current" else None})
        for name, tree in trees.items()
    }
    setup = {name: worker.setup_s for name, worker in workers.items()}
    first = {name: worker.first_call_s for name, worker in workers.items()}
    times: dict[tuple[str, str], list[list[float]]] = {
        (name, w): [] for name in trees for w in workloads
    }
    round_ratios: dict[str, list[float]] = {w: [] for w in workloads}
    try:
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for workload in workloads:
                medians = {}
                for name in order:
                    got = workers[name].time(workload, args.repeats)
                    times[name, workload] += got
                    medians[name] = statistics.median(cpu for cpu, _ in got)
                round_ratios[workload].append(medians["current"] / medians["baseline"])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    rows = []
    for workload in workloads:
        (base_cpu, base_wall), (cur_cpu, cur_wall) = (
            [[t[i] for t in times[name, workload]] for i in (0, 1)]
            for name in ("baseline", "current")
        )
        rows.append(
            {
                "workload": workload,
                "baseline_ms": 1e3 * statistics.median(base_cpu),
                "current_ms": 1e3 * statistics.median(cur_cpu),
                "ratio": statistics.median(cur_cpu) / statistics.median(base_cpu),
                "paired_ratio": statistics.median(round_ratios[workload]),
                "wall_ratio": statistics.median(cur_wall) / statistics.median(base_wall),
                "runs": len(cur_cpu),
                "baseline_setup_s": setup["baseline"],
                "current_setup_s": setup["current"],
                "setup_extra_s": setup["current"] - setup["baseline"],  # --compile: compiling
                "baseline_first_call_s": first["baseline"].get(workload),
                "current_first_call_s": first["current"].get(workload),
                "compile_s": (
                    first["current"][workload] - first["baseline"][workload]
                    if workload in first["current"]
                    else None
                ),
                "baseline_cpu_s": base_cpu,
                "current_cpu_s": cur_cpu,
                "baseline_wall_s": base_wall,
                "current_wall_s": cur_wall,
            }
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per tree and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs of each workload")
    p.add_argument("--batch", type=int, default=64, help="sequences per batch (TrainConfig)")
    p.add_argument("--loops", type=int, default=4, help="unrolled loops of the training step")
    p.add_argument("--solve-iters", type=int, default=30, help="Anderson iterations")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny run for tests (seconds)")
    p.add_argument(
        "--compile",
        choices=("step", "whole", "model"),
        help="compare this tree eager (baseline) with compiled (current) instead of a "
        "revision: 'step' = eqloop.compile_model (the per-loop step, what --compile of the "
        "eqloop commands does at a random depth), 'whole' = that and "
        "eqloop.training.whole_step.WholeStep "
        "(forward, loss and jvp penalty as one graph per loop count, what eqloop train "
        "--compile does at a fixed depth), 'model' = torch.compile(model) (the whole forward, "
        "one graph per loop count)",
    )
    p.add_argument(
        "--workloads",
        nargs="+",
        choices=WORKLOADS + COMPILE_WORKLOADS[1:],
        help="workloads to time (default: train solve; with --compile: train); stars needs "
        "--compile",
    )
    p.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend of --compile (tests: aot_eager)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.repeats, args.warmup, args.batch, args.solve_iters = 2, 2, 1, 8, 5
    for name in ("rounds", "repeats", "batch", "loops", "solve_iters", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    allowed = COMPILE_WORKLOADS if args.compile else WORKLOADS
    if args.workloads is None:
        args.workloads = ["train"] if args.compile else list(WORKLOADS)
    for name in args.workloads:
        if name not in allowed:
            p.error(f"--workloads {name} needs {'no ' if args.compile else ''}--compile")
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1 (the first call compiles)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Extract the baseline, time both trees, print the table, write JSON when asked."""
    args = parse_args(argv)
    if args.compile:  # one tree, eager against compiled
        baseline_commit = "eager"
        rows = measure({"baseline": ROOT, "current": ROOT}, args)
    else:
        with tempfile.TemporaryDirectory(prefix="eqloop-baseline-") as tmp:
            baseline_commit = extract(args.baseline, Path(tmp))
            rows = measure({"baseline": Path(tmp), "current": ROOT}, args)
    print(format_table(rows, COLUMNS + COMPILE_COLUMNS if args.compile else COLUMNS))
    dirty = bool(git("status", "--porcelain", "--", "eqloop", "solvers"))
    result = {
        "machine": machine_info(),
        "command": shlex.quote(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}")
        + " "
        + command_line("benchmarks/speed_regression.py", argv),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "baseline_commit": baseline_commit,
        "current_commit": git("rev-parse", "HEAD") + ("+uncommitted" if dirty else ""),
        "results": rows,
    }
    if args.json:
        write_json_atomic(args.json, result)
        print_written(args.json)
    return result


if __name__ == "__main__":
    main()
