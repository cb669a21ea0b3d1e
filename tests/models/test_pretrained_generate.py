"""Generation with the per-(loop, layer) KV cache: cached == recompute, batching, exits."""

from __future__ import annotations

import pytest
import torch

from eqloop import pretrained
from eqloop.models import generation
from eqloop.models.generation import adaptive_forward
from eqloop.models.layers import KVCache

OURO_VARIANT = dict(
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=12,
    use_sliding_window=True,
    sliding_window=3,
    layer_types=["full_attention", "sliding_attention", "full_attention"],
    total_ut_steps=3,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    paths = {
        "ouro": pretrained.write_tiny_checkpoint(root / "o", "ouro", initializer_range=0.2),
        "ouro_variant": pretrained.write_tiny_checkpoint(
            root / "ov", "ouro", seed=3, initializer_range=0.2, **OURO_VARIANT
        ),
        "huginn": pretrained.write_tiny_checkpoint(root / "h", "huginn_raven"),
    }
    return {k: pretrained.load(v) for k, v in paths.items()}, pretrained.load_tokenizer(
        paths["ouro"]
    )


def prompts(tok, texts=("Hello world", "Hi", "A longer prompt")):
    batch = tok(list(texts), padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def extra(name):
    return {"init_scale": 0.0} if name.startswith("huginn") else {}


@pytest.mark.parametrize("name", ["ouro", "ouro_variant", "huginn"])
def test_cached_decoding_equals_full_recompute(models, name):
    models, tok = models
    model = models[name]
    ids, mask = prompts(tok)
    kw = dict(attention_mask=mask, max_new_tokens=16, return_dict=True, **extra(name))
    cached = model.generate(ids, **kw)
    recomputed = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert torch.allclose(cached.logits, recomputed.logits, atol=2e-5, rtol=1e-4)
    assert cached.sequences.shape == (3, ids.shape[1] + 16)
    # Greedy: every new token is the argmax of its logits.
    assert torch.equal(cached.sequences[:, ids.shape[1] :], cached.logits.argmax(-1))


@pytest.mark.parametrize("exit", ["threshold", "expected"])
def test_ouro_exits_in_cached_decoding_equal_recompute(models, exit):
    models, tok = models
    model = models["ouro"]
    ids, mask = prompts(tok)
    threshold = 0.5 if exit == "threshold" else None
    kw = dict(
        attention_mask=mask,
        max_new_tokens=10,
        return_dict=True,
        exit=exit,
        exit_threshold=threshold,
    )
    cached, recomputed = model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert torch.equal(cached.loops_used, recomputed.loops_used)
    if exit == "threshold":
        assert int(cached.loops_used.min()) < model.trained_loops  # some tokens exit early
        with torch.no_grad():
            _, info = model(
                ids, exit="threshold", exit_threshold=0.5, attention_mask=mask, return_info=True
            )
        assert torch.equal(cached.loops_used[:, 0], info.exit_loop[:, -1])


@pytest.mark.parametrize("name", ["ouro", "ouro_variant", "huginn"])
def test_batched_prompts_decode_like_each_prompt_alone(models, name):
    models, tok = models
    model = models[name]
    texts = ("Hello world", "Hi", "A longer prompt")
    ids, mask = prompts(tok, texts)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, **extra(name))
    for b, text in enumerate(texts):
        alone = model.generate(
            tok([text], return_tensors="pt")["input_ids"], max_new_tokens=8, **extra(name)
        )
        assert torch.equal(batched[b, -8:], alone[0, -8:]), (name, b)


@pytest.mark.parametrize("exit", ["latent-diff", "kl", "entropy-diff", "argmax-stability"])
def test_huginn_per_token_early_exit_in_batches(models, exit):
    models, tok = models
    model = models["huginn"]
    texts = ("Hello world", "Hi", "A longer prompt")
    ids, mask = prompts(tok, texts)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=6,
        loops=16,
        exit=exit,
        init_scale=0.0,
        return_dict=True,
    )
    used = out.loops_used
    assert bool((used[:, 0] == 16).all())  # the prompt runs every step
    assert int(used[:, 1:].min()) < 16 and int(used.max()) <= 16
    assert len(set(used[:, 1:].flatten().tolist())) > 1  # tokens exit at different steps
    for b, text in enumerate(texts):
        alone = model.generate(
            tok([text], return_tensors="pt")["input_ids"],
            max_new_tokens=6,
            loops=16,
            exit=exit,
            init_scale=0.0,
            return_dict=True,
        )
        assert torch.equal(out.sequences[b, -6:], alone.sequences[0, -6:])
        assert torch.equal(used[b], alone.loops_used[0])


