"""Wanda importance: |W_ij| · ‖X_j‖₂, pruned within each output row.

Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning Approach for Large Language Models",
arXiv 2306.11695. X_j is input feature j of the projection over all calibration tokens; the score
weighs a weight by how large the activations it multiplies are. The paper compares scores within
each output row (`select_unstructured(..., per_row=True)`, or N:M per row) and does not update the
remaining weights. Scaling ‖X_j‖ by a constant (a mean instead of a sum) changes nothing.

Two ways to use it:
- one-shot and sequential, as in the paper: `pruning.layerwise.prune_layerwise(model, tokens, "wanda", ...)`
  calibrates layer i on the outputs of the already-pruned layers 0..i-1;
- as an `Importance` (this class): `update(model, batch)` accumulates ‖X_j‖² of every projection in
  one pass of the dense (or currently masked) model; `element_scores()` gives |W|·‖X_j‖. Rank
  per row (`per_row = True` tells the caller).
"""

from __future__ import annotations

import torch

from ..errors import SlimtuneError
from ..models.arch import base_layer
from .base import ElementScores, Importance, projection_weights


def wanda_scores(weight: torch.Tensor, col_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖₂ in fp32: weight [out, in], col_sq_norm [in] = Σ_tokens x_j²."""
    if col_sq_norm.shape != weight.shape[1:]:
        raise RuntimeError(f"input norms of shape {tuple(col_sq_norm.shape)} do not match a weight of shape {tuple(weight.shape)}")
    return weight.detach().float().abs() * col_sq_norm.to(device=weight.device, dtype=torch.float32).clamp_min(0).sqrt().unsqueeze(0)


class WandaImportance(Importance):
    name = "wanda"
    scores = frozenset({"weights"})  # unstructured / N:M, ranked within each output row
    mode = "layerwise"  # the registry runs it sequentially (prune_layerwise); update() is the one-pass variant
    needs_data = True
    needs_grad = False
    per_row = True  # Wanda compares scores within each output row

    def __init__(self, model, spec=None):
        super().__init__(model, spec)
        self.sq_norm: dict[tuple[int, str], torch.Tensor] = {}

    def _hook(self, key, in_features: int):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, in_features).float()
            acc = self.sq_norm.get(key)
            s = x.square().sum(dim=0)
            self.sq_norm[key] = s if acc is None else acc.add_(s)

        return hook

    @torch.no_grad()
    def update(self, model, batch: torch.LongTensor) -> None:
        # hooks live only during this forward, so training forwards are not counted
        handles = []
        for i, layer in enumerate(self.spec.decoder_layers(model)):
            for path in self.spec.projections():
                module = layer.get_submodule(path)
                handles.append(module.register_forward_hook(self._hook((i, path), base_layer(module).in_features)))
        was_training = model.training
        model.eval()
        try:
            model(input_ids=batch.to(model.get_input_embeddings().weight.device), use_cache=False)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()

    @torch.no_grad()
    def element_scores(self) -> ElementScores:
        if not self.sq_norm:
            raise SlimtuneError("Wanda has no activation statistics yet; call update() on calibration batches first")
        out: ElementScores = {}
        for i, path, w in projection_weights(self.model, self.spec):
            out.setdefault(i, {})[path] = wanda_scores(w, self.sq_norm[(i, path)])
        return out

    def remove(self) -> None:
        self.sq_norm = {}
