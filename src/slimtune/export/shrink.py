"""Physical removal: slice the weights of pruned heads, channels and layers out of the model,
following the plan that `masking/plan.py` derives from the masks."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SlimtuneError
from ..masking.plan import _slices, layer_plan
from ..masking.structured import StructuredMasks
from ..models.arch import base_layer


@torch.no_grad()
def _slice_linear(module: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None, on_slice=None) -> None:
    if on_slice is not None:  # before any tensor is replaced: state kept per entry elsewhere follows the same slices
        on_slice(module, rows, cols)
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
        if isinstance(a, nn.Parameter):  # AdaLoRA keeps bare factors: Q [r, in], P [out, r]
            if cols is not None:
                module.lora_A[name] = nn.Parameter(a[:, cols.to(a.device)].contiguous(), requires_grad=a.requires_grad)
            if rows is not None:
                module.lora_B[name] = nn.Parameter(b[rows.to(b.device)].contiguous(), requires_grad=b.requires_grad)
            continue
        if cols is not None:
            a.weight = nn.Parameter(a.weight[:, cols.to(w.device)].contiguous(), requires_grad=a.weight.requires_grad)
            a.in_features = a.weight.shape[1]
        if rows is not None:
            b.weight = nn.Parameter(b.weight[rows.to(w.device)].contiguous(), requires_grad=b.weight.requires_grad)
            b.out_features = b.weight.shape[0]
    if module is not base:
        module.out_features, module.in_features = w.shape


@torch.no_grad()
def shrink_(model: nn.Module, masks: StructuredMasks, on_slice=None) -> dict:
    """Slice pruned units out of `model` in place and update its config. Returns per-layer sizes.
    `on_slice(module, rows, cols)` is called for each projection before it is sliced (kept row and
    column indices, None for all)."""
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
            _slice_linear(layer.get_submodule(path), r, c, on_slice)
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
