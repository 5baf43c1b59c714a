"""Unstructured and N:M weight masks: the masked merged-weight forward, selection, and the merge."""

import copy

import pytest
import torch

from slimtune.adapters import LoraSettings, attach_lora, lora_pairs, lora_weights, merge_keep_masks
from slimtune.errors import SlimtuneError
from slimtune.importance.loraprune import LoRAPruneImportance
from slimtune.masking.weights import WeightMasks, _MaskedLinear, attach_weight_masks
from slimtune.models.arch import get_arch
from slimtune.pruning.weight_selection import module_fraction_for, parse_nm, select_nm, select_unstructured
from tests.conftest import tiny_model

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def lora_model(family="llama", seed=0):
    return attach_lora(tiny_model(family, seed=seed), LoraSettings(r=4, alpha=8.0, dropout=0.0))


def train(model, steps=3, lr=0.05, importance=None, seed=0):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, 96, (2, 12), generator=g)
        opt.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        if importance is not None:
            importance.observe(model)
        opt.step()
    model.eval()


def random_scores(masks, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(m.shape, generator=g) for k, m in masks.as_dict().items()}


def check_one_line(fn):
    with pytest.raises(SlimtuneError) as err:
        fn()
    assert "\n" not in str(err.value) and str(err.value)
    return str(err.value)


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_masked_forward_equals_the_merged_masked_model(fam):
    model = lora_model(fam)
    train(model)  # B != 0, so the mask must act on W0 + s·B·A, not on W0
    assert all(bool(lora_weights(m)[1].abs().sum() > 0) for _, _, m in lora_pairs(model))
    masks = WeightMasks(model)
    select_unstructured(masks, random_scores(masks, 1), 0.5)
    reference = merge_keep_masks(copy.deepcopy(model), weight_masks=masks.as_dict())
    handles = attach_weight_masks(model, masks)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    handles.remove()


def test_plain_linear_is_masked_too():
    model = tiny_model("qwen2")  # biases on q/k/v
    masks = WeightMasks(model, excluded={0})
    select_unstructured(masks, random_scores(masks, 2), 0.4, per_row=True)
    reference = copy.deepcopy(model)
    layers = get_arch(reference).decoder_layers(reference)
    with torch.no_grad():
        for (i, path), keep in masks.as_dict().items():
            layers[i].get_submodule(path).weight.mul_(keep)
    handles = attach_weight_masks(model, masks)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    handles.remove()


def test_gradients_reach_lora_and_match_autograd():
    model = lora_model()
    train(model, steps=2)
    masks = WeightMasks(model)
    select_unstructured(masks, random_scores(masks, 3), 0.5)
    handles = attach_weight_masks(model, masks)
    model.zero_grad(set_to_none=True)
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    for _, _, m in lora_pairs(model):
        A, B = lora_weights(m)
        assert A.grad is not None and B.grad is not None
        assert bool(A.grad.abs().sum() > 0) and bool(B.grad.abs().sum() > 0)
    handles.remove()

    # the hand-written backward against autograd, in fp64, with W0 and the bias trainable too
    g = torch.Generator().manual_seed(0)
    x, w0, b = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((2, 3, 8), (6, 8), (6,)))
    a, bb = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((2, 8), (6, 2)))
    keep = torch.rand(6, 8, generator=g) > 0.5
    torch.autograd.gradcheck(lambda *t: _MaskedLinear.apply(*t, keep, 1.5, torch.float64), (x, w0, b, a, bb))
    _MaskedLinear.apply(x, w0, b, a, bb, keep, 1.5, torch.float64).sum().backward()
    assert bool((w0.grad[~keep] == 0).all())


def test_nm_keeps_exactly_n_of_m_after_merge_and_training():
    model = lora_model()
    imp = LoRAPruneImportance(model, keep_elements=True)
    train(model, steps=3, importance=imp)
    masks = WeightMasks(model, excluded={0})
    select_nm(masks, imp.element_scores(), 2, 4)
    handles = attach_weight_masks(model, masks)
    train(model, steps=3, seed=1)  # LoRA keeps training with the masks on: B·A is dense again
    handles.remove()
    merged = merge_keep_masks(model, weight_masks=masks.as_dict())
    layers = get_arch(merged).decoder_layers(merged)
    for (i, path), keep in masks.as_dict().items():
        w = layers[i].get_submodule(path).weight
        assert bool((w[~keep] == 0).all())
        nonzero = (w != 0).view(w.shape[0], -1, 4).sum(dim=2)  # [out, blocks]
        assert bool((nonzero == 2).all()), (i, path)
    q = layers[0].get_submodule("self_attn.q_proj").weight  # excluded: dense
    assert bool((q != 0).all())


