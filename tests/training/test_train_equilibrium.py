"""Training at the fixed point: ``TrainConfig.solve`` (forward solver, tolerance, budget),
the backward taken where the solver stopped, and the solves' statistics in metrics.jsonl."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import TINY_TRAIN_MODEL, read_jsonl, same_weights, tiny_train_config

from eqloop.core.backward import ConvergenceWarning
from eqloop.data import IGNORE_INDEX
from eqloop.recipes.train import check_resumable, train
from eqloop.training.checkpoint import load_checkpoint
from eqloop.training.config import SolveConfig, TrainConfig, load_config
from eqloop.training.solve import converged_targets

SOLVE = {"solver": "anderson", "tol": 1e-3, "max_iter": 12}


def step_rows(out_dir: str) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(Path(out_dir) / "metrics.jsonl") if "event" not in r]


@pytest.mark.parametrize("backward", ["ift", "phantom"])
def test_solve_config_trains_at_the_fixed_point_and_logs_the_forward(
    tmp_path: Path, data_cache: Path, backward: str
) -> None:
    config = tiny_train_config(
        tmp_path, data_cache, steps=4, eval_every=0, backward=backward, solve=SOLVE, lam=0.0
    )
    assert isinstance(config.solve, SolveConfig) and config.solve.max_iter == 12
    result = train(config)
    assert math.isfinite(result["train"]["loss"])
    rows = step_rows(config.out_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["loops"] is None  # no sampled depth: the solver decides
        assert 0.0 <= row["fwd_converged"] <= 1.0
        assert isinstance(row["fwd_nfe"], int) and 1 <= row["fwd_nfe"] <= 12
        assert math.isfinite(row["fwd_residual"]) and row["fwd_residual"] >= 0
        # The largest residual exceeds the tolerance exactly when a sequence missed it.
        assert (row["fwd_converged"] < 1) == (row["fwd_residual"] > SOLVE["tol"])
        assert ("bwd_converged" in row) == (backward == "ift")
    assert load_checkpoint(config.out_dir).config["solve"]["max_iter"] == 12


def test_unconverged_forward_is_counted_and_warned_once(tmp_path: Path, data_cache: Path) -> None:
    config = tiny_train_config(
        tmp_path,
        data_cache,
        steps=3,
        eval_every=0,
        backward="phantom",
        lam=0.0,
        solve={"solver": "anderson", "tol": 1e-12, "max_iter": 1},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config)
    forward = [
        w
        for w in caught
        if issubclass(w.category, ConvergenceWarning) and "forward solve" in str(w.message)
    ]
    assert len(forward) == 1, [str(w.message) for w in caught]
    assert "did not converge on 100.0% of the sequences" in str(forward[0].message)
    assert "'fwd_converged'" in str(forward[0].message)
    assert "loosen solve.tol (now: SolveConfig(solver='anderson', tol=1e-12" in str(
        forward[0].message
    )
    assert not [w for w in caught if "eqloop.fixed_point" in str(w.message)]  # not per step
    rows = step_rows(config.out_dir)
    assert [r["fwd_converged"] for r in rows] == [0.0, 0.0, 0.0]
    assert all(r["fwd_nfe"] == 1 and r["fwd_residual"] > 1e-12 for r in rows)


def test_ift_without_solve_logs_its_adjoint(tmp_path: Path, data_cache: Path) -> None:
    """The sampled-loops IFT path (no solve) reports its adjoint solves too, not a warning
    per step."""
    config = tiny_train_config(
        tmp_path,
        data_cache,
        steps=3,
        eval_every=0,
        backward="ift",
        lam=0.0,
        backward_options={"max_iter": 1, "tol": 1e-12},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config)
    adjoint = [w for w in caught if "IFT adjoint solve" in str(w.message)]
    assert len(adjoint) == 1 and not [w for w in caught if "eqloop.fixed_point" in str(w.message)]
    rows = step_rows(config.out_dir)
    assert all(r["bwd_converged"] == 0.0 and r["bwd_nfe"] == 1 for r in rows)
    assert all(1 <= r["loops"] <= 3 and "fwd_converged" not in r for r in rows)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (
            {"solve": {**SOLVE, "solver": "newton"}},
            ValueError,
            r"solve\.solver must be one of 'fixed_point', .*'anderson'.*got 'newton'",
        ),
        (
            {"solve": SOLVE, "backward": "unroll"},
            ValueError,
            r"backward must be one of \('ift', 'phantom'\), got 'unroll'.*solve=null",
        ),
        ({"solve": SOLVE, "backward": "truncated"}, ValueError, r"got 'truncated'"),
        ({"solve": {**SOLVE, "tol": 0.0}}, ValueError, r"solve\.tol"),
        ({"solve": {**SOLVE, "max_iter": 0}}, ValueError, r"solve\.max_iter"),
        ({"solve": {**SOLVE, "start_loops": -1}}, ValueError, r"solve\.start_loops"),
        ({"solve": {**SOLVE, "stop_mode": "max"}}, ValueError, r"solve\.stop_mode"),
        (
            {"solve": {**SOLVE, "tolerance": 1e-3}},
            ValueError,
            r"unknown solve keys: \['tolerance'\]; valid keys are \['max_iter', ",
        ),
        (
            {"solve": {**SOLVE, "solver_options": {"bogus": 1}}},
            ValueError,
            r"solve\.solver_options: .*bogus",
        ),
        ({"solve": "anderson"}, TypeError, r"solve must be None or a dict"),
    ],
)
def test_solve_config_errors(
    tmp_path: Path, data_cache: Path, overrides: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        tiny_train_config(
            tmp_path, data_cache, backward=overrides.pop("backward", "ift"), **overrides
        )


def test_solve_config_from_overrides() -> None:
    config = load_config(
        overrides=['solve={"solver": "broyden"}', "solve.tol=1e-3", "backward=phantom"]
    )
    assert config.solve == SolveConfig(solver="broyden", tol=1e-3)
    # A field of the unset section starts it from its defaults.
    config = load_config(overrides=["solve.max_iter=7", "backward=ift"])
    assert config.solve == SolveConfig(max_iter=7)
    assert TrainConfig.from_dict(config.to_dict()) == config  # round trip through JSON data
    assert TrainConfig().solve is None  # default: the sampled loops of the paper


def test_random_start_trains_from_other_states(tmp_path: Path, data_cache: Path) -> None:
    def run(name: str, share: float, **overrides: Any) -> Path:
        config = tiny_train_config(
            tmp_path / name, data_cache, steps=2, eval_every=0, random_start=share, **overrides
        )
        train(config)
        return Path(config.out_dir)

    plain, drawn = run("plain", 0.0), run("drawn", 1.0)
    assert not same_weights(plain, drawn)  # the starts reach the gradient
    assert same_weights(drawn, run("again", 1.0))  # and are seeded by (seed, step)
    at_equilibrium = run("solve", 1.0, backward="phantom", solve=SOLVE, lam=0.0)
    assert all(0.0 <= r["fwd_converged"] <= 1.0 for r in step_rows(str(at_equilibrium)))
    with pytest.raises(ValueError, match="random_start > 0 needs input injection"):
        tiny_train_config(
            tmp_path, data_cache, random_start=0.5, model={**TINY_TRAIN_MODEL, "injection": "none"}
        )
    with pytest.raises(ValueError, match="random_start"):
        tiny_train_config(tmp_path, data_cache, random_start=1.5)


def test_resume_with_solve_config_is_bit_identical(tmp_path: Path, data_cache: Path) -> None:
    config = tiny_train_config(
        tmp_path / "a",
        data_cache,
        steps=4,
        eval_every=2,
        eval_loops=[2],
        backward="ift",
        solve=SOLVE,
        lam=0.1,
        penalty_start=1,
        penalty_at="fixed_point",
        random_start=0.5,
    )
    train(config)
    interrupted = dataclasses.replace(config, out_dir=str(tmp_path / "b"))

    class Stop(Exception):
        pass

    def stop_at_2(step: int, metrics: dict[str, Any]) -> None:
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        train(interrupted, on_eval=stop_at_2)
    with pytest.raises(ValueError, match=r"differs from .*step_00000002 in \['solve'\]"):
        changed = dataclasses.replace(interrupted.solve, tol=1e-2)
        train(dataclasses.replace(interrupted, resume=True, solve=changed))
    assert train(dataclasses.replace(interrupted, resume=True))["step"] == 4
    assert same_weights(Path(config.out_dir), Path(interrupted.out_dir))
    strip = [{k: v for k, v in r.items() if "time" not in k} for r in step_rows(config.out_dir)]
    again = step_rows(interrupted.out_dir)
    assert strip == [{k: v for k, v in r.items() if "time" not in k} for r in again]


def test_skip_unconverged_drops_those_sequences_from_the_ce(
    tmp_path: Path, data_cache: Path
) -> None:
    solve = {"solver": "anderson", "tol": 1e-12, "max_iter": 1, "skip_unconverged": True}
    common = dict(steps=2, eval_every=0, backward="ift", lam=0.0)
    # No sequence converges: no CE, so no gradient at all.
    none = tiny_train_config(tmp_path / "none", data_cache, solve=solve, **common)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(none)
    assert any("left out of the CE (solve.skip_unconverged)" in str(w.message) for w in caught)
    rows = step_rows(none.out_dir)
    assert [r["fwd_converged"] for r in rows] == [0.0, 0.0]
    assert all(r["ce"] == 0.0 and r["grad_norm"] == 0.0 for r in rows)
    # Every sequence converges: the same steps as without the option.
    loose = {**solve, "tol": 1e3}
    runs = [
        tiny_train_config(tmp_path / name, data_cache, solve=s, **common)
        for name, s in (("skip", loose), ("keep", {**loose, "skip_unconverged": False}))
    ]
    for config in runs:
        with warnings.catch_warnings():  # at tol 1e3 the adjoint is not at a fixed point
            warnings.simplefilter("ignore", ConvergenceWarning)
            train(config)
    skip, keep = (step_rows(c.out_dir) for c in runs)
    assert all(r["fwd_converged"] == 1.0 for r in skip)
    for a, b in zip(skip, keep, strict=True):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-6) and a["ce"] > 0


def test_converged_targets_ignores_whole_unconverged_sequences() -> None:
    targets = torch.tensor([[1, 2, IGNORE_INDEX], [3, 4, 5], [6, IGNORE_INDEX, 7]])
    forward = SimpleNamespace(converged=torch.tensor([True, False, True]))
    info = SimpleNamespace(fixed_point=SimpleNamespace(forward=forward))
    kept = converged_targets(targets, info, SolveConfig(skip_unconverged=True))  # type: ignore[arg-type]
    assert kept.tolist() == [[1, 2, IGNORE_INDEX], [IGNORE_INDEX] * 3, [6, IGNORE_INDEX, 7]]
    assert converged_targets(targets, info, SolveConfig()) is targets  # type: ignore[arg-type]
    assert converged_targets(targets, info, None) is targets  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="solve.skip_unconverged must be true or false"):
        SolveConfig(skip_unconverged="yes").validate()  # type: ignore[arg-type]


def test_a_run_saved_before_a_solve_field_existed_still_resumes(
    tmp_path: Path, data_cache: Path
) -> None:
    solve = {"solver": "anderson", "tol": 1e-3, "max_iter": 8}
    config = tiny_train_config(tmp_path, data_cache, backward="phantom", solve=solve)
    saved = config.to_dict()
    del saved["solve"]["skip_unconverged"]  # as saved before the field was added
    source = tmp_path / "step_00000001"
    check_resumable(saved, config, source)  # trained with the default: the same run
    changed = dataclasses.replace(
        config, solve=dataclasses.replace(config.solve, skip_unconverged=True)
    )
    with pytest.raises(ValueError, match=r"the config differs from .* in \['solve'\]"):
        check_resumable(saved, changed, source)
