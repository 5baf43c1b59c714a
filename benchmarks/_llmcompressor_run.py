"""One-shot Wanda or SparseGPT with llm-compressor, for `reference_crosscheck.py`.

Runs in a separate environment that has llm-compressor (its pins differ from ours), so it imports
nothing from slimtune:

    PY -m pip install torch==2.13.0 llmcompressor
    PY benchmarks/_llmcompressor_run.py MODEL_DIR CALIB.pt OUT.safetensors --method sparsegpt --pattern 0.5

CALIB.pt holds the [n, L] calibration token ids that slimtune used, so both tools see the same
text. Every decoder projection is pruned (lm_head is left dense), layer after layer on the outputs
of the already-pruned earlier layers (llm-compressor's sequential pipeline). Prints one JSON line
with the wall time of the one-shot pass.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("out", help="a .safetensors file for the pruned decoder projections")
    ap.add_argument("--method", choices=("wanda", "sparsegpt"), required=True)
    ap.add_argument("--pattern", required=True, help="a sparsity such as 0.5, or n:m such as 2:4")
    args = ap.parse_args()
    tokens = torch.load(args.calib)
    n, length = tokens.shape
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": [[1] * length] * n})
    if ":" in args.pattern:
        kept, group = (int(x) for x in args.pattern.split(":"))
        sparsity, structure = 1 - kept / group, args.pattern
    else:
        sparsity, structure = float(args.pattern), "0:0"
    common = dict(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    modifier = (SparseGPTModifier(block_size=128, dampening_frac=0.01, **common) if args.method == "sparsegpt"
                else WandaPruningModifier(**common))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=[modifier], num_calibration_samples=n, max_seq_length=length,
            shuffle_calibration_samples=False, pipeline="sequential")
    seconds = time.perf_counter() - t0
    # only the decoder projections change; safetensors of those alone (the tied embedding would
    # make save_file refuse, and llm-compressor's own save would write its compressed layout)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if ".layers." in k and k.endswith("proj.weight")}
    save_file(weights, args.out)
    print(json.dumps({"method": args.method, "pattern": args.pattern, "oneshot_seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
