"""LoRAPrune importance (Zhang et al. 2023, arXiv 2305.18403).

The gradient of a frozen base weight W0 is estimated from the LoRA gradients alone. One SGD step
on A and B moves B·A by −η(G_B·A + B·G_A) + η²·G_B·G_A; the official code takes η = 1:

    Ĝ = G_B·A + B·G_A − G_B·G_A         G_A [r, in], G_B [out, r]; s is not divided out
    S = |Ĝ ⊙ (W0 + s·B·A)|              element score (power=2: the squared Taylor form)

DoRA (arXiv 2402.09353) needs no change. PEFT detaches the row norm n = ‖V‖_row of V = W0 + s·B·A
(the paper's §4.3), so W' = (m/n)⊙V gives G_V = (m/n)⊙G_W' = W0.grad, G_A = s·Bᵀ·G_V and
G_B = s·G_V·Aᵀ: Ĝ estimates s·G_V exactly as it estimates s·G for plain LoRA, and since m/n is
one scalar per row, |G_V ⊙ V| = |G_W' ⊙ W'|, the Taylor score of the effective (merged) weight.
(With dropout > 0, A and B see the dropped inputs while W0 does not, as in plain LoRA.)

S is reduced at once, one projection at a time, to head / channel vectors (reduce.py: per-module
l2 normalisation, summed per block) and to a layer score (the sum of S), so the state is a few
vectors per layer and memory stays at LoRA level. The unit vectors are smoothed with
Ī ← λ·Ī + (1−λ)·Î (λ = 0.9, Ī starts at 0, no bias correction); a step whose scores are not all
finite is skipped and counted in `skipped`.

The state lives on the model's device (each layer's vectors next to its weights), so `observe`
reads nothing back to the host but one flag per step: whether all of the step's scores are
finite. `unit_scores()`, `layer_scores()` and `state_dict()` return CPU copies.

metric:
    lora       Ĝ from the LoRA gradients (default)
    grad       the true W0.grad, the memory-hungry reference (see `enable_full_grad`)
    magnitude  Ĝ = 1, so S = |W0 + s·B·A|

Call `observe(model)` every optimiser step, after backward and gradient clipping/unscaling and
before `optimizer.step()`. `update(model, batch)` runs its own forward/backward for one-shot use.
`keep_elements=True` also keeps an element-level EMA of S (for unstructured or N:M pruning); that
costs one fp32 weight-sized tensor per adapted projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..adapters.lora import lora_pairs, lora_weights, scaling
from ..errors import SlimtuneError
from ..masking.structured import StructuredMasks
from ..models.arch import get_arch
from ..training.loss import causal_lm_loss
from .base import ElementScores, Importance, projection_weights

METRICS = ("lora", "grad", "magnitude")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 are upcast, fp64 stays fp64 for exact tests); may alias `t`."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def lora_grad_estimate(A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor) -> torch.Tensor:
    """Ĝ = G_B·A + B·G_A − G_B·G_A  [out, in], computed in (at least) fp32."""
    A, B, gA, gB = _fp32(A), _fp32(B), _fp32(gA), _fp32(gB)
    g = gB @ A
    g.addmm_(B, gA)
    g.addmm_(gB, gA, alpha=-1.0)
    return g


def _l2(v: torch.Tensor) -> torch.Tensor:
    return v / (v.norm() + 1e-8)  # the "l2" normalisation of reduce.py, bit for bit


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def all_finite(tensors) -> bool:
    """True when every element of `tensors` is finite: one host sync however many devices they span."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        flags.setdefault(t.device, []).append(t.reshape(-1))
    per_device = [torch.isfinite(torch.cat(ts)).all() for ts in flags.values()]
    if not per_device:
        return True
    first = per_device[0].device
    return bool(torch.stack([f.to(first) for f in per_device]).all())


def enable_full_grad(model: nn.Module, spec=None) -> Callable[[], None]:
    """Let the base projection weights get `.grad` (metric="grad"); returns a function that restores
    the previous flags. This costs a weight-sized gradient per projection: full fine-tuning memory."""
    spec = spec or get_arch(model)
    weights = [w for _, _, w in projection_weights(model, spec)]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)

    def restore() -> None:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
            if not flag:
                w.grad = None

    return restore


def check_adapter_coverage(spec, adapted: set[tuple[int, str]], units: set[str], layers: list[int]) -> None:
    """Only adapted projections get a LoRA-gradient estimate. A unit none of whose projections
    carries an adapter would score 0 in every layer and be pruned by index: refuse that.
    `adapted` holds (layer, projection path) pairs; unstructured pruning needs every projection."""
    groups = {"heads": (spec.q, spec.k, spec.v, spec.o), "channels": (*spec.mlp_in, spec.mlp_out),
              "layers": spec.projections(), "weights": spec.projections()}
    for unit in sorted(units):
        paths = groups[unit]
        for i in layers:
            gap = [p for p in paths if (i, p) not in adapted]
            if (unit == "weights" and gap) or len(gap) == len(paths):
                names = ",".join(p.rsplit(".", 1)[-1] for p in gap)
                raise SlimtuneError(
                    f"LoRAPrune cannot score {unit}: layer {i} has no LoRA adapter on {names}, so those scores would all be 0 "
                    f"and units would go by index; add {names} to --lora-targets (default: all seven) or use another --granularity"
                )


