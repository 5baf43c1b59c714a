"""Movement pruning's score (Sanh et al. 2020, arXiv 2005.07683), accumulated while LoRA fine-tunes.

Hard movement pruning learns a score matrix S next to W and keeps the top of S. The binarizer's
backward is the identity, so ∂L/∂S = (∂L/∂W')⊙W, and plain SGD from S₀ = 0 gives (METHODS.md §3)

    S_T = −α·Σ_t G_t ⊙ W_t        a cumulative sum, not an EMA: weights moving away from zero gain score

We accumulate that sum directly instead of learning S (α = 1: a constant factor ranks the same).
G is LoRAPrune's estimate Ĝ = G_B·A + B·G_A − G_B·G_A (`movement`, LoRA-level memory) or the true
W0.grad (`movement_grad`, full fine-tuning memory: api.py must call `enable_full_grad`), and
W = W0 + s·B·A is the weight the model computes with (loraprune.py explains both).

Structured units. The straight-through gradient of one score shared by a block of weights is the
sum over the block, so a head's or channel's score is the signed cumulative sum of its weights'
scores, kept per projection (q rows, k/v rows of its KV head, o columns; gate/up rows, down column).
When scores are read, each projection's cumulative unit vector is l2-normalised and the
projections of a block are summed, as reduce.unit_scores does for every criterion (LoRAPrune's
convention: q, k, v and o weigh alike). Dividing by a positive norm keeps every sign and the order
within a projection; normalising the cumulative vector rather than each step's keeps S_T the sum
the paper defines (steps with larger gradients count more). A layer's score is the raw signed sum
over all its weights, the straight-through gradient of a score gating the whole layer.

Sign. Higher is more important and the sign is kept (`signed = True`: groups sum before anything
else, but unlike taylor_vector there is no |.| afterwards): a unit whose weights shrink toward zero
has a negative score and goes first, while |S| would keep exactly those. Global ranking divides by
a layer's |mean|, which signed scores can bring near zero: prefer the default local ranking.

Pruned units stay pruned: our masks only grow, whereas in the paper a pruned weight still gets a
score gradient and can come back when its score recovers.

Memory: one small vector per projection (its heads, KV heads or channels) and one scalar per layer.
`keep_elements=True` (unstructured or N:M) also keeps the element-level S_T: one fp32 weight-sized
tensor per adapted projection, as LoRAPrune's element EMA.

`CumulativeImportance` is the machinery shared with SEVEN (seven.py): the finite check, the
cumulative unit sums, read-out and state. Gradient and weight per projection, and the per-unit sums,
come from LoRAPruneImportance (`_gradient_and_weight`, `_unit_sums`), which scores with the same ones.
"""

from __future__ import annotations

import torch

from ..adapters.lora import adapter_params
from ..errors import SlimtuneError
from .base import ElementScores
from .loraprune import LoRAPruneImportance, _cpu, enable_full_grad

Key = tuple[int, str]


def grads_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is finite, with one host sync. One flag per tensor: loraprune's
    `all_finite` concatenates, which would copy every weight-sized gradient of metric="grad"."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    per_device = [torch.stack(f).all() for f in flags.values()]
    if not per_device:
        return True
    return bool(torch.stack([f.to(per_device[0].device) for f in per_device]).all())


