"""Rewrite the "Measured results" section of README.md from benchmarks/results/*.json.

    python benchmarks/make_tables.py

Every number in that section comes from a JSON written by a benchmark script; this only formats.
"""

from __future__ import annotations

import json
from pathlib import Path

from _common import STANDARD_OPTIONS  # benchmarks/ is on the path: this runs as a script there

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _machine(d: dict) -> str:
    m = d["machine"]
    return f"{m.get('cpu_count')}-core {m.get('processor', '')} CPU, torch {m.get('torch')}, {m.get('torch_threads')} threads; {d['date'][:10]}"


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def dense_section() -> list[str]:
    d = _load("dense_eval")
    if not d:
        return []
    return [
        "### Dense baseline",
        "",
        f"`{d['command']}` ({_machine(d)})",
        "",
        "| model | test perplexity | params (decoder / total) | size | prefill 1x256 (median) | decode | peak memory of the perplexity pass |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| SmolLM2-135M-Instruct (fp32) | {d['perplexity']:.2f} | {d['params_decoder'] / 1e6:.1f}M / {d['params_total'] / 1e6:.1f}M | "
        f"{d['size_mb']:.0f} MiB | {d['prefill_ms']:.0f} ms | {d['decode_tok_s']:.1f} tok/s | {d['peak_memory_mb']:.0f} MiB |",
        "",
    ]


