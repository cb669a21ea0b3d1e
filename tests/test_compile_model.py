"""Graph counts of the model forward under ``torch.compile`` and ``eqloop.compile_model``.

Each workload is compiled with a counting backend (``CompileCounter`` runs the captured
FX graph as it is, so it also checks that the graph computes what eager does) and
``fullgraph=True``, which raises on any graph break: one graph per workload. Loop counts
1..32 through ``eqloop.compile_model`` must reuse a bounded number of graphs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import eqloop
from eqloop import pretrained
from eqloop.model import LoopLM, LoopLMConfig

VOCAB, SEQ = 16, 6


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Every test starts and ends with no compiled code cached."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def looplm(**overrides: Any) -> LoopLM:
    """A float64 LoopLM with a prelude and a coda (every stage has blocks), eval mode."""
    torch.manual_seed(0)
    config = dict(
        vocab_size=VOCAB,
        d_model=16,
        n_heads=2,
        d_ff=32,
        max_seq_len=SEQ,
        n_prelude=1,
        n_coda=1,
        injection="concat",
        default_loops=3,
    )
    config.update(overrides)
    return LoopLM(LoopLMConfig(**config)).double().eval()


def tokens(batch: int = 2, vocab: int = VOCAB, low: int = 0) -> Tensor:
    return torch.randint(low, vocab, (batch, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny float64 Ouro and Huginn models from ``write_tiny_checkpoint``."""
    root: Path = tmp_path_factory.mktemp("tiny")
    return {
        arch: pretrained.load(pretrained.write_tiny_checkpoint(root / arch, arch)).double().eval()
        for arch in ("ouro", "huginn_raven")
    }


def padding_mask() -> Tensor:
    """(2, SEQ) 0/1 int mask, the first row left-padded by two (an int mask is value-checked)."""
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, :2] = 0
    return mask


def one_graph(fn: Callable[..., Any], *args: Any) -> Any:
    """Compile ``fn`` with ``fullgraph=True``, run it, assert one graph; return its output."""
    counter = CompileCounter()
    out = torch.compile(fn, backend=counter, fullgraph=True)(*args)
    assert counter.frame_count == 1
    return out


# ------------------------------------------------------------------ item 2: whole graphs


@pytest.mark.parametrize("loops", [0, 3])
def test_looplm_unrolled_forward_is_one_graph(loops: int) -> None:
    model, ids = looplm(), tokens()
    compiled = one_graph(lambda t: model(t, loops=loops), ids)
    torch.testing.assert_close(compiled, model(ids, loops=loops), rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ouro", "huginn_raven"])
@pytest.mark.parametrize("masked", [False, True])
def test_pretrained_unrolled_forward_is_one_graph(
    tiny_pretrained: dict[str, Any], arch: str, masked: bool
) -> None:
    model, ids = tiny_pretrained[arch], tokens(vocab=100, low=4)
    # Huginn starts from noise unless init_scale=0; a fixed start makes eager comparable.
    options: dict[str, Any] = {"init_scale": 0.0} if arch == "huginn_raven" else {}
    if masked:
        options["attention_mask"] = padding_mask()
    compiled = one_graph(lambda t: model(t, loops=3, **options), ids)
    torch.testing.assert_close(compiled, model(ids, loops=3, **options), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_equilibrium_forward_without_grad_is_one_graph() -> None:
    model, ids = looplm(), tokens()

    def solve(t: Tensor) -> Tensor:
        with torch.no_grad():
            return model(t, solver="anderson", max_iter=4, tol=1e-8, check_every=None)

    torch.testing.assert_close(one_graph(solve, ids), solve(ids), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_training_forward_and_loss_unroll_is_one_graph() -> None:
    """The training step's forward + loss with backprop through the loops: one graph,
    the same loss and the same gradients as eager (aot_eager builds the backward)."""
    model, ids = looplm(), tokens()
    targets = tokens()
    targets[:, 0] = -100

    def loss(t: Tensor, y: Tensor) -> Tensor:
        logits, _ = model(t, loops=2, return_info=True)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, backend=counter, fullgraph=True)(ids, targets)
    assert counter.frame_count == 1
    grads = torch.autograd.grad(compiled, list(model.parameters()))
    expected = loss(ids, targets)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-12)
    want_grads = torch.autograd.grad(expected, list(model.parameters()))
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_compiled_forward_still_checks_token_values(tiny_pretrained: dict[str, Any]) -> None:
    """While tracing, the range check is a device-side assert in the graph, not skipped."""
    model = looplm()
    compiled = torch.compile(lambda t: model(t, loops=1), backend=CompileCounter(), fullgraph=True)
    compiled(tokens())
    with pytest.raises(RuntimeError, match=r"tokens must lie in \[0, vocab_size=16\)"):
        compiled(tokens() + VOCAB)
    ouro, mask = tiny_pretrained["ouro"], padding_mask()
    compiled = torch.compile(
        lambda t, m: ouro(t, loops=1, attention_mask=m), backend=CompileCounter(), fullgraph=True
    )
    ids = tokens(vocab=100, low=4)
    compiled(ids, mask)
    with pytest.raises(RuntimeError, match="attention_mask must hold only 0/1"):
        compiled(ids, mask * 2)


def test_eager_error_messages_unchanged() -> None:
    model = looplm()
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=16\), got values"):
        model(tokens() + VOCAB, loops=1)


