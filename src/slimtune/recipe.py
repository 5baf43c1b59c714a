"""The jobs behind the CLI, top to bottom.

    prune: check options -> load -> check method -> evaluate dense -> prune_ (adapters, prune,
           fine-tune, merge, shrink) -> save (with a reload check) -> evaluate -> report
    eval:  load -> evaluate

The job dataclasses are the single source of CLI options and defaults (cli_gen.py), and presets
override the dataclass defaults, below anything typed on the command line.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .api import check_config, prune_
from .cli_gen import cli_help
from .config import LayerwiseConfig, LoRAPruneConfig, MethodConfig, OneShotConfig, Sections, config_for
from .data import held_out, load_tokens
from .errors import SlimtuneError
from .evaluate import evaluate_model
from .evaluate.machine import machine_info, utc_now
from .evaluate.prune_report import write_report
from .export import save_model
from .importance import CRITERIA
from .importance.base import projection_weights
from .io import check_output_dir, check_writable_parent, fingerprint
from .models import get_arch, load_model
from .runtime import check_precision_on, check_seq_len, pick_device
from .training import distributed
from .training.loop import LOG
from .training.tensorboard import EVENTS_DIR

DTYPES = ("float32", "bfloat16", "float16")
EXPORTS = ("hf", "gguf")
GGUF_TYPES = ("f16", "bf16", "f32", "q8_0", "q4_0", "q4_1")  # export/gguf.py GGUF_DTYPES
GGUF_FILE = "model.gguf"
RELOAD_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}  # max |logit diff| of the saved model

PRESETS = {
    # name: {"field" or "section.field": value}; "quick" is the dataclass defaults, sized for a 2-core CPU
    "quick": {},
    "standard": {"train.steps": 200, "train.lr_schedule": "cosine", "train.batch_size": 4, "train.grad_accum": 2, "train.checkpoint_every": 20,
                 "train.lr_base_batch": 8, "seq_len": 512, "eval_windows": 64, "calib_batches": 16},
    "paper": {"train.steps": 600, "train.lr_schedule": "cosine", "train.batch_size": 4, "train.grad_accum": 32, "train.lr": 3e-4, "train.lr_base_batch": 128,
              "train.checkpoint_every": 20, "seq_len": 256, "eval_windows": 256, "calib_batches": 32},
}


@dataclass
class EvalJob:
    model: str = field(default="default", metadata=cli_help("'default' (bundled SmolLM2-135M), a local HF directory, or a hub id"))
    data: str = field(default="wiki", metadata=cli_help("'wiki' (bundled Wikipedia sample), a .txt/.jsonl file, or a datasets name (wikitext2, c4, ptb)"))
    seq_len: int = field(default=256, metadata=cli_help("tokens per sequence"))
    eval_windows: int = field(default=16, metadata=cli_help("evenly spaced test windows of seq_len tokens for perplexity"))
    latency_seq_len: int | None = field(default=None, metadata=cli_help("prompt length for prefill latency (default: seq_len)"))
    latency_repeats: int = field(default=3, metadata=cli_help("timed prefill repeats; the median is reported"))
    decode_tokens: int = field(default=16, metadata=cli_help("tokens generated to time decoding"))
    dtype: str = field(default="float32", metadata=cli_help("weights dtype", choices=DTYPES))
    device: str = field(default="auto", metadata=cli_help("auto, cpu, cuda, cuda:1, ..."))
    json: str | None = field(default=None, metadata=cli_help("also write the results as JSON to this path"))
    quiet: bool = field(default=False, metadata=cli_help("no progress bars"))
    split: str = field(default="test", metadata=cli_help("which split to evaluate", choices=("train", "validation", "test")))

    def __post_init__(self):
        if self.seq_len < 2:
            raise SlimtuneError(f"--seq-len {self.seq_len} is too small; use at least 2 (e.g. 256)")
        for name in ("eval_windows", "latency_repeats"):
            if getattr(self, name) < 1:
                raise SlimtuneError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.decode_tokens < 0:
            raise SlimtuneError(f"--decode-tokens {self.decode_tokens} must not be negative")
        if self.dtype not in DTYPES:
            raise SlimtuneError(f"unknown --dtype '{self.dtype}'; choose {', '.join(DTYPES)}")
        if self.latency_seq_len is None:
            self.latency_seq_len = self.seq_len
        if self.json:
            check_writable_parent(self.json)


@dataclass
class PruneJob(Sections, EvalJob):  # the settings sections come from config.Sections
    out: str = field(default="pruned", metadata=cli_help("output directory: a model from_pretrained loads, plus the report"))
    overwrite: bool = field(default=False, metadata=cli_help("replace an output directory that slimtune wrote before"))
    resume: bool = field(default=False, metadata=cli_help("continue an interrupted run from its last checkpoint"))
    preset: str = field(default="auto", metadata=cli_help(f"budget: auto (quick on a CPU; standard with bf16 on a GPU), {', '.join(PRESETS)}"))
    criterion: str = field(default="loraprune", metadata=cli_help(f"importance criterion: {', '.join(CRITERIA)}"))
    calib_batches: int | None = field(default=None, metadata=cli_help("one-shot criteria: calibration batches of --batch-size sequences (default 16, i.e. 8K tokens at the quick preset)"))
    percdamp: float = field(default=0.01, metadata=cli_help("sparsegpt: Hessian dampening as a fraction of its mean diagonal"))
    l0_init: float = field(default=2.0, metadata=cli_help("l0: where every gate's log α starts (Sheared-LLaMA's 5 suits thousands of steps; "
                                                         "at 5 most draws clamp to 1 and the gates barely train in the default 48)"))
    blocksize: int = field(default=128, metadata=cli_help("sparsegpt: columns per block of lazy weight updates"))
    recover_steps: int | None = field(default=None, metadata=cli_help("one-shot criteria: LoRA recovery steps after pruning (default: --steps; 0 = none)"))
    evaluate: bool = field(default=True, metadata=cli_help("skip the before/after evaluation", flag="--no-eval"))
    export: str = field(default="hf", metadata=cli_help(f"hf: a Hugging Face directory; gguf: that directory plus {GGUF_FILE} for llama.cpp (Llama/Mistral)", choices=EXPORTS))
    save_sparse: str | None = field(default=None, metadata=cli_help(
        "unstructured / N:M: also write sparse/ in compressed-tensors' layout (auto, bitmask, sparse-24), smaller on disk; "
        "it loads with slimtune.export.sparse.load_sparse", const="auto", choices=("auto", "bitmask", "sparse-24")))
    gguf_type: str | None = field(default=None, metadata=cli_help("type of the GGUF projections (default: the type QAT trained, e.g. q4_0 for --quant w4g32; else f16)", choices=GGUF_TYPES))
    llamacpp_check: bool = field(default=False, metadata=cli_help(f"with --export gguf: run {GGUF_FILE} in llama.cpp (pip install xllamacpp) on the test windows and report its perplexity next to slimtune's"))
    evaluate_dense: bool = field(default=True, metadata={"cli": False})  # benchmarks measure the dense model once
    split: str = field(default="test", metadata={"cli": False})
    command: str = field(default="", metadata={"cli": False})

    def __post_init__(self):
        super().__post_init__()
        self._check_export()
        self._check_sparse()
        self.method  # noqa: B018 (the method config validates criterion x granularity x adapters before any loading)

    def _check_sparse(self) -> None:
        if self.save_sparse is None:
            return
        if not self.prune.weight_level:
            raise SlimtuneError("--save-sparse is for unstructured or N:M pruning; structured pruning already removes the units, so the saved model is smaller as it is")
        if self.save_sparse == "sparse-24":
            from .pruning.weight_selection import parse_nm

            n, m = parse_nm(self.prune.nm) if self.prune.granularity.strip().lower() == "nm" else (0, 0)
            if m != 4 or n > 2:
                raise SlimtuneError("--save-sparse sparse-24 holds only 2:4 patterns; pass --granularity nm --nm 2:4, or --save-sparse bitmask")

    def _check_export(self) -> None:
        """--export / --gguf-type against --quant, before any loading; with the trained codes going to
        GGUF, every quantised width must split into its blocks of 32 (checked on the model later)."""
        if self.export not in EXPORTS:
            raise SlimtuneError(f"unknown --export '{self.export}'; choose {', '.join(EXPORTS)}")
        if self.llamacpp_check:
            if self.export != "gguf":
                raise SlimtuneError("--llamacpp-check runs the GGUF file in llama.cpp; add --export gguf")
            from .evaluate.llamacpp import require_llamacpp

            require_llamacpp()  # missing llama.cpp: said now, not after training
        if self.gguf_type is not None:
            self.gguf_type = str(self.gguf_type).lower()
            if self.gguf_type not in GGUF_TYPES:
                raise SlimtuneError(f"unknown --gguf-type '{self.gguf_type}'; choose {', '.join(GGUF_TYPES)}")
            if self.export != "gguf":
                raise SlimtuneError("--gguf-type sets the type of the GGUF file; add --export gguf")
        self.quant.gguf_blocks = False
        if self.export != "gguf" or not self.quant.enabled:
            return
        trained = self.quant.parsed.gguf_type
        if self.gguf_type is None and trained is None:
            raise SlimtuneError(f"--quant {self.quant.spec} has no GGUF block type; use w8g32 (Q8_0), w4g32 (Q4_0) or w4g32a (Q4_1), "
                                "or pass --gguf-type f16 to write the de-quantised weights as floats")
        if self.gguf_type is not None and self.gguf_type not in ("f16", "bf16", "f32") and self.gguf_type.upper() != trained:
            raise SlimtuneError(f"--gguf-type {self.gguf_type} is not what --quant {self.quant.spec} trains ({trained or 'no GGUF block type'}); "
                                "leave --gguf-type out to write the trained codes, or pick f16, bf16 or f32")
        self.quant.gguf_blocks = self.gguf_type is None or self.gguf_type.upper() == trained

    @property
    def gguf_dtype(self) -> str:
        """The GGUF type of the projections: --gguf-type, else what QAT trained, else f16."""
        if self.gguf_type is not None:
            return self.gguf_type
        trained = self.quant.parsed.gguf_type if self.quant.enabled else None
        return trained.lower() if trained else "f16"

    @property
    def method(self) -> MethodConfig:
        cls = config_for(self.criterion)
        extra = {}
        if issubclass(cls, OneShotConfig):  # None: the config's own default
            extra = {k: v for k, v in (("calib_batches", self.calib_batches), ("recover_steps", self.recover_steps)) if v is not None}
            extra["recover_steps"] = self.recover_steps
        if cls is LayerwiseConfig:
            extra.update(percdamp=self.percdamp, blocksize=self.blocksize)
        if cls is LoRAPruneConfig:
            extra["l0_init"] = self.l0_init
        return cls(**self.sections(), criterion=self.criterion, **extra)


def auto_preset(device: str) -> tuple[str, dict]:
    """The budget for the device found: quick on a CPU; standard on a GPU, with bf16 autocast where supported."""
    dev = pick_device(device)
    if dev.type != "cuda":
        return "quick", {}
    return "standard", ({"train.mixed_precision": "bf16"} if torch.cuda.is_bf16_supported() else {})


def apply_preset(values: dict, name: str) -> dict:
    """dataclass defaults < preset < what the user typed. Records the preset actually used."""
    extra = {}
    if name == "auto":
        name, extra = auto_preset(values.get("device", "auto"))
        if not values.get("quiet") and distributed.is_main():
            print(f"[slimtune] --preset auto: {name} for this device{' with bf16 autocast' if extra else ''}", file=sys.stderr)
    if name not in PRESETS:
        raise SlimtuneError(f"unknown preset '{name}'; choose auto or one of {', '.join(PRESETS)}")
    return {**PRESETS[name], **extra, **values, "preset": name}


def _evaluate(model, tokens, job: EvalJob, label: str, progress: bool) -> dict:
    spec = get_arch(model)
    if progress:
        print(f"[slimtune] evaluating the {label} model on {tokens.shape[0]} x {tokens.shape[1]} test tokens", file=sys.stderr)
    return evaluate_model(
        model, tokens, decoder_layers=spec.decoder_layers(model), seq_len_latency=job.latency_seq_len,
        latency_repeats=job.latency_repeats, decode_tokens=job.decode_tokens, progress=progress,
    )


def _command() -> str:
    return "slimtune " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def run_eval(job: EvalJob) -> dict:
    device = pick_device(job.device)
    check_precision_on(device, job.dtype)
    model, tok = load_model(job.model, dtype=getattr(torch, job.dtype), device=device)
    check_seq_len(model, job.seq_len, job.latency_seq_len, job.decode_tokens)
    tokens = load_tokens(job.data, tok, job.split, job.seq_len, max_sequences=job.eval_windows)
    result = _evaluate(model, tokens, job, job.model, progress=not job.quiet)
    result.update(model=job.model, data=job.data, split=job.split, held_out=held_out(job.data), command=_command(), machine=machine_info(), date=utc_now())
    return result


def run_prune(job: PruneJob, progress: bool = True) -> dict:
    t0 = time.time()
    world = distributed.setup(job.device)  # accelerate launch / torchrun: every process runs this job; rank 0 writes
    progress = progress and world.main
    # never a regular file, the input model or data, or a directory slimtune did not write
    out = check_output_dir(job.out, job.overwrite, [job.model, job.data])
    work = out.parent / f".{out.name}.work"  # checkpoints live here until the job succeeds
    if job.resume and not (work / "checkpoint.pt").is_file():
        raise SlimtuneError(f"nothing to resume: no checkpoint in {work}; run without --resume")
    config = job.method
    _check_resume(job, work)
    device = world.device or pick_device(job.device)
    check_precision_on(device, job.dtype, config.train.mixed_precision)  # before the model is loaded
    model, tokenizer = load_model(job.model, dtype=getattr(torch, job.dtype), device=device)
    check_config(model, config)  # criterion x granularity x adapters x model shapes: before any work
    if job.export == "gguf":
        from .export.gguf import check_gguf

        check_gguf(model, tokenizer)  # architecture, rope, tokenizer: refused now, not after training
    preset_set = job.preset if "seq_len" in PRESETS.get(job.preset, {}) and job.seq_len == PRESETS[job.preset]["seq_len"] else None
    check_seq_len(model, job.seq_len, job.latency_seq_len, job.decode_tokens if job.evaluate else 0, preset=preset_set)
    train_tokens = load_tokens(job.data, tokenizer, "train", job.seq_len)
    test_tokens = load_tokens(job.data, tokenizer, "test", job.seq_len, max_sequences=job.eval_windows)
    before = _evaluate(model, test_tokens, job, "dense", progress) if job.evaluate and job.evaluate_dense and world.main else None
    base_name = getattr(model.config, "name_or_path", None) or job.model

    _start_work(job, work)
    result = prune_(model, config, train_tokens, work_dir=work, resume=job.resume, progress=progress,
                    adapter_dir=work / "adapters" if config.uses_lora else None, base_name=base_name)
    model, masks = result.model, result.masks
    sp = result.sparsity
    if result.weight_level and config.quant.enabled:  # a kept weight may round to 0 on the grid: say so, don't hide it
        # every decoder projection is quantised, those of excluded layers too
        zeros = sum(int((w == 0).sum()) for _, _, w in projection_weights(model, get_arch(model)))
        sp["zeros_in_weights"], sp["rounded_to_zero"] = zeros, zeros - masks.pruned()
    if sp.get("shortfall", 0.0) > 5e-4:
        print(f"[slimtune] warning: reached sparsity {sp['achieved']:.4f}, {sp['shortfall']:.4f} short of the target {sp['target']}: "
              + ("QAT rounds every kept MLP width to a multiple of its quantisation group" if config.quant_structured
                 else "the granularity's units are too coarse for an exact hit"), file=sys.stderr)
    raised = sp.get("sparsegpt_damping_raised")
    if raised:
        worst = max(raised, key=raised.get)
        print(f"[slimtune] warning: SparseGPT's Hessian of {len(raised)} projection(s) factored only with more dampening than "
              f"--percdamp {config.percdamp:g} (up to {raised[worst]:g}, {worst}; all in report.json): their weight updates are "
              "more conservative; calibrate on more tokens (--calib-batches) to avoid it", file=sys.stderr)
    over = sp.get("achieved", 0.0) - sp.get("target", 0.0)
    if over > 0.01:  # a fraction of one unit is expected; more means the units are coarse for this model
        units = config.prune.units
        why = []
        if "layers" in units:
            n = len(masks)  # the masks cover the decoder as it was
            why.append(f"a whole layer is about 1/{n} of the decoder, taken when at least half of it fits, on top of the heads "
                       "and channels pruned earlier in the ramp (lower --layer-share, or drop layers from --granularity)")
        if "heads" in units:
            why.append("heads are coarse (under local ranking every layer drops the same number of heads; use --head-mode "
                       "q_heads, --ranking global, or --granularity channels)")
        cause = "; ".join(why) or "the granularity's units are coarse for this model"
        print(f"[slimtune] warning: removed {sp['achieved']:.4f} of the decoder, {over:.4f} more than the target {sp['target']}: {cause}",
              file=sys.stderr)
    after = _evaluate(model, test_tokens, job, "pruned", progress) if job.evaluate and world.main else None
    report = {
        "command": job.command or _command(),
        "job": _jsonable(job),
        "machine": machine_info(),
        "date": utc_now(),
        "sparsity": sp,
        "per_layer": [] if result.weight_level else masks.per_layer(),
        "per_module": masks.per_module() if result.weight_level else [],
        "shrink": result.shrink,
        "before": before,
        "after": after,
        "held_out": held_out(job.data),  # False: the test text is the training text (too few documents)
        "history": result.history,
        "train_memory": result.train_memory,
        "importance_skipped_updates": result.importance_skipped_updates,
        "quant": result.quant or None,
        "wall_seconds": None,
    }
    tolerance = RELOAD_TOLERANCE[job.dtype]

    def extra(tmp: Path) -> None:
        import shutil

        if (work / "adapters").is_dir():
            shutil.copytree(work / "adapters", tmp / "adapters")
        if (work / LOG).is_file():
            shutil.copyfile(work / LOG, tmp / LOG)
        if (work / EVENTS_DIR).is_dir():
            shutil.copytree(work / EVENTS_DIR, tmp / EVENTS_DIR)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in masks.state_dict().items()}, str(tmp / "pruning_masks.safetensors"))
        # the saved directory must give the in-memory model's logits: check before it replaces anything
        report["reload_max_abs_diff"] = diff = _reload_check(model, tmp, test_tokens)
        if not diff <= tolerance:
            raise SlimtuneError(f"the saved model disagrees with the pruned model (max |logit diff| {diff:.3g} > {tolerance}); nothing was written to {out}; please report this")
        if job.save_sparse:
            report["sparse"] = _write_sparse(model, tokenizer, tmp / SPARSE_DIR, job.save_sparse, masks)
        if job.export == "gguf":
            report["gguf"] = _write_gguf(model, tokenizer, tmp / GGUF_FILE, job, result.quantizers)
            if job.llamacpp_check:
                report["gguf"]["llamacpp"] = _llamacpp_check(model, tmp / GGUF_FILE, test_tokens, after, progress)
        report["wall_seconds"] = time.time() - t0
        write_report(tmp, report)
        if report["quant"] or report.get("gguf") or report.get("sparse"):
            from .io import atomic_write_text

            md = tmp / "report.md"
            atomic_write_text(md, md.read_text().rstrip("\n") + "\n\n" + _export_section(report, job) + "\n")

    if world.main:
        save_model(model, out, tokenizer=tokenizer, overwrite=True, extra=extra)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    world.barrier()
    return report


def _write_gguf(model, tokenizer, path: Path, job: PruneJob, quantizers) -> dict:
    """model.gguf next to the HF files: the trained codes and scales when QAT ran (and the type is
    the trained one), else the merged weights at --gguf-type. Returns a short summary."""
    from collections import Counter

    from .export.gguf import BLOCK_TYPES, export_gguf

    dtype = job.gguf_dtype
    info = export_gguf(model, tokenizer, path, dtype=dtype, quantizers=quantizers if quantizers is not None and dtype in BLOCK_TYPES else None)
    return {"file": path.name, "type": dtype, "architecture": info["architecture"], "bytes": info["bytes"],
            "bits_per_weight": info["bits_per_weight"], "tensor_types": dict(Counter(info["tensors"].values())),
            "from_trained_quantizers": quantizers is not None and dtype in BLOCK_TYPES, "fallback_f16": info["fallback_f16"]}


def _llamacpp_check(model, path: Path, tokens, after: dict | None, progress: bool) -> dict:
    """Perplexity of the GGUF file in llama.cpp against slimtune's on the same test windows."""
    from .evaluate import perplexity
    from .evaluate.llamacpp import llamacpp_perplexity

    ours = after["perplexity"] if after else perplexity(model, tokens, progress=progress)["perplexity"]
    theirs = llamacpp_perplexity(path, tokens, progress=progress)["perplexity"]
    gap = theirs / ours - 1
    if abs(gap) > 0.01:
        print(f"[slimtune] warning: llama.cpp's perplexity of {path.name} is {theirs:.3f}, slimtune's {ours:.3f} ({gap:+.1%}); "
              "more than 1% apart", file=sys.stderr)
    return {"perplexity": theirs, "slimtune_perplexity": ours, "relative_gap": gap, "windows": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])}


