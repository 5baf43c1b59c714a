"""Weight fake quantisation: the spec (`w4g32`, `w8`, `w4g32a`), the group layout, and a PyTorch-style
fake quantiser.

Layout. A weight [out, in] is quantised per output channel (one scale per row) or per group of
`g` consecutive input columns (one scale per row and group): it is viewed as [out, in/g, g] and each
(row, group) pair is one "channel" in PyTorch's sense. Group 32 is the block of llama.cpp's Q8_0,
Q4_0 and Q4_1 formats, so a w8g32 / w4g32 / w4g32a weight can be written to GGUF exactly as trained
(see `export/gguf.py`).

Every quantiser in slimtune describes its result the same way, which is what the exporter reads:

    codes  q  = integers in [qmin, qmax]               (`WeightQuantizer.codes(w)`)
    value  ŵ  = scale · q + offset  per (row, group)   (`WeightQuantizer.qparams()`)

Symmetric specs use the signed range qmin = -2^(b-1), qmax = 2^(b-1) - 1 and offset 0 (LSQ's
Q_N, Q_P for signed data, arXiv 1902.08153 §2); affine specs use the unsigned range [0, 2^b - 1]
and a real offset (LSQ+'s β, arXiv 2004.09576 §3; Q4_1's "min").

`FakeQuantizer` follows PyTorch's `torch.ao.quantization.FakeQuantize` with a per-channel min/max
observer: forward (clamp(round(w/s) + zp, qmin, qmax) - zp)·s with an integer zero point, a
straight-through gradient for w wherever round(w/s) + zp lands inside [qmin, qmax], and no gradient
for the scale (an observer buffer). It is bit-identical to `torch.fake_quantize_per_channel_affine`
on the grouped view; the tests check that, gradient included.

fp16 parameters. llama.cpp stores block scales (and Q4_1 minimums) as fp16. With
`fp16_params=True` (the default) every quantiser rounds its scale (and offset) to fp16 values, so
the weights trained are the weights exported, bit for bit. The rounding is straight-through for the
learnable quantisers of `lsq.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import SlimtuneError

GGUF_BLOCK = 32  # llama.cpp QK8_0 = QK4_0 = QK4_1
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): scales are kept at or above it
_SPEC_RE = re.compile(r"^w(\d+)(?:g(\d+))?(a)?$")


# ---- the spec ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantSpec:
    """What to quantise to: `bits` per weight, one scale per `group_size` input columns (None: one
    per output channel), symmetric (signed codes, no offset) or affine (unsigned codes + offset)."""

    bits: int
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise SlimtuneError(f"quantisation to {self.bits} bits is not supported; use 2 to 8 bits (w8, w4g32, ...)")
        if self.group_size is not None and self.group_size < 1:
            raise SlimtuneError(f"group size {self.group_size} must be positive; use e.g. w4g32, or w4 for one scale per channel")

    @classmethod
    def parse(cls, text: str | QuantSpec) -> QuantSpec:
        """`w4g32` (4 bits, groups of 32, symmetric), `w8` (8 bits per channel), `w4g32a` (affine)."""
        if isinstance(text, QuantSpec):
            return text
        m = _SPEC_RE.match(str(text).strip().lower())
        if m is None:
            raise SlimtuneError(f"cannot parse quantisation spec '{text}'; write w<bits>[g<group>][a], e.g. w4g32, w8, w4g32a (a = affine)")
        bits, group, affine = m.groups()
        return cls(bits=int(bits), group_size=int(group) if group else None, symmetric=affine is None)

    def __str__(self) -> str:
        return f"w{self.bits}" + (f"g{self.group_size}" if self.group_size else "") + ("" if self.symmetric else "a")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def groups(self, in_features: int, name: str = "") -> tuple[int, int]:
        """(number of groups per row, group length) for a layer of `in_features` inputs."""
        if self.group_size is None:
            return 1, in_features
        if in_features % self.group_size:
            where = f" of {name}" if name else ""
            raise SlimtuneError(
                f"group size {self.group_size} does not divide the {in_features} input features{where}; "
                f"pick a group size that divides it (e.g. {_divisor_hint(in_features, self.group_size)}) or quantise per channel (w{self.bits})"
            )
        return in_features // self.group_size, self.group_size

    @property
    def gguf_type(self) -> str | None:
        """The llama.cpp block type that stores this spec exactly, or None."""
        if self.group_size is not None and self.group_size % GGUF_BLOCK:
            return None
        if self.symmetric and self.bits == 8:
            return "Q8_0"
        if self.symmetric and self.bits == 4:
            return "Q4_0"
        if not self.symmetric and self.bits == 4:
            return "Q4_1"
        return None


def _divisor_hint(n: int, want: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - want), -d))


# ---- group layout --------------------------------------------------------------------------------
def to_groups(w: Tensor, group: int) -> Tensor:
    """[out, in] -> [out, in/group, group] (a view)."""
    return w.reshape(w.shape[0], w.shape[1] // group, group)


def from_groups(w: Tensor) -> Tensor:
    """[out, n_groups, group] -> [out, in]."""
    return w.reshape(w.shape[0], w.shape[1] * w.shape[2])


def round_fp16(x: Tensor) -> Tensor:
    """Nearest fp16 value, kept in x's dtype (no gradient)."""
    return x.to(torch.float16).to(x.dtype)


