"""LoRA-GA initialisation (Wang et al. 2024, arXiv 2407.05000): adapters that start along the
full fine-tuning gradient.

With G the mean full-weight gradient of a projection over a few batches and G ≈ U·S·Vᵀ its
(randomised) SVD, the official recipe ("ArB2r" directions, "stable" scale) sets

    A₀ = c·V[:, :r]ᵀ      (the top r right singular vectors)
    B₀ = c·U[:, r:2r]     (left singular vectors r+1 … 2r)
    c  = d_out^¼ / √γ     (γ = 16)
    W  ← W − s·B₀·A₀      so that the model's output does not change

One SGD step on A and B then moves the effective weight by −η·s²·(B₀B₀ᵀ·G + G·A₀ᵀA₀)
= −η·s²·c²·Σ_{i ≤ 2r} σᵢ·uᵢ·vᵢᵀ: the best rank-2r approximation of the full gradient step
(tests/test_loraga.py checks this). Plain LoRA's first step has B = 0 and moves along G·A₀ᵀA₀ for
a random A₀ instead.

PEFT 0.21 also ships a LoRA-GA initialiser (`init_lora_weights="lora_ga"`), but it multiplies B by
the singular values σ_{r+1..2r}, which the official code does not (the first step then moves along
σᵢ³ rather than σᵢ); this module follows the paper and its code, on PEFT's plain LoRA layers.

Costs: one forward and backward per batch with a gradient for every adapted base weight (full
fine-tuning gradient memory, once, before training; fp32 accumulators one weight each), then one
randomised SVD per projection. Like PiSSA, the base weights are rewritten, so the adapters are
saved through PEFT's conversion to a rank-2r LoRA of the original model (save.py), and no dense
teacher is left for --distill.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import SlimtuneError
from ..models.arch import base_layer
from ..training.loss import causal_lm_loss
from .lora import lora_pairs, lora_weights, scaling

INIT_NAME = "lora_ga"  # what the PEFT config records, so that saving knows the base was rewritten


def mean_gradients(peft_model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[nn.Module, torch.Tensor]:
    """{LoRA layer: mean ∂L/∂W [out, in] (at least fp32)} of every adapted projection over `batches`.

    The adapters contribute nothing at PEFT's init (B = 0), so this is the base model's gradient.
    Each weight's gradient is moved into its fp32 accumulator as soon as it is ready."""
    layers = [m for _, _, m in lora_pairs(peft_model)]
    if not layers:
        raise SlimtuneError("LoRA-GA found no LoRA adapters on the decoder projections; attach them first")
    weights = {base_layer(m).weight: m for m in layers}
    sums = {m: torch.zeros_like(base_layer(m).weight, dtype=torch.promote_types(base_layer(m).weight.dtype, torch.float32)) for m in layers}
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    for p, _ in flags:
        p.requires_grad_(p in weights)

    def hook(w: torch.Tensor) -> None:
        acc = sums[weights[w]]
        acc.add_(w.grad.detach().to(acc.dtype))
        w.grad = None

    handles = [w.register_post_accumulate_grad_hook(hook) for w in weights]
    was_training, n = peft_model.training, 0
    peft_model.train()
    try:
        for batch in batches:
            with torch.enable_grad():
                loss = causal_lm_loss(peft_model, batch)
            if not torch.isfinite(loss):
                raise SlimtuneError("LoRA-GA: the loss of a calibration batch is not finite; check the data or load the model in float32")
            loss.backward()
            n += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        peft_model.train(was_training)
    if n == 0:
        raise SlimtuneError("LoRA-GA needs at least one calibration batch; pass --lora-ga-batches 1 or more")
    return {m: g.div_(n) for m, g in sums.items()}


@torch.no_grad()
def loraga_init_(peft_model: nn.Module, batches: Iterable[torch.Tensor], gamma: float = 16.0, niter: int = 4) -> None:
    """Re-initialise every adapter of `peft_model` (plain LoRA, just attached) with LoRA-GA and offset
    the base weights so that the model computes what it did before."""
    if not gamma > 0:
        raise SlimtuneError(f"LoRA-GA gamma {gamma} must be positive; the paper uses 16")
    grads = mean_gradients(peft_model, batches)
    for m, g in grads.items():
        A, B = lora_weights(m)
        r, (d_out, d_in) = A.shape[0], g.shape
        if 2 * r > min(d_out, d_in):
            raise SlimtuneError(f"LoRA-GA needs 2·r ≤ the smaller side of every adapted weight; r={r} is too large for a "
                                f"{d_out}x{d_in} projection; lower --lora-r to {min(d_out, d_in) // 2} or less")
        U, _, V = torch.svd_lowrank(g, q=min(4 * r, d_out, d_in), niter=niter)
        c = d_out ** 0.25 / gamma ** 0.5
        a0, b0 = c * V[:, :r].T, c * U[:, r:2 * r]
        A.copy_(a0.to(A.dtype))
        B.copy_(b0.to(B.dtype))
        w = base_layer(m).weight
        # subtract what the adapters will add, with the values they now hold (their dtype's rounding),
        # in at least fp32 (an fp64 model stays exact)
        up = torch.promote_types(w.dtype, torch.float32)
        w.copy_((w.to(up) - scaling(m) * (B.to(up) @ A.to(up))).to(w.dtype))
    for config in peft_model.peft_config.values():
        config.init_lora_weights = INIT_NAME
