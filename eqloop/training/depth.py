"""Loop-count samplers for random-depth training.

A looped model trained at one fixed depth only learns that depth. Random-depth training
draws a new number of loops ``t`` for every batch instead (one draw per batch, shared by
all samples of the batch and, given the same seed, by all ranks of a distributed run):

* ``lognormal``: ``t = clamp(round(LogNormal(mu, sigma)), lo, hi)``, the STARS recipe
  (``mu=2, sigma=0.7, t in [1, 100]`` for addition, the defaults here;
  ``mu=1.7, sigma=0.4, t in [1, 16]`` for Ouro-1.4B).
* ``poisson_lognormal``: ``t = clamp(Poisson(LogNormal(mu, sigma)), lo, hi)``, the Huginn
  recipe. Huginn sets ``mu = log(mean_depth) - sigma**2 / 2`` so that the Poisson rate
  has mean ``mean_depth``.
* ``uniform``: ``t`` uniform over the integers ``lo..hi``.
* ``fixed``: always ``t``.

Every sampler owns a private NumPy generator (no global RNG), records its draws in
``history`` so that each can be logged, and round-trips through ``state_dict`` /
``load_state_dict`` so that a resumed run draws exactly the depths it would have drawn.
``pmf()`` gives the exact distribution of ``t`` over ``lo..hi`` (by numerical quadrature
for ``poisson_lognormal``, in closed form otherwise), from which ``mean()`` and
``median()`` follow.

Example::

    sampler = make_depth_sampler("lognormal", seed=0)      # STARS addition defaults
    loops = sampler.sample()                                # one int per batch
    state = sampler.state_dict()                            # JSON-serializable
"""

from __future__ import annotations

import abc
import copy
import math
from typing import Any, ClassVar

import numpy as np
from scipy import special, stats

from solvers import checks

__all__ = [
    "DEPTH_KINDS",
    "DepthSampler",
    "FixedDepth",
    "LogNormalDepth",
    "PoissonLogNormalDepth",
    "UniformDepth",
    "make_depth_sampler",
]

# Poisson rates above this cannot be drawn by NumPy; any realistic ``hi`` is far below it,
# so capping the rate leaves the clamped depth unchanged (it is ``hi`` either way).
_MAX_POISSON_RATE = 1e18
# Quadrature over the standard-normal variable of the log-rate: range and size limits.
_QUAD_HALF_WIDTH = 9.0
_QUAD_POINTS_PER_WIDTH = 4
_QUAD_MIN_POINTS = 2001
_QUAD_MAX_POINTS = 200_001
_QUAD_CHUNK_ELEMENTS = 4_000_000


