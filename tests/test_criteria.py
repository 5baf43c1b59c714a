"""The contract every registered criterion meets. Adding a criterion = one file, one registry
line (importance/__init__.py) and one row here."""

import pytest
import torch

from slimtune.adapters import LoraSettings, attach_lora
from slimtune.errors import SlimtuneError
from slimtune.importance import CRITERIA, GRANULARITIES, make_importance
from slimtune.masking.structured import StructuredMasks
from slimtune.pruning.pruner import refuse_ties, scores_from
from tests.conftest import tiny_model

# name -> (needs LoRA adapters, constructor overrides for the test)
ROWS = {
    "loraprune": (True, {"keep_elements": True}),
    "grad": (True, {"keep_elements": True}),
    "mask_fisher": (True, {}),
    "loraprune_unc": (True, {"keep_elements": True}),
    "l0": (True, {"init": 1.0}),  # gates trained by update(); at 5 most draws clamp to 1 in two steps
    "movement": (True, {"keep_elements": True}),
    "movement_grad": (True, {"keep_elements": True}),  # update() gives W0 its gradient itself
    "seven": (True, {"keep_elements": True}),
    "seven_grad": (True, {"keep_elements": True}),
    "taylor": (False, {}),
    "taylor2": (False, {}),
    "taylor_vector": (False, {}),
    "fisher": (False, {}),
    "magnitude": (False, {}),
    "l2": (False, {}),
    "random": (False, {}),
    "block_influence": (False, {}),
    "wanda": (False, {}),  # layerwise: exercised through prune_layerwise below
    "sparsegpt": (False, {}),
}
BATCHES = [torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]


def test_every_registered_criterion_has_a_row():
    assert set(CRITERIA) == set(ROWS), "add a row for each new criterion"


@pytest.mark.parametrize("name", sorted(ROWS))
def test_scores_what_it_declares_and_refuses_the_rest(name):
    entry = CRITERIA[name]
    lora, overrides = ROWS[name]
    torch.manual_seed(0)
    model = tiny_model("llama")
    if lora:
        model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
        with torch.no_grad():  # B = 0 at init; a trained-looking B exercises every term of the estimate
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    if name == "grad":
        from slimtune.importance.loraprune import enable_full_grad

        enable_full_grad(model)
    if entry.mode == "layerwise":
        _check_layerwise(name, entry)
        return
    imp = make_importance(name, model, **overrides)
    if hasattr(imp, "bind"):  # trained gates (l0): created for the pruner's units
        from slimtune.pruning.pruner import PruneSettings, make_pruner

        imp.bind(make_pruner(model, PruneSettings(granularity=",".join(sorted(entry.scores))), imp, total_steps=4))
    if entry.needs_data:
        for b in BATCHES:
            imp.update(model, b)
    scores = scores_from(imp, StructuredMasks(model))
    for unit in GRANULARITIES:
        if unit not in entry.scores:
            with pytest.raises(SlimtuneError, match=f"cannot score {unit}"):
                entry.check_units({unit})
            continue
        entry.check_units({unit})
        for i in range(1, 3):  # every unit of a prunable layer gets a usable, distinct score
            if unit == "heads":
                refuse_ties(name, torch.as_tensor(scores[i]["heads"]), unit, f"layer {i}")
            elif unit == "channels":
                refuse_ties(name, torch.as_tensor(scores[i]["channels"]), unit, f"layer {i}")
            elif unit == "weights":
                for path, s in imp.element_scores()[i].items():
                    refuse_ties(name, s.flatten(), unit, f"layer {i} {path}")
        if unit == "layers":
            refuse_ties(name, torch.tensor([float(s["layer"]) for s in scores]), unit, "layers")
    imp.remove()


def _check_layerwise(name, entry):
    """Layer-wise criteria prune weights only, to the exact per-projection fraction."""
    from slimtune.pruning.layerwise import prune_layerwise

    assert entry.scores == {"weights"}
    for unit in ("heads", "channels", "layers"):
        with pytest.raises(SlimtuneError, match=f"cannot score {unit}"):
            entry.check_units({unit})
    model = tiny_model("llama", hidden_size=96, intermediate_size=160)
    calib = torch.randint(0, 96, (64, 16), generator=torch.Generator().manual_seed(3))
    masks = prune_layerwise(model, calib, name, 0.5, excluded={0, 3})
    for row in masks.per_module():
        assert row["pruned"] == row["total"] // 2, row
