"""Fisher importance of the structural gates, from activation gradients (LoRA-level memory).

Removing a unit is closing its gate: a query head's slice of the o_proj input, an MLP channel of
the down_proj input, or a whole layer (its output falls back to its input). This is where
`masking/gates.py` applies the masks, so the score measures exactly what pruning does. For a gate
m on activations x (m = 1 while the unit is kept), one sequence n's loss changes, to first order, by

    ΔL_n ≈ -∂L_n/∂m = -Σ_t Σ_{d in unit} g_{n,t,d} · x_{n,t,d}       g = ∂L/∂x at the gate

and the unit's score is the empirical Fisher information of its gate, Σ_n (∂L_n/∂m)²: the
expected second-order loss increase of removing it (Kwon et al. 2022, arXiv 2204.09656, mask
search for heads and filters; Liu et al. 2021, arXiv 2108.00708, group Fisher; the per-sample
squared first-order terms of Molchanov et al. 2019, arXiv 1906.10771). For a layer, x is the
layer's output and the sum runs over Σ_t g_t · (out_t - in_t).

Why it exists next to LoRAPrune: both need no gradient of any frozen weight. The activations and
their gradients are computed by every LoRA backward pass anyway; the hooks keep references to the
gate inputs until backward and reduce each to a vector at once. Memory: in fp32 the layer inputs
and outputs are tensors autograd keeps anyway (the norms read them); the o_proj and down_proj
inputs are too when --lora-dropout is 0 (LoRA's A gradient reads them), and otherwise cost one
[tokens, H·head_dim + intermediate] activation per layer until backward: activation-sized, never
weight-sized (SmolLM2-135M, 2 x 256 tokens: training peak 1863 MiB against LoRAPrune's 1818 and
the true weight gradient's 1969). Unlike LoRAPrune's estimate Ĝ (a rank-r view of the weight gradient, loraprune.py), the
gate gradient is exact: Σ_{d} g·x over a down_proj input channel equals LLM-Pruner's vector-wise
Σ G ⊙ W over that channel's down_proj column.

Progressive use, like LoRAPrune: the hooks accumulate over the micro-batches of an optimiser step;
`observe()` (after backward, before `optimizer.step()`) takes the step's vectors, all-reduces them
over ranks, divides each kind (heads, channels, layers) by its sum over the whole model, so that
loss scaling (fp16 GradScaler, accumulation) cancels while layers stay comparable, and folds them
into an EMA Ī ← β·Ī + (1-β)·Î (β = 0.9, Ī starts at 0). A KV group's score is the sum of its query
heads' scores (the pruner's reduction). Unstructured and N:M pruning are out of scope: a gate per
weight is the weight gradient this criterion avoids.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SlimtuneError
from ..masking.structured import StructuredMasks
from ..training import distributed
from ..training.loss import causal_lm_loss
from .base import Importance
from .loraprune import _cpu, all_finite

KINDS = ("heads", "channels", "layers")


def _per_sequence(x: torch.Tensor, g: torch.Tensor, n: int) -> torch.Tensor:
    """Σ_t g·x for every one of the n sequences and every feature: [n, D] in fp32. x may be
    [n, L, D] or flattened to [n·L, D] (OPT's MLP)."""
    d = x.shape[-1]
    return torch.einsum("ntd,ntd->nd", g.reshape(n, -1, d).float(), x.reshape(n, -1, d).float())


class MaskFisherImportance(Importance):
    name = "mask_fisher"
    scores = frozenset(KINDS)
    mode = "progressive"
    needs_grad = True

    def __init__(self, model: nn.Module, spec=None, beta: float = 0.9, keep_elements: bool = False):
        super().__init__(model, spec)
        if not 0.0 <= beta < 1.0:
            raise SlimtuneError(f"mask_fisher EMA factor {beta} is outside [0, 1); the usual choice is 0.9")
        self.beta = beta
        self.geometry = StructuredMasks(model, self.spec).geometry
        self.steps, self.skipped = 0, 0
        layers = list(self.spec.decoder_layers(model))
        devices = [next(layer.parameters()).device for layer in layers]
        self.heads = [torch.zeros(g.num_heads, device=d) for g, d in zip(self.geometry, devices)]
        self.channels = [torch.zeros(g.intermediate, device=d) for g, d in zip(self.geometry, devices)]
        self.layer = torch.zeros(len(layers), device=devices[0] if devices else None)
        self._step = self._zeros()
        self._seen = False
        self._handles = []
        self._sequences = 1  # sequences in the running forward, read off each decoder layer's input
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._count_sequences, with_kwargs=True))
            self._handles.append(layer.get_submodule(self.spec.o).register_forward_pre_hook(self._gate_input(i, "heads")))
            self._handles.append(layer.get_submodule(self.spec.mlp_out).register_forward_pre_hook(self._gate_input(i, "channels")))
            self._handles.append(layer.register_forward_hook(self._layer_output(i), with_kwargs=True))

    @classmethod
    def check_targets(cls, spec, num_layers: int, targets: set[str], units: set[str], layers: list[int], options: dict) -> None:
        check_gate_reach(spec, num_layers, lambda i, paths: any(p.rsplit(".", 1)[-1] in targets for p in paths), units, layers)

    def check_coverage(self, units: set[str], layers: list[int]) -> None:
        decoder = self.spec.decoder_layers(self.model)

        def trains(i: int, paths) -> bool:
            return any(p.requires_grad for path in paths for p in decoder[i].get_submodule(path).parameters())

        embed = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        upstream = embed is not None and any(p.requires_grad for p in embed.parameters())
        check_gate_reach(self.spec, len(self.geometry), trains, units, layers, upstream)

    def _zeros(self) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        return {"heads": [torch.zeros_like(h) for h in self.heads], "channels": [torch.zeros_like(c) for c in self.channels],
                "layers": torch.zeros_like(self.layer)}

    # ---- hooks: remember the gate input, reduce when its gradient arrives -----------------------
    def _count_sequences(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self._sequences = x.shape[0]

    def _gate_input(self, i: int, kind: str):
        def hook(module, args):
            x = args[0]
            if torch.is_grad_enabled() and x.requires_grad:
                saved, n = x.detach(), self._sequences
                x.register_hook(lambda g: self._add(i, kind, _per_sequence(saved, g, n)))
            return None

        return hook

    def _layer_output(self, i: int):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            if torch.is_grad_enabled() and out.requires_grad:
                x = args[0] if args else kwargs["hidden_states"]
                # references, not a difference: autograd already keeps both (the norms read them)
                x_in, x_out, n = x.detach(), out.detach(), x.shape[0]
                out.register_hook(lambda g: self._add(i, "layers", (_per_sequence(x_out, g, n) - _per_sequence(x_in, g, n)).sum(dim=1, keepdim=True)))
            return None

        return hook

    @torch.no_grad()
    def _add(self, i: int, kind: str, per_seq: torch.Tensor) -> None:
        """Fold one micro-batch's [n, D] first-order terms into this step's Σ_n (Σ_unit ·)²."""
        self._seen = True
        if kind == "heads":
            g = self.geometry[i]
            unit = per_seq.reshape(per_seq.shape[0], g.num_heads, g.head_dim).sum(dim=2)
            self._step["heads"][i] += unit.square().sum(dim=0).to(self._step["heads"][i].device)
        elif kind == "channels":
            self._step["channels"][i] += per_seq.square().sum(dim=0).to(self._step["channels"][i].device)
        else:
            self._step["layers"][i] += per_seq.square().sum().to(self._step["layers"].device)

    # ---- the EMA ------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, model=None) -> bool:
        """Fold this step's scores into the EMA; False when the step was skipped (non-finite)."""
        if not self._seen:
            raise RuntimeError("mask_fisher saw no gradients; call observe() after loss.backward(), with the hooks in place")
        step, self._step, self._seen = self._step, self._zeros(), False
        new = [*step["heads"], *step["channels"], step["layers"]]
        distributed.current().sum_(new)  # every rank saw other sequences
        if not all_finite(new):  # the one host sync of the step
            self.skipped += 1
            return False
        nh, nc = len(self.heads), len(self.channels)
        groups = (new[:nh], new[nh:nh + nc], new[-1:])
        b, a = self.beta, 1.0 - self.beta
        for ema, vectors in zip((self.heads, self.channels, [self.layer]), groups):
            total = sum(v.sum().to(vectors[0].device) for v in vectors).clamp_min(1e-30)
            for e, v in zip(ema, vectors):
                e.mul_(b).add_(v / total.to(v.device), alpha=a)
        self.steps += 1
        return True

    def update(self, model, batch: torch.LongTensor) -> None:
        """One-shot use: forward and backward on `batch` [b, L], observe, drop the gradients."""
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise SlimtuneError("mask_fisher needs a backward pass: nothing in the model requires grad (attach LoRA adapters first)")
        with torch.enable_grad():
            causal_lm_loss(model, batch).backward()
        self.observe(model)
        for p in params:
            p.grad = None

    # ---- results ------------------------------------------------------------------------------
    def unit_scores(self) -> list[dict]:
        layer = _cpu(self.layer)
        return [{"heads": _cpu(h), "channels": _cpu(c), "layer": float(layer[i])}
                for i, (h, c) in enumerate(zip(self.heads, self.channels))]

    def layer_scores(self) -> torch.Tensor:
        return _cpu(self.layer)

    def state_dict(self) -> dict:
        return {"criterion": self.name, "steps": self.steps, "skipped": self.skipped,
                "heads": [_cpu(h) for h in self.heads], "channels": [_cpu(c) for c in self.channels],
                "layer": _cpu(self.layer)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("criterion") != self.name or len(state["heads"]) != len(self.heads):
            raise SlimtuneError("mask_fisher state does not match this model or criterion; resume with the original options")
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])
        for dst, src in zip((*self.heads, *self.channels, self.layer), (*state["heads"], *state["channels"], state["layer"])):
            dst.copy_(src)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def check_gate_reach(spec, num_layers: int, trains, units: set[str], layers: list[int], upstream: bool = False) -> None:
    """A gate gets a gradient only when something before it trains. Refuse the units in `layers`
    whose gate none reaches (they would all score 0 and go by index). `trains(i, paths)` says
    whether any of layer i's projections `paths` trains; `upstream`, whether the embeddings do."""
    wanted = set(layers)
    for i in range(num_layers):
        reach = {"heads": upstream or trains(i, (spec.q, spec.k, spec.v))}
        reach["channels"] = reach["heads"] or trains(i, (spec.o, *spec.mlp_in))
        reach["layers"] = reach["channels"] or trains(i, (spec.mlp_out,))
        for unit in sorted(set(units) & set(KINDS)):
            if i in wanted and not reach[unit]:
                raise SlimtuneError(
                    f"mask_fisher cannot score {unit} in layer {i}: nothing before that gate trains, so no gradient reaches it; "
                    f"adapt the projections before it (default --lora-targets: all seven) or exclude layer {i} with --exclude-layers"
                )
        upstream = reach["layers"]

