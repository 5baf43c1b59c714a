"""Weight averaging of the trainable (LoRA) parameters: EMA and SWA, for export or evaluation.

Only the parameters that train are averaged (a LoRA-sized copy, never the frozen base), held in at
least fp32 next to the parameters. Call `update(step)` after every optimiser step;
`apply_to("ema" | "swa")` swaps the averages into the parameters until `restore()` (or the end of a
`with` block), so an export can choose "last", "ema" or "swa" weights.

EMA (exponential moving average of the weights, Polyak & Juditsky 1992; as used e.g. by
Tarvainen & Valpola 2017, arXiv 1703.01780), decay d in [0, 1):

    θ̄_1 = θ_1,   θ̄_t = d·θ̄_{t-1} + (1 - d)·θ_t

Convention: the average STARTS AT THE FIRST SNAPSHOT, with no bias correction (the convention of
`torch.optim.swa_utils.AveragedModel` and `get_ema_multi_avg_fn`, whose update this uses). After
k updates θ̄ = d^(k-1)·θ_1 + Σ_{j=2..k} (1-d)·d^(k-j)·θ_j: the weights sum to 1, so a constant θ
is reproduced exactly. (The other convention, θ̄_0 = 0 divided by 1 - d^t, is not mixed in.) The
memory is about 1/(1 - d) steps: with fewer steps than that the first snapshot still weighs
d^(k-1), so short runs want a smaller decay.

SWA (stochastic weight averaging, Izmailov et al. 2018, arXiv 1803.05407): the equal-weight mean of
the snapshots after each of the last ceil(fraction · total_steps) optimiser steps, i.e. steps
t > total_steps - ceil(fraction · total_steps), as a running mean (`get_swa_multi_avg_fn`). The
paper averages once per epoch or LR cycle from about 75 % of the budget; here every step of the
window is a snapshot. `AveragedModel` itself is not used: it deep-copies the whole model, base
weights included.

Caveat: A and B are averaged separately, so the averaged update s·B̄·Ā is not the mean of the
s·B·A products; for small steps near the end of training the difference is second order.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn, get_swa_multi_avg_fn

from ..errors import SlimtuneError

DEFAULT_EMA_DECAY = 0.999  # what a bare `--ema` means
DEFAULT_SWA_FRACTION = 0.25  # what a bare `--swa` means: average the last quarter (SWA paper: from 75 %)
EXPORT_CHOICES = ("last", "ema", "swa")
EXPORT_FLAG = "--export-weights"


@dataclass
class AveragingSettings:
    ema: float | None = field(default=None, metadata={"const": DEFAULT_EMA_DECAY, "help": f"keep an exponential moving average of the LoRA weights with this decay in [0, 1) (bare flag: {DEFAULT_EMA_DECAY}, for runs of thousands of steps); memory ≈ 1/(1 - decay) steps, so short runs want e.g. 0.9"})
    swa: float | None = field(default=None, metadata={"const": DEFAULT_SWA_FRACTION, "help": f"keep the equal-weight mean of the LoRA weights over the last FRACTION of the steps, in (0, 1] (bare flag: {DEFAULT_SWA_FRACTION})"})
    export: str = field(default="last", metadata={"help": "which adapter weights to merge and export", "choices": EXPORT_CHOICES, "flag": EXPORT_FLAG})

    def __post_init__(self):
        if self.ema is not None:
            try:
                self.ema = float(self.ema)
            except (TypeError, ValueError):
                raise SlimtuneError(f"--ema takes a decay in [0, 1), got {self.ema!r}; for example --ema {DEFAULT_EMA_DECAY}") from None
            if not 0.0 <= self.ema < 1.0:
                raise SlimtuneError(f"--ema decay must be in [0, 1), got {self.ema}; for example --ema {DEFAULT_EMA_DECAY}")
        if self.swa is not None:
            try:
                self.swa = float(self.swa)
            except (TypeError, ValueError):
                raise SlimtuneError(f"--swa takes a fraction of the steps in (0, 1], got {self.swa!r}; for example --swa {DEFAULT_SWA_FRACTION}") from None
            if not 0.0 < self.swa <= 1.0:
                raise SlimtuneError(f"--swa fraction must be in (0, 1], got {self.swa}; for example --swa {DEFAULT_SWA_FRACTION}")
        check_export_choice(self.export, self)

    @property
    def enabled(self) -> bool:
        return self.ema is not None or self.swa is not None


def check_export_choice(choice: str, settings: AveragingSettings) -> str:
    """Validate the export choice against what is being averaged; returns it."""
    if choice not in EXPORT_CHOICES:
        raise SlimtuneError(f"unknown {EXPORT_FLAG} '{choice}'; choose one of {', '.join(EXPORT_CHOICES)}")
    if choice == "ema" and settings.ema is None:
        raise SlimtuneError(f"{EXPORT_FLAG} ema needs an EMA; add --ema [DECAY] or export the last weights")
    if choice == "swa" and settings.swa is None:
        raise SlimtuneError(f"{EXPORT_FLAG} swa needs an SWA average; add --swa [FRACTION] or export the last weights")
    return choice


def suggested_ema_decay(total_steps: int) -> float:
    """A decay whose window 1/(1 - d) is about a fifth of the run (at least 2 steps)."""
    return round(1.0 - 1.0 / max(2, total_steps // 5), 3)


def _warn_long_ema(decay: float, total_steps: int) -> None:
    """Say so when the EMA's memory outlasts the run: its first snapshot then still dominates."""
    window = 1.0 / (1.0 - decay)  # decay < 1: AveragingSettings checked it
    if window <= total_steps / 2:
        return
    from . import distributed

    if distributed.is_main():
        first = decay ** (total_steps - 1)
        print(
            f"[slimtune] warning: --ema {decay:g} remembers about {window:.0f} steps but the run has {total_steps}: "
            f"the first step's adapters keep {first:.0%} of the average; for this run pass e.g. --ema {suggested_ema_decay(total_steps):g}",
            file=sys.stderr,
        )


