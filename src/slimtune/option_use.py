"""Options typed on the command line that the run would not use: refused in one line, never ignored.

A user who types `--sparsity 0.1 --granularity nm`, `--quant-init paper` without `--quant`, or
`--distill` with `--recover-steps 0` expects the option to act. Each rule below names the typed
options (as `given()` keys: "field" or "section.field"), when the job leaves them unused, and what
to change. Only what was typed is checked: defaults and presets set options that may go unused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import SlimtuneError


@dataclass(frozen=True)
class Rule:
    keys: tuple[str, ...]  # typed options this rule covers; a trailing "." covers a whole section
    unused: Callable  # (job, method config) -> True when the run would not use them
    why: str  # the reason and the fix, after "<flags> has no effect: "


def _progressive(job, config) -> bool:
    return config.mode == "progressive"


def _trains(job, config) -> bool:
    return config.uses_lora


RULES = (
    Rule(("prune.sparsity",), lambda j, c: j.prune.granularity.strip().lower() == "nm",
         "N:M fixes the sparsity of each projection at 1 - n/m (2:4 removes half); drop {it}, or use --granularity unstructured"),
    Rule(("prune.nm",), lambda j, c: j.prune.granularity.strip().lower() != "nm",
         "it is the pattern of --granularity nm; add --granularity nm, or drop {it}"),
    Rule(("prune.head_mode",), lambda j, c: "heads" not in j.prune.units,
         "no heads are pruned; add heads to --granularity, or drop {it}"),
    Rule(("prune.layer_share",), lambda j, c: not ("layers" in j.prune.units and len(j.prune.units) > 1),
         "it splits the target between whole layers and heads/channels; use a mix such as --granularity channels,layers, or drop {it}"),
    Rule(("prune.schedule", "prune.warmup", "prune.cooldown", "prune.prune_every"), lambda j, c: not _progressive(j, c),
         "the progressive ramp is not used: this criterion prunes once; use a progressive criterion (e.g. loraprune), or drop {it}"),
    Rule(("calib_batches", "recover_steps"), _progressive,
         "for one-shot criteria (taylor, wanda, sparsegpt ...), and this one prunes while it trains for --steps; drop {it}"),
    Rule(("l0_init",), lambda j, c: j.criterion != "l0", "it sets where the l0 criterion's gates start; pass --criterion l0, or drop {it}"),
    Rule(("percdamp", "blocksize"), lambda j, c: j.criterion != "sparsegpt",
         "SparseGPT's options, and the criterion is another; drop {it}, or pass --criterion sparsegpt"),
    Rule(("quant.quantizer", "quant.quant_start", "quant.quant_init", "quant.quant_lr"), lambda j, c: not j.quant.enabled,
         "quantisation-aware training is off; add --quant (e.g. --quant w4g32), or drop {it}"),
    Rule(("distill.temperature", "distill.mix"), lambda j, c: not j.distill.enabled and _trains(j, c),
         "distillation is off; add --distill, or drop {it}"),
    Rule(("lora.ga_batches", "lora.ga_gamma"), lambda j, c: j.lora.variant != "lora_ga" and _trains(j, c),
         "LoRA-GA is not the variant; add --lora-variant lora_ga, or drop {it}"),
    Rule(("lora.adalora_warmup", "lora.adalora_final", "lora.adalora_every", "lora.adalora_orth"),
         lambda j, c: j.lora.variant != "adalora" and _trains(j, c),
         "AdaLoRA is not the variant; add --lora-variant adalora, or drop {it}"),
    # no recovery: nothing trains, so no training option acts (batch size and seed still draw calibration batches)
    Rule(("lora.", "distill.", "averaging.", "quant.", "train.steps", "train.lr", "train.lr_schedule", "train.warmup_steps", "train.grad_accum",
          "train.weight_decay", "train.max_grad_norm", "train.lora_plus_ratio", "train.lora_pro", "train.lr_rule", "train.lr_base_batch",
          "train.gradient_checkpointing", "train.mixed_precision", "train.compile", "train.checkpoint_every"),
         lambda j, c: not _trains(j, c),
         "--recover-steps 0 trains nothing; give recovery steps, or drop {it}"),
)


def check_typed(typed: dict, job) -> None:
    """Refuse every typed option the job would not use (see RULES), naming the flags and the fix."""
    from .recipe import _flag  # the flag a setting's key has on the command line

    config = job.method
    for rule in RULES:
        hits = [k for k in typed if any(k == key or (key.endswith(".") and k.startswith(key)) for key in rule.keys)]
        if hits and rule.unused(job, config):
            flags = [_flag(job, k) for k in hits]
            text = rule.why.replace("{it}", "it" if len(flags) == 1 else "them")
            raise SlimtuneError(f"{', '.join(flags)} {'has' if len(flags) == 1 else 'have'} no effect here: {text}")
    warmup = typed.get("train.warmup_steps")
    if warmup is not None and config.uses_lora and warmup >= config.steps:
        raise SlimtuneError(f"--warmup-steps {warmup} is not below the {config.steps} training steps, so the learning rate never "
                            "reaches --lr; lower --warmup-steps, or raise --steps")
