"""Opt-in checks on real checkpoints (nothing is downloaded: point at local directories).

Run with, e.g.::

    EQLOOP_OURO_DIR=/models/Ouro-1.4B EQLOOP_HUGINN_DIR=/models/huginn-0125 \\
        python -m pytest -m slow tests/models/test_pretrained_real.py

Each test is skipped unless its environment variable names a directory.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from eqloop import pretrained

CHECKPOINTS = {"ouro": "EQLOOP_OURO_DIR", "huginn_raven": "EQLOOP_HUGINN_DIR"}


def directory(model_type: str) -> Path:
    value = os.environ.get(CHECKPOINTS[model_type])
    if not value or not Path(value).is_dir():
        pytest.skip(f"set {CHECKPOINTS[model_type]} to a local {model_type} checkpoint directory")
    return Path(value)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(CHECKPOINTS))
def test_real_checkpoint_loads_loops_and_generates(model_type):
    path = directory(model_type)
    model = pretrained.load(path, dtype=torch.float32)
    assert model.model_type == model_type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upstream special ids often disagree: reported, not fatal
        tok = pretrained.load_tokenizer(path)
    batch = tok(["The capital of France is", "2 + 2 ="], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = {"init_scale": 0.0} if model_type == "huginn_raven" else {}
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, **extra)
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits[mask.bool()]).all()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, return_dict=True, **extra)
    again = model.generate(
        ids, attention_mask=mask, max_new_tokens=8, use_cache=False, return_dict=True, **extra
    )
    assert torch.equal(out.sequences, again.sequences)
    text = tok.batch_decode(out.sequences[:, ids.shape[1] :], skip_special_tokens=True)
    assert all(isinstance(t, str) for t in text)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(CHECKPOINTS))
def test_real_checkpoint_diagnostics_past_the_trained_depth(model_type):
    path = directory(model_type)
    model = pretrained.load(path)
    ids = torch.tensor([[1, 450, 7483, 310, 3444, 338]]) % model.vocab_size
    diag = pretrained.diagnose(
        model, ids, loops=model.trained_loops + 2, rho_iters=5, rho_every=model.trained_loops
    )
    assert len(diag.loops) == model.trained_loops + 2
    assert all(v is not None and v >= 0 for v in diag.residual)
