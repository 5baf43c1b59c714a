"""LoRA-family adapters through PEFT: plain LoRA, rsLoRA, DoRA and PiSSA.

    W' = W0 + s·B·A,  B [out, r], A [r, in],  s = α/r  (rsLoRA: α/√r, arXiv 2312.03732)
    DoRA  (arXiv 2402.09353): W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row, m starts at ‖W0‖_row
    PiSSA (arXiv 2404.02948): s·B·A starts as the top-r SVD part of W0 and W0 becomes the residual
    LoRA-GA (arXiv 2407.05000): A, B start along the SVD of the full gradient, W0 ← W0 − s·B₀·A₀ (loraga.py)
    AdaLoRA (arXiv 2303.10512): W' = W0 + s·P·diag(λ)·Q with s = α/init_r, ranks cut to a budget (adalora.py)

`attach_lora` wraps the model in place (PiSSA and LoRA-GA also rewrite the base weights) and returns the
`PeftModel`; only adapter parameters stay trainable. `lora_pairs` finds the LoRA layer of every
adapted decoder projection through the arch spec, for criteria that read A, B and their gradients.
Code that needs the update itself asks `adapter_product` (models/lora_layers.py) for the two-factor view ΔW = s·B·A, which
for AdaLoRA is A := diag(λ)·Q, B := P, s := α/(init_r + 1e-5) (PEFT's scale, as its forward computes it);
`adapter_params` lists the trained factors (AdaLoRA's λ too).
PiSSA and LoRA-GA adapters must be saved with `save.save_initial_adapters` right after `attach_lora` (save.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..cli_gen import cli_help
from ..errors import SlimtuneError
from ..models.arch import ArchSpec, get_arch
from ..models.lora_layers import (  # noqa: F401 (re-exported)
    active_adapter,
    adapter_params,
    adapter_product,
    is_adalora,
    lora_weights,
    scaling,
)

VARIANTS = ("lora", "rslora", "dora", "pissa", "lora_ga", "adalora")
MUTATING = ("pissa", "lora_ga")  # variants that rewrite the base weights at init


@dataclass
class LoraSettings:
    r: int = field(default=8, metadata=cli_help("LoRA rank"))
    alpha: float = field(default=16.0, metadata=cli_help("LoRA scale numerator: the update is (alpha/r)·B·A, alpha/sqrt(r) with rslora"))
    dropout: float = field(default=0.05, metadata=cli_help("dropout on the LoRA input"))
    targets: list[str] | None = field(  # leaf module names; None: all seven projections of the arch spec
        default=None, metadata=cli_help("comma-separated Linear names to adapt, e.g. q_proj,v_proj (default: every attention and MLP projection)")
    )
    variant: str = field(
        default="lora",
        metadata=cli_help("lora, rslora (scale alpha/sqrt(r)), dora (magnitude + direction), pissa (init from the top singular vectors), "
                          "lora_ga (init from the SVD of the full gradient on --lora-ga-batches batches), "
                          "adalora (SVD form P·diag(λ)·Q, starts at rank --adalora-init-r and cuts the total rank to --lora-r per projection "
                          "where importance is lowest)", choices=VARIANTS),
    )
    ga_batches: int = field(default=4, metadata=cli_help("LoRA-GA: training batches whose mean full-weight gradient initialises the adapters"))
    ga_gamma: float = field(default=16.0, metadata=cli_help("LoRA-GA: the stable scale's gamma; A and B start at d_out^(1/4)/sqrt(gamma) times unit vectors"))
    # AdaLoRA (adalora.py); --lora-r is its target (average) rank
    adalora_init_r: int | None = field(default=None, metadata=cli_help(
        "AdaLoRA: the rank every projection starts at (default: 1.5 x --lora-r, the paper's ratio)", flag="--adalora-init-r"))
    adalora_warmup: float = field(default=0.1, metadata=cli_help(
        "AdaLoRA: fraction of the steps trained at the initial rank before ranks are cut (its t_init)", flag="--adalora-warmup"))
    adalora_final: float = field(default=0.2, metadata=cli_help(
        "AdaLoRA: fraction of the steps, at the end, trained with the final rank pattern fixed (its t_final)", flag="--adalora-final"))
    adalora_every: int = field(default=1, metadata=cli_help("AdaLoRA: steps between rank reallocations (its ΔT)", flag="--adalora-every"))
    adalora_orth: float = field(default=0.1, metadata=cli_help(
        "AdaLoRA: weight of the orthogonality penalty on P and Q (the official recipe's 0.1; PEFT defaults to 0.5)", flag="--adalora-orth"))

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise SlimtuneError(f"unknown LoRA variant '{self.variant}'; choose one of {', '.join(VARIANTS)}")
        if int(self.r) != self.r or self.r < 1:
            raise SlimtuneError(f"LoRA rank {self.r} is invalid; pass a positive integer such as 8")
        if self.alpha <= 0:
            raise SlimtuneError(f"LoRA alpha {self.alpha} must be positive; the usual choice is 2·r")
        if not 0.0 <= self.dropout < 1.0:
            raise SlimtuneError(f"LoRA dropout {self.dropout} is outside [0, 1); the usual choice is 0.05")
        if int(self.ga_batches) != self.ga_batches or self.ga_batches < 1:
            raise SlimtuneError(f"--lora-ga-batches {self.ga_batches} must be a positive integer; the paper's code uses 2 to 8")
        if not self.ga_gamma > 0:
            raise SlimtuneError(f"--lora-ga-gamma {self.ga_gamma} must be positive; the paper uses 16")
        if self.adalora_init_r is not None and (int(self.adalora_init_r) != self.adalora_init_r or self.adalora_init_r < self.r):
            raise SlimtuneError(f"--adalora-init-r {self.adalora_init_r} must be an integer of at least --lora-r {self.r}; the paper starts at 1.5x the target")
        for name in ("adalora_warmup", "adalora_final"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise SlimtuneError(f"--{name.replace('_', '-')} {getattr(self, name)} is outside [0, 1); it is a fraction of the steps, e.g. 0.1")
        if self.adalora_warmup + self.adalora_final >= 1.0:
            raise SlimtuneError(f"--adalora-warmup {self.adalora_warmup} + --adalora-final {self.adalora_final} leave no step to cut ranks in; keep their sum below 1")
        if int(self.adalora_every) != self.adalora_every or self.adalora_every < 1:
            raise SlimtuneError(f"--adalora-every {self.adalora_every} must be a positive integer (steps between reallocations)")
        if not self.adalora_orth >= 0:
            raise SlimtuneError(f"--adalora-orth {self.adalora_orth} must not be negative; 0 turns the penalty off")
        if self.targets is not None and not list(self.targets):
            raise SlimtuneError("LoRA targets are empty; name modules such as q_proj,v_proj or leave the default")


def linear_leaf_names(model: nn.Module) -> list[str]:
    """Sorted leaf names of every nn.Linear in the model (what PEFT can target)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def lora_targets(model: nn.Module, settings: LoraSettings) -> list[str]:
    """The leaf names to adapt, checked against the model before anything is built."""
    targets = list(settings.targets) if settings.targets is not None else get_arch(model).leaf_names()
    available = linear_leaf_names(model)
    missing = [t for t in targets if t not in available]
    if missing:  # PEFT only complains when *nothing* matches; a typo next to a good name would be silently dropped
        raise SlimtuneError(f"target modules {', '.join(missing)} match nothing in this model; available: {', '.join(available)}")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and emb is not None and m.weight is getattr(emb, "weight", None)})
    if set(tied) & set(targets):  # the merge would write B·A into the shared tensor: the input embedding changes too
        raise SlimtuneError(f"{', '.join(sorted(set(tied) & set(targets)))} shares its weight with the input embedding (tie_word_embeddings), "
                            "so merging an adapter into it would also change the embedding the model was trained with; "
                            "drop it from --lora-targets")
    return targets