def _trainable(params: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(params, nn.Module):
        return {n: p for n, p in params.named_parameters() if p.requires_grad}
    return dict(params)


def _grouped(avg: dict[str, torch.Tensor], params: dict[str, torch.Tensor]):
    """[(averages, current values)] per (device, dtype), as the foreach kernels want them."""
    groups: dict[tuple, tuple[list, list]] = {}
    for name, a in avg.items():
        p = params[name].detach()
        g = groups.setdefault((a.device, a.dtype), ([], []))
        g[0].append(a)
        g[1].append(p.to(a.dtype))  # no copy when the dtype already matches
    return list(groups.values())


class WeightAverager:
    """EMA and/or SWA of the trainable parameters of `params` (a model: its parameters that
    require grad; or a {name: tensor} mapping). See the module docstring for the conventions.

    `total_steps` (the number of optimiser steps of the run) is needed for SWA. `update(step)` is
    called after optimiser step `step` (1-based, increasing, as `Trainer.step` after a step).
    """

    def __init__(self, params: nn.Module | Mapping[str, torch.Tensor], settings: AveragingSettings, total_steps: int | None = None):
        self.settings = settings
        self.params = _trainable(params)
        if not self.params:
            raise SlimtuneError("--ema/--swa found nothing to average: no parameter requires grad (were LoRA adapters attached?)")
        self.total_steps = total_steps
        self.swa_start = 0
        if settings.swa is not None:
            if total_steps is None or total_steps < 1:
                raise ValueError("SWA needs total_steps >= 1 to know where its window starts")
            self.swa_start = total_steps - max(1, math.ceil(settings.swa * total_steps - 1e-9))
        if settings.ema is not None and total_steps:
            _warn_long_ema(settings.ema, total_steps)
        self.ema = self._zeros() if settings.ema is not None else None
        self.swa = self._zeros() if settings.swa is not None else None
        self.ema_count = 0
        self.swa_count = 0
        self.last_step = 0
        self._backup: dict[str, torch.Tensor] | None = None
        self._targets: dict[str, torch.Tensor] = {}
        self._ema_fn = get_ema_multi_avg_fn(settings.ema) if settings.ema is not None else None
        self._swa_fn = get_swa_multi_avg_fn()

    def _zeros(self) -> dict[str, torch.Tensor]:
        return {n: torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device) for n, p in self.params.items()}

    # ---- updates ------------------------------------------------------------------------------
    @torch.no_grad()
    def _fold(self, avg: dict[str, torch.Tensor], count: int, fn) -> None:
        if count == 0:  # the first snapshot starts the average
            for n, a in avg.items():
                a.copy_(self.params[n].detach())
            return
        for averages, current in _grouped(avg, self.params):
            fn(averages, current, count)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the current parameters after optimiser step `step` (1-based)."""
        if self._backup is not None:
            raise RuntimeError("update() while averaged weights are applied; call restore() first")
        if step <= self.last_step:
            raise ValueError(f"update(step={step}) after step {self.last_step}: steps must increase")
        self.last_step = step
        if self.ema is not None:
            self._fold(self.ema, self.ema_count, self._ema_fn)
            self.ema_count += 1
        if self.swa is not None and step > self.swa_start:
            self._fold(self.swa, self.swa_count, self._swa_fn)
            self.swa_count += 1

    # ---- reading and swapping -----------------------------------------------------------------
    def averaged(self, kind: str) -> dict[str, torch.Tensor]:
        """{name: tensor} of "ema", "swa" or "last" (the parameters themselves)."""
        if kind == "last":
            return {n: p.detach() for n, p in self.params.items()}
        check_export_choice(kind, self.settings)
        avg, count = (self.ema, self.ema_count) if kind == "ema" else (self.swa, self.swa_count)
        if count == 0:
            window = "" if kind == "ema" else f" (its window starts after step {self.swa_start})"
            raise SlimtuneError(f"no {kind.upper()} snapshot has been taken yet{window}; train longer or export the last weights")
        return avg

    @torch.no_grad()
    def apply_to(self, kind: str, model: nn.Module | None = None) -> WeightAverager:
        """Copy the `kind` weights ("last", "ema", "swa") into the trainable parameters, of `model`
        when given (matched by name, e.g. the same PEFT model) or else the averaged ones. Undo with
        `restore()`, or use it as a context manager: `with averager.apply_to("ema"): export(...)`."""
        if self._backup is not None:
            raise RuntimeError("averaged weights are already applied; call restore() first")
        source = self.averaged(kind)
        targets = self.params if model is None else dict(model.named_parameters())
        missing = [n for n in source if n not in targets]
        if missing:
            raise ValueError(f"{len(missing)} averaged parameters are not in the model, e.g. {missing[0]}")
        self._targets = {n: targets[n] for n in source}
        self._backup = {n: t.detach().clone() for n, t in self._targets.items()}
        for n, t in self._targets.items():
            t.copy_(source[n])
        return self

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the parameter values from before `apply_to` (a no-op when nothing is applied)."""
        if self._backup is None:
            return
        for n, t in self._targets.items():
            t.copy_(self._backup[n])
        self._backup = None
        self._targets = {}

    def __enter__(self) -> WeightAverager:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        clone = lambda d: None if d is None else {n: t.detach().clone() for n, t in d.items()}  # noqa: E731
        return {
            "ema_decay": self.settings.ema,
            "swa_fraction": self.settings.swa,
            "total_steps": self.total_steps,
            "ema": clone(self.ema),
            "swa": clone(self.swa),
            "ema_count": self.ema_count,
            "swa_count": self.swa_count,
            "last_step": self.last_step,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        s = self.settings
        if state["ema_decay"] != s.ema or state["swa_fraction"] != s.swa:
            raise SlimtuneError(f"the checkpoint was saved with --ema {state['ema_decay']} --swa {state['swa_fraction']}, not --ema {s.ema} --swa {s.swa}; resume with the original options or rerun without --resume")
        if s.swa is not None and state["total_steps"] != self.total_steps:
            raise SlimtuneError(f"the checkpoint's SWA window was set for --steps {state['total_steps']}, not {self.total_steps}; resume with the original --steps or rerun without --resume")
        for kind in ("ema", "swa"):
            mine, theirs = getattr(self, kind), state[kind]
            if mine is None:
                continue
            if set(mine) != set(theirs):
                raise SlimtuneError(f"the checkpoint's {kind.upper()} weights do not match this model/adapter set-up ({len(set(mine) ^ set(theirs))} tensors differ); rerun without --resume or with the original options")
            for n, t in theirs.items():
                mine[n].copy_(t)
        self.ema_count, self.swa_count = state["ema_count"], state["swa_count"]
        self.last_step = state["last_step"]
