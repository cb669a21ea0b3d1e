"""Fine-tuning the pretrained architectures (tiny random Ouro and Huginn checkpoints)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import run_torchrun

from eqloop import pretrained
from eqloop.data.problems import make_splits
from eqloop.data.qa import PromptTemplate, load_jsonl, write_jsonl
from eqloop.evaluation import accuracy_vs_loops, greedy_generate, unrolled
from eqloop.evaluation.decoding import cached_generate
from eqloop.models.auto import freeze_unreached, load_for_finetuning, weights_fingerprint
from eqloop.recipes.finetune.config import FinetuneConfig, LoraOptions
from eqloop.recipes.finetune.train import Objective, finetune
from eqloop.training.checkpoint import load_checkpoint
from eqloop.training.lora import DEFAULT_TARGETS, attach_lora, merge_lora

ARCHS = ("ouro", "huginn_raven")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pretrained_ft")
    for arch in ARCHS:
        pretrained.write_tiny_checkpoint(root / arch, arch=arch, seed=1)
    train, test = make_splits(16, 4, seed=0, kinds=("add",), max_value=9)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "test.jsonl", test)
    return root


def _forward(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, loops=3, **({"init_scale": 0.0} if model.model_type != "ouro" else {}))


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_on_upstream_names_merges_exactly(root: Path, arch: str) -> None:
    loaded = load_for_finetuning(root / arch, dtype=torch.float64)
    model = loaded.model.eval()
    names = attach_lora(model, list(DEFAULT_TARGETS[arch]), r=2)
    suffixes = {
        name.rsplit(".", 2)[-1] if arch == "ouro" else ".".join(name.split(".")[-2:])
        for name in names
    }
    assert suffixes == {t.split(".")[-1] if arch == "ouro" else t for t in DEFAULT_TARGETS[arch]}
    if arch == "ouro":
        assert names[0] == "model.layers.0.mlp.down_proj" and len(names) == 7 * 2
    else:
        assert "transformer.core_block.0.attn.Wqkv" in names and "transformer.adapter" not in names
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.3)
    tokens = torch.randint(4, 90, (2, 7))
    adapted = _forward(model, tokens)
    merge_lora(model)
    torch.testing.assert_close(_forward(model, tokens), adapted, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_finetuned_model_is_saved_in_the_hf_layout(root: Path, tmp_path: Path, arch: str) -> None:
    config = FinetuneConfig(
        init_from=str(root / arch),
        train_file=str(root / "train.jsonl"),
        eval_file=str(root / "test.jsonl"),
        out_dir=str(tmp_path / "run"),
        mode="stars",
        steps=2,
        batch_size=4,
        lr=1e-3,
        progress=False,
        eval_loops=[1, 2],
        eval_equilibrium=False,
        max_new_tokens=8,
        lora=LoraOptions(r=2),
        depth={"kind": "lognormal", "mu": 1.0, "sigma": 0.4, "lo": 1, "hi": 4},
    )
    result = finetune(config)
    saved = Path(result["model"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in saved.iterdir()
    }
    assert json.loads((saved / "config.json").read_text())["model_type"] == arch
    tuned = pretrained.load(saved)
    base = pretrained.load(root / arch)
    tuned_state, base_state = tuned.state_dict(), base.state_dict()
    assert tuned_state.keys() == base_state.keys()  # the same upstream names, no adapters
    assert any(not torch.equal(tuned_state[k], base_state[k]) for k in base_state)
    assert result["train"]["penalty"] is not None
    assert set(result["eval"]["accuracy"]) == {"1", "2"}
    if arch == "huginn_raven":  # Huginn's truncated backprop through the last k loops
        again = dataclasses.replace(config, out_dir=str(tmp_path / "k"), backprop_loops=1)
        assert finetune(again)["step"] == 2


def test_cached_generation_matches_recompute_in_evaluation(root: Path) -> None:
    loaded = load_for_finetuning(root / "ouro")
    model = loaded.model.eval()
    examples = load_jsonl(root / "test.jsonl")
    template = PromptTemplate()
    prompts = [loaded.tokenizer.encode_prompt(template.format_prompt(e)) for e in examples]
    eos = loaded.tokenizer.eos_id
    with torch.no_grad():  # prompts of different lengths: left padding in the cached batches
        cached = cached_generate(
            model,
            prompts,
            loops=3,
            max_new_tokens=12,
            eos_id=eos,
            pad_id=loaded.tokenizer.pad_id,
            batch_size=3,
        )
        recomputed = greedy_generate(unrolled(model, 3), prompts, max_new_tokens=12, eos_id=eos)
    assert cached == recomputed and all(cached)
    assert len({len(p) for p in prompts}) > 1
    result = accuracy_vs_loops(model, loaded.tokenizer, examples, loops=[2], max_new_tokens=4)
    assert result["equilibrium"]["converged"] >= 0 and result["n"] == len(examples)


# ----------------------------------------------------------- parallel recipes, resume


def test_parameters_the_objective_does_not_reach_are_frozen(root: Path) -> None:
    probe = torch.zeros(1, 2, dtype=torch.long)
    frozen = {}
    for arch in ARCHS:
        model = load_for_finetuning(root / arch).model
        objective = Objective(model, lam=0.1, grad_checkpointing=True)
        torch.manual_seed(3)
        expected = torch.rand(4)
        torch.manual_seed(3)
        frozen[arch] = freeze_unreached(model, lambda o=objective: o(probe, probe, 1)[0])
        assert torch.equal(torch.rand(4), expected)  # Huginn's random state: RNG restored
        assert all(p.requires_grad for n, p in model.named_parameters() if n not in frozen[arch])
        assert not any(p.requires_grad for n, p in model.named_parameters() if n in frozen[arch])
    # Ouro's exit gate serves the gated exits only; the loss after t loops never uses it.
    assert frozen == {
        "ouro": ["model.early_exit_gate.weight", "model.early_exit_gate.bias"],
        "huginn_raven": [],
    }
    with pytest.raises(ValueError, match="uses none of the .* trainable parameters"):
        freeze_unreached(model, lambda: torch.zeros((), requires_grad=True) * 2)


# The README's GPU recipe ("Recipe: STARS on Ouro-1.4B with GPUs") at a tiny size: its
# options with 2 steps on 2 gloo ranks, and the variants the README names after it.
_RECIPE = [
    "--mode",
    "stars",
    "--steps",
    "2",
    "--no-progress",
    "--set",
    "batch_size=4",
    "--set",
    "grad_accum=2",
    "--set",
    "lr=1e-3",
    "--set",
    "warmup_steps=1",
    "--set",
    "penalty_start=1",
    "--set",
    "lam=0.1",
    "--set",
    "penalty_rows=1",
    "--set",
    "grad_checkpointing=true",
    "--set",
    "depth.hi=4",
]
_VARIANTS = {
    "ouro-stars": ("ouro", []),
    "ouro-sft": ("ouro", ["--mode", "sft"]),
    "ouro-lora": ("ouro", ["--lora", "--set", "lora.r=2"]),
    "ouro-fsdp": ("ouro", ["--set", "parallel=fsdp"]),
    "huginn-stars": ("huginn_raven", []),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_readme_recipe_runs_under_torchrun(root: Path, tmp_path: Path, variant: str) -> None:
    arch, extra = _VARIANTS[variant]
    out = tmp_path / "run"
    done = run_torchrun(
        "finetune",
        "--init-from",
        str(root / arch),
        "--train-file",
        str(root / "train.jsonl"),
        "--out-dir",
        str(out),
        *_RECIPE,
        *extra,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(out).step == 2
    tuned = pretrained.load(out / "model").state_dict()
    base = pretrained.load(root / arch).state_dict()
    changed = {k for k in base if not torch.equal(tuned[k], base[k])}
    if arch == "ouro":  # the exit gate is not trained; with LoRA, only the projections change
        assert changed and not any("early_exit_gate" in k for k in changed)
        if "--lora" in extra:
            assert all(k.endswith("_proj.weight") for k in changed)


def test_fingerprint_identifies_the_base_weights(root: Path) -> None:
    model = load_for_finetuning(root / "ouro").model
    reference = weights_fingerprint(model)
    # the same values in float64, and with (untrained or trained) adapters attached
    assert weights_fingerprint(load_for_finetuning(root / "ouro", dtype=torch.float64).model) == (
        reference
    )
    attach_lora(model, ["q_proj"], r=2)
    torch.nn.init.normal_(model.model.layers[0].self_attn.q_proj.lora_B.default.weight)
    assert weights_fingerprint(model) == reference
    with torch.no_grad():  # one value of a small tensor; one sampled value of a large one
        model.model.early_exit_gate.bias += 1e-6
        assert weights_fingerprint(model) != reference
        model.model.early_exit_gate.bias -= 1e-6
        assert weights_fingerprint(model) == reference
        model.lm_head.weight.view(-1)[-1] += 1e-6
    assert weights_fingerprint(model) != reference
    assert weights_fingerprint(load_for_finetuning(root / "huginn_raven").model) != reference


def test_lora_resume_refuses_changed_base_weights(root: Path, tmp_path: Path) -> None:
    base = pretrained.write_tiny_checkpoint(tmp_path / "base", arch="ouro", seed=1)
    config = FinetuneConfig(
        init_from=str(base),
        train_file=str(root / "train.jsonl"),
        out_dir=str(tmp_path / "run"),
        mode="sft",
        loops=2,
        steps=2,
        batch_size=4,
        lr=1e-3,
        progress=False,
        lora=LoraOptions(r=2, targets=["q_proj"]),
    )
    finetune(config)
    longer = dataclasses.replace(config, steps=3, resume=True)
    pretrained.write_tiny_checkpoint(base, arch="ouro", seed=2, overwrite=True)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    with pytest.raises(ValueError, match="fingerprint") as error:
        finetune(longer)
    assert f"cannot resume from {checkpoint}" in str(error.value)
    assert f"the base model in {base} now has" in str(error.value)
    assert load_checkpoint(tmp_path / "run").step == 2  # nothing written
    pretrained.write_tiny_checkpoint(base, arch="ouro", seed=1, overwrite=True)
    assert finetune(longer)["step"] == 3  # the original base weights resume


def test_solve_on_pretrained_models_where_the_loop_sees_its_input(
    root: Path, tmp_path: Path
) -> None:
    # Issue 20 item 1 (finetune): Huginn injects its input (adapter([z, e])), so it trains at
    # its fixed point; Ouro's loop z <- norm(layers(z)) does not see the input: refused,
    # naming the field and the reason, before anything is written.
    def config(arch: str) -> FinetuneConfig:
        return FinetuneConfig(
            init_from=str(root / arch),
            train_file=str(root / "train.jsonl"),
            out_dir=str(tmp_path / arch),
            steps=2,
            batch_size=4,
            lr=1e-3,
            progress=False,
            solve={"solver": "anderson", "tol": 1e-3, "max_iter": 8},
            backward="phantom",
            log_every=1,
        )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = finetune(config("huginn_raven"))
    assert result["train"]["loops"] is None
    # Unconverged solves are counted and warned about once per run, not once per solve.
    assert not [w for w in caught if "eqloop.fixed_point" in str(w.message)]
    rows = [json.loads(line) for line in (tmp_path / "huginn_raven" / "metrics.jsonl").open()]
    unconverged = any(r["fwd_converged"] < 1 for r in rows if "event" not in r)
    warned = sum("the forward solve did not converge" in str(w.message) for w in caught)
    assert warned == int(unconverged)
    assert 0.0 <= result["train"]["fwd_converged"] <= 1.0 and 1 <= result["train"]["fwd_nfe"] <= 8
    with pytest.raises(ValueError, match=r"^solve: .*Ouro's loop z <- norm\(layers\(z\)\) has no"):
        finetune(config("ouro"))
    assert not (tmp_path / "ouro" / "metrics.jsonl").exists()