def attach_lora(model: nn.Module, settings: LoraSettings | None = None, batches=None, steps: int | None = None):
    """Wrap `model` (in place) with a LoRA-family adapter; returns the `peft.PeftModel`.
    LoRA-GA needs `batches`: an iterable of token-id batches [b, L] for its gradient; AdaLoRA needs
    `steps`, the optimiser steps its rank budget is scheduled over."""
    from peft import get_peft_model

    settings = settings or LoraSettings()
    targets = lora_targets(model, settings)
    if settings.variant == "adalora":
        from .adalora import adalora_config

        config = adalora_config(settings, targets, steps)
    else:
        config = _lora_config(settings, targets)
    if settings.variant == "lora_ga" and batches is None:
        raise SlimtuneError("LoRA-GA initialises the adapters from gradients: pass batches of token ids to attach_lora")
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in name)  # lora_A, lora_B, DoRA's lora_magnitude_vector, AdaLoRA's lora_E
    if settings.variant == "lora_ga":
        from .loraga import loraga_init_

        loraga_init_(peft_model, batches, settings.ga_gamma)
    return peft_model


def _lora_config(settings: LoraSettings, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=int(settings.r),
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=settings.variant == "rslora",
        use_dora=settings.variant == "dora",
        init_lora_weights="pissa" if settings.variant == "pissa" else True,
    )


def lora_pairs(model: nn.Module, spec: ArchSpec | None = None) -> list[tuple[int, str, nn.Module]]:
    """(layer index, projection path, PEFT LoRA layer) for every adapted decoder projection."""
    from peft.tuners.lora import LoraLayer

    spec = spec or get_arch(model)
    pairs = []
    for i, layer in enumerate(spec.decoder_layers(model)):
        for path in spec.projections():
            module = layer.get_submodule(path)
            if isinstance(module, LoraLayer) and module.active_adapters and active_adapter(module) in module.lora_A:
                pairs.append((i, path, module))
    return pairs