def test_huginn_exited_tokens_keep_their_last_keys_in_later_slots(models):
    models, tok = models
    model = models["huginn"]
    ids = tok(["Hello"], return_tensors="pt")["input_ids"]
    cache = KVCache(1, 16)
    with torch.no_grad():
        model.decode_call(ids, None, cache, 12, model.decode_options("none", init_scale=0.0))
        _, used = model.decode_call(
            ids[:, -1:], None, cache, 12, model.decode_options("kl", 1e-2, init_scale=0.0)
        )
    steps = int(used)
    assert steps < 12
    last = cache.length - 1
    for j in range(2):
        k_exit = cache._slots[(steps - 1, j)][0][:, :, last]
        for s in range(steps, 12):
            assert torch.equal(cache._slots[(s, j)][0][:, :, last], k_exit)
        # Earlier tokens keep the keys of their own steps.
        assert not torch.equal(
            cache._slots[(11, j)][0][:, :, 0], cache._slots[(steps - 1, j)][0][:, :, 0]
        )


def test_huginn_adaptive_forward_matches_the_parallel_forward_without_exits(models):
    models, tok = models
    model = models["huginn"]
    ids, mask = prompts(tok)
    with torch.no_grad():
        parallel = model(ids, 4, attention_mask=mask, init_scale=0.0)
        sequential, steps = adaptive_forward(
            model, ids, exit="none", loops=4, attention_mask=mask, init_scale=0.0
        )
        _, kl_steps = adaptive_forward(
            model,
            ids,
            exit="kl",
            exit_threshold=1e-2,
            loops=16,
            attention_mask=mask,
            init_scale=0.0,
        )
    real = mask.bool()
    assert torch.allclose(sequential[real], parallel[real], atol=1e-5)
    assert bool((steps == 4).all())
    assert int(kl_steps[real].min()) < 16


def test_ouro_cache_has_one_slot_per_loop_and_layer(models):
    models, tok = models
    model = models["ouro_variant"]
    ids, mask = prompts(tok)
    cache = KVCache(ids.shape[0], ids.shape[1] + 4)
    with torch.no_grad():
        model.decode_call(ids, mask, cache, 3, model.decode_options("last"))
    assert sorted(cache.slots()) == [(t, layer) for t in range(3) for layer in range(3)]
    assert cache.length == ids.shape[1]
    k, _ = cache._slots[(0, 0)]
    assert k.shape[:2] == (3, 2)  # key/value heads, not query heads


def test_sampling_is_reproducible_and_respects_the_filters(models):
    models, tok = models
    model = models["ouro"]
    ids, mask = prompts(tok)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, return_dict=True)
    a = model.generate(ids, generator=torch.Generator().manual_seed(1), **kw)
    b = model.generate(ids, generator=torch.Generator().manual_seed(1), **kw)
    c = model.generate(ids, generator=torch.Generator().manual_seed(2), temperature=2.0, **kw)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(model.generate(ids, top_k=1, **kw).sequences, greedy)
    assert torch.equal(model.generate(ids, top_p=1e-6, **kw).sequences, greedy)
    top3 = model.generate(ids, top_k=3, generator=torch.Generator().manual_seed(3), **kw)
    chosen = top3.sequences[:, ids.shape[1] :]
    allowed = top3.logits.topk(3, dim=-1).indices
    assert bool((allowed == chosen[..., None]).any(-1).all())