class CumulativeImportance(LoRAPruneImportance):
    """A cumulative sum (not an EMA) of a per-step element score, kept as per-projection unit sums.

    Subclasses implement `_step_scores(keys, g, w)`: the step's element scores [n, out, in] of the
    same-shaped projections `keys`, from their gradients g and weights w (both [n, out, in], at
    least fp32, fresh tensors the method may overwrite). The step's gradients are checked first
    (the one host sync), so a non-finite step changes no state and is counted in `skipped`.
    """

    def __init__(self, model, spec=None, metric: str = "lora", keep_elements: bool = False, normalise: str = "l2",
                 stack_mib: float = 0.0):
        if metric not in ("lora", "grad"):
            raise SlimtuneError(f"{self.name} metric '{metric}' is unknown; choose lora (the LoRA-gradient estimate) or grad (the true gradient)")
        if normalise not in ("l2", "none"):
            raise SlimtuneError(f"{self.name} normalisation '{normalise}' is unknown; choose l2 or none")
        super().__init__(model, spec, metric=metric, keep_elements=keep_elements, stack_mib=stack_mib)
        # LoRAPrune's per-unit EMA: the per-projection sums replace it, and every method that read it is overridden
        del self.heads, self.channels
        self.normalise = normalise
        self.sums: dict[Key, torch.Tensor] = {}  # cumulative unit sums [H], [K] or [I] per projection, on its device
        # self.layer (from LoRAPrune): the cumulative sum of every score of each layer

    def _step_scores(self, keys: list[Key], g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- one step -------------------------------------------------------------------------------
    def _grads(self, keys: list[Key]) -> list[torch.Tensor]:
        if self.metric == "grad":
            return [self._weights[k].grad for k in keys]
        return [p.grad for k in keys for p in adapter_params(self._lora[k])]

    @staticmethod
    def _add(store: dict[Key, torch.Tensor], keys: list[Key], rows: torch.Tensor) -> None:
        for key, row in zip(keys, rows.unbind(0)):
            if key in store:
                store[key].add_(row)
            else:
                store[key] = row.clone()

    @torch.no_grad()
    def observe(self, model=None) -> bool:
        """Add this step's scores to the sums; False when the step was skipped (non-finite gradients)."""
        batches = self._batches()
        if not batches:
            hint = "; the *_grad criteria also need enable_full_grad(model)" if self.metric == "grad" else ""
            raise RuntimeError(f"{self.name} found no gradients; call observe() after loss.backward() and before optimizer.zero_grad(){hint}")
        if not grads_finite([g for keys in batches for g in self._grads(keys)]):  # the one host sync of the step
            self.skipped += 1
            return False
        for keys in batches:
            layers = [i for i, _ in keys]
            s = self._step_scores(keys, *self._gradient_and_weight(keys))  # [n, out, in]
            self.layer.index_add_(0, self._index(layers, self.layer.device), s.sum(dim=(1, 2)).to(self.layer.device, self.layer.dtype))
            sums = self._unit_sums(layers[0], keys[0][1], s)  # a group shares one layer geometry
            if sums is not None:
                self._add(self.sums, keys, sums)
            if self.keep_elements:
                self._add(self.elements, keys, s)
        self.steps += 1
        return True

    def update(self, model, batch: torch.LongTensor) -> None:
        """One-shot use: forward and backward on `batch` [b, L], observe. With metric="grad" the base
        weights get gradients for this call only."""
        restore = enable_full_grad(model, self.spec) if self.metric == "grad" else None
        try:
            super().update(model, batch)
        finally:
            if restore is not None:
                restore()

    # ---- results ------------------------------------------------------------------------------
    def _read(self, key: Key) -> torch.Tensor | None:
        v = self.sums.get(key)
        if v is None:
            return None
        v = _cpu(v).float()
        return v / (v.norm() + 1e-8) if self.normalise == "l2" else v

    def unit_scores(self) -> list[dict]:
        """[{"heads": [H], "channels": [I], "layer": float}] on the CPU: reduce.unit_scores of the
        cumulative element scores (signed=False: no |.|), from the per-projection sums."""
        spec, layer, out = self.spec, _cpu(self.layer), []
        for i, g in enumerate(self.geometry):
            heads, chans = torch.zeros(g.num_heads), torch.zeros(g.intermediate)
            for path in (spec.q, spec.o, spec.k, spec.v):
                v = self._read((i, path))
                if v is not None:
                    heads += v if path in (spec.q, spec.o) else v.repeat_interleave(g.group_size) / g.group_size
            for path in (*spec.mlp_in, spec.mlp_out):
                v = self._read((i, path))
                if v is not None:
                    chans += v
            out.append({"heads": heads, "channels": chans, "layer": float(layer[i])})
        return out

    def layer_scores(self) -> torch.Tensor:
        return _cpu(self.layer)

    def element_scores(self) -> ElementScores:
        out: ElementScores = {}
        for (i, path), s in self.elements.items():
            out.setdefault(i, {})[path] = s.clone()
        return out

    # ---- checkpoints ----------------------------------------------------------------------------
    @staticmethod
    def _save(store: dict[Key, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{i}:{path}": _cpu(t) for (i, path), t in store.items()}

    def _load(self, saved: dict[str, torch.Tensor]) -> dict[Key, torch.Tensor]:
        out = {}
        for name, t in saved.items():
            i, path = name.split(":", 1)
            key = (int(i), path)
            if key not in self._weights:
                raise SlimtuneError(f"{self.name} state names projection {name}, which this model lacks; resume with the original model")
            out[key] = t.to(self._weights[key].device, copy=True)
        return out

    def state_dict(self) -> dict:
        return {"criterion": self.name, "metric": self.metric, "steps": self.steps, "skipped": self.skipped,
                "sums": self._save(self.sums), "layer": _cpu(self.layer), "elements": self._save(self.elements)}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("criterion"), state.get("metric")) != (self.name, self.metric) or len(state["layer"]) != len(self.layer):
            raise SlimtuneError(f"{self.name} state does not match this model, criterion or metric; resume with the original options")
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])
        self.layer.copy_(state["layer"])
        self.sums, self.elements = self._load(state["sums"]), self._load(state["elements"])

    def remove(self) -> None:
        super().remove()
        self.sums = {}


class MovementImportance(CumulativeImportance):
    name = "movement"
    signed = True

    @classmethod
    def check_settings(cls, config) -> None:
        super().check_settings(config)
        if config.prune.ranking == "global":  # selection divides by each layer's mean, which signed sums can bring to ~0
            raise SlimtuneError("--criterion movement gives signed scores, which --ranking global cannot compare across layers; use --ranking local")

    def _step_scores(self, keys, g, w):
        return w.mul_(g).neg_()  # −G ⊙ W
