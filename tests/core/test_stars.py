"""Tests for eqloop.core.stars: spectral-radius estimators and the STARS (JSRR) penalty.

References are dense: per-sample Jacobians from ``torch.func.jacrev`` and
``torch.linalg.eigvals``, or closed forms for linear maps ``f(z) = z A^T``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err_per_sample
from torch import Tensor, nn

from eqloop.core.stars import (
    METHODS,
    PRODUCTS,
    JSRRResult,
    PenaltySchedule,
    jacobian_eigvals,
    jsrr_penalty,
    spectral_radius,
)

Map = Callable[[Tensor], Tensor]

# torch's forward-mode AD registers TorchScript decompositions on first use, and
# torch.jit.script warns about its own deprecation (torch 2.13); not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


# ---------------------------------------------------------------------------------------
# Problems with known answers
# ---------------------------------------------------------------------------------------


def tanh_map(
    d: int, kind: str, scale: float, seed: int, batch: int = 8, dtype: torch.dtype = torch.float32
) -> tuple[Map, Tensor]:
    """``f(z) = tanh(z W^T + x U^T)`` and its fixed point ``z*`` of shape ``(batch, d)``.

    ``kind="gauss"``: Gaussian ``W`` scaled to spectral norm ``scale``;
    ``kind="sym"``: symmetric ``W`` scaled to spectral radius ``scale``. Each sample has
    its own input ``x``, hence its own fixed point and Jacobian ``diag(1 - z*^2) W``.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, d, generator=g, dtype=torch.float64)
    if kind == "gauss":
        w = w * scale / torch.linalg.matrix_norm(w, ord=2)
    else:
        w = (w + w.T) / 2
        w = w * scale / torch.linalg.eigvalsh(w).abs().max()
    u = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    x = torch.randn(batch, d, generator=g, dtype=torch.float64)
    w, u, x = w.to(dtype), u.to(dtype), x.to(dtype)

    def f(z: Tensor) -> Tensor:
        return torch.tanh(z @ w.T + x @ u.T)

    z = torch.zeros(batch, d, dtype=dtype)
    for _ in range(2000):  # contraction with factor <= 0.99: converged to round-off
        z = f(z)
    return f, z


def linear_map(a: Tensor) -> Map:
    """``f(z) = z A^T`` on ``(B, n)``: every sample's Jacobian is ``A``."""
    return lambda z: z @ a.T


