"""LoRA-Pro's equivalent gradients (arXiv 2407.18242; METHODS.md §7): the closed form, its optimality,
the Sylvester choice of X, full rank, and the training-loop wiring."""

import copy

import pytest
import torch

from slimtune.adapters import LoraSettings, attach_lora, lora_pairs, lora_weights, scaling
from slimtune.training.lora_pro import equivalent_gradients, lora_pro_, sylvester
from tests.conftest import tiny_model

OUT, IN, R, S = 12, 10, 3, 2.0


def problem(seed=0, r=R, zero_b=False):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, IN, generator=g, dtype=torch.float64)
    B = torch.zeros(OUT, r, dtype=torch.float64) if zero_b else torch.randn(OUT, r, generator=g, dtype=torch.float64)
    full = torch.randn(OUT, IN, generator=g, dtype=torch.float64)  # ∂L/∂W'
    return A, B, full, S * B.T @ full, S * full @ A.T  # G_A = s·Bᵀg, G_B = s·g·Aᵀ


def equivalent(A, B, gA, gB):
    return S * (B @ gA + gB @ A)


def projections(A, B):
    P_B = B @ torch.linalg.pinv(B.T @ B) @ B.T
    P_A = A.T @ torch.linalg.pinv(A @ A.T) @ A
    return P_B, P_A


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equivalent_gradient_is_the_projected_full_gradient(seed):
    A, B, full, gA, gB = problem(seed)
    new_A, new_B, _ = equivalent_gradients(A, B, gA, gB, S)
    P_B, P_A = projections(A, B)
    torch.testing.assert_close(equivalent(A, B, new_A, new_B), P_B @ full + (torch.eye(OUT, dtype=full.dtype) - P_B) @ full @ P_A,
                               atol=1e-6, rtol=0)
    # LoRA's own gradients match g worse
    assert (equivalent(A, B, new_A, new_B) - full).norm() < (equivalent(A, B, gA, gB) - full).norm()


def test_no_perturbation_matches_the_full_gradient_better():
    A, B, full, gA, gB = problem(3)
    new_A, new_B, _ = equivalent_gradients(A, B, gA, gB, S)
    best = (equivalent(A, B, new_A, new_B) - full).norm()
    g = torch.Generator().manual_seed(4)
    for _ in range(50):
        dA = 1e-2 * torch.randn(new_A.shape, generator=g, dtype=full.dtype)
        dB = 1e-2 * torch.randn(new_B.shape, generator=g, dtype=full.dtype)
        assert (equivalent(A, B, new_A + dA, new_B + dB) - full).norm() >= best - 1e-10


def test_sylvester_x_keeps_the_gradients_closest():
    """At the Sylvester X, ‖g^A − G_A‖² + ‖g^B − G_B‖² is stationary in X (finite differences)."""
    A, B, full, gA, gB = problem(5)
    _, _, X = equivalent_gradients(A, B, gA, gB, S)

    def closeness(X):
        a, b, _ = equivalent_gradients(A, B, gA, gB, S, X=X)
        return float((a - gA).square().sum() + (b - gB).square().sum())

    h, base = 1e-5, closeness(X)
    for i in range(R):
        for j in range(R):
            E = torch.zeros_like(X)
            E[i, j] = h
            slope = (closeness(X + E) - closeness(X - E)) / (2 * h)
            assert abs(slope) <= 1e-5 * max(1.0, base), (i, j, slope)
    # and the solver itself
    P, Q, C = B.T @ B, A @ A.T, torch.randn(R, R, dtype=A.dtype)
    Y = sylvester(P, Q, C)
    torch.testing.assert_close(P @ Y + Y @ Q, C, atol=1e-8, rtol=0)


def test_full_rank_recovers_the_full_gradient():
    g = torch.Generator().manual_seed(6)
    r = IN  # A [in, in] invertible, B [out, in] of full column rank
    A = torch.randn(r, IN, generator=g, dtype=torch.float64)
    B = torch.randn(OUT, r, generator=g, dtype=torch.float64)
    full = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    new_A, new_B, _ = equivalent_gradients(A, B, S * B.T @ full, S * full @ A.T, S)
    torch.testing.assert_close(equivalent(A, B, new_A, new_B), full, atol=1e-6, rtol=0)


def test_zero_b_at_init_is_finite():
    A, B, full, gA, gB = problem(7, zero_b=True)
    new_A, new_B, _ = equivalent_gradients(A, B, gA, gB, S)
    assert torch.equal(new_A, torch.zeros_like(new_A))
    torch.testing.assert_close(new_B, gB @ torch.linalg.inv(A @ A.T) / S**2, atol=1e-8, rtol=1e-8)
    P_B, P_A = projections(A, B)
    torch.testing.assert_close(equivalent(A, B, new_A, new_B), full @ P_A, atol=1e-6, rtol=0)


def test_lora_pro_rewrites_every_adapter_gradient():
    net = attach_lora(tiny_model().to(torch.float64), LoraSettings(r=4, dropout=0.0))
    with torch.no_grad():
        for _, _, m in lora_pairs(net):
            lora_weights(m)[1].normal_(0, 0.05)  # B ≠ 0, so both formulas matter
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    net(input_ids=tokens, labels=tokens).loss.backward()
    raw = {id(p): p.grad.clone() for _, _, m in lora_pairs(net) for p in lora_weights(m)}
    lora_pro_(net)
    for _, _, m in lora_pairs(net):
        A, B = lora_weights(m)
        want_A, want_B, _ = equivalent_gradients(A, B, raw[id(A)], raw[id(B)], scaling(m))
        torch.testing.assert_close(A.grad, want_A)
        torch.testing.assert_close(B.grad, want_B)


def test_training_loop_applies_it_after_the_criterion_observed(monkeypatch):
    """--lora-pro changes the trained adapters, and the LoRAPrune importance still sees the raw gradients."""
    from slimtune.importance import make_importance
    from slimtune.training.loop import Trainer, TrainSettings

    tokens = torch.randint(0, 96, (16, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for pro in (False, True):
        net = attach_lora(copy.deepcopy(tiny_model()), LoraSettings(r=4, dropout=0.0))
        imp = make_importance("loraprune", net)
        seen = []
        observe = imp.observe
        monkeypatch.setattr(imp, "observe", lambda model, _o=observe, _s=seen, _n=net: (
            _s.append([lora_weights(m)[1].grad.clone() for _, _, m in lora_pairs(_n)]), _o(model))[1])
        torch.manual_seed(0)
        Trainer(net, tokens, TrainSettings(steps=3, lora_pro=pro, checkpoint_every=0), imp, None).run(progress=False)
        results.append((seen, [p.detach().clone() for _, _, m in lora_pairs(net) for p in lora_weights(m)]))
    (seen0, w0), (seen1, w1) = results
    for a, b in zip(seen0[0], seen1[0]):  # step 1: same weights, so the criterion saw the same raw gradients
        assert torch.equal(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(w0, w1))
