"""Random importance: seeded uniform scores, the baseline every criterion must beat.

Used as the control in e.g. LLM-Pruner (arXiv 2305.11627) and ShortGPT (arXiv 2403.03853).
The same seed gives the same scores on every call.
"""

from __future__ import annotations

import torch

from .base import ElementScores, Importance, projection_weights


class RandomImportance(Importance):
    name = "random"
    needs_data = False

    def __init__(self, model, spec=None, seed: int = 0):
        super().__init__(model, spec)
        self.seed = seed

    def element_scores(self) -> ElementScores:
        gen = torch.Generator().manual_seed(self.seed)
        out: ElementScores = {}
        for i, path, w in projection_weights(self.model, self.spec):
            out.setdefault(i, {})[path] = torch.rand(w.shape, generator=gen).to(w.device)
        return out