# ----------------------------------------------------- item 3: no recompile per loop count


def test_compile_model_bounded_graphs_for_loops_1_to_32() -> None:
    model = looplm()
    ids = tokens()
    expected = {loops: model(ids, loops=loops) for loops in (1, 2, 7, 32)}
    counter = CompileCounter()
    assert eqloop.compile_model(model, backend=counter) is model
    for loops in range(1, 33):
        logits = model(ids, loops=loops)
        if loops in expected:
            torch.testing.assert_close(logits, expected[loops], rtol=0, atol=1e-12)
    # One graph for the step; torch may add one when the state first requires grad.
    assert 1 <= counter.frame_count <= 2
    with torch.no_grad():
        for loops in (1, 5, 128):
            model(ids, loops=loops)
    assert counter.frame_count <= 3  # no grad: at most one more, whatever the count


@pytest.mark.slow
def test_compile_model_serves_training_and_equilibrium_modes() -> None:
    """Random depth with backprop, early exit and an IFT solve all use the compiled step."""
    model = looplm()
    reference = copy.deepcopy(model)
    ids = tokens()
    counter = CompileCounter()
    eqloop.compile_model(model, backend=counter)
    for loops in (5, 2, 9):
        got = torch.autograd.grad(model(ids, loops=loops).sum(), list(model.parameters()))
        want = torch.autograd.grad(reference(ids, loops=loops).sum(), list(reference.parameters()))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    kwargs: dict[str, Any] = dict(solver="anderson", max_iter=20, tol=1e-9, check_every=None)
    torch.testing.assert_close(model(ids, **kwargs), reference(ids, **kwargs), rtol=0, atol=1e-9)
    assert counter.frame_count <= 3
    torch.testing.assert_close(
        model(ids, loops=6, exit_threshold=0.5), reference(ids, loops=6, exit_threshold=0.5)
    )


@pytest.mark.parametrize("arch", ["ouro", "huginn_raven"])
def test_compile_model_pretrained(tiny_pretrained: dict[str, Any], arch: str) -> None:
    model = copy.deepcopy(tiny_pretrained[arch])
    ids, mask = tokens(vocab=100, low=4), padding_mask()
    options: dict[str, Any] = {"init_scale": 0.0} if arch == "huginn_raven" else {}
    expected = {loops: model(ids, loops=loops, attention_mask=mask, **options) for loops in (1, 8)}
    counter = CompileCounter()
    eqloop.compile_model(model, backend=counter)
    for loops in range(1, 9):
        logits = model(ids, loops=loops, attention_mask=mask, **options)
        if loops in expected:
            torch.testing.assert_close(logits, expected[loops], rtol=0, atol=1e-12)
    assert 1 <= counter.frame_count <= 2