def _export_section(report: dict, job: PruneJob) -> str:
    """report.md: what QAT trained and what the saved files hold."""
    lines = []
    q, g, sp = report.get("quant"), report.get("gguf"), report.get("sparse")
    if sp:
        lines += ["## Sparse copy", "", f"- `{SPARSE_DIR}/`: compressed-tensors {sp['format']} layout, weight files {sp['weight_bytes'] / 2**20:.1f} MiB "
                  f"against {sp['dense_weight_bytes'] / 2**20:.1f} MiB dense ({sp['ratio']:.2f}x); reloads to exactly the same weights with "
                  f"`slimtune.export.sparse.load_sparse(\"{SPARSE_DIR}\")` (current transformers and vLLM releases do not read sparse "
                  "compressed-tensors checkpoints; the main directory stays the dense model `from_pretrained` loads)", ""]
    if q:
        lines += ["## Quantisation-aware training", "",
                  f"- {q['spec']} with {q['quantizer']} quantisers on {q['modules']} projections, fake-quantised from step {q['start_step']} "
                  f"({q['qat_steps']} QAT step{'' if q['qat_steps'] == 1 else 's'}): the forward used Q((W0 + s·B·A) ⊙ mask)"]
        if q.get("shrunk_at_start"):
            lines.append(f"- structured pruning: the model was shrunk when QAT started, every MLP width a multiple of {q['channels_aligned_to']} "
                         f"({q['channels_moved_for_alignment']} channels moved to get there); AdamW moments restarted; the LoRA adapter "
                         "for the unpruned base is not saved (its factors were sliced)")
        exact = "exactly" if job.dtype == "float32" else f"rounded to {job.dtype}"
        lines.append(f"- the Hugging Face weights here are the de-quantised values of the trained quantisers (scale·code [+ offset]), "
                     f"stored {exact}, so transformers users get what QAT trained")
    if g:
        how = "the trained codes and fp16 scales, bit for bit" if g["from_trained_quantizers"] else "the merged weights"
        types = ", ".join(f"{n} {t}" for t, n in sorted(g["tensor_types"].items()))
        lines += ["", "## GGUF", "", f"- `{g['file']}` ({g['architecture']}, {g['bytes'] / 2**20:.1f} MiB, {g['bits_per_weight']:.2f} bits per parameter): "
                  f"projections {g['type'].upper()} holding {how}; tensors: {types}"]
        if g.get("llamacpp"):
            c = g["llamacpp"]
            lines.append(f"- checked in llama.cpp: perplexity {c['perplexity']:.3f} against slimtune's {c['slimtune_perplexity']:.3f} "
                         f"({c['relative_gap']:+.2%}) on the same {c['windows']} x {c['seq_len']} test windows")
        if g["fallback_f16"]:
            lines.append(f"- written as F16 (rows not a multiple of 32): {', '.join(g['fallback_f16'])}")
        run = f"- run it: `llama-cli -m {g['file']} -p \"...\"` (llama.cpp)"
        if g["architecture"] == "llama":  # transformers' GGUF loader does not read `deci` (per-layer sizes)
            run += f", or `AutoModelForCausalLM.from_pretrained(dir, gguf_file=\"{g['file']}\")` (de-quantises to float)"
        lines.append(run)
    return "\n".join(lines)


