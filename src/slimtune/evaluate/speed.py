"""Prefill latency and greedy decode throughput, timed with time.perf_counter.

Both use random token ids from a fixed seed, so two models see the same inputs. On CUDA the
device is synchronised around every timed region. Each result keeps every repeat, their median,
min and max, and the machine's load average just before timing: on a busy machine the spread is
wide and a median alone would hide why.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time

import torch

from ..errors import SlimtuneError
from ._common import eval_mode, model_device, synchronize

DECODE_PROMPT = 32  # tokens of prompt before the timed decoding (runtime.check_seq_len counts them)

_SEED = 1234


def _random_ids(model: torch.nn.Module, length: int, vocab_size: int | None) -> torch.Tensor:
    if vocab_size is None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab_size:
        raise SlimtuneError("cannot tell the vocabulary size of this model; pass vocab_size=")
    gen = torch.Generator().manual_seed(_SEED)
    ids = torch.randint(0, int(vocab_size), (1, length), generator=gen)  # [1, length]
    return ids.to(model_device(model))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise SlimtuneError(f"{name} must be >= 1, got {value}; pass a positive number")


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (runnable processes), None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # Windows
        return None


def _stats(samples: list[float], unit: str) -> dict:
    return {
        f"median_{unit}": statistics.median(samples),
        f"min_{unit}": min(samples),
        f"max_{unit}": max(samples),
        f"samples_{unit}": samples,
    }


def prefill_latency(
    model: torch.nn.Module, seq_len: int, repeats: int = 5, warmup: int = 1, vocab_size: int | None = None
) -> dict:
    """Time one forward pass (batch 1 x seq_len, use_cache=False). Returns milliseconds."""
    _check_positive(seq_len=seq_len, repeats=repeats)
    ids = _random_ids(model, seq_len, vocab_size)
    device = model_device(model)
    samples = []
    load = load_average()
    with eval_mode(model):
        for i in range(warmup + repeats):
            synchronize(device)
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            synchronize(device)
            if i >= warmup:
                samples.append((time.perf_counter() - t0) * 1e3)
    return {"seq_len": seq_len, "repeats": repeats, "warmup": warmup, "load_avg": load, **_stats(samples, "ms")}


def _cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the forward argument that takes the KV cache.

    transformers 5 renamed `past_key_values` to `cache` (the old name is deprecated). Wrappers
    such as PEFT forward **kwargs, so look through to the wrapped model when needed.
    """
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        if m is None:
            continue
        params = inspect.signature(m.forward).parameters
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
    return "past_key_values"


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@torch.inference_mode()
def greedy_decode(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, float]:
    """Greedy decoding with a KV cache after `prompt` [1, P].

    The prefill picks the first token (untimed); then `new_tokens` single-token forwards, each
    fed the returned cache, pick one token each (timed). Returns (ids [1, 1 + new_tokens],
    seconds spent in the single-token phase).
    """
    device = model_device(model)
    key = _cache_kwarg(model)
    out = model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)  # [1, 1]
    generated = [token]
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        cache = _output_cache(out)
        if cache is None:
            raise SlimtuneError(
                "the model returned no KV cache with use_cache=True; decode throughput needs a cache-aware model"
            )
        out = model(input_ids=token, use_cache=True, **{key: cache})
        token = out.logits[:, -1:].argmax(-1)
        generated.append(token)
    synchronize(device)
    return torch.cat(generated, dim=1), time.perf_counter() - t0


def decode_throughput(
    model: torch.nn.Module, prompt_len: int = DECODE_PROMPT, new_tokens: int = 32, repeats: int = 3, warmup: int = 1
) -> dict:
    """Greedy decoding with a KV cache, batch 1. Only the one-token-at-a-time phase is timed."""
    _check_positive(prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats)
    prompt = _random_ids(model, prompt_len, None)
    samples = []
    load = load_average()
    with eval_mode(model):
        for i in range(warmup + repeats):
            _, seconds = greedy_decode(model, prompt, new_tokens)
            if i >= warmup:
                samples.append(new_tokens / seconds)
    median = statistics.median(samples)
    return {
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "load_avg": load,
        **_stats(samples, "tok_s"),
        "median_ms_per_token": 1e3 / median,
    }
