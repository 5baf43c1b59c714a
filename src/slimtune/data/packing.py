"""Tokenise documents into one stream, cut it into fixed-length rows, and serve shuffled batches."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import SlimtuneError
from .sources import load_texts


def pack(texts: list[str], tokenizer, seq_len: int, max_sequences: int | None = None,
         *, name: str = "the text") -> torch.LongTensor:
    """Token rows of shape [n, seq_len] from `texts`; deterministic.

    Documents are tokenised without special tokens, joined with the tokenizer's EOS token (when it
    has one) so the model sees where one document ends, concatenated, and cut into consecutive
    non-overlapping windows; the ragged tail is dropped.

    With `max_sequences`, the windows kept are evenly spaced over the whole stream
    (`torch.linspace(0, n - 1, max_sequences).round()`), not the first ones: a small evaluation
    then still samples every part of the corpus instead of its first few articles.
    `name` only appears in the error message.
    """
    if seq_len < 2:
        raise SlimtuneError(f"--seq-len must be at least 2 (got {seq_len}): a model needs one token to predict the next")
    if max_sequences is not None and max_sequences < 1:
        raise SlimtuneError(f"the number of sequences must be at least 1 (got {max_sequences})")
    stream = _token_stream([t for t in texts if t.strip()], tokenizer)
    n = len(stream) // seq_len
    if n < 1:
        raise SlimtuneError(f"{name} has only {len(stream)} tokens, fewer than --seq-len {seq_len}; "
                            "use a smaller --seq-len or more data")
    rows = torch.from_numpy(stream[: n * seq_len]).view(n, seq_len)  # [n, seq_len]
    if max_sequences is not None and max_sequences < n:
        rows = rows[torch.linspace(0, n - 1, max_sequences).round().long().unique()]
    return rows.clone()


def _token_stream(texts: list[str], tokenizer) -> np.ndarray:
    if not texts:
        return np.zeros(0, dtype=np.int64)
    # One batch call lets a fast tokenizer encode all documents in parallel in Rust. verbose=False
    # silences "sequence length is longer than the maximum": we cut the stream ourselves.
    ids = tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids = [piece for doc in ids for piece in (doc, [eos])][:-1]  # doc, eos, doc, ..., doc
    total = sum(len(doc) for doc in ids)
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)


def load_tokens(source: str, tokenizer, split: str, seq_len: int,
                max_sequences: int | None = None) -> torch.LongTensor:
    """`pack(load_texts(source, split), ...)`: [n, seq_len] token rows of one split of a source."""
    return pack(load_texts(source, split), tokenizer, seq_len, max_sequences, name=f"the {split} split of {source}")


def batch_at(tokens: torch.Tensor, batch_size: int, seed: int, step: int) -> torch.LongTensor:
    """The [batch_size, seq_len] batch that training step `step` sees.

    The rows form an endless stream: epoch e is the permutation of all rows drawn from
    `torch.Generator` seeded with (seed, e), and step s takes stream positions
    [s * batch_size, (s + 1) * batch_size), so epoch = position // n. A batch may straddle two
    epochs. Because a batch depends only on (seed, step), a resumed run sees exactly the batches
    an uninterrupted one would.
    """
    return _batch(tokens, batch_size, seed, step, _Permutations(tokens, seed))


def iterate_batches(tokens: torch.Tensor, batch_size: int, seed: int, epochs: int | None = None,
                    start_step: int = 0) -> Iterator[torch.LongTensor]:
    """Yield `batch_at(tokens, batch_size, seed, step)` for step = start_step, start_step + 1, ...

    Endless when `epochs` is None; otherwise it stops after epochs * n // batch_size steps in
    total (an incomplete last batch is dropped, so every batch has the same shape).
    """
    perms = _Permutations(tokens, seed)
    total = None
    if epochs is not None:
        total = epochs * tokens.shape[0] // batch_size
        if total < 1:
            raise SlimtuneError(f"{epochs} epoch(s) of {tokens.shape[0]} sequences make no batch of {batch_size}; "
                                "use a smaller batch size, more epochs or more data")
    for step in itertools.count(start_step) if total is None else range(start_step, total):
        yield _batch(tokens, batch_size, seed, step, perms)


class _Permutations:
    """Row order of each epoch, computed once and kept for the two most recent epochs."""

    def __init__(self, tokens: torch.Tensor, seed: int):
        if tokens.ndim != 2 or tokens.shape[0] < 1:
            raise SlimtuneError(f"expected token rows of shape [n, seq_len] with n >= 1, got {tuple(tokens.shape)}")
        self.n, self.seed, self.cache = tokens.shape[0], seed, {}

    def __call__(self, epoch: int) -> torch.Tensor:
        if epoch not in self.cache:
            # Mix seed and epoch into one 63-bit seed; the odd multiplier keeps (seed, epoch) pairs apart.
            generator = torch.Generator().manual_seed((self.seed * 0x9E3779B97F4A7C15 + epoch) % 2**63)
            self.cache = {e: p for e, p in self.cache.items() if e == epoch - 1}
            self.cache[epoch] = torch.randperm(self.n, generator=generator)
        return self.cache[epoch]


def _batch(tokens: torch.Tensor, batch_size: int, seed: int, step: int, perms: _Permutations) -> torch.Tensor:
    if batch_size < 1 or step < 0:
        raise SlimtuneError(f"batch size must be >= 1 and step >= 0 (got {batch_size} and {step})")
    position = torch.arange(step * batch_size, (step + 1) * batch_size)  # [batch_size]
    epoch = position // perms.n
    rows = torch.empty_like(position)
    for e in epoch.unique().tolist():  # one or two epochs, more only if batch_size > n
        here = epoch == e
        rows[here] = perms(e)[position[here] % perms.n]
    return tokens[rows]  # [batch_size, seq_len]
