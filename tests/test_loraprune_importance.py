"""LoRAPrune importance (arXiv 2305.18403): the gradient-estimate identities, DoRA, the EMA and its state."""

import copy
import io

import pytest
import torch

from slimtune.adapters import LoraSettings, attach_lora, lora_pairs, lora_weights, scaling
from slimtune.errors import SlimtuneError
from slimtune.importance.base import projection_weights
from slimtune.importance.loraprune import LoRAPruneImportance, enable_full_grad, lora_grad_estimate
from slimtune.importance.reduce import unit_scores
from slimtune.models.arch import get_arch
from tests.conftest import count_host_reads, tiny_model


def lora_model(r=4, alpha=8.0, seed=0, dtype=torch.float32, random_b=True):
    model = attach_lora(tiny_model("llama", seed=seed), LoraSettings(r=r, alpha=alpha, dropout=0.0))
    model.to(dtype)
    if random_b:  # B = 0 at init would make G_A = 0; a trained-looking adapter tests every term
        with torch.no_grad():
            for _, _, m in lora_pairs(model):
                lora_weights(m)[1].normal_(0, 0.05)
    return model


def backward(model, seed=0):
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))
    model.zero_grad(set_to_none=True)
    model(input_ids=tokens, labels=tokens).loss.backward()


def test_one_sgd_step_moves_ba_by_the_estimate():
    """−(B₁A₁ − B₀A₀)/η = G_B·A + B·G_A − η·G_B·G_A; at η = 1 that is the code's Ĝ."""
    for eta in (1e-2, 1.0):
        model = lora_model(dtype=torch.float64)
        backward(model)
        pairs = lora_pairs(model)
        before = {(i, p): [t.detach().clone() for t in lora_weights(m)] for i, p, m in pairs}
        grads = {(i, p): [t.grad.clone() for t in lora_weights(m)] for i, p, m in pairs}
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=eta).step()
        for i, p, m in pairs:
            (A0, B0), (gA, gB) = before[(i, p)], grads[(i, p)]
            A1, B1 = lora_weights(m)
            moved = -(B1 @ A1 - B0 @ A0) / eta
            expected = gB @ A0 + B0 @ gA - eta * gB @ gA
            torch.testing.assert_close(moved, expected, rtol=1e-6, atol=1e-12)
            if eta == 1.0:
                torch.testing.assert_close(moved, lora_grad_estimate(A0, B0, gA, gB), rtol=1e-6, atol=1e-12)


def full_rank_orthogonal(variant="lora"):
    """r ≥ every d_in, AᵀA = I (A [r, in] with orthonormal columns) and B = 0, in fp64: then
    Ĝ = G_B·A = s·G·AᵀA = s·G exactly. Returns the model and s."""
    base = tiny_model("llama")
    r = max(w.shape[1] for _, _, w in projection_weights(base, get_arch(base)))  # shapes from conftest
    model = attach_lora(base, LoraSettings(r=r, alpha=2.0 * r, dropout=0.0, variant=variant)).double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, _, m in lora_pairs(model):
            A, B = lora_weights(m)
            A.copy_(torch.linalg.qr(torch.randn(A.shape, generator=gen, dtype=torch.float64))[0])
            B.zero_()
    return model, 2.0


def assert_units_match(est, ref, s):
    """Per-module l2 normalisation cancels s in the unit scores; the layer score keeps it."""
    for a, b in zip(est.unit_scores(), ref.unit_scores()):
        assert torch.equal(a["heads"].argsort(), b["heads"].argsort())
        assert torch.equal(a["channels"].argsort(), b["channels"].argsort())
        torch.testing.assert_close(a["heads"], b["heads"])
        torch.testing.assert_close(a["channels"], b["channels"])
        assert a["layer"] == pytest.approx(s * b["layer"], rel=1e-6)


def test_full_rank_orthogonal_a_matches_full_gradient_taylor():
    """r = d_in, A orthogonal, B = 0: Ĝ = s·G exactly, so units rank like |G ⊙ W| Taylor."""
    model, s = full_rank_orthogonal()
    restore = enable_full_grad(model)
    est = LoRAPruneImportance(model, metric="lora", beta=0.0)
    ref = LoRAPruneImportance(model, metric="grad", beta=0.0)
    backward(model)
    for _, _, m in lora_pairs(model):
        A, B = lora_weights(m)
        assert A.shape[0] >= A.shape[1]
        G = m.get_base_layer().weight.grad  # = dL/dW' since W' = W0 + s·B·A
        torch.testing.assert_close(lora_grad_estimate(A, B, A.grad, B.grad), scaling(m) * G, rtol=1e-9, atol=1e-15)
    est.observe(model)
    ref.observe(model)
    restore()
    assert_units_match(est, ref, s)


