"""Tests of eqloop.training.depth: distributions, determinism, resumption and argument errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import integrate, stats

import eqloop
from eqloop.training.depth import DEPTH_KINDS, DepthSampler, make_depth_sampler

# (kind, params) covering every kind, with the paper settings where there are some.
CONFIGS: list[tuple[str, dict]] = [
    ("lognormal", {}),  # STARS addition: mu=2, sigma=0.7, [1, 100]
    ("lognormal", {"mu": 1.7, "sigma": 0.4, "lo": 1, "hi": 16}),  # STARS Ouro-1.4B
    ("poisson_lognormal", {}),
    ("poisson_lognormal", {"mu": math.log(8) - 0.125, "sigma": 0.5, "lo": 2, "hi": 20}),
    ("uniform", {"lo": 3, "hi": 12}),
    ("fixed", {"t": 6}),
]
IDS = [f"{kind}-{i}" for i, (kind, _) in enumerate(CONFIGS)]


def _draws(sampler: DepthSampler, count: int) -> np.ndarray:
    return np.array([sampler.sample() for _ in range(count)])


def test_public_exports() -> None:
    assert eqloop.make_depth_sampler is make_depth_sampler
    assert eqloop.DepthSampler is DepthSampler
    assert set(DEPTH_KINDS) == {"lognormal", "poisson_lognormal", "uniform", "fixed"}


@pytest.mark.parametrize(("kind", "params"), CONFIGS, ids=IDS)
def test_draws_match_the_distribution(kind: str, params: dict) -> None:
    sampler = make_depth_sampler(kind, seed=123, **params)
    draws = _draws(sampler, 20_000)
    assert draws.min() >= sampler.lo and draws.max() <= sampler.hi
    assert all(isinstance(t, int) for t in sampler.history[:10])
    assert sampler.history == draws.tolist()

    pmf = sampler.pmf()
    assert pmf.shape == (sampler.hi - sampler.lo + 1,)
    assert np.all(pmf >= 0) and pmf.sum() == pytest.approx(1.0, abs=1e-9)
    empirical = np.bincount(draws - sampler.lo, minlength=pmf.size) / draws.size
    # Total-variation distance of 20k draws from the exact law is ~1e-2 at most.
    assert 0.5 * np.abs(empirical - pmf).sum() < 0.03

    spread = math.sqrt(float(pmf @ (sampler.support() - sampler.mean()) ** 2))
    assert abs(draws.mean() - sampler.mean()) < 5 * spread / math.sqrt(draws.size) + 1e-12
    cdf = np.cumsum(empirical)
    assert cdf[sampler.median() - sampler.lo] >= 0.5 - 0.02
    if sampler.median() > sampler.lo:
        assert cdf[sampler.median() - sampler.lo - 1] < 0.5 + 0.02


def test_lognormal_analytic_values() -> None:
    sampler = make_depth_sampler("lognormal", seed=0, mu=2.0, sigma=0.7, lo=1, hi=100)
    # In the unclamped region the median of round(LogNormal) is round(exp(mu)).
    assert sampler.median() == round(math.exp(2.0)) == 7
    # Far from the bounds rounding is nearly unbiased: E[t] ~ exp(mu + sigma^2 / 2).
    wide = make_depth_sampler("lognormal", seed=0, mu=3.0, sigma=0.5, lo=1, hi=10**6)
    assert wide.mean() == pytest.approx(math.exp(3.125), abs=1e-3)
    assert wide.median() == round(math.exp(3.0))


def test_lognormal_matches_numpy_reference() -> None:
    """Same law as clamp(round-half-up(LogNormal)) drawn in bulk by NumPy."""
    sampler = make_depth_sampler("lognormal", seed=1, mu=2.0, sigma=0.7, lo=2, hi=30)
    raw = np.random.default_rng(99).lognormal(2.0, 0.7, size=400_000)
    reference = np.clip(np.floor(raw + 0.5), 2, 30)
    assert reference.mean() == pytest.approx(sampler.mean(), abs=0.03)
    assert np.median(reference) == sampler.median()


def test_poisson_lognormal_mean_is_the_rate_mean_when_unclamped() -> None:
    """With a far upper bound, E[max(N, 1)] = exp(mu + sigma^2/2) + P(N = 0)."""
    mu, sigma = math.log(32) - 0.125, 0.5  # Huginn: mean rate 32
    sampler = make_depth_sampler("poisson_lognormal", seed=0, mu=mu, sigma=sigma, hi=10**5)
    p_zero, _ = integrate.quad(
        lambda z: stats.norm.pdf(z) * math.exp(-math.exp(mu + sigma * z)), -12, 12, epsabs=1e-14
    )
    assert sampler.mean() == pytest.approx(32.0 + p_zero, abs=1e-9)
    assert abs(sampler.median() - math.exp(mu)) <= 1  # the rate's median, 28.2


def test_poisson_lognormal_mean_agrees_with_pmf() -> None:
    sampler = make_depth_sampler("poisson_lognormal", seed=0, lo=3, hi=12)
    assert sampler.mean() == pytest.approx(float(sampler.pmf() @ sampler.support()), abs=1e-9)


def test_uniform_and_fixed_analytic_values() -> None:
    uniform = make_depth_sampler("uniform", seed=0, lo=1, hi=10)
    assert uniform.mean() == 5.5
    assert uniform.median() == 5  # lower median
    assert np.allclose(uniform.pmf(), 0.1)
    fixed = make_depth_sampler("fixed", seed=0, t=4)
    assert fixed.mean() == 4.0 and fixed.median() == 4
    assert [fixed.sample() for _ in range(3)] == [4, 4, 4]


@pytest.mark.parametrize(("kind", "params"), CONFIGS, ids=IDS)
def test_same_seed_same_sequence(kind: str, params: dict) -> None:
    first = _draws(make_depth_sampler(kind, seed=7, **params), 200)
    second = _draws(make_depth_sampler(kind, seed=7, **params), 200)
    assert np.array_equal(first, second)
    if kind != "fixed":
        other = _draws(make_depth_sampler(kind, seed=8, **params), 200)
        assert not np.array_equal(first, other)


def test_private_generator_ignores_global_rng() -> None:
    np.random.seed(0)
    first = _draws(make_depth_sampler("lognormal", seed=3), 50)
    np.random.seed(1)
    np.random.random(100)
    second = _draws(make_depth_sampler("lognormal", seed=3), 50)
    assert np.array_equal(first, second)


@pytest.mark.parametrize(("kind", "params"), CONFIGS, ids=IDS)
def test_state_dict_resumes_exactly(kind: str, params: dict) -> None:
    straight = make_depth_sampler(kind, seed=11, **params)
    expected = _draws(straight, 60)

    interrupted = make_depth_sampler(kind, seed=11, **params)
    _draws(interrupted, 25)
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a JSON checkpoint
    _draws(interrupted, 5)  # progress lost with the crash

    resumed = make_depth_sampler(kind, seed=11, **params)
    resumed.load_state_dict(state)
    _draws(resumed, 35)
    assert resumed.history == expected.tolist()


def test_load_state_dict_rejects_another_sampler() -> None:
    state = make_depth_sampler("lognormal", seed=0).state_dict()
    with pytest.raises(ValueError, match="kind='lognormal'"):
        make_depth_sampler("uniform", seed=0, hi=5).load_state_dict(state)
    with pytest.raises(ValueError, match="params"):
        make_depth_sampler("lognormal", seed=0, hi=50).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        make_depth_sampler("lognormal", seed=0).load_state_dict({"kind": "lognormal"})


def test_repr_names_the_parameters() -> None:
    text = repr(make_depth_sampler("lognormal", seed=5))
    assert text == "LogNormalDepth(mu=2.0, sigma=0.7, lo=1, hi=100, seed=5)"


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("gaussian", {}, r"unknown depth sampler kind 'gaussian'; valid kinds: \['lognormal'"),
        ("lognormal", {"lo": 0}, "lo must be an integer >= 1, got 0"),
        ("uniform", {"lo": 5, "hi": 4}, "lo must be <= hi"),
        ("lognormal", {"sigma": 0.0}, "sigma must be a number > 0, got 0.0"),
        ("poisson_lognormal", {"sigma": -1.0}, "sigma must be a number > 0, got -1.0"),
        ("lognormal", {"mu": float("nan")}, "mu must be a finite number, got nan"),
        ("lognormal", {"t": 3}, r"unknown parameter\(s\) \['t'\].*valid parameters"),
        ("uniform", {}, r"requires parameter\(s\) \['hi'\]"),
        ("fixed", {}, r"requires parameter\(s\) \['t'\]"),
        ("fixed", {"t": 0}, "t must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_raise(kind: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_depth_sampler(kind, seed=0, **params)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"lo": 1.5}, "lo must be an integer, got float 1.5"),
        ({"hi": True}, "hi must be an integer, got the bool True"),
        ({"mu": "2"}, "mu must be a number, got str '2'"),
    ],
)
def test_arguments_of_the_wrong_type_raise_type_error(params: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        make_depth_sampler("lognormal", seed=0, **params)


def test_bad_seed_raises() -> None:
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        make_depth_sampler("lognormal", seed=-1)
