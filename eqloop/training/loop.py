"""The step loop of a training run, one for ``eqloop train`` and ``eqloop finetune``.

The recipes build the model, data and objective and pass what differs: a function that runs
one optimisation step, one that checkpoints, and optionally an evaluation, ``on_eval`` and
``on_step`` callbacks. :class:`TrainingLoop` runs the steps and does what every run does
the same way:

* the step's statistics stay on the device (:class:`~eqloop.training.step_stats.PendingSteps`)
  and are read every ``log_every`` steps (every step with ``on_step``) and before every
  evaluation and checkpoint; each read writes one metrics record per step, warns once per
  run and kind about an unconverged solve and stops at the first non-finite step
  (:class:`~eqloop.training.run_dir.NonFiniteLoss`) before anything after it is saved;
* evaluation every ``eval_every`` steps and at the last step, checkpoints every
  ``checkpoint_every`` steps and at the last step, each step checkpointed at most once;
* SIGINT and SIGTERM (:func:`~eqloop.training.run_dir.stop_signals`): the step in progress
  finishes (with its evaluation, if due), is checkpointed, and
  :class:`~eqloop.training.run_dir.TrainingInterrupted` says where. Alone, a signal is seen
  after the step it arrived in; under DDP the ranks agree on it at the next read;
* a callback (``on_eval``, ``on_step``) that raises gets its step checkpointed first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm.auto import tqdm

from eqloop.training import run_dir
from eqloop.training.run_dir import MetricsLog, TrainingInterrupted
from eqloop.training.solve import warn_unconverged
from eqloop.training.step_stats import PendingSteps

if TYPE_CHECKING:
    from eqloop.training.config import SolveConfig
    from eqloop.training.env import RunEnv

__all__ = ["LoopConfig", "LoopState", "OnEval", "OnStep", "StepFn", "TrainingLoop"]

OnEval = Callable[[int, dict[str, Any]], None]
"""Called as ``on_eval(step, metrics)`` after each periodic evaluation; may raise to stop."""
OnStep = Callable[[int, dict[str, Any]], None]
"""Called as ``on_step(step, stats)`` after each optimisation step; may raise to stop."""
StepFn = Callable[[int], tuple[dict[str, Any], "int | None", float]]
"""Runs optimisation step ``step`` (0-based); returns its statistics (0-d device tensors,
host numbers or None, see :meth:`PendingSteps.add`), its loop count (None when training at
the fixed point) and its learning rate."""


class LoopConfig(Protocol):
    """The fields of a run's config the loop reads (``TrainConfig``, ``FinetuneConfig``)."""

    steps: int  # last step of the run
    checkpoint_every: int  # 0: only at the end
    log_every: int  # steps between reads of the statistics
    progress: bool  # show a progress bar (rank 0)
    out_dir: str  # the run directory, named by NonFiniteLoss
    solve: SolveConfig | None  # training at the fixed point (the warnings name it)
    backward_options: dict[str, Any]  # the adjoint solve's settings (likewise)


class LoopState(Protocol):
    """What the loop advances in the recipe's run state."""

    step: int  # steps completed
    train_time: float  # seconds spent in steps, evaluations excluded
    last_train: dict[str, Any] | None  # the record of the last step read


