"""Perplexity over fixed, non-overlapping token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import SlimtuneError
from ._common import eval_mode, model_device


def _safe_exp(x: float) -> float:
    if math.isnan(x):
        return float("nan")
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict:
    """exp(mean next-token cross entropy) over every predicted token of every window.

    `tokens` is [n, L]: n windows of L tokens. Each window is scored on its own (no context carried
    over) and predicts L-1 tokens. The loss is summed in fp32 from the logits and divided by the
    token count once at the end, so a short last batch weighs exactly as much as its tokens.
    A non-finite loss is reported as inf / nan rather than raised.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise SlimtuneError(
            f"perplexity needs a [windows, seq_len>=2] token tensor, got {shape}; pack the text into windows first"
        )
    if batch_size < 1:
        raise SlimtuneError(f"batch_size must be >= 1, got {batch_size}; pass a positive batch size")
    n, seq_len = tokens.shape
    device = model_device(model)
    total_nll = torch.zeros((), dtype=torch.float64)
    count = 0
    with eval_mode(model), tqdm(total=n, desc=desc, unit="win", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            batch = tokens[start : start + batch_size].to(device=device, dtype=torch.long)
            logits = model(input_ids=batch, use_cache=False).logits  # [b, L, V]
            # Position t predicts token t+1: drop the last logit and the first target.
            pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # [b*(L-1), V]
            target = batch[:, 1:].reshape(-1)  # [b*(L-1)]
            total_nll += F.cross_entropy(pred, target, reduction="sum").double().cpu()
            count += target.numel()
            bar.update(batch.shape[0])
            if progress:
                bar.set_postfix(ppl=f"{_safe_exp(total_nll.item() / count):.3f}")
    nll = total_nll.item() / count
    return {"perplexity": _safe_exp(nll), "nll": nll, "tokens": count, "windows": n, "seq_len": seq_len}
