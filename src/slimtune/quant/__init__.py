"""Quantisation-aware training of the decoder projections, LoRA-compatible.

What is trained is what is exported. The forward of a quantised projection fake-quantises the
MERGED weight, masked where pruning is on:

    y = x @ Q((W0 + s·B·A) ⊙ M)ᵀ + b

so the LoRA factors learn to compensate the rounding, and exporting Q(merged weight) — via
`export/gguf.py` with the same quantisers — writes exactly the weights the loss saw (the quantisers
round their scales to fp16 as GGUF stores them).

Pieces:
- `QuantSpec.parse("w4g32")`: bits, group size (None = per output channel), symmetric/affine.
- `make_quantizer(kind, spec, weight)`: "fake" (PyTorch FakeQuantize semantics, observer scales),
  "lsq" (learned step size, arXiv 1902.08153) or "lsq+" (learned step and offset, arXiv 2004.09576).
- `QuantizerSet(model, spec, kind)`: one quantiser per decoder projection, an nn.Module whose
  parameters (the step sizes/offsets) go to the optimiser next to the LoRA factors.
- `quantize_merged(w_merged, quantizer, keep=None)`: the fake-quantised (masked) merged weight.
- `quantized_linear(x, weight_fn, bias, quantizer)`: y = x @ Q(weight_fn())ᵀ + b, recomputing the
  quantised weight in the backward (as the masked forward does) instead of keeping it alive.
- `attach_quantizers(model, qset, weight_masks=None)`: patches every quantised projection's forward
  to the formula above (LoRA or plain Linear), returns handles with `remove()` and `paused()`.

Caveats:
- Quantisers are sized for one weight shape. Build them for the final (shrunk) shapes, or call
  `QuantizerSet.shrink_(masks)` with the masks `export.shrink_` uses; pruned input columns must then
  remove whole groups (heads of head_dim a multiple of the group; MLP channels cannot in general).
- Affine specs do not keep masked (zero) weights at exactly 0: ŵ = s·q + β is 0 only if β is a
  multiple of s. Unstructured sparsity survives quantisation with symmetric specs only.
- The forward computes in float32 and returns the weight's dtype; in bf16 the returned weight is
  rounded to bf16, but the codes (what GGUF stores) are unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import SlimtuneError
from ..masking.handles import PatchedForwards
from ..models.lora_layers import adapter_product
from .fake import (
    GGUF_BLOCK,
    FakeQuantizer,
    QuantSpec,
    WeightQuantizer,
    fake_quantize,
    grad_scale_factor,
    to_groups,
)
from .lsq import LSQPlusQuantizer, LSQQuantizer

QUANTIZERS: dict[str, type[WeightQuantizer]] = {"fake": FakeQuantizer, "lsq": LSQQuantizer, "lsq+": LSQPlusQuantizer}
INITS = ("paper", "mse")  # learned quantisers: the paper's init, or the least rounding error (LSQQuantizer.init_mse_)

__all__ = [
    "GGUF_BLOCK",
    "INITS",
    "QUANTIZERS",
    "FakeQuantizer",
    "LSQPlusQuantizer",
    "LSQQuantizer",
    "QuantSpec",
    "QuantizerHandles",
    "QuantizerSet",
    "WeightQuantizer",
    "attach_quantizers",
    "fake_quantize",
    "grad_scale_factor",
    "make_quantizer",
    "merged_weight",
    "quantize_merged",
    "quantized_linear",
]


def make_quantizer(kind: str, spec: QuantSpec | str, weight: Tensor, name: str = "", fp16_params: bool = True) -> WeightQuantizer:
    """A quantiser of `kind` ("fake", "lsq", "lsq+") initialised from `weight` [out, in]."""
    cls = QUANTIZERS.get(str(kind).lower())
    if cls is None:
        raise SlimtuneError(f"unknown quantizer '{kind}'; choose one of {', '.join(QUANTIZERS)}")
    return cls(spec, weight.detach(), name=name, fp16_params=fp16_params)


def quantize_merged(w_merged: Tensor, quantizer: WeightQuantizer, keep: Tensor | None = None) -> Tensor:
    """Q(w_merged ⊙ keep): the weight the quantised forward uses.

    `w_merged` is W0 + s·B·A (with autograd, so the LoRA factors get the straight-through
    gradient); `keep` is the bool pruning mask (True = kept), applied before quantising — masked
    weights are exactly 0 after a symmetric quantiser (see the module caveats for affine).
    """
    if keep is not None:
        w_merged = w_merged.masked_fill(~keep.to(device=w_merged.device, dtype=torch.bool), 0.0)
    return quantizer(w_merged)


def merged_weight(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """W0 + s·B·A of a PEFT LoRA projection (active adapter), or the weight of a plain Linear."""
    if not hasattr(module, "lora_A"):
        w = module.weight
        return w if dtype is None else w.to(dtype)
    base = module.get_base_layer()
    dtype = dtype or base.weight.dtype
    active = [a for a in module.active_adapters if a in module.lora_A]
    if module.merged or module.disable_adapters or not active:
        return base.weight.to(dtype)
    if len(active) > 1:
        raise SlimtuneError(f"quantised training supports one active adapter, found {', '.join(active)}; set a single adapter with set_adapter")
    ad = active[0]
    if getattr(module, "use_dora", {}).get(ad, False):
        raise SlimtuneError("quantised training does not support DoRA yet; use plain LoRA, rsLoRA or PiSSA")
    a, b, s = adapter_product(module)
    return torch.addmm(base.weight.to(dtype), b.to(dtype), a.to(dtype), alpha=s)


def quantized_linear(x: Tensor, weight_fn, bias: Tensor | None, quantizer: WeightQuantizer, recompute: bool = True) -> Tensor:
    """y = x @ Q(weight_fn())ᵀ + b.

    `weight_fn()` builds the (masked) merged weight from parameters it closes over. With `recompute`
    the quantised weight is rebuilt in the backward (torch.utils.checkpoint) instead of being kept
    alive per projection, which is what keeps activation memory at LoRA level.
    """

    def run(inp: Tensor) -> Tensor:
        w = quantizer(weight_fn())
        return F.linear(inp, w.to(inp.dtype), None if bias is None else bias.to(inp.dtype))

    if recompute and torch.is_grad_enabled():
        return checkpoint(run, x, use_reentrant=False)
    return run(x)


def _key(layer: int, path: str) -> str:
    return f"q_{layer}_{path.replace('.', '__')}"


class QuantizerSet(nn.Module):
    """One quantiser per decoder projection (q, k, v, o, gate, up, down) of every non-excluded layer.

    Initialised from the current merged weights (W0 + s·B·A, zero-masked by `weight_masks` if
    given: {(layer, path): bool keep}); `init="mse"` starts learned step sizes (and offsets) at the
    least rounding error per group instead of the paper's init. Index with `qs[layer, path]`; `keys()` lists (layer, path).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: QuantSpec | str,
        kind: str = "lsq",
        excluded: set[int] | frozenset[int] = frozenset(),
        weight_masks: dict | None = None,
        fp16_params: bool = True,
        init: str = "paper",
    ):
        super().__init__()
        if init not in INITS:
            raise SlimtuneError(f"unknown quantiser init '{init}'; choose {', '.join(INITS)}")
        from ..models.arch import get_arch

        self.spec = QuantSpec.parse(spec)
        self.kind = str(kind).lower()
        self.arch = get_arch(model)
        layers = self.arch.decoder_layers(model)
        self.excluded = frozenset(excluded)
        self.quantizers = nn.ModuleDict()
        self._keys: list[tuple[int, str]] = []
        for i, layer in enumerate(layers):
            if i in self.excluded:
                continue
            for path in self.arch.projections():
                with torch.no_grad():
                    w = merged_weight(layer.get_submodule(path), torch.float32)
                    keep = (weight_masks or {}).get((i, path))
                    if keep is not None:
                        w = w.masked_fill(~keep.to(device=w.device, dtype=torch.bool), 0.0)
                name = f"layer {i} {path}"
                q = make_quantizer(self.kind, self.spec, w, name=name, fp16_params=fp16_params)
                if init == "mse" and hasattr(q, "init_mse_"):
                    q.init_mse_(w)
                self.quantizers[_key(i, path)] = q.to(w.device)
                self._keys.append((i, path))

    def keys(self) -> list[tuple[int, str]]:
        return list(self._keys)

    def __getitem__(self, key: tuple[int, str]) -> WeightQuantizer:
        return self.quantizers[_key(*key)]

    def __contains__(self, key) -> bool:
        return isinstance(key, tuple) and _key(*key) in self.quantizers

    def get(self, layer: int, path: str) -> WeightQuantizer | None:
        return self.quantizers[_key(layer, path)] if (layer, path) in self else None

    def as_dict(self) -> dict[tuple[int, str], WeightQuantizer]:
        return {k: self[k] for k in self._keys}

    @torch.no_grad()
    def shrink_(self, masks) -> None:
        """Follow `export.shrink_(model, masks)`: slice every quantiser along the same plan and
        renumber the layers that survive. Input columns may only be removed in whole groups."""
        from ..masking.plan import _slices, layer_plan

        new = nn.ModuleDict()
        keys: list[tuple[int, str]] = []
        new_idx = 0
        for i in range(len(masks)):
            plan = layer_plan(masks, i)
            if plan is None:
                continue
            if i not in self.excluded:
                for path, (rows, cols) in _slices(masks.spec, plan).items():
                    if (i, path) in self:
                        q = self[i, path]
                        _slice_quantizer_(q, rows, cols)
                        q.name = f"layer {new_idx} {path}"
                        new[_key(new_idx, path)] = q
                        keys.append((new_idx, path))
            new_idx += 1
        self.quantizers = new
        self._keys = keys
        self.excluded = frozenset()  # indices changed; excluded layers simply have no quantiser now

    def per_module(self) -> list[dict]:
        rows = []
        for (i, path), q in self.as_dict().items():
            rows.append({"layer": i, "module": path, "kind": q.kind, "spec": str(q.spec), "shape": [q.out_features, q.in_features], "groups": q.n_groups})
        return rows


