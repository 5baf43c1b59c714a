"""Masks decided up front (layer-wise one-shot pruning), held in place while LoRA recovers.

The same interface the training loop and `api._finish` use for the scheduled pruners (`masks`,
`gates`, `current`, `step`, `finalize`, `remove_gates`), with nothing left to schedule: the weight
masks act on the merged weight (W0 + s·B·A) ⊙ M, so neither the adapter, the optimiser state nor
weight decay can bring a pruned weight back, and the merge keeps every zero.
"""

from __future__ import annotations

import torch
from torch import nn

from ..masking.weights import WeightMasks, attach_weight_masks
from ..models.arch import own_params


class FixedMasks(nn.Module):
    def __init__(self, model: nn.Module, masks: WeightMasks, pattern: str, target: float):
        super().__init__()
        self.masks = masks
        self._model = [model]
        self.gates = attach_weight_masks(model, masks)
        before = own_params(masks.spec.decoder_layers(model))
        self.register_buffer("current", torch.tensor(masks.sparsity_of_decoder(model)))
        self.info = {"target": target, "achieved": float(self.current), "shortfall": max(0.0, target - float(self.current)),
                     "pattern": pattern, "decoder_params_before": before, "decoder_params_after": before - masks.pruned()}

    def step(self, t: int) -> None:
        return None

    def finalize(self) -> dict:
        return self.info

    def remove_gates(self) -> None:
        self.gates.remove()