def test_stop_tokens_end_rows_and_pad_them(models):
    models, tok = models
    model = models["ouro"]
    ids, mask = prompts(tok)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    new = free[:, ids.shape[1] :]
    stop = int(new[0, 2])  # row 0 produces it at its third new token
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=10,
        stop_token_ids=[stop],
        pad_token_id=0,
        return_dict=True,
    )
    first = [next((i for i, t in enumerate(row.tolist()) if t == stop), None) for row in new]
    for b, index in enumerate(first):
        got = out.sequences[b, ids.shape[1] :]
        if index is None:
            assert not bool(out.finished[b])
            assert torch.equal(got, new[b, : got.shape[0]])
        else:
            assert bool(out.finished[b])
            assert torch.equal(got[: index + 1], new[b, : index + 1])
            assert bool((got[index + 1 :] == 0).all())
            assert bool((out.attention_mask[b, ids.shape[1] + index + 1 :] == 0).all())
    if all(i is not None for i in first):
        assert out.sequences.shape[1] == ids.shape[1] + max(first) + 1  # stops early


def test_huginn_never_generates_padded_vocabulary_ids(tmp_path):
    path = pretrained.write_tiny_checkpoint(
        tmp_path / "h", "huginn", vocab_size=100, padded_vocab_size=128
    )
    model = pretrained.load(path)
    ids = torch.tensor([[5, 6, 7]])
    out = model.generate(
        ids,
        max_new_tokens=20,
        do_sample=True,
        init_scale=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert int(out.max()) < 100


def test_generation_rejects_bad_arguments(models):
    models, tok = models
    ouro, huginn = models["ouro"], models["huginn"]
    ids, mask = prompts(tok)
    right = tok(["Hello world", "Hi"], padding=True, padding_side="right", return_tensors="pt")
    with pytest.raises(ValueError, match="left-padded"):
        ouro.generate(right["input_ids"], attention_mask=right["attention_mask"], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ouro.generate(ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="need do_sample=True"):
        ouro.generate(ids, max_new_tokens=2, top_k=5)
    with pytest.raises(ValueError, match="exit must be one of"):
        huginn.generate(ids, max_new_tokens=2, exit="threshold")
    with pytest.raises(ValueError, match="need the cache"):
        huginn.generate(ids, max_new_tokens=2, exit="kl", use_cache=False)
    with pytest.raises(TypeError, match="init_scale is a Huginn option"):
        ouro.generate(ids, max_new_tokens=2, init_scale=0.0)
    with pytest.raises(ValueError, match="exit_threshold must be an integer"):
        huginn.generate(ids, max_new_tokens=2, exit="argmax-stability", exit_threshold=0)
    with pytest.raises(TypeError, match="loops must be an integer"):
        ouro.generate(ids, max_new_tokens=2, loops=(1, 2))
    assert ouro.generate(ids, attention_mask=mask, max_new_tokens=0).shape == ids.shape


@pytest.mark.parametrize("name", ["ouro", "huginn"])
def test_non_binary_attention_masks_are_refused_everywhere(models, name):
    models, tok = models
    model = models[name]
    ids, mask = prompts(tok)
    kw = extra(name)
    additive = (1 - mask).float() * -1e4  # 0 to attend, -1e4 at padding: not a 0/1 mask
    calls = {
        "forward": lambda m: model(ids, attention_mask=m, **kw),
        "forward (n, k)": lambda m: model(ids, (1, 1), attention_mask=m, **kw),
        "core_map": lambda m: model.core_map(ids, attention_mask=m, **kw),
        "inject": lambda m: model.inject(ids, attention_mask=m),
        "generate": lambda m: model.generate(ids, attention_mask=m, max_new_tokens=1, **kw),
        "diagnose": lambda m: pretrained.diagnose(model, ids, attention_mask=m, loops=1, rho=False),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=r"attention_mask must be 1 .*-10000\.0"):
            call(additive)
    with pytest.raises(ValueError, match="attention_mask must be 1"):
        model.inject(ids, attention_mask=mask * 2)
    # 0/1 in any dtype and bool are the same mask; the loop's map receives it as bool.
    want = model(ids, attention_mask=mask, **kw)
    for same in (mask.bool(), mask.float(), mask.to(torch.int32)):
        assert torch.equal(model(ids, attention_mask=same, **kw), want)
    f, _ = model.core_map(ids, attention_mask=mask.float(), **kw)
    assert f.args[1].dtype == torch.bool and torch.equal(f.args[1], mask.bool())


def test_kv_cache_grows_with_the_tokens_not_with_max_new_tokens(models, monkeypatch):
    models, tok = models
    model = models["ouro"]
    ids, mask = prompts(tok)
    made = []

    class Recorded(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(generation, "KVCache", Recorded)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=1)[:, -1].tolist()
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=10**7,  # a stop token at the first step: nothing may be sized by this
        stop_token_ids=first,
        return_dict=True,
    )
    assert bool(out.finished.all()) and out.sequences.shape[1] == ids.shape[1] + 1
    cache = made[-1]
    assert cache.capacity <= ids.shape[1] + generation.CACHE_RESERVE
    assert cache.nbytes() < 2**20  # was ~10 GB: every slot sized for 10**7 tokens


@pytest.mark.parametrize(
    ("name", "exit"), [("ouro_variant", None), ("huginn", None), ("huginn", "latent-diff")]
)
def test_a_growing_kv_cache_decodes_like_a_preallocated_one(models, monkeypatch, name, exit):
    models, tok = models
    model = models[name]
    ids, mask = prompts(tok)
    kw = dict(attention_mask=mask, max_new_tokens=13, return_dict=True, exit=exit, **extra(name))
    whole = model.generate(ids, **kw)  # room for all 13 new tokens from the start
    made = []

    class Recorded(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(generation, "KVCache", Recorded)
    monkeypatch.setattr(generation, "CACHE_RESERVE", 1)  # grows three times on the way
    grown = model.generate(ids, **kw)
    assert torch.equal(grown.sequences, whole.sequences)
    assert torch.equal(grown.loops_used, whole.loops_used)
    assert torch.allclose(grown.logits, whole.logits, atol=1e-6, rtol=1e-5)
    cache = made[-1]
    assert ids.shape[1] + 1 < cache.capacity == ids.shape[1] + 13  # doubled, capped at the end
    if exit is None:
        recomputed = model.generate(ids, use_cache=False, **kw)
        assert torch.equal(grown.sequences, recomputed.sequences)


@pytest.mark.parametrize("name", ["ouro", "huginn"])
def test_non_finite_logits_are_an_error_not_token_zero(tmp_path, name):
    untied = {"tie_embeddings": False} if name == "huginn" else {}  # NaN stays out of the head
    model = pretrained.load(pretrained.write_tiny_checkpoint(tmp_path / name, name, **untied))
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():  # NaN in the embedding of a token only row 1 holds
        model.get_input_embeddings().weight[9] = float("nan")
    kw = dict(max_new_tokens=3, **extra(name))
    with pytest.raises(ValueError, match=r"new token 0 are not finite .* batch rows \[1\]"):
        model.generate(ids, **kw)
    with pytest.raises(ValueError, match=r"not finite .* batch rows \[1\]"):
        model.generate(ids, use_cache=False, **kw)
    with pytest.raises(ValueError, match=r"not finite .* batch rows \[0, 1\]"):
        model.generate(torch.tensor([[9], [9]]), do_sample=True, **kw)
    assert model.generate(ids[:1], **kw).shape == (1, 6)  # row 0 alone is fine


def test_generation_validates_stop_ids_temperature_batch_and_exit_threshold(models):
    models, tok = models
    ouro, huginn = models["ouro"], models["huginn"]
    ids, mask = prompts(tok)
    vocab = ouro.config.vocab_size
    # An id the model cannot generate would never stop a row; named as a stop id even
    # when a pad id is given (it used to pass) or not (it was blamed on pad_token_id).
    for pad in (None, 0):
        with pytest.raises(ValueError, match=rf"stop_token_ids\[1\] .* in \[0, {vocab - 1}\]"):
            ouro.generate(ids, max_new_tokens=2, stop_token_ids=[2, vocab], pad_token_id=pad)
    with pytest.raises(TypeError, match="stop_token_ids must be a token id or a list"):
        ouro.generate(ids, max_new_tokens=2, stop_token_ids="2")
    # One id is a list of one.
    free = ouro.generate(ids, attention_mask=mask, max_new_tokens=4)
    stop = int(free[0, ids.shape[1] + 1])
    one = ouro.generate(ids, attention_mask=mask, max_new_tokens=4, stop_token_ids=stop)
    assert torch.equal(
        one, ouro.generate(ids, attention_mask=mask, max_new_tokens=4, stop_token_ids=[stop])
    )
    # A vanishing temperature is greedy decoding, not NaN probabilities.
    cold = ouro.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=1e-40
    )
    assert torch.equal(cold, ouro.generate(ids, attention_mask=mask, max_new_tokens=6))
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        ouro.generate(ids, max_new_tokens=2, do_sample=True, temperature=0.0)
    # An empty batch is refused at the boundary (it failed inside a reshape).
    empty = torch.zeros(0, 4, dtype=torch.long)
    for call in (lambda: huginn.generate(empty, max_new_tokens=2), lambda: huginn(empty)):
        with pytest.raises(ValueError, match=r"at least one sequence .* \(0, 4\)"):
            call()
    # exit_threshold with an exit that uses none: refused by Huginn as by Ouro.
    with pytest.raises(ValueError, match=r"exit_threshold needs exit='latent-diff' \| 'kl'"):
        huginn.generate(ids, max_new_tokens=2, exit="none", exit_threshold=0.5)
    with pytest.raises(ValueError, match="exit_threshold needs exit='latent-diff'"):
        huginn.generate(ids, max_new_tokens=2, exit_threshold=0.5)  # exit defaults to none
    with pytest.raises(ValueError, match="exit_threshold needs exit='threshold'; exit='last'"):
        ouro.generate(ids, max_new_tokens=2, exit="last", exit_threshold=0.5)
    with pytest.raises(ValueError, match="exit_threshold needs exit='threshold'; exit='expected'"):
        ouro(ids, exit="expected", exit_threshold=0.5)


# ------------------------------------------------- static cache, compiled decode step


def test_kv_cache_buffers_keep_shape_and_address_and_decode_reads_no_host_length(models):
    models, tok = models
    model = models["ouro_variant"]
    ids, mask = prompts(tok)
    cache = KVCache(ids.shape[0], ids.shape[1] + 4, max_length=ids.shape[1] + 40)
    token = ids[:, -1:]
    with torch.no_grad():
        model.decode_call(ids, mask, cache, 3, model.decode_options("last"))
        storage = {name: k.data_ptr() for name, (k, _) in cache._slots.items()}
        for _ in range(4):  # fills the reserved room: same buffers, written in place
            model.decode_call(token, None, cache, 3, model.decode_options("last"))
            assert {n: k.data_ptr() for n, (k, _) in cache._slots.items()} == storage
        assert cache.capacity == ids.shape[1] + 4 and int(cache.index) == cache.length
        # The next call grows the cache: doubled once.
        model.decode_call(token, None, cache, 3, model.decode_options("last"))
        assert cache.capacity == 2 * (ids.shape[1] + 4) == cache._slots[(0, 0)][0].shape[2]
        # A decode step takes its position from the index tensor, not from `length`.
        cache.reserve(1)
        ctx = model._context(ids.shape[0], 1, token, None, cache)
        cache.length = -(10**6)  # never read by the step
        assert tuple(ctx.masks["full_attention"].shape) == (3, 1, 1, cache.capacity)
        k, _ = cache.update((0, 0), torch.ones(3, 2, 1, 12), torch.ones(3, 2, 1, 12))
        assert k.shape[2] == cache.capacity
        assert bool((k[:, :, ids.shape[1] + 5] == 1).all())


@pytest.mark.parametrize(
    "name",
    [
        "ouro",
        pytest.param("ouro_variant", marks=pytest.mark.slow),
        pytest.param("huginn", marks=pytest.mark.slow),
    ],
)
def test_compiled_decode_is_one_graph_until_the_cache_grows(models, monkeypatch, name):
    from torch._dynamo.testing import CompileCounter

    models, tok = models
    model = models[name]
    ids, mask = prompts(tok)
    kw = dict(attention_mask=mask, max_new_tokens=20, return_dict=True, **extra(name))
    eager = model.generate(ids, **kw)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = model.generate(ids, compile={"backend": counter}, **kw)
    assert counter.frame_count == 1  # 19 decode steps, one graph
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.allclose(compiled.logits, eager.logits, atol=1e-6, rtol=1e-5)
    # A growing cache: one more graph at the first growth (shape-generic), none after.
    capacities = []

    class Recorded(KVCache):
        def reserve(self, n):
            super().reserve(n)
            capacities.append(self.capacity)

    monkeypatch.setattr(generation, "KVCache", Recorded)
    monkeypatch.setattr(generation, "CACHE_RESERVE", 1)
    torch._dynamo.reset()
    counter = CompileCounter()
    grown = model.generate(ids, compile={"backend": counter}, **kw)
    start = ids.shape[1] + 1
    assert sorted(set(capacities)) == [start, 2 * start, ids.shape[1] + 20]  # grew twice
    assert counter.frame_count == 2
    assert torch.equal(grown.sequences, eager.sequences)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "exit"), [("ouro", "threshold"), ("huginn", "none")])
