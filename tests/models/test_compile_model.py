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
from eqloop.models.looplm.modeling import LoopLM, LoopLMConfig

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
    ``eqloop.recipes.train`` runs it): Phantom and Truncated compile to one graph; IFT attaches
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
    from eqloop.core.compiling import eager_core_step
    from eqloop.models.looped import CoreMap
    from eqloop.models.looplm.modeling import sdpa_math

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


# --------------------------------------------------- the fixed-depth loss as one graph

WHOLE_COUNTER = CompileCounterWithBackend("aot_eager")


def whole_step_run(
    whole: bool, penalty_on: bool, loops: int, backend: Any = None
) -> tuple[dict[str, Any], LoopLM]:
    """One train_step of a float64 LoopLM (train mode), with or without a WholeStep.

    ``backend`` compiles the WholeStep (default: ``WHOLE_COUNTER``).
    """
    from eqloop.recipes.train import train_step
    from eqloop.training.config import TrainConfig
    from eqloop.training.whole_step import WholeStep

    model = looplm().train()
    config = TrainConfig(lam=0.3, penalty_product="jvp", depth={"kind": "fixed", "t": loops})
    # the counting backend over aot_eager: seconds, and the graphs are counted
    backend = WHOLE_COUNTER if backend is None else backend
    step = WholeStep(model, lam=config.lam, backend=backend) if whole else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    targets = tokens(3, low=0)
    targets[:, :2] = -100
    stats = train_step(
        model,
        model,
        optimizer,
        tokens(3),
        targets,
        loops,
        config,
        penalty_on=penalty_on,
        generator=torch.Generator().manual_seed(5),
        whole=step,
    )
    return stats, model


