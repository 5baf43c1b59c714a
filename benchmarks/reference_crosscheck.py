"""Our Wanda and SparseGPT against an independent implementation on the same model and text (issue 10).

The independent implementation is llm-compressor's (vLLM's compression library; its SparseGPT and
Wanda modifiers follow the papers' reference code). Its pins differ from ours, so it lives in its
own environment, and this script runs it there as a subprocess (`_llmcompressor_run.py`):

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    python benchmarks/reference_crosscheck.py --reference-python /tmp/llmc/bin/python [--patterns 0.5 2:4]

Both sides prune every decoder projection of the bundled model in all layers (no excluded layers,
lm_head dense) to the same per-projection pattern, layer by layer, each layer calibrated on the
outputs of the already-pruned earlier layers, from the same 32 x 256 calibration tokens (the
quick preset's 16 batches of 2 x 256 of the train split). Both pruned models are evaluated here,
by the same code: Wikipedia test windows (16 x 256) and the Lee news corpus (16 x 512). Also
recorded: the measured sparsity, and the share of weights where the two masks agree.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import write  # noqa: E402
from default_run import news_windows  # noqa: E402

from slimtune.data import batch_at, load_tokens  # noqa: E402
from slimtune.evaluate import perplexity  # noqa: E402
from slimtune.models import get_arch, load_model  # noqa: E402
from slimtune.models.source import resolve_model_path  # noqa: E402
from slimtune.pruning.layerwise import prune_layerwise  # noqa: E402
from slimtune.pruning.weight_selection import parse_nm  # noqa: E402

CALIB_BATCHES, BATCH, SEED = 16, 2, 0


def _projections(model) -> dict[str, torch.Tensor]:
    spec = get_arch(model)
    return {f"{spec.layers}.{i}.{p}.weight": layer.get_submodule(p).weight.detach()
            for i, layer in enumerate(spec.decoder_layers(model)) for p in spec.projections()}


def _sparsity(weights: dict[str, torch.Tensor]) -> float:
    return sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())


def _agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    same = sum(int(((a[k] == 0) == (b[k] == 0)).sum()) for k in a)
    return same / sum(w.numel() for w in a.values())


def _evaluate(model, wiki, news) -> dict:
    return {"wiki_test_256": perplexity(model, wiki, progress=False)["perplexity"],
            "news_512": perplexity(model, news, progress=False)["perplexity"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference-python", required=True, help="python of an environment with llmcompressor")
    ap.add_argument("--patterns", nargs="+", default=["0.5", "2:4"])
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--calib-batches", type=int, default=CALIB_BATCHES, help="batches of 2 x 256 tokens (16 as the quick preset)")
    ap.add_argument("--no-write", action="store_true", help="print the rows only (a trial run)")
    args = ap.parse_args()
    dense, tok = load_model("default")
    model_dir = resolve_model_path("default")
    train = load_tokens("wiki", tok, "train", 256)
    calib = torch.cat([batch_at(train, BATCH, SEED + 1, b) for b in range(args.calib_batches)])
    wiki = load_tokens("wiki", tok, "test", 256, max_sequences=16)
    news = news_windows(tok, 512, 16)
    rows, script = [], Path(__file__).with_name("_llmcompressor_run.py")
    with tempfile.TemporaryDirectory() as tmp:
        calib_path = Path(tmp) / "calib.pt"
        torch.save(calib, calib_path)
        for pattern in args.patterns:
            nm = parse_nm(pattern) if ":" in pattern else None
            for method in args.methods:
                ours = copy.deepcopy(dense)
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                prune_layerwise(ours, calib, method, 0.0 if nm else float(pattern), nm=nm, excluded=set(),
                                batch_size=BATCH, progress=False)
                ours_seconds = time.perf_counter() - t0
                out = Path(tmp) / f"{method}_{pattern.replace(':', '-')}.safetensors"
                done = subprocess.run([args.reference_python, str(script), str(model_dir), str(calib_path), str(out),
                                       "--method", method, "--pattern", pattern], capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"llm-compressor run failed:\n{done.stderr[-3000:]}")
                ref_info = json.loads(done.stdout.strip().splitlines()[-1])
                ref = copy.deepcopy(dense)
                missing = set(_projections(ref)) - set(weights := load_file(out))
                if missing:
                    sys.exit(f"llm-compressor output lacks {sorted(missing)[:3]}")
                ref.load_state_dict(weights, strict=False)
                w_ours, w_ref = _projections(ours), _projections(ref)
                row = {"method": method, "pattern": pattern, "load_avg_1m": load,
                       "ours": {**_evaluate(ours, wiki, news), "sparsity": _sparsity(w_ours), "oneshot_seconds": ours_seconds},
                       "llmcompressor": {**_evaluate(ref, wiki, news), "sparsity": _sparsity(w_ref),
                                         "oneshot_seconds": ref_info["oneshot_seconds"]},
                       "mask_agreement": _agreement(w_ours, w_ref)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                del ours, ref
    if args.no_write:
        return
    version = subprocess.run([args.reference_python, "-c", "from importlib.metadata import version; print(version('llmcompressor'))"],
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
    write("reference_crosscheck", {"dense": _evaluate(dense, wiki, news), "rows": rows,
                                   "reference": f"llmcompressor {version}",
                                   "calibration": f"{args.calib_batches * BATCH} x 256 tokens of the train split, the same ids on both sides",
                                   "note": "all 30 layers pruned on both sides, lm_head dense; evaluated by the same slimtune code"})


if __name__ == "__main__":
    main()
