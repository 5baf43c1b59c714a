"""Tiny random models built in-process (no network): GQA Llama, Qwen2, Mistral, Qwen3 and OPT."""

from __future__ import annotations

import pytest
import torch

# Every width differs, so a projection sliced along the wrong axis (a swapped [out, in]) cannot
# go unnoticed. Llama-likes: hidden 72, 6 query heads x head_dim 16 = 96 (q rows, o columns), 2 KV
# heads -> 32 (k/v rows), intermediate 80 (Llama requires hidden % heads == 0, hence 72, not 64;
# the stock head_dim hidden/heads = 12 differs from the real 16 as well). OPT needs
# hidden = heads x head_dim: hidden 64 = 4 heads x 16, ffn 80. The vocabulary, 112, differs too;
# tests draw tokens from [0, 96), which it covers.
HIDDEN, OPT_HIDDEN, INTERMEDIATE, VOCAB = 72, 64, 80, 112
LLAMA_SHAPE = dict(hidden_size=HIDDEN, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
OPT_SHAPE = dict(hidden_size=OPT_HIDDEN, num_attention_heads=4, word_embed_proj_dim=OPT_HIDDEN)
COMMON = dict(num_hidden_layers=4, vocab_size=VOCAB, max_position_embeddings=128)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    import transformers as tf

    torch.manual_seed(seed)
    if family == "opt":
        cfg = dict(COMMON, **OPT_SHAPE, ffn_dim=INTERMEDIATE, do_layer_norm_before=True)
        cfg.update(overrides)
        model = tf.OPTForCausalLM(tf.OPTConfig(**cfg))
    else:
        cfg = dict(COMMON, intermediate_size=INTERMEDIATE, **LLAMA_SHAPE)
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


CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, this is slimtune", "pruning and quantisation of language models"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def interrupt_training_at(monkeypatch, n: int):
    """Make the n-th `Trainer.train_step` call raise KeyboardInterrupt (a kill mid-run). Returns a
    callable that puts the real step back, for the resume that follows."""
    from slimtune.training.loop import Trainer

    real, calls = Trainer.train_step, {"n": 0}

    def dying(self):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", dying)
    return lambda: monkeypatch.setattr(Trainer, "train_step", real)


HOST_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


def count_host_reads(monkeypatch) -> list[str]:
    """Record every Python-level read of a tensor back to the host (the names in HOST_READS) in the
    returned list until `monkeypatch.undo()`. C++-internal syncs (boolean indexing) are not seen."""
    reads: list[str] = []

    def counting(name, original):
        def counted(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)

        return counted

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    return reads


# ---- small CLI runs --------------------------------------------------------------------------------
FAST_CLI = ["--seq-len", "16", "--eval-windows", "2", "--latency-seq-len", "8", "--latency-repeats", "1", "--decode-tokens", "2", "--quiet"]


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    """(model dir, corpus file): a 4-layer tiny Llama with a byte tokenizer, and 60 short paragraphs."""
    root = tmp_path_factory.mktemp("cli")
    tiny_model("llama", num_hidden_layers=4, vocab_size=96).save_pretrained(root / "tiny")
    ByteTokenizerFactory.make(96).save_pretrained(root / "tiny")
    paras = [f"Paragraph {i} talks about topic {i % 7} with some words and numbers {i * 13}." * 3 for i in range(60)]
    (root / "corpus.txt").write_text("\n\n".join(paras))
    return root / "tiny", root / "corpus.txt"


def run_prune_cli(capsys, inputs, out, *args):
    """`slimtune prune` of `cli_inputs` into `out`, micro-batch 2, with FAST_CLI; returns (exit code, stderr)."""
    from slimtune.cli import main

    model, data = inputs
    code = main([str(a) for a in ("prune", "--model", model, "--data", data, "--out", out, "--batch-size", "2", *args, *FAST_CLI)])
    return code, capsys.readouterr().err


def assert_same_safetensors(a, b) -> None:
    """The two files hold the same tensor names with bitwise equal values."""
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{a} and {b} differ"
