"""Parity with upstream: the shared fixtures were written by the upstream model code.

``/work/shared/fixtures/{ouro,huginn}-tiny`` hold tiny random checkpoints saved by the
public implementations together with their outputs (``reference.safetensors``). eqloop
must reproduce them loop by loop to a relative error below 1e-4 in float32.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file

from eqloop.models import load

FIXTURES = Path(os.environ.get("EQLOOP_FIXTURES", "/work/shared/fixtures"))
OURO = FIXTURES / "ouro-tiny"
HUGINN = FIXTURES / "huginn-tiny"
TOL = 1e-4

pytestmark = pytest.mark.skipif(
    not (OURO / "reference.safetensors").is_file(), reason=f"no upstream fixtures in {FIXTURES}"
)


@pytest.fixture(scope="module")
def ouro():
    return load(OURO), load_file(OURO / "reference.safetensors")


@pytest.fixture(scope="module")
def huginn():
    return load(HUGINN), load_file(HUGINN / "reference.safetensors")


@pytest.mark.parametrize("step", range(4))
def test_ouro_logits_and_state_per_loop(ouro, step):
    model, ref = ouro
    ids = ref["input_ids"]
    with torch.no_grad():
        logits = model(ids, loops=step + 1)  # upstream exit_at_step = step
        state = model.unroll(ids, step + 1)
    assert rel_err(logits, ref[f"logits_exit_{step}"]) < TOL
    assert rel_err(state, ref[f"state_{step}"]) < TOL


def test_ouro_exit_distribution(ouro):
    model, ref = ouro
    with torch.no_grad():
        _, info = model(ref["input_ids"], loops=4, exit="expected", return_info=True)
    assert rel_err(info.exit_pdf, ref["exit_pdf"]) < TOL


def test_ouro_default_threshold_decoding(ouro):
    # Upstream's use_weighted_exit=True is shadowed by the config's early_exit_threshold
    # (1.0): its reference logits are threshold decoding, which picks the last loop.
    model, ref = ouro
    with torch.no_grad():
        logits, info = model(ref["input_ids"], exit="threshold", return_info=True)
    assert rel_err(logits, ref["weighted_logits"]) < TOL
    assert bool((info.exit_loop == 4).all())


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_huginn_logits_and_latents_per_step(huginn, steps):
    model, ref = huginn
    ids = ref["input_ids"]
    with torch.no_grad():
        logits = model(ids, loops=steps, init_scale=0.0)
        latents = model.transformer.ln_f(model.unroll(ids, steps, init_scale=0.0))
    assert rel_err(logits, ref[f"logits_steps_{steps}"]) < TOL
    assert rel_err(latents, ref[f"latents_steps_{steps}"]) < TOL


def test_huginn_parity_holds_in_float64(huginn):
    model, ref = huginn
    model64 = load(HUGINN, dtype=torch.float64)
    with torch.no_grad():
        logits = model64(ref["input_ids"], loops=4, init_scale=0.0)
    assert logits.dtype == torch.float64
    assert rel_err(logits, ref["logits_steps_4"]) < TOL
