"""Next-token loss without materialising the full [tokens, vocab] logits.

With a large vocabulary the logits dominate training memory for small models: SmolLM2 at
1 x 512 tokens has 512 x 49152 fp32 logits (96 MB), plus their log-softmax and gradient. Here
the LM head and cross-entropy run per chunk of tokens under activation checkpointing, so only one
chunk's logits exist at a time, in the forward and again in the backward. The value equals the
model's own `labels=` loss (mean over all predicted tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models.arch import unwrap

CHUNK_TOKENS = 256


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    # half precision goes up to fp32; an fp64 model keeps fp64, so exact Taylor checks in the
    # tests can reach below fp32 rounding
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Mean cross-entropy of predicting input_ids[:, 1:] from input_ids[:, :-1]."""
    base = unwrap(model)
    input_ids = input_ids.to(base.get_input_embeddings().weight.device)
    hidden = base.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state  # [b, L, d]
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [b*(L-1), d]
    targets = input_ids[:, 1:].reshape(-1)
    head = base.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, targets.numel(), chunk_tokens):
        h, y = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, y)
    return total / targets.numel()
