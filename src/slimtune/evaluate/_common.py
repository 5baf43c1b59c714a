"""Small helpers shared by the evaluation modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """dtype of the first floating-point parameter; None if there is none."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings cover the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put the model in eval mode and inference mode; restore its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)
