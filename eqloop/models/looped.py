"""The looped-LM protocol: the stages a model implements and the loop every model shares.

A looped language model (B = batch, S = sequence length, d = state width)::

    tokens (B, S) -> inject -> x (B, S, d)             stage, per model
    z0 = initial_state(x)                              stage, per model
    z <- core_step(z, *step_args(x))                   stage, per model; the map f(z)
         T times (unrolled) or to a fixed point z*     shared: LoopedLM.forward
    readout(z) -> logits (B, S, V)                     stage, per model

:class:`LoopedLM` holds the shared part: :meth:`~LoopedLM.core_map` hands out the map
``f`` that solvers, backward modes, spectral-radius estimates and the STARS penalty all
use; :meth:`~LoopedLM.loop` runs it unrolled through the solvers driver (plain
iteration; optional truncated backprop ``backward=eqloop.Truncated(k)``, per-loop gradient
checkpointing, a per-state hook, per-sequence early exit), and every unrolled caller
(:meth:`~LoopedLM.unroll`, :meth:`~LoopedLM.forward`, fine-tuning, diagnostics) goes
through it; :meth:`~LoopedLM.forward` also solves it to equilibrium through
:func:`eqloop.fixed_point` with a backward mode. eqloop's own
:class:`~eqloop.models.looplm.modeling.LoopLM` and the pretrained architectures subclass it.

Subclass-specific keywords (an attention mask, an initial-state scale) are declared in
``stage_options``; ``forward``, ``core_map`` and ``unroll`` pass them to every stage
(``inject``, ``initial_state``, ``step_args``, ``readout``), whose signatures then take
them as keywords. Per-sample tensors the core needs besides ``z`` (the injection ``x``,
a mask) come from ``step_args`` so that a solver can drop converged sequences.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import solvers
from eqloop.core.backward import (
    DEFAULT_BACKWARD,
    Backward,
    FixedPointInfo,
    Truncated,
    make_backward,
    plain_loops,
)
from eqloop.core.defaults import EQUILIBRIUM_MAX_ITER, EQUILIBRIUM_STOP_MODE, EQUILIBRIUM_TOL
from eqloop.core.implicit import fixed_point
from solvers import FixedPointIteration, Solver, SolveResult, checks

__all__ = ["CoreMap", "LoopInfo", "LoopedLM", "all_true", "random_start"]


def all_true(ok: Tensor, message: str) -> bool:
    """Whether every element of the bool tensor ``ok`` is True, for value checks of inputs.

    Eager: one host read; the caller raises its own error (which may read the offending
    values). While ``torch.compile`` traces, a host read would split the graph, so the
    check goes into the graph as a device-side assert instead (``torch._assert_async``,
    which raises ``RuntimeError(message)`` when the compiled code runs on bad values)
    and this returns True.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(ok.all(), message)
        return True
    return bool(ok.all())


def random_start(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    generator: torch.Generator | None = None,
    share: float = 1.0,
) -> Tensor:
    """A random state at the scale of the loop's states, for a share of the sequences.

    The state is Gaussian with the per-token RMS of one loop from z0, ``g * rms(f(z0))``
    (``g`` standard normal, ``rms`` over the features of each token, computed without a
    graph): a start far from z0 but on the scale the map works at. A map whose fixed point
    is a function of its input reaches the same z*(x) from it; training on such starts
    (``TrainConfig.random_start``) asks the map for that (path independence, Anil et al.,
    NeurIPS 2022).

    Args:
        f: the batch's core map, (B, S, d) -> (B, S, d).
        z0: (B, S, d) the loop's initial state.
        generator: seeds the draws (on z0's device); the global RNG if None.
        share: probability, per sequence, of a random start; the others keep z0.

    Returns:
        (B, S, d) the start: the random state where drawn, z0 elsewhere.

    Raises:
        ValueError: ``share`` outside [0, 1].
    """
    share = checks.number("share", share, low=0.0, high=1.0)
    with torch.no_grad():
        z1 = f(z0)
    rms = z1.pow(2).mean(dim=-1, keepdim=True).sqrt()
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    if share == 1.0:
        return noise * rms
    drawn = torch.rand(z0.shape[0], generator=generator, device=z0.device) < share
    return torch.where(drawn[:, None, None], noise * rms, z0)


