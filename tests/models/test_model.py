"""Tests for eqloop.models.looplm: the looped LM, its fixed-point map and its error messages."""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import eqloop.models.looped
import eqloop.models.looplm.modeling
import solvers
from eqloop.core.backward import IFT, ConvergenceWarning, Phantom, Truncated
from eqloop.core.defaults import EQUILIBRIUM_MAX_ITER, EQUILIBRIUM_STOP_MODE, EQUILIBRIUM_TOL
from eqloop.models.looped import CoreMap, LoopedLM, LoopInfo, random_start
from eqloop.models.looplm.modeling import (
    INIT_STATES,
    INJECTIONS,
    NORM_PLACEMENTS,
    NORMS,
    POSITIONS,
    CausalSelfAttention,
    LoopLM,
    LoopLMConfig,
    Sublayer,
    apply_rotary,
    rotary_tables,
    sdpa_math,
)

VOCAB, D, HEADS, SEQ = 16, 32, 2, 8


def tiny_model_config(**overrides: Any) -> LoopLMConfig:
    base: dict[str, Any] = dict(
        vocab_size=VOCAB, d_model=D, n_heads=HEADS, d_ff=64, max_seq_len=SEQ, default_loops=3
    )
    base.update(overrides)
    return LoopLMConfig(**base)


def tokens_for(batch: int = 3, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=g)


def contractive_model(**overrides: Any) -> LoopLM:
    """A float64 model whose core is a strong contraction (about 0.3 per loop).

    Concat injection with the state's half of the adapter shrunk and large embeddings:
    the injected input dominates the normalised sublayers, so z barely moves f(z).
    """
    torch.manual_seed(0)
    cfg = tiny_model_config(injection="concat", norm_placement="post_sandwich", **overrides)
    model = LoopLM(cfg).double().eval()
    with torch.no_grad():
        model.injection.adapter.weight[:, :D] *= 0.2
        model.tok_emb.weight *= 50.0
    return model


# ----------------------------------------------------------------------------- config


def test_config_round_trip() -> None:
    cfg = tiny_model_config(positions="rope", norm="rmsnorm", injection="concat", n_prelude=1)
    data = cfg.to_dict()
    assert data["positions"] == "rope" and data["n_prelude"] == 1
    assert LoopLMConfig.from_dict(data) == cfg


def test_config_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown LoopLMConfig keys: \['bogus', 'n_layer'\]"):
        LoopLMConfig.from_dict({"bogus": 1, "n_layer": 2, "d_model": 32})


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("vocab_size", 0, ValueError),
        ("d_model", 2.5, TypeError),
        ("n_heads", 0, ValueError),
        ("n_core", 0, ValueError),
        ("n_prelude", -1, ValueError),
        ("default_loops", -1, ValueError),
        ("default_loops", True, TypeError),
        ("dropout", 1.0, ValueError),
        ("init_std", 0.0, ValueError),
        ("init_std", math.inf, ValueError),
        ("init_std", math.nan, ValueError),
        ("rope_base", math.inf, ValueError),
        ("positions", "alibi", ValueError),
        ("injection", "gate", ValueError),
        ("init_state", "ones", ValueError),
        ("norm", "batchnorm", ValueError),
        ("norm_placement", "middle", ValueError),
        ("bias", "yes", TypeError),
        ("tie_embeddings", 1, TypeError),
    ],
)
def test_config_rejects_bad_field(field: str, value: Any, error: type) -> None:
    with pytest.raises(error, match=f"LoopLMConfig.{field}"):
        tiny_model_config(**{field: value})


def test_config_rejects_heads_not_dividing_width_and_odd_rope_heads() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        tiny_model_config(n_heads=3)
    with pytest.raises(ValueError, match="rope"):
        tiny_model_config(d_model=6, n_heads=2, positions="rope")  # head size 3


def test_model_revalidates_a_mutated_config_and_keeps_a_copy() -> None:
    cfg = tiny_model_config()
    cfg.norm_placement = "sideways"
    with pytest.raises(ValueError, match="norm_placement"):
        LoopLM(cfg)
    cfg = tiny_model_config()
    model = LoopLM(cfg)
    cfg.default_loops = 99
    assert model.config.default_loops == 3


# ---------------------------------------------------------------------- blocks and rope


class _Double(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * x + 1.0


@pytest.mark.parametrize("placement", NORM_PLACEMENTS)
def test_sublayer_implements_its_placement_formula(placement: str) -> None:
    cfg = tiny_model_config(norm_placement=placement)
    layer = Sublayer(_Double(), cfg)
    x = torch.randn(2, 5, D) * 3 + 1

    def norm(t: Tensor) -> Tensor:
        return torch.nn.functional.layer_norm(t, (D,), eps=1e-5)

    def fn(t: Tensor) -> Tensor:
        return 2.0 * t + 1.0

    expected = {
        "pre": x + fn(norm(x)),
        "post": norm(x + fn(x)),
        "pre_sandwich": x + norm(fn(norm(x))),
        "post_sandwich": norm(x + fn(norm(x))),
    }[placement]
    torch.testing.assert_close(layer(x), expected)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    head_dim, seq = 8, 12
    cos, sin = rotary_tables(
        seq, head_dim, 10000.0, device=torch.device("cpu"), dtype=torch.float64
    )
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    qs = apply_rotary(q.expand(seq, head_dim), cos, sin)
    ks = apply_rotary(k.expand(seq, head_dim), cos, sin)
    scores = qs @ ks.T  # scores[m, n] = <R_m q, R_n k>
    for shift in (1, 3):
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift])
    torch.testing.assert_close(qs.norm(dim=-1), q.norm().expand(seq))  # rotations
    torch.testing.assert_close(qs[0], q)  # position 0 is not rotated