class LoRAPruneImportance(Importance):
    name = "loraprune"
    mode = "progressive"
    needs_grad = True

    @classmethod
    def needs_data_for(cls, options: dict) -> bool:
        return options.get("metric", "lora") != "magnitude"

    def __init__(self, model, spec=None, metric: str = "lora", power: int = 1, beta: float = 0.9, keep_elements: bool = False):
        super().__init__(model, spec)
        if metric not in METRICS:
            raise SlimtuneError(f"unknown LoRAPrune metric '{metric}'; choose one of {', '.join(METRICS)}")
        if power not in (1, 2):
            raise SlimtuneError(f"LoRAPrune power {power} is invalid; use 1 (|G·W|) or 2 ((G·W)²)")
        if not 0.0 <= beta < 1.0:
            raise SlimtuneError(f"LoRAPrune EMA factor {beta} is outside [0, 1); the paper uses 0.9")
        self.metric, self.power, self.beta, self.keep_elements = metric, power, beta, keep_elements
        self.needs_data = self.needs_data_for({"metric": metric})
        self._weights = {(i, path): w for i, path, w in projection_weights(model, self.spec)}
        self._lora = {(i, path): m for i, path, m in lora_pairs(model, self.spec)}
        if metric == "lora" and not self._lora:
            raise SlimtuneError("LoRAPrune found no LoRA adapters on the decoder projections; call attach_lora before creating it")
        self.geometry = StructuredMasks(model, self.spec).geometry
        self.steps, self.skipped = 0, 0
        # each layer's vectors sit next to its weights (a device_map may spread layers over GPUs)
        where: dict[int, torch.device] = {}
        for (i, _), w in self._weights.items():
            where.setdefault(i, w.device)
        devices = [where.get(i, torch.device("cpu")) for i in range(len(self.geometry))]
        self.heads = [torch.zeros(g.num_heads, device=d) for g, d in zip(self.geometry, devices)]
        self.channels = [torch.zeros(g.intermediate, device=d) for g, d in zip(self.geometry, devices)]
        self.layer = torch.zeros(len(self.geometry), device=devices[0] if devices else None)
        self.elements: dict[tuple[int, str], torch.Tensor] = {}

    @classmethod
    def check_targets(cls, spec, num_layers: int, targets: set[str], units: set[str], layers: list[int], options: dict) -> None:
        if options.get("metric", "lora") == "lora":
            adapted = {(i, p) for i in range(num_layers) for p in spec.projections() if p.rsplit(".", 1)[-1] in targets}
            check_adapter_coverage(spec, adapted, units, layers)

    def check_coverage(self, units: set[str], layers: list[int]) -> None:
        if self.metric == "lora":
            check_adapter_coverage(self.spec, set(self._lora), units, layers)

    # ---- one step's scores ------------------------------------------------------------------
    def _keys(self) -> list[tuple[int, str]]:
        return list(self._lora) if self.metric == "lora" else list(self._weights)

    @torch.no_grad()
    def _element(self, key) -> torch.Tensor | None:
        """S for one projection [out, in] fp32, or None when it has no gradient this step."""
        w0 = self._weights[key]
        lora = self._lora.get(key)
        if self.metric == "lora":
            A, B = lora_weights(lora)
            if A.grad is None or B.grad is None:
                return None
            g = lora_grad_estimate(A, B, A.grad, B.grad)
        elif self.metric == "grad":
            if w0.grad is None:
                return None
            g = _fp32(w0.grad)
        if lora is not None:
            A, B = lora_weights(lora)
            w = torch.addmm(_fp32(w0), _fp32(B), _fp32(A), alpha=scaling(lora))  # W0 + s·B·A
        else:
            w = _fp32(w0).clone()  # a copy: the in-place ops below must not touch W0
        s = w.abs_() if self.metric == "magnitude" else w.mul_(g).abs_()
        return s.square_() if self.power == 2 else s

    def _unit_parts(self, i: int, path: str, one: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This projection's l2-normalised head [H] and channel [I] vectors from its row sums [out, 1]
        or column sums [1, in] (o/down): reduce.head_scores / channel_scores, kept on the device."""
        spec, g = self.spec, self.geometry[i]
        v = one.float()
        if path == spec.q:
            return _l2(v.reshape(g.num_heads, g.head_dim, -1).sum(dim=(1, 2))), None
        if path == spec.o:
            return _l2(v.reshape(-1, g.num_heads, g.head_dim).sum(dim=(0, 2))), None
        if path in (spec.k, spec.v):
            kv = _l2(v.reshape(g.num_kv_heads, g.head_dim, -1).sum(dim=(1, 2)))
            return kv.repeat_interleave(g.group_size) / g.group_size, None
        if path in spec.mlp_in:
            return None, _l2(v.sum(dim=1))
        if path == spec.mlp_out:
            return None, _l2(v.sum(dim=0))
        return None, None

    def _step_units(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """This step's unit vectors, computed where the weights are: no host sync."""
        heads = [torch.zeros_like(h) for h in self.heads]
        chans = [torch.zeros_like(c) for c in self.channels]
        layer = torch.zeros_like(self.layer)
        seen = False
        for i, path in self._keys():
            s = self._element((i, path))
            if s is None:
                continue
            seen = True
            layer[i] += s.sum().to(layer.device, layer.dtype)  # as the old float(): fp64 sums round first
            # Normalisation is per module, so modules reduce one at a time. A unit is a set of rows
            # (q/k/v/gate/up) or columns (o/down); their sums are all it needs.
            cols = path in (self.spec.o, self.spec.mlp_out)
            h, c = self._unit_parts(i, path, s.sum(dim=0 if cols else 1, keepdim=True))  # [1, in] or [out, 1]
            if h is not None:
                heads[i] += h.to(heads[i].device)
            if c is not None:
                chans[i] += c.to(chans[i].device)
        if not seen:
            raise RuntimeError("LoRAPrune found no gradients; call observe() after loss.backward() and before optimizer.zero_grad()")
        return heads, chans, layer

    # ---- the EMA ------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, model=None) -> bool:
        """Fold this step's scores into the EMA; False when the step was skipped (non-finite)."""
        heads, chans, layer = self._step_units()
        if not all_finite((*heads, *chans, layer)):  # the one host sync of the step
            self.skipped += 1
            return False
        b, a = self.beta, 1.0 - self.beta
        for ema, new in zip((*self.heads, *self.channels, self.layer), (*heads, *chans, layer)):
            ema.mul_(b).add_(a * new)
        if self.keep_elements:  # second pass: recomputing beats holding every S until the finite check
            for key in self._keys():
                s = self._element(key)
                if s is None:
                    continue
                ema = self.elements.setdefault(key, torch.zeros_like(s))
                ema.mul_(b).add_(s.mul_(a))
        self.steps += 1
        return True

    def update(self, model, batch: torch.LongTensor) -> None:
        """One-shot use: forward and backward on `batch` [b, L], observe, drop the gradients."""
        params = self._grad_params()
        for p in params:
            p.grad = None
        with torch.enable_grad():
            causal_lm_loss(model, batch).backward()
        self.observe(model)
        for p in params:
            p.grad = None

    def _grad_params(self) -> list[torch.Tensor]:
        if self.metric == "grad":
            return list(self._weights.values())
        return [p for m in self._lora.values() for p in lora_weights(m)]

    # ---- results ------------------------------------------------------------------------------
    def unit_scores(self) -> list[dict]:
        """EMA scores [{"heads": [H], "channels": [I], "layer": float}] on the CPU, as reduce.unit_scores."""
        layer = _cpu(self.layer)
        return [
            {"heads": _cpu(h), "channels": _cpu(c), "layer": float(layer[i])}
            for i, (h, c) in enumerate(zip(self.heads, self.channels))
        ]

    def layer_scores(self) -> torch.Tensor:
        return _cpu(self.layer)

    def element_scores(self) -> ElementScores:
        out: ElementScores = {}
        for (i, path), ema in self.elements.items():
            out.setdefault(i, {})[path] = ema.clone()
        return out

    def state_dict(self) -> dict:
        return {
            "metric": self.metric,
            "steps": self.steps,
            "skipped": self.skipped,
            "heads": [_cpu(h) for h in self.heads],
            "channels": [_cpu(c) for c in self.channels],
            "layer": _cpu(self.layer),
            "elements": {f"{i}:{path}": _cpu(t) for (i, path), t in self.elements.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["metric"] != self.metric or len(state["heads"]) != len(self.heads):
            raise SlimtuneError("LoRAPrune state does not match this model or metric; resume with the original options")
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])
        for dst, src in zip((*self.heads, *self.channels, self.layer), (*state["heads"], *state["channels"], state["layer"])):
            dst.copy_(src)
        self.elements = {}
        for name, t in state["elements"].items():
            i, path = name.split(":", 1)
            self.elements[(int(i), path)] = t.to(self._weights[(int(i), path)].device, copy=True)

    def remove(self) -> None:
        self._weights, self._lora, self.elements = {}, {}, {}
