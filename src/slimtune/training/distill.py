"""Self-distillation from the free dense teacher.

While LoRAPrune trains, the frozen base weights are still the original dense model: with the
adapters disabled (PEFT `disable_adapter()`) and every mask opened (gates and weight masks paused)
the same module computes the pretrained model's function. That is the teacher, at no memory cost:
no second copy of the weights, one extra decoder forward under `torch.no_grad()` per micro-batch.

The student (adapters on, masks applied) learns from both the data and the teacher
(knowledge distillation, Hinton, Vinyals & Dean 2015, arXiv 1503.02531):

    loss = (1 - mix) · CE(student, next token) + mix · T² · KL(softmax(t/T) ‖ softmax(s/T))

with t, s the teacher and student logits and T the temperature; T² keeps the gradient scale of the
soft term independent of T (ibid. §2). Both terms are means over predicted tokens. As in
`loss.py`, the LM head, the cross-entropy and the KL run per chunk of tokens under activation
checkpointing, so neither model's full [tokens, vocab] logits ever exist.

Caveats:
- PiSSA and LoRA-GA rewrite the base weights into a residual, so with them the adapters-off model is NOT the
  pretrained model; `dense_teacher` refuses it.
- `zero_pruned_weights` writes zeros into the base weights; it is for export only. Call it before
  training ends and the "dense" teacher is pruned too.
- The teacher runs in eval mode (no dropout); every module's training flag and every parameter's
  requires_grad flag come back unchanged afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import SlimtuneError
from ..models.arch import unwrap
from .loss import CHUNK_TOKENS

TeacherContext = Callable[[], AbstractContextManager]


@dataclass
class DistillSettings:
    enabled: bool = field(default=False, metadata={"help": "distil from the dense model itself (adapters off, masks open): no second copy of the weights", "flag": "--distill"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature T of the distillation term (> 0); the KL is scaled by T² (Hinton et al. 2015)"})
    mix: float = field(default=0.5, metadata={"help": "weight of the distillation term in [0, 1]: loss = (1 - mix)·CE + mix·T²·KL; 0 = plain LM loss"})

    def __post_init__(self):
        try:
            self.temperature, self.mix = float(self.temperature), float(self.mix)
        except (TypeError, ValueError):
            raise SlimtuneError(f"--distill-temperature and --distill-mix take numbers, got {self.temperature!r} and {self.mix!r}") from None
        if not self.temperature > 0 or self.temperature == float("inf"):
            raise SlimtuneError(f"--distill-temperature must be a positive number, got {self.temperature}; the usual choice is 2")
        if not 0.0 <= self.mix <= 1.0:
            raise SlimtuneError(f"--distill-mix must be in [0, 1], got {self.mix}; 0.5 weighs data and teacher equally")


# ---- the teacher --------------------------------------------------------------------------------
@contextmanager
def masks_open(*handles):
    """Bypass every given mask handle (from `attach_gates` / `attach_weight_masks`; None is skipped)
    inside the block, so the model runs with its dense weights; masks come back on exit."""
    with ExitStack() as stack:
        for h in handles:
            if h is not None:
                stack.enter_context(h.paused())
        yield


@contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode inside the block; each module's own training flag and each parameter's
    requires_grad come back on exit (PEFT's disable/enable re-marks adapter weights trainable)."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was
        for p, was in grads:
            p.requires_grad_(was)


def dense_teacher(peft_model: nn.Module, *handles) -> TeacherContext:
    """The `teacher_ctx` for `distill_loss`: a callable whose context runs `peft_model` with its
    adapters disabled, every mask in `handles` opened (gates / weight-mask handles, None skipped)
    and in eval mode, so its forward is the dense pretrained model."""
    if not hasattr(peft_model, "disable_adapter"):
        raise SlimtuneError("--distill needs the PEFT model (with LoRA adapters attached) to switch the adapters off for the teacher; pass the PeftModel")
    from ..adapters.save import mutates_base

    if mutates_base(peft_model):
        raise SlimtuneError("--distill cannot use PiSSA or LoRA-GA: they rewrite the base weights, so no dense teacher is left; use --lora-variant lora, rslora or dora")

    @contextmanager
    def ctx():
        with _eval_mode(peft_model), peft_model.disable_adapter(), masks_open(*handles):
            yield

    return ctx


def _teacher_head(head: nn.Module) -> nn.Module:
    """The LM head as the teacher sees it: without a LoRA adapter or a trainable copy."""
    if hasattr(head, "original_module"):  # PEFT ModulesToSaveWrapper
        head = head.original_module
    return head.get_base_layer() if hasattr(head, "get_base_layer") else head


# ---- the loss -----------------------------------------------------------------------------------
def _chunk_terms(head, teacher_head, h, th, y, temperature: float, with_kl: bool):
    logits = head(h)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(logits, y, reduction="sum")
    if not with_kl:
        return ce, ce.new_zeros(())
    with torch.no_grad():
        t_logits = teacher_head(th).to(logits.dtype)
        log_p = F.log_softmax(t_logits / temperature, dim=-1)
    log_q = F.log_softmax(logits / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True)  # Σ p (log p - log q)
    return ce, kl


def distill_loss(
    student_model: nn.Module,
    input_ids: torch.Tensor,
    teacher_ctx: TeacherContext,
    settings: DistillSettings,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, lm, kl) for predicting input_ids[:, 1:] from input_ids[:, :-1].

    lm = mean cross-entropy (what `causal_lm_loss` returns), kl = T² · mean KL(teacher_T ‖ student_T)
    per predicted token, total = (1 - mix)·lm + mix·kl. The teacher's hidden states come from one
    decoder forward under `torch.no_grad()` inside `teacher_ctx()` (see `dense_teacher`); with
    mix = 0 that forward is skipped and kl is 0.
    """
    T, mix = settings.temperature, settings.mix
    base = unwrap(student_model)
    input_ids = input_ids.to(base.get_input_embeddings().weight.device)
    decoder = base.get_decoder()
    with_kl = mix > 0
    t_hidden = None
    if with_kl:
        with torch.no_grad(), teacher_ctx():
            t_hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        t_hidden = t_hidden[:, :-1].reshape(-1, t_hidden.shape[-1])
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # [b, L, d]
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [b*(L-1), d]
    targets = input_ids[:, 1:].reshape(-1)
    head = base.get_output_embeddings()
    teacher_head = _teacher_head(head)
    ce_sum = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    kl_sum = ce_sum.clone()
    for start in range(0, targets.numel(), chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        h, y = hidden[sl], targets[sl]
        th = t_hidden[sl] if with_kl else None
        if torch.is_grad_enabled() and h.requires_grad:
            ce, kl = checkpoint(_chunk_terms, head, teacher_head, h, th, y, T, with_kl, use_reentrant=False)
        else:
            ce, kl = _chunk_terms(head, teacher_head, h, th, y, T, with_kl)
        ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
    n = targets.numel()
    lm = ce_sum / n
    kl = kl_sum * (T * T) / n
    total = lm if not with_kl else (1.0 - mix) * lm + mix * kl
    return total, lm, kl
