"""One verb: `prune_(model, config, data)` prunes `model` in place and returns what happened.

    import slimtune
    result = slimtune.prune_(model, slimtune.LoRAPruneConfig(), data=train_tokens)
    result.model.save_pretrained("pruned")        # or slimtune.export.save_model(result.model, ...)

A registry maps config types to handlers (`@handler(ConfigType)`), in the style of torchao's
`quantize_`. Inside a user's own `transformers.Trainer`, `PruneSession` gives the same method in
three calls: create the session, train with `session.callback`, `session.finish()`.

Every check that needs the model but no work (architecture, criterion against granularity,
adapter coverage, N:M widths, the schedule) runs in `check_config` before anything is computed.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import attach_lora, merge_keep_masks
from .adapters.adalora import init_rank
from .adapters.lora import lora_targets
from .config import LayerwiseConfig, LoRAPruneConfig, MethodConfig, OneShotConfig
from .data import batch_at
from .errors import SlimtuneError
from .evaluate.memory import track_peak_memory
from .export import shrink_
from .importance.loraprune import enable_full_grad
from .importance.registry import get_criterion
from .masking.weights import zero_masked_weights
from .models.arch import get_arch
from .pruning.fixed import FixedMasks
from .pruning.layerwise import prune_layerwise
from .pruning.pruner import excluded_layers, make_pruner
from .pruning.schedules import Schedule
from .pruning.weight_selection import module_fraction_for, parse_nm
from .training.callback import PruneCallback
from .training.distributed import is_main, place
from .training.loop import Trainer, check_precision

HANDLERS: dict[type, Callable] = {}


def handler(config_type: type):
    def register(fn):
        HANDLERS[config_type] = fn
        return fn

    return register


@dataclass
class PruneResult:
    model: nn.Module  # the pruned HF model (merged, shrunk unless weight-level)
    masks: object  # StructuredMasks or WeightMasks
    sparsity: dict  # target, achieved, shortfall, decoder params before/after
    history: list[dict] = field(default_factory=list)
    shrink: dict = field(default_factory=dict)
    importance_skipped_updates: int = 0
    train_memory: dict = field(default_factory=dict)  # peak memory of the fine-tuning loop
    quantizers: object = None  # with --quant: the trained QuantizerSet, keyed by the final model's (layer, path)
    quant: dict = field(default_factory=dict)  # with --quant: spec, quantiser, when QAT started, ...

    @property
    def weight_level(self) -> bool:
        return not hasattr(self.masks, "per_layer")


def check_config(model: nn.Module, config: MethodConfig) -> None:
    """Everything that can be refused without doing any work, given the model."""
    spec = get_arch(model)
    n = len(spec.decoder_layers(model))
    s = config.prune
    prunable = sorted(set(range(n)) - excluded_layers(s, n))
    if config.uses_lora:
        check_precision(model, config.train.mixed_precision)
    if config.steps > 0 and config.mode == "progressive":
        Schedule(s.sparsity, config.steps, s.schedule, 0.0, s.warmup, s.cooldown)  # reachable?
    if config.uses_lora:
        get_criterion(config.criterion).check_targets(spec, n, set(lora_targets(model, config.lora)), s.units, prunable)
    if not s.weight_level:  # a target the granularity cannot reach: refused now, not when the ramp gets there
        from .pruning.selection import check_reachable

        check_reachable(model, s.gran, s.sparsity, s.ranking, excluded_layers(s, n), s.layer_share)
    if s.granularity.strip().lower() == "nm":
        from .pruning.weight_selection import parse_nm

        _, m = parse_nm(s.nm)
        for i in prunable:
            for p in spec.projections():
                width = spec.decoder_layers(model)[i].get_submodule(p).in_features
                if width % m:
                    raise SlimtuneError(f"--nm {s.nm}: layer {i} {p} has {width} inputs, not a multiple of {m}; pick an m that divides it or exclude that layer")
    if config.quant.enabled:
        _check_quant(model, config, spec)


def _check_quant(model: nn.Module, config: MethodConfig, spec) -> None:
    """--quant against the model: not already quantised, every projection a plain Linear whose inputs
    split into whole groups (and GGUF blocks with --export gguf), heads that remove whole groups."""
    from .models.arch import base_layer, unwrap

    q = config.quant
    qspec = q.parsed
    root = unwrap(model)
    if getattr(root.config, "quantization_config", None) is not None:
        raise SlimtuneError("the model is already quantised (its config has a quantization_config); load the full-precision model to train with --quant")
    for i, layer in enumerate(spec.decoder_layers(model)):
        for p in spec.projections():
            lin = base_layer(layer.get_submodule(p))
            if type(lin) is not nn.Linear:
                raise SlimtuneError(f"--quant needs plain nn.Linear projections; layer {i} {p} is a {type(lin).__name__}: load the full-precision model")
            qspec.groups(lin.in_features, f"layer {i} {p}")
            if q.gguf_blocks and lin.in_features % 32:
                raise SlimtuneError(f"--export gguf: layer {i} {p} has {lin.in_features} inputs, not a multiple of GGUF's block of 32; use --export hf")
    if config.quant_structured and "heads" in config.prune.units:
        hd = spec.head_dim(root.config)
        if hd % q.align:
            raise SlimtuneError(f"--quant {qspec} with head pruning: one head is {hd} input columns of o_proj, not a multiple of {q.align}, so removing heads "
                                "splits quantisation groups; prune --granularity channels or layers" + ("" if q.gguf_blocks else f", or quantise per channel (--quant w{qspec.bits})"))


def prune_(model: nn.Module, config: MethodConfig, data: torch.Tensor | None = None, *, work_dir: str | Path | None = None,
           resume: bool = False, progress: bool = True, adapter_dir: str | Path | None = None, base_name: str | None = None) -> PruneResult:
    """Prune `model` in place with the method `config` describes, on token windows `data` [n, L].

    work_dir: checkpoints (and PiSSA's initial adapter) for `resume`; adapter_dir: where to save the
    trained adapter (for the unpruned base, PEFT format) before it is merged; base_name: the base
    model's name recorded in that adapter's config.
    """
    fn = next((HANDLERS[c] for c in type(config).__mro__ if c in HANDLERS), None)
    if fn is None:
        raise SlimtuneError(f"no pruning method is registered for {type(config).__name__}; use one of {', '.join(c.__name__ for c in HANDLERS)}")
    check_config(model, config)
    place(model)  # in a multi-process launch: onto this process's device, before adapters and state attach
    if data is None and (config.uses_lora or get_criterion(config.criterion).needs_data):
        raise SlimtuneError(f"{type(config).__name__} with criterion '{config.criterion}' needs data: pass data=token windows [n, seq_len]")
    return fn(model, config, data, _Run(work_dir, resume, progress, adapter_dir, base_name))


@dataclass
class _Run:
    work_dir: str | Path | None
    resume: bool
    progress: bool
    adapter_dir: str | Path | None
    base_name: str | None
    train_memory: dict = field(default_factory=dict)
    qat: object = None  # the QATPhase of a --quant run

    @property
    def initial_dir(self) -> Path | None:
        return Path(self.work_dir) / "initial_adapter" if self.work_dir else None


def _reads_weight_grad(config: MethodConfig) -> bool:
    """The progressive criteria registered with metric="grad" (grad, movement_grad, seven_grad) read W0.grad."""
    return config.mode == "progressive" and get_criterion(config.criterion).options.get("metric") == "grad"


def _init_batches(model, config: MethodConfig, data):
    """LoRA-GA's gradient batches (None for the other variants): drawn like training batches, from
    their own seed, so that a resumed run re-initialises exactly as the interrupted one did."""
    if config.lora.variant != "lora_ga":
        return None
    if data is None:
        raise SlimtuneError("--lora-variant lora_ga initialises the adapters from gradients and needs data: pass data=token windows [n, seq_len]")
    device = next(model.parameters()).device
    return [batch_at(data, config.train.batch_size, config.train.seed + 2, b).to(device) for b in range(config.lora.ga_batches)]


def _attach(model, config: MethodConfig, run: _Run, data=None):
    torch.manual_seed(config.train.seed)  # LoRA init, dropout: a rerun (or --resume) with the same seed is identical
    net = attach_lora(model, config.lora, _init_batches(model, config, data), steps=config.steps)
    if run.initial_dir is not None and is_main():
        from .adapters import save_initial_adapters

        save_initial_adapters(net, run.initial_dir)
    return net


def _train(net, data, config: MethodConfig, importance, pruner, run: _Run) -> list[dict]:
    settings = copy.copy(config.train)
    settings.steps = config.steps
    if config.quant.enabled:
        from .quant.qat import QATPhase

        run.qat = QATPhase(net, config.quant, pruner, config.quant_start_step(), config.quant_structured, config.quant.quant_lr)
    trainer = Trainer(net, data, settings, importance, pruner, checkpoint_dir=run.work_dir,
                      distill=config.distill, averaging=config.averaging, quant=run.qat)
    if run.progress and trainer.world.main:
        t = config.train
        print(f"[slimtune] {settings.steps} steps, global batch {t.global_batch(trainer.world.size)} x {data.shape[1]} tokens, lr {trainer.lr:.3g} "
              f"(--lr {t.lr:g} at batch {t.lr_base_batch}, rule {t.lr_rule})"
              + (f", LoRA+ B at {t.lora_plus_ratio:g}x" if t.lora_plus_ratio != 1 else "") + f", {t.lr_schedule} decay"
              + (f", distillation T={config.distill.temperature} mix={config.distill.mix}" if config.distill.enabled else "")
              + (f", AdaLoRA rank {init_rank(config.lora)} -> {config.lora.r} on average" if trainer.adalora is not None else ""), file=sys.stderr)
    if _reads_weight_grad(config):  # after the Trainer took its parameters: W0 gets .grad, is never trained
        enable_full_grad(net)
    if run.resume and not trainer.load_checkpoint():
        raise SlimtuneError(f"nothing to resume: no checkpoint in {run.work_dir}; run without --resume")
    with track_peak_memory(next(net.parameters()).device) as memory:
        history = trainer.run(progress=run.progress)
    run.train_memory = memory
    if trainer.averager is not None and config.averaging.export != "last":
        trainer.averager.apply_to(config.averaging.export)  # these weights are merged and exported
    if trainer.adalora is not None:
        trainer.adalora.finalize()  # an average blends cut triplets back in: cut them again
        if run.progress and trainer.world.main:
            kept, total = trainer.adalora.kept()
            print(f"[slimtune] AdaLoRA kept {kept} of {total} rank-1 triplets", file=sys.stderr)
    return history


def _finish(model, net, pruner, history, run: _Run, importance=None) -> PruneResult:
    """Fix the masks, save and merge the adapters keeping every pruned weight zero, shrink."""
    info = pruner.finalize()
    masks = pruner.masks
    pruner.remove_gates()
    if importance is not None:  # the scores are spent; drop the criterion's hooks and state
        importance.remove()
    weight_level = not hasattr(masks, "per_layer")
    qat = run.qat if run.qat is not None and run.qat.started else None
    shrunk = qat is not None and qat.structured  # QAT shrank the (LoRA-wrapped) model when it started
    qweights = None
    if net is not None:
        if qat is not None:  # Q(merged weight) exactly as the last forward computed it, before the merge rounds anything
            qweights = qat.quantized_weights()
            qat.remove()
        if run.adapter_dir is not None and is_main() and not shrunk:  # shrunk adapters no longer fit the unpruned base
            from .adapters import save_adapters

            save_adapters(net, run.adapter_dir, initial_dir=run.initial_dir, base_name=run.base_name)
        model = merge_keep_masks(net, None if weight_level or shrunk else masks, weight_masks=masks.as_dict() if weight_level else None)
    elif weight_level:
        zero_masked_weights(model, masks)
    if qweights is not None:  # the HF weights are the de-quantised trained values
        with torch.no_grad():
            layers = get_arch(model).decoder_layers(model)
            for (i, path), w in qweights.items():
                dst = layers[i].get_submodule(path).weight
                dst.copy_(w.to(device=dst.device, dtype=dst.dtype))
    # unstructured / N:M keep their shapes (zeros stored densely); structured units are sliced out
    shrink_info = qat.shrink_info if shrunk else ({} if weight_level else shrink_(model, masks))
    model.eval()
    skipped = getattr(importance, "skipped", 0) if importance is not None else 0
    result = PruneResult(model, masks, info, history, shrink_info, skipped, run.train_memory)
    if qat is not None:
        result.quantizers = qat.qset
        result.quant = qat.info(len(history))
    return result


@handler(LoRAPruneConfig)
def _progressive(model, config: LoRAPruneConfig, data, run: _Run) -> PruneResult:
    net = _attach(model, config, run, data)
    importance = get_criterion(config.criterion).build(net, keep_elements=config.prune.weight_level, **config.criterion_options())
    pruner = make_pruner(net, config.prune, importance, total_steps=config.steps)
    if hasattr(importance, "bind"):  # a criterion with trained state (l0 gates) follows the pruner's units and schedule
        importance.bind(pruner)
    history = _train(net, data, config, importance, pruner, run)
    return _finish(model, net, pruner, history, run, importance)


@handler(OneShotConfig)
def _one_shot(model, config: OneShotConfig, data, run: _Run) -> PruneResult:
    # adapters first: gates hook the (wrapped) projections, so they gate the LoRA branch too
    net = _attach(model, config, run, data) if config.uses_lora else model
    entry = get_criterion(config.criterion)
    importance = entry.build(net)
    if entry.needs_data:
        device = next(net.parameters()).device
        for b in range(config.calib_batches):
            importance.update(net, batch_at(data, config.train.batch_size, config.train.seed + 1, b).to(device))
    pruner = make_pruner(net, config.prune, importance, total_steps=1)
    pruner.finalize()
    if config.quant_structured:  # while the criterion's scores are still there: QAT shrinks to whole groups
        from .quant.qat import align_channels_

        align_channels_(pruner, config.quant.align)
    importance.remove()
    history = _train(net, data, config, None, pruner, run) if config.uses_lora else []
    return _finish(model, net if config.uses_lora else None, pruner, history, run)


@handler(LayerwiseConfig)
def _layerwise(model, config: LayerwiseConfig, data, run: _Run) -> PruneResult:
    spec = get_arch(model)
    s = config.prune
    excluded = excluded_layers(s, len(spec.decoder_layers(model)))
    nm = parse_nm(s.nm) if s.granularity.strip().lower() == "nm" else None
    # --sparsity is a fraction of all decoder parameters; the solver prunes a fraction of each projection
    per_module = 0.0 if nm else module_fraction_for(model, spec, excluded, s.sparsity)
    bs = config.train.batch_size
    calib = torch.cat([batch_at(data, bs, config.train.seed + 1, b) for b in range(config.calib_batches)])
    damping: dict[str, float] = {}
    masks = prune_layerwise(model, calib, config.criterion, per_module, nm=nm, excluded=excluded, batch_size=bs,
                            blocksize=config.blocksize, percdamp=config.percdamp, progress=run.progress, damping=damping)
    target = masks.sparsity_of_decoder(model) if nm else s.sparsity
    net = _attach(model, config, run, data) if config.uses_lora else model
    pruner = FixedMasks(net, masks, s.nm if nm else "unstructured", target)
    if damping:  # the report says where SparseGPT's Hessian needed more than --percdamp
        pruner.info["sparsegpt_damping_raised"] = damping
    history = _train(net, data, config, None, pruner, run) if config.uses_lora else []
    return _finish(model, net if config.uses_lora else None, pruner, history, run)


def _refuse_in_trainer(config: LoRAPruneConfig) -> None:
    """Settings that slimtune's own loop applies and a Trainer callback cannot: refused, never ignored.
    (Steps, learning rate, batch size, clipping and precision are the Trainer's own arguments.)"""
    after = "; run it through slimtune.prune_ or the CLI"
    if _reads_weight_grad(config):
        lora_twin = {"grad": "loraprune"}.get(config.criterion, config.criterion.removesuffix("_grad"))
        raise SlimtuneError(f"criterion '{config.criterion}' reads the full weight gradients, which a transformers Trainer would "
                            f"clip together with the adapters' (and train, if its optimiser saw them){after}, or use the LoRA-gradient "
                            f"criterion '{lora_twin}'")
    unsupported = {
        "--distill": config.distill.enabled,
        "--ema / --swa": config.averaging.enabled or config.averaging.export != "last",
        "--lora-pro": config.train.lora_pro,
        "--lora-plus-ratio": config.train.lora_plus_ratio != 1.0,
    }
    named = [flag for flag, on in unsupported.items() if on]
    if named:
        hint = " (for LoRA+, give your Trainer an optimiser with the B matrices in a faster group)" if unsupported["--lora-plus-ratio"] else ""
        raise SlimtuneError(f"PruneSession cannot apply {', '.join(named)} inside a transformers Trainer{after}, or drop "
                            f"{'it' if len(named) == 1 else 'them'}{hint}")


class PruneSession:
    """LoRAPrune inside your own `transformers.Trainer`, in three calls:

        session = PruneSession(model, LoRAPruneConfig(...), total_steps=max_steps)
        Trainer(model=session.model, args=args, train_dataset=ds, callbacks=[session.callback]).train()
        result = session.finish(adapter_dir="adapters")   # merged, shrunk model in result.model
    """

    def __init__(self, model: nn.Module, config: LoRAPruneConfig, total_steps: int, data: torch.Tensor | None = None):
        """data: token windows [n, seq_len] for --lora-variant lora_ga's initial gradient (others ignore it)."""
        if not isinstance(config, LoRAPruneConfig):
            raise SlimtuneError(f"PruneSession runs progressive methods (LoRAPruneConfig); for {type(config).__name__} call prune_")
        if config.quant.enabled:
            raise SlimtuneError("PruneSession does not run quantisation-aware training yet; call slimtune.prune_ with --quant settings, or drop them")
        if config.lora.variant == "adalora":
            raise SlimtuneError("AdaLoRA adds an orthogonality term to the loss and reallocates ranks after every step, which a transformers "
                                "Trainer callback cannot do; run it through slimtune.prune_ or the CLI, or use another --lora-variant")
        _refuse_in_trainer(config)
        check_config(model, config)
        self._base, self.config = model, config
        # PiSSA converts its adapter against the initial one at save time: keep that in a temp dir
        self._run = _Run(tempfile.mkdtemp(prefix="slimtune-session-"), False, False, None, None)
        self.model = _attach(model, config, self._run, data)
        self.importance = get_criterion(config.criterion).build(self.model, keep_elements=config.prune.weight_level, **config.criterion_options())
        self.pruner = make_pruner(self.model, config.prune, self.importance, total_steps=total_steps)
        if hasattr(self.importance, "loss_term"):
            raise SlimtuneError(f"criterion '{config.criterion}' adds a term to the loss, which a transformers Trainer does not know; run it through slimtune.prune_ or the CLI")
        self.callback = PruneCallback(self.pruner, self.importance)

    def finish(self, adapter_dir: str | Path | None = None, base_name: str | None = None) -> PruneResult:
        self._run.adapter_dir, self._run.base_name = adapter_dir, base_name
        return _finish(self._base, self.model, self.pruner, [], self._run, self.importance)