@dataclass
class TrainingLoop:
    """The steps of one run, from ``state.step`` to ``config.steps`` (see the module docstring).

    Args:
        config: ``steps``, ``checkpoint_every``, ``log_every``, ``progress``, ``out_dir``,
            ``solve`` and ``backward_options``.
        env: this process's rank, world and device.
        state: the run state the loop advances (``step``, ``train_time``, ``last_train``).
        step_fn: runs one optimisation step (:data:`StepFn`).
        save: checkpoints ``state``'s current step; called on every rank (collective under
            FSDP), returns the checkpoint written (None on the other ranks).
        log: the metrics log (rank 0), None elsewhere.
        desc: the progress bar's label.
        evaluate: the periodic evaluation, called on every rank after the statistics were
            read; returns its metrics (with ``mean_accuracy``). None: no evaluation.
        eval_every: steps between evaluations (0: only at the last step).
        on_eval: called after each evaluation (:data:`OnEval`).
        on_step: called after each step with its record (:data:`OnStep`); with it the
            statistics are read after every step.
    """

    config: LoopConfig
    env: RunEnv
    state: LoopState
    step_fn: StepFn
    save: Callable[[], Path | None]
    log: MetricsLog | None
    desc: str
    evaluate: Callable[[], dict[str, Any]] | None = None
    eval_every: int = 0
    on_eval: OnEval | None = None
    on_step: OnStep | None = None
    _checkpoint: Path | None = field(default=None, init=False)
    _saved_step: int = field(default=-1, init=False)
    _warned: set[str] = field(default_factory=set, init=False)  # once per run and kind

    def run(self) -> Path | None:
        """Train to ``config.steps``; closes ``log``.

        Returns:
            The last checkpoint this process wrote (None: none, or another rank wrote it).

        Raises:
            TrainingInterrupted: SIGINT or SIGTERM arrived; the last step was checkpointed.
            NonFiniteLoss: a step's loss or gradient norm was not finite.
        """
        config, env = self.config, self.env
        self._pending = PendingSteps(env.device, env.world)
        self._bar = tqdm(
            total=config.steps,
            initial=self.state.step,
            disable=not (env.main and config.progress),
            desc=self.desc,
            dynamic_ncols=True,
        )
        try:
            with run_dir.stop_signals() as received:
                for step in range(self.state.step, config.steps):
                    self._run_step(step)
                    self._after_step(received)
        finally:
            self._bar.close()
            if self.log is not None:
                self.log.close()
        return self._checkpoint

    def _run_step(self, step: int) -> None:
        """Step ``step``, timed; its statistics join the pending ones unread."""
        state = self.state
        start = time.perf_counter()
        stats, loops, lr = self.step_fn(step)
        state.step = step + 1
        state.train_time += time.perf_counter() - start
        self._pending.add(state.step, stats, {"loops": loops, "lr": lr, "time": state.train_time})
        self._bar.update(1)

    def _after_step(self, received: list[int]) -> None:
        """Read, evaluate, checkpoint and call back as due; stop on a signal."""
        config, env, step = self.config, self.env, self.state.step
        evaluate = self.evaluate is not None and (
            (self.eval_every and step % self.eval_every == 0) or step == config.steps
        )
        checkpoint_due = (
            config.checkpoint_every and step % config.checkpoint_every == 0
        ) or step == config.steps
        # on_step receives every step's statistics: with it, they are read after every step.
        log_every = 1 if self.on_step is not None else config.log_every
        # Read the statistics every log_every steps and before anything uses them (alone,
        # also when a signal arrived; ranks read at the same steps only).
        stop = 0
        if evaluate or checkpoint_due or step % log_every == 0 or (env.world == 1 and received[0]):
            stop = self._read(received[0])
        if evaluate:
            self._evaluate()
        if checkpoint_due:
            self._save()
        if self.on_step is not None:
            self._call(self.on_step, self.state.last_train or {})
        if env.world == 1:  # alone, a signal during the evaluation counts as well
            stop = received[0]
        if stop and step < config.steps:
            if len(self._pending):  # alone, a signal after the read above
                self._read(0)
            raise TrainingInterrupted(step, self._save(), stop)

    def _read(self, signum: int) -> int:
        """Log the pending steps, stop at a non-finite one; the largest signal of any rank."""
        config = self.config
        records, stop = self._pending.read(signum)
        for record in records:
            step = record["step"]
            warn_unconverged(record, step, config.solve, config.backward_options, self._warned)
            if self.log is not None:
                self.log.write(record)
            run_dir.check_finite(record, step, config.out_dir)  # before anything is saved
        if records:
            last = {k: v for k, v in records[-1].items() if k not in ("step", "time")}
            self.state.last_train = last
            self._bar.set_postfix(ce=f"{last['ce']:.3f}", loops=last["loops"], refresh=False)
        return stop

    def _evaluate(self) -> None:
        """The periodic evaluation: logged, shown, passed to ``on_eval``."""
        assert self.evaluate is not None and self.state.last_train is not None  # see caller
        metrics = self.evaluate()
        if self.log is not None:
            self.log.write({"event": "eval", **metrics})
        self._bar.set_postfix(
            ce=f"{self.state.last_train['ce']:.3f}", acc=f"{metrics['mean_accuracy']:.3f}"
        )
        if self.on_eval is not None:
            self._call(self.on_eval, metrics)

    def _call(self, callback: OnEval | OnStep, value: dict[str, Any]) -> None:
        """``callback(step, value)``; if it raises, the step is checkpointed first."""
        try:
            callback(self.state.step, value)
        except BaseException:
            self._save()  # the steps were read before the callback
            raise

    def _save(self) -> Path | None:
        """Checkpoint the current step once; the checkpoint written last."""
        if self._saved_step != self.state.step:
            self._checkpoint, self._saved_step = self.save(), self.state.step
        return self._checkpoint