def _slice_quantizer_(q: WeightQuantizer, rows: Tensor | None, cols: Tensor | None) -> None:
    """Keep output rows `rows` and input columns `cols` (None: all) of a quantiser's parameters."""
    group_idx = None
    if cols is not None:
        cols = cols.cpu()
        if q.n_groups == 1 and q.spec.group_size is None:
            group_idx = None  # per channel: the row scale does not depend on which columns remain
        else:
            g = q.group
            kept = torch.zeros(q.in_features, dtype=torch.bool)
            kept[cols] = True
            per_group = to_groups(kept[None], g)[0].sum(dim=-1)
            if not bool(((per_group == 0) | (per_group == g)).all()):
                raise SlimtuneError(
                    f"pruning {q.name} removes input columns that split quantisation groups of {g}; "
                    "build the quantisers after shrinking the model, or prune in whole groups"
                )
            group_idx = (per_group == g).nonzero().flatten()
    for name, t in list(q.named_parameters(recurse=False)) + list(q.named_buffers(recurse=False)):
        v = t.data
        if rows is not None:
            v = v[rows.to(v.device)]
        if group_idx is not None:
            v = v[:, group_idx.to(v.device)]
        if isinstance(t, nn.Parameter):
            setattr(q, name, nn.Parameter(v.contiguous(), requires_grad=t.requires_grad))
        else:
            setattr(q, name, v.contiguous())
    if rows is not None:
        q.out_features = len(rows)
    if cols is not None:
        q.in_features = len(cols)
        q.n_groups, q.group = q.spec.groups(q.in_features, q.name)
        if hasattr(q, "grad_scale"):
            q.grad_scale = grad_scale_factor(q.spec, q.in_features)


