"""Granularities: which units are pruned (heads, MLP channels, whole layers, or single weights).

Structured units can be mixed ("heads,channels"); "unstructured" and "nm" stand alone and prune
single weights. How element scores become unit scores lives in `importance/reduce.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SlimtuneError

STRUCTURED = ("heads", "channels", "layers")
HEAD_MODES = ("kv_groups", "q_heads")


@dataclass(frozen=True)
class Granularity:
    heads: bool = False
    channels: bool = False
    layers: bool = False
    # kv_groups: remove a KV head with all its query heads (shrinks the KV cache too).
    # q_heads: remove the same number of query heads from every KV group (keeps GQA valid).
    head_mode: str = "kv_groups"

    def __post_init__(self):
        if self.head_mode not in HEAD_MODES:
            raise SlimtuneError(f"unknown head mode '{self.head_mode}'; choose one of {', '.join(HEAD_MODES)}")
        if not (self.heads or self.channels or self.layers):
            raise SlimtuneError("no granularity selected; use --granularity heads, channels, layers or a mix like heads,channels")

    @property
    def names(self) -> list[str]:
        return [n for n in STRUCTURED if getattr(self, n)]


WEIGHT_LEVEL = ("unstructured", "nm")


def units_of(text: str) -> set[str]:
    """What a criterion must be able to score for this --granularity: {"heads", ...} or {"weights"}."""
    if text.strip().lower() in WEIGHT_LEVEL:
        return {"weights"}
    return set(parse_granularity(text).names)


def parse_granularity(text: str, head_mode: str = "kv_groups") -> Granularity:
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in STRUCTURED]
    if unknown:
        raise SlimtuneError(f"unknown granularity '{unknown[0]}'; choose from {', '.join(STRUCTURED)} (comma-separated mix allowed), or unstructured or nm on their own")
    return Granularity(**{p: True for p in parts}, head_mode=head_mode)


