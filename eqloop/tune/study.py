"""The study loop: create or resume a study, run trials until the study-wide budget is used."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from eqloop.training.config import TrainConfig
from eqloop.tune.config import OBJECTIVES, PRUNERS, SAMPLERS, TuneConfig, experimental_api
from eqloop.tune.objective import BUDGET_STATES, Objective, TrainFn, count, stored_trial
from eqloop.tune.report import write_report
from eqloop.tune.storage import connect, retry_callback

_SIGNATURE = "eqloop_tune"  # study user attribute: the settings a resumed study must share
_NOT_COMPARED = ("out_dir", "resume", "progress", "device", "data_cache_dir", "eval_loops")


class _Budget(MaxTrialsCallback):
    """Optuna's MaxTrialsCallback, except that it lets the worker run the queued trials."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not count(study, TrialState.WAITING):
            super().__call__(study, trial)


def _check_compatible(study: optuna.Study, config: TuneConfig, base: TrainConfig) -> None:
    """Raise ValueError if the stored study was made with another objective or setup."""
    signature = {f"base.{k}": v for k, v in base.to_dict().items() if k not in _NOT_COMPARED}
    signature.update(objective=config.objective, loops=config.loops, space=config.param_space())
    signature = json.loads(json.dumps({**signature, "seed_per_trial": config.seed_per_trial}))
    if (stored := study.user_attrs.get(_SIGNATURE)) is None:  # a new study
        return study.set_user_attr(_SIGNATURE, signature)
    if differ := sorted(k for k in signature | stored if stored.get(k) != signature.get(k)):
        raise ValueError(
            f"study {study.study_name!r} was created with a different "
            f"{', '.join(differ)}; resume it as it was or use another --study-name"
        )


def load_study(config: TuneConfig) -> tuple[optuna.Study, str, TrainConfig]:
    """Validate, open the storage, create or load the study: ``(study, storage, base)``."""
    base = config.validate()
    storage, name = connect(config)
    pruner, options = config.resolved_pruner(), dict(config.pruner_options)
    if pruner == "hyperband":  # its resources are training steps
        options = {"min_resource": base.eval_every, "max_resource": base.steps, **options}
    study = optuna.create_study(
        storage=storage,
        pruner=PRUNERS[pruner](**options),
        study_name=config.study_name,
        load_if_exists=True,
        directions=list(OBJECTIVES[config.objective].values()),
    )
    seed = config.sampler_seed  # offset by the stored trials: a resumed study must not repeat
    seed = None if seed is None else (seed * 1_000_003 + len(study.get_trials())) % 2**32
    study.sampler = SAMPLERS[config.sampler](seed=seed, **config.sampler_options)
    _check_compatible(study, config, base)
    return study, name, base


def requeue(study: optuna.Study, numbers: Sequence[int], max_retry: int) -> None:
    """Fail and queue again the RUNNING trials of a dead worker (journal: no heartbeats)."""
    for number in numbers:
        trial = stored_trial(study, number)
        if trial.state != TrialState.RUNNING:
            raise ValueError(f"trial {number} is {trial.state.name}; only RUNNING trials requeue")
        study.tell(number, state=TrialState.FAIL)
        retry_callback(max_retry)(study, trial)


def failures(study: optuna.Study) -> int:
    """Failed trials, not counting those failed at once as the surplus of a race."""
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    return sum(not t.user_attrs.get("surplus") for t in failed)


def run_study(config: TuneConfig, *, train_fn: TrainFn | None = None) -> optuna.Study:
    """Run trials (``train_fn``, default :func:`eqloop.train.train`) until the study holds
    ``n_trials``, write the report, return the study. Invalid settings raise ValueError before
    any trial; Ctrl-C or SIGTERM raise KeyboardInterrupt after queueing the trial again."""
    study, storage, base = load_study(config)
    if train_fn is None:
        from eqloop.train import train as train_fn
    objective, max_failed = Objective(config, base, train_fn), config.max_failed or config.n_trials

    def stop_at_max_failed(study: optuna.Study, trial: FrozenTrial) -> None:
        if failures(study) >= max_failed:
            print(f"stopping: the study has {max_failed} failed trials", file=sys.stderr)
            study.stop()

    def interrupt(signum: int, frame: Any) -> None:  # SIGTERM: Optuna fails the running trial
        raise KeyboardInterrupt(f"signal {signum}")

    main = threading.current_thread() is threading.main_thread()  # signals reach it only
    previous = signal.signal(signal.SIGTERM, interrupt) if main else None
    try:
        with experimental_api():  # marked experimental since Optuna 2.9
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial holds no place
        room = count(study, *BUDGET_STATES) < config.n_trials or count(study, TrialState.WAITING)
        if room and failures(study) < max_failed:
            budget = _Budget(config.n_trials, states=BUDGET_STATES)
            study.optimize(
                objective,
                timeout=config.timeout,
                catch=(Exception,),
                callbacks=[budget, stop_at_max_failed],
            )
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        write_report(study, config, storage, base)
    return study
