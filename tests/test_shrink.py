"""Masked forward == physically shrunk forward; saved models reload with the same logits."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import slimtune  # noqa: F401  (registers slim model types)
from slimtune.errors import SlimtuneError
from slimtune.export import decoder_param_count, save_model, shrink_
from slimtune.masking.gates import attach_gates
from slimtune.masking.structured import StructuredMasks
from slimtune.models.arch import base_layer, get_arch, unwrap
from tests.conftest import INTERMEDIATE, tiny_model


def _mask(model, heads=None, channels=None, layers=(), same_channels=False):
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
            n = channels if same_channels else channels + i  # a different width per layer by default
            c[torch.randperm(g.intermediate, generator=torch.Generator().manual_seed(i))[:n]] = 0
            masks.set(i, channels=c)
    for i in layers:
        masks.set(i, layer=0)
    return masks


CASES = {
    "q_heads": dict(heads="q"),
    "kv_groups": dict(heads="kv"),
    "channels": dict(channels=10),
    "channels_uniform": dict(channels=10, same_channels=True),
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


def _saves_stock_config(family, case):
    """Every layer the same shape, and a shape the stock config can express."""
    if case in ("layers", "channels_uniform"):
        return True
    # one KV group pruned in every layer: uniform; OPT's stock config cannot drop heads
    return case == "kv_groups" and family != "opt"


@pytest.mark.parametrize("case", ["channels", "channels_uniform", "kv_groups", "mix", "q_nonuniform_layers", "layers"])
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
    stock = _saves_stock_config(family, case)
    assert ("slimtune_" in config) == (not stock), config
    assert (out / "modeling_slimtune.py").is_file() == (not stock)
    assert type(reloaded).__name__.startswith("Slim") == (not stock)
    if case == "channels_uniform":
        field = "ffn_dim" if family == "opt" else "intermediate_size"
        assert getattr(reloaded.config, field) == INTERMEDIATE - 10


def test_uniform_uses_stock_config(tmp_path, tokens):
    model = tiny_model("llama")
    masks = StructuredMasks(model)
    for i in range(len(masks)):
        masks.set(i, heads=torch.tensor([1, 0, 1, 1, 0, 1.0]), channels=torch.arange(INTERMEDIATE) % 4 != 0)
    shrink_(model, masks)
    out = save_model(model, tmp_path / "u")
    cfg = (out / "config.json").read_text()
    assert '"model_type": "llama"' in cfg and not (out / "modeling_slimtune.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_attention_heads == 4 and reloaded.config.num_key_value_heads == 2
    assert reloaded.config.intermediate_size == INTERMEDIATE * 3 // 4


def test_uniform_heads_the_stock_config_rejects_use_the_slim_config(tmp_path, tokens):
    """Llama's config requires hidden_size % num_attention_heads == 0, checked on save and load
    only: 4 heads of hidden 90 must take the per-layer config instead of a config that
    save_pretrained refuses (or, if saved, from_pretrained could not load)."""
    model = tiny_model("llama", hidden_size=90)
    masks = _mask(model, heads="q")  # one query head per KV group in every layer: 4 of 6 heads
    shrink_(model, masks)
    out = save_model(model, tmp_path / "h")
    assert '"model_type": "slimtune_llama"' in (out / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits, rtol=1e-5, atol=1e-5)


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


# ---- slicing along the right axis ----------------------------------------------------------
# Query-head masks per layer (GQA-valid), by number of heads: 6 = 2 KV groups of 3 (Llama-likes),
# 4 = plain multi-head attention (OPT). Layer 1 is removed, so the kept layers also move.
HEAD_MASKS = {
    6: [[0, 1, 1, 0, 0, 0], None, [1, 0, 1, 1, 0, 1], [0, 0, 0, 1, 1, 1]],
    4: [[0, 1, 1, 0], None, [1, 0, 1, 1], [0, 0, 0, 1]],
}


def _kept(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the kept rows/columns of a unit mask whose units are `size` elements wide."""
    return mask.bool().repeat_interleave(size).nonzero().flatten()


