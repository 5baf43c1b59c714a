"""Masks applied as gates on module inputs and layer outputs, during training and evaluation.

Pruned heads are gated at the input of o_proj (one gate per query head, repeated over head_dim),
pruned channels at the input of down_proj, and a pruned layer passes its input straight through.
Gating there, rather than on q/k/v outputs, makes the masked forward equal the physically shrunk
forward even when a KV head is shared by kept and pruned query heads (GQA): zeroing q rows would
only flatten the attention pattern, not remove the head's output.

The hooks never read a mask on the host: a gate of ones multiplies exactly, and the layer gate
selects with `torch.where`. Reading gates to skip that work cost three device-to-host syncs per
decoder layer per forward on a GPU, each of which drains the queue of kernels behind it, and it kept
`torch.compile` from tracing a layer in one graph.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.arch import base_layer
from .handles import Pausable
from .structured import StructuredMasks


class GateHandles(Pausable):
    """The hooks of `attach_gates`. While `enabled` is False (see `paused()`) every gate passes its
    input through unchanged, so the model computes its dense function (e.g. as a distillation teacher)."""

    def __init__(self, handles):
        super().__init__()
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def attach_gates(model: nn.Module, masks: StructuredMasks) -> GateHandles:
    spec = masks.spec
    handles = []
    state = GateHandles(handles)  # the hooks read state.enabled
    for i, layer in enumerate(spec.decoder_layers(model)):
        hd = masks.geometry[i].head_dim
        handles.append(layer.get_submodule(spec.o).register_forward_pre_hook(_input_gate(masks, "heads", i, hd, state)))
        handles.append(layer.get_submodule(spec.mlp_out).register_forward_pre_hook(_input_gate(masks, "channels", i, 1, state)))
        handles.append(layer.register_forward_hook(_layer_gate(masks, i, state), with_kwargs=True))
    return state


def _input_gate(masks: StructuredMasks, kind: str, i: int, repeat: int, state: GateHandles):
    @torch.compiler.disable  # eager under --compile: traced, the layer index `i` would recompile every layer
    def hook(module, args):
        if not state.enabled:
            return None
        x = args[0]
        gate = getattr(masks, f"{kind}_{i}")
        if repeat > 1:
            gate = gate.repeat_interleave(repeat)  # [H] -> [H * head_dim]
        return (x * gate.to(dtype=x.dtype, device=x.device), *args[1:])  # x * 1 is exactly x

    return hook


def _layer_gate(masks: StructuredMasks, i: int, state: GateHandles):
    @torch.compiler.disable
    def hook(module, args, kwargs, output):
        if not state.enabled:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        gate = masks.layer(i).to(dtype=x.dtype, device=x.device)
        # exactly `out` at 1 and exactly `x` at 0 (also when `out` is not finite), the blend between
        gated = torch.where(gate == 1, out, torch.where(gate == 0, x, x + gate * (out - x)))
        return (gated, *output[1:]) if isinstance(output, tuple) else gated

    return hook


@torch.no_grad()
def zero_pruned_weights(model: nn.Module, masks: StructuredMasks) -> None:
    """Write zeros into the weights of pruned units (rows of q/k/v/gate/up, columns of o/down).

    Gates alone already make the forward exact; zeroing the weights too keeps a model that is
    saved *without* shrinking (e.g. for inspection) honest about what was pruned.
    """
    spec = masks.spec
    for i, layer in enumerate(spec.decoder_layers(model)):
        g = masks.geometry[i]
        head_rows = masks.heads(i).repeat_interleave(g.head_dim).bool()
        kv_rows = masks.kv_heads(i).repeat_interleave(g.head_dim).bool()
        chan = masks.channels(i).bool()
        for path, rows in ((spec.q, head_rows), (spec.k, kv_rows), (spec.v, kv_rows)):
            _zero_rows(layer.get_submodule(path), ~rows)
        for path in spec.mlp_in:
            _zero_rows(layer.get_submodule(path), ~chan)
        base_layer(layer.get_submodule(spec.o)).weight[:, ~head_rows] = 0
        base_layer(layer.get_submodule(spec.mlp_out)).weight[:, ~chan] = 0


def _zero_rows(module: nn.Module, rows: torch.Tensor) -> None:
    base = base_layer(module)
    base.weight[rows] = 0
    if base.bias is not None:
        base.bias[rows] = 0
