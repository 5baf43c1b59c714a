"""2:4 projections on sparse tensor cores: what is converted, what is refused (one line), and on a
capable GPU the same logits as the dense model."""

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.export import semi_structured
from slimtune.export.semi_structured import semi_structured_candidates, to_semi_structured_
from tests.conftest import tiny_model
from tests.test_sparse_export import _prune

# kernel-friendly widths: every projection a multiple of 32 x 64 (GQA: 4 query heads, 2 KV heads of 32)
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def _capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def test_candidates_are_the_2_4_projections_of_kernel_shape():
    model = _prune(tiny_model("llama", **SHAPE), "2:4")
    ok, skipped = semi_structured_candidates(model)
    assert len(ok) == 4 * 7 and not skipped
    dense = tiny_model("llama", **SHAPE)
    ok, skipped = semi_structured_candidates(dense)
    assert not ok and {s["why"] for s in skipped} == {"not 2:4 sparse"}


def test_odd_shapes_are_skipped_with_the_reason():
    model = _prune(tiny_model("llama"), "2:4")  # hidden 72 and intermediate 80: no projection is a multiple of 32 x 64
    ok, skipped = semi_structured_candidates(model)
    assert not ok and all("not a multiple of 32x64" in s["why"] for s in skipped)
    assert skipped[0]["name"] == "model.layers.0.self_attn.q_proj"


def test_cpu_model_is_refused_before_anything_changes():
    model = _prune(tiny_model("llama", **SHAPE), "2:4")
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(SlimtuneError, match=r"need an NVIDIA GPU, but the model is on cpu; load it with device='cuda'"):
        to_semi_structured_(model)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_fp32_and_unpruned_models_are_refused(monkeypatch):
    monkeypatch.setattr(semi_structured, "check_semi_structured_device", lambda device: None)
    with pytest.raises(SlimtuneError, match=r"take float16 or bfloat16 weights, not torch.float32"):
        to_semi_structured_(_prune(tiny_model("llama", **SHAPE), "2:4"))
    with pytest.raises(SlimtuneError, match=r"no decoder projection can use 2:4 kernels \(not 2:4 sparse\); prune with --granularity nm --nm 2:4"):
        to_semi_structured_(tiny_model("llama", **SHAPE).half())


def test_an_unknown_backend_is_refused():
    with pytest.raises(SlimtuneError, match=r"unknown 2:4 backend 'cublas'; choose auto, cutlass, cusparselt"):
        to_semi_structured_(_prune(tiny_model("llama", **SHAPE), "2:4"), backend="cublas")


@pytest.mark.skipif(not _capable(), reason="needs an NVIDIA GPU with compute capability >= 8.0")
@pytest.mark.parametrize("backend", ["auto", "cutlass"])
def test_converted_model_gives_the_dense_logits_on_cuda(backend):
    model = _prune(tiny_model("llama", **SHAPE), "2:4").to("cuda", torch.float16)
    tokens = torch.randint(0, 96, (2, 64), device="cuda")
    with torch.no_grad():
        dense = model(tokens).logits.float()
        info = to_semi_structured_(model, backend=backend)
    if backend == "cutlass":
        assert info["backend"] == "SparseSemiStructuredTensorCUTLASS"
    with torch.no_grad():
        sparse = model(tokens).logits.float()
    assert len(info["converted"]) == 4 * 7
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__.startswith("SparseSemiStructured")
    torch.testing.assert_close(sparse, dense, atol=2e-2, rtol=2e-2)