def _tracked_loops(loops: int, backward: str | Backward | None) -> int:
    """How many of ``loops`` unrolled loops run with a graph under ``backward``.

    ``None``: every loop; ``Truncated(k)`` (or ``"truncated"``): the last ``min(k, loops)``.
    """
    if backward is None:
        return loops
    mode = make_backward(backward)  # a name or a mode object; TypeError for anything else
    if not isinstance(mode, Truncated):
        raise ValueError(
            f"backward={mode!r} does not apply to unrolled loops: pass "
            "backward=eqloop.Truncated(k) to backpropagate through the last k loops only, "
            f"backward=None for every loop, or solver=... to take the {mode.name!r} "
            "gradient at a fixed point"
        )
    return min(mode.k, loops)


class _LoopStep:
    """``core_step`` as :meth:`LoopedLM.loop` runs it when an option is on.

    The driver calls it once per loop, in order; it counts the loops t = 1..T, runs the
    first ``free`` without a graph, checkpoints the others when asked (while grad mode is
    on), and hands each new state to ``on_state``.
    """

    def __init__(
        self,
        step: Callable[..., Tensor],
        free: int,
        checkpointed: bool,
        on_state: Callable[[int, Tensor], None] | None,
    ) -> None:
        self.step, self.free, self.checkpointed, self.on_state = step, free, checkpointed, on_state
        self.t = 0

    def __call__(self, z: Tensor, *args: Tensor) -> Tensor:
        """(B, S, d) state and ``step_args`` -> the next state (B, S, d)."""
        self.t += 1
        if self.t <= self.free:
            with torch.no_grad():
                z = self.step(z, *args)
        elif self.checkpointed and torch.is_grad_enabled():
            z = checkpoint(self.step, z, *args, use_reentrant=False)
        else:
            z = self.step(z, *args)
        if self.on_state is not None:
            self.on_state(self.t, z)
        return z


@dataclass(frozen=True)
class CoreMap:
    """The fixed-point map of one batch: ``f(z) = step(z, *args)``.

    Calling ``f(z)`` needs the whole batch, since ``args`` are the batch's. To let a
    solver drop converged rows, pass the parts instead:
    ``solvers.solve(f.step, z0, args=f.args, compact=True)``.

    Attributes:
        step: the model's ``core_step``: (B, S, d) states and per-sample ``args`` ->
            (B, S, d).
        args: per-sample tensors (batch dimension 0) that follow ``z``, e.g. ``(x,)``.
    """

    step: Callable[..., Tensor]
    args: tuple[Tensor, ...]

    def __call__(self, z: Tensor) -> Tensor:
        """(B, S, d) -> (B, S, d): one application of the core."""
        return self.step(z, *self.args)


@dataclass(frozen=True)
class LoopInfo:
    """What ``forward(..., return_info=True)`` reports besides the logits.

    Attributes:
        z: (B, S, d) the final state fed to ``readout`` (z_T, or z* in equilibrium mode).
        x: (B, S, d) the injected input.
        f: the batch's map (its value at ``z`` is one more loop).
        loops_used: (B,) int64 core applications per sequence (fewer than ``loops`` for
            sequences that exited early); ``None`` in equilibrium mode.
        result: the driver's ``SolveResult`` of the loop (residual per loop, status), or
            of the forward solve in equilibrium mode; ``None`` for ``loops=0``.
        fixed_point: equilibrium mode only: the ``FixedPointInfo`` (the adjoint solve
            appears in it after a backward pass).
    """

    z: Tensor
    x: Tensor
    f: CoreMap
    loops_used: Tensor | None
    result: SolveResult | None
    fixed_point: FixedPointInfo | None = None


