"""Prefill speed of 2:4-sparse projections on a GPU's sparse tensor cores against dense (issue 10).

    python benchmarks/sparse24_speed.py [--dtype float16] [--tokens 512 2048 8192] [--repeats 20]

Needs CUDA with compute capability >= 8.0 (it stops with one line elsewhere). The bundled model is
pruned 2:4 (magnitude: the speed depends on the pattern, not on which weights are kept), then:
- the decoder projections alone: every layer's 7 `F.linear` calls on [tokens, in] activations,
  dense weights against `torch.sparse.to_sparse_semi_structured` ones;
- the whole model's prefill (batch 1 x tokens, no KV cache), dense against converted.
Each figure is the median of --repeats timed runs after warm-up, with the device synchronised
around every run.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, write  # noqa: E402

from slimtune.errors import SlimtuneError  # noqa: E402
from slimtune.evaluate.speed import prefill_latency  # noqa: E402
from slimtune.export.semi_structured import check_semi_structured_device, to_semi_structured_  # noqa: E402
from slimtune.models import get_arch, load_model  # noqa: E402
from slimtune.pruning.layerwise import prune_layerwise  # noqa: E402


def _projections(model) -> list[torch.Tensor]:
    spec = get_arch(model)
    return [layer.get_submodule(p).weight for layer in spec.decoder_layers(model) for p in spec.projections()]


def _time_linears(weights: list[torch.Tensor], tokens: int, repeats: int) -> float:
    """Milliseconds for one pass of F.linear over every projection (median of `repeats`)."""
    inputs = {w.shape[1]: torch.randn(tokens, w.shape[1], device=w.device, dtype=w.dtype) for w in weights}
    samples = []
    with torch.no_grad():
        for i in range(repeats + 3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for w in weights:
                F.linear(inputs[w.shape[1]], w)
            torch.cuda.synchronize()
            if i >= 3:
                samples.append((time.perf_counter() - t0) * 1e3)
    return median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--tokens", nargs="+", type=int, default=[512, 2048, 8192])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--backend", nargs="+", default=["auto", "cutlass"], choices=("auto", "cutlass", "cusparselt"),
                    help="to_semi_structured_ backends to time, each against the same dense model")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sparse24_speed: needs an NVIDIA GPU (CUDA); nothing measured")
    device = torch.device("cuda")
    try:
        check_semi_structured_device(device)
    except SlimtuneError as exc:
        sys.exit(f"sparse24_speed: {exc}")
    dtype = getattr(torch, args.dtype)
    dense, _ = load_model("default", dtype=dtype, device=device)
    prune_layerwise(dense, None, "magnitude", 0.0, nm=(2, 4))
    rows, info = [], {"converted": [], "skipped": []}
    for backend in args.backend:
        sparse = copy.deepcopy(dense)
        try:
            info = to_semi_structured_(sparse, backend=backend)
        except (RuntimeError, SlimtuneError) as exc:  # e.g. cuSPARSELt missing from this torch build
            print(f"backend {backend}: {exc}", flush=True)
            rows.append({"backend": backend, "failed": str(exc).splitlines()[0]})
            continue
        for tokens in args.tokens:
            lin_dense = _time_linears(_projections(dense), tokens, args.repeats)
            lin_sparse = _time_linears(_projections(sparse), tokens, args.repeats)
            pre_dense = prefill_latency(dense, tokens, repeats=args.repeats, warmup=3)["median_ms"]
            pre_sparse = prefill_latency(sparse, tokens, repeats=args.repeats, warmup=3)["median_ms"]
            row = {"backend": backend, "tensor": info["backend"], "tokens": tokens, "linears_dense_ms": lin_dense,
                   "linears_sparse_ms": lin_sparse, "linears_speedup": lin_dense / lin_sparse, "prefill_dense_ms": pre_dense,
                   "prefill_sparse_ms": pre_sparse, "prefill_speedup": pre_dense / pre_sparse}
            print(row, flush=True)
            rows.append(row)
        del sparse
    write("sparse24_speed", {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "dtype": args.dtype,
                             "repeats": args.repeats, "converted": len(info["converted"]), "skipped": info["skipped"],
                             "rows": rows})


if __name__ == "__main__":
    main()
