"""Block Influence of ShortGPT (Men et al. 2024, arXiv 2403.03853, eq. 1).

BI_i = 1 − E_tokens[cos(x_i, x_{i+1})], where x_i is the hidden state entering decoder layer i
and x_{i+1} the one leaving it. A layer that barely changes its input has BI near 0 and is the
first candidate for removal. A layer-level criterion: `layer_scores()` gives BI per layer and
`element_scores()` is empty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ElementScores, Importance


class BlockInfluence(Importance):
    name = "block_influence"
    scores = frozenset({"layers"})  # one score per layer: nothing to rank heads, channels or weights by

    def __init__(self, model, spec=None):
        super().__init__(model, spec)
        n = len(self.spec.decoder_layers(model))
        self._cos_sum = torch.zeros(n, dtype=torch.float64)
        self._tokens = 0

    def _hook(self, i: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]  # [b, L, d]
            y = output[0] if isinstance(output, tuple) else output  # [b, L, d]
            self._cos_sum[i] += F.cosine_similarity(x.float(), y.float(), dim=-1).sum().item()

        return hook

    @torch.no_grad()
    def update(self, model, batch: torch.LongTensor) -> None:
        # hooks live only during this forward, so training forwards are not counted
        layers = self.spec.decoder_layers(model)
        handles = [layer.register_forward_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            model(input_ids=batch.to(model.get_input_embeddings().weight.device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        self._tokens += batch.numel()

    def element_scores(self) -> ElementScores:
        return {}

    def layer_scores(self) -> torch.Tensor:
        if not self._tokens:
            raise RuntimeError("block influence has no statistics yet; call update(model, batch) first")
        return (1.0 - self._cos_sum / self._tokens).float()

    def remove(self) -> None:
        self._cos_sum.zero_()
        self._tokens = 0
