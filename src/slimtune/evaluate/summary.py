"""`evaluate_model`: every measurement of one model in one flat dict."""

from __future__ import annotations

import torch

from ._common import eval_mode, model_device, model_dtype
from .memory import track_peak_memory
from .params import count_parameters, model_size_bytes
from .perplexity import perplexity
from .speed import decode_throughput, load_average, prefill_latency

_MIB = 2**20


def _warm_up(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> None:
    """Bring the model to the state a served model is in, before memory is measured.

    A model fresh from `from_pretrained` may still have its weights memory-mapped: they are paged
    in from disk (and counted in RSS) during the first pass, while a pruned model, rebuilt in
    memory, is resident already. Reading every tensor and running one batch (which also builds
    lazy caches and thread pools) makes the dense and the pruned model measured alike.
    """
    if not (isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and tokens.shape[1] >= 2 and batch_size >= 1):
        return  # perplexity() explains what is wrong with them
    device = model_device(model)
    with eval_mode(model):
        if device.type == "cpu":
            for t in [*model.parameters(), *model.buffers()]:
                t.sum()  # touches every page
        model(input_ids=tokens[:batch_size].to(device=device, dtype=torch.long), use_cache=False)


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

    Peak memory is the increase over the loaded model during the perplexity pass, measured after
    a warm-up (see `_warm_up`), so it counts activations and not weights being paged in.
    `seq_len_latency` defaults to L. latency_repeats=0 skips the prefill timing and
    decode_tokens=0 skips the decode timing (their keys are then None). Timings are medians, with
    the min and max of the repeats and the 1-minute load average before timing next to them.
    Sizes are MiB (2**20 bytes), although the keys say "_mb".
    """
    device = model_device(model)
    _warm_up(model, tokens, batch_size)
    with track_peak_memory(device) as mem:
        ppl = perplexity(model, tokens, batch_size=batch_size, progress=progress)
    params = count_parameters(model, decoder_layers)
    size = model_size_bytes(model)
    load = load_average()
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
        "size_mb": size / _MIB,
        "prefill_ms": prefill["median_ms"] if prefill else None,
        "prefill_ms_min": prefill["min_ms"] if prefill else None,
        "prefill_ms_max": prefill["max_ms"] if prefill else None,
        "decode_tok_s": decode["median_tok_s"] if decode else None,
        "decode_tok_s_min": decode["min_tok_s"] if decode else None,
        "decode_tok_s_max": decode["max_tok_s"] if decode else None,
        "load_avg_1m": load[0] if load else None,
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
            "memory": {**mem, "method": "increase over the loaded model during the perplexity pass, after a warm-up"},
        },
    }
