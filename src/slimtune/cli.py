"""Command line: thin argument parsing onto the same dataclasses the Python API takes."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings

from .errors import SlimtuneError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (bundled SmolLM2-135M), a local HF directory, or a hub id")
    p.add_argument("--data", default="wiki", help="'wiki' (bundled Wikipedia sample), a .txt/.jsonl file, or a datasets name (wikitext2, c4, ptb)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256)")
    p.add_argument("--eval-windows", type=int, default=None, help="evenly spaced test windows for perplexity (default 16)")
    p.add_argument("--latency-seq-len", type=int, default=None, help="prompt length for prefill latency (default 256)")
    p.add_argument("--latency-repeats", type=int, default=None, help="timed prefill repeats; the median is reported (default 3)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens generated to time decoding (default 16)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimtune", description="Prune and fine-tune LLMs at LoRA's memory cost.")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="perplexity, parameters, latency and memory of one model")
    _add_common(ev)
    ev.add_argument("--split", default="test", choices=["train", "validation", "test"])

    pr = sub.add_parser("prune", help="prune (while fine-tuning with LoRA), shrink, save and report")
    _add_common(pr)
    pr.add_argument("--out", default="pruned", help="output directory (a model from_pretrained loads, plus report)")
    pr.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    pr.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    pr.add_argument("--preset", default="quick", help="quick (default, minutes on CPU), standard, paper")
    pr.add_argument("--criterion", default="loraprune", help="loraprune, grad (true-gradient LoRAPrune), taylor, taylor2, taylor_vector, magnitude, l2, random, block_influence")
    pr.add_argument("--sparsity", type=float, default=0.2, help="fraction of decoder-layer parameters to remove, in [0, 1)")
    pr.add_argument("--granularity", default="heads,channels", help="heads, channels, layers, or a comma-separated mix; or unstructured, or nm (see --nm)")
    pr.add_argument("--nm", default="2:4", help="with --granularity nm: keep n weights in every m consecutive inputs (default 2:4)")
    pr.add_argument("--head-mode", default="kv_groups", choices=["kv_groups", "q_heads"], help="GQA: remove whole KV groups, or equal numbers of query heads per group")
    pr.add_argument("--ranking", default="local", choices=["local", "global"])
    pr.add_argument("--exclude-layers", default=None, help="comma-separated layer indices never pruned (default: first 10%% and the last)")
    pr.add_argument("--layer-share", type=float, default=0.5, help="with layers in a mix: share of the removal taken as whole layers")
    pr.add_argument("--schedule", default="cubic", choices=["cubic", "linear", "constant"])
    pr.add_argument("--warmup", type=float, default=0.1, help="fraction of steps before pruning starts")
    pr.add_argument("--cooldown", type=float, default=0.1, help="fraction of steps after the target is reached")
    pr.add_argument("--prune-every", type=int, default=None, help="optimiser steps between mask updates (default: steps/10, at least 1)")
    pr.add_argument("--steps", type=int, default=None, help="optimiser steps of LoRA fine-tuning")
    pr.add_argument("--recover-steps", type=int, default=None, help="one-shot criteria: LoRA recovery steps after pruning (default --steps; 0 = none)")
    pr.add_argument("--calib-batches", type=int, default=None, help="one-shot criteria: calibration batches")
    pr.add_argument("--batch-size", type=int, default=None, help="micro-batch size")
    pr.add_argument("--grad-accum", type=int, default=None)
    pr.add_argument("--lr", type=float, default=None)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--checkpoint-every", type=int, default=None, help="optimiser steps between resumable checkpoints (default 10; 0 = none)")
    pr.add_argument("--gradient-checkpointing", action="store_true")
    pr.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    pr.add_argument("--lora-r", type=int, default=8)
    pr.add_argument("--lora-alpha", type=float, default=16)
    pr.add_argument("--lora-dropout", type=float, default=0.05)
    pr.add_argument("--lora-targets", default=None, help="comma-separated module names (default: all seven projections)")
    pr.add_argument("--lora-variant", default="lora", choices=["lora", "rslora", "dora", "pissa"])
    pr.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    return parser


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SlimtuneError(f"--exclude-layers '{text}' is not a comma-separated list of integers; e.g. --exclude-layers 0,1,29") from None


def _eval(args) -> int:
    from .data import load_tokens
    from .evaluate import print_results, write_json
    from .io import check_writable_parent
    from .models import get_arch, load_model
    from .runtime import check_seq_len, pick_device

    if args.json:
        check_writable_parent(args.json)
    seq_len = 256 if args.seq_len is None else args.seq_len
    import torch

    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=pick_device(args.device))
    check_seq_len(model, seq_len)
    spec = get_arch(model)
    tokens = load_tokens(args.data, tok, args.split, seq_len, max_sequences=args.eval_windows or 16)
    from .evaluate import evaluate_model

    result = evaluate_model(
        model, tokens, decoder_layers=spec.decoder_layers(model), seq_len_latency=args.latency_seq_len or seq_len,
        latency_repeats=3 if args.latency_repeats is None else args.latency_repeats,
        decode_tokens=16 if args.decode_tokens is None else args.decode_tokens, progress=not args.quiet,
    )
    result["model"], result["data"], result["split"] = args.model, args.data, args.split
    from .evaluate.machine import machine_info, utc_now

    result["command"] = "slimtune " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result["machine"], result["date"] = machine_info(), utc_now()
    print_results({args.model: result})
    if args.json:
        write_json(args.json, result)
    return 0


def _prune(args) -> int:
    from .adapters import LoraSettings
    from .evaluate import print_results, write_json
    from .io import check_writable_parent
    from .pruning.pruner import PruneSettings
    from .recipe import PruneJob, apply_preset, run_prune
    from .training.loop import TrainSettings

    if args.json:
        check_writable_parent(args.json)
    job = PruneJob(model=args.model, data=args.data, out=args.out, overwrite=args.overwrite, resume=args.resume,
                   criterion=args.criterion, dtype=args.dtype, device=args.device, evaluate=not args.no_eval)
    apply_preset(job, args.preset)
    for key in ("seq_len", "eval_windows", "latency_seq_len", "latency_repeats", "decode_tokens", "calib_batches", "recover_steps"):
        if getattr(args, key) is not None:
            setattr(job, key, getattr(args, key))
    train = job.train
    for key in ("steps", "batch_size", "grad_accum", "lr", "checkpoint_every"):
        if getattr(args, key) is not None:
            setattr(train, key, getattr(args, key))
    job.train = TrainSettings(**{**train.__dict__, "seed": args.seed, "gradient_checkpointing": args.gradient_checkpointing, "mixed_precision": args.mixed_precision})
    prune_every = args.prune_every or max(1, job.train.steps // 10)
    job.prune = PruneSettings(
        sparsity=args.sparsity, granularity=args.granularity, head_mode=args.head_mode, ranking=args.ranking,
        exclude_layers=_ints(args.exclude_layers), layer_share=args.layer_share, schedule=args.schedule,
        warmup=args.warmup, cooldown=args.cooldown, prune_every=prune_every, nm=args.nm,
    )
    targets = [t.strip() for t in args.lora_targets.split(",")] if args.lora_targets else None
    job.lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets, variant=args.lora_variant)
    job.command = "slimtune " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = run_prune(job, progress=not args.quiet)
    if report["before"] and report["after"]:
        print_results({"dense": report["before"], "pruned": report["after"]})
    sp = report["sparsity"]
    print(f"saved {args.out}: {sp['achieved']:.4f} of decoder parameters removed (target {sp['target']}); report in {args.out}/report.md")
    if args.json:
        write_json(args.json, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # PEFT 0.21 calls a transformers 5 API that warns about its own deprecation on every run
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if getattr(args, "quiet", False):
            hf_logging.disable_progress_bar()
        return {"eval": _eval, "prune": _prune}[args.command](args)
    except SlimtuneError as exc:
        print(f"slimtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimtune: interrupted; the previous output is untouched (rerun `slimtune prune` with --resume to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
