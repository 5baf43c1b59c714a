"""Ranking and schedules: exact targets, monotone masks, clear errors."""

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.export import decoder_param_count
from slimtune.importance.reduce import unit_scores
from slimtune.masking.structured import StructuredMasks
from slimtune.pruning.granularity import parse_granularity
from slimtune.pruning.schedules import Schedule
from slimtune.pruning.selection import select
from tests.conftest import tiny_model


def _scores(model, masks, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = masks.spec
    elems = {}
    for i, layer in enumerate(spec.decoder_layers(model)):
        elems[i] = {p: torch.rand(layer.get_submodule(p).weight.shape, generator=g) for p in spec.projections()}
    return unit_scores(spec, masks.geometry, elems)


@pytest.mark.parametrize("gran", ["heads,channels", "channels", "layers", "heads,channels,layers"])
@pytest.mark.parametrize("ranking", ["local", "global"])
def test_target_is_met(family, gran, ranking):
    model = tiny_model(family, num_hidden_layers=6)
    masks = StructuredMasks(model)
    info = select(model, masks, _scores(model, masks), parse_granularity(gran), 0.3, ranking=ranking, excluded={0})
    assert info["achieved"] == pytest.approx(0.3, abs=0.06)
    before, after = decoder_param_count(model, masks)
    assert info["achieved"] == pytest.approx(1 - after / before)
    assert masks.layer(0).item() == 1 and masks.heads(0).all() and masks.channels(0).all()


@pytest.mark.parametrize("head_mode", ["kv_groups", "q_heads"])
def test_masks_only_grow_and_stay_gqa_valid(head_mode):
    model = tiny_model("llama", num_hidden_layers=5)
    masks = StructuredMasks(model)
    gran = parse_granularity("heads,channels", head_mode=head_mode)
    previous = None
    for step, s in enumerate([0.1, 0.2, 0.35, 0.5]):
        select(model, masks, _scores(model, masks, seed=step), gran, s, excluded=set())
        if previous is not None:
            assert masks.is_subset_of(previous), "a pruned unit came back"
        previous = __import__("copy").deepcopy(masks)
        for i in range(len(masks)):
            per_group = masks.heads(i).view(2, 3).sum(1)
            assert per_group.max() >= 1
            if head_mode == "q_heads":
                assert per_group[0] == per_group[1] >= 1
            else:
                assert set(per_group.tolist()) <= {0.0, 3.0}


def test_unreachable_sparsity_is_a_clear_error():
    model = tiny_model("llama")
    masks = StructuredMasks(model)
    with pytest.raises(SlimtuneError, match="not reachable"):
        select(model, masks, _scores(model, masks), parse_granularity("heads"), 0.6, excluded=set())


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_range(bad):
    model = tiny_model("llama")
    masks = StructuredMasks(model)
    with pytest.raises(SlimtuneError, match=r"outside \[0, 1\)"):
        select(model, masks, _scores(model, masks), parse_granularity("channels"), bad)


def test_unknown_granularity():
    with pytest.raises(SlimtuneError, match="unknown granularity 'neurons'"):
        parse_granularity("heads,neurons")


def test_cubic_schedule_matches_reference():
    # cubic schedule check (Zhu & Gupta 2017, arXiv 1710.01878): T=100, w_i=10, w_f=20, 1 -> 0.15 (kept fraction); here as sparsity 0 -> 0.85
    s = Schedule(final=0.85, total_steps=100, warmup=0.1, cooldown=0.2)
    kept = [1 - s(t) for t in (0, 10, 11, 80, 90)]
    assert kept[0] == kept[1] == 1.0
    assert kept[2] == pytest.approx(1 - 0.85 * (1 - (1 - 1 / 70) ** 3))
    assert kept[3] == kept[4] == pytest.approx(0.15)
    assert all(s(t) <= s(t + 1) for t in range(100))


def test_schedule_without_ramp_is_an_error():
    with pytest.raises(SlimtuneError, match="cannot reach"):
        Schedule(final=0.5, total_steps=2, warmup=0.4, cooldown=0.4)


def test_a_ramp_step_below_one_layer_waits_instead_of_failing():
    """Progressive layer pruning used to stop mid-training: the cubic ramp's early targets are less
    than half a layer, so nothing could be taken and the step was called unreachable."""
    model = tiny_model("llama")
    masks = StructuredMasks(model)
    n = len(masks)
    one_layer = 1.0 / n + 1e-3  # every layer of the tiny model has the same size
    step = select(model, masks, _scores(model, masks), parse_granularity("layers"), 0.3 / n, excluded=set(), final_sparsity=one_layer)
    assert step["achieved"] == 0.0
    final = select(model, masks, _scores(model, masks), parse_granularity("layers"), one_layer, excluded=set(), final_sparsity=one_layer)
    assert final["achieved"] == pytest.approx(1.0 / n, abs=1e-6)
    with pytest.raises(SlimtuneError, match="not reachable"):  # the final target itself is still checked
        select(model, StructuredMasks(model), _scores(model, masks), parse_granularity("layers"), 0.3 / n, excluded=set())