def test_qkv_heads_are_what_the_layer_attends_with() -> None:
    torch.manual_seed(0)
    layer = CausalSelfAttention(tiny_model_config(positions="rope")).double().eval()
    x = torch.randn(3, SEQ, D, dtype=torch.float64)
    rope = rotary_tables(SEQ, D // HEADS, 10000.0, device=x.device, dtype=x.dtype)
    q0, k0, v0 = layer.qkv_heads(x)
    q, k, v = layer.qkv_heads(x, rope)
    assert q.shape == k.shape == v.shape == (3, HEADS, SEQ, D // HEADS)
    heads = layer.qkv(x).view(3, SEQ, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(q0, heads[0])
    torch.testing.assert_close(v, heads[2])  # values are never rotated
    torch.testing.assert_close(q, apply_rotary(q0, *rope))
    torch.testing.assert_close(k, apply_rotary(k0, *rope))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(layer(x, rope), layer.proj(y.transpose(1, 2).reshape(3, SEQ, D)))


def test_rotary_tables_are_buffers_that_follow_the_module() -> None:
    model = LoopLM(tiny_model_config(positions="rope"))
    rotary = model.rotary
    assert rotary.cos.shape == (SEQ, D // HEADS // 2) and rotary.cos.dtype == torch.float32
    assert not any("rotary" in key for key in model.state_dict())  # non-persistent
    for dtype in (torch.float64, torch.float32, torch.float64):  # through float32 and back
        model.to(dtype)
        want = rotary_tables(SEQ, D // HEADS, 10000.0, device=torch.device("cpu"), dtype=dtype)
        assert rotary.cos.dtype == dtype
        assert torch.equal(rotary.cos, want[0]) and torch.equal(rotary.sin, want[1])
    model.to("meta")
    assert rotary.cos.device.type == "meta" and rotary.sin.device.type == "meta"


def test_rotary_tables_are_float64_accurate_in_float64() -> None:
    model = LoopLM(tiny_model_config(positions="rope", max_seq_len=64)).double()
    head_dim = D // HEADS
    angle = [63 * 10000.0 ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    exact = torch.tensor([math.cos(a) for a in angle], dtype=torch.float64)
    assert float((model.rotary.cos[63] - exact).abs().max()) < 1e-14


def test_rotary_tables_are_not_rebuilt_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    model = LoopLM(tiny_model_config(positions="rope", n_prelude=1, n_coda=1))
    expected = model(tokens_for(), loops=2)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("rotary_tables was called during a forward pass")

    monkeypatch.setattr(eqloop.models.looplm.modeling, "rotary_tables", fail)
    torch.testing.assert_close(model(tokens_for(), loops=2), expected, rtol=0, atol=0)


# --------------------------------------------------------------- every architecture variant

VARIANTS = list(itertools.product(NORM_PLACEMENTS, INJECTIONS, POSITIONS, NORMS))


@pytest.mark.parametrize(("placement", "injection", "positions", "norm"), VARIANTS)
def test_variant_forward_backward_and_causal(
    placement: str, injection: str, positions: str, norm: str
) -> None:
    torch.manual_seed(0)
    cfg = tiny_model_config(
        norm_placement=placement,
        injection=injection,
        positions=positions,
        norm=norm,
        n_prelude=1,
        n_core=2,
        n_coda=1,
        init_state="input",
    )
    model = LoopLM(cfg)
    tokens = tokens_for()
    logits = model(tokens, loops=2)
    assert logits.shape == (3, SEQ, VOCAB)
    assert torch.isfinite(logits).all()

    logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("pos_emb"):
            continue  # rows past SEQ are never used here
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.core.parameters())

    # Causality: changing token 5 leaves positions 0..4 alone and moves position 5.
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(tokens, loops=2), model(changed, loops=2)
    torch.testing.assert_close(after[:, :5], before[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 5], before[:, 5])


@pytest.mark.parametrize("init_state", INIT_STATES)
def test_initial_states(init_state: str) -> None:
    model = LoopLM(tiny_model_config(init_state=init_state))
    x = model.inject(tokens_for())
    z0 = model.initial_state(x, generator=torch.Generator().manual_seed(1))
    assert z0.shape == x.shape
    if init_state == "zeros":
        assert not z0.any()
    elif init_state == "input":
        assert z0 is x
    else:
        again = model.initial_state(x, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(z0, again)
        std = model.config.init_std
        assert 0.5 * std < z0.std() < 2 * std
    assert model(tokens_for(), loops=2).shape == (3, SEQ, VOCAB)


def test_tied_head_is_stored_once_and_untied_head_is_separate() -> None:
    tied = LoopLM(tiny_model_config())
    assert tied.lm_head is None
    assert not any(k.startswith("lm_head") for k in tied.state_dict())
    untied = LoopLM(tiny_model_config(tie_embeddings=False))
    assert untied.lm_head is not None
    assert untied.num_parameters() == tied.num_parameters() + VOCAB * D


def test_dropout_is_active_only_in_training() -> None:
    model = LoopLM(tiny_model_config(dropout=0.3))
    tokens = tokens_for()
    model.train()
    assert not torch.equal(model(tokens, loops=2), model(tokens, loops=2))
    model.eval()
    assert torch.equal(model(tokens, loops=2), model(tokens, loops=2))


# ---------------------------------------------------------------- loops, map, trajectory


def test_loop_counts_and_stages_compose() -> None:
    torch.manual_seed(0)
    model = LoopLM(tiny_model_config(init_state="input", n_prelude=1, n_coda=1)).double().eval()
    tokens = tokens_for()
    states = model.unroll(tokens, 4, return_states=True)
    assert isinstance(states, list) and len(states) == 5
    x = model.inject(tokens)
    torch.testing.assert_close(states[0], x)  # init_state="input"
    for t in range(5):
        logits = model(tokens, loops=t)
        assert logits.shape == (3, SEQ, VOCAB) and logits.dtype == torch.float64
        torch.testing.assert_close(logits, model.readout(states[t]))
    for t in range(4):
        torch.testing.assert_close(states[t + 1], model.core_step(states[t], x))
    torch.testing.assert_close(model.unroll(x, 4), states[-1])  # x instead of tokens
    torch.testing.assert_close(model(tokens), model(tokens, loops=3))  # default_loops
    logits, info = model(tokens, loops=4, return_info=True)
    assert isinstance(info, LoopInfo)
    torch.testing.assert_close(info.z, states[-1])
    torch.testing.assert_close(info.x, x)
    assert info.loops_used.tolist() == [4, 4, 4]


def test_random_start_has_the_per_token_scale_of_one_loop() -> None:
    z0 = torch.randn(2, 3, 4096)
    scale = torch.tensor([1.0, 2.0, 5.0]).view(1, 3, 1)

    def f(z: Tensor) -> Tensor:
        return scale * z / z.pow(2).mean(-1, keepdim=True).sqrt()  # per-token RMS 1, 2, 5

    z = random_start(f, z0, torch.Generator().manual_seed(0))
    rms = z.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, scale.view(1, 3).expand(2, 3), rtol=0.05, atol=0)
    again = random_start(f, z0, torch.Generator().manual_seed(0))
    assert torch.equal(z, again) and not torch.allclose(z, f(z0), atol=0.5)


def test_random_start_share_draws_per_sequence() -> None:
    z0 = torch.randn(400, 2, 8)
    f = torch.tanh
    assert torch.equal(random_start(f, z0, share=0.0), z0)
    z = random_start(f, z0, torch.Generator().manual_seed(1), share=0.25)
    kept = (z == z0).flatten(1).all(dim=1)
    assert (z != z0).flatten(1).all(dim=1).eq(~kept).all()  # whole sequences, not tokens
    assert 0.18 < 1 - kept.float().mean().item() < 0.32  # about a quarter drawn
    with pytest.raises(ValueError, match="share"):
        random_start(f, z0, share=1.5)


def test_forward_start_replaces_the_initial_state() -> None:
    torch.manual_seed(0)
    model = LoopLM(tiny_model_config(injection="add")).double().eval()
    tokens = tokens_for()
    one_loop = lambda f, z0: f(z0)  # noqa: E731 - a start one loop on
    torch.testing.assert_close(model(tokens, loops=2, start=one_loop), model(tokens, loops=3))
    options = dict(start_loops=1, max_iter=3, tol=0.0, output="last")
    solved = model(tokens, solver="fixed_point", start=one_loop, **options)
    torch.testing.assert_close(solved, model(tokens, loops=5))  # 1 + 1 + 3 evaluations
    with pytest.raises(TypeError, match="start must be a function"):
        model(tokens, loops=2, start=3)
    with pytest.raises(ValueError, match=r"start\(f, z0\) must return a tensor shaped"):
        model(tokens, loops=2, start=lambda f, z0: z0[:1])


@pytest.mark.parametrize(
    ("backward", "graph"),
    [(IFT(), False), (Phantom(), False), (Truncated(k=3), False), (Truncated(k=8), True)],
)
def test_start_loops_keep_a_graph_only_where_the_gradient_reaches_them(
    backward: Any, graph: bool
) -> None:
    torch.manual_seed(0)
    model = LoopLM(tiny_model_config(injection="add")).double().train()
    tokens = tokens_for()

    def saved(start_loops: int) -> int:
        count = [0]

        def pack(t: Tensor) -> Tensor:
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(
                tokens,
                solver="fixed_point",
                max_iter=6,
                tol=0.0,
                backward=backward,
                start_loops=start_loops,
            ).sum().backward()
        return count[0]

    assert (saved(4) > saved(0)) == graph  # 4 more loops' activations, or none
    assert backward.reaches_start(6) == graph


def test_loops_run_through_the_driver_and_equal_a_hand_loop() -> None:
    """loops=T is exactly T applications of core_step, and the driver reports them."""
    torch.manual_seed(0)
    model = LoopLM(tiny_model_config(positions="rope", n_prelude=1)).eval()
    tokens = tokens_for(batch=4)
    x = model.inject(tokens)
    hand = model.initial_state(x)
    for _ in range(7):
        hand = model.core_step(hand, x)
    logits, info = model(tokens, loops=7, return_info=True)
    torch.testing.assert_close(info.z, hand, rtol=0, atol=0)
    torch.testing.assert_close(logits, model.readout(hand), rtol=0, atol=0)
    torch.testing.assert_close(model.unroll(tokens, 7), hand, rtol=0, atol=0)
    assert isinstance(info.f, CoreMap) and info.f.args[0] is info.x
    assert info.result.nfe == 7 and info.result.solver == "fixed_point"
    assert info.result.rel_trace.shape == (4, 7)  # the step size of every loop, per sequence
    assert info.loops_used.tolist() == [7] * 4
    _, info = model(tokens, loops=0, return_info=True)
    assert info.result is None and info.loops_used.tolist() == [0] * 4


def test_unrolled_loops_never_read_the_host() -> None:
    """On the meta device any host read raises: the plain loop and its result make none."""
    model = LoopLM(tiny_model_config(positions="rope", injection="concat")).to("meta")
    x = torch.randn(3, SEQ, D, device="meta")
    f, z0 = model.core_map(x)
    result = model.loop(f, z0, 5)
    assert result.z.device.type == "meta" and result.z.shape == (3, SEQ, D)
    assert result.nfe == 5 and model.unroll(x, 5).device.type == "meta"


def test_unrolled_gradient_equals_the_hand_loop_gradient() -> None:
    torch.manual_seed(0)
    model = LoopLM(tiny_model_config(injection="concat")).double()
    tokens = tokens_for()

    def grads(loss: Tensor) -> Tensor:
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    via_driver = grads(model(tokens, loops=4).logsumexp(-1).sum())
    x = model.inject(tokens)
    z = model.initial_state(x)
    for _ in range(4):
        z = model.core_step(z, x)
    by_hand = grads(model.readout(z).logsumexp(-1).sum())
    torch.testing.assert_close(via_driver, by_hand, rtol=1e-13, atol=0)


def _param_grads(model: nn.Module, loss: Tensor) -> Tensor:
    """Every parameter's gradient of ``loss``, flattened into one vector (zeros where none)."""
    model.zero_grad()
    loss.backward()
    return torch.cat(
        [
            torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
            for p in model.parameters()
        ]
    )


def test_truncated_loops_keep_the_values_and_train_only_the_last_k() -> None:
    """backward=Truncated(k) with loops=T: the values of T loops, the gradient of a loop
    whose first T - k steps are detached."""
    torch.manual_seed(0)
    model = LoopLM(tiny_model_config(injection="concat", n_prelude=1)).double().eval()
    tokens = tokens_for()

    def loss(logits: Tensor) -> Tensor:
        return logits.logsumexp(-1).sum()

    full_logits = model(tokens, loops=5)
    logits, info = model(tokens, loops=5, backward=Truncated(k=2), return_info=True)
    torch.testing.assert_close(logits, full_logits, rtol=0, atol=0)
    assert info.loops_used.tolist() == [5, 5, 5] and info.result.nfe == 5
    truncated = _param_grads(model, loss(logits))
    x = model.inject(tokens)
    z = model.initial_state(x)
    for t in range(5):
        z = model.core_step(z, x)
        if t < 3:
            z = z.detach()
    reference = _param_grads(model, loss(model.readout(z)))
    torch.testing.assert_close(truncated, reference, rtol=1e-13, atol=0)
    full = _param_grads(model, loss(full_logits))
    assert not torch.allclose(truncated, full)  # the first 3 loops' terms are missing
    # unroll takes it too; k >= T is every loop, and its name means Truncated(k=8)
    z_unroll = model.unroll(tokens, 5, backward=Truncated(k=2))
    torch.testing.assert_close(
        _param_grads(model, loss(model.readout(z_unroll))), reference, rtol=1e-13, atol=0
    )
    for backward in (Truncated(k=5), Truncated(k=9), "truncated"):
        grads = _param_grads(model, loss(model(tokens, loops=5, backward=backward)))
        torch.testing.assert_close(grads, full, rtol=1e-13, atol=0)


@pytest.mark.parametrize("backward", [None, Truncated(k=2)], ids=["every-loop", "truncated"])
def test_grad_checkpointing_recomputes_each_loop_and_keeps_the_gradients(
    backward: Truncated | None,
) -> None:
    torch.manual_seed(0)
    model = LoopLM(tiny_model_config(injection="add", positions="rope")).double().eval()
    tokens = tokens_for()
    calls = []
    step = model.core_step

    def counted(z: Tensor, *args: Tensor) -> Tensor:
        calls.append(z.shape)
        return step(z, *args)

    model.core_step = counted  # type: ignore[method-assign]
    grads = {}
    for checkpointed in (False, True):
        calls.clear()
        z = model.unroll(tokens, 4, backward=backward, grad_checkpointing=checkpointed)
        grads[checkpointed] = _param_grads(model, model.readout(z).logsumexp(-1).sum())
        tracked = 4 if backward is None else 2
        assert len(calls) == 4 + (tracked if checkpointed else 0)  # the backward recomputes
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-13, atol=0)
    with torch.no_grad():  # nothing to recompute without grad
        calls.clear()
        model.unroll(tokens, 4, grad_checkpointing=True)
        assert len(calls) == 4


def test_on_state_sees_every_state_of_the_loop() -> None:
    torch.manual_seed(0)
    model = LoopLM(tiny_model_config(injection="concat")).double().eval()
    tokens = tokens_for()
    seen: list[tuple[int, Tensor]] = []
    z = model.unroll(tokens, 4, on_state=lambda t, state: seen.append((t, state)))
    assert [t for t, _ in seen] == [0, 1, 2, 3, 4]
    x = model.inject(tokens)
    hand = [model.initial_state(x)]
    for _ in range(4):
        hand.append(model.core_step(hand[-1], x))
    for (_, state), expected in zip(seen, hand, strict=True):
        assert state.shape == (3, SEQ, D)
        torch.testing.assert_close(state, expected, rtol=0, atol=0)
    torch.testing.assert_close(z, hand[-1], rtol=0, atol=0)
    states = model.unroll(tokens, 4, return_states=True)
    assert len(states) == 5
    for state, (_, hooked) in zip(states, seen, strict=True):
        torch.testing.assert_close(state, hooked, rtol=0, atol=0)
    # with truncation the hook still sees every state; with 0 loops only z_0
    seen.clear()
    model.unroll(tokens, 4, backward=Truncated(k=1), on_state=lambda t, s: seen.append((t, s)))
    assert [t for t, _ in seen] == [0, 1, 2, 3, 4]
    assert [s.requires_grad for _, s in seen[1:]] == [False, False, False, True]
    seen.clear()
    f, z0 = model.core_map(tokens)
    assert model.loop(f, z0, 0, on_state=lambda t, s: seen.append((t, s))) is None
    assert [t for t, _ in seen] == [0] and seen[0][1] is z0


def test_loop_options_are_checked() -> None:
    model = LoopLM(tiny_model_config())
    tokens = tokens_for()
    f, z0 = model.core_map(tokens)
    with pytest.raises(
        ValueError,
        match=r"backward=IFT\(.*\) does not apply to unrolled loops.*"
        r"Truncated\(k\)",
    ):
        model(tokens, loops=3, backward=IFT())
    with pytest.raises(ValueError, match=r"does not apply to unrolled loops.*'phantom'"):
        model.unroll(tokens, 3, backward="phantom")
    with pytest.raises(TypeError, match=r"backward must be a mode name"):
        model.loop(f, z0, 3, backward=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Truncated.k must be an integer >= 1"):
        model(tokens, loops=3, backward=Truncated(k=-1))
    with pytest.raises(TypeError, match=r"grad_checkpointing must be true or false"):
        model.unroll(tokens, 3, grad_checkpointing=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"on_state must be a function"):
        model.loop(f, z0, 3, on_state=[])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"on_state .* exit_threshold .*: pass one of them"):
        model.loop(f, z0, 3, on_state=lambda t, z: None, exit_threshold=0.1)


def test_loop_options_never_read_the_host() -> None:
    """Truncation, checkpointing and the hook add no host read to the loop (meta device)."""
    model = LoopLM(tiny_model_config(positions="rope", injection="concat")).to("meta")
    x = torch.randn(3, SEQ, D, device="meta")
    f, z0 = model.core_map(x)
    seen = []
    result = model.loop(
        f,
        z0,
        5,
        backward=Truncated(k=2),
        grad_checkpointing=True,
        on_state=lambda t, z: seen.append(t),
    )
    assert result.z.device.type == "meta" and result.z.requires_grad and result.nfe == 5
    assert seen == [0, 1, 2, 3, 4, 5]


def test_core_map_matches_core_step_and_never_mixes_sequences() -> None:
    model = LoopLM(tiny_model_config(positions="rope", init_state="random")).double().eval()
    tokens = tokens_for(batch=5)
    torch.manual_seed(3)
    f, z0 = model.core_map(tokens)
    x = model.inject(tokens)
    torch.testing.assert_close(f(z0), model.core_step(z0, x))
    rows = torch.tensor([4, 1])  # what a compacting solver does
    torch.testing.assert_close(model.core_step(z0[rows], x[rows]), f(z0)[rows])
    # the gradient of one sequence's output reaches no other sequence's state (weighted:
    # the plain sum of a normalised output is constant, its gradient only rounding noise)
    z = z0.clone().requires_grad_(True)
    weights = torch.randn(z0.shape[1:], dtype=z0.dtype)
    (g,) = torch.autograd.grad((f(z)[2] * weights).sum(), z)
    assert g[2].abs().sum() > 0
    assert not g[[0, 1, 3, 4]].any()


def test_gradcheck_core_step_in_float64() -> None:
    cfg = tiny_model_config(d_model=8, n_heads=2, d_ff=16, positions="rope", injection="concat")
    model = LoopLM(cfg).double().eval()
    z = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model.core_step, (z, x))


# ------------------------------------------------------------------------- early exit


def test_early_exit_with_zero_threshold_equals_plain_unrolling() -> None:
    model = LoopLM(tiny_model_config()).eval()
    tokens = tokens_for(batch=4)
    plain = model(tokens, loops=6)
    logits, info = model(tokens, loops=6, exit_threshold=0.0, return_info=True)
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)
    assert info.loops_used.tolist() == [6, 6, 6, 6]


@pytest.mark.parametrize("check_every", [1, 3, 100])
def test_early_exit_matches_per_sequence_reference(check_every: int) -> None:
    model = contractive_model()
    model.exit_check_every = check_every
    loops, eps = 30, 1e-6
    batch = torch.cat([tokens_for(batch=4, seed=1), torch.zeros(1, SEQ, dtype=torch.long)])
    logits, info = model(batch, loops=loops, exit_threshold=eps, return_info=True)

    states = model.unroll(batch, loops, return_states=True)
    for b in range(batch.shape[0]):
        expected = loops
        for t in range(1, loops + 1):
            step = (states[t][b] - states[t - 1][b]).norm() / states[t][b].norm()
            if step < eps:
                expected = t
                break
        assert int(info.loops_used[b]) == expected
        torch.testing.assert_close(info.z[b], states[expected][b])
        torch.testing.assert_close(logits[b], model.readout(states[expected][b : b + 1])[0])
    assert int(info.loops_used.max()) < loops  # every sequence exited


def test_early_exit_is_differentiable() -> None:
    model = contractive_model()
    logits = model(tokens_for(), loops=20, exit_threshold=1e-4)
    logits.sum().backward()
    assert model.injection.adapter.weight.grad is not None


# ------------------------------------------------------------------ equilibrium mode


def test_equilibrium_mode_calls_fixed_point_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wiring only: a stub stands in for eqloop.fixed_point."""
    calls: list[dict[str, Any]] = []

    def fake_fixed_point(f: Any, z0: Tensor, *, args: tuple[Tensor, ...], **kwargs: Any) -> Any:
        calls.append(kwargs)
        z = z0
        for _ in range(5):
            z = f(z, *args)
        return z, eqloop.models.looped.FixedPointInfo("ift", None)

    monkeypatch.setattr(eqloop.models.looped, "fixed_point", fake_fixed_point)
    model = LoopLM(tiny_model_config()).eval()
    tokens = tokens_for()
    logits, info = model(tokens, solver="anderson", return_info=True)
    assert calls[-1] == dict(
        solver="anderson",
        max_iter=EQUILIBRIUM_MAX_ITER,
        tol=EQUILIBRIUM_TOL,
        stop_mode=EQUILIBRIUM_STOP_MODE,
        return_result=True,
    )
    assert info.loops_used is None
    torch.testing.assert_close(logits, model(tokens, loops=5))
    model(tokens, solver="broyden", tol=1e-6, max_iter=9, backward="phantom", stop_mode="abs", m=6)
    assert calls[-1] == dict(
        solver="broyden",
        backward="phantom",
        max_iter=9,
        tol=1e-6,
        stop_mode="abs",
        m=6,
        return_result=True,
    )


def test_equilibrium_mode_reaches_the_unrolled_limit() -> None:
    model = contractive_model()
    tokens = tokens_for()
    deep = model(tokens, loops=200)
    for solver in ("fixed_point", "anderson"):
        logits, info = model(tokens, solver=solver, tol=1e-11, max_iter=200, return_info=True)
        torch.testing.assert_close(logits, deep, rtol=1e-7, atol=1e-7)
        assert info.result.status == "converged" and info.fixed_point.backward_mode == "ift"
    # driver options reach the forward solve: converged sequences leave the batch early
    logits, info = model(tokens, solver="anderson", tol=1e-11, compact=True, return_info=True)
    torch.testing.assert_close(logits, deep, rtol=1e-7, atol=1e-7)


def test_equilibrium_mode_gradient_matches_deep_unrolling() -> None:
    model = contractive_model()
    tokens = tokens_for()
    weight = model.injection.adapter.weight

    def grad_of(**kwargs: Any) -> Tensor:
        model.zero_grad()
        model(tokens, **kwargs).logsumexp(-1).sum().backward()
        return weight.grad.clone()

    deep = grad_of(loops=60)
    torch.testing.assert_close(
        grad_of(solver="anderson", tol=1e-11, max_iter=200, backward="ift"),
        deep,
        rtol=1e-5,
        atol=1e-7,
    )
    torch.testing.assert_close(
        grad_of(solver="anderson", tol=1e-11, max_iter=200, backward=Phantom(steps=60)),
        deep,
        rtol=1e-5,
        atol=1e-7,
    )


def test_solvers_package_finds_the_unrolled_limit() -> None:
    model = contractive_model()
    tokens = tokens_for(batch=4)
    with torch.no_grad():
        deep = model.unroll(tokens, 200)
        f, z0 = model.core_map(tokens)
        res = solvers.solve(f, z0, "fixed_point", max_iter=200, tol=1e-12)
        torch.testing.assert_close(res.z, deep, rtol=1e-9, atol=1e-9)
        # the map's parts let the driver compact the batch
        res = solvers.solve(
            f.step, z0, "anderson", max_iter=100, tol=1e-12, args=f.args, compact=True
        )
        torch.testing.assert_close(res.z, deep, rtol=1e-9, atol=1e-9)
        assert res.sample_evals < res.nfe * 4


def test_convergence_warning_points_at_the_model_call() -> None:
    model = contractive_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(tokens_for(), solver="anderson", tol=1e-14, max_iter=2)
    assert [w.category for w in caught] == [ConvergenceWarning]
    assert caught[0].filename == __file__


# ---------------------------------------------------------------- higher-order autodiff


@pytest.mark.parametrize("positions", POSITIONS)
def test_double_backward_through_the_core_with_sdpa_math(positions: str) -> None:
    """The STARS pattern: a VJP with create_graph, then backward of its square norm."""
    torch.manual_seed(0)
    model = LoopLM(tiny_model_config(positions=positions, n_core=2))
    tokens = tokens_for()
    with torch.no_grad():
        z = model.unroll(tokens, 3)
    x = model.inject(tokens)
    z = z.detach().requires_grad_(True)
    v = torch.randn_like(z)
    with sdpa_math():
        fz = model.core_step(z, x)
    (vjp,) = torch.autograd.grad(fz, z, v, create_graph=True)
    vjp.pow(2).sum().backward()
    qkv = model.core[0].attn.fn.qkv.weight.grad
    assert qkv is not None and torch.isfinite(qkv).all() and qkv.abs().sum() > 0


def test_gradgradcheck_core_step_with_sdpa_math() -> None:
    cfg = tiny_model_config(d_model=8, n_heads=2, d_ff=16, positions="rope")
    model = LoopLM(cfg).double().eval()
    z = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 3, 8, dtype=torch.float64)

    def f(z: Tensor) -> Tensor:
        with sdpa_math():
            return model.core_step(z, x)

    assert torch.autograd.gradgradcheck(f, (z,))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_jvp_with_sdpa_math() -> None:
    model = LoopLM(tiny_model_config()).double().eval()
    f, z0 = model.core_map(tokens_for())
    z = torch.randn_like(z0)
    v = torch.randn_like(z0)
    with sdpa_math():
        _, jv = torch.func.jvp(f, (z,), (v,))
    h = 1e-6
    central = (f(z + h * v) - f(z - h * v)) / (2 * h)
    torch.testing.assert_close(jv, central, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def model() -> LoopLM:
    return LoopLM(tiny_model_config())


def test_float_tokens_raise_type_error(model: LoopLM) -> None:
    with pytest.raises(TypeError, match="tokens"):
        model(torch.zeros(2, SEQ))
    with pytest.raises(TypeError, match="tokens"):
        model(torch.zeros(2, SEQ, dtype=torch.bool))


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        (torch.full((2, SEQ), VOCAB), r"tokens must lie in \[0, vocab_size=16\)"),
        (torch.full((2, SEQ), -1), "tokens must lie in"),
        (torch.zeros(2, SEQ + 1, dtype=torch.long), "max_seq_len"),
        (torch.zeros(SEQ, dtype=torch.long), "tokens must have shape"),
        (torch.zeros(2, 0, dtype=torch.long), "tokens must have shape"),
    ],
)
def test_bad_tokens_raise_value_error(model: LoopLM, tokens: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model(tokens)


def test_bad_loops(model: LoopLM) -> None:
    tokens = tokens_for()
    with pytest.raises(ValueError, match="loops must be an integer >= 0"):
        model(tokens, loops=-1)
    with pytest.raises(TypeError, match="loops"):
        model(tokens, loops=1.5)
    with pytest.raises(TypeError, match="loops"):
        model(tokens, loops=True)
    with pytest.raises(ValueError, match="loops"):
        model.unroll(tokens, -2)


def test_bad_states(model: LoopLM) -> None:
    x = model.inject(tokens_for())
    with pytest.raises(ValueError, match="z must have shape"):
        model.core_step(x[..., :-1], x)
    with pytest.raises(ValueError, match="x has shape"):
        model.core_step(x, x[:2])
    with pytest.raises(ValueError, match="z must have shape"):
        model.readout(x[0])
    with pytest.raises(TypeError, match="x must be a floating-point"):
        model.core_step(x, x.long())


def test_mode_mixing_is_rejected(model: LoopLM) -> None:
    tokens = tokens_for()
    with pytest.raises(ValueError, match="loops and solver"):
        model(tokens, loops=3, solver="anderson")
    with pytest.raises(ValueError, match="exit_threshold"):
        model(tokens, solver="anderson", exit_threshold=1e-3)
    with pytest.raises(ValueError, match="exit_threshold must be a number >= 0"):
        model(tokens, loops=3, exit_threshold=-1.0)
    with pytest.raises(TypeError, match=r"\['tol'\] apply to equilibrium mode only: pass solver="):
        model(tokens, loops=3, tol=1e-3)
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['m'\].*need solver="):
        model(tokens, loops=3, tol=1e-3, m=5)


def test_unknown_arguments_are_named_as_unknown(model: LoopLM) -> None:
    tokens = tokens_for()
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['foo'\] for LoopLM.forward"):
        model(tokens, loops=3, foo=1)
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['foo'\] for LoopLM"):
        model.core_map(tokens, foo=1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['foo'\] for solver 'anderson'"):
        model(tokens, solver="anderson", foo=1)


# ----------------------------------------------------------------- no input injection


def test_no_injection_is_the_papers_loop() -> None:
    """injection="none": z0 = x (embedding + prelude) and f(z) = core(z), blind to x."""
    torch.manual_seed(0)
    model = LoopLM(tiny_model_config(injection="none", n_prelude=1, n_coda=1)).double().eval()
    assert model.config.init_state == "input"  # the default for no injection
    tokens = tokens_for()
    f, z0 = model.core_map(tokens)
    x = model.inject(tokens)
    torch.testing.assert_close(z0, x)
    # The map ignores x: the same z under another input gives the same image.
    other_x = model.inject(tokens_for(seed=1))
    z = torch.randn_like(x)
    torch.testing.assert_close(model.core_step(z, x), model.core_step(z, other_x))
    h = z
    for block in model.core:
        h = block(h)
    torch.testing.assert_close(f(z), h)
    # loops=T is T plain applications of the core from x, then the readout.
    expected = x
    for _ in range(3):
        expected = f(expected)
    torch.testing.assert_close(model(tokens, loops=3), model.readout(expected))


def test_no_injection_needs_the_input_as_start() -> None:
    with pytest.raises(ValueError, match="injection='none' needs init_state='input'"):
        tiny_model_config(injection="none", init_state="zeros")
    assert tiny_model_config().init_state == "zeros"  # unchanged default with injection


# ------------------------------------------------------------- the protocol, for any model


class MaskedLoop(LoopedLM):
    """A minimal looped LM with two step arguments and a stage option ``drop_last``.

    ``z <- mask * tanh(z W + x)``, where ``drop_last=True`` zeroes the last position's mask.
    """

    stage_options = ("drop_last",)
    default_loops = 3

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 4).double()
        w = torch.randn(4, 4, generator=g, dtype=torch.float64)
        self.w = nn.Parameter(0.6 * w / torch.linalg.matrix_norm(w, ord=2))  # a contraction

    def inject(self, tokens: Tensor, *, drop_last: bool = False) -> Tensor:
        return self.emb(tokens)

    def initial_state(self, x: Tensor, *, drop_last: bool = False) -> Tensor:
        return torch.zeros_like(x)

    def step_args(self, x: Tensor, *, drop_last: bool = False) -> tuple[Tensor, ...]:
        mask = torch.ones_like(x[..., :1])
        if drop_last:
            mask[:, -1] = 0.0
        return x, mask

    def core_step(self, z: Tensor, x: Tensor, mask: Tensor) -> Tensor:
        return mask * torch.tanh(z @ self.w + x)

    def readout(self, z: Tensor, *, drop_last: bool = False) -> Tensor:
        return z @ self.emb.weight.T


def test_the_protocol_serves_any_looped_model() -> None:
    model = MaskedLoop()
    tokens = tokens_for(batch=5)
    x = model.emb(tokens)
    mask = torch.ones(5, SEQ, 1, dtype=torch.float64)
    mask[:, -1] = 0.0
    hand = torch.zeros_like(x)
    for _ in range(3):
        hand = mask * torch.tanh(hand @ model.w + x)
    logits, info = model(tokens, drop_last=True, return_info=True)  # default_loops = 3
    torch.testing.assert_close(info.z, hand, rtol=0, atol=0)
    torch.testing.assert_close(logits, hand @ model.emb.weight.T, rtol=0, atol=0)
    torch.testing.assert_close(model.unroll(tokens, 3, drop_last=True), hand, rtol=0, atol=0)
    f, z0 = model.core_map(tokens, drop_last=True)
    torch.testing.assert_close(f(z0), mask * torch.tanh(x))

    # early exit with a compacted batch of two step arguments, against the plain rule
    model.exit_check_every = 2
    _, info = model(tokens, loops=60, exit_threshold=1e-8, drop_last=True, return_info=True)
    with torch.no_grad():
        states = model.unroll(tokens, 60, return_states=True, drop_last=True)
    for b in range(5):
        steps = [
            float((states[t][b] - states[t - 1][b]).norm() / states[t][b].norm())
            for t in range(1, 61)
        ]
        expected = next(t for t, step in enumerate(steps, start=1) if step < 1e-8)
        assert int(info.loops_used[b]) == expected
        torch.testing.assert_close(info.z[b], states[expected][b], rtol=0, atol=0)
    assert info.result.sample_evals < info.result.nfe * 5  # exited sequences left the batch

    z_star = model(tokens, solver="anderson", tol=1e-12, drop_last=True)
    torch.testing.assert_close(z_star, model(tokens, loops=200, drop_last=True))
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['mask'\].*drop_last"):
        model(tokens, loops=2, mask=None)


# ------------------------------------------------------------ the model directory (issue 19)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_pretrained_then_load_gives_identical_logits(tmp_path: Path, dtype: Any) -> None:
    # A LoopLM is saved in the layout of Ouro's and Huginn's checkpoints and loaded by the
    # same eqloop.models.load.
    from eqloop import pretrained

    torch.manual_seed(0)
    model = LoopLM(tiny_model_config(positions="rope", injection="concat", n_prelude=1)).to(dtype)
    out = model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging left behind
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "looplm" and saved["torch_dtype"] == str(dtype)[6:]
    loaded = pretrained.load(out)
    assert type(loaded) is LoopLM and loaded.config == model.config and not loaded.training
    assert loaded.tok_emb.weight.dtype == dtype
    tokens = tokens_for()
    with torch.no_grad():
        assert torch.equal(loaded(tokens, loops=3), model.eval()(tokens, loops=3))
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        model.save_pretrained(out)
    model.save_pretrained(out, overwrite=True)


def _saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return LoopLM(tiny_model_config()).save_pretrained(tmp_path / "model")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / "config.json").write_text("{"), r"config\.json is not valid JSON"),
        (
            lambda d: (d / "config.json").write_text('{"model_type": "llama"}'),
            r"config\.json: unsupported model_type 'llama'",
        ),
        (
            lambda d: _edit_config(d, n_layer=2),
            r"config\.json: unknown LoopLMConfig keys: \['n_layer'\]",
        ),
        (lambda d: _edit_config(d, d_model=48), r"model\.safetensors does not fit .*config\.json"),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 20),
            r"model\.safetensors is not a readable safetensors file",
        ),
    ],
    ids=["not-json", "other-model-type", "unknown-key", "wrong-shapes", "damaged-weights"],
)
def test_a_damaged_model_directory_names_the_file(
    tmp_path: Path, damage: Callable[[Path], Any], match: str
) -> None:
    from eqloop import pretrained

    directory = _saved(tmp_path)
    damage(directory)
    with pytest.raises(ValueError, match=match):
        pretrained.load(directory)


def _edit_config(directory: Path, **changes: Any) -> None:
    data = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**data, **changes}))
