"""GGUF export: block layout, trained quantisers exported bit-exactly, transformers' GGUF loader
reloads the file to the same logits, non-uniform models as `deci` with per-layer arrays."""

import copy

import gguf
import numpy as np
import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.export.gguf import (
    export_gguf,
    gguf_state_dict,
    pack_blocks,
    quantizer_blocks,
    rope_permutation,
    tokenizer_fields,
)
from slimtune.quant import QuantizerSet, make_quantizer
from tests.conftest import CHAT_TEMPLATE as TEMPLATE
from tests.conftest import tiny_model

VOCAB = 320  # the model's embeddings; the tokenizer below has 300 tokens, the rest is padding

PROJ = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _qmodel(**overrides):
    """Tiny GQA Llama whose widths split into GGUF blocks of 32: hidden 96, MLP 160, 6 heads of 16."""
    return tiny_model("llama", **{"hidden_size": 96, "intermediate_size": 160, "vocab_size": VOCAB, **overrides})


@pytest.fixture
def tokens():
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))


def _reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _fields(path):
    reader = gguf.GGUFReader(path)
    return reader, {k: f.contents() for k, f in reader.fields.items() if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}


# ---- layout pieces -------------------------------------------------------------------------------
@pytest.mark.parametrize("n_heads,n_kv", [(6, 2), (4, 4), (3, 1)])
def test_rope_permutation_is_what_transformers_reverses(n_heads, n_kv):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    hd = 16
    q = torch.randn(n_heads * hd, 8)
    k = torch.randn(n_kv * hd, 8)
    proc = LlamaTensorProcessor()
    q_back = proc._reverse_permute_weights(q[rope_permutation(len(q), n_heads)].numpy(), n_heads, n_heads)
    k_back = proc._reverse_permute_weights(k[rope_permutation(len(k), n_kv)].numpy(), n_heads, n_kv)
    assert np.array_equal(q_back, q.numpy()) and np.array_equal(k_back, k.numpy())


def _unpack(blocks: np.ndarray, qtype: str, cols: int):
    """Test-side reader of llama.cpp blocks: (codes, d, m) with codes signed for Q8_0/Q4_0."""
    rows = blocks.shape[0]
    b = blocks.reshape(rows * cols // 32, -1)
    d = b[:, :2].copy().view(np.float16)[:, 0]
    if qtype == "q8_0":
        return b[:, 2:].copy().view(np.int8).astype(np.int32).reshape(rows, cols), d, None
    start = 4 if qtype == "q4_1" else 2
    m = b[:, 2:4].copy().view(np.float16)[:, 0] if qtype == "q4_1" else None
    nib = b[:, start:]
    n = np.concatenate([nib & 0x0F, nib >> 4], axis=1).astype(np.int32)
    return (n - 8 if qtype == "q4_0" else n).reshape(rows, cols), d, m


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_pack_blocks_reproduces_llama_cpp_bytes(qtype):
    w = np.random.default_rng(0).normal(0, 0.05, (6, 96)).astype(np.float32)
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype.upper()])
    codes, d, m = _unpack(ref, qtype, 96)
    ours = pack_blocks(torch.from_numpy(codes), torch.from_numpy(d.astype(np.float32)).reshape(6, 3),
                       None if m is None else torch.from_numpy(m.astype(np.float32)).reshape(6, 3), qtype)
    assert ours.dtype == np.uint8 and np.array_equal(ours, ref)


@pytest.mark.parametrize(
    "kind,spec,qtype",
    [("lsq", "w4g32", "Q4_0"), ("lsq", "w8g32", "Q8_0"), ("lsq+", "w4g32a", "Q4_1"), ("fake", "w4g32", "Q4_0"), ("fake", "w8g32", "Q8_0"),
     ("lsq", "w4", "Q4_0"), ("lsq", "w8g64", "Q8_0"), ("lsq+", "w4g128a", "Q4_1")],
)
def test_trained_quantizers_export_bit_exactly(kind, spec, qtype):
    w = torch.randn(12, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    q = make_quantizer(kind, spec, w)
    if kind != "fake":
        with torch.no_grad():  # as if trained: step sizes (and offsets) moved off their init
            for p in q.parameters():
                p.mul_(1 + 0.1 * torch.rand(p.shape))
    data, got = quantizer_blocks(w, q)
    assert got == qtype
    back = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])).reshape(w.shape)
    assert torch.equal(back, q(w).detach())
    perm = rope_permutation(12, 3)
    data_p, _ = quantizer_blocks(w, q, perm)
    back_p = torch.from_numpy(gguf.quants.dequantize(data_p, gguf.GGMLQuantizationType[qtype])).reshape(w.shape)
    assert torch.equal(back_p, q(w).detach()[perm])


