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

AdaLoRA (P·diag(λ)·Q) is refused for metric "lora": it starts every λ at 0, and G_P = s·G·Qᵀ·diag(λ),
G_Q = s·diag(λ)·Pᵀ·G vanish with it, so the only informative gradient is G_λ = s·diag(Pᵀ·G·Qᵀ),
r numbers per projection with nothing per row or column. On the bundled model the Spearman
correlation of the unit scores with the true-gradient ones stays within ±0.06 over 20 steps, against
0.62-0.87 with LoRA (benchmarks/loraprune_fidelity.py), and the default run ended at 29x dense
perplexity. The "grad" and "magnitude" metrics take W = W0 + s·P·diag(λ)·Q.

S is reduced at once, one projection at a time, to head / channel vectors (reduce.py: per-module
l2 normalisation, summed per block) and to a layer score (the sum of S), so the state is a few
vectors per layer and memory stays at LoRA level. The unit vectors are smoothed with
Ī ← λ·Ī + (1−λ)·Î (λ = 0.9, Ī starts at 0, no bias correction); a step whose scores are not all
finite is skipped and counted in `skipped`.

The state lives on the model's device (each layer's vectors next to its weights), so `observe`
reads nothing back to the host but one flag per step: whether all of the step's scores are
finite. `unit_scores()`, `layer_scores()` and `state_dict()` return CPU copies.

smoothing="uncertainty" (AdaLoRA, Zhang et al. 2023, arXiv 2303.10512 §3.3; PLATON, arXiv
2206.12562) also tracks how much the step scores scatter around their EMA, and ranks by both:

    Ī ← λ·Ī + (1−λ)·Î,    Ū ← λ₂·Ū + (1−λ₂)·|Î − Ī|,    score = Ī·Ū     (λ₂ = 0.85, AdaLoRA's)

Ū is updated with the new Ī, as PEFT's AdaLoRA does. A unit whose importance is uncertain is kept
a while longer. AdaLoRA applies this per weight and sums to its triplets; here it runs on the same
unit vectors as the EMA (and per weight with keep_elements), so it costs one more vector per unit.

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
from dataclasses import astuple

import torch
from torch import nn

from ..adapters.lora import adapter_params, adapter_product, is_adalora, lora_pairs, lora_weights, scaling
from ..errors import SlimtuneError
from ..masking.structured import StructuredMasks
from ..models.arch import get_arch
from ..training.loss import causal_lm_loss
from .base import ElementScores, Importance, projection_weights

METRICS = ("lora", "grad", "magnitude")
ADALORA_REFUSAL = ("criterion '{name}' estimates the weight gradient from the LoRA gradients, which carry no per-row or per-column "
                   "information under AdaLoRA (its singular values start at 0); use --criterion mask_fisher or grad, a one-shot "
                   "criterion, or --lora-variant lora")
SMOOTHINGS = ("ema", "uncertainty")


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


def _l2_rows(v: torch.Tensor) -> torch.Tensor:
    """The "l2" normalisation of reduce.py applied to every row of v [n, k]."""
    return v / (v.norm(dim=1, keepdim=True) + 1e-8)


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


def check_adapter_coverage(spec, adapted: set[tuple[int, str]], units: set[str], layers: list[int], name: str = "loraprune") -> None:
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
                    f"criterion '{name}' cannot score {unit} from LoRA gradients: layer {i} has no LoRA adapter on {names}, so those scores would all be 0 "
                    f"and units would go by index; add {names} to --lora-targets (default: all seven) or use another --granularity"
                )


