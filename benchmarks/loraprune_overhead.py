"""Time of a LoRAPrune training step vs a plain LoRA step (issue 4, benchmark 3).

    python benchmarks/loraprune_overhead.py [--steps 8] [--rounds 3]
    python benchmarks/loraprune_overhead.py --device cuda --mixed-precision bf16 --batch-size 4 --seq-len 512 --name loraprune_overhead_gpu

Same process, same model, batches and optimiser; rounds alternate plain and LoRAPrune blocks of
--steps steps so that machine noise hits both alike. A LoRAPrune step = the plain step +
LoRA-gradient importance (observe) + pruner.step, with a mask update every 10 steps as in the
official code (so masks change during the measured LoRAPrune blocks). Medians of per-step times,
with the device synchronised before and after each timed step (CUDA work is asynchronous), and the
training tokens/s of each variant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    ap.add_argument("--name", default="loraprune_overhead", help="results file name (benchmarks/results/NAME.json)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (slimtune prune --compile) for both variants")
    ap.add_argument("--stack-mib", type=float, default=0.0, help="LoRAPruneImportance(stack_mib=...): score the same projection of many layers as one stacked computation")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each variant first (more with --compile: it compiles then)")
    args = ap.parse_args()
    from slimtune.adapters import LoraSettings, attach_lora
    from slimtune.data import load_tokens
    from slimtune.importance.loraprune import LoRAPruneImportance
    from slimtune.models import load_model
    from slimtune.pruning.pruner import Pruner, PruneSettings
    from slimtune.training.loop import Trainer, TrainSettings

    torch.manual_seed(0)
    device = torch.device(args.device)
    model, tok = load_model("default", device=device)
    tokens = load_tokens("wiki", tok, "train", args.seq_len)
    net = attach_lora(model, LoraSettings())
    total = 2 * args.rounds * args.steps
    imp = LoRAPruneImportance(net, stack_mib=args.stack_mib)
    pruner = Pruner(net, PruneSettings(sparsity=0.5, prune_every=10, warmup=0.0, cooldown=0.0), imp, total_steps=total)
    settings = TrainSettings(steps=total, batch_size=args.batch_size, checkpoint_every=0, mixed_precision=args.mixed_precision)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    plain = Trainer(net, tokens, settings)
    pruning = Trainer(net, tokens, settings, imp, pruner)
    pruning.opt, pruning.sched = plain.opt, plain.sched  # one optimiser: only the pruning work differs
    if args.compile:
        from slimtune.training.compile import compile_layers

        compile_layers(net)
    times = {"lora": [], "loraprune": []}

    def one_step(name: str, trainer: Trainer, step: int) -> None:
        trainer.step = step
        if name == "lora":  # a plain LoRA step: the pruner's gates off, as in a run without pruning
            with pruner.gates.paused():
                trainer.train_step()
        else:
            trainer.train_step()
            pruner.step(step + 1)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        one_step("lora", plain, 0)
        one_step("loraprune", pruning, 0)
    sync()
    warmup_seconds = time.perf_counter() - t0
    print(f"warm-up: {warmup_seconds:.1f} s", flush=True)
    step = 0
    for _ in range(args.rounds):
        for name, trainer in (("lora", plain), ("loraprune", pruning)):
            for _ in range(args.steps):
                sync()
                t0 = time.perf_counter()
                one_step(name, trainer, step)
                sync()
                times[name].append(time.perf_counter() - t0)
                step += 1
            print(name, times[name][-args.steps:], flush=True)
    ratio = median(times["loraprune"]) / median(times["lora"])
    tokens_per_step = args.batch_size * args.seq_len
    write(args.name, {
        "setup": {"batch_size": args.batch_size, "seq_len": args.seq_len, "steps_per_block": args.steps, "rounds": args.rounds,
                  "prune_every": 10, "lora": "r8 alpha16 all 7 projections", "device": str(device),
                  "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "mixed_precision": args.mixed_precision, "compile": args.compile, "stack_mib": args.stack_mib, "warmup_steps_each": args.warmup,
                  "lora_step": "the pruner's gates paused: a plain LoRA step"},
        "warmup_seconds": warmup_seconds,
        "train_tokens_per_second": {k: tokens_per_step / median(v) for k, v in times.items()},
        "step_seconds": times,
        "median_step_seconds": {k: median(v) for k, v in times.items()},
        "ratio_loraprune_over_lora": ratio, "target": "ratio <= 1.15",
        "final_sparsity_reached": float(pruner.current),
    })


if __name__ == "__main__":
    main()
