"""The hard-concrete distribution of L0 gates (Louizos et al. 2018, arXiv 1712.01312, §4).

    u ~ U(ε, 1−ε),  s = σ((log u − log(1−u) + log α)/β),  z = clamp(s·(ζ − γ) + γ, 0, 1)

with β = 2/3, γ = −0.1, ζ = 1.1. Stretching s past [0, 1] and clamping puts real probability
mass on z = 0 and z = 1, so a gate can be exactly closed while log α stays differentiable:

    P(z ≠ 0) = σ(log α − β·log(−γ/ζ))              (the expected L0 norm, per gate)
    P(z = 1) = σ(log α − β·log((1−γ)/(ζ−1)))
    ẑ        = clamp(σ(log α)·(ζ − γ) + γ, 0, 1)  (the deterministic gate at test time)

METHODS.md §4; tests/test_l0.py checks the closed forms against Monte Carlo.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BETA, GAMMA, ZETA, EPS = 2.0 / 3.0, -0.1, 1.1, 1e-6


def sample(log_alpha: torch.Tensor, beta: float = BETA, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw of z per gate, differentiable in log α (reparameterised)."""
    u = torch.rand(log_alpha.shape, dtype=log_alpha.dtype, device=log_alpha.device, generator=generator)
    u = u.mul(1 - 2 * EPS).add(EPS)
    s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / beta)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def prob_open(log_alpha: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """P(z ≠ 0): the expected contribution of each gate to the L0 norm."""
    return torch.sigmoid(log_alpha - beta * math.log(-GAMMA / ZETA))


def prob_one(log_alpha: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """P(z = 1)."""
    return torch.sigmoid(log_alpha - beta * math.log((1 - GAMMA) / (ZETA - 1)))


def test_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """ẑ, the deterministic gate used outside training and folded into the weights at the end."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


test_gate.__test__ = False  # a function named test_* outside the tests: keep pytest from collecting it


def rank_score(log_alpha: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """−log(1 − P(z ≠ 0)) = softplus(log α − β·log(−γ/ζ)): ranks gates as P(z ≠ 0) does, but stays
    positive and does not saturate in float32 when a gate is almost surely open."""
    return F.softplus(log_alpha - beta * math.log(-GAMMA / ZETA))
