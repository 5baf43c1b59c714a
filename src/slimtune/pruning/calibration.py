"""Layer-by-layer calibration for one-shot pruning (Wanda, SparseGPT, layer-wise magnitude).

One-shot pruners calibrate each decoder layer on the inputs it sees in the *pruned* model:
layer i is fed the outputs of layers 0..i-1 after those were pruned (Wanda, arXiv 2306.11695 §3;
SparseGPT, arXiv 2301.00774 §4). The flow:

    inputs = capture_inputs(model, tokens)          # layer 0's inputs [n, L, d] + the kwargs of every layer
    for i, layer in enumerate(layers):
        with InputStats(layer, paths, hessian=True) as stats:
            run_layer(layer, inputs, i, write=False)  # hooks see every projection's input
        ... prune / update the layer with stats ...
        run_layer(layer, inputs, i)                 # the PRUNED layer's outputs become layer i+1's inputs

Only one layer's inputs live at a time: the [n, L, d] buffer is overwritten batch by batch with the
layer's outputs (each sequence's output depends on that sequence alone). Hidden states keep the
model's dtype; the statistics are accumulated in fp32.

The decoder layers are not called through the model after the capture, so the keyword arguments
the model passes them (rotary position embeddings, attention mask, position ids; for Qwen2/Qwen3 a
different mask for sliding-window layers) are recorded for every layer at capture time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SlimtuneError
from ..models.arch import ArchSpec, base_layer, get_arch, unwrap

_DROP = ("cache", "past_key_values", "past_key_value", "use_cache", "output_attentions")


class _Stop(Exception):
    """Raised by the last patched layer: the model's final norm and LM head need not run."""


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, tuple | list) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return a is b or a == b


def _reuse(new: dict, old: dict | None) -> dict:
    """`new` with every value equal to the one in `old` replaced by old's object, so equal
    masks and position embeddings of consecutive batches are stored once."""
    if old is None:
        return new
    return {k: old[k] if k in old and _same(v, old[k]) else v for k, v in new.items()}


@dataclass
class LayerInputs:
    """The inputs of the current decoder layer for every calibration sequence.

    hidden: [n, L, d] in the model's dtype (overwritten with each layer's outputs by `run_layer`).
    calls: calls[layer][batch] = (extra positional args, kwargs) the model passed that layer.
    """

    hidden: torch.Tensor
    batch_size: int
    calls: list[list[tuple[tuple, dict]]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]

    def slices(self) -> list[slice]:
        n = self.hidden.shape[0]
        return [slice(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]


def check_tokens(tokens) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.numel() == 0 or tokens.is_floating_point():
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise SlimtuneError(f"calibration needs a [sequences, seq_len] LongTensor of token ids, got {shape}; pack the calibration text into windows first")


def _first_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def capture_inputs(model: nn.Module, tokens: torch.LongTensor, spec: ArchSpec | None = None, batch_size: int = 1) -> LayerInputs:
    """Run the embeddings on `tokens` [n, L] and record decoder layer 0's hidden states [n, L, d]
    plus the arguments the model passes every decoder layer. The decoder layers do not compute:
    each is replaced for the capture by a recorder that passes its input through, and the last one
    stops the forward (so neither the layers nor the LM head cost anything)."""
    check_tokens(tokens)
    if batch_size < 1:
        raise SlimtuneError(f"batch_size must be >= 1, got {batch_size}; pass a positive batch size")
    spec = spec or get_arch(model)
    layers = spec.decoder_layers(model)
    root = unwrap(model)
    device = _first_device(root)
    n_layers = len(layers)
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in range(n_layers)]
    n = tokens.shape[0]
    buf: list[torch.Tensor] = []  # the [n, L, d] buffer, allocated on the first batch
    filled = [0]

    def recorder(j):
        def forward(hidden_states, *args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in _DROP}
            prev = calls[j][-1][1] if calls[j] else None
            calls[j].append((args, _reuse(kwargs, prev)))
            if j == 0:
                b = hidden_states.shape[0]
                if not buf:
                    buf.append(hidden_states.new_empty((n, *hidden_states.shape[1:])))
                buf[0][filled[0] : filled[0] + b] = hidden_states
                filled[0] += b
            if j == n_layers - 1:
                raise _Stop
            return hidden_states

        return forward

    patched = []
    was_training = root.training
    root.eval()
    try:
        for j, layer in enumerate(layers):
            patched.append((layer, "forward" in layer.__dict__, layer.__dict__.get("forward")))
            layer.forward = recorder(j)
        for s in range(0, tokens.shape[0], batch_size):
            batch = tokens[s : s + batch_size].to(device=device, dtype=torch.long)
            try:
                root(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        for layer, had, original in patched:
            if had:
                layer.forward = original
            else:
                del layer.forward
        root.train(was_training)
    batches = len(range(0, n, batch_size))
    if filled[0] != n or any(len(c) != batches for c in calls):
        raise RuntimeError("decoder layer capture is incomplete: the model did not call every decoder layer once per batch")
    return LayerInputs(hidden=buf[0], batch_size=batch_size, calls=calls)


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, index: int, write: bool = True) -> None:
    """Call decoder layer `index` on every batch of `inputs`. write=True overwrites `inputs.hidden`
    with the outputs (the next layer's inputs); write=False only runs it (for statistics hooks)."""
    device = _first_device(layer)
    if inputs.hidden.device != device:  # layers spread over devices (device_map): follow the layer
        inputs.hidden = inputs.hidden.to(device)
    was_training = layer.training
    layer.eval()
    try:
        for b, sl in enumerate(inputs.slices()):
            args, kwargs = inputs.calls[index][b]
            out = _output(layer(inputs.hidden[sl], *_to(args, device), **_to(kwargs, device)))
            if write:
                inputs.hidden[sl] = out.to(inputs.hidden.dtype)
    finally:
        layer.train(was_training)


