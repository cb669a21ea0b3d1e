"""Fine-tuning the pretrained architectures (tiny random Ouro and Huginn checkpoints)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from eqloop import pretrained
from eqloop.finetune.config import FinetuneConfig, LoraOptions
from eqloop.finetune.data import PromptTemplate, load_jsonl, write_jsonl
from eqloop.finetune.evaluate import (
    _cached_generate,
    _Unrolled,
    accuracy_vs_loops,
    greedy_generate,
)
from eqloop.finetune.lora import DEFAULT_TARGETS, attach_lora, merge_lora
from eqloop.finetune.models import load_for_finetuning
from eqloop.finetune.problems import make_splits
from eqloop.finetune.train import finetune

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
    suffixes = {name.rsplit(".", 2)[-1] if arch == "ouro" else ".".join(name.split(".")[-2:])
                for name in names}  # fmt: skip
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
        init_from=str(root / arch), train_file=str(root / "train.jsonl"),
        eval_file=str(root / "test.jsonl"), out_dir=str(tmp_path / "run"), mode="stars",
        steps=2, batch_size=4, lr=1e-3, progress=False, eval_loops=[1, 2],
        eval_equilibrium=False, max_new_tokens=8, lora=LoraOptions(r=2),
        depth={"kind": "lognormal", "mu": 1.0, "sigma": 0.4, "lo": 1, "hi": 4},
    )  # fmt: skip
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
        cached = _cached_generate(
            model, prompts, loops=3, max_new_tokens=12, eos_id=eos,
            pad_id=loaded.tokenizer.pad_id, batch_size=3,
        )  # fmt: skip
        recomputed = greedy_generate(_Unrolled(model, 3), prompts, max_new_tokens=12, eos_id=eos)
    assert cached == recomputed and all(cached)
    assert len({len(p) for p in prompts}) > 1
    result = accuracy_vs_loops(model, loaded.tokenizer, examples, loops=[2], max_new_tokens=4)
    assert result["equilibrium"]["converged"] >= 0 and result["n"] == len(examples)