def test_fake_affine_exports_within_one_fp16_ulp_of_the_offset():
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(2)) * 0.05
    q = make_quantizer("fake", "w4g32a", w)
    data, qtype = quantizer_blocks(w, q)
    back = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_1)).reshape(w.shape)
    offset = q.qparams()[1]
    assert torch.allclose(back, q(w), atol=offset.abs().max().item() * 2**-10)


def test_specs_without_a_gguf_block_are_refused():
    w = torch.randn(4, 64)
    for spec in ("w8g32a", "w4g16", "w3g32"):
        kind = "fake"
        with pytest.raises(SlimtuneError, match="no GGUF block type"):
            quantizer_blocks(w, make_quantizer(kind, spec, w))
    with pytest.raises(SlimtuneError, match="multiple of 32"):
        quantizer_blocks(torch.randn(4, 48), make_quantizer("lsq", "w4", torch.randn(4, 48)))


# ---- whole-model export, reloaded by transformers ------------------------------------------------
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("tied", [False, True])
def test_float_export_reloads_in_transformers_with_the_same_logits(tmp_path, bpe_tokenizer, tokens, dtype, tied):
    model = _qmodel(tie_word_embeddings=tied)
    path = tmp_path / "model.gguf"
    report = export_gguf(model, bpe_tokenizer, path, dtype=dtype)
    assert report["architecture"] == "llama"
    assert report["tensors"]["blk.0.attn_norm.weight"] == "F32"
    assert report["tensors"]["blk.0.attn_q.weight"] == dtype.upper()
    assert ("output.weight" in report["tensors"]) is not tied
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:
                p.copy_(p.to({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]).float())
    reloaded = _reload(path)
    assert reloaded.config.tie_word_embeddings == tied
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads, reloaded.config.head_dim) == (6, 2, 16)
    tol = 0.0 if dtype == "f32" else 1e-5
    assert torch.allclose(_logits(reloaded, tokens), _logits(ref, tokens), atol=tol, rtol=0)


def test_tokenizer_and_chat_template_round_trip(tmp_path, bpe_tokenizer):
    from transformers import AutoTokenizer

    path = tmp_path / "model.gguf"
    export_gguf(_qmodel(), bpe_tokenizer, path, dtype="f16")
    reader, fields = _fields(path)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "default"
    assert fields["tokenizer.chat_template"] == TEMPLATE
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == VOCAB and tokens[310] == "[PAD310]" and types[310] == gguf.TokenType.UNUSED
    assert types[1] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the lazy fox, hello slimtune!", "quantisation  of\nmodels", "<|im_start|>user\nhi<|im_end|>"]:
        assert back(text).input_ids == bpe_tokenizer(text).input_ids
    assert back.chat_template == TEMPLATE