def skewed_pair_matrix(kind: str, n: int = 16, skew: float = 0.01, seed: int = 0) -> Tensor:
    """``(n, n)`` float64 matrix whose dominant eigenvalues are a pair of modulus 0.9.

    ``kind="complex"``: ``0.9 exp(+-i)``; ``kind="pm"``: ``+-0.9``. The pair's two
    eigenvectors are ``skew`` radians apart, so the single-step power ratio oscillates
    strongly; the other eigenvalues lie in ``(-0.5, 0.5)``.
    """
    g = torch.Generator().manual_seed(seed)
    b = torch.diag(torch.rand(n, generator=g, dtype=torch.float64) - 0.5)
    if kind == "complex":
        c, s = math.cos(1.0), math.sin(1.0)
        b[:2, :2] = 0.9 * torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    else:
        b[0, 0], b[1, 1] = 0.9, -0.9
    basis = torch.eye(n, dtype=torch.float64)
    basis[:2, 1] = torch.tensor([math.cos(skew), math.sin(skew)], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ basis @ b @ torch.linalg.inv(basis) @ q.T


def jacrev_rho(f: Map, z: Tensor) -> Tensor:
    """Dense reference: ``(B,)`` spectral radii from ``torch.func.jacrev`` per sample."""
    radii = []
    for i in range(z.shape[0]):

        def sample_map(zi: Tensor, i: int = i) -> Tensor:
            return f(torch.cat([z[:i], zi.unsqueeze(0), z[i + 1 :]]))[i]

        jac = torch.func.jacrev(sample_map)(z[i]).reshape(z[i].numel(), z[i].numel())
        radii.append(torch.linalg.eigvals(jac.double()).abs().max())
    return torch.stack(radii)


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


class CausalSelfAttention(nn.Module):
    """A tiny post-LayerNorm causal self-attention block with input injection.

    ``forward(z) = LayerNorm(z + proj(SDPA(q, k, v, causal)) + x)`` on ``(B, T, d)``.
    """

    def __init__(self, d: int, heads: int, x: Tensor) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.register_buffer("x", x)

    def forward(self, z: Tensor) -> Tensor:
        b, t, d = z.shape
        q, k, v = self.qkv(z).split(d, dim=-1)
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.norm(z + self.proj(out) + self.x)


# ---------------------------------------------------------------------------------------
# spectral_radius and jacobian_eigvals
# ---------------------------------------------------------------------------------------


def test_jacobian_eigvals_matches_jacrev() -> None:
    f, z = tanh_map(12, "gauss", 0.9, seed=0, batch=3, dtype=torch.float64)
    eig = jacobian_eigvals(f, z)
    assert eig.shape == (3, 12) and eig.is_complex()
    torch.testing.assert_close(eig.abs().amax(dim=1), jacrev_rho(f, z), rtol=1e-10, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [0.9, 0.99])
@pytest.mark.parametrize("kind", ["gauss", "sym"])
def test_estimators_meet_accuracy_targets(kind: str, scale: float, seed: int) -> None:
    """Acceptance targets: arnoldi(20) within 2%, power(100) within 5% of the dense rho."""
    f, z = tanh_map(32, kind, scale, seed)
    dense = jacrev_rho(f, z)
    torch.testing.assert_close(
        jacobian_eigvals(f, z).abs().amax(1).double(), dense, rtol=1e-4, atol=0
    )
    arnoldi = spectral_radius(f, z, "arnoldi", 20, generator=gen(seed))
    power = spectral_radius(f, z, "power", 100, generator=gen(seed))
    assert arnoldi.shape == power.shape == (8,)
    assert rel_err_per_sample(arnoldi, dense).max() < 0.02
    assert rel_err_per_sample(power, dense).max() < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("d", [32, 48, 64])
def test_estimator_accuracy_sweep(d: int) -> None:
    """Larger sweep: 2 kinds x 2 scales x 10 seeds x 8 samples per width.

    With 20 Krylov vectors a few samples of the 64-wide Gaussian maps, whose top
    eigenvalues cluster within a few percent, land on the second eigenvalue or overshoot
    (non-normality), so this asserts the bulk and a looser worst case.
    """
    power_errs, arnoldi_errs = [], []
    for kind in ("gauss", "sym"):
        for scale in (0.9, 0.99):
            for seed in range(10):
                f, z = tanh_map(d, kind, scale, seed)
                dense = jacobian_eigvals(f, z).abs().amax(dim=1)
                power = spectral_radius(f, z, "power", 100, generator=gen(seed))
                arnoldi = spectral_radius(f, z, "arnoldi", 20, generator=gen(seed))
                power_errs.append(rel_err_per_sample(power, dense))
                arnoldi_errs.append(rel_err_per_sample(arnoldi, dense))
    power_err, arnoldi_err = torch.cat(power_errs), torch.cat(arnoldi_errs)
    assert (power_err < 0.05).double().mean() >= 0.99
    assert (arnoldi_err < 0.02).double().mean() >= 0.95
    assert arnoldi_err.max() < 0.15


@pytest.mark.parametrize("kind", ["complex", "pm"])
def test_arnoldi_resolves_dominant_pairs(kind: str) -> None:
    a = skewed_pair_matrix(kind)
    z = torch.zeros(4, 16, dtype=torch.float64)
    rho = spectral_radius(linear_map(a), z, "arnoldi", 20, generator=gen(0))
    torch.testing.assert_close(rho, torch.full((4,), 0.9, dtype=torch.float64), rtol=1e-8, atol=0)


def test_power_stalls_on_skewed_complex_pair() -> None:
    """The motivation for arnoldi: the same 20 products leave power iteration >2% off."""
    z = torch.zeros(4, 16, dtype=torch.float64)
    rho = spectral_radius(
        linear_map(skewed_pair_matrix("complex")), z, "power", 20, generator=gen(0)
    )
    assert rel_err_per_sample(rho, torch.full((4,), 0.9)).max() > 0.02


def test_power_even_window_cancels_pm_pair() -> None:
    z = torch.zeros(4, 16, dtype=torch.float64)
    rho = spectral_radius(linear_map(skewed_pair_matrix("pm")), z, "power", 50, generator=gen(0))
    torch.testing.assert_close(rho, torch.full((4,), 0.9, dtype=torch.float64), rtol=1e-8, atol=0)


def test_arnoldi_breakdown_restarts_with_fresh_direction() -> None:
    """An eigenvector start makes the Krylov space invariant after one step."""
    a = torch.diag(torch.tensor([0.9, 0.5, 0.3, 0.1, -0.2, 0.0], dtype=torch.float64))
    z = torch.zeros(3, 6, dtype=torch.float64)
    v0 = torch.zeros_like(z)
    v0[:, 1] = 1.0  # eigenvector of 0.5
    rho, v = spectral_radius(linear_map(a), z, "arnoldi", 6, v0=v0, return_vectors=True)
    torch.testing.assert_close(rho, torch.full((3,), 0.9, dtype=torch.float64))
    assert torch.isfinite(v).all()


@pytest.mark.parametrize("method", METHODS)
def test_zero_jacobian_and_short_states(method: str) -> None:
    zero = torch.zeros(2, 5)
    rho = spectral_radius(lambda z: 0.0 * z, zero, method, 10)
    assert torch.equal(rho, torch.zeros(2))
    a = torch.tensor([[0.0, 0.8], [-0.8, 0.0]])  # eigenvalues +-0.8i, n = 2 < iters
    rho = spectral_radius(linear_map(a), torch.zeros(2, 2), method, 20, generator=gen(0))
    torch.testing.assert_close(rho, torch.full((2,), 0.8))


@pytest.mark.parametrize("method", METHODS)
def test_warm_start_is_not_worse(method: str) -> None:
    iters = 8 if method == "arnoldi" else 10
    f, z = tanh_map(32, "sym", 0.99, seed=3)
    dense = jacobian_eigvals(f, z).abs().amax(dim=1)
    cold, v = spectral_radius(f, z, method, iters, return_vectors=True, generator=gen(0))
    warm = spectral_radius(f, z, method, iters, v0=v)
    assert rel_err_per_sample(warm, dense).mean() < 0.5 * rel_err_per_sample(cold, dense).mean()


@pytest.mark.parametrize("method", METHODS)
def test_multi_dim_state_and_attention_block(method: str) -> None:
    torch.manual_seed(0)
    block = CausalSelfAttention(8, 2, x=torch.randn(2, 4, 8)).eval()
    z = torch.randn(2, 4, 8)
    dense = jacobian_eigvals(block, z).abs().amax(dim=1)
    rho, v = spectral_radius(
        block, z, method, 200 if method == "power" else 32, return_vectors=True, generator=gen(0)
    )
    assert v.shape == z.shape and not rho.requires_grad
    torch.testing.assert_close(v.flatten(1).norm(dim=1), torch.ones(2))
    assert rel_err_per_sample(rho, dense).max() < (0.05 if method == "power" else 1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_reproducible_dtype_and_no_graph(method: str) -> None:
    w = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    f = linear_map(w)
    r1 = spectral_radius(f, z, method, 5, generator=gen(7))
    r2 = spectral_radius(f, z, method, 5, generator=gen(7))
    assert torch.equal(r1, r2)
    assert r1.dtype == torch.float64 and not r1.requires_grad


def test_spectral_radius_errors() -> None:
    f, z = linear_map(torch.eye(3)), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="power, arnoldi"):
        spectral_radius(f, z, "lanczos")
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"iters must be an integer >= 1, got {bad}"):
            spectral_radius(f, z, "power", bad)
    for bad in (2.5, True):
        with pytest.raises(TypeError, match="iters must be an integer, got"):
            spectral_radius(f, z, "power", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="v0"):
        spectral_radius(f, z, v0=torch.ones(2, 4))
    for method in METHODS:
        with pytest.raises(ValueError, match="same shape"):
            spectral_radius(lambda z: z[:, :-1], z, method)


