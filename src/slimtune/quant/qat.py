"""Quantisation-aware training inside the prune + LoRA run: the `--quant` settings and the phase that
switches fake quantisation on.

    no pruning, unstructured, N:M   QuantizerSet on the merged (masked) weights from `quant_start`;
                                    it replaces the weight-mask forward (attach_quantizers keeps the
                                    masks), so Q((W0 + s·B·A) ⊙ M) is what the loss sees
    structured (heads/channels)     group scales cannot follow channel removal, so at `quant_start`
                                    (no earlier than the end of the pruning ramp) the masks are
                                    final: the kept MLP width of every layer is rounded to a multiple
                                    of the group (`align_channels_`, by the criterion's channel
                                    scores, the total kept near the target), the LoRA-wrapped model
                                    is shrunk in place (export.shrink_ slices A/B too) and the
                                    quantisers are built on the shrunk shapes; the remaining
                                    (cool-down) steps train quantisation-aware, with fresh AdamW
                                    moments for the sliced LoRA factors

The phase is driven by the training loop (`Trainer(quant=phase)`): `maybe_start(trainer)` before
every step, `state_dict()` / `load_state_dict(trainer, state)` with the checkpoints, `paused()` for the
dense distillation teacher. After training, `quantized_weights()` gives Q(merged weight) per
projection in float32, computed exactly as the forward computes it, for the merge and the export.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SlimtuneError
from . import (
    INITS,
    QUANTIZERS,
    FakeQuantizer,
    QuantizerSet,
    QuantSpec,
    attach_quantizers,
    make_quantizer,
    merged_weight,
)

GGUF_BLOCK = 32
SUBMODULE = "slimtune_quantizers"  # where the QuantizerSet hangs on the trained model during QAT


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class QuantSettings:
    spec: str | None = field(default=None, metadata=_help("quantisation-aware training of the decoder projections: w<bits>[g<group>][a], e.g. w4g32, w8, w4g32a (a = affine); off when not given", flag="--quant"))
    quantizer: str = field(default="lsq", metadata=_help("fake: PyTorch FakeQuantize (min/max observer); lsq: learned step size (symmetric specs); lsq+: learned step and offset (affine specs)", choices=tuple(QUANTIZERS)))
    quant_start: float | None = field(default=None, metadata=_help("fraction of the steps before fake quantisation turns on (default: when the pruning ramp ends for progressive pruning, else 0)"))
    quant_init: str = field(default="mse", metadata=_help("where lsq/lsq+ step sizes start: mse (least rounding error per group, suits pretrained weights) or paper (LSQ: 2·mean|w|/sqrt(Q_P); LSQ+: the paper's min/max init of affine ranges, since its 3σ weight init is for a symmetric range with no offset)", choices=INITS))
    quant_lr: float | None = field(default=None, metadata=_help("AdamW learning rate of the quantiser step sizes and offsets, on the same schedule (default: --lr / 10)"))
    gguf_blocks: bool = field(default=False, metadata={"cli": False})  # set by --export gguf: quantised widths must split into blocks of 32

    def __post_init__(self):
        if self.spec is None:
            return
        self.parsed  # noqa: B018 (one-line error for a bad spec)
        kind = str(self.quantizer).lower()
        if kind not in QUANTIZERS:
            raise SlimtuneError(f"unknown --quantizer '{self.quantizer}'; choose one of {', '.join(QUANTIZERS)}")
        self.quantizer = kind
        make_quantizer(kind, self.parsed, torch.ones(1, self.parsed.group_size or GGUF_BLOCK))  # kind x spec (lsq: symmetric, lsq+: affine)
        if self.quant_start is not None and not 0.0 <= self.quant_start < 1.0:
            raise SlimtuneError(f"--quant-start {self.quant_start} is outside [0, 1); pass the fraction of the steps before QAT starts, e.g. 0.5")
        if self.quant_init not in INITS:
            raise SlimtuneError(f"unknown --quant-init '{self.quant_init}'; choose {', '.join(INITS)}")
        if self.quant_lr is not None and not self.quant_lr > 0:
            raise SlimtuneError(f"--quant-lr must be positive, got {self.quant_lr}")

    @property
    def enabled(self) -> bool:
        return self.spec is not None

    @property
    def parsed(self) -> QuantSpec:
        return QuantSpec.parse(self.spec)

    @property
    def align(self) -> int:
        """What every quantised input width must be a multiple of: the group (and GGUF's block of 32)."""
        g = self.parsed.group_size or 1
        return math.lcm(g, GGUF_BLOCK) if self.gguf_blocks else g


@torch.no_grad()
def align_channels_(pruner, align: int) -> int:
    """Make every kept layer's MLP width a multiple of `align` so that removing channels removes whole
    quantisation groups. Each width goes to the multiple below or above, whichever keeps the running
    total of kept channels closest to what selection chose (error diffusion over the layers, so the
    sparsity stays near the target), except that under local ranking with one width in every pruned
    layer all go to the nearest multiple alike; going down drops the lowest-scored kept channels, going up
    re-admits the highest-scored pruned ones (their weights were only gated). Refreshes the pruner's
    sparsity info; returns the net number of channels removed (negative: re-admitted)."""
    if align <= 1:
        return 0
    from ..masking.plan import decoder_param_count
    from ..pruning.pruner import scores_from

    masks = pruner.masks
    scores = None
    surplus = 0  # kept channels so far minus what selection chose
    removed = moved = 0
    live = [i for i in range(len(masks)) if masks.layer(i).item() != 0]
    # local ranking that kept the same width in every pruned layer: one rounding for all, so a model
    # asked to be uniform stays uniform (a stock config, a llama GGUF) instead of diffusing the error
    widths = [(int(masks.channels(i).sum()), masks.channels(i).numel()) for i in live]  # (kept, width)
    same = pruner.settings.ranking == "local" and len({w for w in widths if w[0] < w[1]}) == 1
    for i in live:
        kept = masks.channels(i).bool().cpu()
        k, width = int(kept.sum()), kept.numel()
        down = k - k % align
        if down == k:
            continue
        up = down + align
        options = [n for n in (down, up) if 0 < n <= width]
        n = min(options, key=lambda n: (abs(n - k), n) if same else (abs(surplus + n - k), n))
        surplus += n - k
        if scores is None:
            scores = scores_from(pruner.importance, masks, pruner.settings.normalise)
        s = torch.as_tensor(scores[i]["channels"]).float().cpu()
        if n < k:  # drop the lowest-scored kept channels
            kept[torch.sort(s.masked_fill(~kept, math.inf), stable=True).indices[: k - n]] = False
        else:  # re-admit the highest-scored pruned ones
            kept[torch.sort(s.masked_fill(kept, -math.inf), descending=True, stable=True).indices[: n - k]] = True
        masks.set(i, channels=kept.float())
        removed += k - n
        moved += abs(k - n)
    if moved:
        before, after = decoder_param_count(pruner.model, masks)
        info = dict(pruner.last_info)
        target = info.get("target", pruner.target)
        achieved = 1 - after / before
        info.update(achieved=achieved, shortfall=max(0.0, target - achieved), decoder_params_before=before, decoder_params_after=after,
                    channels_aligned_to=align, channels_moved_for_alignment=moved)
        pruner.last_info = info
    return removed


class QATPhase:
    """Turns fake quantisation on at step `start_step` of the training loop (see the module docstring).

    `net` is the LoRA-wrapped model, `pruner` the run's pruner (structured, weight-level or fixed
    masks), `structured` whether the model must be shrunk first.
    """

    def __init__(self, net: nn.Module, settings: QuantSettings, pruner, start_step: int, structured: bool, lr: float | None = None):
        self.net, self.settings, self.pruner = net, settings, pruner
        self.start_step, self.structured, self.lr = int(start_step), structured, lr
        self.qset: QuantizerSet | None = None
        self.handles = None
        self.shrink_info: dict = {}
        self.adam_reset = False

    @property
    def started(self) -> bool:
        return self.qset is not None

    # ---- the switch ---------------------------------------------------------------------------
    def maybe_start(self, trainer) -> None:
        if not self.started and trainer.step >= self.start_step:
            self.start(trainer)

    def start(self, trainer) -> None:
        s = self.settings
        keep = None
        if self.structured:
            self._shrink(trainer)
        elif getattr(self.pruner.masks, "as_dict", None) is not None:  # weight-level: the quantisers take over the masked forward
            self.pruner.gates.remove()
            keep = self.pruner.masks.as_dict()
        self.qset = QuantizerSet(self.net, s.parsed, s.quantizer, weight_masks=keep, init=s.quant_init)
        self.handles = attach_quantizers(self.net, self.qset, weight_masks=keep)
        # a submodule of the trained model while QAT runs: train()/eval(), zero_grad() and the
        # gradient averaging of a multi-process launch reach the step sizes with the adapters
        self.net.add_module(SUBMODULE, self.qset)
        params = list(self.qset.parameters())
        base = trainer.lr / 10 if self.lr is None else self.lr
        trainer.rebuild_optimizer([{"params": params, "lr": base, "weight_decay": 0.0}] if params else [])

    def _shrink(self, trainer) -> None:
        from ..export import shrink_
        from ..masking.plan import decoder_param_count

        pruner = self.pruner
        if float(pruner.current) < pruner.target - 1e-9:  # reached at the end of the ramp; this only makes sure
            pruner.finalize()
        align_channels_(pruner, self.settings.align)
        if not pruner.last_info:  # the masks came from a checkpoint without the phase's record
            before, after = decoder_param_count(pruner.model, pruner.masks)
            achieved = 1 - after / before
            pruner.last_info = {"target": pruner.target, "achieved": achieved, "shortfall": max(0.0, pruner.target - achieved),
                                "decoder_params_before": before, "decoder_params_after": after}
        pruner.remove_gates()
        importance = trainer.prune_step.importance
        if importance is not None:  # its per-unit state has the old shapes; the masks are final anyway
            if hasattr(importance, "remove"):
                importance.remove()
            trainer.prune_step.importance = trainer.importance = None
        adalora = getattr(trainer, "adalora", None)  # its importance EMAs are kept per factor entry: slice them alike
        self.shrink_info = shrink_(self.net, pruner.masks, on_slice=adalora.slice_state if adalora is not None else None)
        trainer.params = {n: p for n, p in self.net.named_parameters() if n in trainer.params}
        trained = {id(p) for p in trainer.params.values()}
        for p in self.net.parameters():  # e.g. base weights that took gradients for importance only
            if p.requires_grad and id(p) not in trained:
                p.requires_grad_(False)
        self.adam_reset = True  # sliced LoRA factors are new tensors: their AdamW moments start over

    def info(self, steps: int) -> dict:
        """What ran, for the report."""
        spec = self.settings.parsed
        out = {"spec": str(spec), "quantizer": self.settings.quantizer, "start_step": self.start_step, "qat_steps": max(0, steps - self.start_step),
               "gguf_type": spec.gguf_type, "modules": len(self.qset.keys()) if self.qset is not None else 0,
               "shrunk_at_start": self.structured, "optimizer_state_reset": self.adam_reset}
        if self.structured:
            out["channels_aligned_to"] = self.settings.align
            out["channels_moved_for_alignment"] = self.pruner.last_info.get("channels_moved_for_alignment", 0)
        return out

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"started": self.started, "quantizers": self.qset.state_dict() if self.started else None,
                "pruner_info": dict(getattr(self.pruner, "last_info", {}) or {}) if self.started else None}

    def load_state_dict(self, trainer, state: dict | None) -> None:
        if not state or not state.get("started"):
            return
        if not self.started:
            if state.get("pruner_info") and hasattr(self.pruner, "last_info"):
                self.pruner.last_info = state["pruner_info"]  # the final selection, alignment included
            self.start(trainer)
        self.qset.load_state_dict(state["quantizers"])

    # ---- teacher and export -------------------------------------------------------------------
    @contextmanager
    def paused(self):
        """Full-precision projections inside the block (the dense distillation teacher)."""
        with ExitStack() as stack:
            if self.handles is not None:
                stack.enter_context(self.handles.paused())
            yield

    @torch.no_grad()
    def quantized_weights(self) -> dict[tuple[int, str], torch.Tensor]:
        """{(layer, path): Q((W0 + s·B·A) ⊙ M)} in float32, as the training forward computes it;
        a fake quantiser first observes the final weight (what its next forward would use)."""
        self.qset.eval()
        keep = self.pruner.masks.as_dict() if not self.structured and hasattr(self.pruner.masks, "as_dict") else {}
        layers = self.qset.arch.decoder_layers(self.net)
        out = {}
        for (i, path), q in self.qset.as_dict().items():
            w = merged_weight(layers[i].get_submodule(path), torch.float32)
            k = keep.get((i, path))
            if k is not None:
                w = w.masked_fill(~k.to(device=w.device, dtype=torch.bool), 0.0)
            if isinstance(q, FakeQuantizer) and q.observer_enabled:
                q.observe(w)
            out[(i, path)] = q(w).detach()
        return out

    def remove(self) -> None:
        """Give the projections their own forward back and detach the quantisers from the model
        (they stay in `qset`, trained, for the export)."""
        if self.handles is not None:
            self.handles.remove()
            self.handles = None
        self.net._modules.pop(SUBMODULE, None)
