"""The interface every importance criterion implements, and helpers to reach projection weights.

A criterion accumulates statistics with `update(model, batch)` and then reports either element
scores (one fp32 score per weight of every prunable projection, see `ElementScores`) or, for
layer-level criteria, one score per decoder layer. Higher always means more important.
`reduce.unit_scores` reduces element scores to heads, channels and layers.

Each criterion declares its capabilities as class attributes, and the registry and the pruner
check them before any work:
    scores      the granularities it can score: heads, channels, layers, weights (unstructured / N:M)
    mode        "one_shot" (score once from calibration data) or "progressive" (observe training)
    needs_data  whether `update` needs calibration batches
    needs_grad  whether it reads gradients (a backward pass per batch)
`check_coverage` adds what only an instance knows (e.g. which projections carry a LoRA adapter).
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


def effective_weights(model: nn.Module, spec: ArchSpec) -> Iterator[tuple[int, str, torch.Tensor]]:
    """(layer index, projection path, W) with W what the projection computes with: its base weight,
    plus the active LoRA delta s·B·A when PEFT wraps it unmerged. With plain LoRA at init the delta
    is 0, but PiSSA and LoRA-GA rewrite the base weight into a residual W − s·B₀A₀ when they attach,
    so a criterion that read the base weight alone would score the residual."""
    for i, layer in enumerate(spec.decoder_layers(model)):
        for path in spec.projections():
            module = layer.get_submodule(path)
            w = base_weight(module).detach()
            names = getattr(module, "active_adapters", None) or []
            if (hasattr(module, "get_delta_weight") and names and names[0] in getattr(module, "lora_A", {})
                    and not getattr(module, "merged", False) and not getattr(module, "disable_adapters", False)):
                w = w.float() + module.get_delta_weight(names[0]).detach().float()
            yield i, path, w


GRANULARITIES = ("heads", "channels", "layers", "weights")


class Importance:
    name: str = "base"
    scores: frozenset[str] = frozenset(GRANULARITIES)
    mode: str = "one_shot"
    needs_data: bool = True  # False when update() is a no-op (magnitude, random)
    needs_grad: bool = False
    signed: bool = False  # True when scores are signed (g*w): sum per group first, then take |.|

    @classmethod
    def scores_for(cls, options: dict) -> frozenset[str]:
        """`scores` for the given constructor options (a variant may score fewer granularities)."""
        return cls.scores

    @classmethod
    def needs_data_for(cls, options: dict) -> bool:
        """`needs_data` for the given constructor options (a criterion may vary with them)."""
        return cls.needs_data

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        self.model = model
        self.spec = spec or get_arch(model)

    def update(self, model: nn.Module, batch: torch.LongTensor) -> None:
        """Accumulate statistics from one batch of token ids [b, L]."""

    @classmethod
    def check_targets(cls, spec: ArchSpec, num_layers: int, targets: set[str], units: set[str], layers: list[int], options: dict) -> None:
        """Before the model is wrapped: raise SlimtuneError when the LoRA `targets` (leaf names)
        leave `units` in the prunable `layers` unscorable. `options` are the registry's."""

    @classmethod
    def check_settings(cls, config) -> None:
        """Raise SlimtuneError for method settings (a config.MethodConfig) this criterion cannot honour,
        before any model is loaded."""

    def check_coverage(self, units: set[str], layers: list[int]) -> None:
        """Raise SlimtuneError when this instance cannot score `units` in the prunable `layers`."""

    def element_scores(self) -> ElementScores:
        raise NotImplementedError(f"{type(self).__name__} gives no element scores")

    def layer_scores(self) -> torch.Tensor | None:
        """[num_layers] scores for layer-level criteria; None for element-level ones."""
        return None

    def remove(self) -> None:
        """Drop hooks and accumulated state; the model is left as it was before __init__."""
