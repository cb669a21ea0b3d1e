"""The penalty options beyond the paper: at the fixed point, along the Arnoldi direction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import contractive_no_injection_model

import solvers
from eqloop.core.stars import jacobian_eigvals
from eqloop.models.looplm.modeling import sdpa_math
from eqloop.recipes.train import penalty_point, train_step
from eqloop.training.config import TrainConfig

TOKENS = torch.randint(3, 19, (4, 6), generator=torch.Generator().manual_seed(2))


def options(**fields: object) -> TrainConfig:
    return TrainConfig.from_dict({"lam": 0.5, **fields})


def test_fixed_point_option_solves_from_the_trajectory_state() -> None:
    model = contractive_no_injection_model()
    f, z0 = model.core_map(TOKENS)
    z = model.unroll(TOKENS, 2)
    same, v = penalty_point(f, z, options())
    assert torch.equal(same, z) and v is None and not same.requires_grad
    point, _ = penalty_point(f, z, options(penalty_at="fixed_point"))
    with torch.no_grad():
        residual = (f(point) - point).flatten(1).norm(dim=1) / f(point).flatten(1).norm(dim=1)
        exact = solvers.solve(f, z0, "anderson", max_iter=100, tol=1e-12).z
    assert residual.max() < 1e-4  # the equilibrium tolerance of eqloop.core.defaults
    assert torch.allclose(point, exact, atol=1e-3)


def test_arnoldi_option_starts_along_the_dominant_direction() -> None:
    model = contractive_no_injection_model()
    f, _ = model.core_map(TOKENS)
    z = model.unroll(TOKENS, 30).detach()
    generator = torch.Generator().manual_seed(0)
    _, v = penalty_point(f, z, options(penalty_arnoldi=30), generator)
    assert v is not None and torch.allclose(v.flatten(1).norm(dim=1), torch.ones(4, dtype=v.dtype))
    with torch.no_grad(), sdpa_math():
        jv = torch.func.jvp(f, (z,), (v,))[1]
    rho = jacobian_eigvals(f, z).abs().amax(dim=1)
    # ||J v|| along the Ritz vector is the spectral radius.
    assert torch.allclose(jv.flatten(1).norm(dim=1), rho, rtol=0.05)


@pytest.mark.parametrize("fields", [{"penalty_at": "fixed_point"}, {"penalty_arnoldi": 8}])
def test_train_step_with_the_options(fields: dict) -> None:
    model = contractive_no_injection_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    targets = TOKENS.roll(-1, dims=1)
    stats = train_step(
        model,
        model,
        optimizer,
        TOKENS,
        targets,
        2,
        options(**fields),
        penalty_on=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert stats["penalty"] > 0 and 0 < stats["rho"] < 1
    assert all(p.grad is not None for p in model.core.parameters())


def test_bad_options_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="penalty_at must be one of"):
        options(penalty_at="fixpoint")
    with pytest.raises(ValueError, match="penalty_arnoldi must be an integer >= 0"):
        options(penalty_arnoldi=-1)
