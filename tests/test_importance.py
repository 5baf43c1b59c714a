"""Importance criteria on tiny random models (no network): Taylor, magnitude, random, block influence."""

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.importance import (
    CRITERIA,
    BlockInfluence,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
    make_importance,
    projection_weights,
)
from slimtune.models import get_arch
from slimtune.models.arch import base_weight
from slimtune.training.loss import causal_lm_loss
from tests.conftest import tiny_model


def _batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (2, 12), generator=g) for _ in range(n)]


def _scores(model, batches, **kwargs):
    imp = TaylorImportance(model, **kwargs)
    for b in batches:
        imp.update(model, b)
    scores = imp.element_scores()
    imp.remove()
    return scores


@pytest.mark.parametrize("kind, scale", [("element", 100.0), ("group", 3.0)])
def test_taylor_predicts_loss_change_to_first_order(kind, scale):
    """First-order Taylor (LLM-Pruner, arXiv 2305.11627, eq. 3): -ΔL of zeroing w (or a channel's column) ≈ Σ g·w, error O(ε) relative.

    The chosen weights are scaled by `scale`·ε; the relative error of the first-order prediction
    should fall roughly tenfold per decade of ε (second-order term ½·w·H·w over g·w). fp64 model;
    the starting scale keeps the loss change well above the fp32 rounding inside RMSNorm.
    """
    # the weight (or MLP channel) of down_proj with the largest gradient: one with a near-zero
    # gradient would sink the loss change to the rounding floor at small ε whatever the widths
    model = tiny_model("llama").double()
    spec = get_arch(model)
    w = spec.decoder_layers(model)[1].get_submodule(spec.mlp_out).weight
    g = torch.autograd.grad(causal_lm_loss(model, _batches(1)[0]), w)[0].abs()
    if kind == "element":
        idx = tuple(int(k) for k in torch.unravel_index(g.argmax(), g.shape))
    else:
        idx = (slice(None), int(g.sum(dim=0).argmax()))
    errors = []
    for eps in (1.0, 0.1, 0.01):
        model = tiny_model("llama").double()
        spec = get_arch(model)
        w = spec.decoder_layers(model)[1].get_submodule(spec.mlp_out).weight
        with torch.no_grad():
            w[idx] *= scale * eps
        batch = _batches(1)[0]
        predicted = _scores(model, [batch], variant="vector")[1][spec.mlp_out][idx].sum().item()
        with torch.no_grad():
            before = causal_lm_loss(model, batch).item()
            w[idx] = 0
            exact = before - causal_lm_loss(model, batch).item()  # L(w) - L(w with w_idx = 0)
        errors.append(abs(predicted - exact) / abs(exact))
    assert errors[-1] < 0.02, errors
    assert errors[1] < 0.3 * errors[0] and errors[2] < 0.3 * errors[1], errors


@pytest.mark.parametrize("variant", ["element1", "element2", "vector", "fisher"])
def test_taylor_hooks_match_plain_backward(variant):
    model = tiny_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)  # a non-default flag that must come back
    flags = [p.requires_grad for p in model.parameters()]
    batches = _batches(2)
    imp = TaylorImportance(model, variant=variant, use_hooks=True)
    for b in batches:
        imp.update(model, b)
        assert all(w.grad is None for _, _, w in projection_weights(model, imp.spec))
    hooked = imp.element_scores()
    imp.remove()
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())  # nothing else got a gradient
    plain = _scores(model, batches, variant=variant, use_hooks=False)
    assert hooked.keys() == plain.keys() == set(range(4))
    for i in hooked:
        for path in hooked[i]:
            assert torch.equal(hooked[i][path], plain[i][path]), (i, path)
    signs = torch.cat([s.flatten() for layer in hooked.values() for s in layer.values()]).sign()
    assert imp.signed == (variant == "vector") == bool((signs < 0).any())
    with pytest.raises(RuntimeError, match="call update"):
        imp.element_scores()  # remove() dropped the accumulators


