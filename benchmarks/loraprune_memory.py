"""Peak memory of one importance-estimation step: LoRA gradients vs the true weight gradient
(issue 4, benchmark 2).

    python benchmarks/loraprune_memory.py [--repeats 3] [--seq-len 512]

Each sample is a fresh process (this script with --child lora|grad): bundled SmolLM2-135M in
fp32, LoRA r 8 on all seven projections, gradient checkpointing, micro-batch 1 x 512. The measured
step is forward + backward + LoRAPruneImportance.observe. Peak memory is the process RSS peak
(5 ms sampler) minus the RSS after loading the model and faulting its weights in, i.e. what the
step adds on top of the weights. On CUDA it is max_memory_allocated instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, write  # noqa: E402


def child(metric: str, seq_len: int) -> dict:
    from slimtune.adapters import LoraSettings, attach_lora
    from slimtune.data import load_tokens
    from slimtune.evaluate import track_peak_memory
    from slimtune.importance.loraprune import LoRAPruneImportance, enable_full_grad
    from slimtune.models import load_model
    from slimtune.training.loop import enable_checkpointing
    from slimtune.training.loss import causal_lm_loss

    torch.set_num_threads(2)
    model, tok = load_model("default")
    batch = load_tokens("wiki", tok, "train", seq_len, max_sequences=1)
    with torch.no_grad():
        model(input_ids=batch[:, :8])  # fault the mmapped weights in before the baseline
    net = attach_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0))
    base = net.get_base_model()
    enable_checkpointing(base)
    base.enable_input_require_grads()
    imp = LoRAPruneImportance(net, metric=metric)
    if metric == "grad":
        enable_full_grad(net)
    net.train()
    device = next(net.parameters()).device
    with track_peak_memory(device) as stats:
        loss = causal_lm_loss(net, batch.to(device))  # the training loop's loss: chunked LM head + CE
        loss.backward()
        imp.observe(net)
    weight_mb = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    grads_mb = sum(p.grad.numel() * p.grad.element_size() for p in net.parameters() if p.grad is not None) / 2**20
    return {"peak_delta_mb": stats["peak_delta_mb"], "peak_abs_mb": stats.get("peak_rss_mb", stats.get("peak_allocated_mb")),
            "weights_mb": weight_mb, "grads_held_mb": grads_mb, "loss": loss.item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--child", choices=["lora", "grad"])
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.seq_len)))
        return
    samples = {"lora": [], "grad": []}
    for _ in range(args.repeats):
        for metric in samples:  # interleaved, each in a fresh process
            out = subprocess.run([sys.executable, __file__, "--child", metric, "--seq-len", str(args.seq_len)],
                                 capture_output=True, text=True, check=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
            samples[metric].append(json.loads(line[7:]))
            print(metric, samples[metric][-1], flush=True)
    med = {m: {k: median([s[k] for s in v]) for k in v[0]} for m, v in samples.items()}
    ratio = med["lora"]["peak_delta_mb"] / med["grad"]["peak_delta_mb"]
    abs_ratio = med["lora"]["peak_abs_mb"] / med["grad"]["peak_abs_mb"]
    write("loraprune_memory", {
        "setup": {"seq_len": args.seq_len, "micro_batch": 1, "gradient_checkpointing": True, "lora": "r8 alpha16 all 7 projections", "dtype": "float32"},
        "samples": samples, "median": med,
        "ratio_step_memory_lora_over_grad": ratio, "ratio_total_process_memory_lora_over_grad": abs_ratio,
        "target": "ratio <= 0.65",
    })


if __name__ == "__main__":
    main()
