"""The standard preset on a GPU: LoRAPrune with and without distillation against Taylor + recovery,
the true-gradient variant and mask_fisher (issue 9), each a fresh `slimtune prune` process.

    python benchmarks/standard_preset.py                    # all variants side by side on one GPU
    python benchmarks/standard_preset.py --only loraprune,taylor --deadline 400

Every variant runs `slimtune prune --preset standard --mixed-precision bf16` (200 steps of
8 x 512 tokens, channels at 20%), the runs side by side on the one GPU, so their wall times are
those of a shared GPU, not of a run alone (benchmarks/loraprune_overhead.py times steps alone).
Each saved model is evaluated as its run finishes: the Wikipedia test split at 256- and
512-token windows and the news corpus that slimtune never trains on (default_run.py), `--windows`
evenly spaced windows each. Runs still going at `--deadline` seconds are stopped and recorded so.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import STANDARD_OPTIONS as COMMON  # noqa: E402
from _common import write  # noqa: E402
from default_run import evaluate  # noqa: E402

VARIANTS = {
    "loraprune": [],
    "loraprune_distill": ["--distill"],
    "taylor": ["--criterion", "taylor"],
    "grad": ["--criterion", "grad"],
    "mask_fisher": ["--criterion", "mask_fisher"],
    "loraprune_lora_plus": ["--lora-plus-ratio", "16"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--windows", type=int, default=64, help="evaluation windows per set (the standard preset's --eval-windows)")
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds after which unfinished runs are stopped")
    ap.add_argument("--name", default="standard_preset_gpu")
    ap.add_argument("--copy-to", help="also copy the results JSON into this folder after every update")
    ap.add_argument("extra", nargs="*", help="more `slimtune prune` options for every variant (after --), e.g. a smoke test's --steps 1")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    results: dict[str, dict] = {}
    dense: dict = {}

    def save() -> None:  # after every evaluation: a run stopped from outside keeps what was measured
        for row in results.values():
            if "perplexity" in row and dense:
                row["vs_dense"] = {k: v / dense[k] for k, v in row["perplexity"].items()}
        path = write(args.name, {
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "windows": args.windows, "dense": dense, "variants": {n: results[n] for n in names if n in results}, "deadline_seconds": args.deadline,
            "note": "runs side by side on one GPU (wall times are shared-GPU times); perplexity of each saved model, evaluated as it finished",
        })
        if args.copy_to:
            shutil.copy(path, Path(args.copy_to) / path.name)

    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        start = time.perf_counter()
        for name in names:
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "slimtune.cli", "prune", "--out", str(out), "--device", args.device, *COMMON, *VARIANTS[name], *args.extra]
            log = open(Path(tmp) / f"{name}.log", "w")
            procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out, log)
        dense.update(evaluate("default", args.windows, args.device))  # while the runs load
        save()

        def collect(name: str, seconds: float | None) -> None:
            proc, out, log = procs[name]
            log.close()
            row = {"command": shlex.join(["slimtune", "prune", *COMMON, *VARIANTS[name], *args.extra]), "wall_seconds_shared_gpu": seconds}
            report = out / "report.json"
            if proc.returncode == 0 and report.is_file():
                rep = json.loads(report.read_text())
                row.update(achieved_sparsity=rep["sparsity"]["achieved"], train_peak_memory_mib=rep.get("train_memory", {}).get("peak_delta_mb"))
                row["perplexity"] = evaluate(str(out), args.windows, args.device)
            else:
                row["failed"] = "stopped at the deadline" if seconds is None else f"exit {proc.returncode}"
                row["log_tail"] = (Path(tmp) / f"{name}.log").read_text()[-2000:]
            results[name] = row
            print(name, row.get("perplexity", row.get("failed")), flush=True)
            save()

        while len(results) < len(procs) and time.perf_counter() - start < args.deadline:
            for name, (proc, _, _) in procs.items():
                if name not in results and proc.poll() is not None:
                    collect(name, time.perf_counter() - start)
            time.sleep(1.0)
        for name, (proc, _, _) in procs.items():
            if name not in results:
                proc.kill()
                proc.wait()
                collect(name, None)


if __name__ == "__main__":
    main()
