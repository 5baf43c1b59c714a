"""LoRAPrune with AdaLoRA's uncertainty-weighted smoothing (arXiv 2303.10512 §3.3; METHODS.md §6):
Ī ← λĪ + (1−λ)Î, Ū ← λ₂Ū + (1−λ₂)|Î − Ī| with the new Ī, score Ī·Ū."""

import pytest
import torch

from slimtune.adapters import LoraSettings, attach_lora
from slimtune.errors import SlimtuneError
from slimtune.importance import LoRAPruneImportance, make_importance
from tests.conftest import tiny_model


def net():
    return attach_lora(tiny_model().to(torch.float64), LoraSettings(r=4, dropout=0.0))


def reference(step_vectors, beta=0.9, beta2=0.85):
    ema = torch.zeros_like(step_vectors[0])
    unc = torch.zeros_like(ema)
    for v in step_vectors:
        ema = beta * ema + (1 - beta) * v
        unc = beta2 * unc + (1 - beta2) * (v - ema).abs()
    return ema * unc


def test_unit_and_element_scores_follow_the_recursion():
    """With metric="magnitude" every step's score is |W0 + s·B·A|, so the step vectors are known: a
    plain EMA after one step gives them."""
    model = net()
    with torch.no_grad():  # B ≠ 0 and changing between steps, so the step vectors differ
        plain = LoRAPruneImportance(model, metric="magnitude", keep_elements=True)
        smooth = LoRAPruneImportance(model, metric="magnitude", keep_elements=True, smoothing="uncertainty")
        steps_units, steps_elems = [], []
        for k in range(4):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05 * (k + 1))
            one = LoRAPruneImportance(model, metric="magnitude", keep_elements=True, beta=0.0)
            one.observe()
            steps_units.append(one.unit_scores())
            steps_elems.append(one.element_scores())
            plain.observe()
            smooth.observe()
    got = smooth.unit_scores()
    for i, row in enumerate(got):
        for kind in ("heads", "channels"):
            torch.testing.assert_close(row[kind], reference([s[i][kind] for s in steps_units]))
        want = reference([torch.tensor(s[i]["layer"], dtype=torch.float64) for s in steps_units])
        assert row["layer"] == pytest.approx(float(want), rel=1e-6)  # the layer vector is fp32
    elements = smooth.element_scores()
    for i, per in elements.items():
        for path, t in per.items():
            torch.testing.assert_close(t, reference([s[i][path] for s in steps_elems]))
    # the plain EMA is untouched by the option
    plain_ref = plain.unit_scores()
    for i, row in enumerate(plain_ref):
        ema = torch.zeros_like(row["channels"])
        for s in steps_units:
            ema = 0.9 * ema + 0.1 * s[i]["channels"]
        torch.testing.assert_close(row["channels"], ema)


def test_state_round_trip_and_refusals():
    model = net()
    a = LoRAPruneImportance(model, metric="magnitude", smoothing="uncertainty")
    with torch.no_grad():
        for _ in range(2):
            a.observe()
    b = LoRAPruneImportance(model, metric="magnitude", smoothing="uncertainty")
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.observe()
        b.observe()
    for ra, rb in zip(a.unit_scores(), b.unit_scores()):
        assert torch.equal(ra["channels"], rb["channels"]) and ra["layer"] == rb["layer"]
    with pytest.raises(SlimtuneError, match="smoothed with 'uncertainty', not 'ema'"):
        LoRAPruneImportance(model, metric="magnitude").load_state_dict(a.state_dict())
    with pytest.raises(SlimtuneError, match="unknown LoRAPrune smoothing"):
        LoRAPruneImportance(model, smoothing="adam")
    with pytest.raises(SlimtuneError, match="outside \\[0, 1\\)"):
        LoRAPruneImportance(model, smoothing="uncertainty", beta2=1.0)
    assert make_importance("loraprune_unc", model).smoothing == "uncertainty"
