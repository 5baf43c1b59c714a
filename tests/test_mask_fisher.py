"""mask_fisher: the Fisher of the head/channel/layer gates, from activation gradients.

The reference is autograd itself: explicit gates m (all ones, requires_grad) put where
masking/gates.py puts the masks, one backward per sequence, Σ_n (∂L_n/∂m)².
"""

import pytest
import torch

import slimtune
from slimtune.adapters import LoraSettings, attach_lora
from slimtune.api import prune_
from slimtune.config import LoRAPruneConfig
from slimtune.errors import SlimtuneError
from slimtune.importance import make_importance
from slimtune.masking.structured import StructuredMasks
from slimtune.models.arch import get_arch
from slimtune.pruning.pruner import PruneSettings
from slimtune.training.loop import TrainSettings
from slimtune.training.loss import causal_lm_loss
from tests.conftest import tiny_model

BATCH = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(7))


def adapted(family="llama"):
    model = attach_lora(tiny_model(family), LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # B = 0 at init; a trained-looking B makes the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def reference_fisher(model, batch):
    """Σ_n (∂L_n/∂m)² per unit, with explicit gates on o_proj / down_proj inputs and layer outputs."""
    spec = get_arch(model)
    geometry = StructuredMasks(model, spec).geometry
    layers = list(spec.decoder_layers(model))
    heads = [torch.zeros(g.num_heads, dtype=torch.float64) for g in geometry]
    chans = [torch.zeros(g.intermediate, dtype=torch.float64) for g in geometry]
    lay = torch.zeros(len(layers), dtype=torch.float64)
    for row in batch:
        hg = [torch.ones(g.num_heads, requires_grad=True) for g in geometry]
        cg = [torch.ones(g.intermediate, requires_grad=True) for g in geometry]
        lg = [torch.ones((), requires_grad=True) for _ in layers]
        handles = []
        for i, layer in enumerate(layers):
            hd = geometry[i].head_dim
            handles.append(layer.get_submodule(spec.o).register_forward_pre_hook(
                lambda m, a, g=hg[i], hd=hd: (a[0] * g.repeat_interleave(hd), *a[1:])))
            handles.append(layer.get_submodule(spec.mlp_out).register_forward_pre_hook(
                lambda m, a, g=cg[i]: (a[0] * g, *a[1:])))

            def layer_gate(m, args, kwargs, out, gate=lg[i]):
                x = args[0] if args else kwargs["hidden_states"]
                o = out[0] if isinstance(out, tuple) else out
                g = x + gate * (o - x)
                return (g, *out[1:]) if isinstance(out, tuple) else g

            handles.append(layer.register_forward_hook(layer_gate, with_kwargs=True))
        loss = causal_lm_loss(model, row[None])
        grads = torch.autograd.grad(loss, [*hg, *cg, *lg])
        for h in handles:
            h.remove()
        n = len(geometry)
        for i in range(n):
            heads[i] += grads[i].double().square()
            chans[i] += grads[n + i].double().square()
            lay[i] += grads[2 * n + i].double().square()
    return heads, chans, lay


def normalised(vectors):
    total = sum(float(v.sum()) for v in vectors)
    return [v.double() / total for v in vectors]


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt"])
def test_scores_are_the_fisher_of_the_gates(family):
    model = adapted(family)
    heads, chans, lay = reference_fisher(model, BATCH)
    imp = make_importance("mask_fisher", model, beta=0.0)  # EMA off: the step's normalised scores
    imp.update(model, BATCH)
    got = imp.unit_scores()
    for want, key in ((normalised(heads), "heads"), (normalised(chans), "channels")):
        for i, w in enumerate(want):
            torch.testing.assert_close(got[i][key].double(), w, rtol=2e-3, atol=1e-9)
    torch.testing.assert_close(imp.layer_scores().double(), lay / lay.sum(), rtol=2e-3, atol=1e-9)
    imp.remove()


def test_hooks_change_nothing_and_leave_with_remove():
    model = adapted()
    with torch.no_grad():
        before = model(BATCH).logits
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    imp = make_importance("mask_fisher", model)
    with torch.no_grad():
        torch.testing.assert_close(model(BATCH).logits, before, rtol=0, atol=0)
    imp.update(model, BATCH)
    assert all(p.grad is None for p in model.parameters())
    imp.remove()
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks


def test_micro_batches_accumulate_until_observe_and_gradient_checkpointing_agrees():
    """Two micro-batches before one observe equal one batch of both; recomputation in backward
    (gradient checkpointing) does not count anything twice."""
    whole = make_importance("mask_fisher", adapted(), beta=0.0)
    whole.update(whole.model, BATCH)

    model = adapted()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    split = make_importance("mask_fisher", model, beta=0.0)
    for part in (BATCH[:2], BATCH[2:]):
        causal_lm_loss(model, part).mul(part.shape[0] / BATCH.shape[0]).backward()
    split.observe(model)
    for a, b in zip(whole.unit_scores(), split.unit_scores()):
        torch.testing.assert_close(a["channels"], b["channels"], rtol=2e-3, atol=1e-9)
        torch.testing.assert_close(a["heads"], b["heads"], rtol=2e-3, atol=1e-9)


def test_ema_and_state_round_trip():
    model = adapted()
    imp = make_importance("mask_fisher", model, beta=0.5)
    imp.update(model, BATCH[:2])
    first = [c["channels"].clone() for c in imp.unit_scores()]
    imp.update(model, BATCH[1:])
    one = make_importance("mask_fisher", adapted(), beta=0.0)
    one.update(one.model, BATCH[1:])
    for i, s in enumerate(imp.unit_scores()):  # Ī = 0.5·(0.5·Î1) + 0.5·Î2, from Ī = 0
        torch.testing.assert_close(s["channels"], 0.25 * first[i] / 0.5 + 0.5 * one.unit_scores()[i]["channels"], rtol=1e-4, atol=1e-9)
    other = make_importance("mask_fisher", adapted(), beta=0.5)
    other.load_state_dict(imp.state_dict())
    for a, b in zip(imp.unit_scores(), other.unit_scores()):
        assert torch.equal(a["channels"], b["channels"]) and torch.equal(a["heads"], b["heads"])
    with pytest.raises(SlimtuneError, match="does not match"):
        other.load_state_dict({**imp.state_dict(), "criterion": "loraprune"})
    with pytest.raises(RuntimeError, match="saw no gradients"):
        other.observe(other.model)


def test_prunes_end_to_end_and_refuses_weights():
    config = LoRAPruneConfig(criterion="mask_fisher", prune=PruneSettings(sparsity=0.3, exclude_layers=[0], granularity="heads,channels"),
                             lora=slimtune.LoraSettings(r=4, alpha=8, dropout=0.0),
                             train=TrainSettings(steps=6, batch_size=2, warmup_steps=0, checkpoint_every=0))
    tokens = torch.randint(0, 96, (16, 16), generator=torch.Generator().manual_seed(5))
    result = prune_(tiny_model("llama"), config, tokens, progress=False)
    assert result.sparsity["achieved"] == pytest.approx(0.3, abs=0.05)
    assert not any(len(m._forward_pre_hooks) for m in result.model.modules())  # the criterion's hooks are gone
    with pytest.raises(SlimtuneError, match="criterion 'mask_fisher' cannot score weights"):
        prune_(tiny_model("llama"), LoRAPruneConfig(criterion="mask_fisher", prune=PruneSettings(granularity="unstructured", sparsity=0.5)))


def test_units_no_gradient_reaches_are_refused_before_work():
    """A gate gets a gradient only when something before it trains: with MLP adapters only,
    layer 0's o_proj input depends on nothing that trains (its heads would all score 0)."""
    from slimtune.api import check_config

    def config(targets, **prune):
        return LoRAPruneConfig(criterion="mask_fisher", prune=PruneSettings(sparsity=0.3, **prune),
                               lora=slimtune.LoraSettings(r=4, alpha=8, targets=targets))

    mlp = ["gate_proj", "up_proj", "down_proj"]
    with pytest.raises(SlimtuneError, match="cannot score heads in layer 0: nothing before that gate trains"):
        check_config(tiny_model("llama"), config(mlp, granularity="heads,channels", exclude_layers=[3]))
    check_config(tiny_model("llama"), config(mlp, granularity="channels", exclude_layers=[3]))  # gate/up train before down's input
    check_config(tiny_model("llama"), config(mlp, granularity="heads,channels", exclude_layers=[0]))  # layer 1 sees layer 0's adapters
    with pytest.raises(SlimtuneError, match="cannot score channels in layer 0"):
        check_config(tiny_model("llama"), config(["down_proj"], granularity="channels", exclude_layers=[3]))
    model = attach_lora(tiny_model("llama"), LoraSettings(r=4, alpha=8, targets=mlp))  # the instance says the same
    with pytest.raises(SlimtuneError, match="cannot score heads in layer 0"):
        make_importance("mask_fisher", model).check_coverage({"heads"}, [0, 1])