# ---- the quantised forward, patched onto the projections ------------------------------------------
class QuantizerHandles(PatchedForwards):
    """The patched forwards of `attach_quantizers`; `remove()` gives every projection its own back.
    While `enabled` is False (`paused()`), projections run their own full-precision forward."""

    what = "quantised"


def _quantized_forward(module: nn.Module, quantizer: WeightQuantizer, keep: Tensor | None, original, state: QuantizerHandles):
    is_lora = hasattr(module, "lora_A")

    def forward(x, *args, **kwargs):
        if not state.enabled:
            return original(x, *args, **kwargs) if original is not None else type(module).forward(module, x, *args, **kwargs)
        if is_lora and kwargs.get("adapter_names") is not None:
            raise SlimtuneError("quantised projections do not support mixed-adapter batches (adapter_names); call the model without them")
        base = module.get_base_layer() if is_lora else module

        def weight_fn():
            w = merged_weight(module, torch.float32)
            return w if keep is None else w.masked_fill(~keep.to(w.device), 0.0)

        y = quantized_linear(x, weight_fn, base.bias, quantizer)
        if is_lora and not (module.merged or module.disable_adapters):
            for ad in module.active_adapters:
                if ad in module.lora_B and getattr(module.lora_B[ad], "bias", None) is not None:  # PEFT's lora_bias
                    y = y + (module.lora_B[ad].bias * module.scaling[ad]).to(y.dtype)
        return y

    forward._slimtune_quantized = True
    return forward


