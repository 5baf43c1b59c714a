"""The pruner owns the masks and the schedule; it owns no training loop.

`step(t)` is called after every optimiser step t (1-based). Every `prune_every` steps, and once
the ramp has ended, it asks the importance for unit scores and grows the masks to the scheduled
sparsity. Masks act as gates (masking/gates.py), so they stay applied without touching weights.

Before any work, `make_pruner` checks that the criterion can score the chosen granularity, and
every selection refuses scores that cannot rank units (missing, non-finite, all equal): choosing
among ties would prune by index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..cli_gen import cli_help
from ..errors import SlimtuneError, check_sparsity
from ..importance.reduce import unit_scores
from ..masking.gates import attach_gates, check_gated
from ..masking.structured import StructuredMasks
from .granularity import WEIGHT_LEVEL, parse_granularity, units_of
from .schedules import SCHEDULES, Schedule
from .selection import default_excluded_layers, select


@dataclass
class PruneSettings:
    sparsity: float = field(default=0.2, metadata=cli_help("fraction of decoder-layer parameters to remove, in [0, 1)"))
    # channels by default: on the bundled GQA model (3 KV groups) a head unit is a third of a layer's
    # attention, and heads,channels at 20% ended at 2.56x dense perplexity against 1.65x for channels
    # (benchmarks/default_run.py v3 / v4; one-shot: benchmarks/oneshot_structured.py)
    granularity: str = field(default="channels", metadata=cli_help("heads, channels, layers or a comma-separated mix; or unstructured, or nm (see --nm); "
                                                                   "default channels: MLP channels only, which kept quality far better than heads on GQA models"))
    head_mode: str = field(default="kv_groups", metadata=cli_help("GQA: remove whole KV groups, or equal numbers of query heads per group", choices=("kv_groups", "q_heads")))
    ranking: str = field(default="local", metadata=cli_help("local: the same ratio in every prunable layer; global: layers compete", choices=("local", "global")))
    exclude_layers: list[int] | None = field(default=None, metadata=cli_help("comma-separated layer indices never pruned (default: the first 10% of layers, at least one, and the last)"))
    layer_share: float = field(default=0.5, metadata=cli_help("with layers in a mix: share of the removal taken as whole layers"))
    schedule: str = field(default="cubic", metadata=cli_help("sparsity ramp", choices=SCHEDULES))
    warmup: float = field(default=0.1, metadata=cli_help("fraction of steps before pruning starts"))
    cooldown: float = field(default=0.1, metadata=cli_help("fraction of steps after the target is reached"))
    prune_every: int | None = field(default=None, metadata=cli_help("optimiser steps between mask updates (default: steps/10, at least 1)"))
    normalise: str = field(default="l2", metadata=cli_help("per-projection normalisation of unit scores", choices=("l2", "none")))
    nm: str = field(default="2:4", metadata=cli_help("with --granularity nm: keep n weights in every m consecutive inputs"))

    def __post_init__(self):
        check_sparsity(self.sparsity)
        if self.prune_every is not None and self.prune_every < 1:
            raise SlimtuneError(f"--prune-every {self.prune_every} must be at least 1")
        if not 0.0 <= self.layer_share <= 1.0:
            raise SlimtuneError(f"--layer-share {self.layer_share} is outside [0, 1]; pass a fraction such as 0.5")
        # unstructured / N:M masks live on weights (weight_pruner.py), not on heads or channels
        self.gran = None if self.weight_level else parse_granularity(self.granularity, self.head_mode)
        if self.granularity.strip().lower() == "nm":
            from .weight_selection import parse_nm

            parse_nm(self.nm)

    @property
    def weight_level(self) -> bool:
        return self.granularity.strip().lower() in WEIGHT_LEVEL

    @property
    def units(self) -> set[str]:
        """What the criterion must score: {"heads", "channels", "layers"} subsets, or {"weights"}."""
        return units_of(self.granularity)

    def every(self, total_steps: int) -> int:
        return self.prune_every or max(1, total_steps // 10)


def scores_from(importance, masks: StructuredMasks, normalise: str = "l2") -> list[dict]:
    """Unit scores from any criterion: its own `unit_scores()` if it has one (LoRAPrune keeps
    an EMA per unit), else reduced from element scores; layer-level scores override."""
    if hasattr(importance, "unit_scores"):
        scores = importance.unit_scores()
    else:
        elements = importance.element_scores() if importance.scores & {"heads", "channels", "weights"} else {}
        scores = unit_scores(masks.spec, masks.geometry, elements, importance.signed, normalise)
    layer = importance.layer_scores()
    if layer is not None:
        for i, s in enumerate(scores):
            s["layer"] = float(layer[i])
    return scores


def refuse_ties(name: str, values: torch.Tensor, unit: str, where: str) -> None:
    """Refuse to rank `values` (the live candidates) when they are missing, non-finite or all
    equal: any choice among them would be by index, not by importance."""
    if values.numel() < 2:
        return
    problem = None
    if not bool(torch.isfinite(values).all()):
        problem = "non-finite"
    elif bool((values == values[0]).all()):
        problem = "all zero" if float(values[0]) == 0 else "all equal"
    if problem:
        raise SlimtuneError(
            f"criterion '{name}' gives {problem} {unit} scores {where}, so pruning would go by index; "
            f"use a criterion that scores {unit} (e.g. taylor or loraprune with adapters on every projection) or another --granularity"
        )


def check_criterion(importance, settings: PruneSettings, layers: list[int]) -> None:
    """Before any work: the criterion declares it can score these units, and this instance covers them."""
    from ..importance.registry import CRITERIA

    entry = CRITERIA.get(importance.name)
    if entry is None or entry.cls is not type(importance):  # an unregistered criterion: read the class
        missing = settings.units - importance.scores
        if missing:
            raise SlimtuneError(f"criterion '{importance.name}' cannot score {', '.join(sorted(missing))}; pick another --granularity")
    else:
        entry.check_units(settings.units)
    importance.check_coverage(settings.units, layers)


def make_pruner(model: nn.Module, settings: PruneSettings, importance, total_steps: int = 1):
    """The structured `Pruner`, or the `WeightPruner` for unstructured and N:M granularity."""
    if settings.weight_level:
        from .weight_pruner import WeightPruner

        return WeightPruner(model, settings, importance, total_steps)
    return Pruner(model, settings, importance, total_steps)


def excluded_layers(settings: PruneSettings, num_layers: int) -> set[int]:
    excluded = default_excluded_layers(num_layers) if settings.exclude_layers is None else set(settings.exclude_layers)
    bad = sorted(i for i in excluded if not 0 <= i < num_layers)
    if bad:
        raise SlimtuneError(f"--exclude-layers {bad} out of range; the model has layers 0..{num_layers - 1}")
    if len(excluded) >= num_layers:
        raise SlimtuneError(f"--exclude-layers leaves no layer to prune (the model has {num_layers}); exclude fewer layers")
    return excluded


class ScheduledPruner(nn.Module):
    """Schedule bookkeeping shared by the structured and the weight-level pruner.

    Subclasses set `masks`, `gates` and `excluded`, and implement `prune_to(sparsity) -> info`.
    """

    def __init__(self, model: nn.Module, settings: PruneSettings, importance, target: float, total_steps: int):
        super().__init__()
        self.settings = settings
        self.importance = importance
        self.target = target
        self._model = [model]  # not a submodule: keep it out of state_dict
        self.prune_every = settings.every(total_steps)
        self.schedule = Schedule(target, max(total_steps, 1), settings.schedule, 0.0, settings.warmup, settings.cooldown)
        self.register_buffer("current", torch.zeros(()))
        self.last_info: dict = {}

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    @property
    def prunable(self) -> list[int]:
        return [i for i in range(len(self.masks)) if i not in self.excluded]

    def prune_to(self, sparsity: float) -> dict:
        raise NotImplementedError

    def step(self, t: int) -> dict | None:
        """Call after optimiser step t (1-based). Returns selection info when masks changed."""
        target = self.schedule(t)
        due = t % self.prune_every == 0 or t >= self.schedule.end
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
        self.excluded = excluded_layers(settings, len(self.masks))
        check_criterion(importance, settings, self.prunable)
        self.gates = attach_gates(model, self.masks, settings.gran.names)

    def _check_scores(self, scores: list[dict]) -> None:
        name = getattr(self.importance, "name", type(self.importance).__name__)
        gran = self.settings.gran
        alive = [i for i in self.prunable if self.masks.layer(i).item() != 0]
        for i in alive:
            if gran.heads:
                refuse_ties(name, torch.as_tensor(scores[i]["heads"])[self.masks.heads(i).bool().cpu()], "head", f"in layer {i}")
            if gran.channels:
                refuse_ties(name, torch.as_tensor(scores[i]["channels"])[self.masks.channels(i).bool().cpu()], "channel", f"in layer {i}")
        if gran.layers:
            refuse_ties(name, torch.tensor([float(scores[i]["layer"]) for i in alive]), "layer", "across the prunable layers")

    def prune_to(self, sparsity: float) -> dict:
        scores = scores_from(self.importance, self.masks, self.settings.normalise)
        self._check_scores(scores)
        info = select(
            self.model, self.masks, scores, self.settings.gran, sparsity,
            ranking=self.settings.ranking, excluded=self.excluded, layer_share=self.settings.layer_share,
            final_sparsity=self.settings.sparsity,
        )
        check_gated(self.masks, self.gates)  # masks on the CPU: no device sync
        self.current.fill_(sparsity)
        self.last_info = info
        return info
