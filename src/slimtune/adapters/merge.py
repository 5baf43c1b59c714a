"""Merge LoRA adapters into the base weights without undoing the sparsity.

PEFT's `merge_and_unload` writes W0 + s·B·A into every adapted projection. B·A is dense, so it
brings back values in pruned rows/columns and pruned weights; the masks are written back right
after. PiSSA needs nothing special: its frozen base is the residual W0 − s·B₀A₀, and the merge
is again W_res + s·B·A. DoRA merges to m ⊙ (W0 + s·B·A)/‖·‖_row, and zeroing the pruned entries
afterwards is still exact (the forward uses the merged weight as is).

Gates (gates.py) hooked on a PEFT-wrapped projection vanish with the wrapper when it is unloaded;
the zeros written here make the merged forward equal the gated one without them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SlimtuneError
from ..masking.gates import zero_pruned_weights
from ..masking.structured import StructuredMasks
from ..models.arch import get_arch

WeightMasks = dict[tuple[int, str], torch.Tensor]  # (layer, projection path) -> bool [out, in], True = kept


@torch.no_grad()
def merge_keep_masks(peft_model: nn.Module, masks: StructuredMasks | None = None, weight_masks: WeightMasks | None = None) -> nn.Module:
    """Merge and unload the adapters, then make every pruned unit/weight exactly zero again.
    Returns the plain HF model."""
    if not hasattr(peft_model, "merge_and_unload"):
        raise SlimtuneError("merge_keep_masks needs the PeftModel returned by attach_lora; this model has no adapters")
    merged = peft_model.merge_and_unload()
    if masks is not None:
        zero_pruned_weights(merged, masks)
    if weight_masks:
        layers = get_arch(merged).decoder_layers(merged)
        for (i, path), keep in weight_masks.items():
            w = layers[i].get_submodule(path).weight
            # masked_fill, not multiply: 0 * inf would be nan, and pruned must mean exactly 0
            w.masked_fill_(~keep.to(device=w.device, dtype=torch.bool), 0.0)
    return merged