class DepthSampler(abc.ABC):
    """Base class: draws one loop count per call, seeded and resumable.

    Subclasses implement ``_draw`` (one raw draw, already clamped to ``[lo, hi]``),
    ``_interior_cdf`` (the distribution) and ``params``.

    Attributes:
        kind: registry name of the sampler (``"lognormal"``, ...).
        lo: smallest depth the sampler returns (>= 1).
        hi: largest depth the sampler returns (>= lo).
        seed: seed of the private generator.
        history: every depth drawn so far, in order.
    """

    kind: ClassVar[str]

    def __init__(self, *, lo: int, hi: int, seed: int) -> None:
        self.lo = checks.integer("lo", lo, low=1)  # a model needs at least one loop
        self.hi = checks.integer("hi", hi)
        if self.lo > self.hi:
            raise ValueError(f"lo must be <= hi, got lo={lo}, hi={hi}")
        self.seed = checks.integer("seed", seed, low=0)
        self._rng = np.random.default_rng(self.seed)
        self.history: list[int] = []

    # -- drawing ---------------------------------------------------------------------------

    def sample(self) -> int:
        """Draw one depth in ``[lo, hi]`` and append it to ``history``."""
        depth = self._draw()
        self.history.append(depth)
        return depth

    @abc.abstractmethod
    def _draw(self) -> int:
        """One depth in ``[lo, hi]`` from the private generator."""

    # -- distribution ----------------------------------------------------------------------

    @abc.abstractmethod
    def _interior_cdf(self, depths: np.ndarray) -> np.ndarray:
        """``P(t <= k)`` for each ``k`` of ``depths`` (int array, values in ``[lo, hi)``)."""

    def support(self) -> np.ndarray:
        """The depths the sampler can return: ``(hi - lo + 1,)`` int64 array ``lo..hi``."""
        return np.arange(self.lo, self.hi + 1, dtype=np.int64)

    def cdf(self) -> np.ndarray:
        """``P(t <= k)`` for ``k = lo..hi``: ``(hi - lo + 1,)`` float64, ending in 1."""
        interior = self._interior_cdf(np.arange(self.lo, self.hi, dtype=np.int64))
        return np.append(np.clip(interior, 0.0, 1.0), 1.0)

    def pmf(self) -> np.ndarray:
        """``P(t = k)`` for ``k = lo..hi``: ``(hi - lo + 1,)`` float64 summing to 1."""
        return np.diff(self.cdf(), prepend=0.0)

    def mean(self) -> float:
        """Expected depth ``E[t]`` of the clamped distribution."""
        return float(self.lo + np.sum(1.0 - self.cdf()[:-1]))

    def median(self) -> int:
        """Lower median: the smallest depth ``k`` with ``P(t <= k) >= 1/2``."""
        low, high = self.lo, self.hi  # invariant: the answer lies in [low, high]
        while low < high:
            mid = (low + high) // 2
            if self._interior_cdf(np.array([mid], dtype=np.int64))[0] >= 0.5:
                high = mid
            else:
                low = mid + 1
        return low

    # -- description and checkpointing -----------------------------------------------------

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this sampler with ``make_depth_sampler``."""

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serializable snapshot: kind, params, seed, generator state and history."""
        return {
            "kind": self.kind,
            "params": self.params(),
            "seed": self.seed,
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator state and history saved by :meth:`state_dict`.

        Raises:
            ValueError: if ``state`` was saved by a sampler of another kind or with other
                parameters (resuming it would silently change the depth distribution).
        """
        missing = {"kind", "params", "rng", "history"} - set(state)
        if missing:
            raise ValueError(f"depth-sampler state is missing keys {sorted(missing)}")
        if state["kind"] != self.kind or state["params"] != self.params():
            raise ValueError(
                f"depth-sampler state is for kind={state['kind']!r} params={state['params']}, "
                f"but this sampler is kind={self.kind!r} params={self.params()}"
            )
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
        self.history = [int(t) for t in state["history"]]
        self.seed = int(state.get("seed", self.seed))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args}, seed={self.seed})"


class _LogNormalFamily(DepthSampler):
    """Shared parameters of the samplers built on ``LogNormal(mu, sigma)``."""

    def __init__(
        self, *, mu: float = 2.0, sigma: float = 0.7, lo: int = 1, hi: int = 100, seed: int
    ) -> None:
        super().__init__(lo=lo, hi=hi, seed=seed)
        self.mu = checks.number("mu", mu)
        self.sigma = checks.number("sigma", sigma, low=0, low_open=True)

    def params(self) -> dict[str, Any]:
        return {"mu": self.mu, "sigma": self.sigma, "lo": self.lo, "hi": self.hi}


class LogNormalDepth(_LogNormalFamily):
    """``t = clamp(round(LogNormal(mu, sigma)), lo, hi)`` (STARS), rounding halves up.

    ``mu`` and ``sigma`` are the mean and standard deviation of ``log X``; the unclamped
    median is ``round(exp(mu))`` (7 for the STARS defaults ``mu=2, sigma=0.7``).
    """

    kind = "lognormal"

    def _draw(self) -> int:
        x = self._rng.lognormal(self.mu, self.sigma)
        # Clamping before rounding gives the same integer and keeps an overflowed inf finite.
        return math.floor(min(max(x, self.lo), self.hi) + 0.5)

    def _interior_cdf(self, depths: np.ndarray) -> np.ndarray:
        # round(X) <= k  <=>  X < k + 1/2  <=>  log X < log(k + 1/2)
        return special.ndtr((np.log(depths + 0.5) - self.mu) / self.sigma)


class PoissonLogNormalDepth(_LogNormalFamily):
    """``t = clamp(Poisson(LogNormal(mu, sigma)), lo, hi)`` (Huginn).

    The distribution has no closed form; it is integrated over the log-normal rate
    numerically (accurate to about 1e-9). ``mean()`` and ``median()`` stay fast for any
    ``hi``; ``cdf()`` and ``pmf()`` cost ``O(hi**1.5)`` and suit ``hi`` up to a few thousand.
    """

    kind = "poisson_lognormal"

    def _draw(self) -> int:
        rate = min(self._rng.lognormal(self.mu, self.sigma), _MAX_POISSON_RATE)
        return int(np.clip(self._rng.poisson(rate), self.lo, self.hi))

    def _rate_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Quadrature over the rate ``exp(mu + sigma z)``, ``z ~ N(0, 1)``: (weights, rates).

        Trapezoid rule on a uniform z grid. A Poisson CDF at ``k ~ hi`` changes over a width
        ``~ 1 / (sigma sqrt(hi))`` in z; the grid puts ``_QUAD_POINTS_PER_WIDTH`` points on it.
        """
        width = 1.0 / (self.sigma * math.sqrt(self.hi))
        n_points = math.ceil(2 * _QUAD_HALF_WIDTH * _QUAD_POINTS_PER_WIDTH / width)
        n_points = min(max(n_points, _QUAD_MIN_POINTS), _QUAD_MAX_POINTS)
        z = np.linspace(-_QUAD_HALF_WIDTH, _QUAD_HALF_WIDTH, n_points)
        return stats.norm.pdf(z) * (z[1] - z[0]), np.exp(self.mu + self.sigma * z)

    def _interior_cdf(self, depths: np.ndarray) -> np.ndarray:
        # P(t <= k) = E[PoissonCDF(k; rate)] for lo <= k < hi.
        weights, rates = self._rate_grid()
        # Above this rate P(Poisson <= hi - 1) < 1e-20: those grid points add nothing.
        keep = rates <= self.hi + 10 * math.sqrt(self.hi) + 20
        weights, rates = weights[keep], rates[keep]
        result = np.zeros(depths.shape, dtype=np.float64)
        chunk = max(1, _QUAD_CHUNK_ELEMENTS // max(1, depths.size))
        for start in range(0, rates.size, chunk):
            block = slice(start, start + chunk)
            cdf = stats.poisson.cdf(depths[None, :], rates[block, None])  # (chunk, K)
            result += weights[block] @ cdf
        return result

    def mean(self) -> float:
        """Expected depth ``E[t]``, in O(grid) time whatever ``hi`` is.

        For ``N ~ Poisson(r)``, ``E[N 1{N <= m}] = r P(N <= m - 1)``, so
        ``E[clamp(N, lo, hi)] = r F(hi - 2) + hi (1 - F(hi - 1)) + lo F(lo - 1) - r F(lo - 2)``
        with ``F`` the Poisson CDF; this is averaged over the log-normal rate.
        """
        weights, rates = self._rate_grid()
        poisson = stats.poisson(rates)
        clamped_mean = (
            rates * poisson.cdf(self.hi - 2)
            + self.hi * poisson.sf(self.hi - 1)
            + self.lo * poisson.cdf(self.lo - 1)
            - rates * poisson.cdf(self.lo - 2)
        )
        return float(weights @ clamped_mean)


class UniformDepth(DepthSampler):
    """``t`` uniform over the integers ``lo..hi`` (both included)."""

    kind = "uniform"

    def __init__(self, *, lo: int = 1, hi: int, seed: int) -> None:
        super().__init__(lo=lo, hi=hi, seed=seed)

    def _draw(self) -> int:
        return int(self._rng.integers(self.lo, self.hi, endpoint=True))

    def _interior_cdf(self, depths: np.ndarray) -> np.ndarray:
        return (depths - self.lo + 1) / (self.hi - self.lo + 1)

    def params(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi}


class FixedDepth(DepthSampler):
    """Always ``t`` loops (``lo = hi = t``); still records every draw in ``history``."""

    kind = "fixed"

    def __init__(self, *, t: int, seed: int) -> None:
        t = checks.integer("t", t, low=1)  # a model needs at least one loop
        super().__init__(lo=t, hi=t, seed=seed)

    def _draw(self) -> int:
        return self.lo

    def _interior_cdf(self, depths: np.ndarray) -> np.ndarray:
        return np.zeros(depths.shape, dtype=np.float64)  # the support is the single point t

    def params(self) -> dict[str, Any]:
        return {"t": self.lo}


_SAMPLERS: dict[str, type[DepthSampler]] = {
    cls.kind: cls for cls in (LogNormalDepth, PoissonLogNormalDepth, UniformDepth, FixedDepth)
}
_PARAMS: dict[str, tuple[str, ...]] = {
    "lognormal": ("mu", "sigma", "lo", "hi"),
    "poisson_lognormal": ("mu", "sigma", "lo", "hi"),
    "uniform": ("lo", "hi"),
    "fixed": ("t",),
}
_REQUIRED: dict[str, tuple[str, ...]] = {"uniform": ("hi",), "fixed": ("t",)}

DEPTH_KINDS: tuple[str, ...] = tuple(_SAMPLERS)


def make_depth_sampler(kind: str, *, seed: int, **params: Any) -> DepthSampler:
    """Build a depth sampler by name.

    Args:
        kind: one of :data:`DEPTH_KINDS`: ``"lognormal"`` (params ``mu=2.0, sigma=0.7,
            lo=1, hi=100``), ``"poisson_lognormal"`` (same params and defaults),
            ``"uniform"`` (``lo=1``, ``hi`` required) or ``"fixed"`` (``t`` required).
        seed: seed of the sampler's private generator (non-negative int).
        **params: the kind's parameters, as listed above.

    Returns:
        A :class:`DepthSampler`; call ``sample()`` once per batch.

    Raises:
        ValueError: unknown kind or parameter, missing required parameter, ``lo < 1``,
            ``lo > hi``, ``sigma <= 0``, ``t < 1`` or a non-finite ``mu``.
        TypeError: a parameter of the wrong type (e.g. ``lo=1.5``).
    """
    if kind not in _SAMPLERS:
        raise ValueError(f"unknown depth sampler kind {kind!r}; valid kinds: {list(DEPTH_KINDS)}")
    unknown = sorted(set(params) - set(_PARAMS[kind]))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for depth sampler {kind!r}; "
            f"valid parameters: {list(_PARAMS[kind])}"
        )
    missing = [name for name in _REQUIRED.get(kind, ()) if name not in params]
    if missing:
        raise ValueError(f"depth sampler {kind!r} requires parameter(s) {missing}")
    return _SAMPLERS[kind](seed=seed, **params)
