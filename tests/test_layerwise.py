"""Layer-wise calibration (capture, replay, sequential pruning) and `prune_layerwise`."""

from __future__ import annotations

import copy

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.models.arch import base_weight, get_arch
from slimtune.pruning.calibration import InputStats, capture_inputs, run_layer
from slimtune.pruning.layerwise import prune_layerwise
from tests.conftest import FAMILIES, tiny_model


def _calib(n=5, length=16, seed=0):
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def _last_layer_output(model, tok):
    layers = get_arch(model).decoder_layers(model)
    seen = []
    h = layers[-1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(tok, use_cache=False)
    h.remove()
    return seen[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_the_captured_inputs_reproduces_the_model(family):
    model = tiny_model(family)
    tok = _calib()
    ref = _last_layer_output(model, tok)
    inputs = capture_inputs(model, tok, batch_size=2)  # 5 sequences: batches of 2, 2, 1
    assert inputs.hidden.shape == (5, 16, model.config.hidden_size)
    for i, layer in enumerate(get_arch(model).decoder_layers(model)):
        run_layer(layer, inputs, i)
    torch.testing.assert_close(inputs.hidden, ref, rtol=1e-5, atol=1e-5)


def test_each_layer_gets_its_own_mask_with_sliding_window_layers():
    # Qwen2 with sliding-window attention on layers >= 2 passes those layers another mask
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2, attn_implementation="eager")
    assert model.config.layer_types[0] != model.config.layer_types[-1]
    tok = _calib(3, 16)
    ref = _last_layer_output(model, tok)
    inputs = capture_inputs(model, tok, batch_size=3)
    for i, layer in enumerate(get_arch(model).decoder_layers(model)):
        run_layer(layer, inputs, i)
    torch.testing.assert_close(inputs.hidden, ref, rtol=1e-5, atol=1e-5)


def test_calibration_is_sequential_on_the_pruned_outputs():
    """Layer 1 is calibrated on the outputs of the PRUNED layer 0, not the dense one."""
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    tok = _calib(4, 16)
    spec = get_arch(model)
    layers = spec.decoder_layers(model)
    seen = []  # hidden states layer 1 was called with
    h = layers[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    prune_layerwise(model, tok, "wanda", 0.5, batch_size=4)
    h.remove()
    assert len(seen) == 3  # the capture (a pass-through), the statistics pass, the pass that feeds layer 2
    stats_input = seen[1]

    d_inputs = capture_inputs(dense, tok, batch_size=4)
    args, kwargs = d_inputs.calls[0][0]
    with torch.no_grad():
        expect_pruned = layers[0](d_inputs.hidden, *args, **kwargs)
        expect_dense = spec.decoder_layers(dense)[0](d_inputs.hidden, *args, **kwargs)
    torch.testing.assert_close(stats_input, expect_pruned, rtol=1e-5, atol=1e-5)
    assert float((stats_input - expect_dense).abs().max()) > 1e-3


def test_input_stats_hessian_matches_the_inputs():
    model = tiny_model("opt")
    spec = get_arch(model)
    tok = _calib(3, 8)
    inputs = capture_inputs(model, tok)
    layer = spec.decoder_layers(model)[0]
    seen = []
    h = layer.get_submodule(spec.mlp_out).register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with InputStats(layer, spec.projections(), hessian=True) as stats:
        run_layer(layer, inputs, 0, write=False)
    h.remove()
    assert not layer.get_submodule(spec.q)._forward_hooks
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).float()
    assert stats.tokens[spec.mlp_out] == 24
    torch.testing.assert_close(stats.sq_norm[spec.mlp_out], x.square().sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.take_hessian(spec.mlp_out), 2 * x.T @ x / 24, rtol=1e-5, atol=1e-5)


def test_magnitude_is_per_module_and_needs_no_data():
    model = tiny_model("llama")
    spec = get_arch(model)
    before = {(i, p): base_weight(layer.get_submodule(p)).detach().clone() for i, layer in enumerate(spec.decoder_layers(model)) for p in spec.projections()}
    masks = prune_layerwise(model, None, "magnitude", 0.3)
    layers = masks.spec.decoder_layers(model)
    for row in masks.per_module():
        key = (row["layer"], row["path"])
        assert row["pruned"] == int(row["total"] * 0.3)
        w, w0, keep = base_weight(layers[key[0]].get_submodule(key[1])), before[key], masks.mask(*key)
        assert bool((w[~keep] == 0).all()) and torch.equal(w[keep], w0[keep])
        assert float(w0[keep].abs().min()) >= float(w0[~keep].abs().max())  # the smallest |w| of the module went


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_excluded_layers_stay_dense(method):
    model = tiny_model("llama")
    before = [base_weight(model.model.layers[1].get_submodule(p)).clone() for p in get_arch(model).projections()]
    masks = prune_layerwise(model, _calib(8, 16), method, 0.5, excluded={1})
    assert all(k[0] != 1 for k in masks.keys()) and len(masks.keys()) == 3 * 7
    after = [base_weight(model.model.layers[1].get_submodule(p)) for p in get_arch(model).projections()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_bad_arguments_are_one_line_errors():
    model = tiny_model("llama")
    cases = [
        dict(method="obs", sparsity=0.5),
        dict(method="wanda", sparsity=1.0),
        dict(method="wanda", sparsity=-0.1),
        dict(method="wanda", sparsity=0.5, excluded={7}),
        dict(method="wanda", sparsity=0.5, batch_size=0),
        dict(method="sparsegpt", sparsity=0.0, nm=(2, 4), blocksize=6),
    ]
    for kw in cases:
        with pytest.raises(SlimtuneError) as e:
            prune_layerwise(model, _calib(8, 16), **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(SlimtuneError, match="LongTensor"):
        prune_layerwise(model, torch.randn(2, 8), "wanda", 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_runs_on_cuda_in_bfloat16(method):
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    masks = prune_layerwise(model, _calib(8, 16), method, 0.5)
    assert masks.mask(0, masks.spec.q).device.type == "cuda"
    assert masks.pruned() == sum(r["total"] // 2 for r in masks.per_module())
