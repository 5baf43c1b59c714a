"""One-shot structured pruning of the bundled model with each criterion (issue 3).

    python benchmarks/oneshot_criteria.py [--sparsities 0.2 0.5] [--repeats 5]

No recovery fine-tuning: this isolates the criterion. Heads + channels for element criteria,
whole layers for ShortGPT's Block Influence. Reports test perplexity (16 evenly spaced windows of
256 tokens of the bundled Wikipedia test split), achieved parameters, and CPU prefill latency
(1 x 512, median of --repeats) and decode throughput, dense vs pruned.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write  # noqa: E402

from slimtune.pruning.pruner import PruneSettings  # noqa: E402
from slimtune.recipe import PruneJob, _evaluate, run_prune  # noqa: E402

CRITERIA = [
    ("random", "heads,channels"),
    ("magnitude", "heads,channels"),
    ("l2", "heads,channels"),
    ("taylor", "heads,channels"),
    ("taylor2", "heads,channels"),
    ("taylor_vector", "heads,channels"),
    ("block_influence", "layers"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--criteria", nargs="+", default=[c for c, _ in CRITERIA])
    args = ap.parse_args()
    torch.manual_seed(0)
    base = dict(seq_len=256, eval_windows=16, latency_seq_len=512, latency_repeats=args.repeats, decode_tokens=16,
                calib_batches=4, recover_steps=0)
    from slimtune.data import load_tokens
    from slimtune.models import load_model

    model, tok = load_model("default")
    dense = _evaluate(model, load_tokens("wiki", tok, "test", 256, max_sequences=16), PruneJob(**base), "dense", False)
    del model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in args.sparsities:
            for crit, gran in CRITERIA:
                if crit not in args.criteria:
                    continue
                job = PruneJob(criterion=crit, out=str(Path(tmp) / "m"), overwrite=True, evaluate=True, evaluate_dense=False,
                               prune=PruneSettings(sparsity=sparsity, granularity=gran), **base)
                job.command = f"slimtune prune --criterion {crit} --granularity {gran} --sparsity {sparsity} --recover-steps 0 --calib-batches 4"
                try:
                    report = run_prune(job, progress=False)
                except Exception as exc:  # a criterion that fails is reported, not hidden
                    rows.append({"criterion": crit, "granularity": gran, "sparsity": sparsity, "error": str(exc)})
                    continue
                after = report["after"]
                rows.append({
                    "criterion": crit, "granularity": gran, "sparsity": sparsity,
                    "achieved": report["sparsity"]["achieved"],
                    "perplexity": after["perplexity"], "params_total": after["params_total"], "params_decoder": after["params_decoder"],
                    "prefill_ms_median": after["prefill_ms"], "prefill_ms_samples": after["details"]["prefill"]["samples_ms"],
                    "decode_tok_s_median": after["decode_tok_s"],
                    "prefill_vs_dense": after["prefill_ms"] / dense["prefill_ms"],
                })
                print(rows[-1], flush=True)
    write("oneshot_criteria", {
        "setup": {**base, "note": "one-shot, no recovery; calibration 4 batches x 2 x 256 train tokens; eval 16 x 256 test tokens"},
        "dense": {k: dense[k] for k in ("perplexity", "params_total", "params_decoder", "prefill_ms", "decode_tok_s")}
                 | {"prefill_ms_samples": dense["details"]["prefill"]["samples_ms"]},
        "results": rows,
    })


if __name__ == "__main__":
    main()
