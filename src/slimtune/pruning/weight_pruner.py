"""Unstructured and N:M pruning with the same interface as the structured `Pruner`.

The masks act on the *merged* weight W0 + s·BA (see weight_masks.py), as LoRAPrune requires, so
merging the adapters keeps every pruned weight exactly zero. Unstructured masks ramp with the
schedule; an N:M pattern cannot ramp, so it is applied once the ramp ends (and at `finalize`),
and the cool-down steps fine-tune with it in place. The saved model keeps its shapes: zeros are
stored densely (use a sparse kernel or format downstream to turn them into speed).
"""

from __future__ import annotations

from torch import nn

from ..errors import SlimtuneError
from ..masking.weights import WeightMasks, attach_weight_masks
from ..models.arch import base_layer, own_params
from .pruner import ScheduledPruner, check_criterion, excluded_layers, refuse_ties
from .weight_selection import module_fraction_for, parse_nm, select_nm, select_unstructured


def _prunable_share(model, spec, excluded) -> float:
    """Masked projection weights / all decoder-layer parameters."""
    layers = spec.decoder_layers(model)
    total = own_params(layers)
    masked = sum(
        base_layer(m).weight.numel()
        for i, layer in enumerate(layers) if i not in excluded
        for m in (layer.get_submodule(path) for path in spec.projections())
    )
    return masked / total


class WeightPruner(ScheduledPruner):
    def __init__(self, model: nn.Module, settings, importance, total_steps: int = 1):
        from ..models.arch import get_arch

        spec = get_arch(model)
        excluded = excluded_layers(settings, len(spec.decoder_layers(model)))
        nm = parse_nm(settings.nm) if settings.granularity == "nm" else None
        if nm is not None:
            # N:M fixes the fraction of every masked module; express it as a decoder-level target
            target = min((1 - nm[0] / nm[1]) * _prunable_share(model, spec, excluded), 0.999)
        elif settings.ranking != "local":
            raise SlimtuneError("unstructured pruning ranks within each module; use --ranking local")
        else:
            target = settings.sparsity
        super().__init__(model, settings, importance, target, total_steps)
        self.excluded, self.nm = excluded, nm
        self.masks = WeightMasks(model, spec, excluded=excluded)
        check_criterion(importance, settings, self.prunable)
        self.gates = attach_weight_masks(model, self.masks)

    @property
    def prunable(self) -> list[int]:
        return sorted({i for i, _ in self.masks.keys()})

    def _scores(self):
        name = getattr(self.importance, "name", "?")
        scores = self.importance.element_scores()
        if not scores:
            raise SlimtuneError(f"criterion '{name}' gives no per-weight scores, so it cannot drive unstructured or N:M pruning; use loraprune, taylor or magnitude")
        for i, path in self.masks.keys():
            s = scores.get(i, {}).get(path)
            if s is not None:
                refuse_ties(name, s[self.masks.mask(i, path).to(s.device)].flatten(), "weight", f"in layer {i} {path}")
        return scores

    def prune_to(self, sparsity: float) -> dict:
        if self.nm is not None:
            select_nm(self.masks, self._scores(), *self.nm)
        else:
            p = module_fraction_for(self.model, self.masks.spec, self.excluded, sparsity)
            select_unstructured(self.masks, self._scores(), p)
        self.current.fill_(sparsity)
        achieved = self.masks.sparsity_of_decoder(self.model)
        layers = self.masks.spec.decoder_layers(self.model)
        before = own_params(layers)
        self.last_info = {"target": self.target, "achieved": achieved, "pattern": self.settings.nm if self.nm else "unstructured",
                          "decoder_params_before": before, "decoder_params_after": before - self.masks.pruned()}
        return self.last_info

    def step(self, t: int) -> dict | None:
        if self.nm is None:
            return super().step(t)
        if t >= self.schedule.end and float(self.current) == 0:  # an N:M pattern cannot ramp
            return self.prune_to(self.target)
        return None
