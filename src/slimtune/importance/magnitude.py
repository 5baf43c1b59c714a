"""Magnitude importance: |w| (p=1) or w² (p=2) per weight.

Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks",
arXiv 1506.02626. Scores the weight the projection computes with, base plus any unmerged LoRA delta
(PiSSA and LoRA-GA move part of the weight into the adapter when they attach).
"""

from __future__ import annotations

import torch

from ..errors import SlimtuneError
from .base import ElementScores, Importance, effective_weights


class MagnitudeImportance(Importance):
    name = "magnitude"
    needs_data = False

    def __init__(self, model, spec=None, p: int = 1):
        super().__init__(model, spec)
        if p not in (1, 2):
            raise SlimtuneError(f"magnitude norm p={p} is not supported; choose p=1 (|w|) or p=2 (w²)")
        self.p = p

    @torch.no_grad()
    def element_scores(self) -> ElementScores:
        out: ElementScores = {}
        for i, path, w in effective_weights(self.model, self.spec):
            w = w.detach().float()
            out.setdefault(i, {})[path] = w.abs() if self.p == 1 else w.square()
        return out