def fp16_ste(x: Tensor) -> Tensor:
    """x rounded to fp16 in the forward, identity in the backward."""
    return x + (round_fp16(x) - x).detach()


# ---- the common interface ------------------------------------------------------------------------
class WeightQuantizer(nn.Module):
    """Base of slimtune's weight quantisers: one per projection, sized for its weight [out, in].

    forward(w) returns the fake-quantised weight (same shape and dtype). `codes(w)` and `qparams()`
    give what the exporter writes: ŵ = scale·codes + offset per (row, group).
    """

    kind = "base"

    def __init__(self, spec: QuantSpec | str, shape: tuple[int, int], name: str = "", fp16_params: bool = True):
        super().__init__()
        self.spec = QuantSpec.parse(spec)
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.name = name
        self.n_groups, self.group = self.spec.groups(self.in_features, name)
        self.fp16_params = fp16_params

    @property
    def qmin(self) -> int:
        return self.spec.qmin

    @property
    def qmax(self) -> int:
        return self.spec.qmax

    def _check(self, w: Tensor) -> None:
        if w.dim() != 2 or tuple(w.shape) != (self.out_features, self.in_features):
            raise SlimtuneError(
                f"quantiser {self.name or self.spec} was built for a [{self.out_features}, {self.in_features}] weight, got {list(w.shape)}; "
                "rebuild the quantisers after shrinking the model"
            )

    def qparams(self) -> tuple[Tensor, Tensor | None]:
        """(scale [out, n_groups], offset [out, n_groups] or None), as the forward uses them."""
        raise NotImplementedError

    @torch.no_grad()
    def codes(self, w: Tensor) -> Tensor:
        """Integer codes [out, in] (int16) of w, exactly those the forward rounds to."""
        raise NotImplementedError

    @torch.no_grad()
    def dequantize(self, codes: Tensor) -> Tensor:
        """scale·codes + offset, float32 [out, in]: what forward(w) returns for codes = codes(w)."""
        scale, offset = self.qparams()
        q = to_groups(codes.float(), self.group)
        out = q * scale.float().unsqueeze(-1)
        if offset is not None:
            out = out + offset.float().unsqueeze(-1)
        return from_groups(out)

    def extra_repr(self) -> str:
        return f"{self.spec}, [{self.out_features}, {self.in_features}], groups={self.n_groups}x{self.group}, fp16_params={self.fp16_params}"


