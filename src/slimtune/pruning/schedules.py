"""Sparsity schedules: plain functions from optimiser step to target sparsity.

Cubic follows Zhu & Gupta (arXiv 1710.01878), as used by LoRAPrune, movement pruning and SEVEN:
v_t = v_f + (v_0 - v_f) * (1 - (t - t_i) / (T - t_i - t_f))^3 on the ramp, v_0 before, v_f after.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SlimtuneError, check_sparsity

SCHEDULES = ("cubic", "linear", "constant")


@dataclass(frozen=True)
class Schedule:
    final: float
    total_steps: int
    kind: str = "cubic"  # cubic | linear | constant
    initial: float = 0.0
    warmup: float = 0.1  # fraction of total steps before the ramp starts
    cooldown: float = 0.1  # fraction of total steps after the ramp ends

    def __post_init__(self):
        check_sparsity(self.final)
        if self.kind not in SCHEDULES:
            raise SlimtuneError(f"unknown schedule '{self.kind}'; choose {', '.join(SCHEDULES)}")
        if not (0 <= self.warmup and 0 <= self.cooldown and self.warmup + self.cooldown < 1):
            raise SlimtuneError("warmup + cooldown fractions must be non-negative and sum to less than 1")
        if self.kind != "constant" and self.ramp_steps < 1:
            raise SlimtuneError(
                f"the schedule cannot reach sparsity {self.final} within {self.total_steps} steps "
                f"(warmup {self.warmup}, cooldown {self.cooldown} leave no ramp); raise --steps or lower the warmup/cooldown fractions"
            )

    @property
    def start(self) -> int:
        return int(round(self.warmup * self.total_steps))

    @property
    def end(self) -> int:
        return self.total_steps - int(round(self.cooldown * self.total_steps))

    @property
    def ramp_steps(self) -> int:
        return self.end - self.start

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.final
        if step <= self.start:
            return self.initial
        if step >= self.end:
            return self.final
        progress = (step - self.start) / self.ramp_steps
        if self.kind == "linear":
            return self.initial + (self.final - self.initial) * progress
        return self.final + (self.initial - self.final) * (1 - progress) ** 3
