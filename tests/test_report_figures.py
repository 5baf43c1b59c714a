"""The report's figures mean what they say: units, token counts, spread and load, plots worth drawing."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.evaluate import evaluate_model, markdown_table
from slimtune.evaluate import summary as summary_module
from slimtune.evaluate.prune_report import render_markdown, write_report
from slimtune.evaluate.report import curves_figure, ema, kept_units_differ, mask_update_steps

DENSE = {"perplexity": 20.0, "params_decoder": 4e6, "params_total": 6e6, "size_mb": 24.0, "prefill_ms": 10.0,
         "prefill_ms_min": 9.5, "prefill_ms_max": 12.25, "decode_tok_s": 50.0, "peak_memory_mb": 100.0,
         "load_avg_1m": 0.5,
         "details": {"perplexity": {"windows": 4, "seq_len": 16, "tokens": 60}}}
PRUNED = dict(DENSE, perplexity=25.0, size_mb=20.0, load_avg_1m=3.25)


def layer(i, heads=3, channels=96, removed=False):
    return {"layer": i, "heads_kept": heads, "heads_total": 4, "kv_heads_kept": 1, "channels_kept": channels,
            "channels_total": 128, "removed": removed}


def report(per_layer, history=()):
    return {
        "command": "slimtune prune", "before": DENSE, "after": PRUNED, "history": list(history),
        "job": {"model": "m", "data": "wiki", "criterion": "taylor",
                "prune": {"granularity": "heads", "head_mode": "q", "ranking": "local", "nm": None}},
        "sparsity": {"target": 0.3, "achieved": 0.3, "decoder_params_before": 100, "decoder_params_after": 70},
        "importance_skipped_updates": 0, "per_layer": per_layer,
    }


def test_memory_is_labelled_mib():
    md = markdown_table({"dense": DENSE, "pruned": PRUNED})
    assert "| size (MiB) | 24.0 | 20.0 | 0.833 |" in md
    assert "| peak memory (MiB) |" in md and "(MB)" not in md


def test_timings_show_their_spread_and_the_machine_load():
    md = markdown_table({"dense": DENSE, "pruned": PRUNED})
    assert "| prefill (ms) | 10.0 [9.5-12.2] | 10.0 [9.5-12.2] | 1.000 |" in md
    assert "| load average (1 min) | 0.50 | 3.25 | - |" in md  # a ratio of loads means nothing
    old = {k: v for k, v in DENSE.items() if not k.startswith(("load", "prefill_ms_"))}
    md = markdown_table({"old": old})
    assert "load average" not in md and "| prefill (ms) | 10.0 |" in md  # reports saved before this still render


def test_report_says_how_many_tokens_the_perplexity_is_based_on():
    md = render_markdown(report([layer(0), layer(1)]))
    assert "4 windows x 16 tokens" in md and "60 predicted tokens" in md
    assert "MiB" in md and "warm-up" in md


def test_kept_units_plot_only_when_layers_differ(tmp_path):
    uniform = [layer(0), layer(1)]  # local ranking: every layer keeps the same counts
    assert not kept_units_differ(uniform)
    assert "kept_units.png" not in render_markdown(report(uniform))
    write_report(tmp_path / "u", report(uniform))
    assert (tmp_path / "u" / "report.md").is_file() and not (tmp_path / "u" / "kept_units.png").exists()

    for differing in ([layer(0), layer(1, channels=64)], [layer(0), layer(1, 0, 0, removed=True)]):
        assert kept_units_differ(differing)
        assert "![kept units](kept_units.png)" in render_markdown(report(differing))
    write_report(tmp_path / "d", report(differing))
    assert (tmp_path / "d" / "kept_units.png").stat().st_size > 1000


def test_ema_smooths_and_starts_at_the_data():
    assert ema([2.0, 2.0, 2.0], span=5) == pytest.approx([2.0, 2.0, 2.0])
    noisy = [1.0 if i % 2 else 3.0 for i in range(40)]
    smooth = ema(noisy, span=9)
    assert smooth[0] == pytest.approx(3.0) and max(smooth[20:]) - min(smooth[20:]) < 0.5


def test_curves_show_smoothed_loss_mask_updates_and_validation_loss():
    history = [{"step": i, "loss": 3.0 - 0.01 * i + (0.3 if i % 2 else 0.0), "sparsity": 0.003 * i}
               for i in range(1, 101)]
    for row in history[9::10]:
        row["achieved"] = row["sparsity"]
    for row in history[24::25]:
        row["val_loss"] = row["loss"] - 0.1
    assert mask_update_steps(history) == list(range(10, 101, 10))
    fig = curves_figure(history)
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert "loss" in labels and any(lbl.startswith("loss (EMA") for lbl in labels)
    assert "validation loss" in labels and "mask update" in labels and "mask update (achieved)" in labels
    val = next(line for ax in fig.axes for line in ax.get_lines() if line.get_label() == "validation loss")
    assert list(val.get_xdata()) == [25, 50, 75, 100]


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_memory_is_measured_after_a_warm_up_and_timings_record_load(monkeypatch):
    """The dense model (weights still paged in from disk on first use) and the pruned one (resident)
    are measured alike: the model has run before the peak-memory window opens."""
    model = tiny_llama()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    seen_at_start = []
    real_track = summary_module.track_peak_memory

    @contextlib.contextmanager
    def spy(device):
        seen_at_start.append(len(calls))
        with real_track(device) as stats:
            yield stats

    monkeypatch.setattr(summary_module, "track_peak_memory", spy)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    result = evaluate_model(model, tokens, latency_repeats=3, decode_tokens=2, progress=False)
    assert seen_at_start and seen_at_start[0] >= 1
    assert result["prefill_ms_min"] <= result["prefill_ms"] <= result["prefill_ms_max"]
    assert result["decode_tok_s_min"] <= result["decode_tok_s"] <= result["decode_tok_s_max"]
    assert result["load_avg_1m"] >= 0 and len(result["details"]["prefill"]["load_avg"]) == 3
    assert "warm-up" in result["details"]["memory"]["method"]
