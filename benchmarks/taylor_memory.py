"""Peak CPU memory of Taylor importance updates: gradient hooks vs plain backward.

    python benchmarks/taylor_memory.py            # writes benchmarks/results/taylor_memory.json

Each measurement runs in a fresh subprocess (this script with --variant hooks|plain) so that no
allocator state carries over. A child loads the bundled SmolLM2-135M, builds TaylorImportance,
then runs two updates on batches of 1 × L tokens (L = 256, the requested setting, and L = 32,
where activations are smaller than the gradients), tracking the process RSS peak of each update
(slimtune.evaluate.track_peak_memory: a 5 ms sampler thread). The baseline is the RSS just before
the first update: the loaded model after one no-grad forward (safetensors weights are mmapped and
only become resident when first touched). Update 1 allocates the fp32 accumulators; update 2 is the
steady state of a longer calibration run, where the plain path holds every `.grad` on top of them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "taylor_memory.json"
SEQ_LENS, THREADS = (256, 32), 2


def _load():
    try:
        from slimtune.models import load_model

        return load_model("default")
    except ImportError:  # model sources not there yet: the cached conversion, if any
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path.home() / ".cache/slimtune/models/SmolLM2-135M-Instruct"
        return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _batches(tok, vocab: int, seq_len: int):
    try:
        from slimtune.data import load_tokens

        rows = load_tokens("wiki", tok, "train", seq_len, max_sequences=2)  # [2, L]
        source = "wiki train split (slimtune.data.load_tokens), 2 packed sequences"
    except ImportError:
        rows = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(0))
        source = "random tokens (slimtune.data unavailable)"
    return [rows[i : i + 1] for i in range(2)], source  # two batches [1, L]


def child(use_hooks: bool, taylor_variant: str, seq_len: int) -> dict:
    from slimtune.evaluate import track_peak_memory
    from slimtune.importance import TaylorImportance, projection_weights

    torch.set_num_threads(THREADS)
    model, tok = _load()
    batches, source = _batches(tok, model.config.vocab_size, seq_len)
    with torch.no_grad():  # safetensors weights are mmapped: fault them all in before the baseline
        model(input_ids=batches[0], use_cache=False)
    imp = TaylorImportance(model, variant=taylor_variant, use_hooks=use_hooks)
    proj_mb = sum(w.numel() * 4 for _, _, w in projection_weights(model, imp.spec)) / 2**20
    updates = []
    baseline = None
    for batch in batches:
        start = time.perf_counter()
        with track_peak_memory("cpu") as stats:
            imp.update(model, batch)
        baseline = baseline or stats["baseline_rss_mb"]  # RSS before update 1: the loaded model
        updates.append({"peak_rss_mb": stats["peak_rss_mb"], "peak_delta_mb": stats["peak_rss_mb"] - baseline,
                        "seconds": time.perf_counter() - start})
    imp.remove()
    return {"baseline_rss_mb": baseline, "updates": updates, "data": source,
            "projection_weights_fp32_mb": proj_mb}


def parent(repeats: int, taylor_variants: list[str], out: Path) -> dict:
    runs: dict = {}
    for seq_len in SEQ_LENS:
        for tv in taylor_variants:
            name = f"{tv}_1x{seq_len}"
            for variant in ("hooks", "plain"):
                samples = []
                for _ in range(repeats):
                    cmd = [sys.executable, __file__, "--variant", variant, "--taylor-variant", tv, "--seq-len", str(seq_len)]
                    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
                    samples.append(json.loads(res.stdout.strip().splitlines()[-1]))
                    print(name, variant, [round(u["peak_delta_mb"]) for u in samples[-1]["updates"]], flush=True)
                med = {
                    f"update{k + 1}_{m}": statistics.median(s["updates"][k][m] for s in samples)
                    for k in range(2) for m in ("peak_rss_mb", "peak_delta_mb", "seconds")
                }
                runs.setdefault(name, {"taylor_variant": tv, "batch": [1, seq_len]})[variant] = {"samples": samples, "median": med}
            h, p = runs[name]["hooks"]["median"], runs[name]["plain"]["median"]
            runs[name]["plain_over_hooks_peak_delta"] = {
                f"update{k}": p[f"update{k}_peak_delta_mb"] / h[f"update{k}_peak_delta_mb"] for k in (1, 2)
            }
    first = next(iter(runs.values()))["hooks"]["samples"][0]
    import psutil

    report = {
        "benchmark": "peak RSS of TaylorImportance.update, post-accumulate-grad hooks vs plain backward",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", os.path.relpath(__file__), *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "python": platform.python_version(), "torch": torch.__version__, "device": "cpu",
                    "torch_threads": THREADS},
        "setup": {"model": "bundled SmolLM2-135M-Instruct (fp32)", "data": first["data"],
                  "repeats": repeats, "updates_per_process": 2,
                  "projection_weights_fp32_mb": first["projection_weights_fp32_mb"],
                  "memory_method": "process RSS sampled every 5 ms (slimtune.evaluate.track_peak_memory); "
                                   "MB = 2**20 bytes; delta = peak minus RSS before update 1 (model loaded, one "
                                   "no-grad forward done); track_peak_memory runs gc + glibc malloc_trim before each update, "
                                   "so heap freed earlier is not silently reused",
                  "timing_note": "seconds are indicative only: the CPU was shared with other jobs"},
        "results": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=("hooks", "plain"), help="internal: run one measurement in this process")
    ap.add_argument("--taylor-variant", default="element1")
    ap.add_argument("--seq-len", type=int, default=256, help="internal: tokens per batch in a child")
    ap.add_argument("--taylor-variants", default="element1,element2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(child(args.variant == "hooks", args.taylor_variant, args.seq_len)))
        return
    report = parent(args.repeats, args.taylor_variants.split(","), args.out)
    for tv, r in report["results"].items():
        for v in ("hooks", "plain"):
            m = r[v]["median"]
            print(f"{tv} {v:5s} update1 +{m['update1_peak_delta_mb']:.0f} MB  update2 +{m['update2_peak_delta_mb']:.0f} MB")
        print(f"{tv} plain/hooks {r['plain_over_hooks_peak_delta']}")


if __name__ == "__main__":
    main()
