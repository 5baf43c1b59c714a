"""Command line, generated from the job dataclasses (recipe.py) and the settings sections they hold."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .cli_gen import OneLineParser, add_fields, build, given
from .errors import SlimtuneError

SECTIONS = (("prune", ""), ("train", ""), ("lora", "lora-"), ("distill", "distill-"), ("averaging", ""), ("quant", ""))  # (section field, flag prefix)


def build_parser() -> argparse.ArgumentParser:
    from .recipe import EvalJob, PruneJob

    parser = OneLineParser(prog="slimtune", description="Prune and fine-tune LLMs at LoRA's memory cost.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    ev = sub.add_parser("eval", help="perplexity, parameters, latency and memory of one model")
    add_fields(ev, EvalJob)
    pr = sub.add_parser("prune", help="prune (while fine-tuning with LoRA), shrink, save and report")
    add_fields(pr, PruneJob)
    import typing

    hints = typing.get_type_hints(PruneJob)
    for section, prefix in SECTIONS:
        add_fields(pr, hints[section], prefix=prefix, section=section)
    return parser


def _eval(values: dict) -> int:
    from .evaluate import print_results, write_json
    from .recipe import EvalJob, run_eval

    job = build(EvalJob, values)
    result = run_eval(job)
    print_results({job.model: result})
    if job.json:
        write_json(job.json, result)
    return 0


def _prune(values: dict) -> int:
    from .evaluate import print_results, write_json
    from .option_use import check_typed
    from .recipe import PruneJob, apply_preset, run_prune

    typed = dict(values)
    values = apply_preset(values, values.get("preset", "auto"))
    job = build(PruneJob, values)
    check_typed(typed, job)  # an option typed but unused by this run: refused, not ignored
    report = run_prune(job, progress=not job.quiet)
    from .training.distributed import is_main

    if not is_main():  # accelerate launch / torchrun: rank 0 prints and writes
        return 0
    if report["before"] and report["after"]:
        print_results({"dense": report["before"], "pruned": report["after"]})
    sp = report["sparsity"]
    print(f"saved {job.out}: {sp['achieved']:.4f} of decoder parameters removed (target {sp['target']}); report in {job.out}/report.md")
    if job.json:
        write_json(job.json, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a one-line usage error already printed
        return int(exc.code or 0)
    values = given(args)
    command = values.pop("command")
    if values.get("quiet"):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # PEFT 0.21 calls a transformers 5 API that warns about its own deprecation on every run
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if values.get("quiet"):
            hf_logging.disable_progress_bar()
        return {"eval": _eval, "prune": _prune}[command](values)
    except SlimtuneError as exc:
        print(f"slimtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nslimtune: interrupted; the previous output is untouched (rerun `slimtune prune` with --resume to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
