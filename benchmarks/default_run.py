"""The default run, measured as a user sees it: wall time, then perplexity of the saved model on
the Wikipedia test split at 256- and 512-token windows and on text of another domain.

The other domain is the Lee news corpus that gensim ships (`lee_background.cor`: 300 Australian
news articles from 2001, one per line). slimtune never trains, calibrates or tunes on it; it is
read here only, as held-out text whose style differs from Wikipedia's.

    python benchmarks/default_run.py --variant default                     # `slimtune prune` as shipped
    python benchmarks/default_run.py --variant nodistill -- --distill-mix 0 # any extra CLI options after --

Each variant is one fresh `slimtune prune` process (the model is already converted in the cache);
results accumulate in benchmarks/results/default_run.json under their variant name.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write  # noqa: E402

WINDOWS = 16


def news_tokens(tokenizer, seq_len: int) -> torch.Tensor:
    from slimtune.data import pack

    root = Path(importlib.util.find_spec("gensim").submodule_search_locations[0])
    docs = [line.strip() for line in (root / "test/test_data/lee_background.cor").read_text().splitlines() if line.strip()]
    return pack(docs, tokenizer, seq_len)


def news_windows(tokenizer, seq_len: int, count: int = WINDOWS) -> torch.Tensor:
    """`count` evenly spaced windows of the news corpus: the held-out other-domain set every benchmark uses."""
    news = news_tokens(tokenizer, seq_len)
    return news[torch.linspace(0, news.shape[0] - 1, count).round().long()]


def evaluate(path: str, windows: int = WINDOWS, device: str = "cpu") -> dict:
    from slimtune.data import load_tokens
    from slimtune.evaluate import perplexity
    from slimtune.models import load_model

    model, tok = load_model(path, device=device)
    out = {}
    for seq_len in (256, 512):
        tokens = load_tokens("wiki", tok, "test", seq_len, max_sequences=windows)
        out[f"wiki_test_{seq_len}"] = perplexity(model, tokens)["perplexity"]
    out["news_512"] = perplexity(model, news_windows(tok, 512, windows))["perplexity"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", required=True)
    ap.add_argument("extra", nargs="*", help="options passed to slimtune prune (after --)")
    args = ap.parse_args()
    path = RESULTS / "default_run.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    variants = previous.get("variants", {})
    dense = previous.get("dense") or evaluate("default")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned"
        cmd = [sys.executable, "-m", "slimtune.cli", "prune", "--out", str(out), "--quiet", *args.extra]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        report = json.loads((out / "report.json").read_text())
        scores = evaluate(str(out))
    row = {
        "command": shlex.join(["slimtune", "prune", *args.extra]),
        "wall_seconds": wall,
        "achieved_sparsity": report["sparsity"]["achieved"],
        "train_peak_memory_mib": report.get("train_memory", {}).get("peak_delta_mb"),
        "perplexity": scores,
        "vs_dense": {k: v / dense[k] for k, v in scores.items()},
        "job": {k: report["job"][k] for k in ("seq_len", "preset")} | {"train": report["job"]["train"], "distill": report["job"].get("distill")},
    }
    print(json.dumps(row, indent=1))
    # read again: another variant may have finished while this one ran (runs can overlap)
    previous = json.loads(path.read_text()) if path.is_file() else {}
    variants = previous.get("variants", {})
    variants[args.variant] = row
    # "refused": rows of option sets slimtune has refused since they ran (kept as the evidence; no table row)
    refused = {"refused": previous["refused"]} if "refused" in previous else {}
    write("default_run", {"windows": WINDOWS, "dense": dense, "variants": variants, **refused,
                          "note": "one fresh `slimtune prune` process per variant on an otherwise shared 2-core CPU; perplexity of the saved model, evenly spaced windows"})


if __name__ == "__main__":
    main()
