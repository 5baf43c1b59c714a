"""Element-level masks: unstructured and N:M sparsity of the decoder projections.

One bool mask per (decoder layer, projection path), True = kept. While the masks are attached,
every masked projection computes its output from the MERGED weight, masked:

    LoRA layer     y = x @ ((W0 + s·B·A) ⊙ M)ᵀ + b
    plain Linear   y = x @ (W ⊙ M)ᵀ + b

LoRAPrune masks the merged weight, not only W0 (arXiv 2305.18403, §3.3): masking W0 alone would
let B·A grow back into the pruned positions during training, and merging would then change the
model. With the merged weight masked, training sees the same function `merge_keep_masks` produces.
Which weights are pruned is decided in `pruning/weight_selection.py`.

Caveats of the masked forward:
- LoRA dropout is NOT applied: the merged weight has no separate LoRA branch to drop out on.
- Each forward and backward builds one weight-sized merged tensor per projection (transient: the
  backward recomputes it rather than saving it, so activation memory stays at LoRA level).
- Plain LoRA, rsLoRA and PiSSA (one active adapter) are supported; DoRA and other PEFT variants,
  fan_in_fan_out layers and mixed-adapter batches are refused.
- The forward is swapped on the module instance: call `remove()` on the handles before
  `copy.deepcopy` or pickling the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlimtuneError
from ..models.arch import ArchSpec, base_weight, get_arch, own_params
from ..models.lora_layers import adapter_product
from .handles import PatchedForwards

Key = tuple[int, str]  # (decoder layer index, projection path such as "self_attn.q_proj")


def _buffer_name(key: Key) -> str:
    i, path = key
    return f"m_{i}_{path.replace('.', '__')}"


class WeightMasks(nn.Module):
    """One bool [out, in] mask (True = kept) per projection of every non-excluded decoder layer.

    The masks are buffers named `m_{layer}_{path with '.' -> '__'}`, so they move with `.to()`
    and checkpoint with `state_dict()`.
    """

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None, excluded: set[int] | frozenset[int] = frozenset()):
        super().__init__()
        self.spec = spec or get_arch(model)
        layers = self.spec.decoder_layers(model)
        bad = sorted(i for i in excluded if not 0 <= i < len(layers))
        if bad:
            raise SlimtuneError(f"excluded layers {bad} out of range; the model has layers 0..{len(layers) - 1}")
        self.excluded = frozenset(excluded)
        self.num_layers = len(layers)
        self._keys: list[Key] = []
        for i, layer in enumerate(layers):
            if i in self.excluded:
                continue
            for path in self.spec.projections():
                w = base_weight(layer.get_submodule(path))
                self.register_buffer(_buffer_name((i, path)), torch.ones(w.shape, dtype=torch.bool, device=w.device))
                self._keys.append((i, path))

    def keys(self) -> list[Key]:
        return list(self._keys)

    def mask(self, layer: int, path: str) -> torch.Tensor:
        return getattr(self, _buffer_name((layer, path)))

    def set_mask(self, layer: int, path: str, keep: torch.Tensor) -> None:
        buf = self.mask(layer, path)
        buf.copy_(keep.to(device=buf.device, dtype=torch.bool).reshape(buf.shape))

    def as_dict(self) -> dict[Key, torch.Tensor]:
        """{(layer, path): bool [out, in]}, the buffers themselves: what `merge_keep_masks` takes."""
        return {key: self.mask(*key) for key in self._keys}

    def pruned(self) -> int:
        return sum(int((~self.mask(*key)).sum()) for key in self._keys)

    def sparsity_of_decoder(self, model: nn.Module) -> float:
        """Pruned weights / all decoder-layer parameters (norms, biases, excluded layers count dense)."""
        total = sum(own_params(layer) for layer in self.spec.decoder_layers(model))
        return self.pruned() / max(total, 1)

    def per_module(self) -> list[dict]:
        """[{"layer", "path", "pruned", "total"}], for reports."""
        return [
            {"layer": i, "path": path, "pruned": int((~self.mask(i, path)).sum()), "total": self.mask(i, path).numel()}
            for i, path in self._keys
        ]

    def is_subset_of(self, other: WeightMasks) -> bool:
        """True when every weight pruned in `other` is pruned here too (masks only grow)."""
        if self._keys != other._keys:
            return False
        for key in self._keys:
            a, b = self.mask(*key), other.mask(*key).to(self.mask(*key).device)
            if a.shape != b.shape or bool((a & ~b).any()):
                return False
        return True


# ---- the masked forward ---------------------------------------------------------------------------
def _masked_weight(w0, a, b, keep, s, dtype) -> torch.Tensor:
    """(W0 + s·B·A) ⊙ M in `dtype`; masked_fill, not multiply: 0·inf would be nan."""
    if a is None:
        return w0.to(dtype).masked_fill(~keep, 0.0)
    w = torch.addmm(w0.to(dtype), b.to(dtype), a.to(dtype), alpha=s)  # a new tensor: safe to fill in place
    return w.masked_fill_(~keep, 0.0)


class _MaskedLinear(torch.autograd.Function):
    """y = x @ ((W0 + s·B·A) ⊙ M)ᵀ + b. The backward recomputes the masked weight instead of saving
    it: autograd would keep one merged weight per projection alive until backward, a full model copy."""

    @staticmethod
    def forward(ctx, x, w0, bias, a, b, keep, s, dtype):
        with torch.autocast(x.device.type, enabled=False):
            w = _masked_weight(w0, a, b, keep, s, dtype)
            y = F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, w0, bias, a, b, keep)
        ctx.s, ctx.dtype = s, dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w0, bias, a, b, keep = ctx.saved_tensors
        s, dtype = ctx.s, ctx.dtype
        need_x, need_w0, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        gx = gw0 = gbias = ga = gb = None
        with torch.autocast(gy.device.type, enabled=False):
            gy = gy.to(dtype)
            if need_x:
                gx = (gy @ _masked_weight(w0, a, b, keep, s, dtype)).to(x.dtype)
            g2 = gy.reshape(-1, gy.shape[-1])  # [tokens, out]
            if need_w0 or need_a or need_b:
                gw = (g2.T @ x.reshape(-1, x.shape[-1]).to(dtype)).masked_fill_(~keep, 0.0)  # dL/dW ⊙ M [out, in]
                if need_w0:
                    gw0 = gw.to(w0.dtype)
                if need_a:
                    ga = (b.to(dtype).T @ gw).mul_(s).to(a.dtype)  # [r, in]
                if need_b:
                    gb = (gw @ a.to(dtype).T).mul_(s).to(b.dtype)  # [out, r]
            if need_bias:
                gbias = g2.sum(dim=0).to(bias.dtype)
        return gx, gw0, gbias, ga, gb, None, None, None


def masked_linear(x, weight, bias, keep, lora_a=None, lora_b=None, scaling: float = 0.0) -> torch.Tensor:
    """y = x @ ((W + s·B·A) ⊙ M)ᵀ + b (no B·A term when lora_a is None), under autocast as F.linear."""
    dev = weight.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    if keep.device != weight.device:
        keep = keep.to(weight.device)
    return _MaskedLinear.apply(x, weight, bias, lora_a, lora_b, keep, float(scaling), dtype)


def _lora_forward(module: nn.Module, masks: WeightMasks, name: str):
    def forward(x, *args, **kwargs):
        if kwargs.get("adapter_names") is not None:
            raise SlimtuneError("weight masks do not support mixed-adapter batches (adapter_names); call the model without them")
        if module.disable_adapters and module.merged:
            module.unmerge()  # what PEFT's own forward does
        base = module.get_base_layer()
        keep = getattr(masks, name)
        if module.disable_adapters or module.merged:  # merged: W0 already holds s·B·A
            return masked_linear(x, base.weight, base.bias, keep)
        active = [a for a in module.active_adapters if a in module.lora_A]
        if len(active) > 1:
            raise SlimtuneError(f"weight masks support one active adapter, found {', '.join(active)}; set a single adapter with set_adapter")
        if not active:
            return masked_linear(x, base.weight, base.bias, keep)
        a, b, s = adapter_product(module)  # AdaLoRA: a = λ ⊙ Q, autograd reaches λ and Q through it
        y = masked_linear(x, base.weight, base.bias, keep, a, b, s)
        lora_bias = getattr(module.lora_B[active[0]], "bias", None)
        if lora_bias is not None:  # PEFT's lora_bias: merged into the (unmasked) bias
            y = y + (lora_bias * s).to(y.dtype)
        return y

    return forward


def _linear_forward(module: nn.Linear, masks: WeightMasks, name: str):
    def forward(x, *args, **kwargs):
        return masked_linear(x, module.weight, module.bias, getattr(masks, name))

    return forward


def _pausable(masked, module: nn.Module, original, state: WeightMaskHandles):
    """The masked forward while `state.enabled`, else the projection's own forward (dense weight)."""

    def forward(x, *args, **kwargs):
        if state.enabled:
            return masked(x, *args, **kwargs)
        if original is not None:
            return original(x, *args, **kwargs)
        return type(module).forward(module, x, *args, **kwargs)

    return forward


