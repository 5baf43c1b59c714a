"""SEVEN (Xiao et al. 2024, arXiv 2403.12688): keep the "sentinel" weights whose sensitivity stays
consistently high, i.e. whose gradient is not noise. The score matches the released code
(xiaojinying/SEVEN, pruning_algo 'SEVEN'; METHODS.md §5): at step k (0-based), for every weight,

    g = |∇W|
    m ← α₁·m + (1−α₁)·g                 first moment of the *magnitude* (the code's choice)
    v ← α₂·v + (1−α₂)·g²
    m̂ = m/(1−α₁^{k+1}),  v̂ = √(v/(1−α₂^{k+1})) + 1e-9
    I ← I + |W ⊙ g ⊙ m̂/v̂|             a cumulative sum, not an EMA; α₁ 0.8, α₂ 0.9

m̂/v̂ = E|g|/√E[g²] is 1 for a constant gradient, where I is the cumulative Taylor score Σ|W·g|,
and smaller the noisier the magnitude (at most 1 when α₁ = α₂; with the defaults' different
windows a steadily growing magnitude can take it up to about 1.18). Sign flips are not
penalised, as in the code.

∇W is LoRAPrune's estimate Ĝ (`seven`) or the true W0.grad (`seven_grad`, full fine-tuning memory:
api.py must call `enable_full_grad`); W = W0 + s·B·A (loraprune.py). I is reduced to units every
step and summed per projection exactly as movement.py does (l2-normalised per projection when read,
as reduce.unit_scores), so only m and v are weight-sized; element-level I is kept only with
`keep_elements=True` (unstructured or N:M). Differences from the code: k counts this run's finite
steps from the first (the code counts from the start of pruning), the mask is LoRAPrune's
schedule and selection, and pruned units stay pruned (as in the code, which zeroes their scores).

Memory: this is NOT LoRA-level. m and v are two fp32 tensors the size of every adapted projection's
weight, also in checkpoints: 810 MiB for the bundled SmolLM2-135M (106.2 M projection weights x
8 bytes), and 405 MiB more for element-level I (unstructured / N:M).
"""

from __future__ import annotations

import torch

from ..errors import SlimtuneError
from .movement import CumulativeImportance, Key


class SevenImportance(CumulativeImportance):
    name = "seven"

    def __init__(self, model, spec=None, metric: str = "lora", alpha1: float = 0.8, alpha2: float = 0.9, keep_elements: bool = False,
                 normalise: str = "l2", stack_mib: float = 0.0):
        for label, a in (("alpha1", alpha1), ("alpha2", alpha2)):
            if not 0.0 <= a < 1.0:
                raise SlimtuneError(f"SEVEN {label} {a} is outside [0, 1); the paper uses alpha1 0.8 and alpha2 0.9")
        super().__init__(model, spec, metric=metric, keep_elements=keep_elements, normalise=normalise, stack_mib=stack_mib)
        self.alpha1, self.alpha2 = alpha1, alpha2
        self.m: dict[Key, torch.Tensor] = {}  # weight-sized, on the weight's device
        self.v: dict[Key, torch.Tensor] = {}

    def _step_scores(self, keys, g, w):
        a1, a2 = self.alpha1, self.alpha2
        c1, c2 = 1.0 - a1 ** (self.steps + 1), 1.0 - a2 ** (self.steps + 1)
        g.abs_()
        for j, key in enumerate(keys):
            gj = g[j]  # [out, in]
            m = self.m.setdefault(key, torch.zeros_like(gj))
            v = self.v.setdefault(key, torch.zeros_like(gj))
            m.mul_(a1).add_(gj, alpha=1.0 - a1)
            v.mul_(a2).addcmul_(gj, gj, value=1.0 - a2)
            ratio = (m / c1).div_(v.div(c2).sqrt_().add_(1e-9))  # m̂/v̂
            w[j].abs_().mul_(gj).mul_(ratio)
        return w

    def state_dict(self) -> dict:
        return {**super().state_dict(), "alphas": (self.alpha1, self.alpha2), "m": self._save(self.m), "v": self._save(self.v)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("criterion") == self.name and tuple(state.get("alphas", ())) != (self.alpha1, self.alpha2):
            raise SlimtuneError("SEVEN state was saved with other alpha1/alpha2; resume with the original options")
        super().load_state_dict(state)
        self.m, self.v = self._load(state["m"]), self._load(state["v"])

    def remove(self) -> None:
        super().remove()
        self.m, self.v = {}, {}
