"""Per-loop diagnostics of the pretrained architectures, past their trained depth."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from eqloop import pretrained
from eqloop.core.stars import jacobian_eigvals


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    return {
        "ouro": pretrained.load(
            pretrained.write_tiny_checkpoint(root / "o", "ouro", initializer_range=0.2)
        ),
        "huginn": pretrained.load(pretrained.write_tiny_checkpoint(root / "h", "huginn_raven")),
    }


def ids(batch=2, seq=6, seed=0):
    return torch.randint(4, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["ouro", "huginn"])
def test_values_match_a_hand_computed_trajectory(models, name):
    model, tokens = models[name], ids()
    n = 2 * model.trained_loops + 1  # beyond the trained depth
    diag = pretrained.diagnose(model, tokens, loops=n, rho=False)
    assert diag.loops == list(range(1, n + 1)) and diag.trained_loops == model.trained_loops
    kw = {"init_scale": 0.0} if name == "huginn" else {}
    with torch.no_grad():
        states = model.unroll(tokens, n + 1, return_states=True, **kw)
        log_p = [F.log_softmax(model.readout(z), dim=-1) for z in states]
    for t in range(1, n + 1):
        z, nxt = states[t], states[t + 1]
        residual = ((nxt - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)).mean()
        assert diag.residual[t - 1] == pytest.approx(float(residual), rel=1e-5)
        assert diag.state_norm[t - 1] == pytest.approx(float(z.norm(dim=-1).mean()), rel=1e-5)
        entropy = -(log_p[t].exp() * log_p[t]).sum(-1).mean()
        assert diag.entropy[t - 1] == pytest.approx(float(entropy), rel=1e-5)
        if t == 1:
            assert diag.kl[0] is None and diag.argmax_changed[0] is None
        else:
            kl = (log_p[t - 1].exp() * (log_p[t - 1] - log_p[t])).sum(-1).mean()
            assert diag.kl[t - 1] == pytest.approx(float(kl), rel=1e-4, abs=1e-9)
    assert diag.rho == [None] * n
    if name == "ouro":
        assert sum(diag.exit_pdf) == pytest.approx(1.0, abs=1e-5)
        assert all(0.0 < g < 1.0 for g in diag.gate)
    else:
        assert diag.exit_pdf is None and diag.gate is None


@pytest.mark.parametrize("name", ["ouro", "huginn"])
def test_rho_is_the_jacobians_spectral_radius(models, name):
    model, tokens = models[name], ids(batch=1, seq=2)
    size = 2 * 32  # the whole (S, d) state: with that many Krylov vectors Arnoldi is exact
    diag = pretrained.diagnose(model, tokens, loops=2, rho_iters=size, rho_every=2)
    assert diag.rho[0] is None and diag.rho[1] is not None
    kw = {"init_scale": 0.0} if name == "huginn" else {}
    f, _ = model.core_map(tokens, **kw)
    with torch.no_grad():
        z2 = model.unroll(tokens, 2, **kw)
    dense = float(jacobian_eigvals(f, z2).abs().max())
    assert diag.rho[1] == pytest.approx(dense, rel=1e-3)


@pytest.mark.parametrize("name", ["ouro", "huginn"])
def test_padded_batch_gives_each_sequence_its_own_diagnostics(models, name):
    model = models[name]
    long, short = ids(1, 5, seed=1)[0], ids(1, 2, seed=2)[0]
    batch = torch.stack([long, torch.cat([torch.zeros(3, dtype=torch.long), short])])
    mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    padded = pretrained.diagnose(model, batch, attention_mask=mask, loops=5, rho=False)
    alone = pretrained.diagnose(model, short[None], loops=5, rho=False)
    for key in ("residual", "state_norm", "kl", "entropy"):
        for t in range(5):
            row = padded.per_sequence[key][t]
            if row is None:
                continue
            assert row[1] == pytest.approx(alone.per_sequence[key][t][0], rel=1e-4, abs=1e-8), key
    # Padded positions add zero blocks to the Jacobian, so rho is the sequence's own
    # (exact here: more Krylov vectors than the real tokens' state has dimensions).
    dim = 2 * 32
    rho_padded = pretrained.diagnose(
        model, batch, attention_mask=mask, loops=3, rho_iters=dim + 1, rho_every=3
    )
    rho_alone = pretrained.diagnose(model, short[None], loops=3, rho_iters=dim, rho_every=3)
    assert rho_padded.per_sequence["rho"][2][1] == pytest.approx(
        rho_alone.per_sequence["rho"][2][0], rel=1e-3
    )


def test_equilibrium_table_json_and_plot(models, tmp_path):
    model = models["huginn"]
    diag = pretrained.diagnose(
        model, ids(), loops=6, rho_iters=6, solver="anderson", tol=1e-4, max_iter=80
    )
    eq = diag.equilibrium
    assert eq["solver"] == "anderson" and eq["status"] in ("converged", "max_iter")
    if eq["status"] == "converged":
        assert eq["rel_residual"] <= 1e-4
    assert eq["rho"] > 0 and eq["kl_from_last"] >= 0
    table = diag.table()
    lines = table.splitlines()
    assert lines[0].split()[0] == "loop" and len(lines) == 2 + 6 + 1
    assert lines[2 + model.trained_loops - 1].split()[0] == f"{model.trained_loops}*"
    path = diag.to_json(tmp_path / "d.json")
    data = json.loads(path.read_text())
    assert data["loops"] == list(range(1, 7)) and data["kl"][0] is None
    assert data["residual"] == pytest.approx(diag.residual)
    png = diag.plot(tmp_path / "d.png")
    assert png.stat().st_size > 1000
    ouro = pretrained.diagnose(models["ouro"], ids(), loops=6, rho=False)
    assert "p_exit" in ouro.table()
    assert ouro.plot(tmp_path / "o.png").stat().st_size > 1000


def test_bad_arguments(models):
    with pytest.raises(ValueError, match="loops must be an integer >= 1"):
        pretrained.diagnose(models["ouro"], ids(), loops=0)
    with pytest.raises(TypeError, match="pretrained looped LM"):
        pretrained.diagnose(torch.nn.Linear(2, 2), ids())
    with pytest.raises(ValueError, match="rho_iters"):
        pretrained.diagnose(models["ouro"], ids(), rho_iters=0)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("ouro", torch.bfloat16),
        pytest.param("ouro", torch.float16, marks=pytest.mark.slow),
        pytest.param("huginn", torch.bfloat16, marks=pytest.mark.slow),
        pytest.param("huginn", torch.float16, marks=pytest.mark.slow),
    ],
)
def test_rho_of_half_precision_weights_is_computed_in_float32(tmp_path, name, dtype):
    # The published checkpoints are bfloat16; torch.linalg.eig has no half kernels.
    path = pretrained.write_tiny_checkpoint(tmp_path / name, name, initializer_range=0.2)
    full, half = pretrained.load(path), pretrained.load(path, dtype=dtype)
    tokens = ids(batch=1, seq=2)
    size = 2 * 32  # exact Arnoldi (see above), so only the products' precision differs
    got = pretrained.diagnose(half, tokens, loops=2, rho_iters=size, rho_every=2).rho[1]
    want = pretrained.diagnose(full, tokens, loops=2, rho_iters=size, rho_every=2).rho[1]
    assert got == pytest.approx(want, rel=0.05)
    kw = {"init_scale": 0.0} if name == "huginn" else {}
    f, _ = half.core_map(tokens, **kw)
    with torch.no_grad():
        z2 = half.unroll(tokens, 2, **kw)
    dense = jacobian_eigvals(f, z2)
    assert dense.dtype == torch.complex64
    assert float(dense.abs().max()) == pytest.approx(want, rel=0.05)
    # What `eqloop eval --pretrained DIR --dtype bfloat16` runs.
    table = pretrained.diagnose_checkpoint(path, loops=2, rho_iters=4, dtype=dtype)
    assert all(r is not None and r > 0 for r in table.rho[1:])
