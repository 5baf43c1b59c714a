"""What a PEFT LoRA-family layer holds: its active adapter's factors and scale.

Plain LoRA (and rsLoRA, DoRA, PiSSA, LoRA-GA) keeps A and B as Linear modules with a scale s:
ΔW = s·B·A. AdaLoRA keeps bare parameters P (lora_B), λ (lora_E) and Q (lora_A), and divides
its scale by the initial rank: ΔW = s·P·diag(λ)·Q. These accessors read either kind, so that the
masked and quantised forwards (masking/, quant/) and the criteria need not know which one it is.
They sit with the arch helpers because masking must not import adapters (tests/test_layout.py).
"""

from __future__ import annotations

from torch import nn


def active_adapter(lora_module: nn.Module) -> str:
    return lora_module.active_adapters[0]


def is_adalora(lora_module: nn.Module) -> bool:
    return hasattr(lora_module, "lora_E")


def scaling(lora_module: nn.Module) -> float:
    """s of the active adapter: α/r, or α/√r with rsLoRA; α/(init_r + 1e-5) with AdaLoRA."""
    name = active_adapter(lora_module)
    s = float(lora_module.scaling[name])
    return s / (float(lora_module.ranknum[name]) + 1e-5) if is_adalora(lora_module) else s


def lora_weights(lora_module: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """(A [r, in], B [out, r]) trained weights of the active adapter (AdaLoRA: Q and P, without λ)."""
    name = active_adapter(lora_module)
    if is_adalora(lora_module):  # PEFT keeps AdaLoRA's factors as bare parameters
        return lora_module.lora_A[name], lora_module.lora_B[name]
    return lora_module.lora_A[name].weight, lora_module.lora_B[name].weight


def adapter_params(lora_module: nn.Module) -> list[nn.Parameter]:
    """Every trained factor of the active adapter: A and B, and AdaLoRA's λ [r, 1]."""
    A, B = lora_weights(lora_module)
    return [A, lora_module.lora_E[active_adapter(lora_module)], B] if is_adalora(lora_module) else [A, B]


def adapter_product(lora_module: nn.Module):
    """(A, B, s) with ΔW = s·B·A, differentiable: for AdaLoRA A = diag(λ)·Q (λ ⊙ Q, a new tensor)."""
    A, B = lora_weights(lora_module)
    if is_adalora(lora_module):
        A = A * lora_module.lora_E[active_adapter(lora_module)]
    return A, B, scaling(lora_module)