def oneshot_section() -> list[str]:
    d = _load("oneshot_criteria")
    if not d:
        return []
    dense = d["dense"]
    out = [
        "### One-shot criteria (no recovery fine-tuning)",
        "",
        f"`{d['command']}` ({_machine(d)}). Heads (KV groups) + channels with local ranking, or whole layers for "
        f"Block Influence; the first 3 and the last layer are kept. Dense: perplexity {dense['perplexity']:.2f}, "
        f"prefill 1x512 {dense['prefill_ms']:.0f} ms, decode {dense['decode_tok_s']:.1f} tok/s. Latency is the median of 5.",
        "",
        "| criterion | target | achieved | test ppl | params | prefill 1x512 | vs dense | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["results"]:
        if "error" in r:
            out.append(f"| {r['criterion']} | {r['sparsity']} | failed: {r['error']} | | | | | |")
            continue
        out.append(
            f"| {r['criterion']} ({r['granularity']}) | {r['sparsity']:.0%} | {r['achieved']:.3f} | {r['perplexity']:.1f} | "
            f"{r['params_total'] / 1e6:.1f}M | {r['prefill_ms_median']:.0f} ms | {r['prefill_vs_dense']:.2f}x | {r['decode_tok_s_median']:.1f} |"
        )
    out.append("")
    return out


def taylor_memory_section() -> list[str]:
    d = _load("taylor_memory")
    if not d:
        return []
    out = ["### Full-gradient Taylor: gradient hooks vs plain backward", "", f"`{d['command']}` ({_machine(d)}). "
           "Peak RSS added by one Taylor update (steady state, 2nd update), fresh process per sample, median of 3.", "",
           "| setting | with hooks | plain backward | plain / hooks |", "|---|---:|---:|---:|"]
    for key, r in d["results"].items():
        h, p = r["hooks"]["median"]["update2_peak_delta_mb"], r["plain"]["median"]["update2_peak_delta_mb"]
        out.append(f"| {key} | {h:.0f} MiB | {p:.0f} MiB | {p / h:.2f} |")
    out.append("")
    return out


def quality_section() -> list[str]:
    d = _load("loraprune_quality")
    if not d:
        return []
    s = d["setup"]
    out = [
        "### LoRAPrune vs alternatives at the same fine-tuning budget",
        "",
        f"{' then '.join(f'`{c}`' for c in d.get('invocations', [d['command']]))} ({_machine(d)}). {s['steps']} optimiser steps of {s['batch_size']} x {s['seq_len']} tokens, "
        f"lr {s['lr']}, LoRA {s['lora']}, heads + channels, one seed. Dense perplexity {d['dense']['perplexity']:.2f}.",
        "",
        "| sparsity | (a) LoRAPrune | (b) Taylor one-shot + LoRA | (c) true-gradient progressive | (d) magnitude one-shot + LoRA |",
        "|---|---:|---:|---:|---:|",
    ]
    by = {}
    for r in d["results"]:
        by.setdefault(r["sparsity"], {})[r["method"][0]] = r["perplexity"]
    for sp, row in sorted(by.items()):
        out.append(f"| {sp:.0%} | " + " | ".join(_f(row.get(k)) for k in "abcd") + " |")
    out.append("")
    return out


def memory_section() -> list[str]:
    d = _load("loraprune_memory")
    if not d:
        return []
    m = d["median"]
    return [
        "### Memory of one importance step (micro-batch 1 x 512, gradient checkpointing)",
        "",
        f"`{d['command']}` ({_machine(d)}). Fresh process per sample, median of {len(d['samples']['lora'])}.",
        "",
        "| importance from | step peak (above loaded model) | process peak | gradients held |",
        "|---|---:|---:|---:|",
        f"| LoRA gradients (LoRAPrune) | {m['lora']['peak_delta_mb']:.0f} MiB | {m['lora']['peak_abs_mb']:.0f} MiB | {m['lora']['grads_held_mb']:.1f} MiB |",
        f"| true weight gradient | {m['grad']['peak_delta_mb']:.0f} MiB | {m['grad']['peak_abs_mb']:.0f} MiB | {m['grad']['grads_held_mb']:.1f} MiB |",
        f"| ratio | {d['ratio_step_memory_lora_over_grad']:.2f} | {d['ratio_total_process_memory_lora_over_grad']:.2f} | |",
        "",
    ]


def overhead_section() -> list[str]:
    d = _load("loraprune_overhead")
    if not d:
        return []
    m = d["median_step_seconds"]
    return [
        "### Step time: LoRAPrune vs plain LoRA",
        "",
        f"`{d['command']}` ({_machine(d)}). Batch {d['setup']['batch_size']} x {d['setup']['seq_len']}, alternating blocks, medians"
        f"{'; the plain LoRA step runs with the gates paused' if 'lora_step' in d['setup'] else ''}. On a GPU: see \"On a GPU\".",
        "",
        "| command | plain LoRA step | LoRAPrune step | ratio |",
        "|---|---:|---:|---:|",
        f"| `{d['command']}` | {m['lora']:.2f} s | {m['loraprune']:.2f} s | {d['ratio_loraprune_over_lora']:.3f} |",
        *[f"| `{c['command']}` ({c['date'][:10]}, {c['warmup_seconds']:.0f} s warm-up) | {c['median_step_seconds']['lora']:.2f} s | "
          f"{c['median_step_seconds']['loraprune']:.2f} s | {c['ratio_loraprune_over_lora']:.3f} |"
          for c in [_load("loraprune_overhead_cpu_compile")] if c],
        "",
    ]


def speed_section() -> list[str]:
    d = _load("result_speed")
    if not d:
        return []
    p, t = d["median_prefill_ms"], d["median_decode_tok_s"]
    sp = d["setup"]["pruned_report_sparsity"]["achieved"]
    return [
        "### Speed of the 50% LoRAPrune model (CPU)",
        "",
        f"`{d['command']}` ({_machine(d)}). Median of {d['setup']['repeats']}, dense and pruned alternating.",
        "",
        "| model | params | prefill 1x512 | decode tok/s |",
        "|---|---:|---:|---:|",
        f"| dense | {d['params']['dense'] / 1e6:.1f}M | {p['dense']:.0f} ms | {t['dense']:.1f} |",
        f"| pruned ({sp:.1%} of decoder) | {d['params']['pruned'] / 1e6:.1f}M | {p['pruned']:.0f} ms | {t['pruned']:.1f} |",
        f"| ratio | | {d['prefill_ratio_pruned_over_dense']:.2f}x | {d['decode_ratio_pruned_over_dense']:.2f}x |",
        "",
    ]


def fidelity_section() -> list[str]:
    d = _load("loraprune_fidelity")
    if not d:
        return []
    out = ["### Why LoRAPrune trails the true gradient here: rank agreement of the two estimates", "",
           f"`{d['command']}` ({_machine(d)}). Both importances observe the same backward of one LoRA run; Spearman "
           "correlation of their EMA unit scores, median over layers.", "",
           "| step | heads | MLP channels | median norm of B |", "|---:|---:|---:|---:|"]
    for r in d["results"]:
        out.append(f"| {r['step']} | {r['spearman_heads_median']:.2f} | {r['spearman_channels_median']:.2f} | {r['lora_B_norm_median']:.3f} |")
    out.append("")
    a = _load("loraprune_fidelity_adalora")
    if a:
        out += [f"The same with AdaLoRA adapters, whose λ starts at 0 (`{a['command']}`, {_machine(a)}); the estimate is LoRAPrune's "
                "rule for three factors, which slimtune therefore refuses:", "",
                "| step | heads | MLP channels | median abs λ |", "|---:|---:|---:|---:|"]
        out += [f"| {r['step']} | {r['spearman_heads_median']:.2f} | {r['spearman_channels_median']:.2f} | {r['adalora_lambda_abs_median']:.4f} |"
                for r in a["results"]]
        out.append("")
    return out


def targets_section() -> list[str]:
    rows = []
    q = _load("loraprune_quality")
    if q:
        by = {}
        for r in q["results"]:
            by.setdefault(r["sparsity"], {})[r["method"][0]] = r["perplexity"]
        for sp, m in sorted(by.items()):
            if {"a", "b", "c", "d"} <= m.keys():
                rows.append((f"quality {sp:.0%}: (a) <= (b)", f"{m['a']:.1f} vs {m['b']:.1f}", m["a"] <= m["b"]))
                rows.append((f"quality {sp:.0%}: (a) <= (d)", f"{m['a']:.1f} vs {m['d']:.1f}", m["a"] <= m["d"]))
                rows.append((f"quality {sp:.0%}: (a) within 5% of (c)", f"{m['a'] / m['c']:.3f}x", m["a"] <= 1.05 * m["c"]))
    mem = _load("loraprune_memory")
    if mem:
        r = mem["ratio_step_memory_lora_over_grad"]
        rows.append(("memory of an importance step, LoRA / true gradient <= 0.65", f"{r:.2f}", r <= 0.65))
    ov = _load("loraprune_overhead")
    if ov:
        r = ov["ratio_loraprune_over_lora"]
        rows.append(("LoRAPrune step / LoRA step <= 1.15 (CPU)", f"{r:.3f}", r <= 1.15))
    gpu = _load("loraprune_overhead_gpu_bf16")
    if gpu:
        r = gpu["ratio_loraprune_over_lora"]
        rows.append((f"LoRAPrune step / LoRA step <= 1.15 ({gpu['setup']['device_name']}, bf16)", f"{r:.3f}", r <= 1.15))
    sp = _load("result_speed")
    if sp:
        r = sp["prefill_ratio_pruned_over_dense"]
        rows.append(("prefill 1x512 of the 50% model / dense <= 0.65", f"{r:.2f}", r <= 0.65))
    if not rows:
        return []
    out = ["### Targets (issue 4)", "", "| target | measured | met |", "|---|---:|:---:|"]
    out += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in rows]
    out.append("")
    return out


