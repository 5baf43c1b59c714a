"""Parameter counts and sizes. Tied or shared tensors are counted once (keyed by storage address)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import SlimtuneError


def _key(t: torch.Tensor):
    # Meta tensors have no storage; fall back to object identity for them.
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device, t.data_ptr(), tuple(t.shape), t.dtype)


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        k = _key(t)
        if k not in seen:
            seen.add(k)
            out.append(t)
    return out


def count_parameters(model: torch.nn.Module, decoder_layers: torch.nn.ModuleList | None = None) -> dict:
    """{"total", "decoder", "embedding_and_head"} parameter counts.

    `decoder_layers` is the ModuleList of decoder blocks (found via the arch spec). Without it
    "decoder" and "embedding_and_head" are None. "embedding_and_head" is everything outside the
    decoder blocks: embeddings, final norm and LM head (once, when tied).
    """
    total = sum(p.numel() for p in _unique(model.parameters()))
    if decoder_layers is None:
        return {"total": total, "decoder": None, "embedding_and_head": None}
    decoder = sum(p.numel() for p in _unique(decoder_layers.parameters()))
    return {"total": total, "decoder": decoder, "embedding_and_head": total - decoder}


def model_size_bytes(model: torch.nn.Module) -> int:
    """In-memory bytes of the unique parameters and buffers, in their current dtypes."""
    tensors = _unique([*model.parameters(), *model.buffers()])
    return sum(t.numel() * t.element_size() for t in tensors)


def dir_size_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weight files (*.safetensors, *.bin) directly inside a saved model directory."""
    path = Path(path)
    if not path.is_dir():
        raise SlimtuneError(f"{path} is not a directory; pass the folder a model was saved to")
    return sum(
        f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in path.glob(pattern) if f.is_file()
    )
