"""The interface every importance criterion implements, and helpers to reach projection weights.

A criterion accumulates statistics with `update(model, batch)` and then reports either element
scores (one fp32 score per weight of every prunable projection, see `ElementScores`) or, for
layer-level criteria, one score per decoder layer. Higher always means more important.
`granularity.unit_scores` reduces element scores to heads, channels and layers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..models.arch import ArchSpec, base_layer, get_arch

# layer index -> projection path (spec.q, spec.mlp_out, ...) -> fp32 scores shaped like the base weight [out, in]
ElementScores = dict[int, dict[str, torch.Tensor]]


def base_weight(module: nn.Module) -> nn.Parameter:
    """The frozen base weight of a projection, also when PEFT has wrapped it in a LoRA layer."""
    return base_layer(module).weight


def projection_weights(model: nn.Module, spec: ArchSpec) -> Iterator[tuple[int, str, nn.Parameter]]:
    """(layer index, projection path, base weight) for every prunable projection, in layer order."""
    for i, layer in enumerate(spec.decoder_layers(model)):
        for path in spec.projections():
            yield i, path, base_weight(layer.get_submodule(path))


def causal_lm_loss(model: nn.Module, batch: torch.LongTensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `batch` [b, L]: the loss HF computes with labels=batch.

    Computed here rather than by HF, which casts logits to fp32: an fp64 model keeps an fp64 loss,
    so the Taylor checks in the tests can reach below fp32 rounding. Half precision goes up to fp32.
    """
    batch = batch.to(model.get_input_embeddings().weight.device)
    logits = model(input_ids=batch, use_cache=False).logits  # [b, L, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # position t predicts token t+1; the last position has no target (padding the labels, not
    # slicing the logits, avoids copying [b, L, V])
    labels = F.pad(batch[:, 1:], (0, 1), value=-100)  # [b, L]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


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