class InputStats:
    """Forward hooks that accumulate, in fp32, per projection of one decoder layer:

    - sq_norm[path]: Σ_tokens x_j², the squared column norm ‖X_j‖² of every input feature (Wanda);
    - xtx[path] (hessian=True): Σ_tokens x xᵀ = XᵀX [in, in];
    - tokens[path]: how many input rows were seen.

    `take_hessian(path)` hands over the accumulated matrix as 2·XᵀX / tokens (SparseGPT's layer-wise
    Hessian of ‖WX − ŴX‖²) and frees it here, so at most one [in, in] matrix per projection lives.

    Use as a context manager; the hooks are removed on exit.
    """

    def __init__(self, layer: nn.Module, paths, hessian: bool = False):
        self.hessian_wanted = hessian
        self.sq_norm: dict[str, torch.Tensor] = {}
        self.xtx: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles = []
        for path in paths:
            module = layer.get_submodule(path)
            self._handles.append(module.register_forward_hook(self._hook(path, base_layer(module).in_features)))

    def _hook(self, path: str, in_features: int):
        def hook(module, args, output):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.shape[-1] != in_features:
                raise RuntimeError(f"{path} was called without its [.., {in_features}] input as first positional argument")
            x = x.detach().reshape(-1, in_features).float()
            if path not in self.sq_norm:
                self.sq_norm[path] = torch.zeros(in_features, dtype=torch.float32, device=x.device)
                self.tokens[path] = 0
                if self.hessian_wanted:
                    self.xtx[path] = torch.zeros(in_features, in_features, dtype=torch.float32, device=x.device)
            self.sq_norm[path] += x.square().sum(dim=0)
            self.tokens[path] += x.shape[0]
            if self.hessian_wanted:
                self.xtx[path].addmm_(x.T, x)

        return hook

    def take_hessian(self, path: str) -> torch.Tensor:
        """H = 2·XᵀX / tokens, fp32 [in, in], scaled in place and removed from these statistics."""
        if path not in self.xtx:
            raise RuntimeError(f"no Hessian collected for {path}")
        return self.xtx.pop(path).mul_(2.0 / max(self.tokens[path], 1))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> InputStats:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
