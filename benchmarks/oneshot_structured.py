"""Structured one-shot Taylor at 20% (issue 10): which choices matter against LLM-Pruner's quality.

    python benchmarks/oneshot_structured.py

No recovery. Varies the calibration size (batches of 2 x 256 tokens), element-wise vs vector-wise
Taylor, and the pruned layer range (our default keeps the first 3 and the last layer; LLM-Pruner's
block-wise setting for 32-layer LLaMA keeps the first 4 and the last 2, i.e. about 1/8 and 1/16).
Perplexity on 16 evenly spaced 512-token windows of the Wikipedia test split and of the Lee news
corpus; calibration wall time with the load average.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write  # noqa: E402
from default_run import news_windows  # noqa: E402

import slimtune  # noqa: E402
from slimtune.config import OneShotConfig  # noqa: E402
from slimtune.data import load_tokens  # noqa: E402
from slimtune.evaluate import perplexity  # noqa: E402
from slimtune.models import load_model  # noqa: E402
from slimtune.pruning.pruner import PruneSettings  # noqa: E402
from slimtune.training.loop import TrainSettings  # noqa: E402

LLMPRUNER_RANGE = [0, 1, 2, 3, 28, 29]
HC = {"granularity": "heads,channels"}  # the default granularity when the first rows ran
# (name, criterion, calib batches, excluded layers or None for the default, other PruneSettings)
CASES = [
    ("taylor_calib4", "taylor", 4, None, HC),
    ("taylor_calib16", "taylor", 16, None, HC),
    ("taylor_calib32", "taylor", 32, None, HC),
    ("taylor_vector_calib16", "taylor_vector", 16, None, HC),
    ("taylor2_calib16", "taylor2", 16, None, HC),
    ("taylor_calib16_llmpruner_range", "taylor", 16, LLMPRUNER_RANGE, HC),
    ("fisher_calib4", "fisher", 4, None, HC),
    ("fisher_calib16", "fisher", 16, None, HC),
    ("fisher_calib32", "fisher", 32, None, HC),
    ("fisher_calib16_channels_only", "fisher", 16, None, {"granularity": "channels"}),
    ("fisher_calib16_q_heads", "fisher", 16, None, {**HC, "head_mode": "q_heads"}),
    ("fisher_calib16_llmpruner_range", "fisher", 16, LLMPRUNER_RANGE, HC),
    ("fisher_calib16_heads_normalise_none", "fisher", 16, None, {**HC, "normalise": "none"}),
    ("fisher_calib16_channels_only_normalise_none", "fisher", 16, None, {"granularity": "channels", "normalise": "none"}),
    ("fisher_calib16_channels_only_llmpruner_range", "fisher", 16, LLMPRUNER_RANGE, {"granularity": "channels"}),
    ("taylor_calib16_channels_only", "taylor", 16, None, {"granularity": "channels"}),
    ("taylor_calib4_channels_only", "taylor", 4, None, {"granularity": "channels"}),
]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="*", default=None, help="names of CASES to run (default: all); results merge into the JSON")
    args = ap.parse_args()
    path = Path(__file__).parent / "results" / "oneshot_structured.json"
    old = {r["name"]: r for r in json.loads(path.read_text())["rows"]} if args.cases and path.is_file() else {}
    dense, tok = load_model("default")
    train = load_tokens("wiki", tok, "train", 256)
    wiki = load_tokens("wiki", tok, "test", 512, max_sequences=16)
    news = news_windows(tok, 512, 16)
    rows = old or {"dense": {"name": "dense", "wiki_512": perplexity(dense, wiki, progress=False)["perplexity"],
                             "news_512": perplexity(dense, news, progress=False)["perplexity"]}}
    for name, crit, calib, excluded, extra in CASES:
        if args.cases and name not in args.cases:
            continue
        model = copy.deepcopy(dense)
        config = OneShotConfig(criterion=crit, calib_batches=calib, recover_steps=0, train=TrainSettings(checkpoint_every=0),
                               prune=PruneSettings(sparsity=0.2, exclude_layers=excluded, **extra))
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        result = slimtune.prune_(model, config, train, progress=False)
        row = {"name": name, "criterion": crit, "calib_batches": calib, "excluded": excluded, **extra, "seconds": time.perf_counter() - t0,
               "load_avg_1m": load, "achieved": result.sparsity["achieved"],
               "wiki_512": perplexity(model, wiki, progress=False)["perplexity"],
               "news_512": perplexity(model, news, progress=False)["perplexity"]}
        rows[name] = row
        print(json.dumps(row), flush=True)
        write("oneshot_structured", {"rows": list(rows.values()), "note": "20% of decoder parameters, heads (KV groups) + channels, local ranking, no recovery; 16 windows of 512 tokens"})


if __name__ == "__main__":
    main()
