"""Tests for eqloop.core.implicit and eqloop.core.backward: fixed points, four backward modes.

References are exact: the affine map ``f(z) = z A^T + x U^T + c`` has the closed-form
fixed point ``z* = (I - A)^{-1} (U x + c)`` (differentiated by autograd through
``torch.linalg.solve``), and for ``f(z) = tanh(z W^T + x U^T)`` the dense implicit
gradient ``(I - J)^{-T} v`` is built from per-sample Jacobians.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import Tensor

import eqloop
import solvers
from benchmarks.memory_depth import saved_bytes
from eqloop.core.backward import IFT, Backward, Phantom, Truncated, Unroll, make_backward
from eqloop.core.implicit import (
    BACKWARD_MODES,
    ConvergenceWarning,
    FixedPointInfo,
    default_backward_tol,
    fixed_point,
)
from eqloop.models.looplm.modeling import LoopLM, LoopLMConfig

F64 = torch.float64
D, B = 5, 3

# Settings under which every mode computes the exact implicit gradient (to ~1e-12).
EXACT: dict[str, dict[str, Any]] = {
    "ift": dict(solver="anderson", tol=1e-13, max_iter=200, backward=IFT(tol=1e-13)),
    "phantom": dict(solver="anderson", tol=1e-13, max_iter=200, backward=Phantom(steps=80)),
    "truncated": dict(solver="anderson", tol=1e-13, max_iter=200, backward=Truncated(k=80)),
    "unroll": dict(solver="fixed_point", tol=1e-14, max_iter=400, backward=Unroll()),
}


# ---------------------------------------------------------------------------------------
# Problems with known answers
# ---------------------------------------------------------------------------------------


def tanh_params(seed: int = 0, scale: float = 0.8) -> tuple[Tensor, Tensor, Tensor]:
    """``W`` (D, D) with spectral norm ``scale``, ``U`` (D, D) and inputs ``x`` (B, D)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, D, generator=g, dtype=F64)
    w = w * scale / torch.linalg.matrix_norm(w, ord=2)
    u = torch.randn(D, D, generator=g, dtype=F64) / math.sqrt(D)
    x = torch.randn(B, D, generator=g, dtype=F64)
    return w.requires_grad_(), u.requires_grad_(), x.requires_grad_()


