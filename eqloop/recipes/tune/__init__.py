"""Optuna studies over the STARS hyperparameters; one trial is one ``eqloop.recipes.train`` run.

``eqloop tune`` (:func:`main`) and :func:`run_study` run trials until the study holds
``n_trials``, however many workers share its storage; docs/tuning.md shows how.
"""

from eqloop.recipes.tune.cli import main
from eqloop.recipes.tune.config import TuneConfig, load_tune_config
from eqloop.recipes.tune.objective import objective_values
from eqloop.recipes.tune.report import pruning_savings
from eqloop.recipes.tune.study import load_study, requeue, run_study

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
