"""The training loop of the CLI, and a `TrainerCallback` for users' own Trainer scripts.

Both call the same components in the same order, once per optimiser step:
    backward -> clip -> importance.observe(model) -> optimizer.step() -> pruner.step(t)
Checkpoints hold the trainable (LoRA) weights, the optimiser and LR-scheduler state, the masks, the
importance EMA and the RNG state, so `--resume` reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import batch_at
from ..errors import SlimtuneError
from ..io import atomic_write_bytes
from ..models.arch import unwrap
from .loss import causal_lm_loss

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainSettings:
    steps: int = 24
    batch_size: int = 2  # micro-batch
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 2
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | bf16 | fp16
    checkpoint_every: int = 10

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise SlimtuneError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.lr > 0:
            raise SlimtuneError(f"--lr must be positive, got {self.lr}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise SlimtuneError(f"unknown --mixed-precision '{self.mixed_precision}'; choose no, bf16 or fp16")


def _autocast(model: nn.Module, mode: str):
    device = next(model.parameters()).device
    if mode == "no":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    if device.type == "cuda" and mode == "bf16" and not torch.cuda.is_bf16_supported():
        raise SlimtuneError("this GPU does not support bf16; use --mixed-precision fp16 or no")
    if device.type == "cpu" and mode == "fp16":
        raise SlimtuneError("fp16 autocast needs a GPU; use --mixed-precision bf16 or no on CPU")
    return torch.autocast(device.type, dtype=dtype)


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing under either transformers 5 name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Trainer:
    """Minimal LoRA fine-tuning loop with pruning hooks, checkpoints and resume."""

    def __init__(self, model, tokens: torch.Tensor, settings: TrainSettings, importance=None, pruner=None, checkpoint_dir=None):
        self.model, self.tokens, self.s = model, tokens, settings
        self.importance, self.pruner = importance, pruner
        self.checkpoint = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
        # fixed at construction: weights that get .grad later only for importance (metric "grad")
        # are observed, never trained, and are not checkpointed
        self.params = _trainable(model)
        if not self.params:
            raise SlimtuneError("nothing to train: no parameter requires grad (were LoRA adapters attached?)")
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=settings.lr, weight_decay=settings.weight_decay)
        warm = max(settings.warmup_steps, 0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda t: min(1.0, (t + 1) / (warm + 1)))
        self.step = 0
        self.history: list[dict] = []
        self.scaler = torch.amp.GradScaler(enabled=settings.mixed_precision == "fp16")
        if settings.gradient_checkpointing:
            base = unwrap(model)
            enable_checkpointing(base)
            if hasattr(base, "enable_input_require_grads"):
                base.enable_input_require_grads()
            base.config.use_cache = False

    # ---- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "trainable": {n: p.detach().clone() for n, p in self.params.items()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
            "importance": self.importance.state_dict() if hasattr(self.importance, "state_dict") else None,
            "history": self.history,
            "rng": torch.get_rng_state(),
        }

    def save_checkpoint(self) -> None:
        if self.checkpoint is None:
            return
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        atomic_write_bytes(self.checkpoint, buf.getvalue())

    def load_checkpoint(self) -> bool:
        if self.checkpoint is None or not self.checkpoint.is_file():
            return False
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        params = self.params
        missing = set(state["trainable"]) ^ set(params)
        if missing:
            raise SlimtuneError(f"checkpoint {self.checkpoint} does not match this model/adapter set-up ({len(missing)} tensors differ); rerun without --resume or with the original options")
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.pruner is not None and state["pruner"] is not None:
            self.pruner.load_state_dict(state["pruner"])
        if state["importance"] is not None and hasattr(self.importance, "load_state_dict"):
            self.importance.load_state_dict(state["importance"])
        self.history = state["history"]
        self.step = state["step"]
        torch.set_rng_state(state["rng"])
        return True

    # ---- loop -------------------------------------------------------------------------
    def train_step(self) -> float:
        s, model = self.s, self.model
        model.train()
        total = 0.0
        device = next(model.parameters()).device
        for micro in range(s.grad_accum):
            batch = batch_at(self.tokens, s.batch_size, s.seed, self.step * s.grad_accum + micro).to(device)
            with _autocast(model, s.mixed_precision):
                loss = causal_lm_loss(model, batch) / s.grad_accum
            if not torch.isfinite(loss):
                where = f"; the last good checkpoint is {self.checkpoint} (resume with --resume after lowering --lr)" if self.checkpoint and self.checkpoint.is_file() else "; lower --lr"
                raise SlimtuneError(f"loss became {loss.item()} at step {self.step + 1}{where}")
            self.scaler.scale(loss).backward()
            total += loss.item()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), s.max_grad_norm)
        if self.importance is not None and hasattr(self.importance, "observe"):
            self.importance.observe(model)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        model.zero_grad(set_to_none=True)  # also the observed-only weight gradients
        self.step += 1
        return total

    def run(self, progress: bool = True) -> list[dict]:
        s = self.s
        bar = tqdm(total=s.steps, initial=self.step, desc="prune+finetune", disable=not progress, dynamic_ncols=True)
        while self.step < s.steps:
            loss = self.train_step()
            info = self.pruner.step(self.step) if self.pruner is not None else None
            sparsity = float(self.pruner.current) if self.pruner is not None else 0.0
            row = {"step": self.step, "loss": loss, "sparsity": sparsity, "lr": self.sched.get_last_lr()[0]}
            if info is not None:
                row["achieved"] = info["achieved"]
            self.history.append(row)
            bar.set_postfix(loss=f"{loss:.3f}", sparsity=f"{sparsity:.3f}")
            bar.update(1)
            if s.checkpoint_every and (self.step % s.checkpoint_every == 0 or self.step == s.steps):
                self.save_checkpoint()
        bar.close()
        return self.history


def mean_loss(history: list[dict], last: int = 5) -> float:
    vals = [h["loss"] for h in history[-last:]]
    return sum(vals) / len(vals) if vals else math.nan