def tanh_map(w: Tensor, u: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(z, x) = tanh(z W^T + x U^T)``: (B, D), (B, D) -> (B, D)."""

    def f(z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z @ w.T + x @ u.T)

    return f


def dense_implicit_grads(
    f: Callable[[Tensor, Tensor], Tensor],
    z_star: Tensor,
    x: Tensor,
    v: Tensor,
    inputs: tuple[Tensor, ...],
) -> tuple[Tensor, ...]:
    """Exact ``v^T dz*/d(inputs)`` from per-sample Jacobians: ``g = (I - J)^{-T} v``."""
    jac = torch.stack(
        [
            torch.autograd.functional.jacobian(
                lambda z, b=b: f(z[None], x[b : b + 1])[0], z_star[b]
            )
            for b in range(z_star.shape[0])
        ]
    )  # (B, D, D)
    eye = torch.eye(z_star.shape[1], dtype=z_star.dtype)
    g = torch.linalg.solve((eye - jac).transpose(1, 2), v.unsqueeze(2)).squeeze(2)
    return torch.autograd.grad(f(z_star.detach(), x), inputs, g)


def flat(grads: tuple[Tensor, ...]) -> Tensor:
    return torch.cat([g.flatten() for g in grads])


def tiny_looplm() -> LoopLM:
    """A float64 LoopLM whose core contracts (concat injection, large embeddings)."""
    torch.manual_seed(0)
    cfg = LoopLMConfig(
        vocab_size=11, d_model=16, n_heads=2, d_ff=32, max_seq_len=4, injection="concat"
    )
    model = LoopLM(cfg).double()
    with torch.no_grad():
        model.injection.adapter.weight[:, :16] *= 0.3
        model.tok_emb.weight *= 50.0
    return model


# ---------------------------------------------------------------------------------------
# ift against exact gradients
# ---------------------------------------------------------------------------------------


def test_ift_passes_gradcheck() -> None:
    w, u, x = tanh_params()
    z0 = torch.zeros(B, D, dtype=F64)

    def solve(w: Tensor, u: Tensor, x: Tensor) -> Tensor:
        return fixed_point(
            tanh_map(w, u), z0, args=(x,), tol=1e-14, max_iter=300, backward=IFT(tol=1e-14)
        )

    assert torch.autograd.gradcheck(solve, (w, u, x), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_ift_matches_closed_form_on_affine_map(solver: str) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(D, D, generator=g, dtype=F64)
    a = (0.7 * a / torch.linalg.matrix_norm(a, ord=2)).requires_grad_()
    u = torch.randn(D, D, generator=g, dtype=F64, requires_grad=True)
    c = torch.randn(D, generator=g, dtype=F64, requires_grad=True)
    x = torch.randn(B, D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, D, generator=g, dtype=F64)
    inputs = (a, u, c, x)

    def f(z: Tensor) -> Tensor:
        return z @ a.T + x @ u.T + c

    z = fixed_point(
        f,
        torch.zeros(B, D, dtype=F64),
        solver=solver,
        tol=1e-14,
        max_iter=500,
        backward=IFT(tol=1e-14, max_iter=500),
    )
    got = torch.autograd.grad((z * v).sum(), inputs)
    eye = torch.eye(D, dtype=F64)
    exact = torch.linalg.solve(eye - a, (x @ u.T + c).T).T  # z* = (I - A)^{-1} (U x + c)
    torch.testing.assert_close(z, exact.detach(), rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad((exact * v).sum(), inputs)
    assert rel_err(flat(got), flat(want)) <= 1e-10


@pytest.mark.parametrize("backward_solver", [None, "fixed_point", "broyden"])
def test_ift_matches_dense_implicit_gradient(backward_solver: str | None) -> None:
    w, u, x = tanh_params(seed=2, scale=0.9)
    f = tanh_map(w, u)
    v = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=F64)
    z = fixed_point(
        f,
        torch.zeros(B, D, dtype=F64),
        args=(x,),
        tol=1e-14,
        max_iter=300,
        backward=IFT(solver=backward_solver, tol=1e-14, max_iter=500),
    )
    got = torch.autograd.grad((z * v).sum(), (w, u, x))
    want = dense_implicit_grads(f, z.detach(), x, v, (w, u, x))
    assert rel_err(flat(got), flat(want)) <= 1e-10  # the target is 1e-6


# ---------------------------------------------------------------------------------------
# The modes agree at convergence
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_every_mode_reaches_the_implicit_gradient_at_convergence(mode: str) -> None:
    w, u, x = tanh_params(seed=4)
    f = tanh_map(w, u)
    v = torch.randn(B, D, generator=torch.Generator().manual_seed(5), dtype=F64)
    z = fixed_point(f, torch.zeros(B, D, dtype=F64), args=(x,), **EXACT[mode])
    got = torch.autograd.grad((z * v).sum(), (w, u, x))
    want = dense_implicit_grads(f, z.detach(), x, v, (w, u, x))
    assert rel_err(flat(got), flat(want)) <= 1e-9


def test_damped_phantom_steps_converge_to_the_implicit_gradient() -> None:
    """tau * sum_i ((1 - tau) I + tau J)^i = (I - J)^{-1}: damping changes the rate only."""
    w, u, x = tanh_params(seed=6)
    f = tanh_map(w, u)
    z0 = torch.zeros(B, D, dtype=F64)

    def grads(**kwargs: Any) -> Tensor:
        z = fixed_point(f, z0, args=(x,), tol=1e-13, max_iter=200, **kwargs)
        return flat(torch.autograd.grad(z.sum(), (w, u)))

    exact = grads(backward=IFT(tol=1e-13))
    assert rel_err(grads(backward=Phantom(steps=200, tau=0.5)), exact) < 1e-9
    few = grads(backward=Phantom(steps=3, tau=0.5))
    assert 1e-3 < rel_err(few, exact) < 1.0  # a biased but aligned approximation
    assert F.cosine_similarity(few, exact, dim=0) > 0.9


@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_looplm_modes_agree_in_eval_mode_with_integer_inputs(mode: str) -> None:
    """Eval mode, tokens that cannot require grad, parameters that do."""
    model = tiny_looplm().eval()
    tokens = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(0))

    def grads(**kwargs: Any) -> Tensor:
        model.zero_grad()
        model(tokens, **kwargs).logsumexp(-1).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    reference = grads(solver="fixed_point", backward="unroll", tol=1e-13, max_iter=300)
    got = grads(**EXACT[mode])
    assert torch.isfinite(got).all() and got.abs().sum() > 0
    assert F.cosine_similarity(got, reference, dim=0) > 1 - 1e-9
    assert rel_err(got, reference) < 1e-7


def test_gradients_reach_parameters_when_inputs_do_not_require_grad() -> None:
    w, u, x = tanh_params(seed=7)
    x = x.detach()
    f = tanh_map(w, u)
    z = fixed_point(
        f,
        torch.zeros(B, D, dtype=F64),
        args=(x,),
        tol=1e-14,
        max_iter=300,
        backward=IFT(tol=1e-14),
    )
    assert z.requires_grad
    (gw,) = torch.autograd.grad(z.sum(), (w,))
    (want,) = dense_implicit_grads(f, z.detach(), x, torch.ones(B, D, dtype=F64), (w,))
    assert rel_err(gw, want) < 1e-10


@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_nothing_requiring_grad_gives_a_constant(mode: str) -> None:
    w, u, x = (t.detach() for t in tanh_params())
    z, info = fixed_point(
        tanh_map(w, u),
        torch.zeros(B, D, dtype=F64),
        args=(x,),
        return_result=True,
        **EXACT[mode],
    )
    assert not z.requires_grad and info.grad_steps == 0


def test_ift_with_a_compacted_forward_solve_and_solver_objects() -> None:
    """Driver options reach the forward solve; solver objects work on both sides."""
    w, u, x = tanh_params(seed=9)
    f = tanh_map(w, u)
    z0 = torch.zeros(B, D, dtype=F64)
    z = fixed_point(f, z0, args=(x,), tol=1e-13, max_iter=200, backward=IFT(tol=1e-13))
    want = flat(torch.autograd.grad(z.sum(), (w, u, x)))
    z, info = fixed_point(
        f,
        z0,
        args=(x,),
        solver=solvers.Anderson(m=3),
        tol=1e-13,
        max_iter=200,
        compact=True,
        backward=IFT(solver=solvers.Broyden(m=10), tol=1e-13),
        return_result=True,
    )
    got = flat(torch.autograd.grad(z.sum(), (w, u, x)))
    assert info.forward.sample_evals < info.forward.nfe * B  # the batch was compacted
    assert info.backward.solver == "broyden"
    assert rel_err(got, want) < 1e-10


def test_ift_map_that_ignores_z() -> None:
    """J = 0: the adjoint is the incoming gradient itself."""
    w = torch.randn(D, D, dtype=F64, requires_grad=True)
    x = torch.randn(B, D, dtype=F64)
    z = fixed_point(lambda z: x @ w.T + 0 * z.detach(), torch.zeros(B, D, dtype=F64))
    (gw,) = torch.autograd.grad(z.sum(), (w,))
    torch.testing.assert_close(gw, torch.ones(B, D, dtype=F64).T @ x)


# ---------------------------------------------------------------------------------------
# Values, no_grad, info
# ---------------------------------------------------------------------------------------


def test_values_of_each_mode() -> None:
    w, u, x = tanh_params(seed=8)
    f = tanh_map(w, u)
    z0 = torch.zeros(B, D, dtype=F64)
    z, info = fixed_point(f, z0, args=(x,), tol=1e-12, return_result=True)
    assert torch.equal(z.detach(), info.forward.z)  # ift returns exactly the solver's z*
    with torch.no_grad():
        assert torch.equal(fixed_point(f, z0, args=(x,), tol=1e-12), info.forward.z)

    z, info = fixed_point(
        f,
        z0,
        args=(x,),
        backward="unroll",
        solver="fixed_point",
        max_iter=7,
        tol=0,
        return_result=True,
    )
    manual = z0
    for _ in range(7):
        manual = f(manual, x)
    assert torch.equal(z, manual) and info.grad_steps == 7 and info.forward.nfe == 7

    z, info = fixed_point(
        f,
        z0,
        args=(x,),
        solver="fixed_point",
        max_iter=10,
        tol=0,
        backward=Truncated(k=3),
        return_result=True,
    )
    assert info.forward.nfe == 8 and info.grad_steps == 3  # 7 loops + 1 residual check
    torch.testing.assert_close(z, _loops(f, x, z0, 10), rtol=0, atol=0)

    z, info = fixed_point(
        f, z0, args=(x,), backward="truncated", max_iter=2, tol=0, return_result=True
    )  # max_iter <= k: every loop has a graph
    assert info.forward is None and info.grad_steps == 2

    z, info = fixed_point(
        f, z0, args=(x,), backward=Phantom(steps=4), tol=1e-12, return_result=True
    )
    assert info.grad_steps == 4 and info.backward is None


def _loops(f: Callable[[Tensor, Tensor], Tensor], x: Tensor, z: Tensor, n: int) -> Tensor:
    with torch.no_grad():
        for _ in range(n):
            z = f(z, x)
    return z


@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_no_grad_builds_no_graph(mode: str) -> None:
    w, u, x = tanh_params()
    with torch.no_grad():
        z, info = fixed_point(
            tanh_map(w, u),
            torch.zeros(B, D, dtype=F64),
            args=(x,),
            return_result=True,
            **EXACT[mode],
        )
    assert not z.requires_grad and z.grad_fn is None and info.grad_steps == 0


def test_info_reports_the_adjoint_solve_after_backward() -> None:
    w, u, x = tanh_params()
    z, info = fixed_point(
        tanh_map(w, u), torch.zeros(B, D, dtype=F64), args=(x,), return_result=True
    )
    assert isinstance(info, FixedPointInfo) and info.backward_mode == "ift"
    assert info.forward.status == "converged" and info.backward is None and info.grad_steps == 1
    z.sum().backward()
    assert info.backward.status == "converged"
    assert float(info.backward.rel_residual.max()) <= default_backward_tol(F64)
    assert info.backward.nfe <= IFT().max_iter == 100


def test_default_backward_tolerances() -> None:
    assert default_backward_tol(torch.float64) == 1e-10
    assert default_backward_tol(torch.float32) == pytest.approx(1.19e-6, rel=1e-2)


def test_lazy_exports() -> None:
    assert eqloop.fixed_point is fixed_point
    assert eqloop.BACKWARD_MODES == ("ift", "phantom", "truncated", "unroll")
    assert (eqloop.IFT, eqloop.Phantom, eqloop.Truncated, eqloop.Unroll) == (
        IFT,
        Phantom,
        Truncated,
        Unroll,
    )
    assert eqloop.core.backward.make_backward is make_backward
    assert eqloop.ConvergenceWarning is ConvergenceWarning


# ---------------------------------------------------------------------------------------
# Memory: bytes saved for backward against depth
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ift", "phantom", "truncated"])
def test_saved_bytes_do_not_grow_with_depth(mode: str) -> None:
    w, u, x = tanh_params()
    f = tanh_map(w, u)
    z0 = torch.zeros(B, D, dtype=F64)

    def run(loops: int) -> int:
        return saved_bytes(
            None, lambda: fixed_point(f, z0, args=(x,), backward=mode, max_iter=loops, tol=0)
        )

    assert run(64) <= 1.1 * run(8)  # truncated keeps its k=8 loops either way


def test_saved_bytes_grow_linearly_when_unrolled() -> None:
    w, u, x = tanh_params()
    f = tanh_map(w, u)
    z0 = torch.zeros(B, D, dtype=F64)

    def run(loops: int) -> int:
        return saved_bytes(
            None,
            lambda: fixed_point(
                f, z0, args=(x,), backward="unroll", solver="fixed_point", max_iter=loops, tol=0
            ),
        )

    per_loop = (run(8) - run(4)) / 4
    assert per_loop >= B * D * 8  # at least one (B, D) float64 state per loop
    assert run(64) - run(4) == pytest.approx(60 * per_loop, rel=0.01)


# ---------------------------------------------------------------------------------------
# Failures are reported; bad arguments are named
# ---------------------------------------------------------------------------------------


def test_forward_non_convergence_warns_unless_tol_is_zero() -> None:
    w, u, x = tanh_params()
    f = tanh_map(w, u)
    z0 = torch.zeros(B, D, dtype=F64)
    with pytest.warns(ConvergenceWarning, match="forward solve .* 'max_iter'"):
        fixed_point(f, z0, args=(x,), max_iter=2, tol=1e-12)
    with pytest.warns(ConvergenceWarning, match="unroll"):
        fixed_point(f, z0, args=(x,), backward="unroll", solver="fixed_point", max_iter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed_point(f, z0, args=(x,), max_iter=2, tol=0)
        fixed_point(f, z0, args=(x,), max_iter=2, tol=1e-12, check_every=None)


def test_adjoint_non_convergence_warns() -> None:
    w, u, x = tanh_params()
    z = fixed_point(
        tanh_map(w, u),
        torch.zeros(B, D, dtype=F64),
        args=(x,),
        backward=IFT(max_iter=2, tol=1e-14),
    )
    with pytest.warns(ConvergenceWarning, match="adjoint"):
        z.sum().backward()


def test_raise_on_failure_covers_every_solve() -> None:
    w, u, x = tanh_params()
    f = tanh_map(w, u)
    z0 = torch.zeros(B, D, dtype=F64)
    with pytest.raises(solvers.SolveError):
        fixed_point(f, z0, args=(x,), max_iter=2, raise_on_failure=True)
    with pytest.raises(solvers.SolveError):
        fixed_point(
            f,
            z0,
            args=(x,),
            backward="unroll",
            solver="fixed_point",
            max_iter=2,
            raise_on_failure=True,
        )
    z = fixed_point(f, z0, args=(x,), backward=IFT(max_iter=1, tol=1e-14), raise_on_failure=True)
    with pytest.raises(solvers.SolveError):
        z.sum().backward()


def test_nans_are_not_hidden() -> None:
    w = torch.full((D, D), math.nan, dtype=F64, requires_grad=True)
    x = torch.randn(B, D, dtype=F64)
    with pytest.warns(ConvergenceWarning, match="non-finite"):
        z = fixed_point(lambda z: z @ w.T + x, torch.zeros(B, D, dtype=F64))
    assert z.isnan().all()

    w, u, x = tanh_params()
    z = fixed_point(tanh_map(w, u), torch.zeros(B, D, dtype=F64), args=(x,))
    with pytest.warns(ConvergenceWarning, match="NaN"):
        (z * math.nan).sum().backward()
    assert w.grad.isnan().all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(backward="adjoint"), r"backward must be one of \('ift', 'phantom'"),
        (dict(solver="newton"), "unknown solver 'newton'"),
        (dict(m=0), "m .* must be an integer >= 1"),
        (dict(foo=1), r"unknown option\(s\) \['foo'\]"),
        (dict(max_iter=0), "max_iter must be an integer >= 1"),
        (dict(tol=-1.0), "tol must be a number >= 0"),
        (dict(tol=math.inf), "tol must be a finite number"),
        (dict(stop_mode="max"), "stop_mode must be one of 'rel', 'abs'"),
        (dict(backward="unroll"), "backward='unroll' .* solver must be 'fixed_point'"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], match: str) -> None:
    w, u, x = tanh_params()
    with pytest.raises(ValueError, match=match):
        fixed_point(tanh_map(w, u), torch.zeros(B, D, dtype=F64), args=(x,), **kwargs)


def test_bad_types_are_named() -> None:
    z0 = torch.zeros(B, D)
    with pytest.raises(TypeError, match="f must be callable"):
        fixed_point("f", z0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="z0 must be a floating-point"):
        fixed_point(lambda z: z, torch.zeros(B, D, dtype=torch.long))
    with pytest.raises(TypeError, match="backward must be a mode name"):
        fixed_point(lambda z: z, z0, backward=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tol must be a number"):
        fixed_point(lambda z: z, z0, tol=True)
    with pytest.raises(ValueError, match="hyperparameters belong in its constructor"):
        fixed_point(lambda z: z, z0, solver=solvers.Anderson(m=3), m=4)


def test_removed_keywords_name_their_replacement() -> None:
    z0 = torch.zeros(B, D)
    with pytest.raises(TypeError, match=r"backward=eqloop.Truncated\(k=\.\.\.\)"):
        fixed_point(lambda z: 0.5 * z, z0, truncate_k=3)


def test_backward_keywords_are_shorthand_for_ift_fields() -> None:
    """The public backward_* keywords of DESIGN.md set the IFT adjoint solve's fields."""
    w, u, x = tanh_params(seed=11)
    f = tanh_map(w, u)
    z0 = torch.zeros(B, D, dtype=F64)

    def adjoint(**kwargs: Any) -> tuple[Tensor, Any]:
        z, info = fixed_point(
            f, z0, args=(x,), tol=1e-12, max_iter=300, return_result=True, **kwargs
        )
        (grad,) = torch.autograd.grad(z.sum(), w)
        return grad, info.backward

    short, short_info = adjoint(backward_solver="broyden", backward_max_iter=7, backward_tol=0.0)
    full, full_info = adjoint(backward=IFT(solver="broyden", max_iter=7, tol=0.0))
    assert torch.equal(short, full)
    assert short_info.nfe == full_info.nfe == 7 and short_info.solver == "broyden"
    with pytest.raises(TypeError, match=r"\['backward_tol'\] configure the IFT.*'phantom'"):
        fixed_point(f, z0, args=(x,), backward="phantom", backward_tol=1e-6)


# ---------------------------------------------------------------------------------------
# Backward modes as objects
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_a_name_means_the_default_object(mode: str) -> None:
    """backward="ift" and backward=IFT() give bit-identical values and gradients."""
    w, u, x = tanh_params(seed=10)
    f = tanh_map(w, u)
    z0 = torch.zeros(B, D, dtype=F64)
    solver = "fixed_point" if mode == "unroll" else "anderson"

    def run(backward: str | Backward) -> tuple[Tensor, Tensor]:
        z = fixed_point(f, z0, args=(x,), solver=solver, backward=backward, max_iter=30, tol=0)
        return z.detach(), flat(torch.autograd.grad(z.sum(), (w, u, x)))

    default = make_backward(mode)
    assert (
        default
        == {"ift": IFT(), "phantom": Phantom(), "truncated": Truncated(), "unroll": Unroll()}[mode]
    )
    by_name, by_object = run(mode), run(default)
    assert torch.equal(by_name[0], by_object[0]) and torch.equal(by_name[1], by_object[1])


def test_defaults_of_the_backward_objects() -> None:
    assert (IFT().solver, IFT().max_iter, IFT().tol) == (None, 100, None)
    assert (Phantom().steps, Phantom().tau) == (5, 1.0)
    assert Truncated().k == 8
    assert make_backward("ift", max_iter=50, tol=1e-8) == IFT(max_iter=50, tol=1e-8)
    mode = Phantom(steps=3)
    assert make_backward(mode) is mode
    with pytest.raises(FrozenInstanceError):
        mode.steps = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: IFT(solvr="broyden"), "solvr"),
        (lambda: Phantom(step=3), "step"),
        (lambda: Truncated(truncate_k=3), "truncate_k"),
        (lambda: Unroll(k=1), "k"),
        (
            lambda: make_backward("ift", solvr="broyden"),
            r"\['solvr'\].*\['solver', 'max_iter', 'tol'\]",
        ),
        (lambda: make_backward("unroll", tau=0.5), r"\['tau'\].*no options"),
        (lambda: make_backward(IFT(), max_iter=3), r"\['max_iter'\].*constructor"),
    ],
)
def test_unknown_fields_raise_type_error_naming_them(build: Callable[[], Any], field: str) -> None:
    with pytest.raises(TypeError, match=field):
        build()


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: IFT(max_iter=0), ValueError, "IFT.max_iter must be an integer >= 1"),
        (lambda: IFT(max_iter=True), TypeError, "IFT.max_iter must be an integer"),
        (lambda: IFT(tol=math.inf), ValueError, "IFT.tol must be a finite number"),
        (lambda: IFT(tol=-1e-3), ValueError, "IFT.tol must be a number >= 0"),
        (lambda: IFT(solver="nope"), ValueError, "IFT.solver must be one of"),
        (lambda: IFT(solver=3), TypeError, "IFT.solver must be None, a registered solver name"),
        (lambda: Phantom(steps=0), ValueError, "Phantom.steps must be an integer >= 1"),
        (lambda: Phantom(steps=2.5), TypeError, "Phantom.steps must be an integer"),
        (lambda: Phantom(tau=0.0), ValueError, r"Phantom.tau must be a number > 0 and <= 1"),
        (lambda: Phantom(tau=1.5), ValueError, r"Phantom.tau must be a number > 0 and <= 1"),
        (lambda: Truncated(k=0), ValueError, "Truncated.k must be an integer >= 1"),
        (lambda: make_backward("adjoint"), ValueError, r"backward must be one of \('ift'"),
    ],
)
def test_bad_fields_are_named(build: Callable[[], Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build()


def test_phantom_and_truncated_match_their_hand_written_formulas() -> None:
    """The gradient of each mode is the one of its definition, written out by hand."""
    w, u, x = tanh_params(seed=11)
    f = tanh_map(w, u)
    z0 = torch.zeros(B, D, dtype=F64)
    inputs = (w, u, x)

    def grads(z: Tensor) -> Tensor:
        return flat(torch.autograd.grad((z * z).sum(), inputs))

    z_star = fixed_point(f, z0, args=(x,), tol=1e-12).detach()
    hand = z_star
    for _ in range(3):  # Phantom(steps=3, tau=0.5) from the detached fixed point
        hand = torch.lerp(hand, f(hand, x), 0.5)
    got = fixed_point(f, z0, args=(x,), tol=1e-12, backward=Phantom(steps=3, tau=0.5))
    torch.testing.assert_close(got, hand, rtol=0, atol=0)
    torch.testing.assert_close(grads(got), grads(hand), rtol=1e-14, atol=0)

    hand = _loops(f, x, z0, 6)  # Truncated(k=4) of 10 loops: 6 without a graph, 4 with
    for _ in range(4):
        hand = f(hand, x)
    got = fixed_point(
        f, z0, args=(x,), solver="fixed_point", max_iter=10, tol=0, backward=Truncated(k=4)
    )
    torch.testing.assert_close(got, hand, rtol=0, atol=0)
    torch.testing.assert_close(grads(got), grads(hand), rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "backward", [Unroll(), Truncated(k=6)], ids=["unroll", "truncated-every-loop"]
)
def test_gradcheck_when_every_loop_has_a_graph(backward: Backward) -> None:
    """6 loops, all with a graph: the gradient is the exact derivative of f^6(z0)."""
    w, u, x = tanh_params(seed=12)
    z0 = torch.zeros(B, D, dtype=F64)

    def solve(w: Tensor, u: Tensor, x: Tensor) -> Tensor:
        return fixed_point(
            tanh_map(w, u),
            z0,
            args=(x,),
            solver="fixed_point",
            max_iter=6,
            tol=0,
            backward=backward,
        )

    assert torch.autograd.gradcheck(solve, (w, u, x))


def test_unroll_stops_each_sample_on_its_own() -> None:
    """Each sample returns f of its last loop; converged samples are frozen."""
    g = torch.Generator().manual_seed(13)
    rates = torch.tensor([0.1, 0.5, 0.9], dtype=F64).unsqueeze(1)  # one contraction per row
    c = torch.randn(B, D, generator=g, dtype=F64, requires_grad=True)

    def f(z: Tensor, rate: Tensor, c: Tensor) -> Tensor:
        return rate * z + c

    z0 = torch.zeros(B, D, dtype=F64)
    z, info = fixed_point(
        f,
        z0,
        args=(rates, c),
        solver="fixed_point",
        backward="unroll",
        tol=1e-6,
        max_iter=200,
        return_result=True,
        compact=True,
    )
    steps = info.forward.nstep
    assert steps[0] < steps[1] < steps[2] < 200 and info.forward.status == "converged"
    for b in range(B):
        hand = z0[b]
        for _ in range(int(steps[b])):
            hand = rates[b] * hand + c[b]
        torch.testing.assert_close(z[b], hand, rtol=1e-15, atol=1e-15)
    # d z_b / d c_b = sum_{t < n_b} rate_b^t, the derivative of the loops sample b ran.
    (gc,) = torch.autograd.grad(z.sum(), (c,))
    want = (1 - rates.squeeze(1) ** steps.to(F64)) / (1 - rates.squeeze(1))
    torch.testing.assert_close(gc, want.unsqueeze(1).expand(B, D), rtol=1e-12, atol=0)


def test_convergence_warnings_point_at_the_callers_line() -> None:
    w, u, x = tanh_params()
    f = tanh_map(w, u)
    z0 = torch.zeros(B, D, dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = fixed_point(f, z0, args=(x,), max_iter=2, tol=1e-12, backward=IFT(max_iter=2))
        z.sum().backward()
    stages = [("forward" in str(w.message), "adjoint" in str(w.message)) for w in caught]
    assert stages == [(True, False), (False, True)]
    assert [w.category for w in caught] == [ConvergenceWarning] * 2
    assert {w.filename for w in caught} == {__file__}
