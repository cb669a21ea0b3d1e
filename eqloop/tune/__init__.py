"""Optuna studies over the STARS hyperparameters; one trial is one ``eqloop.train`` run.

``eqloop tune`` (:func:`main`) and :func:`run_study` run trials until the study holds
``n_trials``, however many workers share its storage; docs/tuning.md shows how.
"""

from eqloop.tune.cli import main
from eqloop.tune.config import TuneConfig, load_tune_config
from eqloop.tune.objective import objective_values
from eqloop.tune.report import pruning_savings
from eqloop.tune.study import load_study, requeue, run_study

__all__ = [
    "TuneConfig",
    "load_study",
    "load_tune_config",
    "main",
    "objective_values",
    "pruning_savings",
    "requeue",
    "run_study",
]
