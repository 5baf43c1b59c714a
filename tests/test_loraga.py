"""LoRA-GA initialisation (arXiv 2407.05000): the model is unchanged at init, the adapters follow the
official recipe, and the first SGD step moves the weight along the best rank-2r approximation of
the full gradient (METHODS.md §7)."""

import copy

import pytest
import torch

from slimtune.adapters import LoraSettings, attach_lora, lora_pairs, lora_weights, mutates_base, scaling
from slimtune.adapters.loraga import mean_gradients
from slimtune.errors import SlimtuneError
from slimtune.models.arch import base_weight
from slimtune.training.loss import causal_lm_loss
from tests.conftest import tiny_model

BATCH = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
R = 4


def logits(model):
    with torch.no_grad():
        return model(input_ids=BATCH).logits


def ga_model(family="llama", dtype=torch.float64, r=R, **kw):
    base = tiny_model(family).to(dtype)
    torch.manual_seed(0)
    return base, attach_lora(copy.deepcopy(base), LoraSettings(r=r, alpha=8.0, dropout=0.0, variant="lora_ga", **kw), batches=[BATCH])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_output_unchanged_at_init(family):
    base, net = ga_model(family)
    torch.testing.assert_close(logits(net.eval()), logits(base), atol=1e-9, rtol=0)
    assert mutates_base(net)


def test_adapters_follow_the_official_recipe():
    """A₀ = c·V[:, :r]ᵀ, B₀ = c·U[:, r:2r], c = d_out^¼/√γ: orthogonal rows/columns of norm c, and
    together they span the top-2r singular directions of the gradient."""
    base, net = ga_model()
    grads = mean_gradients(attach_lora(copy.deepcopy(base), LoraSettings(r=R, alpha=8.0, dropout=0.0)), [BATCH])
    by_name = {(i, p): g for (i, p, _), g in zip(lora_pairs(net), grads.values())}
    for i, path, m in lora_pairs(net):
        A, B = lora_weights(m)
        g = by_name[(i, path)]
        c = g.shape[0] ** 0.25 / 16 ** 0.5
        torch.testing.assert_close(A @ A.T, c**2 * torch.eye(R, dtype=A.dtype), atol=1e-8, rtol=0)
        torch.testing.assert_close(B.T @ B, c**2 * torch.eye(R, dtype=B.dtype), atol=1e-8, rtol=0)
        U, S, Vh = torch.linalg.svd(g.double(), full_matrices=False)
        # A's rows lie in the top-r right singular space, B's columns in the left space r+1..2r (up to
        # the randomised SVD's error, which the paper's code accepts too: niter=4, 4r probe vectors)
        P_v, P_u = Vh[:R].T @ Vh[:R], U[:, R:2 * R] @ U[:, R:2 * R].T
        assert (A.double() @ P_v - A.double()).norm() <= 1e-2 * A.norm()
        assert (P_u @ B.double() - B.double()).norm() <= 1e-2 * B.norm()


def test_first_step_is_the_rank_2r_gradient_step():
    """ΔW' of one SGD step on (A, B) = −η·s²·c²·Σ_{i≤2r} σᵢuᵢvᵢᵀ + O(η²), with G taken on the same batch."""
    base, net = ga_model()
    grads = mean_gradients(attach_lora(copy.deepcopy(base), LoraSettings(r=R, alpha=8.0, dropout=0.0)), [BATCH])
    pairs = lora_pairs(net)
    before = {(i, p): (base_weight(m) + scaling(m) * lora_weights(m)[1] @ lora_weights(m)[0]).detach().clone() for i, p, m in pairs}
    net.train()
    causal_lm_loss(net, BATCH).backward()
    eta = 1e-4
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p -= eta * p.grad
    for ((i, path, m), g) in zip(pairs, grads.values()):
        A, B = lora_weights(m)
        after = base_weight(m) + scaling(m) * B @ A
        U, S, Vh = torch.linalg.svd(g.double(), full_matrices=False)
        c2 = g.shape[0] ** 0.5 / 16
        want = -eta * scaling(m) ** 2 * c2 * (U[:, :2 * R] * S[:2 * R]) @ Vh[:2 * R]
        moved = (after - before[(i, path)]).detach()
        assert (moved - want).norm() <= 1e-2 * want.norm(), (i, path)


def test_needs_batches_and_a_rank_that_fits():
    with pytest.raises(SlimtuneError, match="pass batches"):
        attach_lora(tiny_model(), LoraSettings(variant="lora_ga"))
    with pytest.raises(SlimtuneError, match="lower --lora-r to 16") as err:
        attach_lora(tiny_model(), LoraSettings(r=20, variant="lora_ga"), batches=[BATCH])
    assert "\n" not in str(err.value)
    with pytest.raises(SlimtuneError, match="--lora-ga-gamma 0.0 must be positive"):
        LoraSettings(variant="lora_ga", ga_gamma=0.0)


def test_deterministic_for_a_seed():
    """A resumed run re-initialises from the same batches and seed: the adapters must be identical."""
    _, one = ga_model(dtype=torch.float32)
    _, two = ga_model(dtype=torch.float32)
    for (_, _, a), (_, _, b) in zip(lora_pairs(one), lora_pairs(two)):
        for x, y in zip(lora_weights(a), lora_weights(b)):
            assert torch.equal(x, y)
        assert torch.equal(base_weight(a), base_weight(b))


@pytest.mark.parametrize("variant", ["pissa", "lora_ga"])
@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_one_shot_criteria_score_the_weight_the_model_computes_with(variant, criterion):
    """PiSSA and LoRA-GA move part of W into the adapter at attach time; magnitude and Taylor must
    score W_res + s·B·A (= W), not the residual: the same scores as on the plain model."""
    from slimtune.importance import make_importance

    base = tiny_model()  # fp32: PEFT's PiSSA refuses fp64
    plain = attach_lora(copy.deepcopy(base), LoraSettings(r=R, dropout=0.0))
    rewritten = attach_lora(copy.deepcopy(base), LoraSettings(r=R, dropout=0.0, variant=variant), batches=[BATCH])
    scores = []
    for net in (plain, rewritten):
        imp = make_importance(criterion, net)
        if imp.needs_data:
            imp.update(net, BATCH)
        scores.append(imp.element_scores())
        imp.remove()
    for i, per in scores[0].items():
        for path, s in per.items():
            torch.testing.assert_close(scores[1][i][path], s, atol=1e-4 * float(s.abs().max()), rtol=0)
