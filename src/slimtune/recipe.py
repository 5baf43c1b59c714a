"""The prune job, top to bottom: load -> evaluate -> adapters -> prune (+ fine-tune) -> merge ->
shrink -> save -> evaluate -> report. The CLI and the benchmarks both call `run_prune`.
"""

from __future__ import annotations

import copy
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adapters import LoraSettings, attach_lora, merge_keep_masks, save_adapters
from .data import batch_at, load_tokens
from .errors import SlimtuneError
from .evaluate import evaluate_model
from .evaluate.machine import machine_info, utc_now
from .evaluate.prune_report import write_report
from .export import save_model, shrink_
from .io import check_writable_parent
from .models import get_arch, load_model
from .pruning.pruner import PruneSettings, make_pruner
from .runtime import check_seq_len, pick_device
from .training.loop import Trainer, TrainSettings

PROGRESSIVE = ("loraprune", "grad")  # importance observed during LoRA fine-tuning
ONE_SHOT = {  # CLI name -> (registry name, options)
    "taylor": ("taylor", {"variant": "element1"}),
    "taylor2": ("taylor", {"variant": "element2"}),
    "taylor_vector": ("taylor", {"variant": "vector"}),
    "magnitude": ("magnitude", {"p": 1}),
    "l2": ("magnitude", {"p": 2}),
    "random": ("random", {}),
    "block_influence": ("block_influence", {}),
}
PRESETS = {
    # name: (train overrides, job overrides); "quick" is the default, sized for a 2-core CPU
    "quick": ({}, {}),
    "standard": ({"steps": 200, "batch_size": 4, "grad_accum": 2, "checkpoint_every": 20}, {"seq_len": 512, "eval_windows": 64, "calib_batches": 16}),
    "paper": ({"steps": 600, "batch_size": 4, "grad_accum": 32, "lr": 3e-4, "checkpoint_every": 20}, {"seq_len": 256, "eval_windows": 256, "calib_batches": 32}),
}


