"""How well do LoRA-gradient scores rank units like true-gradient scores, as training goes on?

    python benchmarks/loraprune_fidelity.py [--steps 40] [--lora-variant adalora --name loraprune_fidelity_adalora]

A diagnostic for the quality benchmark. One LoRA fine-tuning run on the bundled model (the same
settings as benchmarks/loraprune_quality.py); after every backward, two LoRAPruneImportance
objects observe the *same* gradients: one estimates from the LoRA gradients (metric lora), one
uses the true weight gradient (metric grad). At a few steps we report the Spearman rank
correlation of their EMA unit scores (heads and MLP channels of every layer), and |B|, which
controls how much of the gradient the estimate can see: with B = 0 the estimate is s·G·AᵀA, a
rank-r projection of G (docs/architecture.md, "LoRA-gradient importance").

With --lora-variant adalora the estimate is LoRAPrune's rule for three factors P·diag(λ)·Q, minus the
change of the product under one unit SGD step (`ThreeFactor` below). slimtune refuses that
combination; this measures why: λ starts at 0, and the median |λ| is reported instead of |B|.
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


def three_factor(net):
    """A LoRAPruneImportance whose estimate is Ĝ = P·D + G_P·((λ − G_λ) ⊙ (Q − G_Q)), D = G_λ⊙Q + λ⊙G_Q − G_λ⊙G_Q:
    BA − (B − G_B)(A − G_A) of LoRAPrune written for P·diag(λ)·Q (P = lora_B, λ = lora_E, Q = lora_A)."""
    from slimtune.adapters.lora import adapter_params
    from slimtune.importance.loraprune import LoRAPruneImportance

    class ThreeFactor(LoRAPruneImportance):
        def _gradient_and_weight(self, keys):
            self.metric = "magnitude"  # W = W0 + s·P·diag(λ)·Q from the library, the estimate here
            try:
                _, w = super()._gradient_and_weight(keys)
            finally:
                self.metric = "lora"
            params = [adapter_params(self._lora[k]) for k in keys]
            Q, E, P = (self._stack([ps[j] for ps in params]) for j in range(3))
            gQ, gE, gP = (self._stack([ps[j].grad for ps in params]) for j in range(3))
            d = gE * Q + E * gQ - gE * gQ
            return torch.bmm(P, d) + torch.bmm(gP, (E - gE) * (Q - gQ)), w

    imp = ThreeFactor(net, metric="magnitude")
    imp.metric = "lora"
    return imp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lora-variant", default="lora")
    ap.add_argument("--name", default="loraprune_fidelity")
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
    ada = args.lora_variant == "adalora"
    net = attach_lora(model, LoraSettings(variant=args.lora_variant), steps=args.steps)
    lora_imp = three_factor(net) if ada else LoRAPruneImportance(net, metric="lora")
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
            if ada:
                size = {"adalora_lambda_abs_median": median([float(m.lora_E["default"].detach().abs().median()) for _, _, m in lora_pairs(net)])}
            else:
                size = {"lora_B_norm_median": median([float(lora_weights(m)[1].norm()) for _, _, m in lora_pairs(net)])}
            rows.append({"step": step, "spearman_heads_median": median(heads), "spearman_channels_median": median(chans), **size})
            print(rows[-1], flush=True)
    lora = "r8 alpha16 all 7 projections" + (", AdaLoRA init_r 12, target 8" if ada else "")
    write(args.name, {"setup": {"steps": args.steps, "batch": "2 x 256", "lr": args.lr, "lora": lora, "variant": args.lora_variant},
                                 "results": rows})


if __name__ == "__main__":
    main()