def test_nm_validation_and_already_pruned_blocks():
    model = tiny_model("llama")
    masks = WeightMasks(model)
    for bad in ("2-4", "a:4", "4:4", "0:4", "3:2", "1:2:3", ""):
        check_one_line(lambda bad=bad: parse_nm(bad))
    assert parse_nm(" 2:4 ") == (2, 4)
    msg = check_one_line(lambda: select_nm(masks, random_scores(masks, 0), 2, 5))
    assert "not a multiple of m=5" in msg
    select_unstructured(masks, random_scores(masks, 0), 0.8, per_row=True)
    before = copy.deepcopy(masks)
    select_nm(masks, random_scores(masks, 1), 2, 4)
    assert masks.is_subset_of(before)
    for keep in masks.as_dict().values():
        kept = keep.view(keep.shape[0], -1, 4).sum(dim=2)
        assert bool((kept <= 2).all())


def test_unstructured_counts_and_decoder_sparsity():
    model = lora_model("opt")
    spec = get_arch(model)
    excluded = {0, 3}
    masks = WeightMasks(model, spec, excluded)
    assert all(i not in excluded for i, _ in masks.keys()) and masks.sparsity_of_decoder(model) == 0.0
    p = module_fraction_for(model, spec, excluded, 0.3)
    select_unstructured(masks, random_scores(masks, 4), p)
    n_modules = 0
    for keep in masks.as_dict().values():
        assert int((~keep).sum()) == int(keep.numel() * p)
        n_modules += 1
    total = sum(q.numel() for layer in spec.decoder_layers(model) for n, q in layer.named_parameters() if "lora_" not in n)
    assert 0.3 - n_modules / total <= masks.sparsity_of_decoder(model) <= 0.3
    # Wanda's per-row variant: the same count in every output row
    row_masks = WeightMasks(model, spec, excluded)
    select_unstructured(row_masks, random_scores(row_masks, 5), 0.5, per_row=True)
    for keep in row_masks.as_dict().values():
        assert bool(((~keep).sum(dim=1) == int(keep.shape[1] * 0.5)).all())  # in·0.5 is whole: every row alike
    msg = check_one_line(lambda: module_fraction_for(model, spec, {0, 1, 2}, 0.9))
    assert "lower --sparsity" in msg
    check_one_line(lambda: module_fraction_for(model, spec, set(), 1.0))
    check_one_line(lambda: select_unstructured(masks, random_scores(masks, 4), 1.0))


def test_masks_only_grow_across_selections():
    model = tiny_model("mistral")
    masks = WeightMasks(model)
    select_unstructured(masks, random_scores(masks, 6), 0.3)
    first = copy.deepcopy(masks)
    select_unstructured(masks, random_scores(masks, 7), 0.5)  # different scores
    assert masks.is_subset_of(first) and not first.is_subset_of(masks)
    for keep in masks.as_dict().values():
        assert int((~keep).sum()) == int(keep.numel() * 0.5)  # earlier pruned counted first
    select_unstructured(masks, random_scores(masks, 8), 0.2)  # a lower target prunes nothing back
    assert masks.is_subset_of(first) and int(sum((~k).sum() for k in masks.as_dict().values())) == masks.pruned()


def test_all_ones_masks_and_remove_restore_the_model():
    model = lora_model()
    train(model, steps=2)
    before = logits(model)
    masks = WeightMasks(model)
    handles = attach_weight_masks(model, masks)
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)
    check_one_line(lambda: attach_weight_masks(model, masks))
    handles.remove()
    modules = [m for _, _, m in lora_pairs(model)]
    assert all("forward" not in m.__dict__ for m in modules)
    assert torch.equal(logits(model), before)


def test_state_dict_roundtrip_and_error_lines():
    model = tiny_model("llama")
    masks = WeightMasks(model, excluded={3})
    select_nm(masks, random_scores(masks, 9), 1, 2)
    state = masks.state_dict()
    assert "m_0_self_attn__q_proj" in state and "m_3_mlp__down_proj" not in state
    fresh = WeightMasks(tiny_model("llama", seed=1), excluded={3})
    fresh.load_state_dict(state)
    assert fresh.is_subset_of(masks) and masks.is_subset_of(fresh)
    check_one_line(lambda: WeightMasks(model, excluded={7}))
    check_one_line(lambda: select_unstructured(masks, {}, 0.5))
    partial = dict(list(random_scores(masks, 0).items())[1:])
    assert "no scores for layer 0" in check_one_line(lambda: select_unstructured(masks, partial, 0.5))
    wrong = {k: torch.rand(3, 3) for k in masks.keys()}
    check_one_line(lambda: select_nm(masks, wrong, 2, 4))
    dora = attach_lora(tiny_model("llama"), LoraSettings(r=4, variant="dora"))
    assert "DoraLinearVariant" in check_one_line(lambda: attach_weight_masks(dora, WeightMasks(dora)))


def test_half_precision_and_autocast_keep_parameter_dtypes():
    model = lora_model()
    masks = WeightMasks(model)
    select_unstructured(masks, random_scores(masks, 10), 0.5)
    handles = attach_weight_masks(model, masks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=TOKENS, labels=TOKENS)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    model.to(torch.bfloat16)
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    for _, _, m in lora_pairs(model):
        A, B = lora_weights(m)
        assert A.grad.dtype == B.grad.dtype == torch.bfloat16 and bool(torch.isfinite(B.grad).all())
    handles.remove()
