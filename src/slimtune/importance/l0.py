"""L0 gates on heads and channels, trained with a Lagrangian on the expected sparsity (CoFi,
Xia et al. 2022, arXiv 2204.00408; Sheared-LLaMA, Xia et al. 2023, arXiv 2310.06694; the gates of
Louizos et al. 2018, hard_concrete.py).

Every prunable unit gets a hard-concrete gate z with a learned log α: per query head at the input
of o_proj (CoFi's head gates; --head-mode kv_groups then removes the KV groups whose query heads
score lowest together), per MLP channel at the input of down_proj, in the prunable layers only. While training, one z per gate is drawn per
forward (shared by the micro-batch, as CoFi does); the loss gains

    ℒ = λ₁·(ŝ − t) + λ₂·(ŝ − t)²,    ŝ = 1 − E[kept decoder parameters] / decoder parameters

with E[kept] = Σ_units cost · P(z ≠ 0) over units the pruner has not removed yet (a KV head is
kept while any of its query heads is: 1 − Π(1 − P(z ≠ 0)) over its group). log α descends
ℒ with its own Adam (lr 0.1, CoFi's reg lr); λ₁, λ₂ start at 0 and ascend it (a second Adam with
maximize=True: CoFi's negative learning rate). t follows the pruner's schedule, started its warm-up
earlier, so gates close ahead of the hard removal. log α starts at `init` ± 0.01 and is clamped to
[−10, 10]. The default 2 (--l0-init) leaves about 40% of draws below 1, where they pass a
gradient; Sheared-LLaMA's 5 (gates almost surely open) clamps about 97% of draws to 1, and in the
default 48 steps its gates barely trained (3.45x dense against 1.89x at 2, benchmarks/default_run.py).

How it meets the engine: the pruner still removes units on its schedule and stops exactly at the
target. It ranks them by −log(1 − P(z ≠ 0)) (rank_score), the deterministic top-k of CoFi, so the
units whose gates the Lagrangian pushed closed go first. At the end the test-time gate
ẑ = clamp(1.2·σ(log α) − 0.1, 0, 1) of every kept unit is folded into the weights (o_proj and
down_proj input columns, base weight and LoRA A alike), so the exported model computes what the
gated model computed. ẑ is 1 for log α ≥ 2.4; below that the fold changes the weights, which the
adapter saved alone (for the unpruned base) does not carry.

Memory: one scalar per unit (about 50K for the bundled model) and their Adam moments. The gates'
gradients come from the same backward as the adapters'; no weight gradient is needed.
Not supported: layers (CoFi's layer gates are not implemented), unstructured/N:M, DoRA (the fold
would change its row norms), --quant (QAT shrinks the model under the gates) and fp16 autocast (the
gradient scaler would scale the gates' gradients; bf16 is fine).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SlimtuneError
from ..masking.gates import DeviceCopy
from ..masking.handles import Pausable
from ..masking.plan import unit_costs
from ..models.arch import base_weight, own_params, unwrap
from ..training.loss import causal_lm_loss
from .base import Importance
from .hard_concrete import BETA, prob_open, rank_score, sample, test_gate
from .loraprune import all_finite

CLAMP = 10.0


class L0Importance(Importance):
    name = "l0"
    mode = "progressive"
    scores = frozenset({"heads", "channels"})
    needs_grad = True

    def __init__(self, model, spec=None, keep_elements: bool = False, init: float = 2.0, lr: float = 0.1,
                 lagrangian_lr: float = 0.1, beta: float = BETA):
        super().__init__(model, spec)
        if not lr > 0 or not lagrangian_lr > 0:
            raise SlimtuneError(f"L0 learning rates must be positive, got {lr} (log α) and {lagrangian_lr} (λ)")
        if not 0 < beta < 1:
            raise SlimtuneError(f"L0 temperature β {beta} is outside (0, 1); the paper uses 2/3")
        self.init, self.lr, self.lagrangian_lr, self.beta = init, lr, lagrangian_lr, beta
        self.steps = self.skipped = 0
        self.alpha: dict[tuple[str, int], nn.Parameter] = {}
        self.handles = Pausable()
        self._hooks: list = []
        self._z: dict[tuple[str, int], torch.Tensor] = {}
        self._on_device: dict[tuple[str, int], DeviceCopy] = {}
        self.masks = None

    @classmethod
    def check_settings(cls, config) -> None:
        if config.lora.variant == "dora":
            raise SlimtuneError("--criterion l0 folds its gates into o_proj/down_proj columns, which would change DoRA's row norms; use --lora-variant lora or rslora")
        if config.quant.enabled:
            raise SlimtuneError("--criterion l0 with --quant is not supported: QAT shrinks the model under the gates; prune with l0 first, then quantise")
        if config.train.mixed_precision == "fp16":
            raise SlimtuneError("--criterion l0 needs unscaled gate gradients; use --mixed-precision bf16 or no")

    # ---- set-up (once the pruner knows the units, layers and schedule) -----------------------
    def bind(self, pruner) -> None:
        """Create the gates of the units `pruner` may remove and follow its schedule."""
        model, spec, masks = self.model, self.spec, pruner.masks
        if any("lora_magnitude_vector" in n for n, _ in model.named_parameters()):
            raise SlimtuneError("--criterion l0 cannot fold its gates into DoRA adapters; use --lora-variant lora or rslora")
        gran = pruner.settings.gran
        self.masks, self.kinds = masks, [k for k in ("heads", "channels") if getattr(gran, k)]
        layers = spec.decoder_layers(model)
        self.total = float(sum(own_params(layer) for layer in layers))
        self.cost: dict[tuple[str, int], tuple[float, ...]] = {}  # heads: (per query head, per KV head); channels: (per channel,)
        for i in pruner.prunable:
            g, c = masks.geometry[i], unit_costs(masks, layers[i], i)
            device = base_weight(layers[i].get_submodule(spec.o)).device
            if "heads" in self.kinds:
                self.cost[("heads", i)] = (float(c["q_head"]), float(c["kv"]))
                self._add(("heads", i), g.num_heads, device)
                self._hooks.append(layers[i].get_submodule(spec.o).register_forward_pre_hook(self._gate_hook("heads", i)))
            if "channels" in self.kinds:
                self.cost[("channels", i)] = (float(c["channel"]),)
                self._add(("channels", i), g.intermediate, device)
                self._hooks.append(layers[i].get_submodule(spec.mlp_out).register_forward_pre_hook(self._gate_hook("channels", i)))
        if not self.alpha:
            raise SlimtuneError("--criterion l0 found no prunable heads or channels to gate; check --granularity and --exclude-layers")
        device = next(iter(self.alpha.values())).device
        self.lambdas = torch.zeros(2, device=device, requires_grad=True)
        self.opt = torch.optim.Adam(list(self.alpha.values()), lr=self.lr)
        self.lag_opt = torch.optim.Adam([self.lambdas], lr=self.lagrangian_lr, maximize=True)
        sched = pruner.schedule
        self.target_at = lambda step: sched(min(step + sched.start, sched.total_steps))
        self._hooks.append(unwrap(model).get_decoder().register_forward_pre_hook(self._new_forward))

    def _add(self, key, n: int, device) -> None:
        self.alpha[key] = nn.Parameter(torch.full((n,), float(self.init), device=device) + 0.01 * torch.randn(n, device=device))

    # ---- the gates in the forward ------------------------------------------------------------
    @torch.compiler.disable
    def _new_forward(self, module, args):
        """Draw every gate once per forward, before the decoder layers run: a checkpointed layer's
        recompute then reuses the same z (and saves the same tensors). Outside training the
        deterministic ẑ is used, computed when a layer first asks."""
        if not self.handles.enabled:  # a paused (teacher) forward must not redraw the student's gates
            return
        training = module.training and torch.is_grad_enabled()
        self._z = {k: sample(a, self.beta) for k, a in self.alpha.items()} if training else {}

    def _gate(self, key) -> torch.Tensor:
        z = self._z.get(key)
        if z is None:
            z = self._z[key] = test_gate(self.alpha[key])
        return z

    def _gate_hook(self, kind: str, i: int):
        repeat = self.masks.geometry[i].head_dim if kind == "heads" else 1

        @torch.compiler.disable
        def hook(module, args):
            if not self.handles.enabled:
                return None
            x = args[0]
            z = self._gate((kind, i))
            if repeat > 1:
                z = z.repeat_interleave(repeat)
            return (x * z.to(x.dtype), *args[1:])

        return hook

    # ---- the Lagrangian ----------------------------------------------------------------------
    def _alive(self, kind: str, i: int) -> torch.Tensor:
        """The unit mask next to the gates, copied again only when the pruner changed it."""
        m = self.masks.heads(i) if kind == "heads" else self.masks.channels(i)
        return self._on_device.setdefault((kind, i), DeviceCopy()).get(m, self.alpha[(kind, i)])

    def expected_sparsity(self) -> torch.Tensor:
        """ŝ: the expected fraction of decoder parameters removed. Units already removed count as
        removed; a KV head stays while any of its query heads does: P = 1 − Π_group (1 − P(z ≠ 0))."""
        gated = kept = 0.0
        for (kind, i), a in self.alpha.items():
            p = self._alive(kind, i) * prob_open(a, self.beta)
            if kind == "heads":
                q_head, kv = self.cost[(kind, i)]
                g = self.masks.geometry[i]
                kv_open = 1 - (1 - p.view(g.num_kv_heads, g.group_size)).prod(dim=1)
                gated = gated + q_head * g.num_heads + kv * g.num_kv_heads
                kept = kept + q_head * p.sum() + kv * kv_open.sum()
            else:
                (channel,) = self.cost[(kind, i)]
                gated = gated + channel * a.numel()
                kept = kept + channel * p.sum()
        return (gated - kept) / self.total

    def loss_term(self) -> torch.Tensor:
        """λ₁·(ŝ − t) + λ₂·(ŝ − t)², added to each micro-batch's loss (divided like it)."""
        if self.masks is None:
            raise RuntimeError("L0Importance.bind(pruner) must run before training")
        s = self.expected_sparsity()
        self.last_expected = s.detach()
        d = s - self.target_at(self.steps + 1)
        return self.lambdas[0] * d + self.lambdas[1] * d * d

    def loss_log(self) -> dict[str, torch.Tensor]:
        """What the training log records beside the term: the gates' expected sparsity ŝ."""
        return {"gate_sparsity": self.last_expected}

    def update(self, model, batch: torch.LongTensor) -> None:
        """Outside a training loop: one forward (training mode, gates drawn) and backward of the LM
        loss plus `loss_term()` on `batch` [b, L], then the gates' step. Other gradients are dropped."""
        was = model.training
        model.train()
        try:
            with torch.enable_grad():
                (causal_lm_loss(model, batch) + self.loss_term()).backward()
        finally:
            model.train(was)
        self.observe(model)
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def observe(self, model=None) -> bool:
        """The gates' optimiser step (call after backward, before the adapters' step)."""
        from ..training import distributed

        params = [*self.alpha.values(), self.lambdas]
        distributed.current().average_gradients(params, [])
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            raise RuntimeError("the L0 gates got no gradient; add loss_term() to the loss and train in model.train() mode")
        finite = all_finite(grads)
        if finite:
            self.opt.step()
            self.lag_opt.step()
            for a in self.alpha.values():
                a.clamp_(-CLAMP, CLAMP)
            self.steps += 1
        else:
            self.skipped += 1
        for p in params:
            p.grad = None
        return finite

    # ---- results -----------------------------------------------------------------------------
    def unit_scores(self) -> list[dict]:
        out = []
        for i, g in enumerate(self.masks.geometry):
            row = {"heads": torch.zeros(g.num_heads), "channels": torch.zeros(g.intermediate), "layer": 0.0}
            if ("heads", i) in self.alpha:  # per query head; --head-mode kv_groups sums them per group
                row["heads"] = rank_score(self.alpha[("heads", i)].detach().float(), self.beta).cpu()
            if ("channels", i) in self.alpha:
                row["channels"] = rank_score(self.alpha[("channels", i)].detach().float(), self.beta).cpu()
            out.append(row)
        return out

    def state_dict(self) -> dict:
        return {"steps": self.steps, "skipped": self.skipped, "lambdas": self.lambdas.detach().cpu(),
                "alpha": {f"{k}:{i}": a.detach().cpu() for (k, i), a in self.alpha.items()},
                "opt": self.opt.state_dict(), "lag_opt": self.lag_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        mine = {f"{k}:{i}" for k, i in self.alpha}
        if set(state["alpha"]) != mine:
            raise SlimtuneError("L0 gate state does not match these units; resume with the original --granularity, --head-mode and --exclude-layers")
        with torch.no_grad():
            for (k, i), a in self.alpha.items():
                a.copy_(state["alpha"][f"{k}:{i}"])
            self.lambdas.copy_(state["lambdas"])
        self.opt.load_state_dict(state["opt"])
        self.lag_opt.load_state_dict(state["lag_opt"])
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])

    @torch.no_grad()
    def fold_(self) -> None:
        """Multiply each gated input column by its unit's ẑ, in the base weight and the LoRA A."""
        from ..adapters.lora import lora_weights

        layers = self.spec.decoder_layers(self.model)
        for (kind, i), a in self.alpha.items():
            module = layers[i].get_submodule(self.spec.o if kind == "heads" else self.spec.mlp_out)
            z = test_gate(a.detach().float())
            if kind == "heads":
                z = z.repeat_interleave(self.masks.geometry[i].head_dim)
            targets = [base_weight(module)]
            if hasattr(module, "lora_A") and module.active_adapters and module.active_adapters[0] in module.lora_A:
                targets.append(lora_weights(module)[0])
            for w in targets:
                w.mul_(z.to(w.device, w.dtype))

    def remove(self) -> None:
        """Fold the gates into the weights and drop the hooks (the model then computes what the gated
        model computed in eval mode)."""
        if self.alpha and self._hooks:
            self.fold_()
        for h in self._hooks:
            h.remove()
        self._hooks, self._z = [], {}

