"""A catalogue of batched fixed-point problems ``z = f(z, *args)`` with known answers.

In the spirit of torchdiffeq's ``tests/problems.py``: every problem carries its answer
``z_star``, obtained independently of the solvers under test (a dense linear solve, a
closed form, or a very long float64 iteration), and a Lipschitz bound ``lipschitz``
of ``f`` near the answer, so that a residual ``r = ||f(z) - z||`` bounds the error:
``||z - z*|| <= r / (1 - lipschitz)``.

>>> p = make_problem("affine", torch.float64)
>>> bool(torch.allclose(p.f(p.z_star, *p.args), p.z_star))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

Map = Callable[..., Tensor]

#: Cosine's fixed point (the Dottie number), to 15 digits.
DOTTIE = 0.739085133215161


@dataclass(frozen=True)
class FixedPointProblem:
    """One batched fixed-point problem and its answer.

    Attributes:
        name: catalogue name.
        f: the map, called as ``f(z, *args)``; preserves the shape (B, ...).
        z0: (B, ...) initial guess.
        z_star: (B, ...) the fixed point of every sample.
        args: per-sample tensors passed to ``f`` after ``z``.
        lipschitz: a bound < 1 on the Lipschitz constant of ``f`` around the answer,
            for every sample.
        rates: (B,) per-sample contraction rates when they differ by design, else None.
    """

    name: str
    f: Map
    z0: Tensor
    z_star: Tensor
    args: tuple[Tensor, ...] = ()
    lipschitz: float = 0.5
    rates: Tensor | None = None

    def residual(self, z: Tensor) -> Tensor:
        """Per-sample ``||f(z) - z||_2``, shape (B,)."""
        return torch.linalg.vector_norm((self.f(z, *self.args) - z).flatten(1), dim=1)

    def error(self, z: Tensor) -> Tensor:
        """Per-sample ``||z - z*||_2``, shape (B,)."""
        return torch.linalg.vector_norm((z - self.z_star).flatten(1), dim=1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scaled(w: Tensor, norm: float) -> Tensor:
    """``w`` rescaled to spectral norm ``norm``."""
    return w * (norm / torch.linalg.matrix_norm(w, ord=2))


def affine(dtype: torch.dtype, device: str = "cpu") -> FixedPointProblem:
    """``f(z) = z A^T + b`` with one shared ``A``, ``||A||_2 = 0.6``; z is (5, 6).

    Answer: ``(I - A) z* = b`` by ``torch.linalg.solve`` in float64.
    """
    g = _generator(0)
    n, batch = 6, 5
    a = _scaled(torch.randn(n, n, generator=g, dtype=torch.float64), 0.6)
    b = torch.randn(batch, n, generator=g, dtype=torch.float64)
    z0 = torch.randn(batch, n, generator=g, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - a, b.T).T
    a_, b_ = a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device)

    def f(z: Tensor) -> Tensor:
        return z @ a_.T + b_

    return FixedPointProblem(
        "affine",
        f,
        z0.to(dtype=dtype, device=device),
        z_star.to(dtype=dtype, device=device),
        lipschitz=0.6,
    )


def affine_2d(dtype: torch.dtype, device: str = "cpu") -> FixedPointProblem:
    """``f(z) = z M^T + C`` on the last axis of z of shape (3, 2, 4): a non-flat state.

    Each sample has its own ``C``; ``||M||_2 = 0.5``. Answer by ``torch.linalg.solve``.
    """
    g = _generator(1)
    n = 4
    m = _scaled(torch.randn(n, n, generator=g, dtype=torch.float64), 0.5)
    c = torch.randn(3, 2, n, generator=g, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - m, c.reshape(-1, n).T)
    z_star = z_star.T.reshape(3, 2, n)
    m_, c_ = m.to(dtype=dtype, device=device), c.to(dtype=dtype, device=device)

    def f(z: Tensor) -> Tensor:
        return z @ m_.T + c_

    z0 = torch.zeros(3, 2, n, dtype=dtype, device=device)
    return FixedPointProblem(
        "affine_2d", f, z0, z_star.to(dtype=dtype, device=device), lipschitz=0.5
    )


def cosine(dtype: torch.dtype, device: str = "cpu") -> FixedPointProblem:
    """``z = cos(z)`` elementwise on (4, 2, 3); every entry converges to the Dottie number.

    ``cos`` maps everything into [-1, 1] and then into [cos 1, 1], where it contracts
    with rate at most ``sin 1 < 0.85``.
    """
    z0 = torch.linspace(-2.0, 2.0, 24, dtype=torch.float64).reshape(4, 2, 3)
    z_star = torch.full_like(z0, DOTTIE)
    return FixedPointProblem(
        "cosine",
        lambda z: torch.cos(z),
        z0.to(dtype=dtype, device=device),
        z_star.to(dtype=dtype, device=device),
        lipschitz=0.85,
    )


@cache
def _tanh_net_float64() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Weights, inputs and the float64 fixed point of the tanh network (cached)."""
    g = _generator(2)
    d, batch = 8, 6
    w = _scaled(torch.randn(d, d, generator=g, dtype=torch.float64), 0.8)
    u = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    c = 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(batch, d, generator=g, dtype=torch.float64)
    z = torch.zeros(batch, d, dtype=torch.float64)
    for _ in range(2000):  # 0.8 ** 2000 ~ 1e-194: exact to float64 rounding
        z = torch.tanh(z @ w.T + x @ u.T + c)
    residual = (torch.tanh(z @ w.T + x @ u.T + c) - z).abs().max()
    assert residual < 1e-14, f"reference iteration did not converge: {residual:.3e}"
    return w, u, c, x, z


