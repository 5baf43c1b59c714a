"""Sparse export: pruned projections stored in compressed-tensors' bitmask / 2:4 layouts, smaller
than the dense save, and `load_sparse` gives back the same weights bit for bit and the same logits."""

import copy
import json

import pytest
import torch

import slimtune  # noqa: F401  (registers slim model types)
from slimtune.errors import SlimtuneError
from slimtune.export import save_model, shrink_
from slimtune.export.sparse import (
    BITMASK,
    SPARSE24,
    decode,
    encode_24,
    encode_bitmask,
    is_sparse_dir,
    load_sparse,
    plan_sparse,
    read_sparsity_config,
    save_sparse,
)
from slimtune.masking.weights import WeightMasks, zero_masked_weights
from slimtune.models.arch import get_arch
from tests.conftest import tiny_model
from tests.test_shrink import _mask


@torch.no_grad()
def _prune(model, pattern="unstructured", fraction=0.5):
    """Zero the smallest |w|: `fraction` of each decoder projection, or 2 of every 4 inputs."""
    spec = get_arch(model)
    for layer in spec.decoder_layers(model):
        for path in spec.projections():
            w = layer.get_submodule(path).weight
            if pattern == "2:4":
                groups = w.view(w.shape[0], -1, 4)
                groups.scatter_(-1, groups.abs().argsort(-1)[..., :2], 0.0)
            else:
                w.view(-1)[w.abs().flatten().argsort()[: int(w.numel() * fraction)]] = 0.0
    return model


def _bits(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_same_model(a, b, tokens):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(_bits(sa[key]), _bits(sb[key])), key
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)


def _file_bytes(directory):
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


# ---- round trips --------------------------------------------------------------------------------
def test_bitmask_roundtrip_is_bit_exact_and_smaller(family, tokens, tmp_path):
    model = _prune(tiny_model(family))
    report = save_sparse(model, tmp_path / "sparse")
    dense = save_model(copy.deepcopy(model), tmp_path / "dense")
    assert report["format"] == BITMASK
    assert report["weight_bytes"] == _file_bytes(tmp_path / "sparse") < _file_bytes(dense)
    assert abs(report["dense_weight_bytes"] - _file_bytes(dense)) < 16_384  # the dense file = data + its header
    assert {row["stored"] for row in report["modules"]} == {"bitmask"}
    assert all(abs(row["sparsity"] - 0.5) < 0.01 for row in report["modules"])
    reloaded = load_sparse(tmp_path / "sparse")
    _assert_same_model(model, reloaded, tokens)


@pytest.mark.parametrize("tied", [False, True])
def test_2_4_model_is_saved_as_sparse_24_and_reloads_exactly(tied, tokens, tmp_path):
    model = _prune(tiny_model("llama", tie_word_embeddings=tied), "2:4")
    report = save_sparse(model, tmp_path / "s24", format="auto")
    assert report["format"] == SPARSE24
    config = read_sparsity_config(tmp_path / "s24")
    assert config["format"] == SPARSE24 and config["sparsity_structure"] == "2:4"
    assert len(config["targets"]) == report["sparse_modules"] == 4 * 7
    reloaded = load_sparse(tmp_path / "s24")
    _assert_same_model(model, reloaded, tokens)
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    assert report["weight_bytes"] < _file_bytes(save_model(copy.deepcopy(model), tmp_path / "dense"))


def test_directory_layout_and_config(tmp_path):
    from safetensors import safe_open

    model = _prune(tiny_model("llama"))
    save_sparse(model, tmp_path / "out")
    out = tmp_path / "out"
    assert is_sparse_dir(out) and not is_sparse_dir(save_model(tiny_model("llama"), tmp_path / "dense"))
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["sparsity_config"]["format"] == BITMASK
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    q = "model.layers.0.self_attn.q_proj"
    assert {f"{q}.compressed", f"{q}.bitmask", f"{q}.row_offsets", f"{q}.shape"} <= keys
    assert f"{q}.weight" not in keys and "model.embed_tokens.weight" in keys and "model.norm.weight" in keys


def test_encodings_on_a_hand_made_tensor():
    w = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, -0.0, 7.0, 0.0, 0.0]])
    bm = encode_bitmask(w)
    assert bm["compressed"].tolist() == [1.5, -2.0, 3.0, -0.0, 7.0]  # -0.0 is a value: its bits are not zero
    assert bm["bitmask"].tolist() == [[0b00011010], [0b00110000]]  # bit j of a byte = column j
    assert bm["row_offsets"].tolist() == [0, 3] and bm["shape"].tolist() == [2, 8]
    s24 = encode_24(w)
    assert s24["compressed"].shape == (2, 4) and s24["shape"].shape == (2, 1)
    assert int(s24["bitmask"].flatten().tolist()[0]).bit_count() == 4  # 2 per group, topped up with zeros
    for parts in (bm, s24):
        assert torch.equal(_bits(decode(parts)), _bits(w))