def test_tiny_model_widths_all_differ(family):
    """The fixture itself: no projection but OPT's attention is square, so a swapped [out, in]
    changes a shape; and hidden, intermediate, q width and KV width are four different sizes."""
    model = tiny_model(family)
    spec = get_arch(model)
    layer = spec.decoder_layers(model)[0]
    shape = {p: tuple(layer.get_submodule(p).weight.shape) for p in spec.projections()}
    hidden, q_width, kv_width = shape[spec.q][1], shape[spec.q][0], shape[spec.k][0]
    intermediate = shape[spec.mlp_out][1]
    assert shape[spec.o] == (hidden, q_width) and shape[spec.v] == (kv_width, hidden)
    assert all(shape[p] == (intermediate, hidden) for p in spec.mlp_in)
    if family == "opt":  # OPT needs num_heads * head_dim == hidden: its attention is square
        assert len({hidden, intermediate}) == 2 and q_width == kv_width == hidden
    else:
        assert len({hidden, intermediate, q_width, kv_width}) == 4
        assert all(out != in_ for out, in_ in shape.values())


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("fam", ["llama", "qwen2", "opt"])  # GQA; GQA with q/k/v biases; MHA with all biases
def test_shrink_slices_each_projection_along_its_own_axis(fam, lora):
    """Each sliced weight equals the original indexed by the kept output rows (q/k/v/gate/up/fc1)
    or the kept input columns (o/down/fc2), element for element; biases follow the rows; LoRA's
    B follows the rows and A the columns."""
    model = tiny_model(fam)
    spec = get_arch(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.0, target_modules=spec.leaf_names()))
        with torch.no_grad():  # B starts at zero; give it values so that slicing it can be checked
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.08, generator=torch.Generator().manual_seed(len(name)))
    masks = StructuredMasks(model)
    g = masks.geometry[0]
    gen = torch.Generator().manual_seed(7)
    for i, heads in enumerate(HEAD_MASKS[g.num_heads]):
        if heads is None:
            masks.set(i, layer=0)
            continue
        channels = torch.ones(g.intermediate)
        channels[torch.randperm(g.intermediate, generator=gen)[: 9 + 4 * i]] = 0
        masks.set(i, heads=torch.tensor(heads, dtype=torch.float), channels=channels)

    layers = spec.decoder_layers(model)
    before = [{name: t.detach().clone() for name, t in layer.state_dict().items()} for layer in layers]
    kept = []  # (old layer index, q rows, kv rows, channels), computed from the masks, not from plan.py
    for i in range(len(masks)):
        if masks.layer(i).item() == 0:
            continue
        heads = masks.heads(i)
        kv = heads.view(g.num_kv_heads, g.group_size).amax(dim=1)  # a KV head lives while a query head of its group does
        kept.append((i, _kept(heads, g.head_dim), _kept(kv, g.head_dim), _kept(masks.channels(i), 1)))
    shrink_(model, masks)

    layers = spec.decoder_layers(model)
    assert len(layers) == len(kept) == 3
    hidden = g.hidden
    for new, (old, q_rows, kv_rows, chans) in enumerate(kept):
        layer, ref = layers[new], before[old]
        # path -> (kept output rows, kept input columns); None keeps the whole axis
        axes = {spec.q: (q_rows, None), spec.k: (kv_rows, None), spec.v: (kv_rows, None), spec.o: (None, q_rows)}
        axes.update({p: (chans, None) for p in spec.mlp_in})
        axes[spec.mlp_out] = (None, chans)
        assert set(axes) == set(spec.projections())
        for path, (rows, cols) in axes.items():
            module = layer.get_submodule(path)
            base = base_layer(module)
            prefix = path + (".base_layer" if lora else "")
            w = ref[prefix + ".weight"]
            out_f = len(rows) if rows is not None else w.shape[0]
            in_f = len(cols) if cols is not None else w.shape[1]
            assert tuple(base.weight.shape) == (out_f, in_f), (new, path)
            assert (base.out_features, base.in_features) == (module.out_features, module.in_features) == (out_f, in_f)
            expected = w if rows is None else w[rows]
            expected = expected if cols is None else expected[:, cols]
            assert torch.equal(base.weight, expected), (new, path)
            if base.bias is not None:
                b = ref[prefix + ".bias"]
                assert torch.equal(base.bias, b if rows is None else b[rows]), (new, path)
            if lora:
                a, bl = module.lora_A["default"].weight, module.lora_B["default"].weight
                a_ref, b_ref = ref[path + ".lora_A.default.weight"], ref[path + ".lora_B.default.weight"]
                assert torch.equal(a, a_ref if cols is None else a_ref[:, cols]), (new, path)
                assert torch.equal(bl, b_ref if rows is None else b_ref[rows]), (new, path)
                assert module.lora_A["default"].in_features == in_f and module.lora_B["default"].out_features == out_f
        # the shapes, spelled out: q/k/v read the hidden state, o and down write it back
        n_q, n_kv = len(q_rows) // g.head_dim, len(kv_rows) // g.head_dim
        assert base_layer(layer.get_submodule(spec.q)).weight.shape == (n_q * g.head_dim, hidden)
        assert base_layer(layer.get_submodule(spec.k)).weight.shape == (n_kv * g.head_dim, hidden)
        assert base_layer(layer.get_submodule(spec.o)).weight.shape == (hidden, n_q * g.head_dim)
        assert base_layer(layer.get_submodule(spec.mlp_out)).weight.shape == (hidden, len(chans))
        # everything that is not a projection (norms, Qwen3's per-head norms) is untouched
        for name, t in layer.state_dict().items():
            if not any(name.startswith(p + ".") for p in spec.projections()):
                assert torch.equal(t, ref[name]), (new, name)
    assert [m.layer_idx for m in model.modules() if hasattr(m, "layer_idx")] == [0, 1, 2]
    with torch.no_grad():  # and the shrunk model still runs
        assert model(torch.arange(12)[None]).logits.shape == (1, 12, unwrap(model).config.vocab_size)