# ---- PyTorch-style fake quantiser ----------------------------------------------------------------
class _PerGroupFakeQuant(torch.autograd.Function):
    """torch.fake_quantize_per_channel_affine on the [out, n_groups, group] view, channels = (row, group).

    Forward: qval = round(w · (1/s)) + zp (round half to even), out = (clamp(qval) - zp) · s.
    Backward: the gradient passes where qmin <= qval <= qmax, else 0; scale and zp get none.
    """

    @staticmethod
    def forward(ctx, wg, scale, zero_point, qmin, qmax):
        inv = 1.0 / scale  # PyTorch multiplies by the float32 reciprocal of the scale
        qval = torch.round(wg * inv) + zero_point
        keep = (qval >= qmin) & (qval <= qmax)
        ctx.save_for_backward(keep)
        return (qval.clamp(qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep, None, None, None, None


class FakeQuantizer(WeightQuantizer):
    """PyTorch FakeQuantize semantics, per channel or per group, with a min/max observer.

    The observer runs on every forward while `observer_enabled` (as in PyTorch QAT: the merged
    LoRA weight changes every step), and `disable_observer()` freezes the scales late in training.
    Scale formulas are PyTorch's (`torch.ao.quantization` observers):
      symmetric  s = max(-min(w, 0), max(w, 0)) / ((qmax - qmin) / 2),  zp = 0
      affine     s = (max(w, 0) - min(w, 0)) / (qmax - qmin),            zp = qmin - round(min(w, 0) / s)
    with s >= float32 eps; with `fp16_params`, s is then rounded to fp16 (zp follows the rounded s).

    Export note: symmetric codes export exactly; the affine offset -zp·s is stored as fp16 in Q4_1,
    which may move it by one fp16 ulp. Use `LSQPlusQuantizer` (a real-valued offset) to export
    affine weights bit-exactly.
    """

    kind = "fake"

    def __init__(self, spec: QuantSpec | str, weight: Tensor, name: str = "", fp16_params: bool = True):
        super().__init__(spec, tuple(weight.shape), name, fp16_params)
        shape = (self.out_features, self.n_groups, 1)
        self.register_buffer("scale", torch.ones(shape, dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.float32))  # integer-valued
        self.observer_enabled = True
        self.observe(weight)

    def enable_observer(self, enabled: bool = True) -> FakeQuantizer:
        self.observer_enabled = enabled
        return self

    def disable_observer(self) -> FakeQuantizer:
        return self.enable_observer(False)

    @torch.no_grad()
    def observe(self, w: Tensor) -> None:
        self._check(w)
        wg = to_groups(w.detach().float(), self.group)
        lo = wg.amin(dim=-1, keepdim=True).clamp(max=0.0)
        hi = wg.amax(dim=-1, keepdim=True).clamp(min=0.0)
        eps = torch.finfo(torch.float32).eps
        if self.spec.symmetric:
            scale = (torch.maximum(-lo, hi) / ((self.qmax - self.qmin) / 2)).clamp(min=eps)
            if self.fp16_params:
                scale = round_fp16(scale.clamp(min=FP16_TINY))
            zp = torch.zeros_like(scale)
        else:
            scale = ((hi - lo) / (self.qmax - self.qmin)).clamp(min=eps)
            if self.fp16_params:
                scale = round_fp16(scale.clamp(min=FP16_TINY))
            zp = (self.qmin - torch.round(lo / scale)).clamp(self.qmin, self.qmax)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)

    def forward(self, w: Tensor) -> Tensor:
        self._check(w)
        if self.observer_enabled and self.training:
            self.observe(w)
        wg = to_groups(w.float(), self.group)
        out = _PerGroupFakeQuant.apply(wg, self.scale, self.zero_point, self.qmin, self.qmax)
        return from_groups(out).to(w.dtype)

    def qparams(self) -> tuple[Tensor, Tensor | None]:
        scale = self.scale.squeeze(-1)
        if self.spec.symmetric:
            return scale, None
        return scale, -self.zero_point.squeeze(-1) * scale

    @torch.no_grad()
    def codes(self, w: Tensor) -> Tensor:
        """Signed codes q - zp for symmetric specs; unsigned q for affine (value = s·q + offset)."""
        self._check(w)
        wg = to_groups(w.float(), self.group)
        q = (torch.round(wg * (1.0 / self.scale)) + self.zero_point).clamp(self.qmin, self.qmax)
        return from_groups(q).to(torch.int16)

    @torch.no_grad()
    def dequantize(self, codes: Tensor) -> Tensor:
        # the forward's own arithmetic, (q - zp)·s, so that dequantize(codes(w)) == forward(w)
        q = to_groups(codes.float(), self.group)
        return from_groups((q - self.zero_point) * self.scale)


def fake_quantize(w: Tensor, spec: QuantSpec | str, fp16_params: bool = False) -> Tensor:
    """One-shot PyTorch-style fake quantisation of w with scales observed from w itself."""
    q = FakeQuantizer(spec, w.detach(), fp16_params=fp16_params).eval()
    return q(w)


def num_steps(spec: QuantSpec, in_features: int) -> int:
    """Elements that share one step size: the group length, or the row length per channel."""
    return spec.group_size or in_features


def grad_scale_factor(spec: QuantSpec, in_features: int, qmax: int | None = None) -> float:
    """LSQ's g = 1/sqrt(N·Q_P) with N = elements per step size (arXiv 1902.08153 §2.2)."""
    qp = spec.qmax if qmax is None else qmax
    return 1.0 / math.sqrt(num_steps(spec, in_features) * qp)
