"""Time of a LoRAPrune training step vs a plain LoRA step (issue 4, benchmark 3).

    python benchmarks/loraprune_overhead.py [--steps 8] [--rounds 3]

Same process, same model, batches and optimiser; rounds alternate plain and LoRAPrune blocks of
--steps steps so that machine noise hits both alike. A LoRAPrune step = the plain step +
LoRA-gradient importance (observe) + pruner.step, with a mask update every 10 steps as in the
official code (so masks change during the measured LoRAPrune blocks). Medians of per-step times.
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
    args = ap.parse_args()
    from slimtune.adapters import LoraSettings, attach_lora
    from slimtune.data import load_tokens
    from slimtune.importance.loraprune import LoRAPruneImportance
    from slimtune.models import load_model
    from slimtune.pruning.pruner import Pruner, PruneSettings
    from slimtune.training.loop import Trainer, TrainSettings

    torch.manual_seed(0)
    model, tok = load_model("default")
    tokens = load_tokens("wiki", tok, "train", args.seq_len)
    net = attach_lora(model, LoraSettings())
    total = 2 * args.rounds * args.steps
    imp = LoRAPruneImportance(net)
    pruner = Pruner(net, PruneSettings(sparsity=0.5, prune_every=10, warmup=0.0, cooldown=0.0), imp, total_steps=total)
    settings = TrainSettings(steps=total, batch_size=args.batch_size, checkpoint_every=0)
    plain = Trainer(net, tokens, settings)
    pruning = Trainer(net, tokens, settings, imp, pruner)
    pruning.opt, pruning.sched = plain.opt, plain.sched  # one optimiser: only the pruning work differs
    times = {"lora": [], "loraprune": []}
    plain.train_step()  # warm-up
    step = 0
    for _ in range(args.rounds):
        for name, trainer in (("lora", plain), ("loraprune", pruning)):
            for _ in range(args.steps):
                trainer.step = step
                t0 = time.perf_counter()
                trainer.train_step()
                if name == "loraprune":
                    pruner.step(step + 1)
                times[name].append(time.perf_counter() - t0)
                step += 1
            print(name, times[name][-args.steps:], flush=True)
    ratio = median(times["loraprune"]) / median(times["lora"])
    write("loraprune_overhead", {
        "setup": {"batch_size": args.batch_size, "seq_len": args.seq_len, "steps_per_block": args.steps, "rounds": args.rounds,
                  "prune_every": 10, "lora": "r8 alpha16 all 7 projections"},
        "step_seconds": times,
        "median_step_seconds": {k: median(v) for k, v in times.items()},
        "ratio_loraprune_over_lora": ratio, "target": "ratio <= 1.15",
        "final_sparsity_reached": float(pruner.current),
    })


if __name__ == "__main__":
    main()
