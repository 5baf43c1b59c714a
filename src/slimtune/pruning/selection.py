"""Ranking: turn unit scores and a sparsity target into masks.

The target is a fraction of decoder-layer parameters. Each prunable layer offers candidate
removals in ascending score order (already-pruned units first, so masks only grow):
- kv_groups: one KV group (its KV head and all its query heads) per candidate;
- q_heads: one "slot" per candidate, i.e. the next-lowest query head in *every* KV group, which
  keeps the same number of query heads per group, as GQA requires;
- channels: one MLP channel per candidate;
- layers: one whole decoder layer per candidate.
Local ranking prunes the same ratio in every layer (LoRAPrune's choice); global ranking merges
the candidates of all layers after dividing scores by their per-layer mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SlimtuneError, check_sparsity
from ..masking.plan import decoder_param_count, unit_costs
from ..masking.structured import StructuredMasks
from ..models.arch import own_params
from .granularity import Granularity

PRUNED = -math.inf


@dataclass
class Candidate:
    score: float
    cost: int
    layer: int
    kind: str
    units: list[int] = field(default_factory=list)


def default_excluded_layers(num_layers: int) -> set[int]:
    """LoRAPrune's default: never prune the first int(0.1 L) layers nor the last one. At least the
    first layer is kept even when 10% rounds to none (a 4-layer model)."""
    return set(range(max(1, int(0.1 * num_layers)))) | {num_layers - 1}


def _head_queue(masks, i, scores, costs, head_mode) -> list[Candidate]:
    g = masks.geometry[i]
    alive = masks.heads(i).bool().cpu()
    s = torch.where(alive, scores.float().cpu(), torch.tensor(PRUNED))
    if head_mode == "kv_groups" or g.group_size == 1:
        group = s.view(g.num_kv_heads, g.group_size)
        group_score = torch.where(torch.isinf(group).all(dim=1), torch.tensor(PRUNED), group.sum(dim=1))
        cost = g.group_size * costs["q_head"] + costs["kv"]
        order = sorted(range(g.num_kv_heads), key=lambda k: (float(group_score[k]), k))
        queue = [Candidate(float(group_score[k]), cost, i, "heads", list(range(k * g.group_size, (k + 1) * g.group_size))) for k in order]
        return queue[: g.num_kv_heads - 1]
    # q_heads: slot r removes the r-th lowest query head of every group
    per_group = s.view(g.num_kv_heads, g.group_size)
    ranked = torch.sort(per_group, dim=1, stable=True)
    queue = []
    for r in range(g.group_size - 1):
        units = [k * g.group_size + int(ranked.indices[k, r]) for k in range(g.num_kv_heads)]
        vals = ranked.values[:, r]
        score = PRUNED if bool(torch.isinf(vals).all()) else float(vals[torch.isfinite(vals)].sum())
        queue.append(Candidate(score, g.num_kv_heads * costs["q_head"], i, "heads", units))
    return queue


def _channel_queue(masks, i, scores, costs) -> list[Candidate]:
    alive = masks.channels(i).bool().cpu()
    s = torch.where(alive, scores.float().cpu(), torch.tensor(PRUNED))
    order = torch.sort(s, stable=True).indices.tolist()
    return [Candidate(float(s[c]), costs["channel"], i, "channels", [c]) for c in order[:-1]]


def _apply(masks: StructuredMasks, chosen: list[Candidate]) -> None:
    for i in range(len(masks)):
        heads, chans = masks.heads(i).clone(), masks.channels(i).clone()
        layer = masks.layer(i).clone()
        for c in (c for c in chosen if c.layer == i):
            if c.kind == "heads":
                heads[c.units] = 0
            elif c.kind == "channels":
                chans[c.units] = 0
            else:
                layer.zero_()
        masks.set(i, heads=heads, channels=chans, layer=layer)


def _head_plan(queues, gran: Granularity, costs, sparsity: float, final: float, rho_final: float) -> dict[int, int]:
    """Heads to remove per layer when heads and channels are mixed.

    Heads are coarse units, so their count is fixed from the *final* target (the same ratio rho
    for heads and for the layer, never more head parameters than the layer's share) and ramped
    up proportionally, rounding up; channels then fill each layer's budget exactly. Rounding up
    keeps early channel removals below their final count, so masks can only grow and the final
    target is still met exactly.
    """
    frac = 1.0 if final <= 0 else min(1.0, sparsity / final)
    plan = {}
    for i, q in queues.items():
        heads_q = q["heads"]
        n_final = round(rho_final * (len(heads_q) + 1))
        layer_final = rho_final * (costs[i]["attention"] + costs[i]["mlp"])
        while n_final > 0 and sum(c.cost for c in heads_q[:n_final]) > layer_final:
            n_final -= 1
        already = sum(c.score == PRUNED for c in heads_q)
        plan[i] = min(len(heads_q), max(already, math.ceil(frac * n_final - 1e-9)))
    return plan


def _take_local(queues: dict[int, dict[str, list[Candidate]]], rho: float, gran: Granularity, costs, head_plan=None) -> list[Candidate]:
    chosen = []
    for i, q in queues.items():
        removed = 0
        if gran.heads:
            heads_q = q["heads"]
            already = sum(c.score == PRUNED for c in heads_q)
            n = head_plan[i] if head_plan is not None else min(len(heads_q), max(already, round(rho * (len(heads_q) + 1))))
            chosen += heads_q[:n]
            removed += sum(c.cost for c in heads_q[:n])
        if gran.channels:
            ch_q = q["channels"]
            already = sum(c.score == PRUNED for c in ch_q)
            if gran.heads:
                n = round(max(0.0, rho * (costs[i]["attention"] + costs[i]["mlp"]) - removed) / costs[i]["channel"])
            else:
                n = round(rho * (len(ch_q) + 1))
            n = min(len(ch_q), max(already, n))
            chosen += ch_q[:n]
    return chosen


def _take_global(queues, budget: float) -> list[Candidate]:
    pool = []
    for q in queues.values():
        for cands in q.values():
            finite = [c.score for c in cands if c.score != PRUNED]
            mean = (sum(finite) / len(finite)) if finite else 1.0
            for pos, c in enumerate(cands):
                norm = PRUNED if c.score == PRUNED else c.score / (abs(mean) + 1e-12)
                pool.append((norm, pos, c))
    pool.sort(key=lambda t: (t[0], t[1]))
    chosen, removed = [], 0
    taken_pos: dict[tuple[int, str], int] = {}
    for norm, pos, c in pool:
        key = (c.layer, c.kind)
        if taken_pos.get(key, 0) != pos:  # keep per-layer order (cap already applied by queues)
            continue
        if norm != PRUNED and removed >= budget:
            break
        chosen.append(c)
        removed += c.cost
        taken_pos[key] = pos + 1
    return chosen


def select(
    model: nn.Module,
    masks: StructuredMasks,
    scores: list[dict],
    gran: Granularity,
    sparsity: float,
    ranking: str = "local",
    excluded: set[int] | None = None,
    layer_share: float = 0.5,
    final_sparsity: float | None = None,
) -> dict:
    """Update `masks` in place so that about `sparsity` of decoder parameters is pruned.

    `final_sparsity` is the target a progressive schedule is heading to (defaults to `sparsity`);
    local ranking uses it to ramp heads and channels together (see `_head_plan`).
    """
    check_sparsity(sparsity)
    if ranking not in ("local", "global"):
        raise SlimtuneError(f"unknown ranking '{ranking}'; choose local or global")
    excluded = default_excluded_layers(len(masks)) if excluded is None else set(excluded)
    layers = masks.spec.decoder_layers(model)
    total = sum(own_params(layer) for layer in layers)
    budget = sparsity * total
    costs = {}
    for i, layer in enumerate(layers):
        costs[i] = unit_costs(masks, layer, i)
        g = masks.geometry[i]
        costs[i]["attention"] = g.num_heads * costs[i]["q_head"] + g.num_kv_heads * costs[i]["kv"]
        costs[i]["mlp"] = g.intermediate * costs[i]["channel"]
    prunable = [i for i in range(len(masks)) if i not in excluded]
    chosen: list[Candidate] = []
    if gran.layers:
        share = layer_share if (gran.heads or gran.channels) else 1.0
        layer_q = sorted(
            (Candidate(PRUNED if masks.layer(i).item() == 0 else float(scores[i]["layer"]), costs[i]["layer"], i, "layers") for i in prunable),
            key=lambda c: (c.score, c.layer),
        )
        removed = 0
        for c in layer_q[: max(0, len(prunable) - 1) if (gran.heads or gran.channels) else len(layer_q)]:
            if c.score != PRUNED and removed + c.cost / 2 > share * budget:
                break
            chosen.append(c)
            removed += c.cost
        budget -= removed
        gone = {c.layer for c in chosen}
        prunable = [i for i in prunable if i not in gone]
    if (gran.heads or gran.channels) and prunable:
        queues = {}
        for i in prunable:
            queues[i] = {}
            if gran.heads:
                queues[i]["heads"] = _head_queue(masks, i, scores[i]["heads"], costs[i], gran.head_mode)
            if gran.channels:
                queues[i]["channels"] = _channel_queue(masks, i, scores[i]["channels"], costs[i])
        if ranking == "global":
            chosen += _take_global(queues, budget)
        else:
            head_plan = None
            if gran.heads and gran.channels:
                final = sparsity if final_sparsity is None else max(final_sparsity, sparsity)
                prunable_params = sum(costs[i]["attention"] + costs[i]["mlp"] for i in prunable)
                rho_final = min(1.0, (final * total - (sparsity * total - budget)) / max(prunable_params, 1))
                head_plan = _head_plan(queues, gran, costs, sparsity, final, rho_final)
            chosen += _solve_local(queues, budget, gran, costs, head_plan)
    _apply(masks, chosen)
    before, after = decoder_param_count(model, masks)
    achieved = 1 - after / before
    # a step of a progressive ramp may fall short of coarse units (one layer of four is 0.25): only
    # the final target must be reachable
    final = sparsity if final_sparsity is None else final_sparsity
    if sparsity > 0 and sparsity >= final - 1e-9 and achieved < 0.9 * sparsity - 1e-3:
        raise SlimtuneError(
            f"sparsity {sparsity:.3f} is not reachable with granularity {','.join(gran.names)} "
            f"(at most {achieved:.3f} of decoder parameters without emptying a layer); {_more_units(gran)}prune fewer excluded layers (--exclude-layers), or lower --sparsity"
        )
    # units are discrete: a target can be missed by a fraction of one unit's cost, or by more when
    # the granularity runs out of units; the caller reports any shortfall instead of hiding it
    return {"target": sparsity, "achieved": achieved, "shortfall": max(0.0, sparsity - achieved),
            "decoder_params_before": before, "decoder_params_after": after}


def check_reachable(model: nn.Module, gran: Granularity, sparsity: float, ranking: str = "local",
                    excluded: set[int] | None = None, layer_share: float = 0.5) -> None:
    """Refuse, before any work, a target the granularity cannot reach on this model: a dry run of
    `select` on fresh masks with random unit scores (it raises the one-line error). Unit scores only,
    so it costs no weight-sized memory."""
    if sparsity <= 0:
        return
    masks = StructuredMasks(model)
    g = torch.Generator().manual_seed(0)
    scores = [{"heads": torch.rand(masks.heads(i).shape, generator=g), "channels": torch.rand(masks.channels(i).shape, generator=g),
               "layer": float(torch.rand((), generator=g))} for i in range(len(masks))]
    select(model, masks, scores, gran, sparsity, ranking=ranking, excluded=excluded, layer_share=layer_share)


def _more_units(gran: Granularity) -> str:
    missing = [n for n, on in (("heads", gran.heads), ("channels", gran.channels), ("layers", gran.layers)) if not on]
    return f"add {' or '.join(missing)} to --granularity, " if missing else ""


def _solve_local(queues, budget, gran, costs, head_plan) -> list[Candidate]:
    """Bisect the per-layer ratio rho so that the removed parameters meet the budget."""
    def removed(rho):
        chosen = _take_local(queues, rho, gran, costs, head_plan)
        return chosen, sum(c.cost for c in chosen)

    lo, hi = 0.0, 1.0
    best, best_removed = removed(hi)
    if best_removed < budget:
        return best  # caller reports the shortfall
    best, best_removed = removed(lo)
    if best_removed >= budget:
        return best
    for _ in range(40):
        mid = (lo + hi) / 2
        chosen, r = removed(mid)
        if r >= budget:
            hi, best = mid, chosen
        else:
            lo = mid
    return best

