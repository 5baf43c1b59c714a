"""L0 hard-concrete gates (METHODS.md §4): the distribution's closed forms, the Lagrangian, gates
drawn once per forward, the fold into the weights, the dense teacher, and a run end to end."""

import copy

import pytest
import torch

import slimtune
from slimtune.adapters import LoraSettings, attach_lora
from slimtune.errors import SlimtuneError
from slimtune.importance import make_importance
from slimtune.importance.hard_concrete import prob_one, prob_open, rank_score, sample, test_gate
from slimtune.pruning.pruner import PruneSettings, make_pruner
from slimtune.training.loss import causal_lm_loss
from tests.conftest import tiny_model

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("log_alpha", [-2.0, 0.0, 1.5, 3.0])
def test_closed_forms_match_monte_carlo(log_alpha):
    a = torch.full((2_000_000,), log_alpha, dtype=torch.float64)
    z = sample(a, generator=torch.Generator().manual_seed(0))
    assert float((z > 0).double().mean()) == pytest.approx(float(prob_open(a[:1])), abs=2e-3)
    assert float((z == 1).double().mean()) == pytest.approx(float(prob_one(a[:1])), abs=2e-3)
    if log_alpha == 0.0:
        assert float(z.mean()) == pytest.approx(0.5, abs=2e-3)
    assert float(test_gate(a[:1])) == pytest.approx(min(1.0, max(0.0, 1.2 * float(torch.sigmoid(a[:1])) - 0.1)))


def test_expected_l0_gradient_is_the_sigmoid_derivative():
    a = torch.linspace(-4, 4, 9, dtype=torch.float64, requires_grad=True)
    prob_open(a).sum().backward()
    p = prob_open(a.detach())
    torch.testing.assert_close(a.grad, p * (1 - p))
    # the ranking score orders gates as P(z ≠ 0) does, without saturating
    assert torch.equal(torch.argsort(rank_score(a.detach())), torch.argsort(p))
    assert float(rank_score(torch.tensor([12.0])) - rank_score(torch.tensor([11.0]))) > 0.9


def gated(granularity="heads,channels", steps=10, sparsity=0.2, head_mode="kv_groups", dtype=torch.float64, **kw):
    net = attach_lora(tiny_model().to(dtype), LoraSettings(r=4, dropout=0.0))
    imp = make_importance("l0", net, **kw)
    pruner = make_pruner(net, PruneSettings(sparsity=sparsity, granularity=granularity, head_mode=head_mode), imp, total_steps=steps)
    imp.bind(pruner)
    return net, imp, pruner


def test_open_gates_cost_nothing_and_the_multiplier_gradient_is_the_violation():
    net, imp, pruner = gated(init=10.0)
    ref = copy.deepcopy(net)
    pruner.gates.remove()
    for h in imp._hooks:
        h.remove()
    with torch.no_grad():
        plain = ref.eval()(input_ids=TOKENS).logits
    net, imp, _ = gated(init=10.0)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(input_ids=TOKENS).logits, plain)  # ẑ = 1 for every gate
    s = imp.expected_sparsity()
    assert 0 <= float(s.detach()) < 1e-4
    term = imp.loss_term()
    term.backward()
    d = float(s.detach()) - imp.target_at(1)
    assert float(imp.lambdas.grad[0]) == pytest.approx(d) and float(imp.lambdas.grad[1]) == pytest.approx(d**2)


def test_the_lagrangian_moves_the_expected_sparsity_to_the_target():
    """A sign error in the ascent would drive ŝ away from t (to fully dense or fully pruned)."""
    net, imp, pruner = gated(steps=10, sparsity=0.2, init=3.0)
    t = imp.target_at(10)
    assert t == pytest.approx(0.2)
    imp.steps = 10
    start = float(imp.expected_sparsity().detach())
    for _ in range(300):
        imp.loss_term().backward()
        imp.observe()
        imp.steps = 10
    end = float(imp.expected_sparsity().detach())
    assert start < 0.05 and abs(end - t) < 0.03, (start, end)
    assert float(imp.lambdas.detach()[0]) < 0  # ŝ < t pushed λ₁ down, so the term rewards closing gates


def test_gates_are_drawn_once_per_forward_also_with_gradient_checkpointing():
    from slimtune.training.loop import enable_checkpointing

    grads = []
    for checkpointing in (False, True):
        net, imp, _ = gated(dtype=torch.float32, init=1.0)  # at 5, most draws clamp to 1 and pass no gradient
        if checkpointing:
            enable_checkpointing(net)
        net.train()
        torch.manual_seed(5)
        causal_lm_loss(net, TOKENS).backward()
        grads.append({k: a.grad.clone() for k, a in imp.alpha.items()})
        assert all(g.abs().sum() > 0 for g in grads[-1].values())
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-7)


