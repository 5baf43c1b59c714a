"""Slow tests on the bundled real model (SmolLM2-135M-Instruct) and Wikipedia sample."""

import json

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundled():
    from slimtune.models import load_model

    return load_model("default")


def test_bundled_model_shape_and_perplexity(bundled):
    from slimtune.data import load_tokens
    from slimtune.evaluate import perplexity
    from slimtune.models import get_arch

    model, tok = bundled
    spec = get_arch(model)
    layers = spec.decoder_layers(model)
    assert len(layers) == 30
    assert spec.num_heads(layers[0], 64) == 9 and spec.num_kv_heads(layers[0], 64) == 3
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tokens = load_tokens("wiki", tok, "test", 256, max_sequences=8)
    ppl = perplexity(model, tokens, progress=False)["perplexity"]
    # measured 24.97 on 16 evenly spaced test windows (README); a broken load gives thousands
    assert 12 < ppl < 45


def test_prune_bundled_end_to_end(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from slimtune.cli import main

    out = tmp_path / "pruned"
    code = main(["prune", "--out", str(out), "--steps", "3", "--batch-size", "1", "--seq-len", "128", "--eval-windows", "2",
                 "--latency-seq-len", "32", "--latency-repeats", "1", "--decode-tokens", "2", "--sparsity", "0.2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["achieved"] == pytest.approx(0.2, abs=0.01)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) < 134_515_008 * 0.86
    assert report["reload_max_abs_diff"] < 1e-3
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
