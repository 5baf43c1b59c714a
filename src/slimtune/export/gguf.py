"""Write a (possibly pruned, possibly quantisation-trained) Llama model as a GGUF file for llama.cpp.

Architecture. Uniform models are written as `llama`. Models whose layers differ (non-uniform
pruning) are written as `deci`, llama.cpp's Llama variant with per-layer sizes (Llama-3.1-Nemotron
NAS models): llama.cpp reads `{arch}.attention.head_count`, `head_count_kv` and
`feed_forward_length` as per-layer arrays for every architecture, but its `llama` loader sizes every
layer's tensors from layer 0's values, while `deci` uses each layer's own. The tensors, rope and
norms are the same as Llama's.

Tensors. Norms (and biases) are F32. Projections are written at `dtype`:
- "f32", "f16", "bf16": as is;
- "q8_0", "q4_0", "q4_1": llama.cpp's own round-to-nearest block quantisation (`gguf.quants`);
- with `quantizers` (a `slimtune.quant.QuantizerSet`, or {(layer, path): quantiser}): exactly the
  codes and fp16 scales/offsets the quantisers trained (w8g32 -> Q8_0, w4g32 -> Q4_0,
  w4g32a -> Q4_1; per-channel and larger multiples of 32 repeat their scale over blocks).
A projection whose rows do not split into blocks of 32 falls back to F16 (reported). The token
embedding (and an untied output) is written at `embed_dtype`; by default F16 for float exports and
Q8_0 for block-quantised ones, as llama.cpp's own Q4 files do.

Rotary layout. HF Llama rotates the two halves of each head (rotate_half); GGML's "normal" rope
rotates adjacent pairs. So q_proj and k_proj rows are reordered within each head, [2, hd/2] ->
[hd/2, 2]: the inverse of what transformers' GGUF loader undoes (`_reverse_permute_weights`).

Tokenizer. If the tokenizer is the bundled SmolLM2 one, its GGUF metadata is copied from the
bundled file (pre-tokenizer "smollm" included). Otherwise byte-level BPE tokenizers are written as
`gpt2` (tokens, merges, token types, special ids) with pre-tokenizer "default" unless `pre` names
one llama.cpp knows; the chat template is written when the tokenizer has one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import SlimtuneError
from ..io import check_writable_parent
from ..models.arch import base_model_type, get_arch, unwrap

FLOAT_TYPES = ("f32", "f16", "bf16")
BLOCK_TYPES = ("q8_0", "q4_0", "q4_1")
GGUF_DTYPES = FLOAT_TYPES + BLOCK_TYPES
SUPPORTED_MODEL_TYPES = ("llama", "mistral")

# HF projection path (ArchSpec) -> GGUF tensor name inside blk.{i}
_PROJ_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_NORM_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


# ---- rotary layout -------------------------------------------------------------------------------
def rope_permutation(rows: int, n_heads: int) -> torch.Tensor:
    """Row order that turns HF's half-split rotary layout into GGML's interleaved pairs.

    Within each head of hd = rows/n_heads rows, HF row (half j, index k) moves to position 2k + j.
    """
    hd = rows // n_heads
    if rows % n_heads or hd % 2:
        raise SlimtuneError(f"cannot lay out {rows} rows as {n_heads} rotary heads; the head dimension must be even")
    return torch.arange(rows).reshape(n_heads, 2, hd // 2).transpose(1, 2).reshape(-1)


# ---- block packing -------------------------------------------------------------------------------
def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def pack_blocks(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, qtype: str) -> np.ndarray:
    """Pack integer codes [rows, cols] with per-block fp16 scale (and Q4_1 minimum) [rows, cols/32]
    into GGUF block bytes [rows, cols/32 · block bytes].

    Dequantised by llama.cpp (and `gguf.quants.dequantize`) as
      Q8_0  d·q,        q int8 (signed codes)
      Q4_0  d·(n - 8),  n = q + 8 in 4 bits (signed codes -8..7)
      Q4_1  d·n + m,    n = q in 4 bits (unsigned codes 0..15)
    The 4-bit nibbles of a block: byte j holds element j (low) and element j + 16 (high).
    """
    qtype = qtype.lower()
    rows, cols = codes.shape
    if cols % 32:
        raise SlimtuneError(f"a row of {cols} values does not split into GGUF blocks of 32; use a width that is a multiple of 32")
    nb = cols // 32
    q = codes.cpu().numpy().astype(np.int32).reshape(rows * nb, 32)
    d = _f16_bytes(scale.detach().float().cpu().numpy().reshape(-1))
    if d.shape[0] != rows * nb:
        raise SlimtuneError(f"{d.shape[0]} block scales for {rows * nb} blocks; the quantiser does not match this weight")
    if qtype == "q8_0":
        if q.min() < -128 or q.max() > 127:
            raise SlimtuneError("Q8_0 codes must lie in [-128, 127]; use an 8-bit symmetric spec (w8g32)")
        blocks = np.concatenate([d, q.astype(np.int8).view(np.uint8)], axis=1)
    elif qtype in ("q4_0", "q4_1"):
        n = q + 8 if qtype == "q4_0" else q
        if n.min() < 0 or n.max() > 15:
            raise SlimtuneError(f"{qtype.upper()} codes out of range; use w4g32 for Q4_0 and w4g32a for Q4_1")
        n = n.astype(np.uint8)
        nibbles = n[:, :16] | (n[:, 16:] << 4)
        parts = [d]
        if qtype == "q4_1":
            if offset is None:
                raise SlimtuneError("Q4_1 needs an offset per block; use an affine spec (w4g32a)")
            parts.append(_f16_bytes(offset.detach().float().cpu().numpy().reshape(-1)))
        parts.append(nibbles)
        blocks = np.concatenate(parts, axis=1)
    else:
        raise SlimtuneError(f"cannot pack {qtype}; use q8_0, q4_0 or q4_1")
    return np.ascontiguousarray(blocks.reshape(rows, -1))


def quantizer_blocks(w: torch.Tensor, quantizer, row_perm: torch.Tensor | None = None) -> tuple[np.ndarray, str]:
    """GGUF bytes of a projection exactly as `quantizer` fake-quantises it."""
    qtype = quantizer.spec.gguf_type
    if qtype is None:
        raise SlimtuneError(
            f"{quantizer.spec} has no GGUF block type ({quantizer.name}); use w8g32 (Q8_0), w4g32 (Q4_0) or w4g32a (Q4_1)"
        )
    if w.shape[1] % 32:
        raise SlimtuneError(f"{quantizer.name} has {w.shape[1]} input features, not a multiple of 32, so GGUF blocks cannot hold it; prune to a multiple of 32")
    codes = quantizer.codes(w.float())
    scale, offset = quantizer.qparams()
    per_block = w.shape[1] // 32 // scale.shape[1]  # groups of 64, 128 or whole rows repeat their scale
    scale = scale.repeat_interleave(per_block, dim=1)
    offset = None if offset is None else offset.repeat_interleave(per_block, dim=1)
    if row_perm is not None:
        codes, scale = codes[row_perm], scale[row_perm]
        offset = None if offset is None else offset[row_perm]
    return pack_blocks(codes, scale, offset, qtype), qtype


def _encode(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, str]:
    """(array for GGUFWriter.add_tensor, GGUF type name) for a float tensor at `dtype`."""
    import gguf

    a = t.detach().float().cpu().numpy()
    if dtype == "f32" or a.ndim == 1:
        return a.astype(np.float32), "F32"
    if dtype in BLOCK_TYPES and a.shape[-1] % 32:
        dtype = "f16"
    if dtype == "f16":
        return a.astype(np.float16), "F16"
    return gguf.quants.quantize(a, _qtype(dtype)), dtype.upper()


# ---- tokenizer -----------------------------------------------------------------------------------
def _bundled_tokenizer_fields(tokens: list[str]) -> dict | None:
    """The bundled SmolLM2 GGUF's tokenizer fields, if `tokens` is its vocabulary."""
    try:
        import gguf

        from ..models.source import bundled_gguf_path

        path = bundled_gguf_path()
    except (SlimtuneError, ImportError):
        return None
    reader = gguf.GGUFReader(path)
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None or len(field.data) != len(tokens):
        return None
    if list(field.contents()) != tokens:
        return None
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _hf_tokenizer_fields(tokenizer, vocab_size: int, pre: str) -> dict:
    """gpt2-style GGUF tokenizer fields from a Hugging Face byte-level BPE tokenizer."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SlimtuneError("GGUF export needs a fast (tokenizers) tokenizer; load it with use_fast=True")
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise SlimtuneError(f"GGUF export writes byte-level BPE tokenizers only, this one is {model.get('type')}; export a model with a BPE tokenizer")
    if model.get("byte_fallback"):
        raise SlimtuneError("sentencepiece-style BPE tokenizers (byte_fallback, e.g. Llama 2) are not supported by the GGUF exporter yet; convert with llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise SlimtuneError(f"the tokenizer has {n} tokens but the model only {vocab_size} embeddings; pass the model's own tokenizer")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = int(gguf.TokenType.NORMAL)
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        types[i] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"), ("padding", "pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = int(value)
    for key in ("add_bos_token", "add_eos_token"):
        value = getattr(tokenizer, key, None)
        if isinstance(value, bool):
            fields[f"tokenizer.ggml.{key}"] = value
    return fields


def tokenizer_fields(tokenizer, vocab_size: int, pre: str | None = None) -> dict:
    """All `tokenizer.*` GGUF fields for `tokenizer` (bundled metadata when it is the bundled one)."""
    fields = None
    if pre is None:
        vocab = tokenizer.get_vocab()
        if len(vocab) == vocab_size:
            by_id = sorted(vocab.items(), key=lambda kv: kv[1])
            if [i for _, i in by_id] == list(range(vocab_size)):
                fields = _bundled_tokenizer_fields([t for t, _ in by_id])
    if fields is None:
        fields = _hf_tokenizer_fields(tokenizer, vocab_size, pre or "default")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        fields["tokenizer.chat_template"] = template
    return fields


def _write_tokenizer(writer, fields: dict) -> None:
    w = writer
    setters = {
        "tokenizer.ggml.model": w.add_tokenizer_model,
        "tokenizer.ggml.pre": w.add_tokenizer_pre,
        "tokenizer.ggml.tokens": w.add_token_list,
        "tokenizer.ggml.token_type": w.add_token_types,
        "tokenizer.ggml.merges": w.add_token_merges,
        "tokenizer.ggml.bos_token_id": w.add_bos_token_id,
        "tokenizer.ggml.eos_token_id": w.add_eos_token_id,
        "tokenizer.ggml.unknown_token_id": w.add_unk_token_id,
        "tokenizer.ggml.padding_token_id": w.add_pad_token_id,
        "tokenizer.ggml.add_bos_token": w.add_add_bos_token,
        "tokenizer.ggml.add_eos_token": w.add_add_eos_token,
        "tokenizer.ggml.add_space_prefix": w.add_add_space_prefix,
        "tokenizer.chat_template": w.add_chat_template,
    }
    for key, value in fields.items():
        if key in setters:
            setters[key](value)


# ---- hyperparameters -----------------------------------------------------------------------------
def _rope_settings(config, head_dim: int) -> tuple[float, str, dict]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict):
        params = {**legacy, **params}
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    return theta, kind, params


def _llama3_rope_factors(config, head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors for GGML's rope_freqs tensor: default inv_freq / llama3 inv_freq."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    return (default / llama3.float()).numpy().astype(np.float32)


def _layer_shapes(root: nn.Module, spec) -> list[dict]:
    hd = spec.head_dim(root.config)
    return [
        {"num_heads": spec.num_heads(layer, hd), "num_kv_heads": spec.num_kv_heads(layer, hd), "intermediate": spec.intermediate(layer)}
        for layer in spec.decoder_layers(root)
    ]


def _file_type(proj_type: str) -> int:
    import gguf

    return {
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "BF16": gguf.LlamaFileType.MOSTLY_BF16,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    }[proj_type]


# ---- the exporter --------------------------------------------------------------------------------
def _check_model(root: nn.Module) -> None:
    """What the exporter cannot write, read off the config: the architecture, the head size, the rope."""
    config = root.config
    model_type = base_model_type(getattr(config, "model_type", "") or "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SlimtuneError(f"GGUF export supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not {model_type}; save a Hugging Face directory instead (--export hf)")
    hd = get_arch(root).head_dim(config)
    if hd % 2:
        raise SlimtuneError(f"GGUF's rotary layout needs an even head dimension, this model's is {hd}; save a Hugging Face directory instead (--export hf)")
    _, rope_kind, _ = _rope_settings(config, hd)
    if rope_kind not in ("default", "linear", "llama3"):
        raise SlimtuneError(f"rope scaling '{rope_kind}' is not supported by the GGUF exporter (supported: default, linear, llama3); save a Hugging Face directory instead (--export hf)")


def check_gguf(model: nn.Module, tokenizer=None, pre: str | None = None) -> None:
    """Refuse, without writing anything, what `export_gguf` would refuse about this model and its
    tokenizer (architecture, head size, rope scaling, tokenizer type): call it before training."""
    root = unwrap(model)
    _check_model(root)
    if tokenizer is not None:
        tokenizer_fields(tokenizer, root.get_input_embeddings().weight.shape[0], pre)


def export_gguf(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike,
    dtype: str = "f16",
    quantizers=None,
    embed_dtype: str | None = None,
    name: str | None = None,
    pre: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Write `model` (a Llama/Mistral *ForCausalLM, shrunk or not, LoRA merged) and `tokenizer` to
    the GGUF file `path`. Returns a report: architecture, per-layer shapes, tensor types, fallbacks."""
    import gguf

    dtype = str(dtype).lower()
    if dtype not in GGUF_DTYPES:
        raise SlimtuneError(f"unknown GGUF type '{dtype}'; choose one of {', '.join(GGUF_DTYPES)}")
    path = check_writable_parent(path)
    if path.suffix != ".gguf":
        raise SlimtuneError(f"GGUF output {path} should end in .gguf; pass a file name like model.gguf")
    if path.exists() and not overwrite:
        raise SlimtuneError(f"{path} exists; pass --overwrite or choose another file name")
    root = unwrap(model)
    if any(hasattr(m, "lora_A") for m in root.modules()):
        raise SlimtuneError("the model still has LoRA adapters; merge them first (merge_keep_masks) and export the merged model")
    config = root.config
    _check_model(root)
    spec = get_arch(root)
    layers = spec.decoder_layers(root)
    hd = spec.head_dim(config)
    shapes = _layer_shapes(root, spec)
    uniform = all(s == shapes[0] for s in shapes)
    arch = "llama" if uniform else "deci"
    qmap = quantizers.as_dict() if hasattr(quantizers, "as_dict") else dict(quantizers or {})
    for key, q in qmap.items():
        if q.spec.gguf_type is None:
            raise SlimtuneError(f"{q.spec} has no GGUF block type ({q.name or key}); use w8g32 (Q8_0), w4g32 (Q4_0) or w4g32a (Q4_1)")
    proj_types = {q.spec.gguf_type for q in qmap.values()} or {dtype.upper()}
    main_type = sorted(proj_types)[0] if len(proj_types) == 1 else "F16"
    if embed_dtype is None:
        embed_dtype = "q8_0" if main_type.lower() in BLOCK_TYPES else (dtype if dtype in FLOAT_TYPES else "f16")
    embed_dtype = embed_dtype.lower()
    if embed_dtype not in GGUF_DTYPES:
        raise SlimtuneError(f"unknown GGUF type '{embed_dtype}' for the embeddings; choose one of {', '.join(GGUF_DTYPES)}")

    embed = root.get_input_embeddings().weight
    vocab_size = embed.shape[0]
    fields = tokenizer_fields(tokenizer, vocab_size, pre) if tokenizer is not None else None
    theta, rope_kind, rope_params = _rope_settings(config, hd)

    report = {"path": str(path), "architecture": arch, "layers": shapes, "tensors": {}, "fallback_f16": []}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type("model")
        writer.add_name(name or Path(str(getattr(config, "name_or_path", "") or "model")).name or "model")
        writer.add_vocab_size(vocab_size)
        writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(len(layers))
        if uniform:
            writer.add_feed_forward_length(shapes[0]["intermediate"])
            writer.add_head_count(shapes[0]["num_heads"])
            writer.add_head_count_kv(shapes[0]["num_kv_heads"])
        else:
            writer.add_feed_forward_length([s["intermediate"] for s in shapes])
            writer.add_head_count([s["num_heads"] for s in shapes])
            writer.add_head_count_kv([s["num_kv_heads"] for s in shapes])
        writer.add_key_length(hd)
        writer.add_value_length(hd)
        writer.add_rope_dimension_count(hd)
        writer.add_rope_freq_base(theta)
        if rope_kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope_params["factor"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_file_type(_file_type(main_type))
        if any(t.lower() in BLOCK_TYPES for t in proj_types | {embed_dtype.upper()}):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if fields is not None:
            _write_tokenizer(writer, fields)

        def add(name_: str, data: np.ndarray, qtype: str) -> None:
            if qtype in ("F32", "F16"):
                writer.add_tensor(name_, data)
            else:
                writer.add_tensor(name_, data, raw_dtype=_qtype(qtype))
            report["tensors"][name_] = qtype

        def add_float(name_: str, t: torch.Tensor, dtype_: str) -> None:
            data, qtype = _encode(t, dtype_)
            if dtype_ in BLOCK_TYPES and qtype == "F16":
                report["fallback_f16"].append(name_)
            add(name_, data, qtype)

        add_float("token_embd.weight", embed, embed_dtype)
        if rope_kind == "llama3":
            add("rope_freqs.weight", _llama3_rope_factors(config, hd, theta), "F32")
        for i, (layer, shape) in enumerate(zip(layers, shapes)):
            for hf, gg in _NORM_NAMES.items():
                add(f"blk.{i}.{gg}.weight", layer.get_submodule(hf).weight.detach().float().cpu().numpy(), "F32")
            for path_, gg in _PROJ_NAMES.items():
                lin = layer.get_submodule(path_)
                perm = None
                if path_ == spec.q:
                    perm = rope_permutation(lin.out_features, shape["num_heads"])
                elif path_ == spec.k:
                    perm = rope_permutation(lin.out_features, shape["num_kv_heads"])
                w = lin.weight.detach()
                q = qmap.get((i, path_))
                if q is not None:
                    data, qtype = quantizer_blocks(w, q, perm)
                    add(f"blk.{i}.{gg}.weight", data, qtype)
                else:
                    add_float(f"blk.{i}.{gg}.weight", w if perm is None else w[perm], dtype)
                if lin.bias is not None:
                    b = lin.bias.detach()
                    add(f"blk.{i}.{gg}.bias", (b if perm is None else b[perm]).float().cpu().numpy(), "F32")
        add("output_norm.weight", root.model.norm.weight.detach().float().cpu().numpy(), "F32")
        head = root.get_output_embeddings()
        tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
        if head is not None and not tied:
            add_float("output.weight", head.weight, embed_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    report["bytes"] = path.stat().st_size
    report["bits_per_weight"] = 8.0 * report["bytes"] / max(1, sum(p.numel() for p in root.parameters()))
    return report


# ---- reading back --------------------------------------------------------------------------------
def gguf_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Dequantise a GGUF written by `export_gguf` back to HF Llama names and layouts (q/k rows
    un-permuted). Returns (state dict in float32, per-layer shapes and metadata)."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()

    def kv(key):
        f = reader.fields.get(f"{arch}.{key}")
        return None if f is None else f.contents()

    n_layers = int(kv("block_count"))

    def per_layer(value):
        return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n_layers

    heads, kv_heads, ffn = per_layer(kv("attention.head_count")), per_layer(kv("attention.head_count_kv")), per_layer(kv("feed_forward_length"))
    reverse = {v: k for k, v in _PROJ_NAMES.items()}
    reverse.update({v: k for k, v in _NORM_NAMES.items()})
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        w = torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))
        parts = t.name.split(".")
        if parts[0] == "blk":
            i, kind, suffix = int(parts[1]), parts[2], parts[3]
            hf = reverse[kind]
            if kind in ("attn_q", "attn_k"):
                n = heads[i] if kind == "attn_q" else kv_heads[i]
                w = w[torch.argsort(rope_permutation(w.shape[0], n))]
            state[f"model.layers.{i}.{hf}.{suffix}"] = w
        elif t.name == "token_embd.weight":
            state["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            state["model.norm.weight"] = w
        elif t.name == "output.weight":
            state["lm_head.weight"] = w
    meta = {"architecture": arch, "num_heads": heads, "num_kv_heads": kv_heads, "intermediate": ffn, "types": {t.name: t.tensor_type.name for t in reader.tensors}}
    return state, meta


def expected_bits(dtype: str) -> float:
    """Bits per weight of a GGUF type (block scales included)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[_qtype(dtype)]
    return 8.0 * size / block


__all__ = ["BLOCK_TYPES", "FLOAT_TYPES", "GGUF_DTYPES", "check_gguf", "export_gguf", "expected_bits", "gguf_state_dict", "pack_blocks", "quantizer_blocks", "rope_permutation", "tokenizer_fields"]
