"""Memory, time and gradient quality of a LoopLM training step against loop count.

For every backward mode of ``eqloop.fixed_point`` and every loop count T, one training
step of a LoopLM (inject -> fixed_point over the core -> readout -> cross-entropy ->
backward) is measured:

  saved     bytes autograd saves for backward, counted with
            ``torch.autograd.graph.saved_tensors_hooks`` during the forward pass: the
            total size of the distinct storages packed (a storage saved by several ops,
            or through several views, counts once; parameter storages are left out as
            they exist anyway). Exact and device-independent.
  peak      extra tensor memory of the whole step (forward and backward) above what was
            allocated before it: ``benchmarks.common.PeakMemory``, which follows every
            storage the step's ops create until it is freed. Device-independent; it
            includes the solver's workspace and the adjoint solve's buffers.
  rss       rise of the process's resident memory during the step, the honest "process"
            figure on CPU: the kernel's high-water mark (VmHWM) is reset to the current
            RSS by writing 5 to /proc/self/clear_refs (Linux >= 4.0), glibc's free lists
            are trimmed first (malloc_trim) so the baseline is live memory, and the
            figure is VmHWM after the step minus RSS before it. Includes allocator
            overheads and fragmentation. On CUDA it is ``max_memory_allocated`` minus
            ``memory_allocated`` before the step. "-" where neither is available.
  time      median wall time of ``--repeats`` steps after one warm-up step.

What "loops" T means per mode (``tol=0``, so every budget runs in full; the forward
solver is ``--solver``, plain iteration by default, so every mode takes the same T
forward loops and only the graph differs):

  ift        the solver's budget ``max_iter=T`` without a graph, one more application of
             f with a graph, and an adjoint solve in backward (``eqloop.IFT()``'s
             defaults: relative tolerance 1.2e-6 in float32, at most 100 VJPs).
  phantom    ``max_iter=T`` without a graph, then ``Phantom().steps`` (5) steps with one.
  truncated  T loops: T - 8 of the solver without a graph, then 8 with one (all T loops
             when T <= 8; ``Truncated().k`` is 8).
  unroll     T plain loops, all with a graph.

Gradient agreement "at convergence" is measured separately: each mode runs to
``--agree-tol`` (budget ``--agree-max-iter``) and its gradient over all parameters is
compared with ``unroll`` run to the same tolerance (cosine and relative error
``||g - g_ref|| / ||g_ref||``), and with ``ift``. ``phantom`` is reported at its default
damping (tau=1) and at tau=0.5.

The model is a LoopLM with concat injection whose state half of the adapter is scaled by
``--state-scale`` and whose embeddings are scaled by ``--embed-scale``, so that the core
contracts (about 0.5 per loop by default) like a trained, stable model; a randomly
initialised core does not converge, which would make "at convergence" meaningless. The
memory and time figures do not depend on these scales.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/memory_depth.py --json out/memory_depth.json \\
        --plot out/memory_depth.png          # d=256, seq 32, batch 32 (a few minutes)
    python benchmarks/memory_depth.py --quick --json out.json --plot out.png   # seconds
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    PeakMemory,
    format_table,
    int_list,
    machine_info,
    median_time,
    print_written,
    write_json_atomic,
)
from eqloop.core.backward import BACKWARD_MODES, Phantom
from eqloop.core.implicit import fixed_point
from eqloop.files import write_figure_atomic
from eqloop.models.looplm.modeling import LoopLM, LoopLMConfig
from eqloop.plotting import pyplot

MiB = 2.0**20

DEPTH_COLUMNS = [
    ("mode", "mode", ""),
    ("loops", "loops", "d"),
    ("grad_steps", "graph loops", "d"),
    ("saved_mib", "saved MiB", ".2f"),
    ("peak_mib", "peak MiB", ".2f"),
    ("rss_mib", "RSS rise MiB", ".1f"),
    ("time_s", "step s", ".3f"),
    ("backward_nfe", "adjoint VJPs", "d"),
    ("warnings", "warnings", "d"),
]

AGREE_COLUMNS = [
    ("mode", "mode", ""),
    ("cos_vs_unroll", "cos vs unroll", ".8f"),
    ("rel_err_vs_unroll", "rel err vs unroll", ".2e"),
    ("cos_vs_ift", "cos vs ift", ".8f"),
    ("rel_err_vs_ift", "rel err vs ift", ".2e"),
    ("forward_nfe", "forward f-evals", "d"),
    ("grad_steps", "graph loops", "d"),
    ("backward_nfe", "adjoint VJPs", "d"),
]


# ------------------------------------------------------------------------- the problem


def build_model(args: argparse.Namespace) -> LoopLM:
    """A LoopLM whose core contracts (see the module docstring), in eval mode."""
    torch.manual_seed(args.seed)
    config = LoopLMConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_heads=args.heads,
        d_ff=args.d_ff,
        max_seq_len=args.seq_len,
        injection="concat",
    )
    model = LoopLM(config).to(device=args.device, dtype=args.dtype).eval()
    with torch.no_grad():
        model.injection.adapter.weight[:, : args.d_model] *= args.state_scale
        model.tok_emb.weight *= args.embed_scale
    return model


def make_batch(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    """Random token ids and next-token targets, each (batch, seq_len)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)
    tokens = tokens.to(args.device)
    return tokens[:, :-1], tokens[:, 1:]


