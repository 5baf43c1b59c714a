"""Run 2:4-pruned decoder projections on NVIDIA's sparse tensor cores (inference only).

    model = load_model(out, dtype=torch.float16, device="cuda")[0]
    converted = to_semi_structured_(model)        # names of the projections now stored as 2:4

Every decoder projection whose weight keeps at most 2 of every 4 consecutive inputs becomes a
`torch.sparse.SparseSemiStructuredTensor` (`torch.sparse.to_sparse_semi_structured`): half the
values plus a small metadata tensor, multiplied by cuSPARSELt / CUTLASS kernels. The forward is
unchanged (`F.linear` dispatches on the tensor type); training and saving are not supported on
such a model: keep converting a freshly loaded copy.

Requirements (checked before anything is converted, each with a one-line error): CUDA with
compute capability 8.0 or newer (Ampere, Ada, Hopper), float16 or bfloat16 weights, and weights
whose output and input sizes both of PyTorch's kernels accept (multiples of 32 and 64; other
projections are left dense and reported as skipped). SmolLM2's projections all qualify.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SlimtuneError
from ..models.arch import get_arch, unwrap
from .sparse import fits_24

DTYPES = (torch.float16, torch.bfloat16)
MIN_ROWS, MIN_COLS = 32, 64  # CUTLASS's shape multiples for float16/bfloat16 (cuSPARSELt's, 16 x 16, are looser)


def check_semi_structured_device(device: torch.device) -> None:
    """Refuse a device without 2:4 sparse tensor cores, naming what is needed."""
    if device.type != "cuda":
        raise SlimtuneError(f"2:4 sparse kernels need an NVIDIA GPU, but the model is on {device}; load it with device='cuda'")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise SlimtuneError(f"2:4 sparse kernels need compute capability 8.0 or newer (Ampere+); {torch.cuda.get_device_name(device)} has {major}.{minor}")


def semi_structured_candidates(model: nn.Module) -> tuple[list[tuple[str, nn.Linear]], list[dict]]:
    """(name, Linear) of the decoder projections that can be converted, and why the others cannot."""
    root = unwrap(model)
    spec = get_arch(root)
    ok, skipped = [], []
    for i, layer in enumerate(spec.decoder_layers(root)):
        for path in spec.projections():
            name = f"{spec.layers}.{i}.{path}"
            lin = layer.get_submodule(path)
            if type(lin) is not nn.Linear:
                raise SlimtuneError(f"{name} is a {type(lin).__name__}, not a plain Linear; merge the adapters first (adapters.merge_keep_masks)")
            w = lin.weight
            rows, cols = w.shape
            if rows % MIN_ROWS or cols % MIN_COLS:
                skipped.append({"name": name, "why": f"shape {rows}x{cols} is not a multiple of {MIN_ROWS}x{MIN_COLS}"})
            elif not fits_24(w.detach()):
                skipped.append({"name": name, "why": "not 2:4 sparse"})
            else:
                ok.append((name, lin))
    return ok, skipped


BACKENDS = ("auto", "cutlass", "cusparselt")


def to_semi_structured_(model: nn.Module, backend: str = "auto") -> dict:
    """Convert, in place, every 2:4 decoder projection to the semi-structured sparse layout.

    backend: "auto" keeps PyTorch's choice (cuSPARSELt where it is installed), "cutlass" or
    "cusparselt" forces one; measured on an H200 with "auto", the kernels lost to dense at
    SmolLM2's widths (README), and benchmarks/sparse24_speed.py --backend compares the two.
    Returns {"converted": [names], "skipped": [{"name", "why"}], "backend": the tensor class used}.
    Refuses (before converting anything) a model that is not on a capable GPU, not in
    float16/bfloat16, or has no 2:4 projection at all.
    """
    if backend not in BACKENDS:
        raise SlimtuneError(f"unknown 2:4 backend '{backend}'; choose {', '.join(BACKENDS)}")
    root = unwrap(model)
    weight = next(root.parameters())
    check_semi_structured_device(weight.device)
    if weight.dtype not in DTYPES:
        raise SlimtuneError(f"2:4 sparse kernels take float16 or bfloat16 weights, not {weight.dtype}; load the model with dtype=torch.float16 or torch.bfloat16")
    ok, skipped = semi_structured_candidates(root)
    if not ok:
        why = skipped[0]["why"] if skipped else "no decoder projections"
        raise SlimtuneError(f"no decoder projection can use 2:4 kernels ({why}); prune with --granularity nm --nm 2:4 first")
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    forced = SparseSemiStructuredTensor._FORCE_CUTLASS  # PyTorch's documented switch, a class attribute
    if backend != "auto":
        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        for _, lin in ok:
            lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = forced
    return {"converted": [name for name, _ in ok], "skipped": skipped, "backend": type(ok[0][1].weight).__name__}
