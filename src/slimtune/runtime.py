"""Small run-time checks shared by the CLI commands and the prune job."""

from __future__ import annotations

import torch

from .errors import SlimtuneError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SlimtuneError(f"unknown --device '{name}'; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlimtuneError("--device cuda requested but no GPU is visible; use --device cpu")
    return device


def check_seq_len(model, seq_len: int) -> None:
    if seq_len < 2:
        raise SlimtuneError(f"--seq-len {seq_len} is too small; use at least 2 (e.g. 256)")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise SlimtuneError(f"--seq-len {seq_len} exceeds the model's context of {limit} tokens; use --seq-len {limit} or less")
