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


def check_precision_on(device: torch.device, dtype: str, mixed_precision: str = "no") -> None:
    """Refuse, before the model is loaded, a precision the device cannot run usefully."""
    if device.type == "cuda":
        if (mixed_precision == "bf16" or dtype == "bfloat16") and not torch.cuda.is_bf16_supported():
            raise SlimtuneError("this GPU does not support bf16; use --mixed-precision fp16 or --dtype float16/float32")
        return
    if device.type != "cpu":
        return
    if mixed_precision == "fp16":
        raise SlimtuneError("fp16 autocast needs a GPU; use --mixed-precision bf16 or no on CPU")
    if dtype == "float16":
        raise SlimtuneError("--dtype float16 on a CPU has no fast kernels (matmuls run tens of times slower than "
                            "float32) and training it has no loss scaling; use --dtype float32 or bfloat16 on CPU")


def check_seq_len(model, seq_len: int, latency_seq_len: int | None = None, decode_tokens: int = 0, preset: str | None = None) -> None:
    """--seq-len, the latency prompt, and the tokens decoded after the decode prompt, against the model's context.
    `preset`: the preset that set --seq-len (named in the error, since the user did not type it)."""
    if seq_len < 2:
        raise SlimtuneError(f"--seq-len {seq_len} is too small; use at least 2 (e.g. 256)")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        origin = f" (set by --preset {preset})" if preset else ""
        raise SlimtuneError(f"--seq-len {seq_len}{origin} exceeds the model's context of {limit} tokens; use --seq-len {limit} or less")
    if limit and latency_seq_len is not None and latency_seq_len > limit:
        raise SlimtuneError(f"--latency-seq-len {latency_seq_len} exceeds the model's context of {limit} tokens; use {limit} or less")
    from .evaluate.speed import DECODE_PROMPT

    if limit and DECODE_PROMPT + decode_tokens > limit:  # decoding is timed after a DECODE_PROMPT-token prompt
        raise SlimtuneError(f"--decode-tokens {decode_tokens} after the {DECODE_PROMPT}-token prompt exceed the model's context of {limit} "
                            f"tokens; use --decode-tokens {max(0, limit - DECODE_PROMPT)} or less")