def depth_options(mode: str, loops: int, args: argparse.Namespace) -> dict[str, Any]:
    """``fixed_point`` keywords that run exactly ``loops`` forward loops in ``mode``."""
    solver = "fixed_point" if mode == "unroll" else args.solver
    return dict(backward=mode, solver=solver, max_iter=loops, tol=0.0)


def loss_and_info(
    model: LoopLM, tokens: Tensor, targets: Tensor, options: dict[str, Any]
) -> tuple[Tensor, Any]:
    """Cross-entropy of the equilibrium-mode LoopLM and the ``FixedPointInfo``."""
    f, z0 = model.core_map(tokens)
    z, info = fixed_point(f, z0, return_result=True, **options)
    logits = model.readout(z)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), info


def train_step(model: LoopLM, tokens: Tensor, targets: Tensor, options: dict[str, Any]) -> Any:
    """Forward and backward once; returns the ``FixedPointInfo``."""
    model.zero_grad(set_to_none=True)
    loss, info = loss_and_info(model, tokens, targets, options)
    loss.backward()
    return info


# ------------------------------------------------------------------------- the meters


def saved_bytes(model: nn.Module | None, forward: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for the backward during ``forward()``.

    Each storage counts once however many saved tensors view it.

    Args:
        model: its parameters are not counted (they exist whatever the depth); None
            counts every saved storage.
        forward: builds the graph, e.g. ``lambda: model(tokens)``; its result is dropped.

    Returns:
        The bytes saved, an int.
    """
    params = (
        set() if model is None else {p.untyped_storage().data_ptr() for p in model.parameters()}
    )
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


class ProcessPeak:
    """Rise of process memory during a block (see "rss" in the module docstring)."""

    _STATUS = Path("/proc/self/status")
    _CLEAR_REFS = Path("/proc/self/clear_refs")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.libc = _glibc()
        self.available = device.type == "cuda" or self._can_reset_hwm()
        self.before = 0

    def _can_reset_hwm(self) -> bool:
        try:
            self._CLEAR_REFS.write_text("5")
            return self._read("VmHWM") > 0
        except OSError:
            return False

    def _read(self, field: str) -> int:
        match = re.search(rf"^{field}:\s+(\d+) kB", self._STATUS.read_text(), re.MULTILINE)
        return int(match.group(1)) * 1024 if match else 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        if self.libc is not None:
            self.libc.malloc_trim(0)
        self._CLEAR_REFS.write_text("5")
        self.before = self._read("VmRSS")

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.before
        return self._read("VmHWM") - self.before


def _glibc() -> Any:
    """glibc, for ``malloc_trim``; None on other C libraries."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


# ----------------------------------------------------------------------- measurements


def measure_config(
    model: LoopLM,
    batch: tuple[Tensor, Tensor],
    options: dict[str, Any],
    args: argparse.Namespace,
    process: ProcessPeak,
) -> dict[str, Any]:
    """Saved bytes, peak memory, RSS rise and step time of one (mode, loops) setting."""
    tokens, targets = batch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = train_step(model, tokens, targets, options)  # warm-up, and the info
        saved = saved_bytes(model, lambda: loss_and_info(model, tokens, targets, options))
        with PeakMemory() as peak:
            train_step(model, tokens, targets, options)
        rss = None
        if process.available:
            process.start()
            train_step(model, tokens, targets, options)
            rss = process.stop()
        seconds = median_time(
            lambda: _synced(model, tokens, targets, options, args.device),
            args.repeats,
            warmup=0,
        )
    return {
        "grad_steps": info.grad_steps,
        "saved_bytes": saved,
        "saved_mib": saved / MiB,
        "peak_bytes": peak.peak_bytes,
        "peak_mib": peak.peak_bytes / MiB,
        "rss_bytes": rss,
        "rss_mib": None if rss is None else rss / MiB,
        "time_s": seconds,
        "forward_nfe": None if info.forward is None else info.forward.nfe,
        "backward_nfe": None if info.backward is None else info.backward.nfe,
        "backward_status": None if info.backward is None else info.backward.status,
        "warnings": len(caught),
        "warning_messages": sorted({str(w.message) for w in caught}),
    }


def _synced(
    model: LoopLM, tokens: Tensor, targets: Tensor, options: dict[str, Any], device: torch.device
) -> None:
    train_step(model, tokens, targets, options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_depth(
    model: LoopLM, batch: tuple[Tensor, Tensor], args: argparse.Namespace, progress: tqdm
) -> list[dict[str, Any]]:
    """One row per (mode, loops)."""
    process = ProcessPeak(args.device)
    rows = []
    for mode in args.modes:
        for loops in args.loops:
            progress.set_postfix_str(f"{mode} x{loops}")
            options = depth_options(mode, loops, args)
            row = {"mode": mode, "loops": loops, **options}
            row.update(measure_config(model, batch, options, args, process))
            rows.append(row)
            progress.update()
    return rows


def agreement_variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``fixed_point`` keywords of every mode run to convergence."""
    forward = dict(solver=args.solver, max_iter=args.agree_max_iter, tol=args.agree_tol)
    return {
        "unroll": dict(
            backward="unroll",
            solver="fixed_point",
            max_iter=args.agree_max_iter,
            tol=args.agree_tol,
        ),
        "ift": dict(backward="ift", **forward),
        "phantom": dict(backward="phantom", **forward),
        "phantom(tau=0.5)": dict(backward=Phantom(tau=0.5), **forward),
        "truncated": dict(backward="truncated", **forward),
    }


def measure_agreement(
    model: LoopLM, batch: tuple[Tensor, Tensor], args: argparse.Namespace, progress: tqdm
) -> list[dict[str, Any]]:
    """Gradient of every mode at convergence against ``unroll`` and ``ift``."""
    grads, infos = {}, {}
    for name, options in agreement_variants(args).items():
        progress.set_postfix_str(f"agreement {name}")
        infos[name] = train_step(model, *batch, options)
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
        progress.update()
    rows = []
    for name, g in grads.items():
        info = infos[name]
        rows.append(
            {
                "mode": name,
                "cos_vs_unroll": _cosine(g, grads["unroll"]),
                "rel_err_vs_unroll": _rel_err(g, grads["unroll"]),
                "cos_vs_ift": _cosine(g, grads["ift"]),
                "rel_err_vs_ift": _rel_err(g, grads["ift"]),
                "forward_nfe": None if info.forward is None else info.forward.nfe,
                "forward_status": None if info.forward is None else info.forward.status,
                "forward_max_rel_residual": None
                if info.forward is None
                else float(info.forward.rel_residual.max()),
                "grad_steps": info.grad_steps,
                "backward_nfe": None if info.backward is None else info.backward.nfe,
                "backward_status": None if info.backward is None else info.backward.status,
            }
        )
    return rows


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def _rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def summarize(rows: list[dict[str, Any]], loops: list[int]) -> dict[str, Any]:
    """Growth of saved memory per mode and the unroll / ift ratios at the deepest setting."""
    by = {(r["mode"], r["loops"]): r for r in rows}
    lo, hi = min(loops), max(loops)
    modes = sorted({r["mode"] for r in rows}, key=list(BACKWARD_MODES).index)
    summary: dict[str, Any] = {
        f"saved_ratio_{hi}_over_{lo}": {
            m: by[m, hi]["saved_bytes"] / by[m, lo]["saved_bytes"] for m in modes
        },
        f"peak_ratio_{hi}_over_{lo}": {
            m: by[m, hi]["peak_bytes"] / by[m, lo]["peak_bytes"] for m in modes
        },
    }
    if {"unroll", "ift"} <= set(modes):
        unroll, ift = by["unroll", hi], by["ift", hi]
        summary[f"unroll_over_ift_at_{hi}"] = {
            key: unroll[key] / ift[key]
            for key in ("saved_bytes", "peak_bytes", "rss_bytes", "time_s")
            if unroll[key] and ift[key]
        }
    return summary


# -------------------------------------------------------------------------- reporting


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Saved MiB, peak MiB and step time against loops, one line per mode (log-log)."""
    plt = pyplot()

    panels = [
        ("saved_mib", "saved for backward (MiB)"),
        ("peak_mib", "peak tensor memory (MiB)"),
        ("time_s", "step time (s)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    modes = sorted({r["mode"] for r in rows}, key=list(BACKWARD_MODES).index)
    for ax, (key, label) in zip(axes, panels, strict=True):
        for mode in modes:
            pts = sorted((r["loops"], r[key]) for r in rows if r["mode"] == mode)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # linear growth is a slope-1 line, constant memory is flat
        ax.set_xlabel("loops")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    write_figure_atomic(path, fig, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--modes", default=",".join(BACKWARD_MODES), help="comma-separated modes")
    p.add_argument("--loops", default="4,8,16,32,64", help="comma-separated loop counts")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32)
    p.add_argument(
        "--state-scale",
        type=float,
        default=0.5,
        help="scale of the state half of the concat adapter (contraction)",
    )
    p.add_argument("--embed-scale", type=float, default=50.0, help="scale of the embeddings")
    p.add_argument(
        "--solver", default="fixed_point", help="forward solver of ift / phantom / truncated"
    )
    p.add_argument(
        "--agree-tol",
        type=float,
        default=None,
        help="tolerance of the agreement runs (default 1e-6 float32, 1e-11 float64)",
    )
    p.add_argument("--agree-max-iter", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--plot", default=None, help="write memory/time-vs-loops plot (PNG)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and one repeat: finishes in seconds (used by tests)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.heads, args.d_ff, args.seq_len, args.batch = 32, 2, 64, 8, 4
        args.repeats = 1
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(args.modes) - set(BACKWARD_MODES))
    if unknown:
        p.error(f"unknown mode(s) {unknown}; valid: {', '.join(BACKWARD_MODES)}")
    try:
        args.loops = sorted(set(int_list(args.loops, "--loops", 1)))
    except ValueError as error:
        p.error(str(error))
    args.dtype = getattr(torch, args.dtype)
    args.device = torch.device(args.device)
    if args.agree_tol is None:
        args.agree_tol = 1e-11 if args.dtype == torch.float64 else 1e-6
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the measurements, print the tables, and write JSON / plot when asked."""
    args = parse_args(argv)
    model = build_model(args)
    batch = make_batch(args)
    total = len(args.modes) * len(args.loops) + len(agreement_variants(args))
    with tqdm(total=total, desc="memory_depth", disable=None) as progress:
        depth = measure_depth(model, batch, args, progress)
        agreement = measure_agreement(model, batch, args, progress)
    summary = summarize(depth, args.loops)
    print(format_table(depth, DEPTH_COLUMNS))
    print()
    print(format_table(agreement, AGREE_COLUMNS))
    print()
    for key, values in summary.items():
        print(f"{key}: " + ", ".join(f"{k}={v:.3g}" for k, v in values.items()))
    settings = {
        k: str(v) if isinstance(v, (torch.dtype, torch.device)) else v
        for k, v in vars(args).items()
    }
    result = {
        "machine": machine_info(),
        "settings": settings,
        "depth": depth,
        "agreement": agreement,
        "summary": summary,
    }
    if args.json:
        write_json_atomic(args.json, result)
    if args.plot:
        plot(depth, args.plot)
    print_written(args.json, args.plot)
    return result


if __name__ == "__main__":
    main()