RESUME_FILE = "job.json"
# options that change what a run computes; the others (--quiet, --out, evaluation sizes ...) may differ on --resume
RESULT_FIELDS = ("model", "data", "seq_len", "dtype", "criterion", "calib_batches", "recover_steps", "percdamp", "blocksize", "l0_init", "prune", "train", "lora",
                 "distill", "averaging", "quant")
FLAGS = {"quant.gguf_blocks": "--export"}  # settings set by another option than their own
# compiled kernels compute the same step; checkpointed activations are recomputed with the same RNG state
NEUTRAL = {"train.checkpoint_every", "train.compile", "train.gradient_checkpointing"}
# options added later, with the value that computes what runs from before them computed
ADDED = {"train.lora_plus_ratio": 1.0, "lora.ga_batches": 4, "lora.ga_gamma": 16.0, "train.lora_pro": False,
         "percdamp": 0.01, "blocksize": 128, "l0_init": 5.0, "lora.adalora_init_r": None, "lora.adalora_warmup": 0.1, "lora.adalora_final": 0.2, "lora.adalora_every": 1, "lora.adalora_orth": 0.1}


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): obj}


def _flag(job: PruneJob, key: str) -> str:
    """The CLI flag of a flattened setting, as the generated parser names it ("lora.r" -> --lora-r,
    "lora.adalora_init_r" -> --adalora-init-r)."""
    import dataclasses

    from .cli import SECTIONS
    from .cli_gen import flag_for

    section, _, name = key.rpartition(".")
    owner = getattr(job, section) if section else job
    field_ = next((f for f in dataclasses.fields(owner) if f.name == name), None) if dataclasses.is_dataclass(owner) else None
    if field_ is None:
        return "--" + name.replace("_", "-")
    return flag_for(field_, dict(SECTIONS).get(section, ""))