@pytest.mark.parametrize("variant", ["element2", "fisher"])
def test_taylor_second_order_variants_match_the_manual_fisher_formula(variant):
    model = tiny_model("qwen2")
    batches = _batches(2)
    scores = _scores(model, batches, variant=variant)
    spec = get_arch(model)
    keys = [(i, path) for i, path, _ in projection_weights(model, spec)]
    weights = [w for _, _, w in projection_weights(model, spec)]
    grads = [torch.autograd.grad(causal_lm_loss(model, b), weights) for b in batches]  # per-batch g_b
    for k, ((i, path), w) in enumerate(zip(keys, weights)):
        G = grads[0][k] + grads[1][k]
        Fisher = grads[0][k] ** 2 + grads[1][k] ** 2
        expected = (G * w - 0.5 * Fisher * w**2).abs() if variant == "element2" else Fisher * w**2
        assert torch.allclose(scores[i][path], expected, rtol=1e-5, atol=1e-12), (i, path)


def test_taylor_on_every_family_and_on_lora_base_weights(family):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(family)
    spec = get_arch(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=spec.leaf_names()))
    flags = [p.requires_grad for p in peft_model.parameters()]  # LoRA A/B trainable, base frozen
    scores = _scores(peft_model, _batches(1), spec=spec)
    assert [p.requires_grad for p in peft_model.parameters()] == flags
    for i, path, w in projection_weights(peft_model, spec):
        assert scores[i][path].shape == w.shape and scores[i][path].dtype == torch.float32
    assert sum(float(s.sum()) for layer in scores.values() for s in layer.values()) > 0


def test_magnitude_is_abs_or_square_of_the_base_weight():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    spec = get_arch(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=spec.leaf_names()))
    l1 = MagnitudeImportance(model).element_scores()
    l2 = MagnitudeImportance(model, p=2).element_scores()
    for i, layer in enumerate(spec.decoder_layers(model)):
        for path in spec.projections():
            w = base_weight(layer.get_submodule(path))
            assert torch.equal(l1[i][path], w.detach().abs())
            assert torch.equal(l2[i][path], w.detach() ** 2)
    with pytest.raises(SlimtuneError, match="p=1"):
        MagnitudeImportance(model, p=3)


def test_random_is_deterministic_per_seed():
    model = tiny_model("llama")
    a, b, c = (RandomImportance(model, seed=s).element_scores() for s in (0, 0, 1))
    for i in a:
        for path in a[i]:
            assert torch.equal(a[i][path], b[i][path])
            assert not torch.equal(a[i][path], c[i][path])
    assert not RandomImportance.needs_data and not MagnitudeImportance.needs_data


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_block_influence_is_zero_for_an_identity_layer(family):
    model = tiny_model(family)
    spec = get_arch(model)
    layer = spec.decoder_layers(model)[2]
    with torch.no_grad():  # no attention or MLP output: the layer passes its input through
        for path in (spec.o, spec.mlp_out):
            layer.get_submodule(path).weight.zero_()
            if layer.get_submodule(path).bias is not None:
                layer.get_submodule(path).bias.zero_()
    imp = BlockInfluence(model)
    for b in _batches(2):
        imp.update(model, b)
    bi = imp.layer_scores()
    assert bi.shape == (4,) and imp.element_scores() == {}
    assert abs(bi[2].item()) < 1e-5 and int(bi.argmin()) == 2
    assert bool((bi[[0, 1, 3]] > 1e-3).all())
    assert not any(layer._forward_hooks for layer in spec.decoder_layers(model))  # hooks only during update


def test_registry_and_its_error():
    model = tiny_model("llama")
    assert {"random", "magnitude", "taylor", "block_influence"} <= set(CRITERIA)
    imp = make_importance("taylor", model, variant="vector")
    assert isinstance(imp, TaylorImportance) and imp.signed
    imp.remove()
    with pytest.raises(SlimtuneError) as info:
        make_importance("nope", model)
    msg = str(info.value)
    assert "\n" not in msg and "unknown criterion 'nope'" in msg
    assert all(name in msg for name in CRITERIA)
    with pytest.raises(SlimtuneError, match="element1, element2, vector, fisher"):
        TaylorImportance(model, variant="second")


def test_loss_matches_hf_labels_loss():
    model = tiny_model("mistral")
    batch = _batches(1)[0]
    with torch.no_grad():
        ours = causal_lm_loss(model, batch)
        theirs = model(input_ids=batch, labels=batch).loss
    assert torch.allclose(ours, theirs, atol=1e-6)
