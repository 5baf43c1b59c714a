"""A real llama.cpp (the xllamacpp wheel) runs what `export_gguf` writes: uniform `llama`, non-uniform
`deci` with per-layer arrays, and trained Q4_0 codes, with the logits transformers / the fake-quant
forward compute; and the perplexity helper agrees with slimtune's."""

import copy
import sys

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.evaluate import perplexity
from slimtune.export.gguf import export_gguf
from slimtune.quant import QuantizerSet
from tests.test_gguf_export import _qmodel, _shrunk_nonuniform

llamacpp = pytest.importorskip("xllamacpp", reason="llama.cpp's Python build (pip install xllamacpp)")

from slimtune.evaluate.llamacpp import (  # noqa: E402
    LlamaCppServer,
    llamacpp_perplexity,
    llamacpp_speed,
    output_matrix,
)

IDS = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(3))


def _llamacpp_logits(path, ids=IDS) -> torch.Tensor:
    with LlamaCppServer(path, n_ctx=32, embedding=True) as server:
        hidden = torch.from_numpy(server.hidden_states(ids.tolist()))
    return hidden @ output_matrix(path).T


def _hf_logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


def _rel(got, ref) -> float:
    return ((got - ref).norm() / ref.norm()).item()


def _close(got, ref, tol):
    """Relative (Frobenius) deviation of the logits: llama.cpp computes in its own kernels."""
    err = _rel(got, ref)
    assert err < tol, f"llama.cpp logits differ from the reference by {err:.4f} (relative)"


@pytest.mark.parametrize("shape", ["uniform", "non_uniform"])
def test_llamacpp_runs_the_exported_model_with_the_same_logits(tmp_path, bpe_tokenizer, shape):
    model = _qmodel() if shape == "uniform" else _shrunk_nonuniform()
    path = tmp_path / "model.gguf"
    report = export_gguf(model, bpe_tokenizer, path, dtype="f32")
    assert report["architecture"] == ("llama" if shape == "uniform" else "deci")
    _close(_llamacpp_logits(path), _hf_logits(model), 5e-3)
    # a swapped head order or wrong per-layer width would not be this close: compare against a
    # different model too, so the tolerance itself is shown to discriminate
    other = _qmodel(seed=1) if shape == "uniform" else _shrunk_nonuniform(seed=1)
    with pytest.raises(AssertionError):
        _close(_llamacpp_logits(path), _hf_logits(other), 5e-3)


def test_llamacpp_runs_trained_q4_codes_like_the_fake_quant_forward(tmp_path, bpe_tokenizer):
    model = _shrunk_nonuniform(head_dim=32)
    qs = QuantizerSet(model, "w4g32", kind="lsq")
    with torch.no_grad():
        for p in qs.parameters():
            p.mul_(1 + 0.1 * torch.rand(p.shape, generator=torch.Generator().manual_seed(0)))
    qs.eval()
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for (i, p), q in qs.as_dict().items():
            lin = trained.model.layers[i].get_submodule(p)
            lin.weight.copy_(q(lin.weight))
    path = tmp_path / "q4.gguf"
    report = export_gguf(model, bpe_tokenizer, path, quantizers=qs, embed_dtype="f32")
    assert report["tensors"]["blk.1.ffn_up.weight"] == "Q4_0"
    # llama.cpp quantises the activations to 8 bits for Q4_0 matmuls: close, not equal; the
    # tolerance is far below the gap to the float weights the codes came from
    got = _llamacpp_logits(path)
    _close(got, _hf_logits(trained), 5e-2)
    assert _rel(got, _hf_logits(model)) > 0.2


def test_llamacpp_perplexity_matches_slimtune_on_the_same_windows(tmp_path, bpe_tokenizer):
    model = _qmodel()
    path = tmp_path / "model.gguf"
    export_gguf(model, bpe_tokenizer, path, dtype="f32")
    windows = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(5))
    ours = perplexity(model, windows, progress=False)
    theirs = llamacpp_perplexity(path, windows, progress=False)
    assert theirs["tokens"] == ours["tokens"] == 3 * 23
    assert abs(theirs["perplexity"] / ours["perplexity"] - 1) < 1e-3
    speed = llamacpp_speed(path, prompt_tokens=16, new_tokens=4, repeats=1, threads=1)
    assert speed["prompt_tokens_per_s"] > 0 and speed["gen_tokens_per_s"] > 0


def test_missing_llamacpp_and_bad_files_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(SlimtuneError, match="does not exist"):
        llamacpp_perplexity(tmp_path / "nope.gguf", torch.zeros(1, 4, dtype=torch.long))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(SlimtuneError, match="llama.cpp could not load"):
        LlamaCppServer(junk, n_ctx=8)
    monkeypatch.setitem(sys.modules, "xllamacpp", None)
    with pytest.raises(SlimtuneError, match="pip install xllamacpp"):
        LlamaCppServer(junk, n_ctx=8)


def test_prune_refuses_llamacpp_check_without_llamacpp_before_any_work(tmp_path, monkeypatch, capsys):
    from slimtune.cli import main

    monkeypatch.setitem(sys.modules, "xllamacpp", None)
    code = main(["prune", "--export", "gguf", "--llamacpp-check", "--quiet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "pip install xllamacpp" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
