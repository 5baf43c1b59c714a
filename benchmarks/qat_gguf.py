"""W4 group-32 quantisation of the bundled model (issue 11): round-to-nearest against quantisation-
aware LoRA fine-tuning (fake-quant, LSQ, LSQ+) and against pruning + LSQ in one pass, each scored in
slimtune and in a real llama.cpp on the same windows, with GGUF size and llama.cpp speed.

    python benchmarks/qat_gguf.py [--variants dense rtn lora fake lsq lsq+ prune20_lsq] [--steps N]

- dense: the fp32 model in slimtune; its f16 GGUF in llama.cpp.
- rtn: llama.cpp's own Q4_0 rounding of the dense weights (`export_gguf(dtype="q4_0")`, which
  reproduces llama.cpp's bytes); slimtune scores the same file de-quantised (`gguf_state_dict`).
- lora: the same LoRA fine-tuning without quantisation or pruning (f16 GGUF): the bundled model is an
  instruct model, and fine-tuning it on plain text lowers plain-text perplexity by itself, so the
  QAT rows are to be read against this row as well as against dense.
- fake / lsq / lsq+ / prune20_lsq: one `slimtune prune ... --export gguf` process each (quick
  preset: 2 x 256-token batches). slimtune scores the saved Hugging Face weights (the de-quantised
  trained codes, what the fake-quant forward computed); llama.cpp scores the model.gguf next to it
  (the trained codes and scales, Q4_0, or Q4_1 for the affine LSQ+).

Perplexity: 16 evenly spaced 512-token windows of the Wikipedia test split and of the Lee news
corpus (another domain). llama.cpp (xllamacpp wheel) runs every decoder layer; the final
hidden @ output matrix is done in float32 (see slimtune/evaluate/llamacpp.py). Speed: llama.cpp
prompt (256 tokens) and generation (64 tokens) tokens/s, medians of 3, all cores of this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write  # noqa: E402
from default_run import news_windows  # noqa: E402

WINDOWS = 16
CLI = {
    "lora": ["--sparsity", "0"],  # the same LoRA fine-tuning without quantisation: what the fine-tuning alone does
    "fake": ["--sparsity", "0", "--quant", "w4g32", "--quantizer", "fake"],
    "lsq": ["--sparsity", "0", "--quant", "w4g32", "--quantizer", "lsq"],
    "lsq+": ["--sparsity", "0", "--quant", "w4g32a", "--quantizer", "lsq+"],
    "prune20_lsq": ["--sparsity", "0.2", "--quant", "w4g32", "--quantizer", "lsq"],
}


def _windows(tok) -> dict:
    from slimtune.data import load_tokens

    return {"wiki_512": load_tokens("wiki", tok, "test", 512, max_sequences=WINDOWS), "news_512": news_windows(tok, 512, WINDOWS)}


def _score(model, gguf_path: Path, windows: dict, speed: bool) -> dict:
    from slimtune.evaluate import perplexity
    from slimtune.evaluate.llamacpp import llamacpp_perplexity, llamacpp_speed

    out = {"gguf_bytes": gguf_path.stat().st_size}
    for name, tokens in windows.items():
        out[f"slimtune_{name}"] = perplexity(model, tokens, progress=False)["perplexity"]
        out[f"llamacpp_{name}"] = llamacpp_perplexity(gguf_path, tokens, progress=False)["perplexity"]
        out[f"agreement_{name}"] = out[f"llamacpp_{name}"] / out[f"slimtune_{name}"] - 1
    if speed:
        out["llamacpp_speed"] = llamacpp_speed(gguf_path)
    return out


def _baseline(variant: str, tmp: Path, windows: dict, speed: bool) -> dict:
    from slimtune.export.gguf import export_gguf, gguf_state_dict
    from slimtune.models import load_model

    model, tok = load_model("default")
    path = tmp / f"{variant}.gguf"
    t0 = time.perf_counter()
    export_gguf(model, tok, path, dtype="f16" if variant == "dense" else "q4_0")
    seconds = time.perf_counter() - t0
    if variant == "rtn":  # score in slimtune exactly what the file holds
        state, _ = gguf_state_dict(path)
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        model.load_state_dict(state, strict=False)
    return {"command": f"export_gguf(dtype={'f16' if variant == 'dense' else 'q4_0'})", "wall_seconds": seconds,
            **_score(model, path, windows, speed)}


def _trained(variant: str, tmp: Path, windows: dict, steps: int | None, speed: bool) -> dict:
    from slimtune.models import load_model

    out = tmp / variant
    args = [*CLI[variant], "--export", "gguf", "--preset", "quick", "--no-eval"] + (["--steps", str(steps)] if steps else [])
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "slimtune.cli", "prune", "--out", str(out), "--quiet", *args], check=True)
    wall = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())
    model, _ = load_model(str(out))
    return {"command": "slimtune prune " + " ".join(args), "wall_seconds": wall, "load_avg_1m": os.getloadavg()[0],
            "achieved_sparsity": report["sparsity"]["achieved"], "gguf": report.get("gguf"),
            **_score(model, out / "model.gguf", windows, speed)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["dense", "rtn", "lora", "fake", "lsq", "lsq+", "prune20_lsq"])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the quick preset's)")
    args = ap.parse_args()
    from slimtune.models import load_model

    path = RESULTS / "qat_gguf.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    rows = previous.get("variants", {})
    _, tok = load_model("default")
    windows = _windows(tok)
    speed_for = {"dense", "rtn", "prune20_lsq"}
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as tmp:
            if variant in ("dense", "rtn"):
                rows[variant] = _baseline(variant, Path(tmp), windows, variant in speed_for)
            else:
                rows[variant] = _trained(variant, Path(tmp), windows, args.steps, variant in speed_for)
        print(variant, json.dumps(rows[variant]), flush=True)
        write("qat_gguf", {"windows": WINDOWS, "variants": rows,
                           "note": "W4 group 32; slimtune and llama.cpp (xllamacpp wheel) score the same windows; one fresh process per trained variant on a 2-core CPU"})


if __name__ == "__main__":
    main()
