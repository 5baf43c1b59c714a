"""LoRAPrune vs the usual alternatives at equal fine-tuning budget (issue 4, benchmark 1).

    python benchmarks/loraprune_quality.py [--steps 40] [--sparsities 0.2 0.5]

All runs: bundled SmolLM2-135M, bundled Wikipedia train split, heads + channels (KV groups),
local ranking, LoRA r 8 / alpha 16 on all seven projections, the same optimiser steps, batches,
learning rate and seed.
  (a) loraprune  progressive, importance from LoRA gradients (LoRAPrune)
  (b) taylor     one-shot full-gradient Taylor, then LoRA recovery (the LLM-Pruner recipe)
  (c) grad       progressive, importance from the true weight gradient
  (d) magnitude  one-shot magnitude, then LoRA recovery
The 50% LoRAPrune model is kept in $TMPDIR/slimtune-bench/loraprune_50 for benchmarks/result_speed.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write  # noqa: E402

from slimtune.pruning.pruner import PruneSettings  # noqa: E402
from slimtune.recipe import PruneJob, _evaluate, run_prune  # noqa: E402
from slimtune.training.loop import TrainSettings  # noqa: E402

KEEP = Path(tempfile.gettempdir()) / "slimtune-bench" / "loraprune_50"
METHODS = {"a_loraprune": "loraprune", "b_taylor_then_lora": "taylor", "c_grad_progressive": "grad", "d_magnitude_then_lora": "magnitude"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--name", default="loraprune_quality")
    ap.add_argument("--update", action="store_true", help="replace only these methods' rows in the existing JSON")
    args = ap.parse_args()
    base = dict(seq_len=args.seq_len, eval_windows=16, latency_seq_len=512, latency_repeats=3, decode_tokens=16, calib_batches=4)
    from slimtune.data import load_tokens
    from slimtune.models import load_model

    model, tok = load_model("default")
    dense = _evaluate(model, load_tokens("wiki", tok, "test", args.seq_len, max_sequences=16), PruneJob(**base), "dense", False)
    del model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in args.sparsities:
            for label in args.methods:
                crit = METHODS[label]
                train = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, checkpoint_every=0)
                prune = PruneSettings(sparsity=sparsity, granularity="heads,channels", prune_every=max(1, args.steps // 10))
                out = Path(tmp) / f"{label}_{sparsity}"
                job = PruneJob(criterion=crit, out=str(out), overwrite=True, evaluate_dense=False, prune=prune, train=train,
                               recover_steps=args.steps, **base)
                job.command = (f"slimtune prune --criterion {crit} --sparsity {sparsity} --steps {args.steps} "
                               f"--batch-size {args.batch_size} --seq-len {args.seq_len} --lr {args.lr}")
                t0 = time.time()
                report = run_prune(job, progress=False)
                after = report["after"]
                rows.append({
                    "method": label, "criterion": crit, "sparsity": sparsity, "achieved": report["sparsity"]["achieved"],
                    "perplexity": after["perplexity"], "params_total": after["params_total"],
                    "prefill_ms_median": after["prefill_ms"], "decode_tok_s_median": after["decode_tok_s"],
                    "final_train_loss": sum(h["loss"] for h in report["history"][-5:]) / max(1, len(report["history"][-5:])),
                    "skipped_importance_updates": report["importance_skipped_updates"], "wall_seconds": time.time() - t0,
                    "command": job.command,
                })
                print(rows[-1], flush=True)
                if crit == "loraprune" and sparsity == 0.5:  # input of benchmarks/result_speed.py
                    shutil.rmtree(KEEP, ignore_errors=True)
                    shutil.copytree(out, KEEP)
    from _common import command

    history = [command()]
    if args.update:
        import json

        from _common import RESULTS

        old = json.loads((RESULTS / f"{args.name}.json").read_text())
        history = old.get("invocations", [old["command"]]) + history
        rerun = {(r["method"], r["sparsity"]) for r in rows}
        rows = [r for r in old["results"] if (r["method"], r["sparsity"]) not in rerun] + rows
        rows.sort(key=lambda r: (r["sparsity"], r["method"]))
    write(args.name, {
        "setup": {**base, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "lora": "r8 alpha16 all 7 projections",
                  "granularity": "heads,channels (kv_groups), local", "seeds": 1},
        "dense": {k: dense[k] for k in ("perplexity", "params_total", "prefill_ms", "decode_tok_s")},
        "results": rows,
        "invocations": history,
    })


if __name__ == "__main__":
    main()
