"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512) through PEFT's AdaLoraModel.

Each adapted projection learns ΔW = s·P·diag(λ)·Q (PEFT: P = lora_B [out, r], λ = lora_E [r, 1],
Q = lora_A [r, in], s = α/(init_r + 1e-5), the divisor never shrinking with the rank). Every
projection starts at rank init_r; the total number of kept triplets (P_i, λ_i, Q_i) follows a cubic
budget from init_r to r per projection, and the triplets of lowest importance are cut by zeroing
their λ. Importance is the sensitivity |w·∂L/∂w| of each factor entry, smoothed by an EMA and
multiplied by the EMA of its deviation (β₁ = β₂ = 0.85):

    Ī ← β₁Ī + (1−β₁)I,   Ū ← β₂Ū + (1−β₂)|I − Ī|,   S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)

PEFT does the budget, the scores and the cut (`update_and_allocate`); this module adds what a loop of
its own must do around it:
  - the orthogonality penalty γ·mean(‖QQᵀ − I‖_F, ‖PᵀP − I‖_F), which PEFT adds only to a loss the
    model returns itself (slimtune computes its loss from the hidden states, in chunks);
  - the call after `optimizer.step()` with the number of optimiser steps done (1-based, so that
    the final cut lands on the last step when t_final is 0);
  - checkpointing the importance EMAs and the rank pattern, which PEFT keeps outside any state_dict
    (so a resumed run cuts the same triplets as an uninterrupted one);
  - re-applying the final pattern after weight averaging, which would otherwise blend cut λs back in.

Cut triplets stay in the tensors as zeros during training (PEFT's way); the saved adapter is resized
to the kept ranks (`rank_pattern` in adapter_config.json) and loads with `PeftModel.from_pretrained`.
As in PEFT, Adam's momentum may move a cut λ off zero until the next reallocation; from the final
cut on, the pattern is re-applied after every step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SlimtuneError
from .lora import LoraSettings, is_adalora, lora_pairs, lora_weights

BETA = 0.85  # β₁ = β₂, the paper's and PEFT's
EMAS = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # the allocator's per-entry state, keyed by the wrapped model's parameter names


def init_rank(settings: LoraSettings) -> int:
    return int(settings.adalora_init_r) if settings.adalora_init_r is not None else int(round(1.5 * settings.r))


def adalora_config(settings: LoraSettings, targets: list[str], steps: int | None):
    """PEFT's AdaLoraConfig for `steps` optimiser steps."""
    from peft import AdaLoraConfig

    if steps is None or steps < 1:
        raise SlimtuneError("AdaLoRA schedules its rank budget over the training steps: pass steps= (at least 1) to attach_lora")
    tinit, tfinal = int(settings.adalora_warmup * steps), int(settings.adalora_final * steps)
    return AdaLoraConfig(
        target_r=int(settings.r), init_r=init_rank(settings), tinit=tinit, tfinal=tfinal, deltaT=int(settings.adalora_every),
        beta1=BETA, beta2=BETA, orth_reg_weight=settings.adalora_orth, total_step=int(steps),
        lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets, task_type="CAUSAL_LM",
    )


def _adalora_model(model: nn.Module):
    from peft.tuners.adalora import AdaLoraModel

    inner = getattr(model, "base_model", None)
    return inner if isinstance(inner, AdaLoraModel) else None


class RankBudget:
    """AdaLoRA's per-step duties in slimtune's loop (see the module docstring). `of(model)` gives
    None for models without an AdaLoRA adapter."""

    def __init__(self, peft_model: nn.Module):
        self.peft_model, self.inner = peft_model, _adalora_model(peft_model)
        self.config = self.inner.peft_config[self.inner.trainable_adapter_name]
        self.modules = [m for _, _, m in lora_pairs(peft_model)]
        # where each adapted module sits in the wrapped model: the allocator's keys are "<that>.lora_A.<adapter>"
        self._where = {id(m): n for n, m in self.inner.model.named_modules() if is_adalora(m)}

    @classmethod
    def of(cls, model: nn.Module, steps: int | None = None) -> RankBudget | None:
        """None without an AdaLoRA adapter; `steps`: the run's optimiser steps, which the budget was scheduled over."""
        if _adalora_model(model) is None:
            return None
        budget = cls(model)
        if steps is not None and budget.config.total_step != steps:
            raise SlimtuneError(f"the AdaLoRA adapter was attached for {budget.config.total_step} steps but this run has {steps}; "
                                f"pass steps={steps} to attach_lora")
        return budget

    @property
    def allocator(self):
        return self.inner.rankallocator

    def loss_term(self) -> torch.Tensor | None:
        """γ·mean over the factors of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F (PEFT's form: unsquared norms)."""
        weight = self.config.orth_reg_weight
        if not weight:
            return None
        norms = []
        for m in self.modules:
            Q, P = lora_weights(m)
            for cov in (Q @ Q.T, P.T @ P):
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                norms.append(torch.linalg.matrix_norm(cov - eye))
        return weight * torch.stack(norms).mean() if norms else None

    def loss_log(self) -> dict:
        return {}

    def after_step(self, step: int) -> None:
        """After `optimizer.step()`, before the gradients are cleared; `step` = optimiser steps done (≥ 1)."""
        self.inner.update_and_allocate(step)

    def finalize(self) -> None:
        """Zero the λ of every cut triplet (after weight averaging, before saving and merging)."""
        if self.config.rank_pattern:
            self.allocator.mask_using_rank_pattern(self.inner.model, self.config.rank_pattern)

    def kept(self) -> tuple[int, int]:
        """(kept triplets, initial triplets) over all adapted projections."""
        total = sum(int(lora_weights(m)[0].shape[0]) for m in self.modules)
        pattern = self.config.rank_pattern
        if not pattern:
            return total, total
        return sum(int(sum(v)) for v in pattern.values()), total

    def slice_state(self, module: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
        """Follow a projection being sliced to its kept output `rows` and input `cols` (export.shrink_, when
        structured QAT starts): the importance EMAs of Q lose the columns, those of P the rows."""
        if not is_adalora(module):
            return
        for factor, index, dim in (("lora_A", cols, 1), ("lora_B", rows, 0)):
            if index is None:
                continue
            for adapter in getattr(module, factor):
                name = f"{self._where[id(module)]}.{factor}.{adapter}"
                for store in (getattr(self.allocator, key) for key in EMAS):
                    if name in store:
                        store[name] = store[name].index_select(dim, index.to(store[name].device))

    # ---- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict:
        emas = {key: {k: v.detach().cpu() for k, v in getattr(self.allocator, key).items()} for key in EMAS}
        return {**emas, "rank_pattern": self.config.rank_pattern}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            raise SlimtuneError("the checkpoint has no AdaLoRA state (it was made with another --lora-variant); resume with the original options")
        params = dict(self.inner.model.named_parameters())  # PEFT names the state after the wrapped model's parameters
        for key in EMAS:
            setattr(self.allocator, key, {k: v.to(params[k].device) for k, v in state[key].items()})
        self.config.rank_pattern = state["rank_pattern"]