class LoopedLM(nn.Module, abc.ABC):
    """Base class of looped LMs: subclasses implement the stages, this class the loop.

    Every method is batched over sequences and must never mix them (a solver may drop
    converged sequences from the batch), and nothing may be tied to a device or dtype.
    """

    #: Keywords of ``forward``/``core_map``/``unroll`` that go to the stages.
    stage_options: ClassVar[tuple[str, ...]] = ()
    #: Early exit: loops between host checks for finished sequences (which are then
    #: dropped from the working batch).
    exit_check_every: int = 4

    # -- the stages a model implements ---------------------------------------------------

    @property
    @abc.abstractmethod
    def default_loops(self) -> int:
        """Loops run by ``forward`` when ``loops`` is not given."""

    @abc.abstractmethod
    def inject(self, tokens: Tensor, **options: Any) -> Tensor:
        """(B, S) token ids -> x (B, S, d), the input the loop starts from or receives."""

    @abc.abstractmethod
    def initial_state(self, x: Tensor, **options: Any) -> Tensor:
        """x (B, S, d) -> z0 (B, S, d), the state the loop starts from."""

    @abc.abstractmethod
    def core_step(self, z: Tensor, *args: Tensor) -> Tensor:
        """One loop: z (B, S, d) and ``step_args`` -> the next state (B, S, d)."""

    @abc.abstractmethod
    def readout(self, z: Tensor, **options: Any) -> Tensor:
        """z (B, S, d) -> logits (B, S, V)."""

    def step_args(self, x: Tensor, **options: Any) -> tuple[Tensor, ...]:
        """Per-sample tensors ``core_step`` takes after ``z``; ``(x,)`` by default."""
        return (x,)

    # -- the shared loop -----------------------------------------------------------------

    def core_map(self, inputs: Tensor, **options: Any) -> tuple[CoreMap, Tensor]:
        """The fixed-point map of a batch and its starting point.

        Args:
            inputs: (B, S) token ids, or an injection ``x`` (B, S, d) from ``inject``.
            **options: the model's ``stage_options``.

        Returns:
            ``(f, z0)``: ``f`` maps (B, S, d) -> (B, S, d) (see :class:`CoreMap`); z0 is
            (B, S, d).
        """
        _, f, z0 = self._prepare(inputs, options)
        return f, z0

    def _prepare(
        self, inputs: Tensor, options: dict[str, Any], *, tokens_only: bool = False
    ) -> tuple[Tensor, CoreMap, Tensor]:
        """``(x, f, z0)`` of a batch: the injection, the map and the starting point.

        ``inputs`` are token ids, or (unless ``tokens_only``) a floating-point injection.
        """
        unknown = sorted(set(options) - set(self.stage_options))
        if unknown:
            raise TypeError(
                f"unknown argument(s) {unknown} for {type(self).__name__}; its stage options "
                f"are {list(self.stage_options)}"
            )
        if not tokens_only and isinstance(inputs, Tensor) and inputs.is_floating_point():
            x = inputs
        else:
            x = self.inject(inputs, **options)
        return (
            x,
            CoreMap(self.core_step, self.step_args(x, **options)),
            self.initial_state(x, **options),
        )

    def loop(
        self,
        f: CoreMap,
        z0: Tensor,
        loops: int,
        *,
        exit_threshold: float | None = None,
        backward: str | Backward | None = None,
        grad_checkpointing: bool = False,
        on_state: Callable[[int, Tensor], None] | None = None,
    ) -> SolveResult | None:
        """THE unrolled loop: ``loops`` iterations of ``f`` from ``z0`` through the solvers
        driver. Every unrolled caller (``forward``, ``unroll``, fine-tuning, diagnostics,
        trajectories) runs it.

        Without options every sequence runs every loop, with no host read: ``result.z``
        is ``f^loops(z0)``, differentiable through every loop when grad mode is on.
        ``backward`` and ``grad_checkpointing`` change the graph, never the values:

        * ``backward=eqloop.Truncated(k)``: the first ``loops - k`` loops run without a
          graph, the last ``min(k, loops)`` with one (Huginn's truncated backprop).
        * ``grad_checkpointing``: each loop with a graph is recomputed in the backward
          (``torch.utils.checkpoint``), so activation memory holds one loop's, not
          ``loops``'; only while grad mode is on.
        * ``on_state(t, z_t)`` is called for t = 0 (``z0``, before the first loop) and
          after every loop t = 1..T with the (B, S, d) state as the loop produced it (with
          its graph when it has one: ``detach()`` what you keep without training on it).
        * ``exit_threshold`` (> 0): a sequence stops once the step it just took is small,
          ``||z_t - z_{t-1}|| / (||z_t|| + eps) <= exit_threshold``, and keeps ``z_t``;
          every ``exit_check_every`` loops one host read drops the stopped sequences from
          the working batch (and ends the loop when none is left); differentiable too.
          Not with ``on_state``, which sees the whole batch at every loop.

        Args:
            f: the batch's map (from :meth:`core_map`).
            z0: (B, S, d) starting state.
            loops: number of loops T >= 0.
            exit_threshold: per-sequence early exit; ``None`` or 0 runs every loop.
            backward: ``None`` (backprop through every loop) or ``eqloop.Truncated(k)``
                (or its name ``"truncated"`` for k = 8).
            grad_checkpointing: recompute each loop in the backward.
            on_state: per-state hook ``(t, z_t) -> None`` for diagnostics.

        Returns:
            The driver's result (``z``, ``nstep`` = loops per sequence, the residual of
            every loop), or ``None`` when ``loops`` is 0.

        Raises:
            TypeError: ``backward`` is not a backward mode, ``grad_checkpointing`` not a
                bool, or ``on_state`` not callable.
            ValueError: a backward mode other than ``Truncated``, or ``on_state`` together
                with ``exit_threshold``.
        """
        free = loops - _tracked_loops(loops, backward)
        checks.boolean("grad_checkpointing", grad_checkpointing)
        if on_state is not None:
            if not callable(on_state):
                raise TypeError(
                    f"on_state must be a function (t, z_t) -> None, got {type(on_state).__name__}"
                )
            if exit_threshold:
                raise ValueError(
                    "on_state sees the whole batch after every loop, but exit_threshold drops "
                    "finished sequences from it: pass one of them"
                )
            on_state(0, z0)
        if loops == 0:
            return None
        step = f.step
        if free or grad_checkpointing or on_state is not None:
            step = _LoopStep(f.step, free, grad_checkpointing, on_state)
        if not exit_threshold:
            return plain_loops(step, z0, loops, f.args)
        return solvers.solve(
            step,
            z0,
            FixedPointIteration(),
            max_iter=loops,
            tol=exit_threshold,
            stop_mode="rel",
            args=f.args,
            output="last",
            diverge_ratio=math.inf,
            check_every=self.exit_check_every,
            compact=True,
        )

    def unroll(
        self,
        inputs: Tensor,
        loops: int,
        *,
        return_states: bool = False,
        backward: str | Backward | None = None,
        grad_checkpointing: bool = False,
        on_state: Callable[[int, Tensor], None] | None = None,
        **options: Any,
    ) -> Tensor | list[Tensor]:
        """Apply the core ``loops`` times from z0 (through :meth:`loop`).

        Args:
            inputs: (B, S) token ids, or a (B, S, d) injection ``x``.
            loops: number of core applications T >= 0.
            return_states: return the whole trajectory instead of the last state.
            backward, grad_checkpointing, on_state: see :meth:`loop`.
            **options: the model's ``stage_options``.

        Returns:
            z_T of shape (B, S, d), or the list ``[z_0, z_1, ..., z_T]`` (T + 1 tensors).
        """
        loops = checks.integer("loops", loops, low=0)
        checks.boolean("return_states", return_states)
        f, z0 = self.core_map(inputs, **options)
        states: list[Tensor] = []
        hook = on_state
        if return_states:

            def hook(t: int, z: Tensor) -> None:
                states.append(z)
                if on_state is not None:
                    on_state(t, z)

        result = self.loop(
            f, z0, loops, backward=backward, grad_checkpointing=grad_checkpointing, on_state=hook
        )
        if return_states:
            return states
        return z0 if result is None else result.z

    def forward(
        self,
        tokens: Tensor,
        loops: int | None = None,
        *,
        solver: str | Solver | None = None,
        backward: str | Backward | None = None,
        tol: float | None = None,
        max_iter: int | None = None,
        stop_mode: str | None = None,
        start_loops: int | None = None,
        start: Callable[[CoreMap, Tensor], Tensor] | None = None,
        exit_threshold: float | None = None,
        return_info: bool = False,
        **options: Any,
    ) -> Tensor | tuple[Tensor, LoopInfo]:
        """Logits of every position, unrolled for ``loops`` steps or solved to equilibrium.

        Unrolled (``solver=None``): z0 -> core applied ``loops`` times -> readout;
        ``loops=None`` means ``default_loops`` and ``loops=0`` skips the core.
        Equilibrium (``solver`` given): ``z* = eqloop.fixed_point(core_step, z0, ...)``,
        differentiable with the chosen ``backward`` mode.

        Args:
            tokens: (B, S) integer token ids.
            loops: number of core applications (unrolled mode only).
            solver: a registered solver name (e.g. ``"anderson"``) or a solver object;
                switches on equilibrium mode.
            backward: a backward mode object or name. Unrolled: ``None`` (every loop)
                or ``eqloop.Truncated(k)``, the last k loops only (see :meth:`loop`).
                Equilibrium: any mode (``eqloop.IFT(...)``, ...); ``"ift"`` by default.
            tol: equilibrium mode only, like the next three: solver tolerance (default
                ``eqloop.core.defaults.EQUILIBRIUM_TOL``).
            max_iter: solver budget (default ``eqloop.core.defaults.EQUILIBRIUM_MAX_ITER``).
            stop_mode: ``"rel"`` or ``"abs"`` residual (default ``"rel"``).
            start_loops: plain loops run before the solver starts, default 0; with a
                graph only when the backward's gradient reaches the solve's start
                (``Unroll``; ``Truncated`` with ``k >= max_iter``), not for IFT or
                phantom. Without input injection the core does not see the input, so
                the start selects which fixed point the solver finds: a few loops put
                it in the basin of the loop's own limit.
            start: ``(f, z0) -> z`` replaces the model's initial state by ``z`` (B, S, d)
                before the loops or the solve, e.g. ``functools.partial(random_start,
                share=0.5)``; None keeps z0.
            exit_threshold: unrolled mode only; per-sequence early exit (see
                :meth:`loop`); ``info.loops_used`` has the counts.
            return_info: also return a :class:`LoopInfo`.
            **options: the model's ``stage_options``; in equilibrium mode also the
                solver's hyperparameters and driver options (e.g. ``m=6``,
                ``compact=True``), passed on to ``fixed_point``.

        Returns:
            logits (B, S, V), or ``(logits, info)`` if ``return_info``.

        Raises:
            TypeError: bad token dtype, unknown keywords, or equilibrium options without
                a solver.
            ValueError: bad token values or shape, ``loops < 0``, or options that do not
                belong to the chosen mode (a backward mode other than ``Truncated``
                with unrolled loops).
        """
        stage = {k: options.pop(k) for k in self.stage_options if k in options}
        checks.boolean("return_info", return_info)
        if solver is None:
            self._check_unrolled_options(
                dict(
                    tol=tol,
                    max_iter=max_iter,
                    stop_mode=stop_mode,
                    start_loops=start_loops,
                ),
                options,
            )
            loops = self.default_loops if loops is None else checks.integer("loops", loops, low=0)
            if exit_threshold is not None:
                exit_threshold = checks.number("exit_threshold", exit_threshold, low=0.0)
            x, f, z0 = self._prepare(tokens, stage, tokens_only=True)
            z0 = self._start(start, f, z0)
            result = self.loop(f, z0, loops, exit_threshold=exit_threshold, backward=backward)
            if result is None:
                z, loops_used = z0, torch.zeros(z0.shape[0], dtype=torch.long, device=z0.device)
            else:
                z, loops_used = result.z, result.nstep
            solve_info = None
        else:
            if loops is not None:
                raise ValueError("loops and solver are mutually exclusive: pass one of them")
            if exit_threshold is not None:
                raise ValueError("exit_threshold applies to unrolled loops, not to solver=...")
            if backward is not None:
                options["backward"] = backward
            start_loops = (
                0 if start_loops is None else checks.integer("start_loops", start_loops, low=0)
            )
            x, f, z0 = self._prepare(tokens, stage, tokens_only=True)
            z0 = self._start(start, f, z0)
            if start_loops:
                # Their graph only where the backward's gradient reaches the solve's start.
                budget = EQUILIBRIUM_MAX_ITER if max_iter is None else max_iter
                mode = make_backward(options.get("backward", DEFAULT_BACKWARD))
                with torch.set_grad_enabled(torch.is_grad_enabled() and mode.reaches_start(budget)):
                    z0 = self.loop(f, z0, start_loops).z
            z, solve_info = fixed_point(
                f.step,
                z0,
                args=f.args,
                solver=solver,
                max_iter=EQUILIBRIUM_MAX_ITER if max_iter is None else max_iter,
                tol=EQUILIBRIUM_TOL if tol is None else tol,
                stop_mode=EQUILIBRIUM_STOP_MODE if stop_mode is None else stop_mode,
                return_result=True,
                **options,
            )
            result, loops_used = solve_info.forward, None
        logits = self.readout(z, **stage)
        if return_info:
            return logits, LoopInfo(z, x, f, loops_used, result, solve_info)
        return logits

    # -- argument checks -----------------------------------------------------------------

    def _start(
        self, start: Callable[[CoreMap, Tensor], Tensor] | None, f: CoreMap, z0: Tensor
    ) -> Tensor:
        """The state the loop starts from: ``start(f, z0)``, checked, or z0 itself."""
        if start is None:
            return z0
        if not callable(start):
            raise TypeError(
                f"start must be a function (f, z0) -> z such as eqloop.random_start, got "
                f"{type(start).__name__}"
            )
        z = start(f, z0)
        if not isinstance(z, Tensor) or z.shape != z0.shape or z.dtype != z0.dtype:
            raise ValueError(
                f"start(f, z0) must return a tensor shaped and typed like z0 "
                f"{tuple(z0.shape)} {z0.dtype}, got "
                + (f"{tuple(z.shape)} {z.dtype}" if isinstance(z, Tensor) else type(z).__name__)
            )
        return z

    @staticmethod
    def check_tokens(tokens: Tensor, vocab_size: int, max_seq_len: int | None = None) -> None:
        """Raise ``TypeError``/``ValueError`` unless ``tokens`` are (B, S) ids of the model.

        Args:
            tokens: what the caller passed as token ids.
            vocab_size: ids must lie in ``[0, vocab_size)`` (one host read per call in
                eager, a device-side assert under ``torch.compile``: see :func:`all_true`).
            max_seq_len: the longest sequence the model accepts; ``None`` for no limit.
        """
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(
                f"tokens must have shape (batch, seq_len) with seq_len >= 1, "
                f"got {tuple(tokens.shape)}"
            )
        if max_seq_len is not None and tokens.shape[1] > max_seq_len:
            raise ValueError(f"tokens has seq_len {tokens.shape[1]} > max_seq_len {max_seq_len}")
        in_range = (tokens >= 0) & (tokens < vocab_size)
        if tokens.numel() and not all_true(
            in_range, f"tokens must lie in [0, vocab_size={vocab_size})"
        ):
            raise ValueError(
                f"tokens must lie in [0, vocab_size={vocab_size}), got values in "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )

    def _check_unrolled_options(self, named: dict[str, Any], options: dict[str, Any]) -> None:
        """Unrolled mode takes no solver settings; anything else is unknown."""
        if options:
            raise TypeError(
                f"unknown argument(s) {sorted(options)} for {type(self).__name__}.forward "
                "with unrolled loops (it takes loops, backward, exit_threshold, return_info"
                + "".join(f", {name}" for name in self.stage_options)
                + "); solver hyperparameters and driver options need solver=..."
            )
        given = sorted(name for name, value in named.items() if value is not None)
        if given:
            raise TypeError(
                f"{given} apply to equilibrium mode only: pass solver=... (and no loops)"
            )
