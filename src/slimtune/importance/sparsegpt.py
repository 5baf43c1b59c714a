"""SparseGPT as a registered criterion (Frantar & Alistarh 2023, arXiv 2301.00774).

SparseGPT does not score weights once and then select: column block by column block it picks
the weights with the smallest w²/[H⁻¹]²_jj and updates the remaining ones to compensate (OBS),
so scores and weights change together. The solver is `pruning/sparsegpt.py`, run layer by layer
by `pruning/layerwise.py`. This class only declares its capabilities for the registry and the
checks: unstructured and N:M weights, layer-wise, calibration data, no gradients.
"""

from __future__ import annotations

from ..errors import SlimtuneError
from .base import Importance


class SparseGPTImportance(Importance):
    name = "sparsegpt"
    scores = frozenset({"weights"})
    mode = "layerwise"
    needs_data = True
    needs_grad = False

    def element_scores(self):
        raise SlimtuneError("SparseGPT updates weights while it prunes, so it has no standalone scores; run it with prune_layerwise")