def default_run_section() -> list[str]:
    d = _load("default_run")
    if not d or "variants" not in d:
        return []
    dense = d["dense"]
    out = [
        "### The default run, and what distillation and the LR schedule do to it",
        "",
        f"`python benchmarks/default_run.py --variant NAME -- OPTIONS` ({_machine(d)}): one `slimtune prune` process per row "
        "(20% of the decoder, LoRAPrune, preset quick; the granularity was heads + channels up to v3, channels from v4 on, now the default), then the saved model's perplexity on "
        f"{d['windows']} evenly spaced windows of the Wikipedia test split at 256 and 512 tokens, and on the Lee news corpus "
        "(another domain, used for nothing else). Wall time on a shared CPU: other work ran at the same time, so read it as an upper bound.",
        "",
        "| variant | options | wall | wiki 256 | wiki 512 | news 512 | x dense (512 / news) | training peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        f"| dense | | | {dense['wiki_test_256']:.2f} | {dense['wiki_test_512']:.2f} | {dense['news_512']:.2f} | 1.00 / 1.00 | |",
    ]
    for name, v in d["variants"].items():
        p, r = v["perplexity"], v["vs_dense"]
        mem = v.get("train_peak_memory_mib")
        out.append(f"| {name} | `{v['command'].replace('slimtune prune', '').strip() or '(defaults)'}` | {v['wall_seconds'] / 60:.1f} min | "
                   f"{p['wiki_test_256']:.1f} | {p['wiki_test_512']:.1f} | {p['news_512']:.1f} | {r['wiki_test_512']:.2f} / {r['news_512']:.2f} | "
                   f"{_f(mem, '{:.0f} MiB')} |")
    out.append("")
    return out


