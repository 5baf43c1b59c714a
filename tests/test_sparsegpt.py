"""SparseGPT (arXiv 2301.00774): OBS reconstruction on one projection, and the layer-wise path."""

from __future__ import annotations

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.models.arch import base_weight, get_arch
from slimtune.pruning.layerwise import prune_layerwise
from slimtune.pruning.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from tests.conftest import tiny_model


def _problem(out_f=24, in_f=40, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs, so the OBS update has something to compensate with
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    x = torch.randn(tokens, in_f, generator=g) @ mix
    w = torch.randn(out_f, in_f, generator=g)
    return w, x, 2 * x.T @ x / tokens


def _err(w, w_hat, x):
    return float(((w - w_hat) @ x.T).square().sum())


def test_reconstruction_beats_zeroing_with_the_same_mask():
    w, x, h = _problem()
    w_hat = w.clone()
    keep, _ = sparsegpt_prune(w_hat, h.clone(), sparsity=0.5, blocksize=16)
    assert bool((w_hat[~keep] == 0).all())
    zeroed = w.masked_fill(~keep, 0.0)
    assert _err(w, w_hat, x) < 0.9 * _err(w, zeroed, x)


def test_loss_equals_output_error_without_dampening():
    w, x, h = _problem()
    w_hat = w.clone()
    _, loss = sparsegpt_prune(w_hat, h.clone(), sparsity=0.4, blocksize=8, percdamp=0.0)
    assert loss == pytest.approx(_err(w, w_hat, x) / x.shape[0], rel=1e-3)


def test_sparsity_zero_leaves_the_weight_unchanged():
    w, _, h = _problem()
    w_hat = w.clone()
    keep, loss = sparsegpt_prune(w_hat, h.clone(), sparsity=0.0)
    assert bool(keep.all()) and loss == 0.0
    torch.testing.assert_close(w_hat, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("p", [0.3, 0.5, 0.77])
def test_unstructured_sparsity_is_exact(p):
    w, _, h = _problem(out_f=13, in_f=50)  # 50 columns: blocks of 16, 16, 16, 2
    keep, _ = sparsegpt_prune(w, h, sparsity=p, blocksize=16)
    assert int((~keep).sum()) == int(13 * 50 * p)
    assert int((w == 0).sum()) == int(13 * 50 * p)


def test_nm_keeps_exactly_n_in_every_m():
    w, x, h = _problem(out_f=10, in_f=48)
    w0 = w.clone()
    keep, _ = sparsegpt_prune(w, h, nm=(2, 4), blocksize=16)
    assert bool((keep.view(10, 12, 4).sum(-1) == 2).all())
    assert bool(((w != 0).view(10, 12, 4).sum(-1) == 2).all())
    assert _err(w0, w, x) < _err(w0, w0.masked_fill(~keep, 0.0), x)


def test_dead_inputs_are_pruned_first_and_stay_finite():
    w, x, _ = _problem(out_f=8, in_f=32)
    x[:, [3, 17]] = 0.0  # two features never fire
    h = 2 * x.T @ x / x.shape[0]
    keep, loss = sparsegpt_prune(w, h, sparsity=2 / 32, blocksize=32)
    assert not bool(keep[:, [3, 17]].any())
    assert bool(keep.sum() == 8 * 30)
    assert bool(torch.isfinite(w).all()) and loss == 0.0


def test_cholesky_failure_is_one_line_error():
    v = torch.randn(16)
    singular = torch.outer(v, v) * 2  # rank 1, no dead inputs
    with pytest.raises(SlimtuneError) as e:
        sparsegpt_prune(torch.randn(4, 16), singular, sparsity=0.5, percdamp=0.0)
    msg = str(e.value)
    assert "\n" not in msg and "percdamp" in msg and "more tokens" in msg


def test_cholesky_retries_with_more_dampening():
    v = torch.randn(16)
    _, damp = inverse_hessian_factor(torch.outer(v, v) * 2, percdamp=1e-8)
    assert damp > 1e-8


def test_nm_errors_are_one_line():
    w, _, h = _problem(out_f=4, in_f=40)
    for nm in [(4, 4), (3, 2), (0, 4)]:
        with pytest.raises(SlimtuneError, match="0 < n < m"):
            sparsegpt_prune(w.clone(), h.clone(), nm=nm)
    with pytest.raises(SlimtuneError, match="not a multiple of m=3"):
        sparsegpt_prune(w.clone(), h.clone(), nm=(1, 3), blocksize=16)


def _calib(n=8, length=16, seed=0):
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def test_too_few_tokens_names_the_count():
    model = tiny_model("llama")
    spec = get_arch(model)
    widest = max(base_weight(layer.get_submodule(p)).shape[1] for layer in spec.decoder_layers(model) for p in spec.projections())
    assert widest > 24
    with pytest.raises(SlimtuneError) as e:
        prune_layerwise(model, _calib(2, 12), "sparsegpt", 0.5)
    assert f"at least {widest} calibration tokens" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_layerwise_sparsegpt_beats_magnitude_on_the_model_output(family):
    tok = _calib()
    dense = tiny_model(family)
    with torch.no_grad():
        ref = dense(tok).logits
    errs = {}
    for method in ("magnitude", "sparsegpt"):
        model = tiny_model(family)
        masks = prune_layerwise(model, tok, method, 0.5, batch_size=3)
        for row in masks.per_module():
            assert row["pruned"] == row["total"] // 2
        with torch.no_grad():
            errs[method] = float((model(tok).logits - ref).square().mean())
    assert errs["sparsegpt"] < errs["magnitude"]


def test_layerwise_sparsegpt_in_bfloat16_keeps_dtype_and_zeros():
    model = tiny_model("qwen2").to(torch.bfloat16)
    masks = prune_layerwise(model, _calib(), "sparsegpt", 0.5, nm=(2, 4))
    layers = masks.spec.decoder_layers(model)
    for i, path in masks.keys():
        w = base_weight(layers[i].get_submodule(path))
        assert w.dtype == torch.bfloat16 and bool(torch.isfinite(w).all())
        assert bool((w[~masks.mask(i, path)] == 0).all())
        assert bool((masks.mask(i, path).view(w.shape[0], -1, 4).sum(-1) == 2).all())


def test_raised_dampening_is_reported_not_swallowed(monkeypatch):
    """The retries used to raise the dampening up to 1000x without a word. sparsegpt_prune reports
    what it used, and prune_layerwise names every projection that needed more than asked."""
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.9]))  # 1% of the mean diagonal cannot make it positive definite
    used = {}
    sparsegpt_prune(torch.randn(4, 4), h, 0.5, blocksize=4, percdamp=0.01, used=used)
    assert used["percdamp"] == pytest.approx(10.0)

    import slimtune.pruning.sparsegpt as sg
    from slimtune.pruning.layerwise import prune_layerwise
    from tests.conftest import tiny_model

    real = sg.inverse_hessian_factor
    stubborn = {"layer 1 mlp.down_proj"}  # as if this one Hessian had needed one retry
    monkeypatch.setattr(sg, "inverse_hessian_factor", lambda hess, percdamp, name="": real(hess, percdamp * 10 if name in stubborn else percdamp, name))
    damping = {}
    tok = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    prune_layerwise(tiny_model("llama"), tok, "sparsegpt", 0.5, batch_size=4, damping=damping)
    assert damping == {"layer 1 mlp.down_proj": pytest.approx(0.1)}
