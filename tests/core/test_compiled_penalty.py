"""The compiled STARS penalty: forward-mode product under torch.compile equals eager.

``jsrr_penalty(..., product="jvp", compile_options={...})`` runs the product ``J v`` and
its backward to the parameters as one compiled graph. Before, a LayerNorm block failed to
trace (fake tensors: native_layer_norm's zero weight tangent) and an RMSNorm block failed
at run time under inductor (its buffers reused an efficient zero tensor). Checked in
float64 on a tiny LoopLM against the eager forward-mode penalty and against the paper's
vjp penalty: with the whole orthonormal basis as probe vectors both are
``||J||_F^2 / n`` (the expectation of the one-vector estimate), value and gradient.
Eagerly the LayerNorm jvp penalty's gradient was wrong too (torch's forward-mode formula
of native_layer_norm); the same test without compiling checks that.
Inductor compiles take ~30 s each on a loaded 2-core CPU; one per norm in the default run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import Tensor
from torch._dynamo.testing import CompileCounterWithBackend

import eqloop
from eqloop.core.compiling import eager_map
from eqloop.core.stars import jsrr_penalty
from eqloop.models.looped import CoreMap
from eqloop.models.looplm.modeling import LoopLM, LoopLMConfig
from eqloop.recipes.train import train_step
from eqloop.training.config import TrainConfig

SEQ, D = 4, 8


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Every test starts and ends with no compiled code cached."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny(norm: str) -> LoopLM:
    """A float64 LoopLM whose core is one post-sandwich block (4 norms), eval mode."""
    torch.manual_seed(0)
    config = LoopLMConfig(vocab_size=11, d_model=D, n_heads=2, d_ff=16, max_seq_len=SEQ, norm=norm)
    return LoopLM(config).double().eval()


def basis_point(model: LoopLM) -> tuple[CoreMap, Tensor, Tensor]:
    """One sequence's map and state repeated n = SEQ * D times, and the n basis vectors.

    Returns:
        ``f`` (batch n), ``z`` (n, SEQ, D) detached, ``v`` (n, SEQ, D) with ``v[i] = e_i``.
    """
    tokens = torch.randint(0, 11, (1, SEQ), generator=torch.Generator().manual_seed(1))
    _, info = model(tokens, loops=2, return_info=True)
    n = SEQ * D
    f = CoreMap(info.f.step, tuple(a.detach().repeat(n, 1, 1) for a in info.f.args))
    z = info.z.detach().repeat(n, 1, 1)
    v = torch.eye(n, dtype=z.dtype).view(n, SEQ, D)
    return f, z, v


def value_and_grads(model: LoopLM, **kwargs: Any) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The penalty at the basis point, its per-sample estimates and parameter gradients."""
    f, z, v = basis_point(model)
    result = jsrr_penalty(eager_map(model, f), z, v=v, return_details=True, **kwargs)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(result.penalty, params, allow_unused=True, materialize_grads=True)
    return result.penalty.detach(), result.rho, list(grads)


def assert_same(got: tuple[Tensor, Tensor, list[Tensor]], want: tuple, rho: bool) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    if rho:
        torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    for g, w in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def _case(norm: str, backend: str, slow: bool) -> object:
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(norm, backend, marks=marks, id=f"{norm}-{backend}")


