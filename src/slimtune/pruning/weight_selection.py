"""Selecting weights to prune: unstructured (per module or per row) and N:M.

Masks only grow: pruned weights sort first (-inf), so they stay pruned.
- `select_unstructured`: the int(numel·p) lowest scores of each projection (Wanda's `per_row`:
  compared within each output row, arXiv 2306.11695 §3, floor or ceil of in·p per row so that the
  module total is exactly int(numel·p)). A strict top-k, ties by index, so it never
  overshoots the target the way a `≤ threshold` cut does.
- `select_nm`: n kept in every block of m consecutive inputs of every row (2:4 is the pattern of
  NVIDIA's sparse tensor cores).
`module_fraction_for` turns a fraction of decoder-layer parameters into the per-module p.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SlimtuneError, check_sparsity
from ..importance.base import ElementScores
from ..masking.weights import Key, WeightMasks
from ..models.arch import ArchSpec, base_weight, get_arch, own_params


def parse_nm(text: str) -> tuple[int, int]:
    """Parse "n:m" (e.g. "2:4") into (n, m): keep n weights in every block of m."""
    parts = str(text).strip().split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise SlimtuneError(f"N:M pattern '{text}' is malformed; write n:m with whole numbers, e.g. 2:4")
    n, m = int(parts[0]), int(parts[1])
    _check_nm(n, m)
    return n, m


def _check_nm(n: int, m: int) -> None:
    if not 0 < n < m:
        raise SlimtuneError(f"N:M pattern {n}:{m} is invalid; it needs 0 < n < m, e.g. 2:4 (keep 2 of every 4)")


def module_fraction_for(model: nn.Module, spec: ArchSpec | None = None, excluded=frozenset(), sparsity: float = 0.0) -> float:
    """The fraction p of every masked projection to prune so that the pruned weights make
    `sparsity` of all decoder-layer parameters: p = sparsity · decoder_params / prunable_params."""
    check_sparsity(sparsity)
    spec = spec or get_arch(model)
    layers = spec.decoder_layers(model)
    total = sum(own_params(layer) for layer in layers)
    prunable = sum(
        base_weight(layer.get_submodule(path)).numel()
        for i, layer in enumerate(layers) if i not in excluded
        for path in spec.projections()
    )
    p = sparsity * total / max(prunable, 1)
    if p >= 1.0:
        raise SlimtuneError(
            f"sparsity {sparsity} needs {p:.3f} of every prunable weight (norms, biases and excluded layers stay dense); lower --sparsity or exclude fewer layers"
        )
    return p


def _flat_scores(scores) -> dict[Key, torch.Tensor]:
    if not scores:
        raise SlimtuneError("no element scores to select from; run the criterion on calibration data first (keep_elements=True for LoRAPrune)")
    if isinstance(next(iter(scores)), int):  # ElementScores: {layer: {path: tensor}}
        return {(i, path): t for i, per in scores.items() for path, t in per.items()}
    return dict(scores)


def _scores_for(masks: WeightMasks, flat: dict[Key, torch.Tensor], key: Key) -> torch.Tensor:
    """fp32 (or wider) scores on the mask's device, with pruned weights at -inf so they go first."""
    keep = masks.mask(*key)
    s = flat.get(key)
    if s is None:
        raise SlimtuneError(f"no scores for layer {key[0]} {key[1]}; score every masked projection (LoRA on all seven) or exclude that layer")
    if tuple(s.shape) != tuple(keep.shape):
        raise SlimtuneError(f"scores for layer {key[0]} {key[1]} have shape {tuple(s.shape)}, its weight {tuple(keep.shape)}; score the model being pruned")
    s = s.detach().to(device=keep.device, dtype=torch.promote_types(s.dtype, torch.float32))
    if bool(torch.isnan(s).any()):
        raise SlimtuneError(f"scores for layer {key[0]} {key[1]} contain NaN; check the calibration loss for divergence")
    return s.masked_fill(~keep, -torch.inf)


def _prune_rows(keep: torch.Tensor, s: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the k lowest scores row by row: every row gives its base = k // out lowest, and the
    k - base·out rows whose next-lowest score is smallest give one more, so the module total is
    exactly k (Wanda's per-row comparison, without the rounding shortfall of int(in·p) per row)."""
    rows = s.shape[0]
    base, extra = divmod(k, rows)
    values, order = torch.sort(s, dim=1, stable=True)
    drop = torch.zeros_like(keep)
    drop.scatter_(1, order[:, :base], True)
    if extra:
        chosen = torch.sort(values[:, base], stable=True).indices[:extra]
        drop[chosen, order[chosen, base]] = True
    return keep & ~drop


@torch.no_grad()
def select_unstructured(masks: WeightMasks, scores: dict[Key, torch.Tensor] | ElementScores, sparsity_in_module: float, per_row: bool = False) -> dict:
    """Prune the int(numel·p) lowest-scoring weights of every masked projection (per_row: compared
    within each output row, rows differing by at most one); ties go to the lower index. Returns
    {"pruned", "masked"} weight counts."""
    p = sparsity_in_module
    check_sparsity(p, "module sparsity")
    flat = _flat_scores(scores)
    for key in masks.keys():
        keep = masks.mask(*key)
        s = _scores_for(masks, flat, key)  # [out, in]
        if per_row:
            new = _prune_rows(keep, s, int(s.numel() * p))
        else:
            k = int(s.numel() * p)
            order = torch.sort(s.flatten(), stable=True).indices[:k]
            new = keep.clone().flatten()
            new[order] = False
        masks.set_mask(*key, new.view_as(keep) & keep)  # & keep: more already pruned than k stay pruned
    return {"pruned": masks.pruned(), "masked": sum(masks.mask(*k).numel() for k in masks.keys())}


@torch.no_grad()
def select_nm(masks: WeightMasks, scores: dict[Key, torch.Tensor] | ElementScores, n: int, m: int) -> dict:
    """Keep the n highest-scoring weights in every block of m consecutive inputs of every row.
    Blocks that already keep fewer than n stay as they are. Returns {"pruned", "masked"}."""
    _check_nm(n, m)
    flat = _flat_scores(scores)
    for key in masks.keys():
        keep = masks.mask(*key)
        out_f, in_f = keep.shape
        if in_f % m:
            raise SlimtuneError(f"layer {key[0]} {key[1]} has {in_f} inputs, not a multiple of m={m}; pick an m that divides {in_f} (2:4 needs a multiple of 4) or exclude that layer")
        s = _scores_for(masks, flat, key).view(out_f, in_f // m, m)  # [out, blocks, m]
        drop = torch.sort(s, dim=2, stable=True).indices[:, :, : m - n]  # pruned ones (-inf) go first
        new = keep.clone().view(out_f, in_f // m, m)
        new.scatter_(2, drop, False)
        masks.set_mask(*key, new.view_as(keep) & keep)
    return {"pruned": masks.pruned(), "masked": sum(masks.mask(*k).numel() for k in masks.keys())}