@pytest.mark.parametrize("penalty_on", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_whole_step_equals_eager_train_step(penalty_on: bool) -> None:
    # Issue 22 CPU target: at a fixed depth the forward, CE and jvp penalty compile as one
    # graph; the step's statistics and updated weights equal the eager step's (float64).
    WHOLE_COUNTER.clear()
    eager, eager_model = whole_step_run(False, penalty_on, 3)
    fast, fast_model = whole_step_run(True, penalty_on, 3)
    assert WHOLE_COUNTER.frame_count == 1  # the whole loss: one graph, no break
    for key in ("loss", "ce", "penalty", "rho", "grad_norm"):
        if eager[key] is None:
            assert fast[key] is None and not penalty_on
        else:
            torch.testing.assert_close(fast[key], eager[key], rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(eager_model.named_parameters(), fast_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.slow
def test_whole_step_equals_eager_train_step_inductor() -> None:
    # The real compiler (inductor, max_autotune, math attention on the CPU), float64.
    eager, eager_model = whole_step_run(False, True, 2)
    fast, fast_model = whole_step_run(True, True, 2, backend="inductor")
    for key in ("loss", "ce", "penalty", "rho", "grad_norm"):
        torch.testing.assert_close(fast[key], eager[key], rtol=1e-9, atol=1e-11)
    for a, b in zip(eager_model.parameters(), fast_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


@pytest.mark.slow  # 11 s of compiling
def test_whole_step_graphs_per_loop_count_are_bounded() -> None:
    # One graph per loop count (and per penalty on/off), reused; past max_counts a new
    # count is not covered, and train_step runs the ordinary path for it.
    from eqloop.training.whole_step import WholeStep

    model = looplm().train()
    counter = CompileCounterWithBackend("aot_eager")
    whole = WholeStep(model, lam=0.1, max_counts=2, backend=counter)
    x = tokens(2)
    for loops in (2, 3, 2, 3):
        whole(x, x, loops, False)
    assert counter.frame_count == 2 and whole.counts == {2, 3}
    assert whole.covers(3, True) and not whole.covers(4, False) and not whole.covers(None, False)
    with pytest.raises(ValueError, match=r"does not cover loops=4.*max_counts=2"):
        whole(x, x, 4, False)
    assert counter.frame_count == 2
    no_penalty = WholeStep(model, lam=0.1, penalty=False, backend=counter)
    with pytest.raises(ValueError, match="penalty only when built with penalty=True"):
        no_penalty(x, x, 2, True)
    with pytest.raises(ValueError, match="max_counts must lie in"):
        WholeStep(model, lam=0.1, max_counts=0)
    with pytest.raises(TypeError, match="WholeStep needs an eqloop LoopLM"):
        WholeStep(torch.nn.Linear(2, 2), lam=0.1)  # type: ignore[arg-type]


def test_whole_step_only_for_fixed_depth_runs() -> None:
    # eqloop train --compile builds the whole loss only when every step fits it; random
    # depth keeps compile_model's per-loop step (bounded graphs for loop counts 1..32).
    from eqloop.recipes.train import RunEnv, _build
    from eqloop.training.config import TrainConfig
    from eqloop.training.whole_step import WholeStep

    fixed = {"kind": "fixed", "t": 4}
    model = looplm().train()
    assert WholeStep.for_training(model, TrainConfig()) is None  # lognormal depth
    assert WholeStep.for_training(model, TrainConfig(depth=fixed, backward="ift")) is None
    assert WholeStep.for_training(model, TrainConfig(depth=fixed, penalty_arnoldi=2)) is None
    vjp = WholeStep.for_training(model, TrainConfig(depth=fixed))
    assert vjp is not None and not vjp.penalty  # the paper's vjp penalty stays eager
    jvp = WholeStep.for_training(model, TrainConfig(depth=fixed, penalty_product="jvp"))
    assert jvp is not None and jvp.penalty
    env = RunEnv(0, 1, torch.device("cpu"), False)
    small = dict(vocab_size=19, d_model=16, n_heads=2, d_ff=32, max_seq_len=16)
    run = {"model": small, "compile": True, "depth": fixed}
    state = _build(TrainConfig.from_dict(run), env, None)
    assert isinstance(state.whole, WholeStep) and state.whole.model is state.model
    state = _build(TrainConfig.from_dict({"model": small, "compile": True}), env, None)
    assert state.whole is None


def test_fixed_depth_training_with_compile_runs_the_whole_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # eqloop train --compile at a fixed depth with the jvp penalty: every step runs the
    # WholeStep (one graph per penalty on/off), and the run equals the eager run.
    import eqloop.core.compiling
    from eqloop.recipes.train import train
    from eqloop.training.config import TrainConfig

    made: list[Any] = []
    compile_function = eqloop.core.compiling.compile_function

    def quick(fn: Any, **kwargs: Any) -> Any:  # aot_eager: seconds, not minutes
        made.append(fn)
        return compile_function(fn, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(eqloop.core.compiling, "compile_function", quick)
    run = dict(
        model=dict(vocab_size=19, d_model=16, n_heads=2, d_ff=32, max_seq_len=16),
        digits=2,
        n_train=64,
        n_test=16,
        batch_size=16,
        steps=4,
        depth={"kind": "fixed", "t": 2},
        penalty_start=2,
        penalty_product="jvp",
        eval_every=0,
        eval_loops=[2],
        log_every=2,
        data_cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    eager = train(TrainConfig.from_dict({**run, "out_dir": str(tmp_path / "eager")}))
    fast = train(TrainConfig.from_dict({**run, "out_dir": str(tmp_path / "c"), "compile": True}))
    wholes = [fn for fn in made if getattr(fn, "__name__", "") == "_whole_loss"]
    assert len(wholes) == 1 and wholes[0].__self__.counts == {2}
    assert fast["train"]["penalty"] is not None  # the last step ran the penalty
    for key in ("loss", "ce", "penalty", "grad_norm"):
        want, got = eager["train"][key], fast["train"][key]
        assert got == pytest.approx(want, rel=1e-4), key