@pytest.mark.parametrize("kind,spec,qtype", [("lsq", "w4g32", "Q4_0"), ("lsq+", "w4g32a", "Q4_1"), ("lsq", "w8g32", "Q8_0"), ("fake", "w4g32", "Q4_0")])
def test_quantised_export_is_what_was_trained(tmp_path, bpe_tokenizer, tokens, kind, spec, qtype):
    model = _qmodel()
    qs = QuantizerSet(model, spec, kind=kind)
    if kind != "fake":
        with torch.no_grad():
            for p in qs.parameters():
                p.mul_(1 + 0.1 * torch.rand(p.shape))
    qs.eval()
    # the model as the quantised forward sees it: every projection replaced by Q(W)
    trained = copy.deepcopy(model)
    layers = trained.model.layers
    with torch.no_grad():
        for (i, path), q in qs.as_dict().items():
            lin = layers[i].get_submodule(path)
            lin.weight.copy_(q(lin.weight))
    path = tmp_path / "model.gguf"
    report = export_gguf(model, bpe_tokenizer, path, quantizers=qs, embed_dtype="f32")
    assert {report["tensors"][f"blk.{i}.{g}.weight"] for i in range(4) for g in PROJ.values()} == {qtype}
    assert report["fallback_f16"] == []
    _, fields = _fields(path)
    assert fields["general.file_type"] == int(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    state, meta = gguf_state_dict(path)
    for (i, p), _ in qs.as_dict().items():
        assert torch.equal(state[f"model.layers.{i}.{p}.weight"], layers[i].get_submodule(p).weight), (i, p)
    # exporting the already-quantised weights gives the same file contents (quantisation is idempotent)
    path2 = tmp_path / "baked.gguf"
    export_gguf(trained, bpe_tokenizer, path2, quantizers=qs, embed_dtype="f32")
    state2, _ = gguf_state_dict(path2)
    assert all(torch.equal(state[k], state2[k]) for k in state)
    # and transformers' GGUF loader gives the logits of the trained (fake-quantised) model
    assert torch.allclose(_logits(_reload(path), tokens), _logits(trained, tokens), atol=1e-5, rtol=0)


def test_block_types_without_quantizers_use_llama_cpp_rounding_and_fall_back_on_odd_widths(tmp_path, bpe_tokenizer):
    model = _qmodel(intermediate_size=80)  # down_proj rows of 80 values cannot be blocks of 32
    path = tmp_path / "model.gguf"
    report = export_gguf(model, bpe_tokenizer, path, dtype="q4_1")
    assert report["fallback_f16"] == [f"blk.{i}.ffn_down.weight" for i in range(4)]
    assert report["tensors"]["blk.0.ffn_down.weight"] == "F16" and report["tensors"]["blk.0.ffn_up.weight"] == "Q4_1"
    assert report["tensors"]["token_embd.weight"] == "Q8_0"  # block exports keep the embeddings at 8 bits
    state, _ = gguf_state_dict(path)
    w = model.model.layers[2].self_attn.k_proj.weight.detach()
    perm = rope_permutation(32, 2)
    ref = gguf.quants.dequantize(gguf.quants.quantize(w[perm].numpy(), gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1)
    assert torch.equal(state["model.layers.2.self_attn.k_proj.weight"][perm], torch.from_numpy(ref))


# ---- non-uniform models --------------------------------------------------------------------------
def _shrunk_nonuniform(**overrides):
    from slimtune.export import shrink_
    from slimtune.masking.structured import StructuredMasks

    model = _qmodel(**overrides)
    masks = StructuredMasks(model)
    g = masks.geometry[0]
    widths = [128, 160, 64, 96]
    for i in range(4):
        heads = torch.ones(g.num_kv_heads, g.group_size)
        if i % 2 == 0:
            heads[i // 2 % g.num_kv_heads] = 0  # a whole KV group: 3 heads, 1 KV head left
        channels = torch.zeros(160)
        channels[torch.randperm(160, generator=torch.Generator().manual_seed(i))[: widths[i]]] = 1
        masks.set(i, heads=heads.flatten(), channels=channels)
    shrink_(model, masks)
    return model


def test_non_uniform_model_exports_as_deci_with_per_layer_arrays(tmp_path, bpe_tokenizer):
    model = _shrunk_nonuniform()
    path = tmp_path / "slim.gguf"
    report = export_gguf(model, bpe_tokenizer, path, dtype="f32")
    assert report["architecture"] == "deci"
    reader, fields = _fields(path)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [3, 6, 3, 6]
    assert fields["deci.attention.head_count_kv"] == [1, 2, 1, 2]
    assert fields["deci.feed_forward_length"] == [128, 160, 64, 96]
    assert (fields["deci.attention.key_length"], fields["deci.rope.dimension_count"]) == (16, 16)
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}  # GGUF order: [in, out]
    assert shapes["blk.0.attn_q.weight"] == [96, 48] and shapes["blk.1.attn_q.weight"] == [96, 96]
    assert shapes["blk.2.attn_k.weight"] == [96, 16] and shapes["blk.2.ffn_down.weight"] == [64, 96]
    state, meta = gguf_state_dict(path)
    assert meta["num_heads"] == [3, 6, 3, 6]
    own = model.state_dict()
    assert set(state) == set(own)
    for k, v in own.items():
        assert torch.equal(state[k], v), k


def test_non_uniform_quantised_export(tmp_path, bpe_tokenizer):
    model = _shrunk_nonuniform(head_dim=32)  # 3 heads of 32 = 96 columns of o_proj: whole groups
    qs = QuantizerSet(model, "w4g32", kind="lsq")  # built after shrinking: every width is a multiple of 32
    path = tmp_path / "slim.gguf"
    report = export_gguf(model, bpe_tokenizer, path, quantizers=qs)
    assert report["architecture"] == "deci" and report["tensors"]["blk.2.ffn_down.weight"] == "Q4_0"
    state, _ = gguf_state_dict(path)
    for (i, p), q in qs.as_dict().items():
        w = model.model.layers[i].get_submodule(p).weight
        assert torch.equal(state[f"model.layers.{i}.{p}.weight"], q(w).detach()), (i, p)


# ---- errors --------------------------------------------------------------------------------------
def test_export_errors_are_one_line(tmp_path, bpe_tokenizer):
    from slimtune.adapters.lora import attach_lora

    cases = [
        (lambda: export_gguf(tiny_model("qwen2"), bpe_tokenizer, tmp_path / "a.gguf"), "supports llama, mistral"),
        (lambda: export_gguf(attach_lora(_qmodel()), bpe_tokenizer, tmp_path / "b.gguf"), "merge them first"),
        (lambda: export_gguf(_qmodel(), bpe_tokenizer, tmp_path / "c.bin"), "should end in .gguf"),
        (lambda: export_gguf(_qmodel(), bpe_tokenizer, tmp_path / "d.gguf", dtype="q5_k"), "unknown GGUF type 'q5_k'"),
        (lambda: export_gguf(_qmodel(), bpe_tokenizer, tmp_path / "e.gguf", quantizers=QuantizerSet(_qmodel(), "w8g32a", kind="fake")), "no GGUF block type"),
        (lambda: export_gguf(_qmodel(vocab_size=200), bpe_tokenizer, tmp_path / "f.gguf"), "only 200 embeddings"),
    ]
    for fn, message in cases:
        with pytest.raises(SlimtuneError, match=message) as err:
            fn()
        assert "\n" not in str(err.value)
    path = tmp_path / "g.gguf"
    export_gguf(_qmodel(), bpe_tokenizer, path)
    with pytest.raises(SlimtuneError, match="exists"):
        export_gguf(_qmodel(), bpe_tokenizer, path)
    export_gguf(_qmodel(), bpe_tokenizer, path, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_word_level_tokenizers_are_refused(tmp_path, byte_tokenizer):
    with pytest.raises(SlimtuneError, match="byte-level BPE tokenizers only"):
        export_gguf(_qmodel(), byte_tokenizer, tmp_path / "m.gguf")
    export_gguf(_qmodel(), None, tmp_path / "m.gguf")  # weights only is allowed


# ---- the bundled model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_tokenizer_metadata_is_copied_from_the_bundled_gguf():
    from transformers import AutoTokenizer

    from slimtune.models.source import bundled_gguf_path

    src = bundled_gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    fields = tokenizer_fields(tok, 49152)
    reader = gguf.GGUFReader(src)
    assert fields["tokenizer.ggml.pre"] == "smollm"
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.eos_token_id"):
        assert fields[key] == reader.fields[key].contents(), key
    assert "<|im_start|>" in fields["tokenizer.chat_template"]


def test_mistral_exports_as_llama(tmp_path, bpe_tokenizer, tokens):
    model = tiny_model("mistral", hidden_size=96, intermediate_size=160, vocab_size=VOCAB)
    path = tmp_path / "mistral.gguf"
    assert export_gguf(model, bpe_tokenizer, path, dtype="f32")["architecture"] == "llama"
    assert torch.allclose(_logits(_reload(path), tokens), _logits(model, tokens), atol=1e-6, rtol=0)


def test_llama3_rope_writes_the_frequency_divisors(tmp_path, bpe_tokenizer):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    model = _qmodel(max_position_embeddings=16384, rope_parameters=rope)
    path = tmp_path / "llama3.gguf"
    export_gguf(model, bpe_tokenizer, path, dtype="f32")
    reader = gguf.GGUFReader(path)
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)
    assert np.all(np.diff(factors) >= 0)
    # llama.cpp divides each frequency by its factor: that must give transformers' llama3 frequencies
    inv = 1.0 / (500000.0 ** (np.arange(0, 16, 2) / 16))
    assert np.allclose(inv / factors, model.model.rotary_emb.inv_freq.numpy(), rtol=1e-5)


def test_unsupported_rope_scaling_is_refused(tmp_path, bpe_tokenizer):
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(SlimtuneError, match="rope scaling 'yarn'"):
        export_gguf(_qmodel(rope_parameters=rope), bpe_tokenizer, tmp_path / "m.gguf")


@pytest.mark.slow
def test_bundled_model_round_trips_through_gguf(tmp_path):
    """SmolLM2-135M (tied embeddings, 9 heads / 3 KV heads of 64) -> F16 GGUF -> transformers."""
    from slimtune.models.source import load_model

    model, tok = load_model("default")
    path = tmp_path / "smollm2.gguf"
    report = export_gguf(model, tok, path, dtype="f16")
    assert report["architecture"] == "llama" and "output.weight" not in report["tensors"]
    _, fields = _fields(path)
    assert fields["tokenizer.ggml.pre"] == "smollm" and fields["llama.attention.head_count"] == 9
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    assert torch.allclose(_logits(_reload(path), ids), _logits(model, ids), atol=1e-4, rtol=0)
