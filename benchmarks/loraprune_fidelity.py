"""How well do LoRA-gradient scores rank units like true-gradient scores, as training goes on?

    python benchmarks/loraprune_fidelity.py [--steps 40]

A diagnostic for the quality benchmark. One LoRA fine-tuning run on the bundled model (the same
settings as benchmarks/loraprune_quality.py); after every backward, two LoRAPruneImportance
objects observe the *same* gradients: one estimates from the LoRA gradients (metric lora), one
uses the true weight gradient (metric grad). At a few steps we report the Spearman rank
correlation of their EMA unit scores (heads and MLP channels of every layer), and |B|, which
controls how much of the gradient the estimate can see: with B = 0 the estimate is s·G·AᵀA, a
rank-r projection of G (docs/architecture.md, "LoRA-gradient importance").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, write  # noqa: E402


def _rank(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _rank(a.double()), _rank(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm() + 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--report-at", type=int, nargs="+", default=[1, 5, 10, 20, 40])
    ap.add_argument("--lr", type=float, default=5e-4)
    args = ap.parse_args()
    from slimtune.adapters import LoraSettings, attach_lora, lora_pairs, lora_weights
    from slimtune.data import load_tokens
    from slimtune.importance.loraprune import LoRAPruneImportance, enable_full_grad
    from slimtune.models import load_model
    from slimtune.training.loop import Trainer, TrainSettings

    torch.manual_seed(0)
    model, tok = load_model("default")
    tokens = load_tokens("wiki", tok, "train", 256)
    net = attach_lora(model, LoraSettings())
    lora_imp = LoRAPruneImportance(net, metric="lora")
    grad_imp = LoRAPruneImportance(net, metric="grad")

    class Both:
        def observe(self, m):
            lora_imp.observe(m)
            grad_imp.observe(m)

    trainer = Trainer(net, tokens, TrainSettings(steps=args.steps, batch_size=2, lr=args.lr, checkpoint_every=0), Both(), None)
    enable_full_grad(net)  # after the Trainer took the LoRA parameters: W0 gets .grad, is never trained
    rows = []
    for step in range(1, args.steps + 1):
        trainer.train_step()
        if step in args.report_at:
            a, b = lora_imp.unit_scores(), grad_imp.unit_scores()
            heads = [spearman(x["heads"], y["heads"]) for x, y in zip(a, b)]
            chans = [spearman(x["channels"], y["channels"]) for x, y in zip(a, b)]
            b_norm = median([float(lora_weights(m)[1].norm()) for _, _, m in lora_pairs(net)])
            rows.append({"step": step, "spearman_heads_median": median(heads), "spearman_channels_median": median(chans),
                         "lora_B_norm_median": b_norm})
            print(rows[-1], flush=True)
    write("loraprune_fidelity", {"setup": {"steps": args.steps, "batch": "2 x 256", "lr": args.lr, "lora": "r8 alpha16 all 7 projections"},
                                 "results": rows})


if __name__ == "__main__":
    main()
