"""LoRA-Pro (Wang et al. 2024, arXiv 2407.18242), "efficient" mode: the adapter gradients are replaced
by the pair whose low-rank step best matches the full fine-tuning gradient.

A step on (A, B) moves W' = W0 + s·B·A by s·(B·g^A + g^B·A) to first order: the "equivalent
gradient" g̃. LoRA's own gradients G_A = s·Bᵀ·g and G_B = s·g·Aᵀ give a g̃ that is not the best
rank-restricted match of the full gradient g. The minimiser of ‖g̃ − g‖_F, computed from G_A and
G_B alone (g itself is never formed), is

    g^A = (1/s²)·(BᵀB)⁻¹·G_A + X·A
    g^B = (1/s²)·[I − B(BᵀB)⁻¹Bᵀ]·G_B·(AAᵀ)⁻¹ − B·X
    g̃   = P_B·g + (I − P_B)·g·P_A      (P_B, P_A the projections onto B's columns and A's rows)

for any r×r matrix X; the paper's code takes the X that keeps (g^A, g^B) closest to (G_A, G_B),
the solution of the Sylvester equation BᵀB·X + X·AAᵀ = −(1/s²)·(BᵀB)⁻¹·G_A·Aᵀ (solved here
through the eigenvectors of the two symmetric r×r matrices). Inverses are pinv(M + 1e-8·I), as
in the code, so B = 0 at init is fine (then g^A = 0 and g^B = G_B·(AAᵀ)⁻¹/s²).

"Efficient" mode (the code's default) hands these gradients to the usual AdamW, whose moments stay
low-rank; the "full" mode with moments on the d_out×d_in g̃ is not implemented (full-weight
optimiser memory is what LoRA avoids). Cost: a few r×r solves and [d, r] products per projection
and step. The replacement runs after the pruning criterion has observed the raw LoRA gradients
(LoRAPrune's estimate needs those) and before the optimiser step. DoRA is refused: its magnitude
vector changes what a step on A and B does to W'.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.lora import lora_pairs, lora_weights, scaling

EPS = 1e-8


def _inv(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.pinv(m + EPS * torch.eye(m.shape[0], dtype=m.dtype, device=m.device))


def sylvester(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X with P·X + X·Q = C for symmetric positive semi-definite P, Q [r, r]."""
    e1, U1 = torch.linalg.eigh(P)
    e2, U2 = torch.linalg.eigh(Q)
    denom = (e1[:, None] + e2[None, :]).clamp_min(EPS)
    return U1 @ ((U1.T @ C @ U2) / denom) @ U2.T


def equivalent_gradients(A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float,
                         X: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g^A [r, in], g^B [out, r], X) from A [r, in], B [out, r] and their gradients; X defaults to
    the Sylvester solution. Computed in at least fp32."""
    up = torch.promote_types(A.dtype, torch.float32)
    A, B, gA, gB = (t.detach().to(up) for t in (A, B, gA, gB))
    BtB, AAt = B.T @ B, A @ A.T
    BtB_inv, AAt_inv = _inv(BtB), _inv(AAt)
    c = 1.0 / (s * s)
    if X is None:
        X = sylvester(BtB, AAt, -c * BtB_inv @ gA @ A.T)
    new_A = c * BtB_inv @ gA + X @ A
    new_B = c * (gB - B @ (BtB_inv @ (B.T @ gB))) @ AAt_inv - B @ X
    return new_A, new_B, X


@torch.no_grad()
def lora_pro_(model: nn.Module) -> None:
    """Replace the gradients of every adapted projection's A and B by LoRA-Pro's, in place."""
    for _, _, m in lora_pairs(model):
        A, B = lora_weights(m)
        if A.grad is None or B.grad is None:
            continue
        new_A, new_B, _ = equivalent_gradients(A, B, A.grad, B.grad, scaling(m))
        A.grad.copy_(new_A)
        B.grad.copy_(new_B)