@dataclass
class PruneJob:
    model: str = "default"
    data: str = "wiki"
    out: str = "pruned"
    overwrite: bool = False
    resume: bool = False
    criterion: str = "loraprune"
    seq_len: int = 256
    eval_windows: int = 16  # evenly spaced test windows of seq_len tokens
    latency_seq_len: int = 256
    latency_repeats: int = 3
    decode_tokens: int = 16
    calib_batches: int = 4  # one-shot criteria: batches of calibration data
    recover_steps: int | None = None  # one-shot: LoRA recovery steps after pruning (None: train.steps)
    evaluate: bool = True
    evaluate_dense: bool = True  # benchmarks measure the dense model once and skip it here
    dtype: str = "float32"
    device: str = "auto"
    prune: PruneSettings = field(default_factory=PruneSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    command: str = ""

    def __post_init__(self):
        if self.seq_len < 2:
            raise SlimtuneError(f"--seq-len {self.seq_len} is too small; use at least 2 (e.g. 256)")
        if self.criterion not in PROGRESSIVE and self.criterion not in ONE_SHOT:
            raise SlimtuneError(f"unknown criterion '{self.criterion}'; choose one of {', '.join([*PROGRESSIVE, *ONE_SHOT])}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise SlimtuneError(f"unknown --dtype '{self.dtype}'; choose float32, bfloat16 or float16")


def apply_preset(job: PruneJob, name: str) -> None:
    if name not in PRESETS:
        raise SlimtuneError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    train, top = PRESETS[name]
    for k, v in train.items():
        setattr(job.train, k, v)
    for k, v in top.items():
        setattr(job, k, v)


def _check_out(job: PruneJob) -> Path:
    out = check_writable_parent(job.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not job.overwrite:
        raise SlimtuneError(f"output directory {out} exists and is not empty; pass --overwrite or choose another --out")
    return out


def _evaluate(model, tokens, job: PruneJob, label: str, progress: bool) -> dict:
    spec = get_arch(model)
    if progress:
        print(f"[slimtune] evaluating the {label} model on {tokens.shape[0]} x {tokens.shape[1]} test tokens", file=sys.stderr)
    return evaluate_model(
        model, tokens, decoder_layers=spec.decoder_layers(model), seq_len_latency=job.latency_seq_len,
        latency_repeats=job.latency_repeats, decode_tokens=job.decode_tokens, progress=progress,
    )


def run_prune(job: PruneJob, progress: bool = True) -> dict:
    t0 = time.time()
    out = _check_out(job)
    work = out.parent / f".{out.name}.work"  # checkpoints live here until the job succeeds
    if job.resume and not (work / "checkpoint.pt").is_file():
        raise SlimtuneError(f"nothing to resume: no checkpoint in {work}; run without --resume")
    dtype = getattr(torch, job.dtype)
    model, tokenizer = load_model(job.model, dtype=dtype, device=pick_device(job.device))
    get_arch(model)  # unsupported architectures fail here, before any work
    check_seq_len(model, job.seq_len)
    train_tokens = load_tokens(job.data, tokenizer, "train", job.seq_len)
    test_tokens = load_tokens(job.data, tokenizer, "test", job.seq_len, max_sequences=job.eval_windows)
    before = _evaluate(model, test_tokens, job, "dense", progress) if job.evaluate and job.evaluate_dense else None

    torch.manual_seed(job.train.seed)  # LoRA init, dropout: a rerun (or --resume) with the same seed is identical
    progressive = job.criterion in PROGRESSIVE
    recover = job.train.steps if job.recover_steps is None else job.recover_steps
    use_lora = progressive or recover > 0
    net = attach_lora(model, job.lora) if use_lora else model
    if progressive:
        from .importance.loraprune import LoRAPruneImportance, enable_full_grad

        importance = LoRAPruneImportance(net, metric="grad" if job.criterion == "grad" else "lora", keep_elements=job.prune.weight_level)
        pruner = make_pruner(net, job.prune, importance, total_steps=job.train.steps)
    else:
        from .importance import make_importance

        name, options = ONE_SHOT[job.criterion]
        importance = make_importance(name, net, **options)
        if getattr(importance, "needs_data", True):
            for b in range(job.calib_batches):
                importance.update(net, batch_at(train_tokens, job.train.batch_size, job.train.seed + 1, b).to(next(net.parameters()).device))
        pruner = make_pruner(net, job.prune, importance, total_steps=1)
        pruner.finalize()
        importance.remove()
        importance = None

    history: list[dict] = []
    if use_lora:
        settings = copy.copy(job.train)
        settings.steps = job.train.steps if progressive else recover
        trainer = Trainer(net, train_tokens, settings, importance, pruner, checkpoint_dir=work)
        if job.criterion == "grad":  # after the Trainer took its parameters: W0 gets .grad, is never trained
            enable_full_grad(net)
        if job.resume:
            trainer.load_checkpoint()
        history = trainer.run(progress=progress)
    info = pruner.finalize()
    masks = pruner.masks
    pruner.remove_gates()

    staging = work / "adapters"
    weight_level = job.prune.weight_level
    if use_lora:
        save_adapters(net, staging)
        model = merge_keep_masks(net, None if weight_level else masks, weight_masks=masks.as_dict() if weight_level else None)
    elif weight_level:
        _zero_masked_weights(model, masks)
    # unstructured / N:M keep their shapes (zeros stored densely); structured units are sliced out
    shrink_info = {} if weight_level else shrink_(model, masks)
    model.eval()
    after = _evaluate(model, test_tokens, job, "pruned", progress) if job.evaluate else None
    report = {
        "command": job.command or "slimtune " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "job": _jsonable(job),
        "machine": machine_info(),
        "date": utc_now(),
        "sparsity": info,
        "per_layer": [] if weight_level else masks.per_layer(),
        "per_module": masks.per_module() if weight_level else [],
        "shrink": shrink_info,
        "before": before,
        "after": after,
        "history": history,
        "importance_skipped_updates": getattr(importance, "skipped", 0) if importance is not None else 0,
        "wall_seconds": None,
    }

    def extra(tmp: Path) -> None:
        if use_lora and staging.is_dir():
            import shutil

            shutil.copytree(staging, tmp / "adapters")
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in masks.state_dict().items()}, str(tmp / "pruning_masks.safetensors"))
        report["wall_seconds"] = time.time() - t0
        write_report(tmp, report)

    save_model(model, out, tokenizer=tokenizer, overwrite=True, extra=extra)
    report["reload_max_abs_diff"] = _reload_check(model, out, test_tokens)
    write_report(out, report)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return report


@torch.no_grad()
def _zero_masked_weights(model, masks) -> None:
    for (layer, path), keep in masks.as_dict().items():
        module = masks.spec.decoder_layers(model)[layer].get_submodule(path)
        module.weight.masked_fill_(~keep.to(module.weight.device), 0)


@torch.no_grad()
def _reload_check(model, out: Path, tokens: torch.Tensor) -> float:
    """Load the saved directory with plain `from_pretrained` and compare logits."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=next(model.parameters()).dtype).to(next(model.parameters()).device).eval()
    x = tokens[:1, :32].to(next(model.parameters()).device)
    return float((reloaded(x).logits - model(x).logits).abs().max())


def _jsonable(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _jsonable(v) for k, v in asdict(obj).items() if k != "history"}
    return obj
