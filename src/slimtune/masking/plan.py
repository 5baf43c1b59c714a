"""What structured masks keep, and what that costs in parameters.

The plan is derived from `StructuredMasks` alone, so the parameter count of the shrunk model is
known before anything is sliced: selection uses it to hit its target exactly, and
`export/shrink.py` slices along the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SlimtuneError
from ..models.arch import base_layer, own_params
from .structured import StructuredMasks


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


def linear_params(module: nn.Module, rows: int | None = None, cols: int | None = None) -> int:
    """Parameters of a Linear (LoRA wrapper ignored) that keeps `rows` outputs and `cols` inputs."""
    base = base_layer(module)
    out_f, in_f = base.weight.shape
    rows = out_f if rows is None else rows
    cols = in_f if cols is None else cols
    return rows * cols + (rows if base.bias is not None else 0)


def removal_cost(module: nn.Module, rows: int = 0, cols: int = 0) -> int:
    """Parameters freed by removing `rows` outputs and `cols` inputs of a Linear."""
    out_f, in_f = base_layer(module).weight.shape
    return linear_params(module) - linear_params(module, out_f - rows, in_f - cols)


def unit_costs(masks: StructuredMasks, layer: nn.Module, i: int) -> dict[str, int]:
    """Parameters freed in layer i by removing one query head ("q_head": its q rows and o columns),
    one KV head ("kv": its k and v rows), one MLP channel ("channel") or the whole layer ("layer")."""
    spec, hd = masks.spec, masks.geometry[i].head_dim
    q_head = removal_cost(layer.get_submodule(spec.q), rows=hd) + removal_cost(layer.get_submodule(spec.o), cols=hd)
    kv = removal_cost(layer.get_submodule(spec.k), rows=hd) + removal_cost(layer.get_submodule(spec.v), rows=hd)
    channel = sum(removal_cost(layer.get_submodule(p), rows=1) for p in spec.mlp_in) + removal_cost(layer.get_submodule(spec.mlp_out), cols=1)
    return {"q_head": q_head, "kv": kv, "channel": channel, "layer": own_params(layer)}


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
            saved += linear_params(m) - linear_params(m, None if r is None else len(r), None if c is None else len(c))
        after += n_layer - saved
    return before, after
