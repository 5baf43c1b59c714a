"""Learned step size quantisation of weights: LSQ (arXiv 1902.08153) and LSQ+ (arXiv 2004.09576).

LSQ learns one step size s per (row, group) of a symmetric quantiser:

    ŵ = s · round(clamp(w/s, -Q_N, Q_P))                     Q_N = 2^(b-1), Q_P = 2^(b-1) - 1

LSQ+ adds a learnable offset β and uses the unsigned range of an affine spec:

    ŵ = s · round(clamp((w - β)/s, 0, 2^b - 1)) + β

Gradients (straight-through rounding, LSQ eq. 3 and LSQ+ eq. 4), with u = (w - β)/s:

    ∂ŵ/∂w = 1 inside [qmin, qmax], else 0
    ∂ŵ/∂s = round(u) - u inside, qmin below, qmax above
    ∂ŵ/∂β = 0 inside, 1 outside

The step size's (and offset's) gradient is multiplied by g = 1/sqrt(N·Q_P), N = the number of
weights that share the step (the group length, or the row length per channel) — LSQ §2.2; the
weight's gradient and the output are unchanged by g.

Init: LSQ s = 2·mean|w|/sqrt(Q_P) over each group (LSQ §2.1); LSQ+ by min/max,
s = (max - min)/(qmax - qmin), β = min - qmin·s (LSQ+ §3.3, the min/max option).

The gradients are computed by `_LSQFunction` (a custom autograd Function), so they are the
analytic straight-through formulas above exactly, not whatever a detach chain rounds to.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import SlimtuneError
from .fake import (
    FP16_TINY,
    QuantSpec,
    WeightQuantizer,
    fp16_ste,
    from_groups,
    grad_scale_factor,
    round_fp16,
    to_groups,
)

SCALE_FLOOR = FP16_TINY  # the step size is clamped at this (an all-zero group would give s = 0)
MSE_GRID = tuple(0.4 + 0.025 * k for k in range(33))  # init_mse_: fractions of the full range tried, 0.4 .. 1.2


def _mse_search(wg: Tensor, candidates, qmin: int, qmax: int) -> tuple[Tensor, Tensor | None]:
    """The (step, offset) among `candidates` ((s, beta or None) pairs, [out, G, 1]) whose quantisation
    of the grouped weight wg [out, G, g] has the least squared error, per (row, group); the first
    candidate wins ties."""
    best_err = best_s = best_b = None
    for s, b in candidates:
        u = (wg - b) / s if b is not None else wg / s
        q = torch.round(u.clamp(qmin, qmax)) * s
        err = (q + b - wg if b is not None else q - wg).square().sum(dim=-1, keepdim=True)
        if best_err is None:
            best_err, best_s, best_b = err, s, b
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if b is not None:
            best_b = torch.where(better, b, best_b)
    return best_s, best_b


def grad_scale(x: Tensor, g: float) -> Tensor:
    """x in the forward; the gradient reaching x is multiplied by g (LSQ §2.2)."""
    return (x - x * g).detach() + x * g


class _LSQFunction(torch.autograd.Function):
    """ŵ = s·round(clamp((w - β)/s, qmin, qmax)) + β on grouped tensors: w [out, G, g], s and β [out, G, 1].

    Backward returns the straight-through gradients of the module docstring; the s and β gradients
    are summed over each group (the step size is shared) and are NOT yet multiplied by g.
    """

    @staticmethod
    def forward(ctx, wg, s, beta, qmin, qmax):
        u = (wg - beta) / s if beta is not None else wg / s
        q = torch.round(u.clamp(qmin, qmax))
        out = q * s + beta if beta is not None else q * s
        ctx.save_for_backward(u, q)
        ctx.qmin, ctx.qmax, ctx.has_beta = qmin, qmax, beta is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        u, q = ctx.saved_tensors
        lo, hi = u < ctx.qmin, u > ctx.qmax
        inside = ~(lo | hi)
        gw = grad * inside
        ds = torch.where(inside, q - u, torch.where(lo, float(ctx.qmin), float(ctx.qmax)))
        gs = (grad * ds).sum(dim=-1, keepdim=True)
        gb = (grad * (~inside)).sum(dim=-1, keepdim=True) if ctx.has_beta else None
        return gw, gs, gb, None, None


class LSQQuantizer(WeightQuantizer):
    """LSQ (arXiv 1902.08153): a learnable step size per (row, group), symmetric signed range."""

    kind = "lsq"

    def __init__(self, spec: QuantSpec | str, weight: Tensor, name: str = "", fp16_params: bool = True, use_grad_scale: bool = True):
        super().__init__(spec, tuple(weight.shape), name, fp16_params)
        if not self.spec.symmetric:
            raise SlimtuneError(f"lsq learns a step size only and needs a symmetric spec, got {self.spec}; use w{self.spec.bits}" + (f"g{self.spec.group_size}" if self.spec.group_size else "") + " or --quantizer lsq+")
        self.use_grad_scale = use_grad_scale
        self.grad_scale = grad_scale_factor(self.spec, self.in_features)
        self.scale = nn.Parameter(torch.ones(self.out_features, self.n_groups, 1))
        self.reset_parameters(weight)

    @torch.no_grad()
    def reset_parameters(self, weight: Tensor) -> None:
        """s = 2·mean|w|/sqrt(Q_P) per group (LSQ §2.1)."""
        self._check(weight)
        wg = to_groups(weight.detach().float(), self.group)
        s = 2.0 * wg.abs().mean(dim=-1, keepdim=True) / self.qmax**0.5
        self.scale.copy_(s.clamp(min=SCALE_FLOOR))

    @torch.no_grad()
    def init_mse_(self, weight: Tensor, grid=MSE_GRID) -> None:
        """Start from the step with the least squared rounding error per (row, group) instead of the
        paper's 2·mean|w|/sqrt(Q_P), which suits training from scratch but is about twice the best
        4-bit step of pretrained weights. Tried: alpha · max|w| / Q_P for alpha in `grid`, rounded to
        fp16 as the forward rounds them."""
        self._check(weight)
        wg = to_groups(weight.detach().float(), self.group)
        full = wg.abs().amax(dim=-1, keepdim=True) / self.qmax
        cands = []
        for alpha in grid:
            st = (alpha * full).clamp(min=SCALE_FLOOR)
            cands.append((round_fp16(st).clamp(min=SCALE_FLOOR) if self.fp16_params else st, None))
        best, _ = _mse_search(wg, cands, self.qmin, self.qmax)
        self.scale.copy_(best)

    def effective_scale(self) -> Tensor:
        """The step size the forward uses [out, G, 1]: gradient-scaled, floored, fp16-rounded."""
        s = grad_scale(self.scale, self.grad_scale) if self.use_grad_scale else self.scale
        s = s.clamp(min=SCALE_FLOOR)
        return fp16_ste(s) if self.fp16_params else s

    def forward(self, w: Tensor) -> Tensor:
        self._check(w)
        out = _LSQFunction.apply(to_groups(w.float(), self.group), self.effective_scale(), None, self.qmin, self.qmax)
        return from_groups(out).to(w.dtype)

    @torch.no_grad()
    def qparams(self) -> tuple[Tensor, Tensor | None]:
        return self.effective_scale().squeeze(-1).detach(), None

    @torch.no_grad()
    def codes(self, w: Tensor) -> Tensor:
        self._check(w)
        s = self.effective_scale()
        q = torch.round((to_groups(w.float(), self.group) / s).clamp(self.qmin, self.qmax))
        return from_groups(q).to(torch.int16)


class LSQPlusQuantizer(WeightQuantizer):
    """LSQ+ (arXiv 2004.09576): a learnable step size and offset per (row, group), affine unsigned range."""

    kind = "lsq+"

    def __init__(self, spec: QuantSpec | str, weight: Tensor, name: str = "", fp16_params: bool = True, use_grad_scale: bool = True):
        super().__init__(spec, tuple(weight.shape), name, fp16_params)
        if self.spec.symmetric:
            raise SlimtuneError(f"lsq+ learns an offset and needs an affine spec, got {self.spec}; use {self.spec}a or --quantizer lsq")
        self.use_grad_scale = use_grad_scale
        self.grad_scale = grad_scale_factor(self.spec, self.in_features)
        self.scale = nn.Parameter(torch.ones(self.out_features, self.n_groups, 1))
        self.offset = nn.Parameter(torch.zeros(self.out_features, self.n_groups, 1))
        self.reset_parameters(weight)

    @torch.no_grad()
    def reset_parameters(self, weight: Tensor) -> None:
        """Min/max init (LSQ+ §3.3): s = (max - min)/(qmax - qmin), β = min - qmin·s. The paper gives
        this for its affine (activation) ranges; its weight init, s = max(|μ−3σ|, |μ+3σ|)/2^(b−1), is
        for a symmetric range with β = 0, which this affine weight quantiser does not have."""
        self._check(weight)
        wg = to_groups(weight.detach().float(), self.group)
        lo, hi = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)
        s = ((hi - lo) / (self.qmax - self.qmin)).clamp(min=SCALE_FLOOR)
        if self.fp16_params:  # start from parameters the forward will not move
            s = round_fp16(s)
        self.scale.copy_(s)
        self.offset.copy_(lo - self.qmin * s)

    @torch.no_grad()
    def init_mse_(self, weight: Tensor, grid=MSE_GRID) -> None:
        """Start from the (step, offset) with the least squared rounding error per (row, group): the
        range [min, max] shrunk by alpha about its centre, for alpha in `grid` (at most 1: the min/max
        init of the paper is alpha = 1), fp16-rounded as the forward rounds them."""
        self._check(weight)
        wg = to_groups(weight.detach().float(), self.group)
        lo, hi = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        cands = []
        for alpha in [a for a in grid if a <= 1.0]:
            st = (2 * alpha * half / (self.qmax - self.qmin)).clamp(min=SCALE_FLOOR)
            st = round_fp16(st).clamp(min=SCALE_FLOOR) if self.fp16_params else st
            b = mid - alpha * half - self.qmin * st
            cands.append((st, round_fp16(b) if self.fp16_params else b))
        best_s, best_b = _mse_search(wg, cands, self.qmin, self.qmax)
        self.scale.copy_(best_s)
        self.offset.copy_(best_b)

    def effective_params(self) -> tuple[Tensor, Tensor]:
        s, b = self.scale, self.offset
        if self.use_grad_scale:
            s, b = grad_scale(s, self.grad_scale), grad_scale(b, self.grad_scale)
        s = s.clamp(min=SCALE_FLOOR)
        if self.fp16_params:
            s, b = fp16_ste(s), fp16_ste(b)
        return s, b

    def forward(self, w: Tensor) -> Tensor:
        self._check(w)
        s, b = self.effective_params()
        out = _LSQFunction.apply(to_groups(w.float(), self.group), s, b, self.qmin, self.qmax)
        return from_groups(out).to(w.dtype)

    @torch.no_grad()
    def qparams(self) -> tuple[Tensor, Tensor | None]:
        s, b = self.effective_params()
        return s.squeeze(-1).detach(), b.squeeze(-1).detach()

    @torch.no_grad()
    def codes(self, w: Tensor) -> Tensor:
        self._check(w)
        s, b = self.effective_params()
        q = torch.round(((to_groups(w.float(), self.group) - b) / s).clamp(self.qmin, self.qmax))
        return from_groups(q).to(torch.int16)
