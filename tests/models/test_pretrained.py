"""Loading, saving, the LoopLM protocol and bad input for the pretrained architectures.

Every model here is a tiny random checkpoint written in the Hugging Face layout by
``write_tiny_checkpoint`` (single-file and sharded), then loaded back: nothing is
downloaded. Upstream parity lives in ``test_pretrained_parity.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import eqloop
import solvers
from eqloop import pretrained
from eqloop.models import HuginnForCausalLM, OuroForCausalLM

# Grouped-query attention, an explicit head_dim, sliding-window layers, a tied head.
OURO_VARIANT = dict(
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    use_sliding_window=True,
    sliding_window=3,
    layer_types=["full_attention", "sliding_attention", "full_attention"],
    tie_word_embeddings=True,
    total_ut_steps=3,
)
# Other block counts, no coda, no qk bias, grouped-query attention, untied head, adapter bias.
HUGINN_VARIANT = dict(
    n_layers=3,
    n_layers_in_prelude=2,
    n_layers_in_recurrent_block=1,
    n_layers_in_coda=0,
    num_key_value_heads=2,
    qk_bias=False,
    tie_embeddings=False,
    bias=True,
    mean_recurrence=3,
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "ouro": pretrained.write_tiny_checkpoint(root / "ouro", "ouro", initializer_range=0.2),
        "huginn": pretrained.write_tiny_checkpoint(root / "huginn", "huginn_raven"),
        "ouro_variant": pretrained.write_tiny_checkpoint(
            root / "ouro_variant", "ouro", seed=1, initializer_range=0.2, **OURO_VARIANT
        ),
        "huginn_variant": pretrained.write_tiny_checkpoint(
            root / "huginn_variant", "huginn", seed=2, **HUGINN_VARIANT
        ),
        "ouro_sharded": pretrained.write_tiny_checkpoint(
            root / "ouro_sharded", "ouro", initializer_range=0.2, max_shard_size="20KB"
        ),
        "huginn_sharded": pretrained.write_tiny_checkpoint(
            root / "huginn_sharded", "huginn_raven", max_shard_size="20KB"
        ),
    }


@pytest.fixture(scope="module")
def models(dirs):
    return {name: pretrained.load(path) for name, path in dirs.items()}


def tokens(batch=2, seq=7, seed=0, vocab=100):
    return torch.randint(4, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


ALL = ["ouro", "huginn", "ouro_variant", "huginn_variant"]


def run(model, ids, loops=None, **kw):
    if isinstance(model, HuginnForCausalLM):
        kw.setdefault("init_scale", 0.0)
    with torch.no_grad():
        return model(ids, loops, **kw)


# ------------------------------------------------------------------ layout and keys


def test_ouro_keys_and_shapes_follow_the_spec(models):
    model = models["ouro_variant"]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d, v, e, ffn = 32, 128, 12, 64
    assert shapes["model.embed_tokens.weight"] == (v, d)
    for i in range(3):
        p = f"model.layers.{i}."
        assert shapes[p + "self_attn.q_proj.weight"] == (4 * e, d)
        assert shapes[p + "self_attn.k_proj.weight"] == (2 * e, d)
        assert shapes[p + "self_attn.v_proj.weight"] == (2 * e, d)
        assert shapes[p + "self_attn.o_proj.weight"] == (d, 4 * e)
        assert shapes[p + "mlp.gate_proj.weight"] == (ffn, d)
        assert shapes[p + "mlp.up_proj.weight"] == (ffn, d)
        assert shapes[p + "mlp.down_proj.weight"] == (d, ffn)
        for norm in (
            "input_layernorm",
            "input_layernorm_2",
            "post_attention_layernorm",
            "post_attention_layernorm_2",
        ):
            assert shapes[p + norm + ".weight"] == (d,)
    assert shapes["model.norm.weight"] == (d,)
    assert shapes["model.early_exit_gate.weight"] == (1, d)
    assert shapes["model.early_exit_gate.bias"] == (1,)
    assert "lm_head.weight" not in shapes  # tied
    assert len(shapes) == 1 + 3 * 11 + 3
    assert "lm_head.weight" in models["ouro"].state_dict()  # untied
    assert not any(k.endswith(".bias") for k in shapes if "gate" not in k)
    # LoRA can target modules by their upstream names.
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), torch.nn.Linear)


def test_huginn_keys_and_shapes_follow_the_spec(models):
    shapes = {k: tuple(v.shape) for k, v in models["huginn"].state_dict().items()}
    d, heads, e, ffn = 32, 4, 8, 48
    assert shapes["transformer.wte.weight"] == (128, d)
    assert shapes["transformer.adapter.weight"] == (d, 2 * d)
    assert shapes["transformer.ln_f.weight"] == (d,)
    for prefix in (
        "transformer.prelude.0.",
        "transformer.core_block.0.",
        "transformer.core_block.1.",
        "transformer.coda.0.",
    ):
        assert shapes[prefix + "attn.Wqkv.weight"] == (3 * d, d)
        assert shapes[prefix + "attn.qk_bias"] == (2, 1, heads, e)
        assert shapes[prefix + "attn.proj.weight"] == (d, d)
        assert shapes[prefix + "mlp.fc.weight"] == (2 * ffn, d)
        assert shapes[prefix + "mlp.proj.weight"] == (d, ffn)
        for n in range(1, 5):
            assert shapes[prefix + f"norm_{n}.weight"] == (d,)
    assert "lm_head.weight" not in shapes and "transformer.adapter.bias" not in shapes
    variant = {k: tuple(v.shape) for k, v in models["huginn_variant"].state_dict().items()}
    assert variant["transformer.prelude.0.attn.Wqkv.weight"] == (d + 2 * 2 * e, d)  # GQA
    assert variant["lm_head.weight"] == (128, d) and variant["transformer.adapter.bias"] == (d,)
    assert not any("qk_bias" in k or "coda" in k for k in variant)


def test_sharded_checkpoints_load_like_single_files(dirs, models):
    for arch in ("ouro", "huginn"):
        index = json.loads((dirs[f"{arch}_sharded"] / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        single, sharded = models[arch].state_dict(), models[f"{arch}_sharded"].state_dict()
        assert single.keys() == sharded.keys()
        assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_properties(models):
    assert models["ouro"].model_type == "ouro" and models["ouro"].trained_loops == 4
    assert models["huginn"].model_type == "huginn_raven" and models["huginn"].trained_loops == 4
    assert models["ouro_variant"].trained_loops == 3
    assert not models["ouro"].training  # load returns eval mode
    assert models["ouro"].generation_config["eos_token_id"] == 2


# ---------------------------------------------------------------- the loop protocol


@pytest.mark.parametrize("name", ALL)
def test_loops_equal_a_hand_written_loop_of_core_step(models, name):
    model, ids = models[name], tokens()
    with torch.no_grad():
        x = model.inject(ids)
        kw = {"init_scale": 0.0} if isinstance(model, HuginnForCausalLM) else {}
        z = model.initial_state(x, **kw)
        for _ in range(5):
            z = model.core_step(z, x)
        expected = model.readout(z)
    assert torch.allclose(run(model, ids, 5), expected, atol=1e-6, rtol=1e-5)
    assert torch.allclose(run(model, ids), run(model, ids, model.trained_loops))


def test_ouro_loop_has_no_injection_and_starts_from_the_embeddings(models):
    model, ids = models["ouro"], tokens()
    with torch.no_grad():
        x = model.inject(ids)
        assert torch.equal(x, model.model.embed_tokens(ids))
        assert torch.equal(model.initial_state(x), x)
        z = torch.randn_like(x)
        assert torch.equal(model.core_step(z, x), model.core_step(z, torch.zeros_like(x)))


def test_ouro_exit_distribution_threshold_and_expected_logits(models):
    model, ids = models["ouro"], tokens()
    loops = 5
    with torch.no_grad():
        per_loop = [model(ids, t) for t in range(1, loops + 1)]
        states = model.unroll(ids, loops, return_states=True)[1:]
        _, info = model(ids, loops, exit="expected", return_info=True)
        expected = model(ids, loops, exit="expected")
        last, last_info = model(ids, loops, exit="threshold", exit_threshold=1.0, return_info=True)
        lam = [torch.sigmoid(model.model.early_exit_gate(z).squeeze(-1)) for z in states]
    pdf = info.exit_pdf
    assert pdf.shape == (2, 7, loops)
    assert torch.allclose(pdf.sum(-1), torch.ones(2, 7), atol=1e-6)
    # p_t = lam_t prod_{j<t}(1 - lam_j), the last loop takes the rest.
    survive = torch.ones(2, 7)
    for t in range(loops - 1):
        assert torch.allclose(pdf[..., t], lam[t] * survive, atol=1e-6)
        survive = survive * (1 - lam[t])
    assert torch.allclose(pdf[..., -1], survive, atol=1e-6)
    weighted = sum(pdf[..., t, None] * per_loop[t] for t in range(loops))
    assert torch.allclose(expected, weighted, atol=1e-5)
    assert torch.equal(last_info.exit_loop, torch.full((2, 7), loops))
    assert torch.allclose(last, per_loop[-1])
    # A lower threshold picks, per token, the first loop whose cumulative mass reaches it.
    with torch.no_grad():
        mid, mid_info = model(ids, loops, exit="threshold", exit_threshold=0.6, return_info=True)
    first = (pdf.cumsum(-1) >= 0.6).float().argmax(-1) + 1
    assert torch.equal(mid_info.exit_loop, first)
    for b in range(2):
        for i in range(7):
            assert torch.allclose(mid[b, i], per_loop[int(first[b, i]) - 1][b, i], atol=1e-6)


def test_huginn_init_scale_zero_is_deterministic_and_random_init_is_truncated(models):
    model, ids = models["huginn"], tokens()
    with torch.no_grad():
        a, b = model(ids, 3, init_scale=0.0), model(ids, 3, init_scale=0.0)
        assert torch.equal(a, b)
        x = model.inject(ids)
        assert torch.equal(model.initial_state(x, init_scale=0.0), torch.zeros_like(x))
        gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
        r1 = model(ids, 3, generator=gen())
        r2 = model(ids, 3, generator=gen())
        assert torch.equal(r1, r2) and not torch.allclose(r1, a)
        z0 = model.initial_state(x, generator=gen())
    cfg = model.config
    bound = 3 * cfg.init_std * cfg.embed_scale
    assert float(z0.abs().max()) <= bound * (1 + 1e-6)
    assert abs(float(z0.std()) / (cfg.init_std * cfg.embed_scale) - 1) < 0.2
    with torch.no_grad():
        half = model.initial_state(x, init_scale=0.5, generator=gen())
    assert torch.allclose(half, 0.5 * z0, atol=1e-6)


def test_huginn_step_concatenates_state_then_embedding(models):
    model, ids = models["huginn"], tokens()
    t = model.transformer
    with torch.no_grad():
        x = model.inject(ids)
        z = torch.randn_like(x)
        d = x.shape[-1]
        w = t.adapter.weight
        h = z @ w[:, :d].T + x @ w[:, d:].T  # state first, then the embedding
        ctx = model._context(*ids.shape, ids)
        for block in t.core_block:
            h = block(h, ctx, None)
        assert torch.allclose(model.core_step(z, x), h, atol=1e-6)
        assert not torch.allclose(model.core_step(x, z), h, atol=1e-3)
        # The embedding is scaled by embed_scale before the prelude.
        e = t.wte(ids) * model.config.embed_scale
        for block in t.prelude:
            e = block(e, ctx, None)
        assert torch.allclose(x, e, atol=1e-6)


def test_huginn_no_grad_then_grad_split(models):
    model, ids = models["huginn"], tokens()
    model.zero_grad()
    out = model(ids, (3, 2), init_scale=0.0)
    assert torch.allclose(out, run(model, ids, 5), atol=1e-6)
    out.sum().backward()
    core = model.transformer.core_block[0].mlp.fc.weight
    prelude = model.transformer.prelude[0].mlp.fc.weight
    assert core.grad is not None and float(core.grad.abs().sum()) > 0
    assert prelude.grad is not None and float(prelude.grad.abs().sum()) > 0  # x enters every step
    model.zero_grad()
    model(ids, (5, 0), init_scale=0.0).sum().backward()
    assert core.grad is None or float(core.grad.abs().sum()) == 0.0  # upstream's int num_steps
    assert float(model.transformer.coda[0].mlp.fc.weight.grad.abs().sum()) > 0
    model.zero_grad()


# ------------------------------------------------------------------------ padding


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("side", ["left", "right"])
def test_masked_batch_agrees_with_each_sequence_alone(models, name, side):
    model = models[name]
    lengths = [9, 5, 2]
    full = 9
    rows = [tokens(1, n, seed=n)[0] for n in lengths]
    ids = torch.zeros(len(rows), full, dtype=torch.long)
    mask = torch.zeros(len(rows), full, dtype=torch.long)
    for b, row in enumerate(rows):
        where = slice(full - len(row), full) if side == "left" else slice(0, len(row))
        ids[b, where], mask[b, where] = row, 1
    batched = run(model, ids, 4, attention_mask=mask)
    assert torch.isfinite(batched).all()
    for b, row in enumerate(rows):
        alone = run(model, row[None], 4)[0]
        picked = batched[b][mask[b].bool()]
        assert torch.allclose(picked, alone, atol=1e-5), (name, side, b)


def test_all_ones_mask_changes_nothing(models):
    model, ids = models["ouro_variant"], tokens()
    assert torch.allclose(
        run(model, ids, 3), run(model, ids, 3, attention_mask=torch.ones_like(ids)), atol=1e-6
    )


def test_sliding_window_limits_what_a_query_sees(tmp_path):
    # One layer, one loop: position i sees exactly tokens (i - w, i] through the window.
    window = 3
    common = dict(num_hidden_layers=1, total_ut_steps=1, initializer_range=0.3)
    sliding = pretrained.load(
        pretrained.write_tiny_checkpoint(
            tmp_path / "s",
            "ouro",
            use_sliding_window=True,
            sliding_window=window,
            layer_types=["sliding_attention"],
            **common,
        )
    )
    ids = tokens(1, 8)
    base = run(sliding, ids, 1)[0, 7]
    far, near = ids.clone(), ids.clone()
    far[0, 7 - window] = (far[0, 7 - window] + 1) % 90 + 4  # just outside the window
    near[0, 7 - window + 1] = (near[0, 7 - window + 1] + 1) % 90 + 4  # the oldest key inside
    assert torch.allclose(run(sliding, far, 1)[0, 7], base, atol=1e-7)
    assert not torch.allclose(run(sliding, near, 1)[0, 7], base, atol=1e-5)
    full = pretrained.load(pretrained.write_tiny_checkpoint(tmp_path / "f", "ouro", **common))
    assert not torch.allclose(run(full, far, 1)[0, 7], run(full, ids, 1)[0, 7], atol=1e-5)


# -------------------------------------------------------------- fixed-point tools


@pytest.mark.filterwarnings("ignore::eqloop.core.implicit.ConvergenceWarning")
@pytest.mark.parametrize("name", ["ouro", "huginn"])
def test_solvers_and_spectral_tools_run_on_the_core(models, name):
    model, ids = models[name], tokens()
    kw = {"init_scale": 0.0} if name == "huginn" else {}
    with torch.no_grad():
        f, z0 = model.core_map(ids, **kw)
        res = solvers.solve(f, z0, "anderson", max_iter=60, tol=1e-4)
        assert res.z.shape == z0.shape and res.nfe > 0
        assert torch.allclose(f(res.z), res.z, atol=float(res.abs_residual.max()) * 1.01 + 1e-6)
        # The per-sample form lets the solver drop converged rows.
        x = model.inject(ids)
        mask = torch.ones_like(ids)
        compact = solvers.solve(
            model.core_step, z0, "fixed_point", args=(x, mask), compact=True, max_iter=5, tol=0.0
        )
        closed = solvers.solve(f, z0, "fixed_point", max_iter=5, tol=0.0)
        assert torch.allclose(compact.z, closed.z, atol=1e-5)
    rho = eqloop.spectral_radius(f, res.z, method="arnoldi", iters=10)
    assert rho.shape == (2,) and bool((rho > 0).all()) and torch.isfinite(rho).all()
    with torch.no_grad():
        logits = model(ids, solver="anderson", tol=1e-4, max_iter=60, **kw)
        assert torch.allclose(logits, model.readout(res.z), atol=1e-4)


@pytest.mark.filterwarnings("ignore::eqloop.core.implicit.ConvergenceWarning")
@pytest.mark.parametrize("name", ["ouro", "huginn"])
@pytest.mark.parametrize("backward", ["ift", "phantom", "truncated", "unroll"])
def test_fixed_point_backward_modes_reach_the_parameters(models, name, backward):
    model, ids = models[name], tokens(seq=5)
    kw = {"init_scale": 0.0} if name == "huginn" else {}
    model.zero_grad()
    f, z0 = model.core_map(ids, **kw)
    solver = "fixed_point" if backward == "unroll" else "anderson"
    z = eqloop.fixed_point(f, z0, solver=solver, backward=backward, max_iter=12, tol=1e-4)
    model.readout(z).logsumexp(-1).mean().backward()
    layer = (
        model.model.layers[0].mlp.up_proj
        if name == "ouro"
        else model.transformer.core_block[0].mlp.fc
    )
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    assert float(layer.weight.grad.abs().sum()) > 0
    model.zero_grad()


@pytest.mark.parametrize("name", ["ouro", "huginn"])
def test_jsrr_penalty_is_differentiable_on_the_core(models, name):
    model, ids = models[name], tokens(seq=5)
    kw = {"init_scale": 0.0} if name == "huginn" else {}
    model.zero_grad()
    f, z0 = model.core_map(ids, **kw)
    with torch.no_grad():
        z = f(f(z0))
    penalty = eqloop.jsrr_penalty(f, z)
    assert penalty.dim() == 0 and float(penalty.detach()) > 0
    penalty.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    model.zero_grad()


# -------------------------------------------------------------------- save, load


@pytest.mark.parametrize("name", ALL)
def test_save_then_load_is_exact(models, dirs, name, tmp_path):
    model = models[name]
    out = model.save_pretrained(tmp_path / "saved")
    again = pretrained.load(out)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a
    )
    saved = json.loads((out / "config.json").read_text())
    original = json.loads((dirs[name] / "config.json").read_text())
    assert saved == original
    assert torch.equal(run(model, tokens(), 3), run(again, tokens(), 3))
    # Sharded and in another dtype.
    model16 = pretrained.load(dirs[name], dtype=torch.bfloat16)
    sharded = model16.save_pretrained(tmp_path / "bf16", max_shard_size="8KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = pretrained.load(sharded)
    assert back.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(torch.equal(v, model16.state_dict()[k]) for k, v in back.state_dict().items())
    assert json.loads((sharded / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_save_fixture_round_trip_keeps_upstream_files_loadable(tmp_path):
    from pathlib import Path

    fixture = Path("/work/shared/fixtures/huginn-tiny")
    if not fixture.is_dir():
        pytest.skip("no upstream fixtures")
    model = pretrained.load(fixture)
    out = model.save_pretrained(tmp_path / "h")
    files = load_file(out / "model.safetensors")
    upstream = load_file(fixture / "model.safetensors")
    assert files.keys() == upstream.keys()  # freqs_cis included, lm_head tied away
    assert torch.allclose(files["freqs_cis"], upstream["freqs_cis"], atol=1e-5)
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (fixture / "config.json").read_text()
    )


def test_save_refuses_to_overwrite_without_permission(models, tmp_path):
    model = models["ouro"]
    model.save_pretrained(tmp_path / "x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained(tmp_path / "x")
    model.save_pretrained(tmp_path / "x", max_shard_size="10KB", overwrite=True)
    assert not (tmp_path / "x" / "model.safetensors").exists()  # the stale single file is gone
    model.save_pretrained(tmp_path / "x", overwrite=True)
    assert not list((tmp_path / "x").glob("model-*.safetensors"))
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "y", max_shard_size="5 parsecs")


# ---------------------------------------------------------------------- bad input


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    file = path / "config.json"
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


def test_missing_files_raise_clear_errors(dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained.load(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        pretrained.load(empty)
    no_weights = _copy(dirs["ouro"], tmp_path / "noweights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match="model.safetensors or model.safetensors.index.json"
    ):
        pretrained.load(no_weights)
    no_shard = _copy(dirs["ouro_sharded"], tmp_path / "noshard")
    next(no_shard.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        pretrained.load(no_shard)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        pretrained.load_tokenizer(empty)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "llama"}, "unsupported model_type 'llama'"),
        ({"model_type": None}, "unsupported model_type None"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "use_sliding_window"),
        ({"attention_bias": True}, "attention_bias"),
        ({"total_ut_steps": 0}, "total_ut_steps"),
    ],
)
def test_unsupported_ouro_config_values_raise(dirs, tmp_path, changes, message):
    path = _copy(dirs["ouro"], tmp_path / "c")
    _edit_config(path, **changes)
    with pytest.raises((ValueError, TypeError), match=message):
        pretrained.load(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"injection_type": "add"}, "injection_type"),
        ({"state_init": "zero"}, "state_init"),
        ({"test_time_noise": 0.1}, "test_time_noise"),
        ({"n_layers": 7}, "n_layers=7"),
        ({"head_dim": 16}, "head_dim=16"),
        ({"mlp_class_name": "BaseMLP"}, "mlp_class_name"),
        ({"num_key_value_heads": 2}, "qk_bias with grouped-query"),
    ],
)
def test_unsupported_huginn_config_values_raise(dirs, tmp_path, changes, message):
    path = _copy(dirs["huginn"], tmp_path / "c")
    _edit_config(path, **changes)
    with pytest.raises(ValueError, match=message):
        pretrained.load(path)


def test_unknown_config_keys_raise_unless_allowed(dirs, tmp_path):
    path = _copy(dirs["ouro"], tmp_path / "c")
    _edit_config(path, my_new_feature=3)
    with pytest.raises(ValueError, match="my_new_feature.*strict_config=False"):
        pretrained.load(path)
    model = pretrained.load(path, strict_config=False)
    out = model.save_pretrained(tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["my_new_feature"] == 3


def test_tensor_mismatches_are_listed_in_one_error(dirs, tmp_path):
    path = _copy(dirs["ouro"], tmp_path / "c")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.9.self_attn.q_proj.weight"] = torch.zeros(2, 2)
    tensors["model.norm.weight"] = torch.ones(31)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        pretrained.load(path)
    text = str(err.value)
    assert "missing ['model.layers.1.mlp.up_proj.weight']" in text
    assert "unexpected ['model.layers.9.self_attn.q_proj.weight']" in text
    assert "model.norm.weight: file (31,), model (32,)" in text


def test_tied_head_in_the_file_must_equal_the_embedding(dirs, tmp_path):
    path = _copy(dirs["huginn"], tmp_path / "c")
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    save_file(tensors, path / "model.safetensors")
    pretrained.load(path)  # the same matrix: accepted
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="ties the head"):
        pretrained.load(path)


def test_bad_call_arguments_raise(models):
    ouro, huginn, ids = models["ouro"], models["huginn"], tokens()
    with pytest.raises(ValueError, match=r"\[0, vocab_size=128\)"):
        ouro(torch.full((1, 3), 500))
    with pytest.raises(TypeError, match="integer tensor"):
        ouro(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="loops must be an integer >= 0"):
        ouro(ids, -1)
    with pytest.raises(ValueError, match="mutually exclusive"):
        ouro(ids, 3, solver="anderson")
    with pytest.raises(TypeError, match="equilibrium mode"):
        ouro(ids, 3, tol=1e-3)
    with pytest.raises(ValueError, match="exit_threshold needs exit='threshold'"):
        ouro(ids, 3, exit_threshold=0.5)
    with pytest.raises(ValueError, match="exit must be one of"):
        ouro(ids, 3, exit="sometimes")
    with pytest.raises(ValueError, match="exit_threshold must be a number"):
        ouro(ids, 3, exit="threshold", exit_threshold=1.5)
    with pytest.raises(TypeError, match="init_scale"):  # a Huginn option
        ouro(ids, 3, init_scale=0.0)
    with pytest.raises(ValueError, match="init_scale must be a number >= 0"):
        huginn(ids, 3, init_scale=-1.0)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        ouro(ids, 3, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="pair"):
        huginn(ids, (1, 2, 3))
    with pytest.raises(TypeError, match="dtype must be a floating"):
        pretrained.load("/nowhere", dtype=torch.int8)


# ------------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_come_from_the_tokenizer_files(dirs, tmp_path):
    tok = pretrained.load_tokenizer(dirs["ouro"])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.padding_side == "left"
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert tok.decode(tok("Hi there!")["input_ids"]) == "Hi there!"
    path = _copy(dirs["ouro"], tmp_path / "c")
    _edit_config(path, eos_token_id=0, bos_token_id=0)  # what some upstream configs say
    with pytest.warns(UserWarning, match="config.json eos_token_id=0 \\(tokenizer: 2\\)"):
        tok = pretrained.load_tokenizer(path)
    assert tok.eos_token_id == 2


def test_core_import_stays_light():
    code = (
        "import sys, eqloop, eqloop.models as p; "
        "m = p.load(sys.argv[1]); m(__import__('torch').tensor([[5, 6]])); "
        "bad = [n for n in ('transformers', 'tokenizers') if n in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    from pathlib import Path

    fixture = Path("/work/shared/fixtures/ouro-tiny")
    if not fixture.is_dir():
        pytest.skip("no upstream fixtures")
    done = subprocess.run(
        [sys.executable, "-c", code, str(fixture)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_direct_construction_and_init(models):
    cfg = models["ouro"].config
    model = OuroForCausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    assert model.state_dict().keys() == models["ouro"].state_dict().keys()
    with pytest.raises(TypeError, match="OuroConfig"):
        OuroForCausalLM(models["huginn"].config)


@pytest.mark.parametrize("model_type", ["ouro", "huginn_raven"])
def test_loops_and_solves_never_read_the_host(model_type):
    # The meta device raises on any host read: the loop, the masks and a solve with
    # check_every=None must run without one.
    from eqloop.models.config import config_from_dict
    from eqloop.models.tiny import TINY_DEFAULTS

    config = config_from_dict({"model_type": model_type, **TINY_DEFAULTS[model_type]})
    cls = OuroForCausalLM if model_type == "ouro" else HuginnForCausalLM
    with torch.device("meta"):
        model = cls(config)
        ids = torch.zeros(2, 5, dtype=torch.long)
        mask = torch.ones(2, 5, dtype=torch.long)
    kw = {} if model_type == "ouro" else {"init_scale": 0.0}
    assert model(ids, 3, attention_mask=mask, **kw).device.type == "meta"
    f, z0 = model.core_map(ids, attention_mask=mask, **kw)
    assert solvers.solve(f, z0, "anderson", max_iter=5, tol=1e-4, check_every=None).z.is_meta
