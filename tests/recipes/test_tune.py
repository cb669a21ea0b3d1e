"""Optuna studies over training runs: reports, resuming, workers sharing a study, killed
workers, pruning and input checks (``eqloop.recipes.tune``).

Trials are tiny real training runs (a 16-wide model, a dozen steps) except where a fake
training function makes the objective depend on ``lam`` in a known way (pruning).
Worker processes run the real ``eqloop tune`` command.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import finish_worker, retried_from, tiny_tune_base, tune_worker, wait_for

optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")
pytest.importorskip("pandas")

from optuna.trial import TrialState  # noqa: E402

from eqloop.recipes.train import train  # noqa: E402
from eqloop.recipes.tune import (  # noqa: E402
    TuneConfig,
    load_study,
    main,
    objective_values,
    pruning_savings,
    run_study,
)
from eqloop.training.config import TrainConfig  # noqa: E402


def tiny_tune_config(tmp_path: Path, data_cache: Path, **changes: Any) -> TuneConfig:
    base = tiny_tune_base(data_cache, **changes.pop("base", {}))
    fields = {
        "study_dir": str(tmp_path / "study"),
        "n_trials": 3,
        "loops": [2, 4],
        "base": base,
        "progress": False,
        "pruner": "none",
    }
    fields.update(changes)
    return TuneConfig(**fields)


def finished(study: Any) -> list[Any]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


# ------------------------------------------------------------------------- in process


def test_tiny_study_completes_and_writes_reports(tmp_path: Path, data_cache: Path) -> None:
    config = tiny_tune_config(tmp_path, data_cache)
    study = run_study(config)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert len({t.params["lam"] for t in trials}) == 3
    for t in trials:
        assert 1e-3 <= t.params["lam"] <= 1.0
        assert t.user_attrs["seed"] == t.number  # base seed 0 + trial number
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir.name == f"trial_{t.number:05d}"
        assert Path(t.user_attrs["metrics_path"]).is_file()
        assert (Path(t.user_attrs["checkpoint_dir"]) / "latest").is_file()
        saved = json.loads(Path(t.user_attrs["config_path"]).read_text())
        assert saved["lam"] == t.params["lam"] and saved["seed"] == t.number
        assert saved["eval_loops"] == [2, 4]
        assert t.value == pytest.approx(
            objective_values(t.user_attrs["accuracy"], [2, 4], "deep_accuracy")[0]
        )
    out = config.out_dir
    best = json.loads((out / "best_params.json").read_text())
    assert best["best"]["number"] == study.best_trial.number
    assert best["best"]["params"] == study.best_params
    assert best["trials"] == {"complete": 3}
    assert best["dashboard"].startswith("optuna-dashboard sqlite:///")
    csv = (out / "trials.csv").read_text().splitlines()
    assert len(csv) == 4 and "params_lam" in csv[0] and "user_attrs_run_dir" in csv[0]
    for name in ("history.png", "objective_vs_params.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_adds_trials_and_keeps_finished_ones(tmp_path: Path, data_cache: Path) -> None:
    first = run_study(tiny_tune_config(tmp_path, data_cache, n_trials=2)).get_trials()
    again = run_study(tiny_tune_config(tmp_path, data_cache, n_trials=2)).get_trials()
    assert len(again) == 2  # budget reached: nothing run
    study = run_study(tiny_tune_config(tmp_path, data_cache, n_trials=3))
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    for old, new in zip(first, trials, strict=False):
        assert (old.params, old.value, old.datetime_start) == (
            new.params,
            new.value,
            new.datetime_start,
        )
    assert trials[2].state == TrialState.COMPLETE


def test_resume_with_changed_setup_is_refused(tmp_path: Path, data_cache: Path) -> None:
    run_study(tiny_tune_config(tmp_path, data_cache, n_trials=1))
    changed = tiny_tune_config(tmp_path, data_cache, n_trials=2, base={"steps": 8})
    with pytest.raises(ValueError, match=r"different base\.steps;"):
        run_study(changed)
    with pytest.raises(ValueError, match="different loops"):
        run_study(tiny_tune_config(tmp_path, data_cache, n_trials=2, loops=[2, 8]))
    with pytest.raises(ValueError, match="different objective"):
        run_study(tiny_tune_config(tmp_path, data_cache, n_trials=2, objective="multi"))


def test_multi_objective_with_gp_sampler(tmp_path: Path, data_cache: Path) -> None:
    config = tiny_tune_config(
        tmp_path,
        data_cache,
        objective="multi",
        sampler="gp",
        sampler_options={"n_startup_trials": 1},
        space={"lam": {"low": 1e-3, "high": 1.0, "log": True}, "lr": {"low": 1e-4, "high": 1e-2}},
    )
    study = run_study(config)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 3
    for t in study.get_trials():
        peak, drop = t.values
        accuracy = [t.user_attrs["accuracy"][k] for k in ("2", "4")]
        assert peak == pytest.approx(max(accuracy))
        assert drop == pytest.approx(max(accuracy) - accuracy[-1])
    report = json.loads((config.out_dir / "best_params.json").read_text())
    assert report["objectives"] == {"peak_accuracy": "maximize", "drop": "minimize"}
    assert {t["number"] for t in report["pareto_front"]} == {t.number for t in study.best_trials}


def test_objective_values() -> None:
    acc = {"2": 0.5, "4": 1.0, "8": 0.25}
    assert objective_values(acc, [2, 4, 8], "deep_accuracy") == [pytest.approx(0.5833333)]
    assert objective_values(acc, [2, 4, 8], "multi") == [1.0, 0.75]


# --------------------------------------------------------------------------- pruning


def fake_train(bad_above: float, steps_seen: list[int]) -> Callable[..., dict[str, Any]]:
    """A training function whose accuracy is 0.9 for lam <= bad_above, else 0.1."""

    def run(config: Any, *, on_eval: Callable[[int, dict[str, Any]], None]) -> dict[str, Any]:
        acc = 0.9 if config.lam <= bad_above else 0.1
        accuracy = {str(t): acc for t in config.eval_loops}
        for step in range(config.eval_every, config.steps + 1, config.eval_every):
            steps_seen.append(step)
            on_eval(step, {"step": step, "accuracy": accuracy})
        return {"step": config.steps, "eval": {"accuracy": accuracy}}

    return run


@pytest.mark.parametrize("pruner", ["median", "percentile", "hyperband"])
def test_pruning_stops_bad_trials_early(tmp_path: Path, data_cache: Path, pruner: str) -> None:
    """Good trials (lam <= 0.01) first, then bad ones: every bad one stops at step 10."""
    good = [0.001, 0.002, 0.005]
    bad = [0.2, 0.5, 0.9]
    config = tiny_tune_config(
        tmp_path,
        data_cache,
        n_trials=6,
        pruner=pruner,
        pruner_options={
            "median": {"n_startup_trials": 3},
            "percentile": {"percentile": 75.0, "n_startup_trials": 3},  # keep the top 75%
        }.get(pruner, {}),
        space={"lam": {"choices": good + bad}},
        base={"steps": 100, "eval_every": 10},
    )
    study, _, _ = load_study(config)
    for lam in good + bad:
        study.enqueue_trial({"lam": lam})
    seen: list[int] = []
    study = run_study(config, train_fn=fake_train(0.01, seen))
    by_lam = {t.params["lam"]: t for t in study.get_trials()}
    assert all(by_lam[lam].state == TrialState.COMPLETE for lam in good)
    for lam in bad:
        trial = by_lam[lam]
        assert trial.state == TrialState.PRUNED
        assert trial.user_attrs["pruned_at_step"] < 100
        assert trial.user_attrs["steps_run"] == trial.user_attrs["pruned_at_step"]
    savings = pruning_savings(study)
    assert savings["n_pruned"] == 3
    assert savings["steps_saved"] == sum(100 - by_lam[lam].user_attrs["steps_run"] for lam in bad)
    assert savings["saved_fraction"] > 0.3
    if pruner == "median":
        assert all(by_lam[lam].user_attrs["pruned_at_step"] == 10 for lam in bad)


def test_pruned_real_trial_is_checkpointed_at_its_step(tmp_path: Path, data_cache: Path) -> None:
    """Real training; the reported accuracy is rigged so that lam = 0.9 looks bad."""

    def rigged(config: Any, *, on_eval: Callable[..., None]) -> dict[str, Any]:
        score = 0.0 if config.lam > 0.5 else 1.0

        def report(step: int, metrics: dict[str, Any]) -> None:
            on_eval(step, {**metrics, "accuracy": {k: score for k in metrics["accuracy"]}})

        return train(config, on_eval=report)

    config = tiny_tune_config(
        tmp_path,
        data_cache,
        n_trials=2,
        pruner="median",
        pruner_options={"n_startup_trials": 1},
        space={"lam": {"choices": [0.01, 0.9]}},
    )
    study, _, _ = load_study(config)
    study.enqueue_trial({"lam": 0.01})
    study.enqueue_trial({"lam": 0.9})
    study = run_study(config, train_fn=rigged)
    kept, pruned = study.get_trials()
    assert kept.state == TrialState.COMPLETE and pruned.state == TrialState.PRUNED
    assert pruned.user_attrs["pruned_at_step"] == 4
    latest = Path(pruned.user_attrs["checkpoint_dir"]) / "latest"
    assert latest.read_text().strip() == "step_00000004"


def test_crashing_trial_is_failed_and_replaced(tmp_path: Path, data_cache: Path) -> None:
    calls: list[int] = []

    def flaky(config: Any, *, on_eval: Callable[..., None]) -> dict[str, Any]:
        calls.append(config.seed)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return fake_train(1.0, [])(config, on_eval=on_eval)

    study = run_study(tiny_tune_config(tmp_path, data_cache, n_trials=3), train_fn=flaky)
    states = [t.state for t in study.get_trials()]
    assert states == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert study.get_trials()[1].user_attrs["error"] == "RuntimeError: boom"
    report = json.loads((tmp_path / "study" / "stars-lam" / "best_params.json").read_text())
    assert report["trials"] == {"complete": 3, "fail": 1}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_trial_started_past_the_budget_is_failed_as_surplus(
    tmp_path: Path, data_cache: Path
) -> None:
    """The race the budget callback cannot close: two workers' trials fill the budget
    while a third worker, which saw a free place, starts one more."""
    from eqloop.recipes.tune.objective import Objective
    from eqloop.recipes.tune.study import failures

    config = tiny_tune_config(tmp_path, data_cache, n_trials=2)
    study, _, base = load_study(config)
    running = [study.ask() for _ in range(2)]  # the other workers' trials
    calls: list[int] = []
    objective = Objective(config, base, lambda c, **k: calls.append(c.seed) or {})
    study.optimize(objective, n_trials=1, catch=(Exception,))
    late = study.get_trials()[2]
    assert late.state == TrialState.FAIL and late.user_attrs["surplus"] is True
    assert not calls and failures(study) == 0
    for trial in running:  # the trials within the budget end as usual
        study.tell(trial, trial.suggest_float("lam", 1e-3, 1.0, log=True))
    assert run_study(config).get_trials()[:2] == study.get_trials()[:2]


def test_max_failed_stops_the_worker(tmp_path: Path, data_cache: Path) -> None:
    def broken(config: Any, *, on_eval: Callable[..., None]) -> dict[str, Any]:
        raise RuntimeError("always")

    config = tiny_tune_config(tmp_path, data_cache, n_trials=3, max_failed=2)
    study = run_study(config, train_fn=broken)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL] * 2


# ------------------------------------------------------------------------ bad input


BAD_INPUTS = [
    ({"storage": "not a url"}, "invalid storage"),
    ({"storage": "nosuchdialect://host/db"}, "cannot open storage"),
    ({"storage": "journal:"}, "storage must be journal:PATH or a database URL"),
    ({"space": {"lam": {"low": 0.5, "high": 0.5}}}, r"range \[0.5, 0.5\] is empty"),
    ({"space": {"lam": {"low": 0.9, "high": 0.1, "log": True}}}, "space.lam: `low <= high` must"),
    ({"space": {"lam": {"low": 0.0, "high": 0.5, "log": True}}}, "space.lam: `low > 0` must hold"),
    ({"space": {"lam": {"low": 0.1, "high": 2.0}}}, r"space.lam=2.0 is not valid.*lam must be a"),
    ({"space": {"lam": {"low": 0.1, "hihg": 2.0}}}, "unexpected keyword argument 'hihg'"),
    ({"space": {"nosuch": {"low": 0.1, "high": 2.0}}}, "unknown TrainConfig keys"),
    ({"space": {}}, "space is empty"),
    ({"objective": "accuracy"}, "objective must be one of 'deep_accuracy', 'multi'"),
    ({"pruner": "asha"}, "pruner must be one of 'median'"),
    ({"sampler": "cmaes"}, "sampler must be one of 'tpe'"),
    ({"objective": "multi", "pruner": "median"}, "cannot be used with objective 'multi'"),
    ({"pruner": "median", "base": {"eval_every": 0}}, "pruning needs intermediate"),
    ({"pruner_options": {"n_startup": 2}, "pruner": "median"}, "unknown options"),
    ({"pruner": "percentile"}, r"needs pruner_options\['percentile'\] in \(0, 100\)"),
    ({"sampler_options": {"bogus": 1}}, "unknown options"),
    ({"base": {"lamda": 0.1}}, "unknown TrainConfig keys in base"),
    ({"loops": []}, "loops must be a non-empty list"),
    ({"n_trials": 0}, "n_trials must be an integer >= 1"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_INPUTS)
def test_bad_input_fails_before_any_trial(
    tmp_path: Path, data_cache: Path, changes: dict[str, Any], message: str
) -> None:
    config = tiny_tune_config(tmp_path, data_cache, **changes)
    calls: list[Any] = []
    with pytest.raises(ValueError, match=message):
        run_study(config, train_fn=lambda *a, **k: calls.append(a))
    assert not calls
    assert not (config.out_dir / "trials").exists()


def test_cli_reports_bad_input_and_unknown_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from eqloop.cli import main as eqloop_main

    study_dir = str(tmp_path / "s")
    assert eqloop_main(["tune", "--study-dir", study_dir, "--objective", "best"]) == 2
    assert (
        "objective must be one of 'deep_accuracy', 'multi'; got 'best'" in capsys.readouterr().err
    )
    config = tmp_path / "tune.json"
    config.write_text(json.dumps({"n_trial": 3}))
    assert main(["--config", str(config), "--study-dir", study_dir]) == 2
    assert "unknown TuneConfig keys in" in capsys.readouterr().err
    assert main(["--study-dir", study_dir, "--search", "lam,nosuch"]) == 2
    assert "--search nosuch" in capsys.readouterr().err
    assert not Path(study_dir).exists()


def test_cli_help_mentions_dashboard(capsys: pytest.CaptureFixture[str]) -> None:
    from eqloop.cli import main as eqloop_main

    with pytest.raises(SystemExit) as exit_info:
        eqloop_main(["tune", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "optuna-dashboard sqlite:///" in out and "--n-trials" in out


def test_cli_search_and_print_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--study-dir", str(tmp_path), "--search", "lam,lr,depth.mu", "--print-config"]
    assert main(args + ["--set", "space.lr.high=0.005"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["space"]) == {"lam", "lr", "depth.mu"}
    assert printed["space"]["lr"] == {"low": 1e-4, "high": 0.005, "log": True}
    assert main(args[:2] + ["--set", "space.lam.high=0.5", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["space"]["lam"]["high"] == 0.5


def test_set_reads_a_word_that_names_a_choice_as_that_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # row 24: "none" names the no-pruning choice, it is not JSON null (the default pruner)
    args = ["--study-dir", str(tmp_path), "--print-config"]
    for text, pruner in (
        ("none", "none"),
        ('"none"', "none"),
        ("hyperband", "hyperband"),
        ("null", None),
    ):
        assert main([*args, "--set", f"pruner={text}"]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["pruner"] == pruner
    assert main([*args, "--set", "pruner=nope"]) == 2
    assert (
        "pruner must be one of 'median', 'percentile', 'hyperband', 'none'; got 'nope'"
        in capsys.readouterr().err
    )


# ------------------------------------------------------- one config loader with train


TUNE_TOML = """
study_name = "toml-study"
loops = [2, 4]
pruner = "none"
[space.lam]
low = 0.01
high = 0.5
[base]
steps = 12
lr = 0.002
[base.model]
d_model = 16
[base.depth]
kind = "fixed"
t = 3
"""


def test_tune_config_from_toml_equals_the_same_from_json(tmp_path: Path) -> None:
    import tomllib

    from eqloop.recipes.tune import load_tune_config

    data = tomllib.loads(TUNE_TOML)
    (tmp_path / "tune.toml").write_text(TUNE_TOML)
    (tmp_path / "tune.json").write_text(json.dumps(data))
    from_toml = load_tune_config(tmp_path / "tune.toml", ["n_trials=3"])
    assert from_toml.to_dict() == load_tune_config(tmp_path / "tune.json", ["n_trials=3"]).to_dict()
    assert (from_toml.study_name, from_toml.space, from_toml.n_trials) == (
        "toml-study",
        {"lam": {"low": 0.01, "high": 0.5}},
        3,
    )
    # base merges into the base config as train merges its own file: model entry by entry
    # (the other model fields keep their defaults), depth replaced whole
    base = from_toml.train_base()
    assert (base.steps, base.lr, base.model.d_model, base.depth) == (
        12,
        0.002,
        16,
        {"kind": "fixed", "t": 3},
    )
    assert base.model.n_heads == TrainConfig().model.n_heads


def test_set_on_a_nested_base_key_merges_like_train(tmp_path: Path) -> None:
    from eqloop.recipes.tune import load_tune_config
    from eqloop.training.config import load_config

    sets = ["depth.mu=2.5", "model.d_model=48", "lr=0.002", "betas=0.9,0.95"]
    tune = load_tune_config(None, [f"base.{item}" for item in sets] + ["loops=2,4"])
    want = load_config(None, sets).to_dict()
    assert tune.train_base().to_dict() == {**want, "eval_loops": [2, 4]}
    assert tune.base["depth"] == {**TrainConfig().depth, "mu": 2.5}  # kind and sigma kept
    # the base config file, then base from the tune file, then base.* overrides
    (tmp_path / "train.toml").write_text('lam = 0.3\n[depth]\nkind = "fixed"\nt = 5\n')
    (tmp_path / "tune.json").write_text(json.dumps({"base": {"steps": 7}}))
    tune = load_tune_config(
        tmp_path / "tune.json", [f"base_config={tmp_path / 'train.toml'}", "base.depth.t=6"]
    )
    assert tune.base == {"steps": 7, "depth": {"kind": "fixed", "t": 6}}
    base = tune.train_base()
    assert (base.lam, base.steps, base.depth) == (0.3, 7, {"kind": "fixed", "t": 6})
    with pytest.raises(ValueError, match=r"base: lr must be a number, got 'fast'"):
        load_tune_config(None, ["base.lr=fast"])


def test_unknown_tune_keys_are_rejected_naming_the_key(tmp_path: Path) -> None:
    from eqloop.recipes.tune import load_tune_config

    (tmp_path / "tune.toml").write_text("n_trial = 3\n")
    with pytest.raises(ValueError, match=r"unknown TuneConfig keys in .*tune.toml: \['n_trial'\]"):
        load_tune_config(tmp_path / "tune.toml")
    with pytest.raises(ValueError, match=r"base: unknown TrainConfig keys: \['lamda'\]"):
        load_tune_config(None, ["base.lamda=0.1"])
    with pytest.raises(ValueError, match=r"unknown LoopLMConfig keys: \['widht'\] \(in model\)"):
        load_tune_config(None, ["base.model.widht=3"])
    (tmp_path / "tune.toml").write_text("[base.model]\nwidht = 3\n")
    with pytest.raises(
        ValueError, match=r"unknown LoopLMConfig keys in model of base: \['widht'\]"
    ):
        load_tune_config(tmp_path / "tune.toml").train_base()


# ------------------------------------------------------------------- worker processes


def write_tune_config(path: Path, data_cache: Path, **changes: Any) -> Path:
    base = tiny_tune_base(data_cache, **changes.pop("base", {}))
    data = {"n_trials": 4, "loops": [2, 4], "base": base, "pruner": "none", "progress": False}
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def storage_args(kind: str, tmp_path: Path) -> list[str]:
    if kind == "journal":
        return ["--storage", f"journal:{tmp_path / 'journal.log'}"]
    return ["--storage", f"sqlite:///{tmp_path / 'shared.db'}"]


def open_study(kind: str, tmp_path: Path) -> Any:
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage: Any = JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    else:
        storage = f"sqlite:///{tmp_path / 'shared.db'}"
    return optuna.load_study(study_name="stars-lam", storage=storage)


@pytest.mark.parametrize("kind", [pytest.param("sqlite", marks=pytest.mark.slow), "journal"])
def test_two_workers_run_n_trials_in_total(tmp_path: Path, data_cache: Path, kind: str) -> None:
    config = write_tune_config(
        tmp_path / "tune.json", data_cache, n_trials=5, study_dir=str(tmp_path / "study")
    )
    procs = [tune_worker(config, *storage_args(kind, tmp_path)) for _ in range(2)]
    outputs = [finish_worker(p) for p in procs]
    study = open_study(kind, tmp_path)
    trials = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(trials) == 5, outputs
    assert sorted(t.number for t in trials) == list(range(5))
    # both workers may start a trial for the last free place: the later one is failed at once
    for extra in study.get_trials(states=(TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)):
        assert extra.state == TrialState.FAIL and extra.user_attrs["surplus"] is True
        assert "run_dir" not in extra.user_attrs  # it never trained
    assert len({t.user_attrs["run_dir"] for t in trials}) == 5
    assert len({t.params["lam"] for t in trials}) == 5
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert pids == {p.pid for p in procs}, "both workers ran trials"


def running_trial_with_steps(kind: str, tmp_path: Path, number: int, steps: int) -> bool:
    trial = open_study(kind, tmp_path).get_trials()[number]
    return trial.state == TrialState.RUNNING and trial.user_attrs.get("steps_run", 0) >= steps


def start_and_kill_in_trial_1(
    kind: str,
    tmp_path: Path,
    data_cache: Path,
    procs: list[subprocess.Popen[str]],
    sig: int = signal.SIGKILL,
    **changes: Any,
) -> tuple[Path, Any, float]:
    """Run a 3-trial study; stop the worker with ``sig`` halfway through trial 1."""
    config = write_tune_config(
        tmp_path / "tune.json",
        data_cache,
        n_trials=3,
        study_dir=str(tmp_path / "study"),
        base={"steps": 400, "eval_every": 20, "checkpoint_every": 20},
        **changes,
    )
    proc = tune_worker(config, *storage_args(kind, tmp_path))
    procs.append(proc)
    wait_for(lambda: running_trial_with_steps(kind, tmp_path, 1, 40), what="trial 1 to train")
    first = open_study(kind, tmp_path).get_trials()[0]
    assert first.state == TrialState.COMPLETE
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return config, first, time.time()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_killed_worker_is_detected_and_its_trial_retried(
    tmp_path: Path, data_cache: Path, kind: str, processes: list[subprocess.Popen[str]]
) -> None:
    """SIGKILL mid-trial. SQLite: the heartbeat goes stale and the next worker fails and
    queues the trial; journal (no heartbeat): the user requeues it with --requeue."""
    config, first, killed_at = start_and_kill_in_trial_1(
        kind, tmp_path, data_cache, processes, heartbeat_interval=1, grace_period=2
    )
    killed = open_study(kind, tmp_path).get_trials()[1]
    assert killed.state == TrialState.RUNNING  # SIGKILL: nobody could mark it
    time.sleep(3)  # past the grace period
    requeue = ["--requeue", "1"] if kind == "journal" else []
    finish_worker(tune_worker(config, *storage_args(kind, tmp_path), *requeue))
    trials = open_study(kind, tmp_path).get_trials()
    assert trials[0].datetime_start == first.datetime_start and trials[0].value == first.value
    assert trials[1].state == TrialState.FAIL
    retry = trials[2]
    assert retry.state == TrialState.COMPLETE
    assert retried_from(retry) == 1 and retry.user_attrs["retry_of"] == 1
    assert retry.params == killed.params
    assert retry.user_attrs["run_dir"] == killed.user_attrs["run_dir"]
    assert set(killed.intermediate_values) <= set(retry.intermediate_values)
    # the retry resumed from the killed attempt's checkpoints (not rewritten) ...
    early = Path(retry.user_attrs["checkpoint_dir"]) / "step_00000020" / "manifest.json"
    assert early.stat().st_mtime < killed_at
    # ... and kept its log: one record per training step
    steps = _logged_steps(Path(retry.user_attrs["metrics_path"]))
    assert steps == list(range(1, 401))
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3
    assert len(trials) == 4


def _logged_steps(metrics: Path) -> list[int]:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    return [r["step"] for r in records if "event" not in r]


def test_requeue_refuses_a_trial_that_is_not_running(
    tmp_path: Path, data_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_tune_config(tmp_path, data_cache, n_trials=1)
    run_study(config, train_fn=fake_train(1.0, []))
    config_file = tmp_path / "tune.json"
    config_file.write_text(json.dumps(config.to_dict()))
    assert main(["--config", str(config_file), "--requeue", "0"]) == 2
    assert "trial 0 is COMPLETE; only RUNNING trials" in capsys.readouterr().err
    assert main(["--config", str(config_file), "--requeue", "7"]) == 2
    assert "has no trial 7" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_fails_the_trial_and_queues_it(
    tmp_path: Path, data_cache: Path, processes: list[subprocess.Popen[str]]
) -> None:
    config, _, _ = start_and_kill_in_trial_1(
        "journal", tmp_path, data_cache, processes, sig=signal.SIGTERM
    )
    assert processes[0].returncode == 130
    trials = open_study("journal", tmp_path).get_trials()
    assert trials[1].state == TrialState.FAIL
    assert trials[1].user_attrs["error"] == "interrupted"
    assert trials[2].state == TrialState.WAITING and trials[2].params == trials[1].params
    finish_worker(tune_worker(config, *storage_args("journal", tmp_path)))
    trials = open_study("journal", tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL] + [
        TrialState.COMPLETE
    ] * 2


# ------------------------------------------------------------------------- benchmark


def test_tune_lambda_benchmark_quick(
    tmp_path: Path, data_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "experiments" / "tune_lambda" / "run.py"
    spec = importlib.util.spec_from_file_location("tune_lambda_benchmark", script)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["--quick", "--out-dir", str(tmp_path / "b"), "--study-name", "q", "--no-progress"]
    args += ["--data-cache-dir", str(data_cache), "--json", str(out_json), "--plot", str(out_png)]
    result = bench.main(args)
    printed = capsys.readouterr().out
    assert "best lam = " in printed and "separation" in printed
    data = json.loads(out_json.read_text())
    assert data == json.loads(json.dumps(result))
    # Every lam of the grid twice, each time with another training seed, all warm-started.
    trials = data["trials"]
    pairs = sorted((r["lam"], r["seed"]) for r in trials)
    assert pairs == [(1e-3, 0), (1e-3, 2), (0.1, 1), (0.1, 3)]
    assert [s["seeds"] for s in data["per_lam"]] == [2, 2]
    for s in data["per_lam"]:
        values = [r["objective"] for r in trials if r["lam"] == s["lam"]]
        assert s["worst"] == min(values) and s["spread"] == max(values) - min(values)
    assert data["best"]["mean"] == max(s["mean"] for s in data["per_lam"])
    objectives = [r["objective"] for r in trials]
    assert data["separation_points"] == pytest.approx(100 * (max(objectives) - min(objectives)))
    config = json.loads((tmp_path / "b" / "q" / "tune_config.json").read_text())
    assert Path(config["base"]["init_from"]).name == "step_00000006"
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "b" / "q" / "trials.csv").is_file()
