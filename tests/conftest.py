"""Tiny random models built in-process (no network): GQA Llama, Qwen2, Mistral, Qwen3 and OPT."""

from __future__ import annotations

import pytest
import torch

COMMON = dict(hidden_size=96, num_hidden_layers=4, vocab_size=96, max_position_embeddings=128)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    import transformers as tf

    torch.manual_seed(seed)
    if family == "opt":
        cfg = dict(COMMON, num_attention_heads=4, ffn_dim=96, word_embed_proj_dim=96, do_layer_norm_before=True)
        cfg.update(overrides)
        model = tf.OPTForCausalLM(tf.OPTConfig(**cfg))
    else:
        cfg = dict(COMMON, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
        cfg.update(overrides)
        config_cls, model_cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
            "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        }[family]
        model = model_cls(config_cls(**cfg))
    # random weights of a realistic scale, so pruning decisions are not all ties
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return model.eval()


FAMILIES = ["llama", "qwen2", "mistral", "qwen3", "opt"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (2, 12), generator=g)


class ByteTokenizerFactory:
    """A tiny real fast tokenizer (WordLevel over bytes-ish chars) for data/CLI tests."""

    @staticmethod
    def make(vocab_size: int = 96):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        chars = [chr(c) for c in range(32, 32 + vocab_size - 2)]
        vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizerFactory.make()
