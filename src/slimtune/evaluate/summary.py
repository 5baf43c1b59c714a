"""`evaluate_model`: every measurement of one model in one flat dict."""

from __future__ import annotations

import torch

from ._common import model_device, model_dtype
from .memory import track_peak_memory
from .params import count_parameters, model_size_bytes
from .perplexity import perplexity
from .speed import decode_throughput, prefill_latency

_MB = 2**20


def evaluate_model(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    decoder_layers: torch.nn.ModuleList | None = None,
    seq_len_latency: int | None = None,
    latency_repeats: int = 5,
    decode_tokens: int = 32,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity on `tokens` [n, L], parameter counts, size, prefill latency, decode throughput
    and the peak memory of the perplexity pass.

    `seq_len_latency` defaults to L. latency_repeats=0 skips the prefill timing and
    decode_tokens=0 skips the decode timing (their keys are then None). Sizes are in MB = 2**20 bytes.
    """
    device = model_device(model)
    with track_peak_memory(device) as mem:
        ppl = perplexity(model, tokens, batch_size=batch_size, progress=progress)
    params = count_parameters(model, decoder_layers)
    size = model_size_bytes(model)
    prefill = None
    if latency_repeats > 0:
        prefill = prefill_latency(model, seq_len_latency or tokens.shape[1], repeats=latency_repeats)
    decode = None
    if decode_tokens > 0:
        decode = decode_throughput(model, new_tokens=decode_tokens)
    dtype = model_dtype(model)
    return {
        "perplexity": ppl["perplexity"],
        "nll": ppl["nll"],
        "eval_tokens": ppl["tokens"],
        "params_total": params["total"],
        "params_decoder": params["decoder"],
        "size_mb": size / _MB,
        "prefill_ms": prefill["median_ms"] if prefill else None,
        "decode_tok_s": decode["median_tok_s"] if decode else None,
        "peak_memory_mb": mem["peak_delta_mb"],
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "torch_threads": torch.get_num_threads(),
        "details": {
            "perplexity": ppl,
            "params": params,
            "size_bytes": size,
            "prefill": prefill,
            "decode": decode,
            "memory": mem,
        },
    }
