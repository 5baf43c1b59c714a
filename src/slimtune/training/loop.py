"""slimtune's own training loop (the CLI and `prune_` use it; users' Trainers use callback.py).

Both run the per-step order of training/step.py once per optimiser step:
    backward -> clip -> importance.observe(model) -> optimizer.step() -> pruner.step(t)
The learning rate warms up linearly and then follows `lr_schedule` (transformers' schedulers).
Checkpoints hold the trainable (LoRA) weights, the optimiser and LR-scheduler state, the masks, the
importance EMA and the RNG state (of every process), so `--resume` reproduces an uninterrupted run
exactly.

Under `accelerate launch` / `torchrun` (distributed.py) every process runs this loop on its own
share of each global batch: rank r of W takes micro-batch index (step x accumulation + micro) x W + r,
which are the same rows, in the same order, that one process with a W times larger micro-batch
takes. The gradients are averaged before clipping, so every rank observes, steps and prunes alike;
only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters.adalora import RankBudget
from ..cli_gen import cli_help
from ..data import batch_at
from ..errors import SlimtuneError
from ..io import atomic_write_with
from ..models.arch import unwrap
from . import distributed
from .averaging import AveragingSettings, WeightAverager
from .compile import compile_layers
from .distill import DistillSettings, dense_teacher, distill_loss
from .lora_pro import lora_pro_
from .loss import causal_lm_loss
from .lr_rule import RULES, global_batch, scaled_lr
from .step import PruneStep
from .tensorboard import StepWriter

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"  # one JSON row per optimiser step, next to the checkpoint


LR_SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainSettings:
    # 48 at the quick preset: 4.4 min on a 2-core CPU for 1.51x dense perplexity at 512 tokens, against
    # 1.65x with 24 steps (benchmarks/default_run.py v6 / v4)
    steps: int = field(default=48, metadata=cli_help("optimiser steps of LoRA fine-tuning"))
    batch_size: int = field(default=2, metadata=cli_help("micro-batch size (sequences)"))
    grad_accum: int = field(default=1, metadata=cli_help("micro-batches per optimiser step"))
    lr: float = field(default=5e-4, metadata=cli_help("peak learning rate (AdamW)"))
    # constant by default: at the quick budget (then 24 steps) cosine decay cost 85.1 vs 60.5 test perplexity
    # (benchmarks/results/default_run.json); the longer presets decay with cosine
    lr_schedule: str = field(default="constant", metadata=cli_help("decay after warm-up", choices=LR_SCHEDULES))
    weight_decay: float = field(default=0.0, metadata=cli_help("AdamW weight decay of the adapter weights"))
    lr_rule: str = field(default="auto", metadata=cli_help("how the LR follows the global batch (devices x batch x accumulation) away from --lr-base-batch: auto (sqrt for AdamW), sqrt, linear, none", choices=RULES))
    lr_base_batch: int = field(default=2, metadata=cli_help("the global batch (sequences) --lr is meant for"))
    warmup_steps: int = field(default=2, metadata=cli_help("linear LR warm-up steps"))
    max_grad_norm: float = field(default=1.0, metadata=cli_help("gradient clipping norm"))
    seed: int = field(default=0, metadata=cli_help("seed of LoRA init, dropout and batch order"))
    gradient_checkpointing: bool = field(default=False, metadata=cli_help("recompute activations in backward to save memory"))
    mixed_precision: str = field(default="no", metadata=cli_help("autocast dtype", choices=("no", "bf16", "fp16")))
    lora_plus_ratio: float = field(default=1.0, metadata=cli_help(
        "LoRA+ (Hayou et al. 2024): the LoRA B matrices (and 1-D adapter weights) learn this many times faster than A; "
        "the paper uses 16 with AdamW; 1 = plain LoRA"))
    lora_pro: bool = field(default=False, metadata=cli_help(
        "LoRA-Pro (Wang et al. 2024): replace the adapter gradients by the pair whose low-rank step best matches the full "
        "fine-tuning gradient (efficient mode: AdamW state stays low-rank); not with DoRA"))
    compile: bool = field(default=False, metadata=cli_help("torch.compile each decoder layer for training (pays on a GPU, where kernel launches dominate; the first steps compile)"))
    checkpoint_every: int = field(default=10, metadata=cli_help("optimiser steps between resumable checkpoints (0 = none)"))

    def global_batch(self, devices: int = 1) -> int:
        return global_batch(self.batch_size, self.grad_accum, devices)

    def effective_lr(self, devices: int = 1) -> float:
        """--lr moved from --lr-base-batch to this run's global batch by --lr-rule (capped at 4x either way)."""
        return scaled_lr(self.lr, self.lr_base_batch, self.global_batch(devices), "adamw", self.lr_rule)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise SlimtuneError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        for name in ("warmup_steps", "checkpoint_every", "weight_decay"):
            if getattr(self, name) < 0:
                raise SlimtuneError(f"--{name.replace('_', '-')} {getattr(self, name)} must not be negative")
        if not self.lr > 0:
            raise SlimtuneError(f"--lr must be positive, got {self.lr}")
        if not (self.lora_plus_ratio > 0 and self.lora_plus_ratio != float("inf")):
            raise SlimtuneError(f"--lora-plus-ratio must be a positive number, got {self.lora_plus_ratio}; 16 is LoRA+'s choice, 1 turns it off")
        if not self.max_grad_norm > 0:
            raise SlimtuneError(f"--max-grad-norm must be positive, got {self.max_grad_norm}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise SlimtuneError(f"unknown --mixed-precision '{self.mixed_precision}'; choose no, bf16 or fp16")
        if self.lr_base_batch < 1:
            raise SlimtuneError(f"--lr-base-batch {self.lr_base_batch} must be at least 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise SlimtuneError(f"unknown --lr-schedule '{self.lr_schedule}'; choose {', '.join(LR_SCHEDULES)}")


def check_precision(model: nn.Module, mode: str) -> None:
    """Refuse a --mixed-precision the model's device cannot run, before any work."""
    device = next(model.parameters()).device
    if device.type == "cuda" and mode == "bf16" and not torch.cuda.is_bf16_supported():
        raise SlimtuneError("this GPU does not support bf16; use --mixed-precision fp16 or no")
    if device.type == "cpu" and mode == "fp16":
        raise SlimtuneError("fp16 autocast needs a GPU; use --mixed-precision bf16 or no on CPU")


def _autocast(model: nn.Module, mode: str):
    device = next(model.parameters()).device
    if mode == "no":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing under either transformers 5 name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lr_scheduler(optimizer, settings: TrainSettings):
    """Linear warm-up to `lr`, then `lr_schedule` down to 0 at the last step (transformers' schedulers)."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if settings.lr_schedule == "constant" else settings.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=settings.steps)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Trainer:
    """Minimal LoRA fine-tuning loop with pruning hooks, checkpoints and resume."""

    def __init__(self, model, tokens: torch.Tensor, settings: TrainSettings, importance=None, pruner=None, checkpoint_dir=None,
                 distill: DistillSettings | None = None, averaging: AveragingSettings | None = None, devices: int | None = None, quant=None):
        """devices: the device count the LR rule assumes (default: the processes of this launch);
        quant: a quantisation-aware training phase (quant/qat.py), switched on by `run` and checkpointed."""
        self.model, self.tokens, self.s = model, tokens, settings
        self.quant = quant
        self.world = distributed.current()
        self.importance, self.pruner = importance, pruner
        self.prune_step = PruneStep(importance, pruner)
        self.checkpoint = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
        # fixed at construction: weights that get .grad later only for importance (metric "grad")
        # are observed, never trained, and are not checkpointed
        self.params = _trainable(model)
        if not self.params:
            raise SlimtuneError("nothing to train: no parameter requires grad (were LoRA adapters attached?)")
        self.lr = settings.effective_lr(self.world.size if devices is None else devices)
        self.opt = self._adamw(self._adapter_groups())
        self.sched = lr_scheduler(self.opt, settings)
        self.step = 0
        self.history: list[dict] = []
        # the dense teacher is this same model with adapters off and masks open: no second copy
        self.distill = distill if distill is not None and distill.enabled else None
        self.teacher = dense_teacher(model, getattr(pruner, "gates", None), quant, getattr(importance, "handles", None)) if self.distill else None
        self.averager = WeightAverager(self.params, averaging, settings.steps) if averaging is not None and averaging.enabled else None
        self.adalora = RankBudget.of(model, settings.steps)  # AdaLoRA: orthogonality penalty and rank reallocation
        self.log = Path(checkpoint_dir) / LOG if checkpoint_dir else None
        self.events = StepWriter(checkpoint_dir, enabled=self.world.main)  # TensorBoard, when installed
        check_precision(model, settings.mixed_precision)
        self.scaler = torch.amp.GradScaler(enabled=settings.mixed_precision == "fp16")
        if settings.gradient_checkpointing:
            base = unwrap(model)
            enable_checkpointing(base)
            if hasattr(base, "enable_input_require_grads"):
                base.enable_input_require_grads()
            base.config.use_cache = False
        if self.world.enabled:
            self._join()

    def _fused(self) -> bool | None:
        """AdamW's fused CUDA kernel (one launch for all adapters instead of several per tensor) where
        the weights are on a GPU; torch's default elsewhere."""
        return True if next(self.model.parameters()).device.type == "cuda" else None

    def _adapter_groups(self) -> list[dict]:
        """The trained weights as optimiser groups: one, or with LoRA+ two, B's at `lora_plus_ratio` x the
        LR. B is told apart as PEFT's `create_loraplus_optimizer` does ("lora_B" in the name, or a 1-D
        weight such as DoRA's magnitude); that function builds its own optimiser, while this loop has
        to rebuild its optimiser with extra groups (QAT) and rescale the LR per group (LR rule)."""
        ratio = self.s.lora_plus_ratio
        if ratio == 1.0:
            return [{"params": list(self.params.values()), "lr_ratio": 1.0}]
        fast, slow = [], []
        for n, p in self.params.items():
            (fast if "lora_B" in n or p.ndim == 1 else slow).append(p)
        return [g for g in ({"params": slow, "lr_ratio": 1.0}, {"params": fast, "lr": self.lr * ratio, "lr_ratio": ratio}) if g["params"]]

    def _adamw(self, groups) -> torch.optim.AdamW:
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.s.weight_decay, fused=self._fused())

    def _join(self) -> None:
        """Start every rank alike: rank 0's adapter weights and masks (one-shot masks were computed on
        every rank from the same batches; this removes any kernel-level difference), then a dropout
        stream of its own (the data already differ by rank)."""
        device = next(self.model.parameters()).device
        if device != self.world.device:
            raise SlimtuneError(f"process {self.world.rank} holds the model on {device}, not on its own device {self.world.device}; "
                                "move it there before attaching adapters (slimtune.prune_ does this)")
        self.world.broadcast_(list(self.params.values()))
        self._sync_masks()
        torch.manual_seed(self.s.seed + self.world.rank)

    def _synced(self) -> list[torch.Tensor]:
        """What the ranks average, in the same order everywhere: every optimised parameter (adapters,
        any extra groups) and every other one that requires grad (W0 observed with metric="grad")."""
        seen, out = set(), []
        for p in (*(p for g in self.opt.param_groups for p in g["params"]), *self.model.parameters()):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def _sync_masks(self) -> None:
        masks = getattr(self.pruner, "masks", None)
        if self.world.enabled and isinstance(masks, nn.Module):
            self.world.broadcast_(list(masks.buffers()))

    def rebuild_optimizer(self, extra_groups: list[dict] = ()) -> None:
        """A new AdamW over `self.params` plus `extra_groups` (param-group dicts with their own lr, e.g.
        quantiser step sizes), its LR schedule continued at the current step; parameters that stay
        keep their AdamW state."""
        old = self.opt
        self.opt = self._adamw([*self._adapter_groups(), *extra_groups])
        for group in self.opt.param_groups:
            for p in group["params"]:
                if p in old.state:
                    self.opt.state[p] = old.state[p]
        self.sched = lr_scheduler(self.opt, self.s)
        self.sched.last_epoch = self.step
        lrs = [base * fn(self.step) for base, fn in zip(self.sched.base_lrs, self.sched.lr_lambdas)]
        for group, lr in zip(self.opt.param_groups, lrs):
            group["lr"] = lr
        self.sched._last_lr = lrs

    # ---- checkpoints ------------------------------------------------------------------
    def _rng_state(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(device)
        return state

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "world_size": self.world.size,
            "trainable": {n: p.detach().clone() for n, p in self.params.items()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            **self.prune_step.state_dict(),
            "averager": self.averager.state_dict() if self.averager is not None else None,
            "history": self.history,
            "rng": [self._rng_state()],  # one per rank
            "quant": self.quant.state_dict() if self.quant is not None else None,
            "adalora": self.adalora.state_dict() if self.adalora is not None else None,
        }

    def save_checkpoint(self) -> None:
        """Rank 0 writes (with every rank's RNG state); the others wait until it has."""
        if self.checkpoint is None:
            return
        rng = self.world.gather(self._rng_state())
        if self.world.main:
            state = self.state_dict()
            state["rng"] = rng
            # streamed into the temporary file: no serialised copy in memory (SEVEN's moments are 810 MiB)
            atomic_write_with(self.checkpoint, lambda fh: torch.save(state, fh))
        self.world.barrier()

    def load_checkpoint(self) -> bool:
        if self.checkpoint is None or not self.checkpoint.is_file():
            return False
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        self.prune_step.load_state_dict(state)  # masks first: a started QAT phase shrinks the model along them
        if self.quant is not None:
            self.quant.load_state_dict(self, state.get("quant"))
        params = self.params
        missing = set(state["trainable"]) ^ set(params)
        if missing:
            raise SlimtuneError(f"checkpoint {self.checkpoint} does not match this model/adapter set-up ({len(missing)} tensors differ); rerun without --resume or with the original options")
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t)
        ratios = [g.get("lr_ratio") for g in self.opt.param_groups]
        self.opt.load_state_dict(state["optimizer"])
        for group, ratio in zip(self.opt.param_groups, ratios):  # loading takes the saved options too:
            group["fused"] = self._fused()  # a GPU checkpoint resumed on a CPU
            if ratio is not None:
                group.setdefault("lr_ratio", ratio)  # a checkpoint from before LoRA+ has no ratio in its groups
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.averager is not None:
            if state.get("averager") is None:
                raise SlimtuneError(f"checkpoint {self.checkpoint} has no --ema/--swa average; resume with the original options")
            self.averager.load_state_dict(state["averager"])
        if self.adalora is not None:
            self.adalora.load_state_dict(state.get("adalora"))
        self.history = state["history"]
        if self.log is not None and self.world.main:  # rows logged after this checkpoint belong to the interrupted run
            self.log.write_text("".join(json.dumps(row) + "\n" for row in self.history))
        self.step = state["step"]
        rng = state["rng"]
        rng = [{"cpu": rng}] if isinstance(rng, torch.Tensor) else rng  # checkpoints before per-rank states
        mine = rng[self.world.rank % len(rng)]
        torch.set_rng_state(mine["cpu"])
        device = next(self.model.parameters()).device
        if device.type == "cuda" and "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], device)
        saved = int(state.get("world_size", 1))
        if saved != self.world.size:
            self._resized(saved)
        return True

    def _resized(self, saved: int) -> None:
        """A checkpoint of `saved` processes resumed by another number: follow the new global batch, and say so."""
        before, after = self.s.global_batch(saved), self.s.global_batch(self.world.size)
        lambdas = getattr(self.sched, "lr_lambdas", None)
        if lambdas is not None:  # the adapters' groups take the LR rule's value for this global batch, at the schedule's position
            for k, group in enumerate(self.opt.param_groups):
                if "lr_ratio" in group:  # an adapter group (LoRA+ keeps its ratio); QAT's step sizes keep their own LR
                    base = self.lr * group["lr_ratio"]
                    group["initial_lr"], group["lr"] = base, base * lambdas[k](self.sched.last_epoch)
                    self.sched.base_lrs[k] = base
            self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        if self.world.main:
            print(f"[slimtune] warning: resuming a {saved}-process checkpoint with {self.world.size} process(es): the global batch "
                  f"changes from {before} to {after} sequences (lr now {self.lr:.3g}) and later steps draw other batches, so the "
                  f"result will differ from an uninterrupted run; resume with {saved} process(es) to continue exactly", file=sys.stderr)

    # ---- loop -------------------------------------------------------------------------
    def _loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.teacher is None:
            total, parts = causal_lm_loss(self.model, batch), {}
        else:
            total, lm, kl = distill_loss(self.model, batch, self.teacher, self.distill)
            parts = {"lm_loss": lm.detach(), "kl": kl.detach()}
        # terms that methods add to the loss (loss_term(), and loss_log() for the log row): the L0 gates'
        # Lagrangian ("penalty"), AdaLoRA's orthogonality penalty ("orth")
        for name, source in (("penalty", self.prune_step.importance), ("orth", self.adalora)):
            term = source.loss_term() if source is not None and hasattr(source, "loss_term") else None
            if term is not None:
                parts.setdefault("lm_loss", total.detach())
                parts[name] = term.detach()
                parts.update(source.loss_log())
                total = total + term
        return total, parts

    def train_step(self) -> dict[str, float]:
        """One optimiser step; returns this step's mean loss (and its parts). Syncs with the device once."""
        s, model = self.s, self.model
        model.train()
        device = next(model.parameters()).device
        world = self.world
        sums: dict[str, torch.Tensor] = {}
        for micro in range(s.grad_accum):
            # rank r's share of the global micro-batch: the rows one process with W x the batch would take
            index = (self.step * s.grad_accum + micro) * world.size + world.rank
            batch = batch_at(self.tokens, s.batch_size, s.seed, index).to(device)
            with _autocast(model, s.mixed_precision):
                loss, parts = self._loss(batch)
                loss = loss / s.grad_accum
            self.scaler.scale(loss).backward()
            for key, value in {"loss": loss.detach(), **{k: v / s.grad_accum for k, v in parts.items()}}.items():
                sums[key] = sums.get(key, 0) + value
        if world.enabled:  # average the gradients and the losses over the ranks; reading the losses is the one sync
            values = dict(zip(sums, world.average_gradients(self._synced(), list(sums.values()))))
        else:
            values = {k: float(v) for k, v in sums.items()}  # the one host sync of the step
        if not math.isfinite(values["loss"]):
            where = f"; the last good checkpoint is {self.checkpoint} (resume with --resume after lowering --lr)" if self.checkpoint and self.checkpoint.is_file() else "; lower --lr"
            raise SlimtuneError(f"loss became {values['loss']} at step {self.step + 1}{where}")
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), s.max_grad_norm)
        self.prune_step.before_optimizer(model)  # the criterion reads the raw LoRA gradients
        if s.lora_pro:
            lora_pro_(model)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        # AdaLoRA reads the gradients (before they are cleared); not those of a step fp16's scaler skipped as non-finite
        if self.adalora is not None and (scale is None or self.scaler.get_scale() >= scale):
            self.adalora.after_step(self.step + 1)
        model.zero_grad(set_to_none=True)  # also the observed-only weight gradients
        self.step += 1
        if self.averager is not None:
            self.averager.update(self.step)
        return values

    def run(self, progress: bool = True) -> list[dict]:
        s = self.s
        main = self.world.main
        bar = tqdm(total=s.steps, initial=self.step, desc="prune+finetune", disable=not (progress and main), dynamic_ncols=True)
        tokens_per_step = s.global_batch(self.world.size) * self.tokens.shape[1]
        device = next(self.model.parameters()).device
        eager = compile_layers(self.model) if s.compile else None
        try:
            while self.step < s.steps:
                if self.quant is not None:
                    self.quant.maybe_start(self)
                t0 = time.perf_counter()
                values = self.train_step()
                info = self.prune_step.after_optimizer(self.step)
                if info is not None:
                    self._sync_masks()
                seconds = time.perf_counter() - t0
                sparsity = self.prune_step.sparsity
                row = {"step": self.step, **values, "sparsity": sparsity, "lr": self.sched.get_last_lr()[0],
                       "seconds": seconds, "tokens_per_s": tokens_per_step / seconds, "memory_mib": memory_now_mib(device)}
                if info is not None:
                    row["achieved"] = info["achieved"]
                self.history.append(row)
                if self.log is not None and main:
                    append_jsonl(self.log, row)
                self.events.write(row)
                bar.set_postfix(loss=f"{values['loss']:.3f}", sparsity=f"{sparsity:.3f}")
                bar.update(1)
                if s.checkpoint_every and (self.step % s.checkpoint_every == 0 or self.step == s.steps):
                    self.save_checkpoint()
        finally:  # an interrupted run still flushes its events
            bar.close()
            self.events.close()
            if eager is not None:
                eager()
        return self.history


def memory_now_mib(device: torch.device) -> float:
    """The CUDA allocator's peak so far on GPU, the process RSS on CPU. The peak is never reset here:
    the run's report takes its training peak from the same counter (evaluate/memory.py), and a reset
    every step left it only the last step's tail (92 MiB for a 4 x 512 bf16 run on an H200)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def mean_loss(history: list[dict], last: int = 5) -> float:
    vals = [h["loss"] for h in history[-last:]]
    return sum(vals) / len(vals) if vals else math.nan