# ---------------------------------------------------------------------------------------
# jsrr_penalty
# ---------------------------------------------------------------------------------------


def unit_rows(x: Tensor) -> Tensor:
    """Rows of ``x`` ``(B, n)`` scaled to unit norm."""
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("product", PRODUCTS)
def test_penalty_linear_closed_form(product: str) -> None:
    g = gen(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    v = unit_rows(torch.randn(4, 5, generator=g, dtype=torch.float64))
    z = torch.randn(4, 5, generator=g, dtype=torch.float64)
    pen = jsrr_penalty(linear_map(a), z, product=product, v=v)
    jac = a if product == "jvp" else a.T  # J v, or v^T J = (A^T v)^T
    torch.testing.assert_close(pen, (v @ jac.T).pow(2).sum(dim=1).mean())


def test_default_penalty_is_paper_hutchinson() -> None:
    """Default: VJP from random unit v; E ||v^T J||^2 = ||J||_F^2 / n."""
    a = torch.randn(6, 6, generator=gen(1), dtype=torch.float64)
    z = torch.zeros(20000, 6, dtype=torch.float64)
    pen = jsrr_penalty(linear_map(a), z, generator=gen(2))
    v = unit_rows(torch.randn(z.shape, generator=gen(2), dtype=torch.float64))
    torch.testing.assert_close(pen, (v @ a).pow(2).sum(dim=1).mean())
    frobenius = a.pow(2).sum() / 6
    assert abs(pen.item() - frobenius.item()) < 0.03 * frobenius.item()


def tiny_tanh(w: Tensor, bias: Tensor) -> Map:
    """``f(z) = tanh(z W^T + b)`` on ``(B, n)``."""
    return lambda z: torch.tanh(z @ w.T + bias)


@pytest.mark.parametrize("target", [None, 0.2])
@pytest.mark.parametrize("product", PRODUCTS)
def test_penalty_gradient_finite_differences(product: str, target: float | None) -> None:
    g = gen(3)
    z = torch.randn(2, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 4, generator=g, dtype=torch.float64)
    w0 = 0.7 * torch.randn(4, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)

    def penalty(w: Tensor) -> Tensor:
        return jsrr_penalty(tiny_tanh(w, bias), z, product=product, v=v, target=target)

    assert penalty(w0) > 0
    assert torch.autograd.gradcheck(penalty, (w0.requires_grad_(True),))


@pytest.mark.parametrize("product", PRODUCTS)
def test_power_steps_carry_graph_through_last_step_only(product: str) -> None:
    """k steps: value and gradient of one step from the detached (k-1)-th vector."""
    g = gen(5)
    z = torch.randn(3, 4, generator=g, dtype=torch.float64)
    v0 = unit_rows(torch.randn(3, 4, generator=g, dtype=torch.float64))
    w = (0.7 * torch.randn(4, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    f = tiny_tanh(w, torch.zeros(4, dtype=torch.float64))
    v = v0
    with torch.no_grad():
        for _ in range(2):
            step = (
                torch.func.jvp(f, (z,), (v,))[1]
                if product == "jvp"
                else torch.func.vjp(f, z)[1](v)[0]
            )
            v = unit_rows(step)
    three = jsrr_penalty(f, z, product=product, power_steps=3, v=v0)
    one = jsrr_penalty(f, z, product=product, v=v)
    torch.testing.assert_close(three, one)
    torch.testing.assert_close(torch.autograd.grad(three, w)[0], torch.autograd.grad(one, w)[0])


@pytest.mark.parametrize("product", PRODUCTS)
def test_penalty_through_causal_attention(product: str) -> None:
    torch.manual_seed(0)
    block = CausalSelfAttention(16, 4, x=torch.randn(3, 6, 16))
    z = block(torch.randn(3, 6, 16)).detach()
    pen = jsrr_penalty(block, z, product=product, generator=gen(0))
    pen.backward()
    assert torch.isfinite(pen) and pen > 0
    for weight in (block.qkv.weight, block.proj.weight):
        assert weight.grad is not None and torch.isfinite(weight.grad).all()
        assert weight.grad.abs().sum() > 0


@pytest.mark.parametrize("product", PRODUCTS)
def test_hinge(product: str) -> None:
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen(4), dtype=torch.float64))
    a = (0.5 * q).requires_grad_(True)  # ||J v|| = 0.5 for every unit v
    z = torch.zeros(3, 5, dtype=torch.float64)
    below = jsrr_penalty(linear_map(a), z, product=product, target=0.9, generator=gen(0))
    below.backward()
    assert below.item() == 0.0 and torch.equal(a.grad, torch.zeros_like(a))
    above = jsrr_penalty(linear_map(a), z, product=product, target=0.3, generator=gen(0))
    torch.testing.assert_close(above, torch.tensor(0.04, dtype=torch.float64))


def test_detach_state() -> None:
    a = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    p = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    f = lambda z: torch.tanh(z @ a.T)  # noqa: E731
    jsrr_penalty(f, 2 * p, generator=gen(0)).backward()
    assert p.grad is None and a.grad is not None
    for product in PRODUCTS:
        jsrr_penalty(f, 2 * p, product=product, detach_state=False, generator=gen(0)).backward()
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        p.grad = None


@pytest.mark.parametrize("product", PRODUCTS)
def test_power_steps_at_fixed_point_reach_rho(product: str) -> None:
    """At z* of a symmetric-W map, k warm power steps turn the term into ~rho^2."""
    f, z_star = tanh_map(16, "sym", 0.9, seed=0, dtype=torch.float64)
    rho = jacobian_eigvals(f, z_star).abs().amax(dim=1)
    out = jsrr_penalty(
        f, z_star, product=product, power_steps=100, generator=gen(0), return_details=True
    )
    assert isinstance(out, JSRRResult)
    assert rel_err_per_sample(out.rho, rho).max() < 0.03
    assert not (out.rho.requires_grad or out.v.requires_grad)
    again = jsrr_penalty(f, z_star, product=product, power_steps=100, v=out.v, return_details=True)
    assert rel_err_per_sample(again.rho, rho).max() < 0.01
    torch.testing.assert_close(again.penalty, again.rho.pow(2).mean())


def test_penalty_errors() -> None:
    f, z = linear_map(torch.eye(3)), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="vjp, jvp"):
        jsrr_penalty(f, z, product="hvp")
    with pytest.raises(ValueError, match="power_steps"):
        jsrr_penalty(f, z, power_steps=0)
    with pytest.raises(ValueError, match="target must be a number >= 0, got -0.1"):
        jsrr_penalty(f, z, target=-0.1)
    with pytest.raises(TypeError, match="power_steps must be an integer, got float 1.0"):
        jsrr_penalty(f, z, power_steps=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="v0|shape"):
        jsrr_penalty(f, z, v=torch.ones(3, 3))
    for product in PRODUCTS:
        with pytest.raises(ValueError, match="same shape"):
            jsrr_penalty(lambda z: z.sum(dim=1, keepdim=True), z, product=product)


def test_penalty_schedule() -> None:
    paper = PenaltySchedule(start_step=2000)
    assert not paper.active(1999) and paper.active(2000) and paper.active(9999)
    sparse = PenaltySchedule(start_step=10, every=3)
    assert [s for s in range(9, 20) if sparse.active(s)] == [10, 13, 16, 19]
    with pytest.raises(ValueError, match="every"):
        PenaltySchedule(every=0)
    with pytest.raises(ValueError, match="start_step"):
        PenaltySchedule(start_step=-1)