class WeightMaskHandles(PatchedForwards):
    """The patched forwards of `attach_weight_masks`. While `enabled` is False (see `paused()`) every
    projection runs its own unmasked forward, so the model computes its dense function (e.g. as a
    distillation teacher)."""

    what = "masked"


def attach_weight_masks(model: nn.Module, masks: WeightMasks) -> WeightMaskHandles:
    """Make every masked projection of `model` compute with its masked (merged) weight; see the
    module docstring for the formula and caveats. Returns handles whose `remove()` undoes it."""
    from peft.tuners.lora import LoraLayer

    layers = masks.spec.decoder_layers(model)
    patched = []
    state = WeightMaskHandles(patched)  # the forwards read state.enabled
    try:
        for i, path in masks.keys():
            module = layers[i].get_submodule(path)
            name = _buffer_name((i, path))
            if getattr(module.__dict__.get("forward"), "_slimtune_weight_mask", False):
                raise SlimtuneError("weight masks are already attached to this model; call remove() on the first handles")
            if isinstance(module, LoraLayer):
                if type(module.get_base_layer()) is not nn.Linear or getattr(module, "fan_in_fan_out", False):
                    raise SlimtuneError(f"weight masks need an nn.Linear base under layer {i} {path}; quantised or Conv1D bases are not supported")
                variants = sorted({type(v).__name__ for v in module.lora_variant.values()})
                if variants:
                    raise SlimtuneError(f"weight masks do not support the LoRA variant {', '.join(variants)}; use lora, rslora or pissa")
                forward = _lora_forward(module, masks, name)
            elif type(module) is nn.Linear:
                forward = _linear_forward(module, masks, name)
            else:
                raise SlimtuneError(f"layer {i} {path} is a {type(module).__name__}, not a Linear; weight masks cannot wrap it")
            w = base_weight(module)
            if getattr(masks, name).device != w.device:  # once here, not on every forward
                setattr(masks, name, getattr(masks, name).to(w.device))
            had = "forward" in module.__dict__
            forward = _pausable(forward, module, module.__dict__.get("forward"), state)
            forward._slimtune_weight_mask = True
            patched.append((module, had, module.__dict__.get("forward"), forward))
            module.forward = forward
    except Exception:
        state.remove()
        raise
    return state


# ---- selection ------------------------------------------------------------------------------------




@torch.no_grad()
def zero_masked_weights(model: nn.Module, masks: WeightMasks | dict[Key, torch.Tensor]) -> None:
    """Write exact zeros into every pruned weight (masked_fill: 0·inf would be nan)."""
    masks = masks.as_dict() if isinstance(masks, WeightMasks) else masks
    layers = get_arch(model).decoder_layers(model)
    for (i, path), keep in masks.items():
        w = base_weight(layers[i].get_submodule(path))
        w.masked_fill_(~keep.to(device=w.device, dtype=torch.bool), 0.0)
