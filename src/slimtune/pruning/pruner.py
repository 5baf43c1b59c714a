"""The pruner owns the masks and the schedule; it owns no training loop.

`step(t)` is called after every optimiser step t (1-based). Every `prune_every` steps, and once
the ramp has ended, it asks the importance for unit scores and grows the masks to the scheduled
sparsity. Masks act as gates (see gates.py), so they stay applied without touching the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SlimtuneError
from ..importance.reduce import unit_scores
from ..masking.gates import attach_gates
from ..masking.structured import StructuredMasks
from .granularity import parse_granularity
from .schedules import Schedule
from .selection import default_excluded_layers, select


@dataclass
class PruneSettings:
    sparsity: float = 0.2  # fraction of decoder-layer parameters to remove
    granularity: str = "heads,channels"
    head_mode: str = "kv_groups"
    ranking: str = "local"
    exclude_layers: list[int] | None = None  # None: first int(0.1 L) layers and the last one
    layer_share: float = 0.5  # with layers mixed in: share of removed parameters taken as whole layers
    schedule: str = "cubic"
    warmup: float = 0.1
    cooldown: float = 0.1
    prune_every: int = 10
    normalise: str = "l2"
    nm: str = "2:4"  # with granularity "nm": n kept weights in every m consecutive inputs
    history: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise SlimtuneError(f"sparsity {self.sparsity} is outside [0, 1); pass a fraction such as 0.2")
        if self.prune_every < 1:
            raise SlimtuneError("--prune-every must be at least 1")
        # unstructured / N:M masks live on weights (weight_pruner.py), not on heads or channels
        self.gran = None if self.weight_level else parse_granularity(self.granularity, self.head_mode)

    @property
    def weight_level(self) -> bool:
        return self.granularity.strip().lower() in ("unstructured", "nm")


def scores_from(importance, masks: StructuredMasks, normalise: str = "l2") -> list[dict]:
    """Unit scores from any criterion: its own `unit_scores()` if it has one (LoRAPrune keeps
    an EMA per unit), else reduced from element scores; layer-level scores override."""
    if hasattr(importance, "unit_scores"):
        scores = importance.unit_scores()
    else:
        scores = unit_scores(masks.spec, masks.geometry, importance.element_scores(), getattr(importance, "signed", False), normalise)
    layer = importance.layer_scores() if hasattr(importance, "layer_scores") else None
    if layer is not None:
        for i, s in enumerate(scores):
            s["layer"] = float(layer[i])
    return scores


def make_pruner(model: nn.Module, settings: PruneSettings, importance, total_steps: int = 1):
    """The structured `Pruner`, or the `WeightPruner` for unstructured and N:M granularity."""
    if settings.weight_level:
        from .weight_pruner import WeightPruner

        return WeightPruner(model, settings, importance, total_steps)
    return Pruner(model, settings, importance, total_steps)


class ScheduledPruner(nn.Module):
    """Schedule bookkeeping shared by the structured and the weight-level pruner.

    Subclasses set `masks` and `gates` and implement `prune_to(sparsity) -> info`.
    """

    def __init__(self, model: nn.Module, settings: PruneSettings, importance, target: float, total_steps: int):
        super().__init__()
        self.settings = settings
        self.importance = importance
        self.target = target
        self._model = [model]  # not a submodule: keep it out of state_dict
        self.schedule = Schedule(target, max(total_steps, 1), settings.schedule, 0.0, settings.warmup, settings.cooldown)
        self.register_buffer("current", torch.zeros(()))
        self.last_info: dict = {}

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def prune_to(self, sparsity: float) -> dict:
        raise NotImplementedError

    def step(self, t: int) -> dict | None:
        """Call after optimiser step t (1-based). Returns selection info when masks changed."""
        target = self.schedule(t)
        due = t % self.settings.prune_every == 0 or t >= self.schedule.end
        if due and target > float(self.current) + 1e-9:
            return self.prune_to(target)
        return None

    def finalize(self) -> dict:
        if float(self.current) < self.target - 1e-9 or not self.last_info:
            return self.prune_to(self.target)
        return self.last_info

    def remove_gates(self) -> None:
        self.gates.remove()


class Pruner(ScheduledPruner):
    def __init__(self, model: nn.Module, settings: PruneSettings, importance, total_steps: int = 1):
        super().__init__(model, settings, importance, settings.sparsity, total_steps)
        self.masks = StructuredMasks(model)
        n = len(self.masks)
        self.excluded = default_excluded_layers(n) if settings.exclude_layers is None else set(settings.exclude_layers)
        bad = [i for i in self.excluded if not 0 <= i < n]
        if bad:
            raise SlimtuneError(f"--exclude-layers {bad} out of range; the model has layers 0..{n - 1}")
        self.gates = attach_gates(model, self.masks)

    def prune_to(self, sparsity: float) -> dict:
        scores = scores_from(self.importance, self.masks, self.settings.normalise)
        info = select(
            self.model, self.masks, scores, self.settings.gran, sparsity,
            ranking=self.settings.ranking, excluded=self.excluded, layer_share=self.settings.layer_share,
            final_sparsity=self.settings.sparsity,
        )
        self.current.fill_(sparsity)
        self.last_info = info
        return info