def spread(imp):
    """Some ẑ between 0 and 1, some 0, some 1."""
    with torch.no_grad():
        for a in imp.alpha.values():
            a.copy_(torch.linspace(-3, 4, a.numel(), dtype=a.dtype))


def test_teacher_is_dense_and_the_fold_keeps_the_eval_function():
    from slimtune.training.distill import dense_teacher

    with torch.no_grad():
        dense = tiny_model().to(torch.float64)(input_ids=TOKENS).logits  # the same seed gated() builds from
    net, imp, pruner = gated()
    spread(imp)
    net.eval()
    with torch.no_grad():
        student = net(input_ids=TOKENS).logits
        with dense_teacher(net, pruner.gates, imp.handles)():
            teacher = net(input_ids=TOKENS).logits
    torch.testing.assert_close(teacher, dense)
    assert (student - dense).abs().max() > 1e-3  # the gates do change the student
    pruner.gates.remove()
    imp.remove()  # folds ẑ into the o_proj / down_proj columns and drops the hooks
    with torch.no_grad():
        torch.testing.assert_close(net(input_ids=TOKENS).logits, student)


def test_prune_end_to_end_reaches_the_target_and_records_the_gates():
    from slimtune.config import LoRAPruneConfig
    from slimtune.training.loop import TrainSettings

    data = torch.randint(0, 96, (24, 16), generator=torch.Generator().manual_seed(0))
    config = LoRAPruneConfig(criterion="l0", prune=PruneSettings(sparsity=0.2, granularity="heads,channels"),
                             train=TrainSettings(steps=8, checkpoint_every=0))
    result = slimtune.prune_(tiny_model(), config, data, progress=False)
    assert result.sparsity["achieved"] == pytest.approx(0.2, abs=0.02)
    assert all("gate_sparsity" in row and "penalty" in row for row in result.history)
    assert result.history[-1]["gate_sparsity"] > result.history[0]["gate_sparsity"]
    assert not any(m._forward_pre_hooks for m in result.model.modules())  # hooks gone after the fold


@pytest.mark.parametrize("options, message", [
    (dict(lora=LoraSettings(variant="dora")), "DoRA"),
    (dict(train_fp16=True), "--mixed-precision bf16 or no"),
    (dict(granularity="layers"), "cannot score layers"),
    (dict(granularity="unstructured"), "cannot score weights"),
])
def test_refusals_are_one_line(options, message):
    from slimtune.config import LoRAPruneConfig
    from slimtune.training.loop import TrainSettings

    kw = {}
    if "lora" in options:
        kw["lora"] = options["lora"]
    if options.get("train_fp16"):
        kw["train"] = TrainSettings(mixed_precision="fp16")
    kw["prune"] = PruneSettings(granularity=options.get("granularity", "channels"))
    with pytest.raises(SlimtuneError, match=message) as err:
        LoRAPruneConfig(criterion="l0", **kw)
    assert "\n" not in str(err.value)


def test_l0_init_reaches_the_gates_and_defaults_to_2(monkeypatch):
    """--l0-init (LoRAPruneConfig.l0_init) is where every log α starts; 2 by default (5, Sheared-
    LLaMA's start, left the gates untrained in the default 48 steps)."""
    from slimtune.importance.l0 import L0Importance
    from slimtune.training.loop import TrainSettings

    seen = []
    real = L0Importance.bind

    def bind(self, pruner):
        real(self, pruner)
        seen.append(torch.cat([a.detach() for a in self.alpha.values()]))

    monkeypatch.setattr(L0Importance, "bind", bind)
    tokens = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(0))
    for init in (None, 3.5):
        config = slimtune.LoRAPruneConfig(criterion="l0", prune=PruneSettings(sparsity=0.2, granularity="heads,channels"),
                                          lora=LoraSettings(r=4, dropout=0.0), train=TrainSettings(steps=2, checkpoint_every=0),
                                          **({} if init is None else {"l0_init": init}))
        slimtune.prune_(tiny_model("llama"), config, tokens, progress=False)
        assert seen[-1].mean().item() == pytest.approx(2.0 if init is None else init, abs=0.01)
    assert slimtune.LoRAPruneConfig().criterion_options() == {}  # other criteria get nothing
