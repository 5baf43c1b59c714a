"""Masked forward == physically shrunk forward; saved models reload with the same logits."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import slimtune  # noqa: F401  (registers slim model types)
from slimtune.errors import SlimtuneError
from slimtune.export import decoder_param_count, save_model, shrink_
from slimtune.masking.gates import attach_gates
from slimtune.masking.structured import StructuredMasks
from tests.conftest import tiny_model


def _mask(model, heads=None, channels=None, layers=()):
    masks = StructuredMasks(model)
    g = masks.geometry[0]
    for i in range(len(masks)):
        if heads == "q":  # one query head per KV group, same in every group (valid GQA)
            h = torch.ones(g.num_kv_heads, g.group_size)
            if g.group_size > 1:
                h[:, (i % g.group_size)] = 0
            else:  # plain multi-head attention: a query head is a KV group
                h[i % g.num_kv_heads] = 0
            masks.set(i, heads=h.flatten())
        elif heads == "kv":  # a whole KV group
            h = torch.ones(g.num_kv_heads, g.group_size)
            h[i % g.num_kv_heads] = 0
            masks.set(i, heads=h.flatten())
        elif heads == "q_nonuniform_layers" and i % 2 == 0:
            h = torch.ones(g.num_kv_heads, g.group_size)
            h[0] = 0
            masks.set(i, heads=h.flatten())
        if channels:
            c = torch.ones(g.intermediate)
            c[torch.randperm(g.intermediate, generator=torch.Generator().manual_seed(i))[: channels + i]] = 0
            masks.set(i, channels=c)
    for i in layers:
        masks.set(i, layer=0)
    return masks


CASES = {
    "q_heads": dict(heads="q"),
    "kv_groups": dict(heads="kv"),
    "channels": dict(channels=10),
    "layers": dict(layers=(1, 2)),
    "mix": dict(heads="kv", channels=7, layers=(3,)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_masked_equals_shrunk(family, case, tokens):
    model = tiny_model(family)
    masks = _mask(model, **CASES[case])
    handles = attach_gates(model, masks)
    with torch.no_grad():
        masked = model(tokens).logits
    handles.remove()
    before, predicted_after = decoder_param_count(model, masks)
    shrink_(model, masks)
    with torch.no_grad():
        shrunk = model(tokens).logits
    torch.testing.assert_close(shrunk, masked, rtol=1e-5, atol=1e-5)
    actual_after = sum(p.numel() for p in masks.spec.decoder_layers(model).parameters())
    assert actual_after == predicted_after < before


@pytest.mark.parametrize("case", ["channels", "kv_groups", "mix", "q_nonuniform_layers", "layers"])
def test_save_load_roundtrip(family, case, tokens, tmp_path):
    model = tiny_model(family)
    spec = CASES.get(case, dict(heads="q_nonuniform_layers"))
    masks = _mask(model, **spec)
    shrink_(model, masks)
    with torch.no_grad():
        expected = model(tokens).logits
    out = save_model(copy.deepcopy(model), tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = reloaded(tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    config = (out / "config.json").read_text()
    uniform = case == "layers" or (case == "channels" and False)
    if uniform:
        assert "slimtune_" not in config
    if "slimtune_" in config:
        assert (out / "modeling_slimtune.py").is_file()


def test_uniform_uses_stock_config(tmp_path, tokens):
    model = tiny_model("llama")
    masks = StructuredMasks(model)
    for i in range(len(masks)):
        masks.set(i, heads=torch.tensor([1, 0, 1, 1, 0, 1.0]), channels=torch.arange(96) % 3 != 0)
    shrink_(model, masks)
    out = save_model(model, tmp_path / "u")
    cfg = (out / "config.json").read_text()
    assert '"model_type": "llama"' in cfg and not (out / "modeling_slimtune.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_attention_heads == 4 and reloaded.config.num_key_value_heads == 2
    assert reloaded.config.intermediate_size == 64


def test_remote_code_fallback_loads_without_registration(tmp_path, tokens):
    """The modeling file written next to the weights is standalone."""
    model = tiny_model("llama")
    masks = _mask(model, heads="q_nonuniform_layers", channels=5)
    shrink_(model, masks)
    out = save_model(model, tmp_path / "nu")
    import importlib.util

    spec = importlib.util.spec_from_file_location("copied_modeling", out / "modeling_slimtune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    reloaded = mod.SlimLlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits, rtol=1e-5, atol=1e-5)


def test_invalid_gqa_mask_is_a_clear_error():
    model = tiny_model("llama")
    masks = StructuredMasks(model)
    masks.set(0, heads=torch.tensor([0, 1, 1, 1, 1, 1.0]))  # 2 heads in group 0, 3 in group 1
    with pytest.raises(SlimtuneError, match="KV groups"):
        shrink_(model, masks)


def test_save_refuses_non_empty_dir(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    with pytest.raises(SlimtuneError, match="--overwrite"):
        save_model(tiny_model("llama"), tmp_path / "o")
    assert (tmp_path / "o" / "keep.txt").read_text() == "x"
