"""The decode-step interface: generation and diagnostics never ask which architecture
they have, and a new architecture plugs in by implementing the public interface."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eqloop import pretrained
from eqloop.models.base import DecodeOptions, PretrainedLoopedLM
from eqloop.models.generation import GenerationMixin
from eqloop.models.layers import KVCache

EQLOOP = Path(__file__).resolve().parents[2] / "eqloop"
PACKAGE = EQLOOP / "models"
SHARED = ("models/generation.py", "evaluation/diagnostics.py")
ARCH_NAMES = {"ouro", "huginn", "huginn_raven", "OuroForCausalLM", "HuginnForCausalLM"}


def _architecture_branches(path: Path) -> list[str]:
    """Where ``path`` asks which architecture it has: a comparison with ``model_type``,
    an ``is_ouro``-style flag, an import of an architecture's module or a reference to an
    architecture's class."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Attribute) and o.attr == "model_type" for o in operands):
                found.append(f"{where}: compares model_type")
            elif any(isinstance(o, ast.Constant) and o.value in ARCH_NAMES for o in operands):
                found.append(f"{where}: compares with an architecture's name")
        elif isinstance(node, ast.Name) and node.id in {"is_ouro", "is_huginn"}:
            found.append(f"{where}: flag {node.id}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            parts = set(node.module.split("."))
            names = {alias.name for alias in node.names}
            if parts & ARCH_NAMES or names & ARCH_NAMES:
                found.append(f"{where}: imports {node.module}")
        elif isinstance(node, ast.Name) and node.id in ARCH_NAMES:
            found.append(f"{where}: names {node.id}")
    return found


@pytest.mark.parametrize("name", SHARED)
def test_shared_decoding_and_diagnostics_have_no_architecture_branches(name):
    assert _architecture_branches(EQLOOP / name) == []


def test_the_branch_finder_finds_a_branch(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from eqloop.models.ouro import OuroForCausalLM\n"
        "def f(model):\n"
        "    return isinstance(model, OuroForCausalLM) or model.model_type == 'huginn_raven'\n"
        "def g(data):\n"
        "    return data.get('model_type') == 'ouro'\n"
    )
    found = _architecture_branches(bad)
    assert sorted(line.split(": ", 1)[1] for line in found) == [
        "compares model_type",
        "compares with an architecture's name",
        "imports eqloop.models.ouro",
        "names OuroForCausalLM",
    ]


class ShiftLM(GenerationMixin, PretrainedLoopedLM):
    """A toy third architecture that implements only the public decode-step interface:
    the next token is ``(last token + loops) mod V``; the exit ``"half"`` uses half the
    loops (so ``loops_used`` shows the model's own exit rule)."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="shift", trained_loops=2, vocab_size=vocab)
        self.embed = nn.Embedding(vocab, 4)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def decode_options(
        self, exit=None, exit_threshold=None, *, init_scale=None, use_cache=True, compiled=False
    ) -> DecodeOptions:
        if exit not in (None, "all", "half"):
            raise ValueError(f"ShiftLM exits are 'all' and 'half', got {exit!r}")
        return DecodeOptions("all" if exit is None else exit)

    def _next(self, last: Tensor, loops: int, options: DecodeOptions) -> tuple[Tensor, Tensor]:
        used = loops // 2 if options.exit == "half" else loops
        logits = F.one_hot((last + used) % self.vocab_size, self.vocab_size).float()
        return logits, torch.full_like(last, used)

    def decode_step(self, tokens, attention_mask, cache, loops, options, start=None):
        return self._next(tokens[:, -1], loops, options)

    def decode_recompute(self, sequences, attention_mask, loops, options, generator=None):
        return self._next(sequences[:, -1], loops, options)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize(("exit", "used"), [(None, 3), ("half", 1)])
def test_a_new_architecture_generates_through_the_public_interface(use_cache, exit, used):
    model = ShiftLM()
    prompts = torch.tensor([[1, 2], [5, 9]])
    out = pretrained.generate(
        model,
        prompts,
        max_new_tokens=4,
        loops=3,
        exit=exit,
        use_cache=use_cache,
        stop_token_ids=[1],
        pad_token_id=0,
        return_dict=True,
    )
    # Row 0: 2 -> 5 -> 8 -> 0 -> 3 (+3 per token); row 1 with exit="half" (+1): 9 -> 10 ->
    # 0 -> 1, the stop id, then padding.
    expected = {3: [[1, 2, 5, 8, 0, 3], [5, 9, 1, 4, 7, 10]], 1: [[1, 2, 3, 4, 5, 6]]}
    assert out.sequences[0].tolist() == expected[used][0]
    assert bool((out.loops_used[0] == used).all())
    if used == 1:
        assert out.sequences[1].tolist() == [5, 9, 10, 0, 1, 0]
        assert out.finished.tolist() == [False, True]
        assert out.loops_used[1].tolist() == [1, 1, 1, 0]  # nothing after the stop
    with pytest.raises(ValueError, match="ShiftLM exits are 'all' and 'half', got 'kl'"):
        model.generate(prompts, max_new_tokens=1, exit="kl")


def test_a_new_architecture_gets_adaptive_forward_and_the_cached_call():
    model = ShiftLM()
    tokens = torch.tensor([[3, 4, 5]])
    logits, steps = pretrained.adaptive_forward(model, tokens, exit="half", loops=4)
    assert logits.argmax(-1).tolist() == [[5, 6, 7]]
    assert steps.tolist() == [[2, 2, 2]]
    cache = KVCache(1, 3)
    model.decode_call(tokens, None, cache, 2, model.decode_options())
    assert cache.length == 3  # decode_call reserved and advanced the cache around the step


# ---------------------------------------------------------- one folder per architecture

ARCHITECTURE_PACKAGES = {
    "ouro": ("OuroConfig", "OuroForCausalLM"),
    "huginn": ("HuginnConfig", "HuginnForCausalLM"),
}
# The registries (ARCHITECTURES, MODEL_CLASSES) may import the architectures' modules;
# no other shared module may, and none compares model_type.
REGISTRIES = ("config.py", "io.py")


@pytest.mark.parametrize("arch", sorted(ARCHITECTURE_PACKAGES))
def test_each_architecture_lives_in_its_own_folder(arch):
    import importlib

    folder = PACKAGE / arch
    assert sorted(p.name for p in folder.glob("*.py")) == [
        "__init__.py",
        "config.py",
        "modeling.py",
    ]
    config_name, model_name = ARCHITECTURE_PACKAGES[arch]
    package = importlib.import_module(f"eqloop.models.{arch}")
    config_cls = getattr(package, config_name)
    model_cls = getattr(package, model_name)
    assert config_cls.__module__ == f"eqloop.models.{arch}.config"
    assert model_cls.__module__ == f"eqloop.models.{arch}.modeling"
    # The public names keep working from eqloop.models and its config module.
    assert getattr(pretrained, config_name) is config_cls
    assert getattr(pretrained, model_name) is model_cls
    assert pretrained.ARCHITECTURES[config_cls.model_type] is config_cls


def test_every_public_name_of_eqloop_pretrained_imports():
    missing = [name for name in pretrained.__all__ if getattr(pretrained, name, None) is None]
    assert missing == []


def test_shared_modules_never_ask_which_architecture_they_have():
    found = {}
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "__init__.py":  # names the modules as strings (lazy exports)
            continue
        branches = _architecture_branches(path)
        if path.name in REGISTRIES:  # importing the architectures is their job
            branches = [b for b in branches if ": imports " not in b and ": names " not in b]
        if branches:
            found[path.name] = branches
    assert found == {}
