"""CPU speed of the pruned model vs dense (issue 4, benchmark 4).

    python benchmarks/result_speed.py [--pruned DIR] [--repeats 7]

Loads the dense bundled model and a pruned directory (default: the 50% LoRAPrune model left by
benchmarks/loraprune_quality.py) with plain `AutoModelForCausalLM.from_pretrained`, then times
prefill (1 x 512, use_cache=False) and greedy decoding (32 new tokens after a 32-token prompt),
alternating dense and pruned on every repeat. Medians.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pruned", default=str(Path(tempfile.gettempdir()) / "slimtune-bench" / "loraprune_50"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    import slimtune  # noqa: F401  (per-layer model types)
    from slimtune.evaluate import count_parameters, decode_throughput, prefill_latency
    from slimtune.models import bundled_model_dir

    models = {"dense": AutoModelForCausalLM.from_pretrained(bundled_model_dir()).eval(),
              "pruned": AutoModelForCausalLM.from_pretrained(args.pruned).eval()}
    prefill = {k: [] for k in models}
    decode = {k: [] for k in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            prefill[name].append(prefill_latency(model, args.seq_len, repeats=1, warmup=1)["median_ms"])
            decode[name].append(decode_throughput(model, prompt_len=32, new_tokens=32, repeats=1, warmup=0)["median_tok_s"])
        print({k: v[-1] for k, v in prefill.items()}, {k: v[-1] for k, v in decode.items()}, flush=True)
    med_p = {k: median(v) for k, v in prefill.items()}
    med_d = {k: median(v) for k, v in decode.items()}
    write("result_speed", {
        "setup": {"prefill": f"1 x {args.seq_len}, use_cache=False", "decode": "32 new tokens after 32-token prompt, greedy, KV cache",
                  "repeats": args.repeats, "pruned_dir": args.pruned,
                  "pruned_report_sparsity": __import__("json").loads((Path(args.pruned) / "report.json").read_text())["sparsity"]},
        "params": {k: count_parameters(m)["total"] for k, m in models.items()},
        "prefill_ms": prefill, "decode_tok_s": decode,
        "median_prefill_ms": med_p, "median_decode_tok_s": med_d,
        "prefill_ratio_pruned_over_dense": med_p["pruned"] / med_p["dense"],
        "decode_ratio_pruned_over_dense": med_d["pruned"] / med_d["dense"],
        "target": "prefill ratio <= 0.65",
    })


if __name__ == "__main__":
    main()