def test_dora_scores_are_the_taylor_scores_of_the_effective_weight():
    """DoRA, W' = (m/n)⊙V with V = W0 + s·B·A and n = ‖V‖_row detached by PEFT (DoRA §4.3):
    G_V = W0.grad = (m/n)⊙G_W', the A/B gradients are those of LoRA on V, so Ĝ = s·W0.grad in the
    full-rank set-up, and S = |Ĝ ⊙ V| = s·|G_W' ⊙ W'| with G_W' the gradient of the merged weight."""
    model, s = full_rank_orthogonal("dora")
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # m = n at init; move it so that m/n ≠ 1 and G_V ≠ G_W'
        for _, _, m in lora_pairs(model):
            mag = m.lora_magnitude_vector["default"].weight
            mag.mul_(0.5 + torch.rand(mag.shape, generator=gen, dtype=mag.dtype))
    merged = copy.deepcopy(model).merge_and_unload()  # a plain model with W' as its weights
    effective = {(i, path): w for i, path, w in projection_weights(merged, get_arch(merged))}
    for w in effective.values():
        w.requires_grad_(True)
    backward(merged)

    restore = enable_full_grad(model)
    est = LoRAPruneImportance(model, beta=0.0, keep_elements=True)
    ref = LoRAPruneImportance(model, metric="grad", beta=0.0)
    backward(model)
    est.observe(model)
    ref.observe(model)
    elements = est.element_scores()
    for i, path, m in lora_pairs(model):
        A, B = lora_weights(m)
        W0 = m.get_base_layer().weight
        ratio = (m.lora_magnitude_vector["default"].weight / W0.norm(dim=1)).detach()  # B = 0: V = W0
        G_eff, W_eff = effective[(i, path)].grad, effective[(i, path)].detach()
        torch.testing.assert_close(W_eff, ratio[:, None] * W0.detach(), rtol=1e-12, atol=1e-15)
        assert not torch.allclose(W0.grad, G_eff, rtol=1e-3)  # the set-up tells G_V from G_W'
        torch.testing.assert_close(W0.grad, ratio[:, None] * G_eff, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(lora_grad_estimate(A, B, A.grad, B.grad), s * W0.grad, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(elements[i][path], s * (G_eff * W_eff).abs(), rtol=1e-9, atol=1e-15)
    restore()
    assert_units_match(est, ref, s)


def test_units_equal_the_reduction_of_element_scores():
    """Reducing one module at a time gives granularity.unit_scores of the whole S, and S is |Ĝ ⊙ (W0 + sBA)|."""
    model = lora_model()
    imp = LoRAPruneImportance(model, beta=0.0, keep_elements=True)
    backward(model)
    imp.observe(model)
    elements = imp.element_scores()
    i, path, m = lora_pairs(model)[5]
    A, B = lora_weights(m)
    w = m.get_base_layer().weight + scaling(m) * B @ A
    expected = (lora_grad_estimate(A, B, A.grad, B.grad) * w).abs()
    torch.testing.assert_close(elements[i][path], expected.detach())
    for got, want in zip(imp.unit_scores(), unit_scores(imp.spec, imp.geometry, elements)):
        torch.testing.assert_close(got["heads"], want["heads"])
        torch.testing.assert_close(got["channels"], want["channels"])
        assert got["layer"] == pytest.approx(want["layer"], rel=1e-5)


def test_ema_arithmetic_and_nan_skip():
    model = lora_model()
    imp, single = LoRAPruneImportance(model), LoRAPruneImportance(model, beta=0.0)
    xs = []
    for seed in (1, 2):
        backward(model, seed)
        single.observe(model)
        xs.append(single.unit_scores())
        assert imp.observe(model)
    for i, got in enumerate(imp.unit_scores()):
        x1, x2 = xs[0][i], xs[1][i]
        assert torch.equal(got["heads"], 0.9 * (0.1 * x1["heads"]) + 0.1 * x2["heads"])
        assert torch.equal(got["channels"], 0.9 * (0.1 * x1["channels"]) + 0.1 * x2["channels"])
        want = torch.tensor(0.9) * (torch.tensor(0.1) * x1["layer"]) + torch.tensor(0.1) * x2["layer"]
        assert got["layer"] == pytest.approx(float(want), rel=1e-6)
    before = imp.state_dict()
    backward(model, 3)
    lora_weights(lora_pairs(model)[3][2])[0].grad[0, 0] = float("nan")
    assert not imp.observe(model)
    assert imp.skipped == 1 and imp.steps == 2
    for a, b in zip(imp.heads + imp.channels, before["heads"] + before["channels"]):
        assert torch.equal(a, b)


def test_metrics_and_one_shot_update():
    model = lora_model()
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    imp = LoRAPruneImportance(model, power=2)
    imp.update(model, tokens)
    assert imp.steps == 1 and all(p.grad is None for p in model.parameters())
    assert all(float(s["heads"].sum()) > 0 and float(s["channels"].sum()) > 0 for s in imp.unit_scores())
    assert imp.element_scores() == {}
    mag = LoRAPruneImportance(model, metric="magnitude", beta=0.0, keep_elements=True)
    mag.observe(model)  # needs no gradients
    i, path, m = lora_pairs(model)[0]
    A, B = lora_weights(m)
    torch.testing.assert_close(mag.element_scores()[i][path], (m.get_base_layer().weight + scaling(m) * B @ A).abs().detach())
    with pytest.raises(RuntimeError, match="no gradients"):
        imp.observe(model)
    with pytest.raises(SlimtuneError, match="no LoRA adapters"):
        LoRAPruneImportance(tiny_model("llama"))
    with pytest.raises(SlimtuneError, match="metric"):
        LoRAPruneImportance(model, metric="hessian")


def test_state_dict_round_trip_resumes_exactly():
    model = lora_model()
    a = LoRAPruneImportance(model, keep_elements=True)
    for seed in (1, 2):
        backward(model, seed)
        a.observe(model)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = LoRAPruneImportance(model, keep_elements=True)
    b.load_state_dict(torch.load(buf, weights_only=True))
    backward(model, 3)
    a.observe(model)
    b.observe(model)
    assert (a.steps, a.skipped) == (b.steps, b.skipped) == (3, 0)
    for x, y in zip(a.unit_scores(), b.unit_scores()):
        assert torch.equal(x["heads"], y["heads"]) and torch.equal(x["channels"], y["channels"]) and x["layer"] == y["layer"]
    ea, eb = a.element_scores(), b.element_scores()
    assert ea.keys() == eb.keys() and all(torch.equal(ea[i][p], eb[i][p]) for i in ea for p in ea[i])
    with pytest.raises(SlimtuneError, match="does not match"):
        LoRAPruneImportance(model, metric="magnitude").load_state_dict(a.state_dict())




@pytest.mark.parametrize("keep_elements", [False, True])
def test_observe_reads_back_to_the_host_once_per_step(monkeypatch, keep_elements):
    """The EMA stays next to the weights: observe() reads one value back (the finite check), not
    two per projection. Counted at the Python level (C++-internal syncs such as boolean indexing
    are not seen here; observe uses none)."""
    model = lora_model()
    imp = LoRAPruneImportance(model, keep_elements=keep_elements)
    reads = count_host_reads(monkeypatch)
    for seed in (1, 2):
        backward(model, seed)
        reads.clear()
        assert imp.observe(model)
        assert reads == ["__bool__"]
    monkeypatch.undo()
    assert all(s["heads"].device.type == "cpu" and s["heads"].sum() > 0 for s in imp.unit_scores())


@pytest.mark.parametrize("metric,power", [("lora", 1), ("lora", 2), ("grad", 1), ("magnitude", 1)])
@pytest.mark.parametrize("family", ["llama", "qwen3", "opt"])
def test_stacked_scores_equal_one_projection_at_a_time(metric, power, family):
    """The GPU path scores the same projection of many layers as one stacked computation; it must
    give what one projection at a time gives, also when a group is split into several stacks."""
    torch.manual_seed(0)
    model = attach_lora(tiny_model(family), LoraSettings(r=4, alpha=8.0, dropout=0.0)).to(torch.float64)
    with torch.no_grad():
        for _, _, m in lora_pairs(model):
            lora_weights(m)[1].normal_(0, 0.05)
    restore = enable_full_grad(model) if metric == "grad" else None
    per_key, whole, split = (LoRAPruneImportance(model, metric=metric, power=power, stack_mib=mib) for mib in (0, 64, 0.06))
    backward(model, 1)
    depth = len(get_arch(model).decoder_layers(model))
    assert {len(b) for b in per_key._batches()} == {1}
    assert {len(b) for b in whole._batches()} == {depth}
    sizes = [len(b) for b in split._batches()]  # 60 KiB: the small projections stack, the large ones split
    assert max(sizes) > 1 and min(sizes) < depth
    for seed in (1, 2):
        backward(model, seed)
        for imp in (per_key, whole, split):
            assert imp.observe(model)
    want = per_key.unit_scores()
    for imp in (whole, split):
        for a, b in zip(imp.unit_scores(), want):
            torch.testing.assert_close(a["heads"], b["heads"], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(a["channels"], b["channels"], rtol=1e-12, atol=1e-15)
            assert a["layer"] == pytest.approx(b["layer"], rel=1e-12)
    if restore is not None:
        restore()
