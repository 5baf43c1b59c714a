"""The chunked next-token loss equals the model's own labels= loss, value and gradients."""

import pytest
import torch

from slimtune.adapters import LoraSettings, attach_lora
from slimtune.training.loss import causal_lm_loss
from tests.conftest import tiny_model


@pytest.mark.parametrize("fam", ["llama", "opt", "qwen3"])
def test_chunked_loss_matches_hf(fam):
    model = attach_lora(tiny_model(fam), LoraSettings(r=4, dropout=0.0))
    x = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=x, labels=x).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ours = causal_lm_loss(model, x, chunk_tokens=7)  # several chunks, last one ragged
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6)
