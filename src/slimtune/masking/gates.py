"""Masks applied as gates on module inputs and layer outputs, during training and evaluation.

Pruned heads are gated at the input of o_proj (one gate per query head, repeated over head_dim),
pruned channels at the input of down_proj, and a pruned layer passes its input straight through.
Gating there, rather than on q/k/v outputs, makes the masked forward equal the physically shrunk
forward even when a KV head is shared by kept and pruned query heads (GQA): zeroing q rows would
only flatten the attention pattern, not remove the head's output.

The hooks never read a mask on the host: a gate of ones multiplies exactly, and the layer gate
selects with `torch.where`. Reading gates to skip that work cost three device-to-host syncs per
decoder layer per forward on a GPU, each of which drains the queue of kernels behind it. Nor do
they copy the masks (kept on the CPU) to the GPU in every forward: `DeviceCopy` keeps each gate's
device copy until its mask changes. Write masks in place (`set`, `copy_`) or replace the buffer;
a write through `.data` bypasses the version counter and would go unseen.
"""

from __future__ import annotations

import weakref

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
        self.kinds: frozenset[str] = frozenset(("heads", "channels", "layers"))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def attach_gates(model: nn.Module, masks: StructuredMasks, kinds=("heads", "channels", "layers")) -> GateHandles:
    """Gate the model by `masks`. Only the `kinds` given get hooks (a pruner passes its granularity):
    a gate that stays open would still cost its kernels in every forward and backward. The handles
    record the kinds, and `check_gated` refuses masks that closed a unit of another kind."""
    spec = masks.spec
    handles = []
    state = GateHandles(handles)  # the hooks read state.enabled
    state.kinds = frozenset(kinds)
    unknown = state.kinds - {"heads", "channels", "layers"}
    if unknown:
        raise ValueError(f"unknown gate kinds {sorted(unknown)}; use heads, channels or layers")
    for i, layer in enumerate(spec.decoder_layers(model)):
        hd = masks.geometry[i].head_dim
        if "heads" in state.kinds:
            handles.append(layer.get_submodule(spec.o).register_forward_pre_hook(_input_gate(masks, "heads", i, hd, state)))
        if "channels" in state.kinds:
            handles.append(layer.get_submodule(spec.mlp_out).register_forward_pre_hook(_input_gate(masks, "channels", i, 1, state)))
        if "layers" in state.kinds:
            handles.append(layer.register_forward_hook(_layer_gate(masks, i, state), with_kwargs=True))
    return state


def check_gated(masks: StructuredMasks, handles: GateHandles) -> None:
    """Masks that closed a unit no gate applies would change the saved model but not the trained one."""
    getters = {"heads": masks.heads, "channels": masks.channels, "layers": masks.layer}
    for kind in sorted(set(getters) - handles.kinds):
        for i in range(len(masks)):
            if bool((getters[kind](i) != 1).any()):
                raise RuntimeError(f"{kind} of layer {i} are masked, but only {', '.join(sorted(handles.kinds))} are gated; "
                                   f"attach_gates(..., kinds=...) must name every kind the masks prune")


def _input_gate(masks: StructuredMasks, kind: str, i: int, repeat: int, state: GateHandles):
    here = DeviceCopy()

    @torch.compiler.disable  # eager under --compile: traced, the layer index `i` would recompile every layer
    def hook(module, args):
        if not state.enabled:
            return None
        x = args[0]
        return (x * here.get(getattr(masks, f"{kind}_{i}"), x, repeat), *args[1:])  # x * 1 is exactly x

    return hook


def _layer_gate(masks: StructuredMasks, i: int, state: GateHandles):
    here = DeviceCopy()

    @torch.compiler.disable
    def hook(module, args, kwargs, output):
        if not state.enabled:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        gate = here.get(masks.layer(i), x)
        # exactly `out` at 1 and exactly `x` at 0 (also when `out` is not finite), the blend between
        gated = torch.where(gate == 1, out, torch.where(gate == 0, x, x + gate * (out - x)))
        return (gated, *output[1:]) if isinstance(output, tuple) else gated

    return hook


class DeviceCopy:
    """A mask as its consumer needs it: for a gate, on the activations' device and dtype, head gates
    repeated over head_dim (l0.py keeps one per gate's live-unit mask for the same reason),
    made again only when the mask changed: the masks live on the CPU, and copying one to a GPU in
    every forward is a synchronising host-to-device copy per gate, three per decoder layer. A change
    is seen by the tensor's identity (a buffer replaced, e.g. by `.to()`) and its version counter
    (any in-place write, e.g. `StructuredMasks.set` or `load_state_dict`). Reading either never
    touches the device."""

    def __init__(self):
        self._source, self._version, self._key, self._gate = None, -1, None, None

    def get(self, mask: torch.Tensor, like: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        # an inference-mode copy cannot be saved for a later backward: made again outside that mode
        key = (like.device, like.dtype, repeat, torch.is_inference_mode_enabled())
        if self._source is None or self._source() is not mask or self._version != mask._version or self._key != key:
            gate = mask.repeat_interleave(repeat) if repeat > 1 else mask  # [H] -> [H * head_dim]
            self._gate = gate.to(device=like.device, dtype=like.dtype, copy=True)  # a copy: never aliases the mask
            self._source, self._version, self._key = weakref.ref(mask), mask._version, key
        return self._gate


@torch.no_grad()
def zero_pruned_weights(model: nn.Module, masks: StructuredMasks) -> None:
    """Write zeros into the weights of pruned units (rows of q/k/v/gate/up, columns of o/down).

    Gates alone already make the forward exact; zeroing the weights too keeps a model that is
    saved *without* shrinking (e.g. for inspection) honest about what was pruned. A pruned layer
    loses every head and channel, and the biases of o_proj and down_proj, so both residual branches
    add exactly 0: in a pre-norm block (every supported architecture but OPT-350m's post-norm) the
    layer is then the identity its gate made it. `shrink_` removes it either way.
    """
    spec = masks.spec
    for i, layer in enumerate(spec.decoder_layers(model)):
        g = masks.geometry[i]
        kept = masks.layer(i).bool()  # 0-d: a pruned layer keeps nothing
        head_rows = masks.heads(i).repeat_interleave(g.head_dim).bool() & kept
        kv_rows = masks.kv_heads(i).repeat_interleave(g.head_dim).bool() & kept
        chan = masks.channels(i).bool() & kept
        for path, rows in ((spec.q, head_rows), (spec.k, kv_rows), (spec.v, kv_rows)):
            _zero_rows(layer.get_submodule(path), ~rows)
        for path in spec.mlp_in:
            _zero_rows(layer.get_submodule(path), ~chan)
        for path, cols in ((spec.o, head_rows), (spec.mlp_out, chan)):
            out = base_layer(layer.get_submodule(path))
            out.weight[:, ~cols] = 0
            if out.bias is not None and not kept:
                out.bias.zero_()


def _zero_rows(module: nn.Module, rows: torch.Tensor) -> None:
    base = base_layer(module)
    base.weight[rows] = 0
    if base.bias is not None:
        base.bias[rows] = 0
