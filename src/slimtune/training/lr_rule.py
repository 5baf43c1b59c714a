"""Scale the learning rate with the global batch size.

The learning rate is tuned at a reference global batch `base_batch`; when the global batch
(devices × micro-batch × gradient accumulation) changes by the ratio k = batch / base_batch:

- SGD, linear rule: lr · k (Goyal et al. 2017, arXiv 1706.02677: keeps the per-example
  contribution of a step unchanged for small k);
- Adam-type optimisers, square-root rule: lr · √k (Malladi et al. 2022, arXiv 2205.10287: the
  SDE of adaptive methods keeps its trajectory under √k scaling; Hoffer et al. 2017,
  arXiv 1705.08741, for the noise-scale argument).

Both rules stop being reliable far from the reference batch (warm-up and curvature limits, ibid.),
so the multiplier is clamped to [1/cap, cap], in both directions: a batch 100× the reference
with cap 4 gives at most 4 × lr, a batch 100× smaller at least lr / 4. `rule="none"` returns
`base_lr` unchanged.
"""

from __future__ import annotations

import math

from ..errors import SlimtuneError

RULES = ("auto", "sqrt", "linear", "none")
ADAM_LIKE = frozenset({"adam", "adamw", "adamax", "nadam", "radam", "adafactor", "lamb", "lion", "rmsprop", "adagrad", "adamw8bit", "paged_adamw", "paged_adamw8bit"})
SGD_LIKE = frozenset({"sgd", "momentum", "nesterov"})


def global_batch(micro_batch: int, grad_accum: int = 1, devices: int = 1) -> int:
    """Sequences per optimiser step: devices × micro-batch × gradient accumulation."""
    for name, v, flag in (("micro-batch", micro_batch, "--batch-size"), ("gradient accumulation", grad_accum, "--grad-accum"), ("device count", devices, "--devices")):
        if int(v) != v or v < 1:
            raise SlimtuneError(f"{name} must be a positive integer, got {v}; check {flag}")
    return int(devices) * int(micro_batch) * int(grad_accum)


def rule_for(optimizer: str, rule: str = "auto") -> str:
    """The rule "sqrt", "linear" or "none" that `rule` resolves to for `optimizer`."""
    if rule not in RULES:
        raise SlimtuneError(f"unknown --lr-rule '{rule}'; choose one of {', '.join(RULES)}")
    if rule != "auto":
        return rule
    name = optimizer.lower().replace("-", "_")
    if name in ADAM_LIKE:
        return "sqrt"
    if name in SGD_LIKE:
        return "linear"
    raise SlimtuneError(f"no automatic LR scaling rule for optimiser '{optimizer}'; pass --lr-rule sqrt, linear or none")


def scaled_lr(base_lr: float, base_batch: int, batch: int, optimizer: str = "adamw", rule: str = "auto", cap: float = 4.0) -> float:
    """`base_lr` (tuned at global batch `base_batch`) scaled for global batch `batch`.

    rule: "auto" (√ for Adam-type optimisers, linear for SGD), "sqrt", "linear" or "none" (opt
    out: `base_lr` unchanged). The multiplier is clamped to [1/cap, cap] (cap >= 1; cap = 1 also
    disables scaling, cap = inf removes the clamp).
    """
    if not base_lr > 0 or math.isinf(base_lr):
        raise SlimtuneError(f"--lr must be a positive number, got {base_lr}")
    for flag, v in (("--lr-base-batch", base_batch), ("the global batch (--batch-size × --grad-accum × devices)", batch)):
        if int(v) != v or v < 1:
            raise SlimtuneError(f"{flag} must be a positive integer, got {v}")
    if not cap >= 1:
        raise SlimtuneError(f"--lr-scale-cap must be at least 1, got {cap}; 4 allows up to 4× the base LR")
    resolved = rule_for(optimizer, rule)
    if resolved == "none":
        return float(base_lr)
    k = batch / base_batch
    factor = math.sqrt(k) if resolved == "sqrt" else k
    factor = min(max(factor, 1.0 / cap), cap)
    return float(base_lr) * factor
