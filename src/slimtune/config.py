"""Method configs: one dataclass per pruning method, made of the shared settings sections.

    LoRAPruneConfig   progressive: importance observed while LoRA fine-tunes (loraprune, grad)
    OneShotConfig     score once on calibration batches, prune, then LoRA recovery (taylor, ...)
    LayerwiseConfig   prune layer by layer on sequential calibration, then LoRA recovery (wanda, sparsegpt)

`slimtune.prune_(model, config, data)` dispatches on the config's type (api.py). The CLI is
generated from these same dataclasses (cli_gen.py), so every default is written once, here or
in the section it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .adapters.lora import MUTATING, LoraSettings
from .errors import SlimtuneError
from .importance.registry import get_criterion
from .pruning.pruner import PruneSettings
from .quant.qat import QuantSettings
from .training.averaging import AveragingSettings
from .training.distill import DistillSettings
from .training.loop import TrainSettings


@dataclass
class Sections:
    """The settings sections every method takes; the CLI's prune job holds the same ones."""

    prune: PruneSettings = field(default_factory=PruneSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    averaging: AveragingSettings = field(default_factory=AveragingSettings)
    quant: QuantSettings = field(default_factory=QuantSettings)

    def sections(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(Sections)}


@dataclass
class MethodConfig(Sections):
    criterion: str = "loraprune"
    mode = "progressive"  # which registered criteria this config accepts

    def __post_init__(self):
        entry = get_criterion(self.criterion)
        if entry.mode != self.mode:
            raise SlimtuneError(f"criterion '{self.criterion}' is {entry.mode.replace('_', '-')}; use {config_for(self.criterion).__name__} for it")
        entry.check_units(self.prune.units)  # before any model is loaded
        entry.cls.check_settings(self)
        if self.distill.enabled and self.lora.variant in MUTATING:
            raise SlimtuneError(f"--distill cannot use --lora-variant {self.lora.variant}: it rewrites the base weights, so no dense teacher is left; "
                                "use --lora-variant lora, rslora or dora")
        if self.train.lora_pro and self.lora.variant in ("dora", "adalora"):
            why = "DoRA renormalises" if self.lora.variant == "dora" else "AdaLoRA factors into three (P·diag(λ)·Q)"
            raise SlimtuneError(f"--lora-pro matches the step of W0 + s·B·A, which {why}; use --lora-variant lora, rslora, pissa or lora_ga")
        if self.prune.weight_level and self.lora.variant == "dora" and self.uses_lora:
            raise SlimtuneError("unstructured and N:M masks act on the merged weight, which DoRA renormalises; use --lora-variant lora, rslora or pissa")
        if self.quant.enabled:
            self._check_quant()

    @property
    def quant_structured(self) -> bool:
        """QAT that must shrink the model first: structured pruning to a sparsity above 0."""
        return self.quant.enabled and not self.prune.weight_level and self.prune.sparsity > 0

    def quant_start_step(self) -> int:
        """The step after which fake quantisation is on: --quant-start, else the end of a progressive
        pruning ramp, else 0."""
        if self.quant.quant_start is not None:
            return int(round(self.quant.quant_start * self.steps))
        if self.mode == "progressive" and self.prune.sparsity > 0:
            return self._schedule().end
        return 0

    def _schedule(self):
        from .pruning.schedules import Schedule

        s = self.prune
        return Schedule(s.sparsity, self.steps, s.schedule, 0.0, s.warmup, s.cooldown)

    def _check_quant(self) -> None:
        """Combinations QAT cannot honour, refused before any model is loaded."""
        q, spec = self.quant, self.quant.parsed
        if not self.uses_lora:
            raise SlimtuneError("--quant trains the quantisers with the LoRA adapters, but --recover-steps 0 leaves no training; pass --recover-steps N or drop --quant")
        if self.lora.variant == "dora":
            raise SlimtuneError("--quant fake-quantises the merged weight W0 + s·B·A, which DoRA renormalises; use --lora-variant lora, rslora or pissa")
        if self.averaging.enabled:
            raise SlimtuneError("--ema/--swa average the LoRA weights, but the quantiser steps were trained for the last ones; drop --ema/--swa with --quant")
        prunes_weights = self.prune.weight_level and (self.prune.sparsity > 0 or self.prune.granularity.strip().lower() == "nm")
        if prunes_weights and not spec.symmetric:
            raise SlimtuneError(f"unstructured and N:M pruning need a symmetric --quant (0 must be a code, so pruned weights stay 0); use {str(spec)[:-1]} with --quantizer lsq or fake")
        if self.quant_structured and self.distill.enabled:
            raise SlimtuneError("--distill with structured pruning and --quant: the model is shrunk when QAT starts, so no dense teacher is left; drop --distill, or prune with --granularity unstructured or nm")
        start = self.quant_start_step()
        # structured progressive QAT must wait for the ramp's end, so only the steps after it can host QAT
        end = self._schedule().end if self.quant_structured and self.mode == "progressive" else 0
        if start >= self.steps:
            fix = ("raise --cooldown (the steps after the pruning ramp, e.g. 0.3) or --steps" if end >= self.steps or q.quant_start is None
                   else "lower --quant-start, raise --cooldown or --steps")
            raise SlimtuneError(f"QAT would start at step {start} of {self.steps} and train no step; {fix}")
        if start < end:
            raise SlimtuneError(f"--quant-start {q.quant_start} turns QAT on at step {start}, before the pruning ramp ends at step {end}: group scales "
                                f"cannot follow channel removal; use --quant-start {end / self.steps:.2f} or more (or leave it out)")

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
    # l0 only: where each gate's log α starts. 2, not Sheared-LLaMA's 5 (meant for thousands of steps):
    # at 5 about 97% of draws clamp to 1 and pass no gradient, and the 48-step default run ended at 3.45x
    # dense at 512-token windows against 1.91x at 2 and 2.17x at CoFi's 0 (default_run.json l0_1, l0_2_init2, l0_3_init0)
    l0_init: float = 2.0

    def criterion_options(self) -> dict:
        """Constructor options of the criterion that come from this config."""
        return {"init": self.l0_init} if self.criterion == "l0" else {}


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
