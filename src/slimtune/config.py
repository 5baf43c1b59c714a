"""Method configs: one dataclass per pruning method, made of the shared settings sections.

    LoRAPruneConfig   progressive: importance observed while LoRA fine-tunes (loraprune, grad)
    OneShotConfig     score once on calibration batches, prune, then LoRA recovery (taylor, ...)
    LayerwiseConfig   prune layer by layer on sequential calibration, then LoRA recovery (wanda, sparsegpt)

`slimtune.prune_(model, config, data)` dispatches on the config's type (api.py). The CLI is
generated from these same dataclasses (cli_gen.py), so every default is written once, here or
in the section it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .adapters.lora import LoraSettings
from .errors import SlimtuneError
from .importance.registry import get_criterion
from .pruning.pruner import PruneSettings
from .training.averaging import AveragingSettings
from .training.distill import DistillSettings
from .training.loop import TrainSettings


@dataclass
class MethodConfig:
    prune: PruneSettings = field(default_factory=PruneSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    averaging: AveragingSettings = field(default_factory=AveragingSettings)
    criterion: str = "loraprune"
    mode = "progressive"  # which registered criteria this config accepts

    def __post_init__(self):
        entry = get_criterion(self.criterion)
        if entry.mode != self.mode:
            raise SlimtuneError(f"criterion '{self.criterion}' is {entry.mode.replace('_', '-')}; use {config_for(self.criterion).__name__} for it")
        entry.check_units(self.prune.units)  # before any model is loaded
        if self.distill.enabled and self.lora.variant == "pissa":
            raise SlimtuneError("--distill cannot use PiSSA: it rewrites the base weights, so no dense teacher is left; use --lora-variant lora, rslora or dora")
        if self.prune.weight_level and self.lora.variant == "dora" and self.uses_lora:
            raise SlimtuneError("unstructured and N:M masks act on the merged weight, which DoRA renormalises; use --lora-variant lora, rslora or pissa")

    @property
    def uses_lora(self) -> bool:
        return True

    @property
    def steps(self) -> int:
        return self.train.steps


@dataclass
class LoRAPruneConfig(MethodConfig):
    """LoRAPrune (arXiv 2305.18403): prune progressively while fine-tuning LoRA adapters."""

    criterion: str = "loraprune"


@dataclass
class OneShotConfig(MethodConfig):
    """Score once on calibration data, prune to the target, then recover with LoRA."""

    criterion: str = "taylor"
    calib_batches: int = 16  # 16 x 2 x 256 = 8K tokens at the quick preset
    recover_steps: int | None = None  # None: train.steps; 0: no recovery
    mode = "one_shot"

    def __post_init__(self):
        super().__post_init__()
        if self.calib_batches < 1:
            raise SlimtuneError(f"--calib-batches {self.calib_batches} must be at least 1")
        if self.recover_steps is not None and self.recover_steps < 0:
            raise SlimtuneError(f"--recover-steps {self.recover_steps} must not be negative (0 = no recovery)")

    @property
    def uses_lora(self) -> bool:
        return self.steps > 0

    @property
    def steps(self) -> int:
        return self.train.steps if self.recover_steps is None else self.recover_steps


@dataclass
class LayerwiseConfig(OneShotConfig):
    """Prune layer by layer, each layer calibrated on the outputs of the already-pruned earlier ones
    (Wanda, SparseGPT), then recover with LoRA while the masks keep every zero."""

    criterion: str = "wanda"
    blocksize: int = 128  # SparseGPT: columns per block of lazy updates
    percdamp: float = 0.01  # SparseGPT: dampening, a fraction of the Hessian's mean diagonal
    mode = "layerwise"

    def __post_init__(self):
        super().__post_init__()
        if not self.prune.weight_level:
            raise SlimtuneError(f"criterion '{self.criterion}' prunes single weights; pass --granularity unstructured or nm")


def config_for(criterion: str) -> type[MethodConfig]:
    """The config type that runs a registered criterion."""
    return {"progressive": LoRAPruneConfig, "one_shot": OneShotConfig, "layerwise": LayerwiseConfig}[get_criterion(criterion).mode]
