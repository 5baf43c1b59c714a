"""The one split rule every text source shares, so train and evaluation text never overlap."""

from __future__ import annotations

import hashlib

from ..errors import SlimtuneError

SPLITS = ("train", "validation", "test")


def split_of(title: str) -> str:
    """Return the split ("train", "validation" or "test") that a document belongs to.

    Rule: b = int(sha1(title.encode("utf-8")).hexdigest(), 16) % 10; b == 0 -> "test",
    b == 1 -> "validation", anything else -> "train" (about 80/10/10). Wikipedia articles are
    keyed by their title; documents from .txt/.jsonl files by their first 200 characters.

    Hashing rather than shuffling makes the split a property of the document alone: it does not
    depend on a seed, on the order of the dump, or on which other documents are present.
    """
    bucket = int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise SlimtuneError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    return split
