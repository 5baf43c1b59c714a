"""load_model fails before the work with one line for broken or unreachable models (no network)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.errors import SlimtuneError
from slimtune.export import save_model, shrink_
from slimtune.masking.structured import StructuredMasks
from slimtune.models.source import load_model
from tests.conftest import ByteTokenizerFactory


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_model(tiny_llama(), tmp_path_factory.mktemp("m") / "model", tokenizer=ByteTokenizerFactory.make())


def copy_of(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "copy")


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_truncated_weights_name_the_file(saved, tmp_path):
    model_dir = copy_of(saved, tmp_path)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted copy
    with pytest.raises(SlimtuneError, match="corrupt or truncated") as err:
        load_model(str(model_dir))
    assert str(weights) in one_line(err)


def test_invalid_config_json_says_where(saved, tmp_path):
    model_dir = copy_of(saved, tmp_path)
    config = model_dir / "config.json"
    lines = config.read_text().splitlines()
    lines[2] += ",,"
    config.write_text("\n".join(lines))
    with pytest.raises(SlimtuneError, match="not valid JSON") as err:
        load_model(str(model_dir))
    message = one_line(err)
    assert str(config) in message and "line 3" in message and "hub" not in message


def test_offline_hub_id_fails_fast_without_retries(monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(SlimtuneError, match="offline") as err:
        load_model("slimtune-tests/no-such-model")
    assert time.perf_counter() - t0 < 10
    assert "slimtune-tests/no-such-model" in one_line(err)
    out, errs = capfd.readouterr()
    assert "Retry" not in out + errs


def test_unreachable_hub_is_one_quick_attempt(monkeypatch, capfd):
    import huggingface_hub
    import transformers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("transformers would retry five times")

    monkeypatch.setattr(huggingface_hub, "file_exists", no_network)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", must_not_be_called)
    with pytest.raises(SlimtuneError, match="cannot reach the Hugging Face hub") as err:
        load_model("slimtune-tests/no-such-model")
    one_line(err)
    monkeypatch.setattr(huggingface_hub, "file_exists", lambda *a, **k: False)
    with pytest.raises(SlimtuneError, match="no model 'slimtune-tests/no-such-model' on the Hugging Face hub"):
        load_model("slimtune-tests/no-such-model")


def test_custom_code_is_refused_without_a_prompt(saved, tmp_path, capfd):
    import json

    model_dir = copy_of(saved, tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="someone_custom", auto_map={"AutoConfig": "modeling_x.XConfig"})
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlimtuneError, match="custom code") as err:
        load_model(str(model_dir))
    one_line(err)
    out, errs = capfd.readouterr()
    assert "Do you wish to run the custom code" not in out + errs


def test_non_uniform_model_and_tokenizer_load_without_a_prompt(tmp_path):
    """A per-layer (auto_map) model loads in a fresh process with stdin closed: no question asked."""
    model = tiny_llama()
    masks = StructuredMasks(model)
    channels = torch.ones(48)
    channels[:8] = 0
    masks.set(0, channels=channels)  # layer 0 narrower than layer 1
    shrink_(model, masks)
    out = save_model(model, tmp_path / "nu", tokenizer=ByteTokenizerFactory.make())
    assert "auto_map" in (out / "config.json").read_text()
    code = (
        "from slimtune.models.source import load_model\n"
        f"model, tok = load_model({str(out)!r})\n"
        "print(type(model).__name__, type(tok).__name__)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "SlimLlamaForCausalLM" in run.stdout
    assert "Do you wish to run the custom code" not in run.stdout + run.stderr
