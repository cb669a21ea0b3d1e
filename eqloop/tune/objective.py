"""One trial: parameters, seed, run directory, a training run reporting to the pruner."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from eqloop.checkpoint import CHECKPOINT_DIR
from eqloop.training.config import TrainConfig
from eqloop.tune.config import TuneConfig, experimental_api, suggest, trial_train_config
from eqloop.tune.storage import retry_callback

BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
TrainFn = Callable[..., dict[str, Any]]


class BudgetReached(Exception):
    """A trial started after concurrent workers had used up the study's budget."""


def count(study: optuna.Study, *states: TrialState) -> int:
    """How many of the study's trials are in one of ``states``."""
    return len(study.get_trials(deepcopy=False, states=states))


def stored_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial ``number`` as stored (a running ``Trial`` does not show its system attributes)."""
    if found := [t for t in study.get_trials(deepcopy=False) if t.number == number]:
        return found[0]
    raise ValueError(f"study {study.study_name!r} has no trial {number}")


def objective_values(accuracy: Mapping[str, float], loops: Sequence[int], kind: str) -> list[float]:
    """Objective values from accuracies keyed by loop count (``"8"``): ``deep_accuracy``
    -> ``[mean]``, ``multi`` -> ``[peak, peak - accuracy at the largest loop count]``."""
    values = [float(accuracy[str(t)]) for t in loops]
    if kind == "deep_accuracy":
        return [sum(values) / len(values)]
    return [max(values), max(values) - float(accuracy[str(max(loops))])]


@dataclass
class Objective:
    """What ``study.optimize`` calls: one trial is one training run; a retry (of a killed or
    interrupted trial) resumes the original trial's run from its last checkpoint."""

    config: TuneConfig
    base: TrainConfig
    train_fn: TrainFn

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        earlier = trial.study.get_trials(deepcopy=False, states=BUDGET_STATES)
        if sum(t.number < trial.number for t in earlier) >= self.config.n_trials:
            trial.set_user_attr("surplus", True)  # two workers each took the last free place
            raise BudgetReached(f"trial {trial.number}: the study already has its trials")
        stored = stored_trial(trial.study, trial.number)
        with experimental_api():  # marked experimental since Optuna 2.8
            origin = RetryHeartbeatStaleTrialCallback.retried_trial_number(stored)
        number = trial.number if origin is None else origin
        params = {name: suggest(trial, name, d) for name, d in self.config.distributions().items()}
        seed = self.base.seed + (number if self.config.seed_per_trial else 0)
        run_dir = self.config.out_dir / "trials" / f"trial_{number:05d}"
        fixed = {"seed": seed, "out_dir": str(run_dir), "progress": self.config.progress}
        config = trial_train_config(self.base, {**params, **fixed, "resume": origin is not None})
        attrs = {"seed": seed, "run_dir": str(run_dir), "retry_of": origin, "error": None}
        attrs.update(
            config_path=str(run_dir / "config.json"),
            steps=config.steps,
            checkpoint_dir=str(run_dir / CHECKPOINT_DIR),
            metrics_path=str(run_dir / "metrics.jsonl"),
        )
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        loops, start, reported = self.config.loops, time.time(), stored.intermediate_values
        single = self.config.objective == "deep_accuracy"

        def on_eval(step: int, metrics: dict[str, Any]) -> None:
            trial.set_user_attr("steps_run", step)
            value = objective_values(metrics["accuracy"], loops, "deep_accuracy")[0]
            if single and step not in reported:  # a retry inherits the killed attempt's reports
                trial.report(value, step)
            if single and step < config.steps and trial.should_prune():
                trial.set_user_attr("pruned_at_step", step)
                raise optuna.TrialPruned(f"pruned at step {step}: {value:.4f}")

        try:
            result = self.train_fn(config, on_eval=on_eval)
        except KeyboardInterrupt:  # Optuna fails the trial; queue it again first
            stored = stored_trial(trial.study, trial.number)
            retry_callback(self.config.max_retry)(trial.study, stored)
            trial.set_user_attr("error", "interrupted")
            raise
        except Exception as err:
            if not isinstance(err, optuna.TrialPruned):
                trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            raise
        finally:
            trial.set_user_attr("train_seconds", time.time() - start)
        trial.set_user_attr("accuracy", result["eval"]["accuracy"])
        trial.set_user_attr("steps_run", result["step"])
        values = objective_values(result["eval"]["accuracy"], loops, self.config.objective)
        return values[0] if single else values
