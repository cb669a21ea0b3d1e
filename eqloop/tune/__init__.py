"""Optuna studies over the STARS hyperparameters; one trial is one ``eqloop.train`` run.

Built on Optuna's own parts: ``study.optimize`` with ``MaxTrialsCallback`` and ``catch=``,
RDB heartbeats with ``RetryHeartbeatStaleTrialCallback``, journal files, matplotlib plots.
eqloop adds the budget across workers (a trial started past it in a race fails at once as
``surplus``), SIGTERM and ``--requeue`` (fail and queue the running trial again), the check
that a resumed study kept its setup, and the report with the steps pruning saved. The
README's tuning section shows the commands.
"""

from eqloop.tune.cli import main
from eqloop.tune.config import TuneConfig, load_tune_config
from eqloop.tune.objective import objective_values
from eqloop.tune.report import pruning_savings, write_report
from eqloop.tune.storage import parse_storage
from eqloop.tune.study import load_study, requeue, run_study

__all__ = ["TuneConfig", "load_study", "load_tune_config", "main", "objective_values",
           "parse_storage", "pruning_savings", "requeue", "run_study", "write_report"]