def test_fresh_python_without_slimtune_loads_the_tokenizer_and_the_remote_code_model(tmp_path, bpe_tokenizer):
    """What a user without slimtune does with a non-uniform output: the tokenizer loads without running
    or asking about code when told trust_remote_code=False, the model with trust_remote_code=True."""
    import subprocess
    import sys

    model = tiny_model("llama", vocab_size=320)
    shrink_(model, _mask(model, heads="q_nonuniform_layers", channels=5))
    out = save_model(model, tmp_path / "nu", tokenizer=bpe_tokenizer)
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=False)\n"
        "assert tok('hello world').input_ids, 'empty tokenisation'\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "assert 'slimtune' not in sys.modules and type(m).__name__ == 'SlimLlamaForCausalLM', type(m)\n"
        "print(m(torch.tensor([[1, 2, 3]])).logits.shape[-1])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "320"


class _ScalarReads(TorchDispatchMode):
    """Counts device-to-host reads (`.item()`, `bool(tensor)`): each one is a sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_gates_never_read_the_masks_on_the_host(tokens):
    model = tiny_model("llama")
    masks = _mask(model, heads="q", channels=5, layers=(1,))
    attach_gates(model, masks)
    with torch.no_grad(), _ScalarReads() as reads:
        first = model(tokens).logits
        assert reads.count == 0, f"{reads.count} host reads (device syncs on a GPU) in one masked forward"
        # what the masks say now is what the forward computes
        masks.set(1, layer=1.0)
        reopened = model(tokens).logits
        assert not torch.equal(reopened, first)
        masks.set(1, layer=0.0)
        torch.testing.assert_close(model(tokens).logits, first, rtol=0, atol=0)
        masks.set(2, channels=torch.zeros(INTERMEDIATE))
        closed = model(tokens).logits
        assert not torch.equal(closed, first)
        masks.to(torch.float64)
        torch.testing.assert_close(model(tokens).logits, closed, rtol=1e-6, atol=1e-6)


def test_only_the_pruned_kinds_are_gated(tokens):
    from slimtune.adapters import LoraSettings, attach_lora
    from slimtune.importance.loraprune import LoRAPruneImportance
    from slimtune.masking.gates import check_gated
    from slimtune.pruning.pruner import Pruner, PruneSettings

    model = attach_lora(tiny_model("llama"), LoraSettings(r=4, alpha=8))
    pruner = Pruner(model, PruneSettings(sparsity=0.2, granularity="channels"), LoRAPruneImportance(model), total_steps=4)
    spec, base = pruner.masks.spec, unwrap(model)
    layer = spec.decoder_layers(base)[1]
    assert not layer.get_submodule(spec.o)._forward_pre_hooks and not layer._forward_hooks
    assert len(layer.get_submodule(spec.mlp_out)._forward_pre_hooks) == 1
    check_gated(pruner.masks, pruner.gates)
    pruner.masks.set(1, layer=0.0)  # a kind no gate applies: refused, not silently ignored
    with pytest.raises(RuntimeError, match="layers of layer 1 are masked, but only channels are gated"):
        check_gated(pruner.masks, pruner.gates)


def test_gates_used_in_inference_mode_still_train(tokens):
    """An evaluation under torch.inference_mode between training steps must not leave the gates a copy
    of the mask that autograd cannot save."""
    model = tiny_model("llama")
    masks = _mask(model, heads="q", channels=5, layers=(1,))
    attach_gates(model, masks)
    with torch.inference_mode():
        model(tokens)
    model(tokens).logits.sum().backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None
