"""Unstructured and N:M pruning of the bundled model (issue 10): magnitude, Wanda, SparseGPT and
LoRAPrune-unstructured at 50%, 2:4 and 4:8.

    python benchmarks/oneshot_sparse.py [--patterns 0.5 2:4 4:8] [--methods magnitude wanda sparsegpt loraprune]

For each one-shot method: one-shot test perplexity and the wall time of the pruning pass, then the
same model after the quick preset's LoRA recovery budget (24 steps of 2 x 256 tokens) with the masks
held on the merged weight, and the measured sparsity of the recovered model's projections. LoRAPrune
prunes while it trains, so it has only the after-recovery figure (same 24 steps). Calibration: 16
batches of 2 x 256 tokens of the train split (8K tokens). Perplexity: 16 evenly spaced windows of
256 tokens of the Wikipedia test split, and 16 windows of 512 tokens of the Lee news corpus (another
domain, never used for anything else). The CPU load average is recorded next to every wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write  # noqa: E402
from default_run import news_windows  # noqa: E402

import slimtune  # noqa: E402
from slimtune.config import LayerwiseConfig, LoRAPruneConfig, OneShotConfig  # noqa: E402
from slimtune.data import load_tokens  # noqa: E402
from slimtune.evaluate import perplexity  # noqa: E402
from slimtune.models import get_arch, load_model  # noqa: E402
from slimtune.pruning.pruner import PruneSettings  # noqa: E402
from slimtune.training.loop import TrainSettings  # noqa: E402


def _prune_settings(pattern: str) -> PruneSettings:
    if ":" in pattern:
        return PruneSettings(granularity="nm", nm=pattern)
    return PruneSettings(granularity="unstructured", sparsity=float(pattern))


def _config(method: str, pattern: str, steps: int):
    train = TrainSettings(checkpoint_every=0)
    prune = _prune_settings(pattern)
    if method == "loraprune":
        return LoRAPruneConfig(prune=prune, train=train)
    if method == "magnitude":
        return OneShotConfig(criterion="magnitude", prune=prune, train=train, recover_steps=steps)
    return LayerwiseConfig(criterion=method, prune=prune, train=train, recover_steps=steps)


def _sparsity(model) -> float:
    spec = get_arch(model)
    zeros = total = 0
    for layer in spec.decoder_layers(model):
        for path in spec.projections():
            w = layer.get_submodule(path).weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total


def _evaluate(model, wiki, news) -> dict:
    return {"wiki_test_256": perplexity(model, wiki, progress=False)["perplexity"],
            "news_512": perplexity(model, news, progress=False)["perplexity"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patterns", nargs="+", default=["0.5", "2:4", "4:8"])
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "loraprune"])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--update", action="store_true", help="merge into the existing JSON instead of replacing it")
    ap.add_argument("--recover", nargs="*", default=None, help="method:pattern pairs to recover (default: all)")
    args = ap.parse_args()
    dense, tok = load_model("default")
    train = load_tokens("wiki", tok, "train", 256)
    wiki = load_tokens("wiki", tok, "test", 256, max_sequences=16)
    news = news_windows(tok, 512, 16)
    path = RESULTS / "oneshot_sparse.json"
    old = json.loads(path.read_text()) if args.update and path.is_file() else {}
    rows = {(r["method"], r["pattern"]): r for r in old.get("rows", [])}
    dense_ppl = old.get("dense") or _evaluate(dense, wiki, news)
    for pattern in args.patterns:
        for method in args.methods:
            row = {"method": method, "pattern": pattern}
            if method != "loraprune":
                model = copy.deepcopy(dense)
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                slimtune.prune_(model, _config(method, pattern, 0), train, progress=False)
                row.update(oneshot_seconds=time.perf_counter() - t0, load_avg_1m=load, oneshot=_evaluate(model, wiki, news),
                           oneshot_sparsity=_sparsity(model))
                del model
            if args.recover is not None and f"{method}:{pattern}" not in args.recover:
                rows[(method, pattern)] = row
                write("oneshot_sparse", {"dense": dense_ppl, "rows": list(rows.values()), "recovery_steps": args.steps,
                                         "calibration": "16 batches x 2 x 256 tokens (train split)",
                                         "note": "sparsity is of the decoder projections (what is masked); shared 2-core CPU, load average recorded"})
                continue
            model = copy.deepcopy(dense)
            torch.manual_seed(0)
            t0 = time.perf_counter()
            slimtune.prune_(model, _config(method, pattern, args.steps), train, progress=False)
            row.update(recovered_seconds=time.perf_counter() - t0, recovered=_evaluate(model, wiki, news),
                       recovered_sparsity=_sparsity(model))
            del model
            rows[(method, pattern)] = row
            print(json.dumps(row), flush=True)
            write("oneshot_sparse", {"dense": dense_ppl, "rows": list(rows.values()), "recovery_steps": args.steps,
                                     "calibration": "16 batches x 2 x 256 tokens (train split)",
                                     "note": "sparsity is of the decoder projections (what is masked); shared 2-core CPU, load average recorded"})


if __name__ == "__main__":
    main()