def test_compile_model_copy_and_bad_argument() -> None:
    model = eqloop.compile_model(looplm(), backend=CompileCounter())
    clone = copy.deepcopy(model)
    assert clone.core_step.__self__ is clone  # the copy runs its own weights
    with torch.no_grad():
        clone.tok_emb.weight.mul_(2)
    ids = tokens()
    assert not torch.allclose(clone(ids, loops=2), model(ids, loops=2))
    with pytest.raises(TypeError, match="compile_model needs an eqloop LoopedLM"):
        eqloop.compile_model(torch.nn.Linear(2, 2))


@pytest.mark.slow
@pytest.mark.parametrize("backward", ["phantom", "truncated", "ift"])
def test_training_forward_and_loss_implicit(backward: str) -> None:
    """The training step's forward + loss with an implicit backward mode (as
    ``eqloop.train`` runs it): Phantom and Truncated compile to one graph; IFT attaches
    its adjoint hook eagerly (the hook differentiates autograd's own graph of f(z*)), so
    its forward splits there: 4 graphs, one per frame resumed after the eager part.
    Loss and gradients equal eager's either way."""
    model, ids = looplm(), tokens()
    targets = tokens()

    def loss(t: Tensor, y: Tensor) -> Tensor:
        logits, _ = model(
            t,
            solver="fixed_point",
            max_iter=3,
            tol=0.0,
            backward=backward,
            check_every=None,
            return_info=True,
        )
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    counter = CompileCounter()
    fullgraph = backward != "ift"
    compiled = torch.compile(loss, backend=counter, fullgraph=fullgraph)(ids, targets)
    assert counter.frame_count == (1 if fullgraph else 4)
    params = list(model.parameters())
    expected = loss(ids, targets)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-12)
    want_grads = torch.autograd.grad(expected, params)
    for got, want in zip(torch.autograd.grad(compiled, params), want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_eager_core_step_gives_higher_order_gradients() -> None:
    """The compiled step has no double backward; eager_core_step, the same map, has."""
    from eqloop.compiling import eager_core_step
    from eqloop.looped import CoreMap
    from eqloop.model import sdpa_math

    model = eqloop.compile_model(looplm(), backend="aot_eager")
    f, z0 = model.core_map(tokens())
    z = z0.detach().requires_grad_()

    def vjp_norm(step: Any) -> Tensor:
        with sdpa_math():
            fz = CoreMap(step, f.args)(z)
        (vjp,) = torch.autograd.grad(fz, z, torch.ones_like(fz), create_graph=True)
        return vjp.pow(2).sum()

    with pytest.raises(RuntimeError, match="double backward"):
        vjp_norm(model.core_step).backward()
    vjp_norm(eager_core_step(model)).backward()
    assert model.core[0].mlp.fn.fc_in.weight.grad.abs().sum() > 0


def test_huginn_random_initial_state_is_one_graph(tiny_pretrained: dict[str, Any]) -> None:
    """Huginn's default start, noise truncated at 3 std, samples inside the graph."""
    model, ids = tiny_pretrained["huginn_raven"], tokens(vocab=100, low=4)
    counter = CompileCounter()
    state = torch.compile(
        lambda t: model.initial_state(model.inject(t)), backend=counter, fullgraph=True
    )(ids)
    assert counter.frame_count == 1
    std = model.config.init_std * model.config.embed_scale
    assert 0 < state.abs().max() <= 3 * std * (1 + 1e-12)
    assert 0.5 * std < state.std() < 1.5 * std
