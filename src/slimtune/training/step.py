"""The per-step order of progressive pruning, written once for slimtune's loop and the Trainer callback.

    backward -> unscale + clip -> before_optimizer (importance observes the gradients)
             -> optimizer.step() -> after_optimizer(t) (the pruner may grow the masks)

The importance must see the gradients after clipping and unscaling (what the optimiser will
apply) and before they are zeroed; the masks change only between optimiser steps.
"""

from __future__ import annotations


class PruneStep:
    def __init__(self, importance=None, pruner=None):
        self.importance, self.pruner = importance, pruner

    def before_optimizer(self, model) -> None:
        if self.importance is not None and hasattr(self.importance, "observe"):
            self.importance.observe(model)

    def after_optimizer(self, t: int) -> dict | None:
        """Call after optimiser step t (1-based); returns selection info when the masks changed."""
        return self.pruner.step(t) if self.pruner is not None else None

    @property
    def sparsity(self) -> float:
        return float(self.pruner.current) if self.pruner is not None else 0.0

    def state_dict(self) -> dict:
        imp = self.importance.state_dict() if hasattr(self.importance, "state_dict") else None
        return {"pruner": self.pruner.state_dict() if self.pruner is not None else None, "importance": imp}

    def load_state_dict(self, state: dict) -> None:
        if self.pruner is not None and state.get("pruner") is not None:
            self.pruner.load_state_dict(state["pruner"])
        if state.get("importance") is not None and hasattr(self.importance, "load_state_dict"):
            self.importance.load_state_dict(state["importance"])
