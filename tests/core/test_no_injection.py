"""Everything that takes a LoopLM works with ``injection="none"``, the STARS paper's loop.

Without injection the core is ``f(z) = core(z)`` and the input reaches the loop only
through ``z0 = x``. The tests build a core that is a contraction by construction (large
biases and small gains on the sublayer output norms, see
``helpers.contractive_no_injection_model``), so fixed points are unique and attracting
and every backward mode has an exact answer to agree with. (A global contraction without
injection has the same fixed point for every input; the STARS models rely on local
contraction around input-dependent fixed points. The machinery is the same.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    TINY_TRAIN_MODEL,
    contractive_no_injection_model,
    read_jsonl,
    tiny_train_config,
)
from torch import Tensor

import eqloop
import solvers
from eqloop.core.backward import IFT, Phantom, Truncated, Unroll
from eqloop.core.stars import jacobian_eigvals, jsrr_penalty, spectral_radius
from eqloop.evaluation import equilibrium, evaluate_checkpoint, exact_match, make_test_set
from eqloop.models.looplm.modeling import LoopLM
from eqloop.recipes.train import train
from eqloop.training.checkpoint import load_model
from eqloop.training.config import TrainConfig

F64 = torch.float64


@pytest.fixture(scope="module")
def model() -> LoopLM:
    return contractive_no_injection_model()


@pytest.fixture(scope="module")
def tokens() -> Tensor:
    return torch.randint(3, 19, (4, 6), generator=torch.Generator().manual_seed(2))


def test_the_loop_starts_from_x_and_ignores_it_afterwards(model: LoopLM, tokens: Tensor) -> None:
    f, z0 = model.core_map(tokens)
    x = model.inject(tokens)
    assert torch.equal(z0, x)  # z0 = prelude output
    z = torch.randn_like(x)
    other = torch.randn_like(x)
    assert torch.equal(model.core_step(z, x), model.core_step(z, other))  # f(z) = core(z)
    assert torch.allclose(f(z), model.core_step(z, x))
    with torch.no_grad():
        assert torch.allclose(model(tokens, loops=3), model.readout(model.unroll(tokens, 3)))


def test_solvers_find_the_fixed_point_of_core_map(model: LoopLM, tokens: Tensor) -> None:
    f, z0 = model.core_map(tokens)
    with torch.no_grad():
        iterate = z0
        for _ in range(200):
            iterate = f(iterate)
        for name in ("fixed_point", "anderson", "broyden"):
            res = solvers.solve(f, z0, name, max_iter=100, tol=1e-10)
            assert res.converged.all(), (name, res.status)
            residual = (f(res.z) - res.z).flatten(1).norm(dim=1) / f(res.z).flatten(1).norm(dim=1)
            assert residual.max() < 1e-9, name
            assert torch.allclose(res.z, iterate, atol=1e-8), name
        # Per-sample x through args with compaction: the same fixed point.
        x = model.inject(tokens)
        compact = solvers.solve(
            model.core_step,
            model.initial_state(x),
            "anderson",
            max_iter=100,
            tol=1e-10,
            args=(x,),
            compact=True,
        )
        assert torch.allclose(compact.z, iterate, atol=1e-8)


def test_spectral_radius_matches_the_dense_jacobian(model: LoopLM, tokens: Tensor) -> None:
    f, z0 = model.core_map(tokens)
    with torch.no_grad():
        z_star = solvers.solve(f, z0, "anderson", max_iter=100, tol=1e-12).z
    dense = jacobian_eigvals(f, z_star).abs().amax(dim=1)
    assert dense.max() < 0.5  # the construction contracts
    generator = torch.Generator().manual_seed(0)
    arnoldi = spectral_radius(f, z_star, "arnoldi", 30, generator=generator)
    power = spectral_radius(f, z_star, "power", 100, generator=generator)
    assert torch.allclose(arnoldi, dense, rtol=0.02)
    assert torch.allclose(power, dense, rtol=0.05)


def loss_of(model: LoopLM, tokens: Tensor, z: Tensor) -> Tensor:
    return model.readout(z).logsumexp(-1).mean()


def core_grads(model: LoopLM) -> list[Tensor]:
    return [p.grad.clone() for p in model.core.parameters()]


@pytest.mark.parametrize("backward", ["ift", "phantom", "truncated", "unroll"])
def test_every_backward_mode_gives_the_implicit_gradient(
    model: LoopLM, tokens: Tensor, backward: str
) -> None:
    modes: dict[str, Any] = {
        "ift": IFT(tol=1e-12),
        "phantom": Phantom(steps=40),
        "truncated": Truncated(k=40),
        "unroll": Unroll(),
    }
    solver = "fixed_point" if backward == "unroll" else "anderson"
    reference: list[list[Tensor]] = []
    for mode, name in ((IFT(tol=1e-13), "anderson"), (modes[backward], solver)):
        model.zero_grad(set_to_none=True)
        f, z0 = model.core_map(tokens)
        z = eqloop.fixed_point(f, z0, solver=name, backward=mode, max_iter=120, tol=1e-12)
        loss_of(model, tokens, z).backward()
        reference.append(core_grads(model))
        pos_grad = model.pos_emb.weight.grad
    for exact, got in zip(*reference, strict=True):
        assert torch.allclose(got, exact, rtol=1e-6, atol=1e-9), backward
    # z* does not depend on z0 = x, so no gradient reaches the positions through the loop
    # (unroll reaches them through z0, damped by rho^T; only the prelude output uses them).
    assert pos_grad is None or pos_grad.abs().max() < 1e-8


def test_jsrr_penalty_is_the_squared_vjp_and_trains_only_the_core(
    model: LoopLM, tokens: Tensor
) -> None:
    f, z0 = model.core_map(tokens)
    z = model.unroll(tokens, 3).detach()
    model.zero_grad(set_to_none=True)
    result = jsrr_penalty(f, z, generator=torch.Generator().manual_seed(5), return_details=True)
    v = torch.randn(z.shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1)
    x = model.inject(tokens)
    vjp = []
    for b in range(z.shape[0]):
        one = torch.autograd.functional.jacobian(
            lambda s, b=b: model.core_step(s[None], x[b : b + 1])[0], z[b]
        )  # (S, d, S, d)
        n = z[b].numel()
        vjp.append(v[b].reshape(n) @ one.reshape(n, n))
    vjp = torch.stack(vjp)
    assert torch.allclose(result.penalty, vjp.pow(2).sum(1).mean(), rtol=1e-10)
    result.penalty.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.core.parameters())
    # f(z) = core(z) does not read x, so the embeddings and the prelude get nothing.
    for p in [*model.prelude.parameters(), model.tok_emb.weight, model.pos_emb.weight]:
        assert p.grad is None or p.grad.abs().max() == 0


# --------------------------------------------------------------- train and evaluate


def tiny_run(tmp_path: Path, data_cache: Path) -> TrainConfig:
    """The tiny training run of tests/helpers.py without injection, with a prelude block."""
    return tiny_train_config(
        tmp_path,
        data_cache,
        model={**TINY_TRAIN_MODEL, "injection": "none", "n_prelude": 1},
        steps=30,
        warmup_steps=3,
        depth={"kind": "lognormal", "mu": 1.0, "sigma": 0.5, "lo": 1, "hi": 4},
        lam=0.1,
        penalty_start=5,
        eval_every=0,
        eval_loops=[2],
    )


def test_train_and_evaluate_with_equilibrium(tmp_path: Path, data_cache: Path) -> None:
    config = tiny_run(tmp_path, data_cache)
    result = train(config)
    records = read_jsonl(Path(config.out_dir) / "metrics.jsonl")
    steps = [r for r in records if "event" not in r]
    assert steps[2]["penalty"] is None and all(r["penalty"] > 0 for r in steps[5:])
    first = sum(r["ce"] for r in steps[:3]) / 3
    last = sum(r["ce"] for r in steps[-3:]) / 3
    assert last < first - 0.3, (first, last)
    assert result["step"] == 30

    report = evaluate_checkpoint(
        config.out_dir, loops=[1, 4], solver="anderson", diagnostic_samples=16, rho_iters=5
    )
    eq = report["equilibrium"]
    assert 0 <= eq["accuracy"] <= 1 and eq["solver"] == "anderson"
    assert [d["loops"] for d in report["diagnostics"]] == [1, 4]
    assert 0 <= eq["converged"] <= 1 and eq["contraction"]["rho"]["q50"] > 0
    # The reported equilibrium accuracy is the one of reading out at the solver's z*.
    model, _ = load_model(config.out_dir)
    data = make_test_set(config)
    again = exact_match(equilibrium(model, "anderson", max_iter=100, tol=1e-4), data)
    assert again == eq["accuracy"]
