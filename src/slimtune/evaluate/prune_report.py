"""The prune job's report: report.json, report.md and two plots in the output directory."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_text
from . import markdown_table, plot_curves, plot_kept_units, write_json
from .report import kept_units_differ


def _ratio(after: dict, before: dict, key: str) -> str:
    a, b = after.get(key), before.get(key)
    return f"{a / b:.3f}" if a and b else "-"


def _method_notes(result: dict, held_out: bool = True) -> list[str]:
    """What the numbers of the table are based on, so a reader can judge them."""
    ppl = result.get("details", {}).get("perplexity") or {}
    notes = []
    if ppl.get("windows"):
        split = "the test split" if held_out else "the data, NOT held out (too few documents to split: the same text trained on)"
        notes.append(f"- perplexity: {ppl['windows']} windows x {ppl['seq_len']} tokens of {split} "
                     f"({ppl['tokens']:,} predicted tokens)")
    notes.append("- prefill and decode: median of the repeats, [min-max] in brackets; load average taken before timing")
    notes.append("- peak memory: increase over the loaded model during the perplexity pass, after a warm-up batch "
                 "(CPU: resident set size, sampled; CUDA: allocated tensors); MiB = 2^20 bytes")
    return notes


def _training_lines(report: dict) -> list[str]:
    """Training peak memory (the figure the method is about) and throughput."""
    lines = []
    mem = report.get("train_memory") or {}
    if mem.get("peak_delta_mb") is not None:
        where = "CUDA allocator" if mem.get("device", "cpu") != "cpu" else "process RSS, sampled"
        lines.append(f"- training peak memory: {mem['peak_delta_mb']:.0f} MiB above the loaded model ({where})")
    rates = [h["tokens_per_s"] for h in report.get("history", []) if h.get("tokens_per_s")]
    if rates:
        rates = sorted(rates)
        lines.append(f"- training throughput: {rates[len(rates) // 2]:.0f} tokens/s (median over steps)")
    return lines


def render_markdown(report: dict) -> str:
    sp = report["sparsity"]
    job = report["job"]
    lines = [
        "# slimtune prune report",
        "",
        f"Command: `{report['command']}`",
        "",
        f"- model: `{job['model']}`, data: `{job['data']}`, criterion: **{job['criterion']}**",
        f"- granularity: {job['prune']['granularity']}"
        + (f" {job['prune']['nm']}" if job["prune"]["granularity"] == "nm" else f" (head mode {job['prune']['head_mode']}, {job['prune']['ranking']} ranking)"),
        f"- target sparsity {sp['target']:.3f} of decoder parameters; achieved **{sp['achieved']:.4f}** "
        f"({sp['decoder_params_before']:,} -> {sp['decoder_params_after']:,})",
        *([f"- the saved projections hold {sp['zeros_in_weights']:,} zeros: the pruned weights and {sp['rounded_to_zero']:,} kept "
             "weights that quantisation rounded to 0"] if "zeros_in_weights" in sp else []),
        f"- steps: {len(report['history'])}; importance updates skipped (non-finite): {report['importance_skipped_updates']}",
        *_training_lines(report),
    ]
    if report.get("reload_max_abs_diff") is not None:
        lines.append(f"- reloaded with `AutoModelForCausalLM.from_pretrained`: max |logit diff| = {report['reload_max_abs_diff']:.2e}")
    if report.get("before") and report.get("after"):
        lines += ["", "## Before and after", "", markdown_table({"dense": report["before"], "pruned": report["after"]})]
        lines += _method_notes(report["after"], report.get("held_out", True))
    if report.get("per_module"):
        lines += ["", "## Pruned weights per module", "", "| layer | module | pruned | total |", "|---|---|---:|---:|"]
        lines += [f"| {r['layer']} | {r['path']} | {r['pruned']:,} | {r['total']:,} |" for r in report["per_module"]]
    if report["per_layer"]:
        lines += ["", "## Kept units per layer", "", "| layer | heads | KV heads | MLP channels |", "|---|---|---|---|"]
    for row in report["per_layer"]:
        if row["removed"]:
            lines.append(f"| {row['layer']} | removed | removed | removed |")
        else:
            lines.append(f"| {row['layer']} | {row['heads_kept']}/{row['heads_total']} | {row['kv_heads_kept']} | {row['channels_kept']}/{row['channels_total']} |")
    if report["history"]:
        lines += ["", "![loss and sparsity](curves.png)"]
    if kept_units_differ(report["per_layer"]):
        lines += ["", "![kept units](kept_units.png)"]
    lines.append("")
    return "\n".join(lines)


def write_report(directory: Path, report: dict) -> None:
    directory = Path(directory)
    write_json(directory / "report.json", report)
    atomic_write_text(directory / "report.md", render_markdown(report))
    if report["history"]:
        plot_curves(report["history"], directory / "curves.png")
    if kept_units_differ(report["per_layer"]):
        plot_kept_units(report["per_layer"], directory / "kept_units.png")