def _settings(job: PruneJob) -> dict:
    settings = _flat({k: _jsonable(getattr(job, k)) for k in RESULT_FIELDS})
    settings = {k: v for k, v in settings.items() if k not in NEUTRAL and (k != "l0_init" or job.criterion == "l0")}
    settings.update({f"{k}_files": fingerprint(getattr(job, k)) for k in ("model", "data")})
    return settings


def _check_resume(job: PruneJob, work: Path) -> None:
    """Before any work: refuse a --resume that changes a result-changing option or an input file, and
    a fresh run that would silently abandon an interrupted run's checkpoint. Writes nothing."""
    saved = work / RESUME_FILE
    if not job.resume:
        if (work / "checkpoint.pt").is_file() and not job.overwrite:
            raise SlimtuneError(f"an interrupted run left a checkpoint in {work}; pass --resume to continue it, "
                                "or --overwrite to discard it and start over")
        return
    if not saved.is_file():
        return
    import json

    before, settings = json.loads(saved.read_text()), _settings(job)
    for key in sorted(set(before) | set(settings)):
        if key not in before and (key.endswith("_files") or (key in ADDED and settings.get(key) == ADDED[key])):
            continue  # recorded since: a run from before that could not record it
        if before.get(key) != settings.get(key):
            if key.endswith("_files"):
                name = key.removesuffix("_files")
                raise SlimtuneError(f"cannot resume: the files of --{name} {getattr(job, name)} changed since the interrupted run "
                                    "(size or modification time); restore them, or start over without --resume")
            flag = FLAGS.get(key) or _flag(job, key)
            raise SlimtuneError(f"cannot resume: {key} was {before.get(key)!r} in the interrupted run and is {settings.get(key)!r} now; "
                                f"resume with the original {flag}, or start over without --resume")


