"""What a study found: best parameters and pruning savings (JSON), trials (CSV), plots."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from eqloop.files import atomic_path, write_json_atomic
from eqloop.plotting import pyplot
from eqloop.training.config import TrainConfig
from eqloop.tune.config import OBJECTIVES, TuneConfig, experimental_api
from eqloop.tune.objective import count
from eqloop.tune.storage import redact

REPORT_FILES = {
    "best_params": "best_params.json",  # the best trial (Pareto front for "multi"), savings
    "trials_csv": "trials.csv",  # study.trials_dataframe()
    "history_plot": "history.png",  # optimization history (Pareto front for "multi")
    "objective_plot": "objective_vs_params.png",  # slice plot, log axes for log ranges
}
_RECORDED = ("accuracy", "seed", "run_dir", "config_path", "checkpoint_dir", "metrics_path")


def pruning_savings(study: optuna.Study) -> dict[str, Any]:
    """Steps the pruned trials ran (``steps_run_pruned``) versus their full budgets, and the
    share of all finished trials' steps that pruning saved (``saved_fraction``)."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    pruned = [t for t in finished if t.state == TrialState.PRUNED]

    def steps(trials: list[FrozenTrial], key: str) -> int:
        return sum(int(t.user_attrs.get(key, t.user_attrs.get("steps", 0))) for t in trials)

    run, full = steps(finished, "steps_run"), steps(finished, "steps")
    run_pruned, full_pruned = steps(pruned, "steps_run"), steps(pruned, "steps")
    return {
        "n_pruned": len(pruned),
        "steps_run_pruned": run_pruned,
        "steps_full_pruned": full_pruned,
        "steps_saved": full_pruned - run_pruned,
        "steps_run_total": run,
        "saved_fraction": (full - run) / full if full else 0.0,
    }


def _record(trial: FrozenTrial, names: list[str]) -> dict[str, Any]:
    record = {k: v for k, v in trial.user_attrs.items() if k in _RECORDED}
    record.update(number=trial.number, params=trial.params)
    record["values"] = dict(zip(names, trial.values, strict=True))
    record["rerun"] = f"eqloop train --config {record.get('config_path')} --out-dir NEW_DIR"
    return record


def write_report(study: optuna.Study, config: TuneConfig, storage: str, base: TrainConfig) -> None:
    """Write the :data:`REPORT_FILES` into ``config.out_dir`` (the plots with
    ``config.plots`` once two trials are complete)."""
    names, complete = list(OBJECTIVES[config.objective]), count(study, TrialState.COMPLETE)
    best: Any = [_record(t, names) for t in sorted(study.best_trials, key=lambda t: t.number)]
    if len(names) == 1:
        best = _record(study.best_trial, names) if complete else None
    shown = redact(storage)
    summary = {
        "study_name": study.study_name,
        "storage": shown,
        "dashboard": f"optuna-dashboard {shown.removeprefix('journal:')}",
        "objectives": OBJECTIVES[config.objective],
        "loops": config.loops,
        "space": config.param_space(),
        "pruning": pruning_savings(study),
        "trials": {s.name.lower(): n for s in TrialState if (n := count(study, s))},
        "best" if len(names) == 1 else "pareto_front": best,
        "base": base.to_dict(),
    }
    paths = {key: config.out_dir / name for key, name in REPORT_FILES.items()}
    write_json_atomic(paths["best_params"], summary)
    with atomic_path(paths["trials_csv"]) as tmp:
        study.trials_dataframe().to_csv(tmp, index=False)
    if not config.plots or complete < 2:
        return
    pyplot()  # the headless backend, before Optuna imports pyplot
    with experimental_api():  # optuna.visualization.matplotlib is marked experimental
        from optuna.visualization import matplotlib as plots

        if len(names) == 1:
            history = plots.plot_optimization_history(study, target_name=names[0])
        else:
            history = plots.plot_pareto_front(study, target_names=names)
        first = None if len(names) == 1 else lambda t: t.values[0]
        slices = plots.plot_slice(study, list(config.space), target=first, target_name=names[0])
    for key, axes in (("history_plot", history), ("objective_plot", slices)):
        figure = getattr(axes, "flat", [axes])[0].figure  # one Axes or an array of them
        with atomic_path(paths[key]) as tmp:
            figure.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
        pyplot().close(figure)