def sparse_section() -> list[str]:
    d = _load("oneshot_sparse")
    if not d:
        return []
    dense = d["dense"]
    out = [
        "### Unstructured and N:M: magnitude, Wanda, SparseGPT, LoRAPrune",
        "",
        f"`python benchmarks/oneshot_sparse.py` (rows accumulated over several runs with `--update`; the last was `{d['command']}`; "
        f"{_machine(d)}). Calibration: {d['calibration']}. Recovery: {d['recovery_steps']} LoRA steps of "
        "2 x 256 tokens with the masks on the merged weight. Sparsity is measured on the saved model over all decoder "
        "projections: `0.5` targets 50% of all decoder parameters (the first 3 and the last layer stay dense by default, "
        "so the pruned layers lose more), while N:M applies n:m inside the 26 pruned layers (26/30 x 0.5 = 0.433 overall). "
        f"Dense: wiki {dense['wiki_test_256']:.2f}, news {dense['news_512']:.2f}. One-shot wall time on a shared CPU (load average beside it).",
        "",
        "| method | pattern | one-shot wiki / news | after recovery wiki / news | measured sparsity (after recovery where run) | one-shot wall (load) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        one = r.get("oneshot")
        rec = r.get("recovered")
        wall = f"{r['oneshot_seconds']:.0f} s ({r['load_avg_1m']:.1f})" if one else "-"
        one_text = f"{one['wiki_test_256']:.1f} / {one['news_512']:.1f}" if one else "-"
        rec_text = f"{rec['wiki_test_256']:.1f} / {rec['news_512']:.1f}" if rec else "not run"
        sp = r.get("recovered_sparsity", r.get("oneshot_sparsity"))
        out.append(f"| {r['method']} | {r['pattern']} | {one_text} | {rec_text} | {sp:.4f} | {wall} |")
    out.append("")
    return out


def crosscheck_section() -> list[str]:
    d = _load("reference_crosscheck")
    if not d:
        return []
    dense = d["dense"]
    out = [
        "### Wanda and SparseGPT against an independent implementation",
        "",
        f"`{d['command']}` ({_machine(d)}), reference: {d['reference']}, run in its own environment. Both sides prune every "
        f"decoder projection of all 30 layers (lm_head dense), layer by layer, from the same calibration ids ({d['calibration']}); "
        f"both models are evaluated by the same code (dense: wiki {dense['wiki_test_256']:.2f}, news {dense['news_512']:.2f}). "
        "Mask agreement: share of projection weights that both keep or both prune.",
        "",
        "| method | pattern | slimtune wiki / news | llm-compressor wiki / news | sparsity (ours / theirs) | mask agreement | one-shot wall (ours / theirs) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        a, b = r["ours"], r["llmcompressor"]
        out.append(f"| {r['method']} | {r['pattern']} | {a['wiki_test_256']:.2f} / {a['news_512']:.2f} | {b['wiki_test_256']:.2f} / "
                   f"{b['news_512']:.2f} | {a['sparsity']:.4f} / {b['sparsity']:.4f} | {r['mask_agreement']:.3f} | "
                   f"{a['oneshot_seconds']:.0f} s / {b['oneshot_seconds']:.0f} s |")
    out.append("")
    return out


def sparse_size_section() -> list[str]:
    d = _load("sparse_size")
    if not d:
        return []
    out = [
        "### Size on disk of the sparse copy",
        "",
        f"`{d['command']}` ({_machine(d)}). fp32 bundled model, decoder projections pruned by one-shot magnitude (the size depends "
        f"on the pattern, not on the criterion), saved dense (`save_model`) and sparse (`--save-sparse auto`: compressed-tensors "
        f"layouts); save / load medians of {d['repeats']}; the reload is compared bit for bit.",
        "",
        "| pattern | format | sparsity of all parameters | dense files | sparse files | ratio | save / load | bit-exact |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in d["rows"]:
        out.append(f"| {r['pattern']} | {r['format']} | {r['global_sparsity']:.3f} | {r['dense_file_bytes'] / 2**20:.0f} MiB | "
                   f"{r['sparse_weight_bytes'] / 2**20:.0f} MiB | {r['ratio']:.2f}x | {r['save_seconds_median']:.1f} s / {r['load_seconds_median']:.1f} s | "
                   f"{'yes' if r['reload_bit_exact'] else 'NO'} |")
    out.append("")
    return out


def structured_section() -> list[str]:
    d = _load("oneshot_structured")
    if not d:
        return []
    rows = {r["name"]: r for r in d["rows"]}
    dense = rows.pop("dense")
    out = [
        "### Structured one-shot at 20%: what matters against LLM-Pruner",
        "",
        f"`python benchmarks/oneshot_structured.py [--cases ...]` ({_machine(d)}). Granularity as listed (heads = whole KV groups unless head_mode says otherwise), local ranking, no recovery; "
        "calibration batches of 2 x 256 tokens of the train split; perplexity on 16 windows of 512 tokens. Default layer range keeps "
        "the first 3 and the last layer; the LLM-Pruner range keeps the first 4 and the last 2. "
        f"Dense: wiki {dense['wiki_512']:.2f}, news {dense['news_512']:.2f}. Wall time includes the calibration passes (load average beside it).",
        "",
        "| case | criterion | calibration batches | settings | wiki 512 | news 512 | x dense (wiki / news) | wall (load) |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        other = ", ".join(f"{k}={r[k]}" for k in ("granularity", "head_mode", "ranking", "normalise") if k in r)
        if r.get("excluded"):
            other = ", ".join(x for x in (other, f"excluded {r['excluded']}") if x)
        out.append(f"| {name} | {r['criterion']} | {r['calib_batches']} | {other or '-'} | {r['wiki_512']:.1f} | {r['news_512']:.1f} | "
                   f"{r['wiki_512'] / dense['wiki_512']:.2f} / {r['news_512'] / dense['news_512']:.2f} | {r['seconds']:.0f} s ({r['load_avg_1m']:.1f}) |")
    out.append("")
    return out


def qat_section() -> list[str]:
    d = _load("qat_gguf")
    if not d:
        return []
    out = [
        "### W4 (group 32): round-to-nearest vs QAT + LoRA, in slimtune and in llama.cpp",
        "",
        f"`python benchmarks/qat_gguf.py` ({_machine(d)}). Same {d['windows']} windows of 512 tokens for both scorers; llama.cpp is the "
        "`xllamacpp` wheel running the saved `model.gguf` (see slimtune/evaluate/llamacpp.py). Trained rows: `slimtune prune` at the "
        "quick preset (2 x 256-token batches; the step count is in the options when it is not the preset's). Speed: llama.cpp on this CPU, 256-token prompt and 64 generated tokens, medians of 3.",
        "",
        "| variant | options | wiki 512 slimtune / llama.cpp | news 512 slimtune / llama.cpp | GGUF size | llama.cpp prompt / gen tok/s | wall (1-min load at the end; 2 = this job alone) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    order = ["dense", "rtn", "lora", "fake", "lsq", "lsq+", "prune20_lsq"]
    for name, v in sorted(d["variants"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        sp = v.get("llamacpp_speed")
        speed = f"{sp['prompt_tokens_per_s']:.0f} / {sp['gen_tokens_per_s']:.1f}" if sp else "-"
        opts = v["command"].replace("slimtune prune", "").replace("--export gguf --preset quick --no-eval", "").strip()
        out.append(f"| {name} | `{opts}` | {v['slimtune_wiki_512']:.2f} / {v['llamacpp_wiki_512']:.2f} | {v['slimtune_news_512']:.2f} / "
                   f"{v['llamacpp_news_512']:.2f} | {v['gguf_bytes'] / 2**20:.1f} MiB | {speed} | {v['wall_seconds'] / 60:.1f} min"
                   + (f" (load {v['load_avg_1m']:.1f})" if "load_avg_1m" in v else "") + " |")
    out.append("")
    return out


COMMON_STANDARD = " ".join(STANDARD_OPTIONS)


def _gpu(d: dict) -> str:
    m = d["machine"]
    name = d.get("device_name") or d.get("setup", {}).get("device_name") or d.get("device")
    return f"{name}, torch {m.get('torch')}, transformers {m.get('transformers')}; {d['date'][:10]}"


def gpu_section() -> list[str]:
    steps = [d for d in (_load(n) for n in ("loraprune_overhead_gpu_bf16", "loraprune_overhead_gpu_bf16_stacked", "loraprune_overhead_gpu_bf16_compile", "loraprune_overhead_gpu_fp32")) if d]
    std, sp24 = _load("standard_preset_gpu"), _load("sparse24_speed")
    if not (steps or std or sp24):
        return []
    out = ["### On a GPU", "", "`bash benchmarks/gpu_session.sh` re-runs everything in this section (and the CUDA tests) in about nine minutes.", ""]
    if steps:
        out += [
            "Step time, each variant alone on the GPU, device synchronised around every timed step, medians "
            "(`benchmarks/loraprune_overhead.py`; the plain LoRA step runs with the pruner's gates paused). "
            f"{_gpu(steps[0])}.",
            "",
            "| command | precision | compile | plain LoRA step | LoRAPrune step | ratio (target <= 1.15) | train tokens/s (LoRA / LoRAPrune) | warm-up |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for d in steps:
            m, t, st = d["median_step_seconds"], d["train_tokens_per_second"], d["setup"]
            out.append(f"| `{d['command']}` | {st['mixed_precision']} | {'yes' if st.get('compile') else 'no'} | {m['lora'] * 1e3:.0f} ms | "
                       f"{m['loraprune'] * 1e3:.0f} ms | {d['ratio_loraprune_over_lora']:.3f} | {t['lora']:,.0f} / {t['loraprune']:,.0f} | "
                       f"{_f(d.get('warmup_seconds'), '{:.0f} s')} |")
        out.append("")
    if std:
        dense = std["dense"]
        out += [
            f"Standard preset (200 steps of 8 x 512 tokens, bf16, channels at 20%), `{std['command']}`: every row is `slimtune prune "
            f"{COMMON_STANDARD}` plus its options, the runs side by side on one {std['device_name']}, so wall times are those of a shared GPU; "
            f"each saved model on {std['windows']} windows per set (Wikipedia test split, and the news corpus never trained on).",
            "",
            "| variant | options | wall (shared GPU) | wiki 256 | wiki 512 | news 512 | x dense (512 / news) |",
            "|---|---|---:|---:|---:|---:|---:|",
            f"| dense | | | {dense['wiki_test_256']:.2f} | {dense['wiki_test_512']:.2f} | {dense['news_512']:.2f} | 1.00 / 1.00 |",
        ]
        for name, v in std["variants"].items():  # in standard_preset.py's order
            opts = v["command"].replace("slimtune prune", "").replace(COMMON_STANDARD, "").strip() or "(LoRAPrune, the default)"
            if "perplexity" not in v:
                out.append(f"| {name} | `{opts}` | {v.get('failed')} | | | | |")
                continue
            p, r = v["perplexity"], v["vs_dense"]
            out.append(f"| {name} | `{opts}` | {_f(v.get('wall_seconds_shared_gpu'), '{:.0f} s')} | {p['wiki_test_256']:.1f} | "
                       f"{p['wiki_test_512']:.1f} | {p['news_512']:.1f} | {r['wiki_test_512']:.2f} / {r['news_512']:.2f} |")
        out.append("")
    if sp24:
        out += [
            f"2:4 semi-structured kernels (`{sp24['command']}`, {sp24['device']}, {sp24['dtype']}, {sp24['converted']} projections converted; "
            "medians of repeated runs): every decoder projection's `F.linear` and the whole prefill, dense against sparse.",
            "",
            "| backend | tokens | projections dense | projections 2:4 | speed-up | prefill dense | prefill 2:4 | speed-up |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sp24["rows"]:
            backend = f"{r.get('backend', 'auto')} ({r['tensor']})" if "tensor" in r else r.get("backend", "auto")
            if "failed" in r:
                out.append(f"| {backend} | failed: {r['failed']} | | | | | | |")
                continue
            out.append(f"| {backend} | {r['tokens']} | {r['linears_dense_ms']:.2f} ms | {r['linears_sparse_ms']:.2f} ms | {r['linears_speedup']:.2f}x | "
                       f"{r['prefill_dense_ms']:.2f} ms | {r['prefill_sparse_ms']:.2f} ms | {r['prefill_speedup']:.2f}x |")
        out.append("")
    return out


def main() -> None:
    lines = [START, ""]
    sections = (dense_section, default_run_section, gpu_section, qat_section, sparse_section, crosscheck_section, sparse_size_section, structured_section, targets_section, quality_section, fidelity_section, memory_section, overhead_section,
                speed_section, oneshot_section, taylor_memory_section)
    for section in sections:
        lines += section()
    lines.append(END)
    readme = ROOT / "README.md"
    text = readme.read_text()
    a, b = text.index(START), text.index(END) + len(END)
    readme.write_text(text[:a] + "\n".join(lines) + text[b:])
    print("README.md results section rewritten")


if __name__ == "__main__":
    main()
