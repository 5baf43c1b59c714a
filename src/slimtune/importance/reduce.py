"""Element scores to unit scores: one score per query head, MLP channel and decoder layer.

Any criterion that scores weight elements can drive any structured granularity: `head_scores`
and `channel_scores` reduce one projection's [out, in] score matrix to one score per unit. As in
the official LoRAPrune code, each projection's unit vector is l2-normalised before the projections
of one block are summed, so q, k, v and o weigh equally (LoRAPrune, arXiv 2305.18403, §3.3).
"""

from __future__ import annotations

import torch

from ..errors import SlimtuneError
from ..masking.structured import LayerGeometry


def _device(scores: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(scores.values())).device if scores else torch.device("cpu")


def _normalise(v: torch.Tensor, how: str) -> torch.Tensor:
    if how == "l2":
        return v / (v.norm() + 1e-8)
    if how == "none":
        return v
    raise SlimtuneError(f"unknown normalisation '{how}'; choose l2 or none")


def _finish(v: torch.Tensor, signed: bool, how: str) -> torch.Tensor:
    # signed criteria (vector-wise Taylor) cancel inside the group first, then take |.|
    return _normalise(v.abs() if signed else v, how)


def head_scores(spec, geom: LayerGeometry, scores: dict[str, torch.Tensor], signed=False, normalise="l2") -> torch.Tensor:
    """Per query head score [H]: q rows + o columns of the head, plus its KV head's k/v rows / G."""
    H, K, hd = geom.num_heads, geom.num_kv_heads, geom.head_dim
    total = torch.zeros(H, device=_device(scores))
    if spec.q in scores:
        total += _finish(scores[spec.q].float().reshape(H, hd, -1).sum(dim=(1, 2)), signed, normalise)
    if spec.o in scores:
        total += _finish(scores[spec.o].float().reshape(-1, H, hd).sum(dim=(0, 2)), signed, normalise)
    for path in (spec.k, spec.v):
        if path in scores:
            kv = _finish(scores[path].float().reshape(K, hd, -1).sum(dim=(1, 2)), signed, normalise)
            total += kv.repeat_interleave(geom.group_size) / geom.group_size
    return total.cpu()


def channel_scores(spec, geom: LayerGeometry, scores: dict[str, torch.Tensor], signed=False, normalise="l2") -> torch.Tensor:
    """Per MLP channel score [I]: rows of gate/up plus the column of down."""
    total = torch.zeros(geom.intermediate, device=_device(scores))
    for path in spec.mlp_in:
        if path in scores:
            total += _finish(scores[path].float().sum(dim=1), signed, normalise)
    if spec.mlp_out in scores:
        total += _finish(scores[spec.mlp_out].float().sum(dim=0), signed, normalise)
    return total.cpu()


def layer_score(scores: dict[str, torch.Tensor], signed=False) -> float:
    """A whole layer's score: the sum over its projections (|sum| for signed criteria)."""
    total = sum(float(s.float().sum()) for s in scores.values())
    return abs(total) if signed else total


def unit_scores(spec, geometry: list[LayerGeometry], element_scores: dict, signed=False, normalise="l2") -> list[dict]:
    """Reduce {layer: {path: element scores}} to [{"heads": [H], "channels": [I], "layer": float}]."""
    out = []
    for i, geom in enumerate(geometry):
        scores = element_scores.get(i, {})
        out.append(
            {
                "heads": head_scores(spec, geom, scores, signed, normalise),
                "channels": channel_scores(spec, geom, scores, signed, normalise),
                "layer": layer_score(scores, signed) if scores else 0.0,
            }
        )
    return out