def test_compiled_generate_with_stops_and_sampling_equals_eager(models, monkeypatch, name, exit):
    from torch._dynamo.testing import CompileCounter

    models, tok = models
    model = models[name]
    ids, mask = prompts(tok)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=24, exit=exit, **extra(name))
    stops = [int(free[b, ids.shape[1] + 2 + b]) for b in range(3)]  # every row stops
    checks_made = []
    check = generation._check_finite

    def counted(broken, first):
        checks_made.append(len(broken))
        check(broken, first)

    monkeypatch.setattr(generation, "_check_finite", counted)
    # Huginn samples its initial states: drawn outside the compiled step, same numbers.
    options = {} if name == "ouro" else {"init_scale": 1.0}
    kw = dict(attention_mask=mask, exit=exit, return_dict=True, **options)
    for stop_token_ids, do_sample in ((stops, False), (None, True)):
        runs = {}
        for compile in (False, {"backend": CompileCounter()}):
            checks_made.clear()
            runs[bool(compile)] = model.generate(
                ids,
                max_new_tokens=40,
                stop_token_ids=stop_token_ids,
                do_sample=do_sample,
                generator=torch.Generator().manual_seed(5),
                compile=compile,
                **kw,
            )
            # Host reads: every token eagerly, every HOST_CHECK_EVERY tokens compiled.
            every = generation.HOST_CHECK_EVERY if compile else 1
            assert max(checks_made) == every and set(checks_made[:-1]) <= {every}
        eager, compiled = runs[False], runs[True]
        for field in ("sequences", "attention_mask", "loops_used", "finished"):
            assert torch.equal(getattr(compiled, field), getattr(eager, field)), field
        assert torch.allclose(compiled.logits, eager.logits, atol=1e-6, rtol=1e-5)
        if stop_token_ids is not None:  # stopped early: the tokens past the stop are dropped
            assert bool(eager.finished.all()) and eager.sequences.shape[1] < ids.shape[1] + 40


def test_compile_option_is_checked(models):
    models, tok = models
    ouro, huginn = models["ouro"], models["huginn"]
    ids, _ = prompts(tok)
    with pytest.raises(ValueError, match="needs use_cache=True"):
        ouro.generate(ids, max_new_tokens=2, compile=True, use_cache=False)
    with pytest.raises(ValueError, match="compile does not apply to Huginn's exit='kl'"):
        huginn.generate(ids, max_new_tokens=2, compile=True, exit="kl")
    with pytest.raises(TypeError, match="compile must be True, False or a dict"):
        ouro.generate(ids, max_new_tokens=2, compile="inductor")
    with pytest.raises(ValueError, match=r"compile options \['fullgraph'\] are not supported"):
        ouro.generate(ids, max_new_tokens=2, compile={"fullgraph": False})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ouro_variant", "huginn"])
def test_inductor_compiled_generate_equals_eager(models, name):
    models, tok = models
    model = models[name]
    ids, mask = prompts(tok)
    kw = dict(attention_mask=mask, max_new_tokens=12, return_dict=True, **extra(name))
    eager = model.generate(ids, **kw)
    compiled = model.generate(ids, compile=True, **kw)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.allclose(compiled.logits, eager.logits, atol=1e-4, rtol=1e-4)
