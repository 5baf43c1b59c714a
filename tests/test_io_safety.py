"""Saving never loses a user's data: atomic replace, overwrite rules, permissions (no network)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.errors import SlimtuneError
from slimtune.export import save_model
from slimtune.io import MARKER, atomic_directory, atomic_write_text, check_output_dir


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def test_failed_second_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_text("previous run")
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new directory into place
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(SlimtuneError, match="disk full"):
        with atomic_directory(out) as tmp:
            (tmp / "weights.bin").write_text("new run")
    assert (out / "weights.bin").read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old-<pid>, no .partial left


def test_a_regular_file_is_refused_with_or_without_overwrite(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(SlimtuneError, match="is a file, not a directory") as err:
            check_output_dir(target, overwrite=overwrite, protected=[])
        assert "\n" not in str(err.value)
    with pytest.raises(SlimtuneError, match="is a file"):
        save_model(tiny_llama(), target, overwrite=True)
    assert target.read_text() == "mine"


def test_the_input_model_and_data_are_protected(tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / MARKER).write_text("{}")  # even a slimtune-written input is not replaced by its own output
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text('{"text": "x"}\n')
    protected = [str(model_dir), str(data), "HuggingFaceTB/SmolLM2-135M", None]  # hub ids are skipped
    cases = {model_dir: "is the input", tmp_path / "my-model" / "pruned": "is inside the input",
             tmp_path: "contains the input", data.parent: "contains the input"}
    for out, relation in cases.items():
        with pytest.raises(SlimtuneError, match=relation):
            check_output_dir(out, overwrite=True, protected=protected)
    # the same directory spelled differently is still the same directory
    with pytest.raises(SlimtuneError, match="is the input"):
        check_output_dir(tmp_path / "data" / ".." / "my-model", overwrite=True, protected=protected)
    assert (model_dir / "config.json").read_text() == "{}"
    assert check_output_dir(tmp_path / "elsewhere", overwrite=False, protected=protected) == tmp_path / "elsewhere"


def test_overwrite_replaces_only_what_slimtune_wrote(tmp_path):
    out = save_model(tiny_llama(), tmp_path / "pruned")
    marker = json.loads((out / MARKER).read_text())
    assert marker["written_by"] == "slimtune" and marker["version"] and marker["date"]
    with pytest.raises(SlimtuneError, match="pass --overwrite"):
        check_output_dir(out, overwrite=False, protected=[])
    assert check_output_dir(out, overwrite=True, protected=[]) == out
    save_model(tiny_llama(), out, overwrite=True)

    reported = tmp_path / "old-run"  # written before the marker existed: its report says who wrote it
    reported.mkdir()
    (reported / "report.json").write_text(json.dumps({"command": "slimtune prune", "job": {}, "sparsity": {}}))
    assert check_output_dir(reported, overwrite=True, protected=[]) == reported

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_text("meow")
    for overwrite in (False, True):
        with pytest.raises(SlimtuneError, match="slimtune did not write it") as err:
            check_output_dir(foreign, overwrite=overwrite, protected=[])
        assert "pass --overwrite" not in str(err.value)
    with pytest.raises(SlimtuneError, match="did not write it"):
        save_model(tiny_llama(), foreign, overwrite=True)
    assert (foreign / "cat.jpg").read_text() == "meow"
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", overwrite=False, protected=[]) == tmp_path / "empty"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_unwritable_parent_fails_before_the_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(SlimtuneError, match="cannot write"):
            check_output_dir(locked / "new" / "out", overwrite=False, protected=[])
    finally:
        locked.chmod(0o755)


def test_probe_uses_a_real_write(tmp_path, monkeypatch):
    """os.access() says yes on a read-only mount; the probe writes, so it finds out."""
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(SlimtuneError, match="cannot write to .*read-only file system"):
        check_output_dir(tmp_path / "out", overwrite=False, protected=[])


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_follow_the_umask(tmp_path, umask_022):
    path = atomic_write_text(tmp_path / "report.md", "hello")
    assert mode(path) == 0o644
    out = save_model(tiny_llama(), tmp_path / "model")
    assert mode(out) == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert "model.safetensors" in {p.name for p in files}
    assert {p.name: mode(p) for p in files} == {p.name: 0o644 for p in files}