def _start_work(job: PruneJob, work: Path) -> None:
    """After every check passed, just before the work: a fresh run starts from an empty work folder
    (no log rows, events or checkpoint of an abandoned run) that records its settings."""
    if job.resume or not distributed.is_main():
        return
    import shutil

    from .io import atomic_write_json

    if work.is_dir():
        shutil.rmtree(work)  # ours: `.<out>.work` next to --out; a checkpoint in it was refused or --overwrite given
    atomic_write_json(work / RESUME_FILE, _settings(job))


SPARSE_DIR = "sparse"


def _write_sparse(model, tokenizer, directory: Path, fmt: str, masks) -> dict:
    """The compressed-tensors copy, checked to reload to exactly the same weights."""
    from .export.sparse import load_sparse, save_sparse

    info = save_sparse(model, directory, tokenizer=tokenizer, format=fmt, masks=masks)
    reloaded = load_sparse(directory).state_dict()
    for key, value in model.state_dict().items():
        if key in reloaded and not torch.equal(reloaded[key].to(value.device), value):
            raise SlimtuneError(f"the sparse copy does not reload {key} exactly; nothing was written; please report this")
    info.pop("modules", None)  # per-module sparsity is already in the report
    return info


@torch.no_grad()
def _reload_check(model, directory: Path, tokens: torch.Tensor) -> float:
    """Load `directory` with plain `from_pretrained` and compare logits with the in-memory model."""
    from transformers import AutoModelForCausalLM

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    x = tokens[:1, :32].to(device)
    return float((reloaded(x).logits - model(x).logits).abs().max())


def _jsonable(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _jsonable(v) for k, v in asdict(obj).items()}
    return obj