@pytest.mark.parametrize(
    ("norm", "backend"),
    [
        _case("layernorm", "inductor", slow=False),
        _case("rmsnorm", "inductor", slow=True),
        _case("layernorm", "aot_eager", slow=True),
        _case("rmsnorm", "aot_eager", slow=True),
    ],
)
def test_compiled_jvp_penalty_equals_eager_and_the_paper_penalty(norm: str, backend: str) -> None:
    """Compiled jvp penalty = eager jvp penalty (value, rho, gradients) = eager vjp penalty.

    With all n basis vectors as probes, mean ||J e_i||^2 and mean ||J^T e_i||^2 are both
    ||J||_F^2 / n: the paper's (vjp) penalty and the forward-mode one agree exactly, value
    and parameter gradients, not only in expectation. Per-sample estimates differ (rows
    against columns of J), so rho is compared with the eager jvp only.
    """
    model = tiny(norm)
    compiled = value_and_grads(model, product="jvp", compile_options={"backend": backend})
    assert_same(compiled, value_and_grads(model, product="jvp"), rho=True)
    assert_same(compiled, value_and_grads(model, product="vjp"), rho=False)
    assert compiled[0] > 0 and any(g.abs().sum() > 0 for g in compiled[2])


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_eager_jvp_penalty_gradients_equal_the_vjp_penalty(norm: str) -> None:
    """Reverse over forward through a LayerNorm block gives the paper penalty's gradient.

    torch's forward-mode formula of native_layer_norm drops the gradient through the
    norm's statistics; eqloop runs layer norms as primitives inside the jvp.
    """
    model = tiny(norm)
    assert_same(
        value_and_grads(model, product="jvp"), value_and_grads(model, product="vjp"), rho=False
    )


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_compiled_penalty_with_power_steps_and_hinge(norm: str) -> None:
    """power_steps=2 (a product without graph, then one with) and a hinge target, inductor."""
    model = tiny(norm)
    options: dict[str, Any] = dict(product="jvp", power_steps=2, target=0.05)
    compiled = value_and_grads(model, compile_options={}, **options)
    assert_same(compiled, value_and_grads(model, **options), rho=True)


def test_compiled_penalty_reuses_its_graph_across_steps() -> None:
    """New maps, states and vectors at every step (as in training) compile one graph."""
    model = tiny("layernorm")
    counter = CompileCounterWithBackend("aot_eager")
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        tokens = torch.randint(0, 11, (2, SEQ), generator=g)
        _, info = model(tokens, loops=1 + step, return_info=True)
        f = eager_map(model, info.f)
        got = jsrr_penalty(
            f, info.z, product="jvp", generator=g, compile_options={"backend": counter}
        )
        got.backward()
    assert counter.frame_count == 1


def test_compile_options_are_checked() -> None:
    f, z, v = basis_point(tiny("rmsnorm"))
    with pytest.raises(ValueError, match="compile_options needs product='jvp'"):
        jsrr_penalty(f, z, v=v, compile_options={})
    with pytest.raises(TypeError, match="compile_options must be a mapping"):
        jsrr_penalty(f, z, v=v, product="jvp", compile_options="inductor")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="penalty_product must be one of"):
        TrainConfig(penalty_product="jacobian").validate()


def test_training_with_compile_runs_the_jvp_penalty_compiled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """train_step with compile=True and penalty_product="jvp" passes compile_options.

    The step's statistics equal the eager step's (same generator, same probe vectors);
    the paper's "vjp" product stays eager under compile.
    """
    seen: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((kwargs["product"], kwargs["compile_options"]))
        if kwargs["compile_options"] is not None:
            kwargs["compile_options"] = {"backend": "aot_eager"}  # seconds, not minutes
        return jsrr_penalty(*args, **kwargs)

    monkeypatch.setattr(eqloop.recipes.train, "jsrr_penalty", spy)
    config = TrainConfig(lam=0.5, penalty_product="jvp", compile=True)
    stats = []
    for compile_ in (True, False):
        model = tiny("layernorm").train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        tokens = torch.randint(0, 11, (2, SEQ), generator=torch.Generator().manual_seed(3))
        run = dataclasses.replace(config, compile=compile_)
        stats.append(
            train_step(
                model,
                model,
                optimizer,
                tokens,
                tokens,
                2,
                run,
                penalty_on=True,
                generator=torch.Generator().manual_seed(4),
            )
        )
    assert seen == [("jvp", {}), ("jvp", None)]
    for key in ("loss", "penalty", "rho", "grad_norm"):
        torch.testing.assert_close(stats[0][key], stats[1][key], rtol=1e-10, atol=1e-12)
    seen.clear()
    model = tiny("layernorm").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = dataclasses.replace(config, penalty_product="vjp")
    train_step(model, model, optimizer, tokens, tokens, 2, run, penalty_on=True)
    assert seen == [("vjp", None)]