def attach_quantizers(model: nn.Module, quantizers: QuantizerSet, weight_masks: dict | None = None) -> QuantizerHandles:
    """Make every projection that has a quantiser compute y = x @ Q((W0 + s·B·A) ⊙ M)ᵀ + b.

    `weight_masks` ({(layer, path): bool keep}, e.g. `WeightMasks.as_dict()`) masks the merged weight
    before quantising; attach it here INSTEAD of `attach_weight_masks` (both replace the forward).
    Structured gates (`attach_gates`) are hooks and compose with this. LoRA dropout is not applied
    (the merged weight has no separate branch), as in the masked forward. Returns the handles.
    """
    layers = quantizers.arch.decoder_layers(model)
    state = QuantizerHandles()
    try:
        for (i, path), q in quantizers.as_dict().items():
            module = layers[i].get_submodule(path)
            current = module.__dict__.get("forward")
            if getattr(current, "_slimtune_quantized", False):
                raise SlimtuneError("quantisers are already attached to this model; call remove() on the first handles")
            if getattr(current, "_slimtune_weight_mask", False):
                raise SlimtuneError("weight masks are attached with attach_weight_masks; remove them and pass weight_masks= to attach_quantizers instead")
            base = module.get_base_layer() if hasattr(module, "lora_A") else module
            if type(base) is not nn.Linear or getattr(module, "fan_in_fan_out", False):
                raise SlimtuneError(f"quantised training needs an nn.Linear under layer {i} {path}; quantised or Conv1D bases are not supported")
            if tuple(base.weight.shape) != (q.out_features, q.in_features):
                raise SlimtuneError(f"the quantiser of layer {i} {path} is for a [{q.out_features}, {q.in_features}] weight, the model has {list(base.weight.shape)}; rebuild the quantisers")
            keep = (weight_masks or {}).get((i, path))
            had = "forward" in module.__dict__
            ours = _quantized_forward(module, q, keep, current, state)
            module.forward = ours
            state._patched.append((module, had, current, ours))
    except BaseException:
        state.remove()
        raise
    return state
