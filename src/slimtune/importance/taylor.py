"""Taylor importance of LLM-Pruner (Ma et al. 2023, arXiv 2305.11627, eq. 3-5 and §3.2).

Zeroing a weight changes the loss by ΔL ≈ -G·W + ½·W·H·W (LLM-Pruner eq. 3; Molchanov et al. 2019, arXiv 1906.11626). Over the calibration
batches b = 1..n, with g_b the gradient of batch b's mean loss:

    G = Σ_b g_b   (the gradient of the summed loss; we sum gradients, then score once at the end)
    F = Σ_b g_b²  (Fisher diagonal standing in for H_kk; per batch, where LLM-Pruner uses per sample)

variants:
    element1  |G ⊙ W|                  first-order element-wise score (default)
    element2  |G ⊙ W − ½·F ⊙ W²|       with the second-order Fisher term
    vector    G ⊙ W, signed            a group's score is |Σ_group G ⊙ W| (LLM-Pruner's vector-wise
                                       importance, Molchanov et al. arXiv 1906.10771 style); the
                                       granularity layer sums before taking |.|
    fisher    F ⊙ W²                   the second-order term alone, with the Fisher diagonal for
                                       the Hessian (Optimal Brain Damage, LeCun et al. 1990; the
                                       squared per-batch first-order terms, Molchanov et al. 2019)

Why `fisher`: at a trained model the expected gradient is close to zero, so |G ⊙ W| with G summed
over many batches shrinks toward the noise of a near-zero mean (measured on the bundled model:
one-shot 20% structured perplexity 72.5 with 4 calibration batches, 86.7 with 16 and 88.1 with 32;
benchmarks/oneshot_structured.py). Σ_b (g_b ⊙ W)² does not cancel across batches: it estimates
the curvature that the loss change of removing W is made of, and more data makes it better.

Memory: only the projection weights get requires_grad. With `use_hooks=True` a post-accumulate-
grad hook moves each weight's gradient into an fp32 accumulator and drops `.grad` immediately,
so autograd never holds the gradients of all weights at once on top of the accumulators.
`use_hooks=False` is the plain reference: backward, then read every `.grad`.
"""

from __future__ import annotations

import torch

from ..errors import SlimtuneError
from ..training.loss import causal_lm_loss
from .base import ElementScores, Importance, effective_weights, projection_weights

VARIANTS = ("element1", "element2", "vector", "fisher")


class TaylorImportance(Importance):
    name = "taylor"
    needs_grad = True

    def __init__(self, model, spec=None, variant: str = "element1", use_hooks: bool = True):
        super().__init__(model, spec)
        if variant not in VARIANTS:
            raise SlimtuneError(f"unknown Taylor variant '{variant}'; choose one of {', '.join(VARIANTS)}")
        self.variant, self.use_hooks = variant, use_hooks
        self.signed = variant == "vector"
        self.scores = self.scores_for({"variant": variant})
        self.steps = 0
        self._weights = {(i, path): w for i, path, w in projection_weights(model, self.spec)}
        self._grad_sum: dict[tuple[int, str], torch.Tensor] = {}  # G (not for fisher)
        self._grad_sq: dict[tuple[int, str], torch.Tensor] = {}  # F (element2, fisher)
        # train only the projection weights, so backward computes nothing else
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        targets = {id(w) for w in self._weights.values()}
        for p, _ in self._flags:
            p.requires_grad_(id(p) in targets)
        self._handles = []
        if use_hooks:
            for key, w in self._weights.items():
                self._handles.append(w.register_post_accumulate_grad_hook(self._hook(key)))

    @classmethod
    def scores_for(cls, options: dict) -> frozenset[str]:
        """The vector variant is a group score (|Σ_group G ⊙ W|): of one weight it would be element1's
        |G·W|, and its signed elements must not be ranked as they are, so it leaves weights to taylor."""
        return cls.scores - {"weights"} if options.get("variant") == "vector" else cls.scores

    def _hook(self, key):
        def hook(param: torch.Tensor) -> None:
            self._accumulate(key, param.grad)
            param.grad = None  # the point of the hook: no weight-sized .grad outlives this call

        return hook

    @torch.no_grad()
    def _accumulate(self, key, grad: torch.Tensor) -> None:
        g = grad.detach().float()
        if self.variant != "fisher":  # fisher needs only F: no second weight-sized accumulator
            if key not in self._grad_sum:
                self._grad_sum[key] = torch.zeros_like(g)
            self._grad_sum[key].add_(g)
        if self.variant in ("element2", "fisher"):
            if key not in self._grad_sq:
                self._grad_sq[key] = torch.zeros_like(g)
            self._grad_sq[key].addcmul_(g, g)

    def update(self, model, batch: torch.LongTensor) -> None:
        for w in self._weights.values():
            w.grad = None  # stale gradients from a training step must not leak into G
        with torch.enable_grad():
            causal_lm_loss(model, batch).backward()
        if not self.use_hooks:
            for key, w in self._weights.items():
                if w.grad is not None:
                    self._accumulate(key, w.grad)
                    w.grad = None
        self.steps += 1

    @torch.no_grad()
    def element_scores(self) -> ElementScores:
        if not self.steps:
            raise RuntimeError("Taylor importance has no gradients yet; call update(model, batch) first")
        out: ElementScores = {}
        # G is the gradient of the base weight, which for LoRA equals that of the weight the
        # projection computes with (base + s·B·A); W must be that weight too (PiSSA, LoRA-GA)
        for i, path, w in effective_weights(self.model, self.spec):
            w = w.float()
            if self.variant == "fisher":  # zeros where the weight got no gradient
                out.setdefault(i, {})[path] = self._grad_sq.get((i, path), torch.zeros_like(w)) * w.square()
                continue
            g = self._grad_sum.get((i, path), torch.zeros_like(w))
            gw = g * w
            if self.variant == "element2":
                gw = gw - 0.5 * self._grad_sq.get((i, path), torch.zeros_like(w)) * w.square()
            out.setdefault(i, {})[path] = gw if self.signed else gw.abs()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._flags = []
        self._grad_sum, self._grad_sq = {}, {}
        self.steps = 0
