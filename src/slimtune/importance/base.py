"""The interface every importance criterion implements, and helpers to reach projection weights.

A criterion accumulates statistics with `update(model, batch)` and then reports either element
scores (one fp32 score per weight of every prunable projection, see `ElementScores`) or, for
layer-level criteria, one score per decoder layer. Higher always means more important.
`granularity.unit_scores` reduces element scores to heads, channels and layers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..models.arch import ArchSpec, base_weight, get_arch

# layer index -> projection path (spec.q, spec.mlp_out, ...) -> fp32 scores shaped like the base weight [out, in]
ElementScores = dict[int, dict[str, torch.Tensor]]


def projection_weights(model: nn.Module, spec: ArchSpec) -> Iterator[tuple[int, str, nn.Parameter]]:
    """(layer index, projection path, base weight) for every prunable projection, in layer order."""
    for i, layer in enumerate(spec.decoder_layers(model)):
        for path in spec.projections():
            yield i, path, base_weight(layer.get_submodule(path))


class Importance:
    name: str = "base"
    signed: bool = False  # True when scores are signed (g*w): sum per group first, then take |.|
    needs_data: bool = True  # False when update() is a no-op (magnitude, random)

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        self.model = model
        self.spec = spec or get_arch(model)

    def update(self, model: nn.Module, batch: torch.LongTensor) -> None:
        """Accumulate statistics from one batch of token ids [b, L]."""

    def element_scores(self) -> ElementScores:
        raise NotImplementedError(f"{type(self).__name__} gives no element scores")

    def layer_scores(self) -> torch.Tensor | None:
        """[num_layers] scores for layer-level criteria; None for element-level ones."""
        return None

    def remove(self) -> None:
        """Drop hooks and accumulated state; the model is left as it was before __init__."""
