"""One-shot, layer-by-layer pruning of the decoder projections: Wanda, SparseGPT, magnitude.

    masks = prune_layerwise(model, calib_tokens, "sparsegpt", sparsity=0.5)          # unstructured
    masks = prune_layerwise(model, calib_tokens, "wanda", sparsity=0.0, nm=(2, 4))   # 2:4

The model is pruned in place (pruned weights set to zero; SparseGPT also updates the kept ones) and
the returned `WeightMasks` records the pattern, so `attach_weight_masks` can keep the zeros through
LoRA recovery. `masks.per_module()` reports the measured sparsity of every projection.

`sparsity` is the fraction pruned of EVERY prunable projection (q, k, v, o and the MLP projections
of each non-excluded decoder layer), not of all decoder parameters: norms, biases and excluded
layers stay dense. With `nm=(n, m)` every projection keeps exactly n of every m consecutive inputs
in each row, and `sparsity` is not used (the pattern fixes it at 1 − n/m).

Methods:
- "magnitude": the lowest |W| of each projection (Han et al. 2015, arXiv 1506.02626); needs no
  data, the floor the other two must beat.
- "wanda": the lowest |W_ij|·‖X_j‖₂ within each output row, no weight update (Sun et al. 2023,
  arXiv 2306.11695).
- "sparsegpt": OBS pruning with weight reconstruction from H = 2·XᵀX / tokens (Frantar & Alistarh
  2023, arXiv 2301.00774), see `pruning/sparsegpt.py`.

Wanda and SparseGPT are sequential (both papers): decoder layer i is calibrated on the outputs of
layers 0..i-1 *after* those were pruned, see `pruning/calibration.py`. Calibration memory: one
[n, L, d] hidden-state buffer in the model's dtype plus, for SparseGPT, one fp32 [in, in] Hessian
per projection of the current layer. The model stays where it is (CPU or CUDA, any dtype); only
the base weights of LoRA-wrapped projections are pruned, adapters are ignored.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SlimtuneError
from ..importance.wanda import wanda_scores
from ..masking.weights import Key, WeightMasks
from ..models.arch import base_layer, base_weight, get_arch
from .calibration import InputStats, capture_inputs, check_tokens, run_layer
from .sparsegpt import check_hessian_tokens, check_nm_width, sparsegpt_prune
from .weight_selection import select_nm, select_unstructured

METHODS = ("magnitude", "wanda", "sparsegpt")


class _OneLayer:
    """The masks of one decoder layer, with the part of the `WeightMasks` interface that
    `select_unstructured` / `select_nm` use (keys, mask, set_mask, pruned)."""

    def __init__(self, masks: WeightMasks, layer: int):
        self._masks = masks
        self._keys = [k for k in masks.keys() if k[0] == layer]

    def keys(self) -> list[Key]:
        return list(self._keys)

    def mask(self, layer: int, path: str) -> torch.Tensor:
        return self._masks.mask(layer, path)

    def set_mask(self, layer: int, path: str, keep: torch.Tensor) -> None:
        self._masks.set_mask(layer, path, keep)

    def pruned(self) -> int:
        return sum(int((~self.mask(*k)).sum()) for k in self._keys)


def _select(masks: WeightMasks, layer: int, scores: dict[Key, torch.Tensor], sparsity: float, nm, per_row: bool) -> None:
    view = _OneLayer(masks, layer)
    if nm is not None:
        select_nm(view, scores, *nm)
    else:
        select_unstructured(view, scores, sparsity, per_row=per_row)


@torch.no_grad()
def _apply(masks: WeightMasks, layer: nn.Module, index: int, paths) -> None:
    for path in paths:
        w = base_weight(layer.get_submodule(path))
        w.masked_fill_(~masks.mask(index, path).to(w.device), 0.0)


def _check(model, spec, method, sparsity, nm, excluded, batch_size, blocksize, percdamp) -> None:
    if method not in METHODS:
        raise SlimtuneError(f"unknown one-shot method '{method}'; choose one of {', '.join(METHODS)}")
    if nm is None and not (isinstance(sparsity, int | float) and 0.0 <= sparsity < 1.0):
        raise SlimtuneError(f"sparsity {sparsity} is outside [0, 1); pass the fraction of every projection to prune, such as 0.5")
    if batch_size < 1:
        raise SlimtuneError(f"batch_size must be >= 1, got {batch_size}; pass a positive batch size")
    if method == "sparsegpt" and blocksize < 1:
        raise SlimtuneError(f"blocksize must be >= 1, got {blocksize}; the paper uses 128")
    if method == "sparsegpt" and percdamp < 0:
        raise SlimtuneError(f"percdamp {percdamp} is negative; use a small positive fraction such as 0.01")
    if nm is not None:
        if not (isinstance(nm, tuple | list) and len(nm) == 2):
            raise SlimtuneError(f"nm must be a pair (n, m) such as (2, 4), got {nm!r}; parse text with parse_nm('2:4')")
        n, m = int(nm[0]), int(nm[1])
        for i, layer in enumerate(spec.decoder_layers(model)):
            if i in excluded:
                continue
            for path in spec.projections():
                in_f = base_layer(layer.get_submodule(path)).in_features
                check_nm_width(n, m, in_f, blocksize if method == "sparsegpt" else m, f"layer {i} {path}")


def prune_layerwise(
    model: nn.Module,
    calib_tokens: torch.LongTensor | None,
    method: str,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    excluded: set[int] | frozenset[int] = frozenset(),
    batch_size: int = 1,
    blocksize: int = 128,
    percdamp: float = 0.01,
    progress: bool = False,
    damping: dict[str, float] | None = None,
) -> WeightMasks:
    """Prune the decoder projections of `model` in place, one decoder layer at a time, and return
    the masks (True = kept). See the module docstring for the methods and what `sparsity` means.

    calib_tokens: [n, L] token ids for Wanda and SparseGPT (ignored by magnitude, may be None).
    excluded: decoder layer indices left dense (they still run, feeding the next layer).
    batch_size: calibration sequences per layer call.
    blocksize, percdamp: SparseGPT's column block (128) and dampening (0.01·mean diag H).
    damping: if given, gets {"layer i path": percdamp} for every projection whose Hessian needed
    more dampening than `percdamp` to factor (each retry multiplies it by 10).
    """
    spec = get_arch(model)
    excluded = frozenset(int(i) for i in excluded)
    _check(model, spec, method, sparsity, nm, excluded, batch_size, blocksize, percdamp)
    nm = None if nm is None else (int(nm[0]), int(nm[1]))
    masks = WeightMasks(model, spec, excluded=excluded)  # validates `excluded`
    layers = spec.decoder_layers(model)
    paths = spec.projections()
    bar = tqdm(total=len(layers), desc=f"{method} (layer-wise)", unit="layer", disable=not progress)

    if method == "magnitude":
        for i, layer in enumerate(layers):
            if i not in excluded:
                scores = {(i, p): base_weight(layer.get_submodule(p)).detach().float().abs() for p in paths}
                _select(masks, i, scores, sparsity, nm, per_row=False)
                _apply(masks, layer, i, paths)
            bar.update(1)
        bar.close()
        return masks

    check_tokens(calib_tokens)
    if method == "sparsegpt":
        widths = {
            f"layer {i} {p}": base_layer(layer.get_submodule(p)).in_features
            for i, layer in enumerate(layers) if i not in excluded for p in paths
        }
        check_hessian_tokens(int(calib_tokens.numel()), widths)

    inputs = capture_inputs(model, calib_tokens, spec, batch_size)
    try:
        for i, layer in enumerate(layers):
            if i not in excluded:
                with InputStats(layer, paths, hessian=method == "sparsegpt") as stats:
                    run_layer(layer, inputs, i, write=False)
                if method == "wanda":
                    scores = {(i, p): wanda_scores(base_weight(layer.get_submodule(p)), stats.sq_norm[p]) for p in paths}
                    _select(masks, i, scores, sparsity, nm, per_row=True)
                    _apply(masks, layer, i, paths)
                else:
                    for p in paths:
                        w = base_weight(layer.get_submodule(p))
                        used = {}
                        keep, _ = sparsegpt_prune(w.data, stats.take_hessian(p), sparsity, nm, blocksize, percdamp, f"layer {i} {p}", used)
                        masks.set_mask(i, p, keep)
                        if damping is not None and used["percdamp"] != percdamp:
                            damping[f"layer {i} {p}"] = used["percdamp"]
                del stats
            if i < len(layers) - 1:
                run_layer(layer, inputs, i)  # the pruned layer's outputs feed layer i+1
            bar.update(1)
    finally:
        bar.close()
    return masks