def tanh_net(dtype: torch.dtype, device: str = "cpu") -> FixedPointProblem:
    """``f(z, x) = tanh(z W^T + x U^T + c)``, ``||W||_2 = 0.8``, input ``x`` as an arg.

    Answer: 2000 float64 iterations (the map contracts with rate at most 0.8).
    """
    w, u, c, x, z_star = (t.to(dtype=dtype, device=device) for t in _tanh_net_float64())

    def f(z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z @ w.T + x @ u.T + c)

    return FixedPointProblem(
        "tanh_net", f, torch.zeros_like(z_star), z_star, args=(x,), lipschitz=0.8
    )


def mixed_rates(dtype: torch.dtype, device: str = "cpu") -> FixedPointProblem:
    """``f(z, r, b) = r * (z Q^T) + b`` with ``Q`` orthogonal: sample i contracts at r_i.

    The rates (0.02, 0.3, 0.7, 0.9) differ by design, so samples need very different
    numbers of steps. ``r`` (B, 1) and ``b`` (B, 5) are passed as args, so the map works
    on any subset of the batch (needed for compaction). Answer by ``torch.linalg.solve``.
    """
    g = _generator(3)
    n = 5
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    rates = torch.tensor([0.02, 0.3, 0.7, 0.9], dtype=torch.float64)
    b = torch.randn(rates.shape[0], n, generator=g, dtype=torch.float64)
    lhs = torch.eye(n, dtype=torch.float64) - rates[:, None, None] * q  # (B, n, n)
    z_star = torch.linalg.solve(lhs, b.unsqueeze(2)).squeeze(2)
    q_ = q.to(dtype=dtype, device=device)

    def f(z: Tensor, r: Tensor, b: Tensor) -> Tensor:
        return r * (z @ q_.T) + b

    r_ = rates[:, None].to(dtype=dtype, device=device)
    b_ = b.to(dtype=dtype, device=device)
    return FixedPointProblem(
        "mixed_rates",
        f,
        torch.zeros(rates.shape[0], n, dtype=dtype, device=device),
        z_star.to(dtype=dtype, device=device),
        args=(r_, b_),
        lipschitz=0.9,
        rates=rates.to(device=device),
    )


#: Catalogue name -> builder ``(dtype, device) -> FixedPointProblem``.
PROBLEMS: dict[str, Callable[..., FixedPointProblem]] = {
    "affine": affine,
    "affine_2d": affine_2d,
    "cosine": cosine,
    "tanh_net": tanh_net,
    "mixed_rates": mixed_rates,
}


def make_problem(name: str, dtype: torch.dtype, device: str = "cpu") -> FixedPointProblem:
    """Build catalogue problem ``name`` in ``dtype`` on ``device``."""
    return PROBLEMS[name](dtype, device)