class LoRAPruneImportance(Importance):
    name = "loraprune"
    mode = "progressive"
    needs_grad = True

    @classmethod
    def needs_data_for(cls, options: dict) -> bool:
        return options.get("metric", "lora") != "magnitude"

    def __init__(self, model, spec=None, metric: str = "lora", power: int = 1, beta: float = 0.9, keep_elements: bool = False,
                 stack_mib: float = 0.0, smoothing: str = "ema", beta2: float = 0.85):
        """stack_mib: how many MiB of fp32 weights one batched score computation may stack (see
        `_batches`). 0, the default, scores one projection at a time: the least memory, and on a
        CPU the fastest (SmolLM2, 2 cores: 0.12 s per observe against 0.47 s with 64 MiB stacks).
        Stacking is meant for GPUs, where a step of a small model waits for kernel launches (1,495
        instead of 7,394 tensor operations per observe for SmolLM2; both figures from
        benchmarks/importance_ops.py); benchmarks/loraprune_overhead.py
        --stack-mib measures it, and it becomes the GPU default once it has been measured there."""
        super().__init__(model, spec)
        if metric not in METRICS:
            raise SlimtuneError(f"unknown LoRAPrune metric '{metric}'; choose one of {', '.join(METRICS)}")
        if power not in (1, 2):
            raise SlimtuneError(f"LoRAPrune power {power} is invalid; use 1 (|G·W|) or 2 ((G·W)²)")
        if not 0.0 <= beta < 1.0:
            raise SlimtuneError(f"LoRAPrune EMA factor {beta} is outside [0, 1); the paper uses 0.9")
        if smoothing not in SMOOTHINGS:
            raise SlimtuneError(f"unknown LoRAPrune smoothing '{smoothing}'; choose one of {', '.join(SMOOTHINGS)}")
        if not 0.0 <= beta2 < 1.0:
            raise SlimtuneError(f"LoRAPrune uncertainty factor {beta2} is outside [0, 1); AdaLoRA uses 0.85")
        self.smoothing, self.beta2 = smoothing, beta2
        self.metric, self.power, self.beta, self.keep_elements = metric, power, beta, keep_elements
        self.needs_data = self.needs_data_for({"metric": metric})
        self._weights = {(i, path): w for i, path, w in projection_weights(model, self.spec)}
        self._lora = {(i, path): m for i, path, m in lora_pairs(model, self.spec)}
        if metric == "lora" and not self._lora:
            raise SlimtuneError("LoRAPrune found no LoRA adapters on the decoder projections; call attach_lora before creating it")
        if metric == "lora" and any(is_adalora(m) for m in self._lora.values()):
            raise SlimtuneError(ADALORA_REFUSAL.format(name=self.name))
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
        # smoothing="uncertainty": Ū beside each EMA (same shapes)
        self.unc = [torch.zeros_like(t) for t in (*self.heads, *self.channels, self.layer)] if smoothing == "uncertainty" else []
        self.unc_elements: dict[tuple[int, str], torch.Tensor] = {}
        if not stack_mib >= 0:
            raise SlimtuneError(f"LoRAPrune stack_mib {stack_mib} must be 0 (one projection at a time) or a positive size in MiB")
        self.stack_bytes = int(stack_mib * 2**20)
        self._index_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def check_settings(cls, config) -> None:
        from .registry import get_criterion  # here: the registry imports this module

        if config.lora.variant == "adalora" and get_criterion(config.criterion).options.get("metric", "lora") == "lora":
            raise SlimtuneError(ADALORA_REFUSAL.format(name=config.criterion))

    @classmethod
    def check_targets(cls, spec, num_layers: int, targets: set[str], units: set[str], layers: list[int], options: dict) -> None:
        if options.get("metric", "lora") == "lora":
            adapted = {(i, p) for i in range(num_layers) for p in spec.projections() if p.rsplit(".", 1)[-1] in targets}
            check_adapter_coverage(spec, adapted, units, layers, options.get("name", cls.name))

    def check_coverage(self, units: set[str], layers: list[int]) -> None:
        if self.metric == "lora":
            check_adapter_coverage(self.spec, set(self._lora), units, layers, self.name)

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
            A, B, scale = adapter_product(lora)  # AdaLoRA: A = λ ⊙ Q
            w = torch.addmm(_fp32(w0), _fp32(B), _fp32(A), alpha=scale)  # W0 + s·B·A
        else:
            w = _fp32(w0).clone()  # a copy: the in-place ops below must not touch W0
        s = w.abs_() if self.metric == "magnitude" else w.mul_(g).abs_()
        return s.square_() if self.power == 2 else s

    def _unit_sums(self, i: int, path: str, s: torch.Tensor) -> torch.Tensor | None:
        """Per-unit sums [n, U] of n same-shaped projections' element scores s [n, out, in] (layer i's
        geometry): query heads of q (rows) and o (columns), KV heads of k and v (rows), channels of
        gate/up (rows) and down (columns). A unit is a set of rows or columns; their sums are all it needs."""
        spec, g, n = self.spec, self.geometry[i], s.shape[0]
        v = s.sum(dim=1 if path in (spec.o, spec.mlp_out) else 2)  # [n, in] column or [n, out] row sums
        if path in (spec.q, spec.o):
            return v.reshape(n, g.num_heads, g.head_dim).sum(dim=2)
        if path in (spec.k, spec.v):
            return v.reshape(n, g.num_kv_heads, g.head_dim).sum(dim=2)
        if path in (*spec.mlp_in, spec.mlp_out):
            return v
        return None

    def _unit_parts(self, i: int, path: str, s: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The l2-normalised head [n, H] and channel [n, I] vectors of `_unit_sums`: reduce.head_scores /
        channel_scores, on the device. Normalisation is per projection, i.e. per row of the result."""
        spec, g = self.spec, self.geometry[i]
        v = self._unit_sums(i, path, s)
        if v is None:
            return None, None
        v = _l2_rows(v.float())
        if path in (spec.q, spec.o):
            return v, None
        if path in (spec.k, spec.v):
            return v.repeat_interleave(g.group_size, dim=1) / g.group_size, None
        return None, v

    def _step_units(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """This step's unit vectors, computed where the weights are: no host sync."""
        heads = [torch.zeros_like(h) for h in self.heads]
        chans = [torch.zeros_like(c) for c in self.channels]
        layer = torch.zeros_like(self.layer)
        seen = False
        for keys in self._batches():
            seen = True
            if len(keys) == 1:
                self._add_one(keys[0], heads, chans, layer)
            else:
                self._add_stacked(keys, heads, chans, layer)
        if not seen:
            raise RuntimeError("LoRAPrune found no gradients; call observe() after loss.backward() and before optimizer.zero_grad()")
        return heads, chans, layer

    def _add_one(self, key, heads, chans, layer) -> None:
        i, path = key
        s = self._element(key)
        layer[i] += s.sum().to(layer.device, layer.dtype)  # as the old float(): fp64 sums round first
        h, c = self._unit_parts(i, path, s.unsqueeze(0))
        if h is not None:
            heads[i] += h[0].to(heads[i].device)
        if c is not None:
            chans[i] += c[0].to(chans[i].device)

    # ---- many projections at once (GPU) -----------------------------------------------------
    def _has_grad(self, key) -> bool:
        if self.metric == "lora":
            return all(p.grad is not None for p in adapter_params(self._lora[key]))
        return self.metric != "grad" or self._weights[key].grad is not None

    def _batches(self) -> list[list[tuple[int, str]]]:
        """This step's projections with a gradient, grouped so that one group is scored as one
        stacked computation: the same projection in different layers (same shapes, dtypes, device,
        LoRA scaling and layer geometry), at most `stack_bytes` of fp32 weight per group. One
        projection at a time costs about 15 small kernels each, 3,000 per step for SmolLM2's 210
        projections, and on a GPU the step waits for their launches; stacked, it is 15 per group."""
        groups: dict[tuple, list] = {}
        order = []
        for key in self._keys():
            if not self._has_grad(key):
                continue
            i, path = key
            w0, lora = self._weights[key], self._lora.get(key)
            sig = (path, tuple(w0.shape), w0.dtype, w0.device, astuple(self.geometry[i]))
            if lora is not None:
                A, B = lora_weights(lora)
                sig += (tuple(A.shape), A.dtype, scaling(lora))
            if sig not in groups:
                groups[sig] = []
                order.append(sig)
            groups[sig].append(key)
        out = []
        for sig in order:
            keys = groups[sig]
            per = 4 * self._weights[keys[0]].numel()
            size = max(1, self.stack_bytes // per)
            out += [keys[j:j + size] for j in range(0, len(keys), size)]
        return out

    def _stack(self, tensors) -> torch.Tensor:
        return _fp32(torch.stack([t.detach() for t in tensors]))

    def _gradient_and_weight(self, keys) -> tuple[torch.Tensor | None, torch.Tensor]:
        """G (Ĝ, or W0.grad with metric="grad"; None with "magnitude") and W = W0 + s·B·A of the
        same-shaped projections `keys`, each [n, out, in], at least fp32: fresh tensors the caller may
        overwrite (W0 is never touched)."""
        w0s = [self._weights[k] for k in keys]
        loras = [self._lora.get(k) for k in keys]
        w = self._stack(w0s)
        if loras[0] is not None:
            products = [adapter_product(m) for m in loras]  # AdaLoRA: A = λ ⊙ Q
            A = self._stack([a for a, _, _ in products])  # [n, r, in]
            B = self._stack([b for _, b, _ in products])  # [n, out, r]
            w.baddbmm_(B, A, alpha=products[0][2])  # W0 + s·B·A (the group shares s)
        if self.metric == "grad":
            return self._stack([w0.grad for w0 in w0s]), w
        if self.metric != "lora":
            return None, w
        gA = self._stack([lora_weights(m)[0].grad for m in loras])
        gB = self._stack([lora_weights(m)[1].grad for m in loras])
        g = torch.bmm(gB, A)  # Ĝ = G_B·A + B·G_A − G_B·G_A
        g.baddbmm_(B, gA)
        g.baddbmm_(gB, gA, alpha=-1.0)
        return g, w

    def _stacked_elements(self, keys) -> torch.Tensor:
        """S for the projections `keys` as one [n, out, in] tensor: `_element`, batched."""
        g, w = self._gradient_and_weight(keys)
        if g is not None:
            w.mul_(g)
        w.abs_()
        return w.square_() if self.power == 2 else w

    def _index(self, layers: list[int], device: torch.device) -> torch.Tensor:
        """Layer indices as a device tensor, made once per group: building it every step would be a
        host-to-device copy each time."""
        key = (tuple(layers), device)
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor(layers, device=device)
        return self._index_cache[key]

    def _add_stacked(self, keys, heads, chans, layer) -> None:
        layers = [i for i, _ in keys]
        s = self._stacked_elements(keys)  # [n, out, in]
        layer.index_add_(0, self._index(layers, layer.device), s.sum(dim=(1, 2)).to(layer.device, layer.dtype))
        h, c = self._unit_parts(layers[0], keys[0][1], s)  # the group shares one layer geometry
        for vectors, rows in ((heads, h), (chans, c)):
            if rows is not None:
                targets = [vectors[i] for i in layers]
                torch._foreach_add_(targets, [r.to(t.device, t.dtype) for r, t in zip(rows.unbind(0), targets)])

    # ---- the EMA ------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, model=None) -> bool:
        """Fold this step's scores into the EMA; False when the step was skipped (non-finite)."""
        heads, chans, layer = self._step_units()
        if not all_finite((*heads, *chans, layer)):  # the one host sync of the step
            self.skipped += 1
            return False
        b, a = self.beta, 1.0 - self.beta
        emas, news = [*self.heads, *self.channels, self.layer], [*heads, *chans, layer]
        torch._foreach_mul_(emas, b)  # two launches for all layers; the same arithmetic as ema·b + (a·new)
        torch._foreach_add_(emas, torch._foreach_mul(news, a))
        if self.unc:  # Ū ← λ₂·Ū + (1−λ₂)·|Î − Ī| with the new Ī
            torch._foreach_mul_(self.unc, self.beta2)
            torch._foreach_add_(self.unc, torch._foreach_mul(torch._foreach_abs(torch._foreach_sub(news, emas)), 1.0 - self.beta2))
        if self.keep_elements:  # second pass: recomputing beats holding every S until the finite check
            for key in self._keys():
                s = self._element(key)
                if s is None:
                    continue
                ema = self.elements.setdefault(key, torch.zeros_like(s))
                raw = s.clone() if self.smoothing == "uncertainty" else None
                ema.mul_(b).add_(s.mul_(a))
                if raw is not None:
                    unc = self.unc_elements.setdefault(key, torch.zeros_like(raw))
                    unc.mul_(self.beta2).add_(raw.sub_(ema).abs_().mul_(1.0 - self.beta2))
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
        return [p for m in self._lora.values() for p in adapter_params(m)]

    # ---- results ------------------------------------------------------------------------------
    def _smoothed(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """The ranking scores: the EMAs, or Ī·Ū with smoothing="uncertainty"."""
        n = len(self.heads)
        emas = [*self.heads, *self.channels, self.layer]
        if self.unc:
            emas = [e * u for e, u in zip(emas, self.unc)]
        return emas[:n], emas[n:2 * n], emas[-1]

    def unit_scores(self) -> list[dict]:
        """EMA scores [{"heads": [H], "channels": [I], "layer": float}] on the CPU, as reduce.unit_scores."""
        heads, channels, layer = self._smoothed()
        layer = _cpu(layer)
        return [
            {"heads": _cpu(h), "channels": _cpu(c), "layer": float(layer[i])}
            for i, (h, c) in enumerate(zip(heads, channels))
        ]

    def layer_scores(self) -> torch.Tensor:
        return _cpu(self._smoothed()[2])

    def element_scores(self) -> ElementScores:
        out: ElementScores = {}
        for (i, path), ema in self.elements.items():
            unc = self.unc_elements.get((i, path))
            out.setdefault(i, {})[path] = ema * unc if unc is not None else ema.clone()
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
            "smoothing": self.smoothing,
            "unc": [_cpu(t) for t in self.unc],
            "unc_elements": {f"{i}:{path}": _cpu(t) for (i, path), t in self.unc_elements.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["metric"] != self.metric or len(state["heads"]) != len(self.heads):
            raise SlimtuneError("LoRAPrune state does not match this model or metric; resume with the original options")
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])
        for dst, src in zip((*self.heads, *self.channels, self.layer), (*state["heads"], *state["channels"], state["layer"])):
            dst.copy_(src)
        if state.get("smoothing", "ema") != self.smoothing:
            raise SlimtuneError(f"LoRAPrune state was smoothed with '{state.get('smoothing', 'ema')}', not '{self.smoothing}'; resume with the original criterion")
        for dst, src in zip(self.unc, state.get("unc", [])):
            dst.copy_(src)
        self.elements = self._placed(state["elements"])
        self.unc_elements = self._placed(state.get("unc_elements", {}))

    def _placed(self, saved: dict) -> dict:
        out = {}
        for name, t in saved.items():
            i, path = name.split(":", 1)
            out[(int(i), path)] = t.to(self._weights[(int(i), path)].device, copy=True)
        return out

    def remove(self) -> None:
        self._weights, self._lora, self.elements, self.unc_elements = {}, {}, {}, {}
