"""Prune inside a user's own `transformers.Trainer` (Accelerate, DDP and FSDP unchanged).

    importance = LoRAPruneImportance(peft_model)
    pruner = Pruner(peft_model, PruneSettings(sparsity=0.3), importance, total_steps=max_steps)
    trainer = Trainer(model=peft_model, ..., callbacks=[PruneCallback(pruner, importance)])
    trainer.train()
    pruner.finalize(); pruner.remove_gates()
    model = merge_keep_masks(peft_model, pruner.masks); shrink_(model, pruner.masks)

The callback runs the same per-step order as slimtune's own loop: after the gradients are
unscaled and clipped, `on_pre_optimizer_step` feeds them to the importance; after the optimiser
step, `on_step_end` lets the pruner grow the masks. Checkpoints get the masks and importance
state in `slimtune_state.pt`; `load_state(dir)` restores them when resuming.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

STATE_FILE = "slimtune_state.pt"


class PruneCallback(TrainerCallback):
    def __init__(self, pruner, importance=None):
        self.pruner = pruner
        self.importance = importance

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps and state.max_steps != self.pruner.schedule.total_steps:
            from dataclasses import replace

            self.pruner.schedule = replace(self.pruner.schedule, total_steps=state.max_steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.importance is not None and hasattr(self.importance, "observe"):
            self.importance.observe(model)

    def on_step_end(self, args, state, control, **kwargs):
        self.pruner.step(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.state_dict(), folder / STATE_FILE)

    def state_dict(self) -> dict:
        imp = self.importance.state_dict() if hasattr(self.importance, "state_dict") else None
        return {"pruner": self.pruner.state_dict(), "importance": imp}

    def load_state(self, checkpoint_dir: str | Path) -> None:
        state = torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=False)
        self.pruner.load_state_dict(state["pruner"])
        if state["importance"] is not None and hasattr(self.importance, "load_state_dict"):
            self.importance.load_state_dict(state["importance"])
