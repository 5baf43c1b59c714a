"""Physical removal: slice the weights of pruned heads, channels and layers out of the model.

The slicing plan is derived from `StructuredMasks` alone, so the parameter count of the shrunk
model is known before anything is sliced (the pruner uses that to hit its target exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SlimtuneError
from ..masks import StructuredMasks
from ..models.arch import base_layer, own_params


@dataclass
class LayerPlan:
    heads: torch.Tensor  # kept query-head indices
    kv_heads: torch.Tensor  # kept KV-head indices
    channels: torch.Tensor  # kept MLP channel indices
    head_dim: int

    def head_rows(self) -> torch.Tensor:
        return _expand(self.heads, self.head_dim)

    def kv_rows(self) -> torch.Tensor:
        return _expand(self.kv_heads, self.head_dim)


def _expand(units: torch.Tensor, size: int) -> torch.Tensor:
    # unit indices [n] -> element indices [n * size]
    return (units[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def layer_plan(masks: StructuredMasks, i: int) -> LayerPlan | None:
    """Kept units of layer i, or None when the whole layer is removed."""
    if masks.layer(i).item() == 0:
        return None
    g = masks.geometry[i]
    heads = masks.heads(i).nonzero().flatten()
    kv = masks.kv_heads(i).nonzero().flatten()
    channels = masks.channels(i).nonzero().flatten()
    if len(heads) == 0 or len(channels) == 0:
        raise SlimtuneError(f"layer {i} would lose every head or every channel; lower --sparsity or prune whole layers with --granularity layers")
    per_group = masks.heads(i).view(g.num_kv_heads, g.group_size).sum(dim=1)
    kept_groups = per_group[per_group > 0]
    if not bool((kept_groups == kept_groups[0]).all()):
        raise SlimtuneError(f"layer {i}: kept query heads differ between KV groups {per_group.tolist()}, which GQA cannot express; prune heads with --head-mode kv_groups or equal counts per group")
    return LayerPlan(heads=heads, kv_heads=kv, channels=channels, head_dim=g.head_dim)


def _linear_params(module: nn.Module, rows: int | None, cols: int | None) -> int:
    base = base_layer(module)
    out_f, in_f = base.weight.shape
    rows = out_f if rows is None else rows
    cols = in_f if cols is None else cols
    return rows * cols + (rows if base.bias is not None else 0)


def _slices(spec, plan: LayerPlan) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Module path -> (kept output rows, kept input columns); None means keep all."""
    rows = {spec.q: plan.head_rows(), spec.k: plan.kv_rows(), spec.v: plan.kv_rows()}
    out = {path: (r, None) for path, r in rows.items()}
    out[spec.o] = (None, plan.head_rows())
    for path in spec.mlp_in:
        out[path] = (plan.channels, None)
    out[spec.mlp_out] = (None, plan.channels)
    return out


def decoder_param_count(model: nn.Module, masks: StructuredMasks) -> tuple[int, int]:
    """(decoder parameters now, decoder parameters after shrinking with these masks)."""
    spec = masks.spec
    before = after = 0
    for i, layer in enumerate(spec.decoder_layers(model)):
        n_layer = own_params(layer)
        before += n_layer
        plan = layer_plan(masks, i)
        if plan is None:
            continue
        saved = 0
        for path, (r, c) in _slices(spec, plan).items():
            m = layer.get_submodule(path)
            saved += _linear_params(m, None, None) - _linear_params(m, None if r is None else len(r), None if c is None else len(c))
        after += n_layer - saved
    return before, after


@torch.no_grad()
def _slice_linear(module: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    base = base_layer(module)
    w = base.weight
    if rows is not None:
        w = w[rows.to(w.device)]
    if cols is not None:
        w = w[:, cols.to(w.device)]
    base.weight = nn.Parameter(w.contiguous(), requires_grad=base.weight.requires_grad)
    if base.bias is not None and rows is not None:
        base.bias = nn.Parameter(base.bias[rows.to(w.device)].contiguous(), requires_grad=base.bias.requires_grad)
    base.out_features, base.in_features = w.shape
    # PEFT LoRA wrapper: B's rows follow the output, A's columns follow the input.
    for name in getattr(module, "lora_A", {}) or {}:
        a, b = module.lora_A[name], module.lora_B[name]
        if cols is not None:
            a.weight = nn.Parameter(a.weight[:, cols.to(w.device)].contiguous(), requires_grad=a.weight.requires_grad)
            a.in_features = a.weight.shape[1]
        if rows is not None:
            b.weight = nn.Parameter(b.weight[rows.to(w.device)].contiguous(), requires_grad=b.weight.requires_grad)
            b.out_features = b.weight.shape[0]
    if module is not base:
        module.out_features, module.in_features = w.shape


@torch.no_grad()
def shrink_(model: nn.Module, masks: StructuredMasks) -> dict:
    """Slice pruned units out of `model` in place and update its config. Returns per-layer sizes."""
    from ..models.arch import unwrap

    spec = masks.spec
    root = unwrap(model)
    config = root.config
    layers = spec.decoder_layers(model)
    plans = [layer_plan(masks, i) for i in range(len(masks))]
    kept_layers, sizes = [], []
    for i, (layer, plan) in enumerate(zip(layers, plans)):
        if plan is None:
            continue
        for path, (r, c) in _slices(spec, plan).items():
            _slice_linear(layer.get_submodule(path), r, c)
        n_heads, n_kv = len(plan.heads), len(plan.kv_heads)
        attn = layer.get_submodule(spec.attention)
        for key, value in spec.attention_attrs(n_heads, n_kv, plan.head_dim).items():
            setattr(attn, key, value)
        kept_layers.append(i)
        sizes.append({"num_heads": n_heads, "num_kv_heads": n_kv, "intermediate": len(plan.channels), "head_dim": plan.head_dim})
    if not kept_layers:
        raise SlimtuneError("every decoder layer would be removed; lower --sparsity")
    new_layers = nn.ModuleList([layers[i] for i in kept_layers])
    for new_idx, layer in enumerate(new_layers):
        # the KV cache is indexed by layer_idx, so renumber what survives
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    parent_path, _, attr = spec.layers.rpartition(".")
    setattr(root.get_submodule(parent_path), attr, new_layers)
    config.num_hidden_layers = len(kept_layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept_layers]
    return {"kept_layers": kept_layers, "layers": sizes}
