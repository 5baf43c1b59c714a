"""Prune inside a user's own `transformers.Trainer` (Accelerate, DDP and FSDP unchanged).

Most users go through `slimtune.PruneSession`, which builds this callback. The callback runs the
same per-step order as slimtune's own loop (training/step.py): after the gradients are unscaled
and clipped, `on_pre_optimizer_step` feeds them to the importance; after the optimiser step,
`on_step_end` lets the pruner grow the masks. Checkpoints get the masks and importance state in
`slimtune_state.pt`; `load_state(dir)` restores them when resuming.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from transformers import TrainerCallback

from .step import PruneStep

STATE_FILE = "slimtune_state.pt"


class PruneCallback(TrainerCallback):
    def __init__(self, pruner, importance=None):
        self.pruner = pruner
        self.importance = importance
        self.step = PruneStep(importance, pruner)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps and state.max_steps != self.pruner.schedule.total_steps:
            self.pruner.schedule = replace(self.pruner.schedule, total_steps=state.max_steps)
            self.pruner.prune_every = self.pruner.settings.every(state.max_steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.step.before_optimizer(model)

    def on_step_end(self, args, state, control, **kwargs):
        self.step.after_optimizer(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.state_dict(), folder / STATE_FILE)

    def state_dict(self) -> dict:
        return self.step.state_dict()

    def load_state(self, checkpoint_dir: str | Path) -> None:
        self.step.load_state_dict(torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=False))
