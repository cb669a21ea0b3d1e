"""Evaluation of looped LMs: accuracy as the loops grow, dynamics, trajectories, reports.

One path for eqloop's LoopLM, Ouro and Huginn (anything implementing
:class:`eqloop.models.looped.LoopedLM`). Modules, from the bottom up:

* ``predictors``: :class:`Predictor`, one way of running a model: :func:`unrolled`,
  :func:`early_exit` or :func:`equilibrium` (``model(tokens, solver=..., ...)``);
* ``decoding``: the decode vocabulary :data:`DECODES` (``"greedy"``, ``"forced"``), the
  teacher-forced check, the greedy decoder and KV-cached generation;
* ``scoring``: exact match of :class:`EvalSet` (fixed-format answers) and free-text answers;
* ``dynamics``: :func:`loop_dynamics`, the one per-loop computation (step and state
  norms, spectral radius, readout entropy / KL) behind both per-loop reports;
  contraction at z*;
* ``accuracy``: the drivers :func:`evaluate_model`, :func:`evaluate_checkpoint`
  (``eqloop eval``) and :func:`accuracy_vs_loops` (``eqloop finetune``);
* ``trajectory``: hidden-state trajectories projected on principal components;
* ``report``: :func:`format_table` (every table eqloop prints), :func:`format_result`,
  :func:`plot_results`;
* ``diagnostics``: per-loop diagnostics of a pretrained looped LM (Ouro, Huginn);
* ``harness``: the lm-evaluation-harness model ``eqloop`` and ``eqloop-lm-eval``.

Names are imported lazily, so that importing the package stays cheap.
"""

from __future__ import annotations

from eqloop.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Predictor": "eqloop.evaluation.predictors",
    "check_solve_options": "eqloop.evaluation.predictors",
    "early_exit": "eqloop.evaluation.predictors",
    "equilibrium": "eqloop.evaluation.predictors",
    "model_device": "eqloop.evaluation.predictors",
    "unrolled": "eqloop.evaluation.predictors",
    "DECODES": "eqloop.evaluation.decoding",
    "PredictFn": "eqloop.evaluation.decoding",
    "check_decode": "eqloop.evaluation.decoding",
    "forced_correct": "eqloop.evaluation.decoding",
    "generate_continuations": "eqloop.evaluation.decoding",
    "greedy_generate": "eqloop.evaluation.decoding",
    "EvalSet": "eqloop.evaluation.scoring",
    "answers_correct": "eqloop.evaluation.scoring",
    "correct_answers": "eqloop.evaluation.scoring",
    "exact_match": "eqloop.evaluation.scoring",
    "make_eval_set": "eqloop.evaluation.scoring",
    "make_test_set": "eqloop.evaluation.scoring",
    "LoopRecord": "eqloop.evaluation.dynamics",
    "equilibrium_diagnostics": "eqloop.evaluation.dynamics",
    "loop_diagnostics": "eqloop.evaluation.dynamics",
    "loop_dynamics": "eqloop.evaluation.dynamics",
    "quantiles": "eqloop.evaluation.dynamics",
    "DEFAULT_LOOPS": "eqloop.evaluation.accuracy",
    "accuracy_vs_loops": "eqloop.evaluation.accuracy",
    "check_options": "eqloop.evaluation.accuracy",
    "evaluate_checkpoint": "eqloop.evaluation.accuracy",
    "evaluate_model": "eqloop.evaluation.accuracy",
    "TrajectoryPCA": "eqloop.evaluation.trajectory",
    "checkpoint_pca": "eqloop.evaluation.trajectory",
    "hidden_trajectory": "eqloop.evaluation.trajectory",
    "plot_checkpoint_trajectories": "eqloop.evaluation.trajectory",
    "plot_trajectories": "eqloop.evaluation.trajectory",
    "trajectory_pca": "eqloop.evaluation.trajectory",
    "format_cell": "eqloop.evaluation.report",
    "format_result": "eqloop.evaluation.report",
    "format_table": "eqloop.evaluation.report",
    "plot_results": "eqloop.evaluation.report",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
