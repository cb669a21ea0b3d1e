"""transformers' AutoModelForCausalLM opens the checkpoints through eqloop, no remote code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from eqloop import pretrained  # noqa: E402
from eqloop.models.hf import register_auto_classes  # noqa: E402

FIXTURES = Path("/work/shared/fixtures")


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="no upstream fixtures")
@pytest.mark.parametrize(
    ("name", "reference", "kw"),
    [("ouro-tiny", "logits_exit_3", {}), ("huginn-tiny", "logits_steps_4", {"init_scale": 0.0})],
)
def test_auto_model_reproduces_upstream_without_remote_code(name, reference, kw):
    register_auto_classes()
    model = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / name)
    ref = load_file(FIXTURES / name / "reference.safetensors")
    with torch.no_grad():
        logits = model(ref["input_ids"], **kw).logits
        assert rel_err(logits, ref[reference]) < 1e-4
        # .eqloop shares the modules: every eqloop tool works on it.
        assert model.eqloop.model_type in ("ouro", "huginn_raven")
        assert torch.equal(model.eqloop(ref["input_ids"], **kw), logits)
    assert set(model.state_dict()) == set(pretrained.load(FIXTURES / name).state_dict())


def test_auto_model_generates_and_computes_a_loss(tmp_path):
    register_auto_classes()
    assert register_auto_classes() is register_auto_classes()  # idempotent
    path = pretrained.write_tiny_checkpoint(tmp_path / "o", "ouro")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    ours = pretrained.load(path)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model.generate(ids, max_new_tokens=5), ours.generate(ids, max_new_tokens=5))
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    assert torch.allclose(out.loss, expected)