def test_bf16_ratio_on_a_larger_model(tmp_path):
    """bf16 at 50%: values 1 byte + mask 1/8 byte per weight of 2 bytes -> 0.5625 (plus 8 bytes a row for the bitmask layout)."""
    model = tiny_model("llama", hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    model = model.to(torch.bfloat16)
    model.model.rotary_emb.inv_freq = inv_freq  # `.to` casts this buffer too; a model loaded in bf16 keeps it fp32
    for pattern, fmt, expected in (("unstructured", "bitmask", 0.5625), ("2:4", "sparse-24", 0.5625)):
        m = _prune(copy.deepcopy(model), pattern)
        report = save_sparse(m, tmp_path / fmt, format=fmt)
        for row in report["modules"]:
            ratio = row["stored_bytes"] / row["dense_bytes"]
            assert expected <= ratio < expected + 8 / (2 * row["shape"][1]) + 1e-3, row
        assert report["ratio"] < 0.75  # the dense embedding (vocab 112) is a small share here
        _assert_same_model(m, load_sparse(tmp_path / fmt), torch.randint(0, 96, (2, 12)))


def test_non_uniform_shrunk_model_saves_sparse(tokens, tmp_path):
    model = tiny_model("llama")
    shrink_(model, _mask(model, channels=10))  # a different MLP width per layer (70, 69, ...): not 2:4-able
    _prune(model)
    report = save_sparse(model, tmp_path / "out")
    assert report["format"] == BITMASK
    assert (tmp_path / "out" / "modeling_slimtune.py").is_file()
    reloaded = load_sparse(tmp_path / "out")
    assert type(reloaded).__name__.startswith("Slim")
    _assert_same_model(model, reloaded, tokens)


def test_masks_choose_the_projections_and_must_match_the_zeros(tmp_path):
    model = tiny_model("llama")
    masks = WeightMasks(model, excluded={1, 2, 3})
    for i, path in masks.keys():
        masks.set_mask(i, path, torch.rand(masks.mask(i, path).shape, generator=torch.Generator().manual_seed(i)) > 0.5)
    with pytest.raises(SlimtuneError, match="zero_masked_weights") as err:
        save_sparse(model, tmp_path / "a", masks=masks)
    assert "\n" not in str(err.value) and not (tmp_path / "a").exists()
    zero_masked_weights(model, masks)
    report = save_sparse(model, tmp_path / "a", masks=masks)
    assert report["sparse_modules"] == 7 and all(".layers.0." in row["module"] for row in report["modules"])
    _assert_same_model(model, load_sparse(tmp_path / "a"), torch.randint(0, 96, (1, 8)))


def test_overwrite_replaces_a_slimtune_directory(tmp_path):
    model = _prune(tiny_model("llama"))
    save_sparse(model, tmp_path / "out")
    with pytest.raises(SlimtuneError, match="--overwrite"):
        save_sparse(model, tmp_path / "out")
    save_sparse(model, tmp_path / "out", format="bitmask", overwrite=True)
    assert is_sparse_dir(tmp_path / "out")


# ---- refusals -----------------------------------------------------------------------------------
def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_sparse_24_refused_for_an_unstructured_model(tmp_path):
    model = _prune(tiny_model("llama"))
    with pytest.raises(SlimtuneError, match=r"model\.layers\.0\..* is not 2:4 sparse.*'bitmask' or 'auto'") as err:
        save_sparse(model, tmp_path / "out", format="sparse-24")
    _one_line(err)
    assert not (tmp_path / "out").exists()


def test_other_refusals(tmp_path):
    with pytest.raises(SlimtuneError, match="unknown; pass one of auto, bitmask, sparse-24") as err:
        plan_sparse(tiny_model("llama"), format="csr")
    _one_line(err)
    with pytest.raises(SlimtuneError, match="nothing to store sparse") as err:
        save_sparse(tiny_model("llama"), tmp_path / "dense")
    _one_line(err)
    with pytest.raises(SlimtuneError, match="holds no sparse weights") as err:
        load_sparse(save_model(tiny_model("llama"), tmp_path / "plain"))
    _one_line(err)
    with pytest.raises(SlimtuneError, match="no config.json"):
        load_sparse(tmp_path / "missing")


def test_lora_wrapped_model_is_refused(tmp_path):
    from slimtune.adapters.lora import attach_lora

    model = attach_lora(_prune(tiny_model("llama")))
    with pytest.raises(SlimtuneError, match="merge the adapters first") as err:
        save_sparse(model, tmp_path / "out")
    _one_line(err)


# ---- the format's own reader --------------------------------------------------------------------
def test_compressed_tensors_decodes_our_files(tmp_path):
    """compressed-tensors <= 0.14 still has the sparse compressors; newer ones removed them (skip)."""
    sparse = pytest.importorskip("compressed_tensors.compressors.sparse_compressors", reason="compressed-tensors with sparse compressors (<= 0.14) not installed")
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    for pattern, comp in (("unstructured", sparse.BitmaskCompressor(config=BitmaskConfig())), ("2:4", sparse.Sparse24BitMaskCompressor(config=Sparse24BitMaskConfig()))):
        model = _prune(tiny_model("llama"), pattern)
        save_sparse(model, tmp_path / pattern.replace(":", ""))
        decoded = dict(comp.decompress(str(tmp_path / pattern.replace(":", ""))))
        state = model.state_dict()
        assert decoded.keys() == state.keys()
        assert all(torch.equal(decoded[k], state[k]) for k in state)
        w = model.model.layers[0].mlp.up_proj.weight.detach()
        ours = encode_24(w) if pattern == "2:4" else encode_bitmask(w)
        theirs = comp.compress_weight("x", w)
        assert all(torch.equal(theirs[f"x.{part}"], tensor) for part, tensor in ours.items())


def test_sparsity_config_validates_against_compressed_tensors(tmp_path):
    config_mod = pytest.importorskip("compressed_tensors.config", reason="compressed-tensors not installed")
    save_sparse(_prune(tiny_model("llama")), tmp_path / "out")
    config = read_sparsity_config(tmp_path / "out")
    parsed = config_mod.SparsityCompressionConfig.load_from_registry(config["format"], **config)
    assert parsed.format == BITMASK and parsed.targets == config["targets"]
