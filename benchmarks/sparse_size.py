"""On-disk size of the sparse copy (issue 10): the bundled model pruned at 50% unstructured, 2:4 and
4:8, saved dense (`save_model`) and sparse (`save_sparse`, compressed-tensors bitmask or sparse-24),
with the reload checked bit-exact.

    python benchmarks/sparse_size.py

The size depends on the pattern, not on which criterion chose the zeros, so one-shot magnitude
masks stand in for every method (fast: no calibration). Save and load wall times are medians of 3.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write  # noqa: E402

import slimtune  # noqa: E402
from slimtune.config import OneShotConfig  # noqa: E402
from slimtune.data import load_tokens  # noqa: E402
from slimtune.export import save_model  # noqa: E402
from slimtune.export.sparse import load_sparse, save_sparse  # noqa: E402
from slimtune.models import load_model  # noqa: E402
from slimtune.pruning.pruner import PruneSettings  # noqa: E402
from slimtune.training.loop import TrainSettings  # noqa: E402

REPEATS = 3


def _settings(pattern: str) -> PruneSettings:
    return PruneSettings(granularity="nm", nm=pattern) if ":" in pattern else PruneSettings(granularity="unstructured", sparsity=float(pattern))


def main() -> None:
    dense, tok = load_model("default")
    train = load_tokens("wiki", tok, "train", 256)
    rows = []
    for pattern in ("0.5", "2:4", "4:8"):
        model = copy.deepcopy(dense)
        result = slimtune.prune_(model, OneShotConfig(criterion="magnitude", prune=_settings(pattern), recover_steps=0,
                                             train=TrainSettings(checkpoint_every=0)), train, progress=False)
        saves, loads = [], []
        with tempfile.TemporaryDirectory() as tmp:
            dense_dir = save_model(model, Path(tmp) / "dense")
            dense_bytes = sum(f.stat().st_size for f in dense_dir.glob("*.safetensors"))
            for k in range(REPEATS):
                t0 = time.perf_counter()
                info = save_sparse(model, Path(tmp) / f"sparse{k}", masks=result.masks)  # the pruned projections only
                saves.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                back = load_sparse(Path(tmp) / f"sparse{k}")
                loads.append(time.perf_counter() - t0)
            reloaded = back.state_dict()
            exact = all(torch.equal(reloaded[key], v) for key, v in model.state_dict().items() if key in reloaded)
        row = {"pattern": pattern, "format": info["format"], "global_sparsity": info["global_sparsity"],
               "dense_file_bytes": dense_bytes, "sparse_weight_bytes": info["weight_bytes"], "ratio": info["weight_bytes"] / dense_bytes,
               "save_seconds_median": statistics.median(saves), "load_seconds_median": statistics.median(loads), "reload_bit_exact": exact}
        rows.append(row)
        print(row, flush=True)
    write("sparse_size", {"rows": rows, "repeats": REPEATS,
                          "note": "fp32 bundled model; decoder projections pruned (first 3 and last layer dense); sizes of the safetensors files"})


if __name__ == "__main__":
    main()
