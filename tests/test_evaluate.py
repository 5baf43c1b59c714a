"""Tests for slimtune.evaluate on a tiny random Llama (no network)."""

import math
import time

import pytest
import torch
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.errors import SlimtuneError
from slimtune.evaluate import (
    count_parameters,
    decode_throughput,
    dir_size_bytes,
    evaluate_model,
    greedy_decode,
    markdown_table,
    model_size_bytes,
    peak_memory,
    perplexity,
    plot_curves,
    plot_kept_units,
    prefill_latency,
    print_results,
    results_table,
    write_json,
)

VOCAB = 128


def tiny_llama(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # q/o 96, k/v 48: no width equals hidden (64) or intermediate (128)
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def windows(n: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def test_perplexity_matches_hf_labels_loss(model):
    tokens = windows(1, 32)
    with torch.no_grad():
        loss = model(input_ids=tokens, labels=tokens).loss.item()
    result = perplexity(model, tokens, progress=False)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["nll"] == pytest.approx(loss, rel=1e-5)
    assert (result["tokens"], result["windows"], result["seq_len"]) == (31, 1, 32)


def test_uniform_logits_give_vocab_size():
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    result = perplexity(model, windows(3, 16), progress=False)
    assert result["perplexity"] == pytest.approx(VOCAB, rel=1e-5)


def test_batch_size_does_not_change_result(model):
    tokens = windows(5, 24)  # 5 windows: batches of 3 leave a short last batch
    one = perplexity(model, tokens, batch_size=1, progress=False)
    three = perplexity(model, tokens, batch_size=3, progress=False)
    assert one["perplexity"] == pytest.approx(three["perplexity"], rel=1e-5)
    assert one["tokens"] == three["tokens"] == 5 * 23


def test_non_finite_loss_is_reported_not_raised():
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    assert math.isnan(perplexity(model, windows(1, 8), progress=False)["perplexity"])


def test_perplexity_rejects_bad_tokens(model):
    with pytest.raises(SlimtuneError):
        perplexity(model, torch.zeros(8, dtype=torch.long), progress=False)


def test_perplexity_restores_training_flag(model):
    model.train()
    perplexity(model, windows(1, 8), progress=False)
    assert model.training
    model.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_count_parameters(tied):
    model = tiny_llama(tied=tied)
    layers = model.model.layers
    counts = count_parameters(model, layers)
    decoder = sum(p.numel() for p in layers.parameters())
    embed = VOCAB * 64
    outside = embed + 64 + (0 if tied else embed)  # embeddings, final norm, lm_head when untied
    assert counts["decoder"] == decoder
    assert counts["total"] == decoder + outside
    assert counts["embedding_and_head"] == outside
    assert count_parameters(model)["decoder"] is None


def test_model_and_dir_size(tmp_path):
    untied, tied = tiny_llama(), tiny_llama(tied=True)
    assert model_size_bytes(untied) - model_size_bytes(tied) == VOCAB * 64 * 4
    assert model_size_bytes(untied.to(torch.bfloat16)) < model_size_bytes(tied)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 20)
    (tmp_path / "config.json").write_text("{}")
    assert dir_size_bytes(tmp_path) == 120
    with pytest.raises(SlimtuneError):
        dir_size_bytes(tmp_path / "missing")


def test_prefill_latency(model):
    result = prefill_latency(model, seq_len=16, repeats=3)
    assert result["median_ms"] > 0
    assert len(result["samples_ms"]) == 3
    assert result["min_ms"] <= result["median_ms"] <= result["max_ms"]


def test_decode_throughput(model):
    result = decode_throughput(model, prompt_len=8, new_tokens=4, repeats=2)
    assert result["median_tok_s"] > 0 and result["median_ms_per_token"] > 0
    assert len(result["samples_tok_s"]) == 2


def test_greedy_decode_with_cache_matches_full_forward(model):
    prompt = windows(1, 8)
    with torch.inference_mode():
        ids, seconds = greedy_decode(model, prompt, new_tokens=5)
        full = torch.cat([prompt, ids], dim=1)
        logits = model(input_ids=full[:, :-1], use_cache=False).logits
    assert ids.shape == (1, 6) and seconds > 0
    assert torch.equal(logits[0, 7:].argmax(-1), ids[0])


def test_peak_memory_sees_a_large_allocation():
    def allocate():
        t = torch.ones(50 * 2**20)  # 200 MB of fp32, touched
        time.sleep(0.05)
        return float(t[-1])

    _, noop = peak_memory(lambda: None)
    result, big = peak_memory(allocate)
    assert result == 1.0
    assert big["device"] == "cpu"
    assert big["peak_delta_mb"] > noop["peak_delta_mb"] + 100
    assert big["peak_rss_mb"] >= big["baseline_rss_mb"]


def test_evaluate_model_keys(model):
    result = evaluate_model(
        model,
        windows(2, 16),
        decoder_layers=model.model.layers,
        latency_repeats=1,
        decode_tokens=2,
        progress=False,
    )
    for key in (
        "perplexity",
        "nll",
        "eval_tokens",
        "params_total",
        "params_decoder",
        "size_mb",
        "prefill_ms",
        "decode_tok_s",
        "peak_memory_mb",
        "device",
        "dtype",
        "torch_threads",
        "details",
    ):
        assert key in result
    assert result["eval_tokens"] == 30 and result["dtype"] == "float32" and result["device"] == "cpu"
    skipped = evaluate_model(model, windows(1, 8), latency_repeats=0, decode_tokens=0, progress=False)
    assert skipped["prefill_ms"] is None and skipped["decode_tok_s"] is None


ROWS = {
    "dense": {
        "perplexity": 20.0,
        "params_decoder": 4_000_000,
        "params_total": 6_000_000,
        "size_mb": 24.0,
        "prefill_ms": 10.0,
        "decode_tok_s": 50.0,
        "peak_memory_mb": 100.0,
    },
    "pruned": {
        "perplexity": 25.0,
        "params_decoder": 3_000_000,
        "params_total": 5_000_000,
        "size_mb": 20.0,
        "prefill_ms": 8.0,
        "decode_tok_s": 60.0,
        "peak_memory_mb": None,
    },
}


def test_tables_contain_values(tmp_path):
    md = markdown_table(ROWS)
    assert md.splitlines()[0] == "| metric | dense | pruned | pruned/dense |"
    for text in ("20.000", "25.000", "1.250", "4.00", "3.00", "0.750", "24.0", "60.0", "1.200"):
        assert text in md
    assert "| peak memory (MiB) | 100.0 | - | - |" in md
    table = results_table(ROWS)
    assert [c.header for c in table.columns] == ["metric", "dense", "pruned", "pruned/dense"]
    console = Console(record=True, width=120)
    print_results(ROWS, console=console)
    assert "25.000" in console.export_text()
    assert "pruned/dense" not in markdown_table({"only": ROWS["dense"]})
    path = write_json(tmp_path / "out" / "results.json", {"ppl": torch.tensor(2.5)})
    assert path.read_text().strip() == '{\n  "ppl": 2.5\n}'


def is_png(path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path):
    history = [{"step": i, "loss": 3.0 - 0.1 * i, "sparsity": 0.02 * i} for i in range(10)]
    history.append({"step": 10, "loss": 2.0})  # no sparsity on this entry
    assert is_png(plot_curves(history, tmp_path / "curves.png"))
    assert is_png(plot_curves([{"loss": 1.0}], tmp_path / "only_loss.png"))
    per_layer = [
        {
            "layer": 0,
            "heads_kept": 3,
            "heads_total": 4,
            "channels_kept": 96,
            "channels_total": 128,
            "removed": False,
        },
        {
            "layer": 1,
            "heads_kept": 0,
            "heads_total": 4,
            "channels_kept": 0,
            "channels_total": 128,
            "removed": True,
        },
    ]
    assert is_png(plot_kept_units(per_layer, tmp_path / "kept.png"))
    assert not list(tmp_path.glob(".*.tmp"))
