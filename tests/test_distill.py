"""Self-distillation from the dense teacher (adapters off, masks open): chunked = unchunked, the
teacher is the pretrained model, mix = 0 is the plain LM loss, and bad settings are one-line errors."""

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from slimtune.adapters import LoraSettings, attach_lora, lora_pairs, lora_weights
from slimtune.errors import SlimtuneError
from slimtune.masking import StructuredMasks, WeightMasks, attach_gates, attach_weight_masks
from slimtune.training.distill import DistillSettings, dense_teacher, distill_loss, masks_open
from slimtune.training.loss import causal_lm_loss
from tests.conftest import tiny_model

X = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(0))


def perturb_lora(model, seed=0, scale=0.05):
    """B != 0, so the adapters change the function and the teacher differs from the student."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, m in lora_pairs(model):
            _, b = lora_weights(m)
            b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * scale)


def prune_some(model):
    """Structured gates (a head, channels, a whole layer) and weight masks, both attached."""
    masks = StructuredMasks(model)
    heads = torch.ones(masks.geometry[0].num_heads)
    heads[0] = 0
    masks.set(0, heads=heads, channels=(torch.arange(masks.geometry[0].intermediate) % 3 != 0).float())
    masks.set(2, layer=[0.0])
    gates = attach_gates(model, masks)
    wmasks = WeightMasks(model, excluded={0})
    g = torch.Generator().manual_seed(3)
    for key, m in wmasks.as_dict().items():
        wmasks.set_mask(*key, torch.rand(m.shape, generator=g) > 0.4)
    return gates, attach_weight_masks(model, wmasks)


def student(dtype=torch.float32, family="llama"):
    base = tiny_model(family).to(dtype)
    with torch.no_grad():
        reference = base(input_ids=X).logits.clone()
    model = attach_lora(base, LoraSettings(r=4, alpha=8.0, dropout=0.0))
    perturb_lora(model)
    with torch.no_grad():
        student.adapted = model.eval()(input_ids=X).logits.clone()  # adapters on, no masks yet
    handles = prune_some(model)
    return model, handles, reference


def lora_grads(model):
    # a removed layer's adapters get no gradient at all
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def check_one_line(fn):
    with pytest.raises(SlimtuneError) as err:
        fn()
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_teacher_is_the_model_before_adapters_and_masks(family):
    model, handles, reference = student(family=family)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        masked = model.eval()(input_ids=X).logits
    model.train()  # OPT has dropout: the teacher must switch it off
    assert not torch.allclose(masked, reference, atol=1e-3)  # adapters and masks do act
    teacher = dense_teacher(model, *handles)
    with torch.no_grad(), teacher():
        assert not model.training
        dense = model(input_ids=X).logits
    torch.testing.assert_close(dense, reference, rtol=1e-5, atol=1e-5)
    # everything comes back: masks, adapters, training flags, requires_grad
    assert all(h.enabled for h in handles)
    assert model.training and all(m.training for m in model.modules())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=X).logits, masked)


def test_masks_open_pauses_each_kind_and_nests():
    model, (gates, wm), reference = student()
    with torch.no_grad(), model.disable_adapter():
        only_masks = model(input_ids=X).logits
        with masks_open(gates, None):
            assert not gates.enabled and wm.enabled
            with masks_open(wm):
                torch.testing.assert_close(model(input_ids=X).logits, reference, rtol=1e-5, atol=1e-5)
            assert not gates.enabled and wm.enabled
            half = model(input_ids=X).logits
        assert gates.enabled and wm.enabled
        torch.testing.assert_close(model(input_ids=X).logits, only_masks)
    assert not torch.allclose(half, reference, atol=1e-4) and not torch.allclose(half, only_masks, atol=1e-4)
    # adapters on, masks open: the adapted model as it was before the masks were attached
    with torch.no_grad(), masks_open(gates, wm):
        torch.testing.assert_close(model(input_ids=X).logits, student.adapted, rtol=1e-5, atol=1e-5)


def test_handles_still_remove_and_refuse_a_second_attach():
    model, (gates, wm), _ = student()
    with torch.no_grad():
        masked = model(input_ids=X).logits
    wmasks = WeightMasks(model)
    check_one_line(lambda: attach_weight_masks(model, wmasks))  # already attached
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=X).logits, masked, rtol=0, atol=0)
    with masks_open(gates, wm):
        pass
    gates.remove()
    wm.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=X).logits, student.adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mix", [0.3, 1.0])
def test_chunked_distill_equals_full_logits(mix):
    torch.manual_seed(0)
    model, handles, _ = student(torch.float64)
    model.train()
    settings = DistillSettings(temperature=1.7, mix=mix)
    teacher = dense_teacher(model, *handles)
    # reference: full [tokens, vocab] logits of both models
    with torch.no_grad(), teacher():
        t_logits = model(input_ids=X).logits[:, :-1].reshape(-1, 112)
    s_logits = model(input_ids=X).logits[:, :-1].reshape(-1, 112)
    y = X[:, 1:].reshape(-1)
    T = settings.temperature
    ref_lm = F.cross_entropy(s_logits, y)
    p = F.softmax(t_logits / T, dim=-1)
    ref_kl = T * T * (p * (p.log() - F.log_softmax(s_logits / T, dim=-1))).sum(-1).mean()
    ref_total = (1 - mix) * ref_lm + mix * ref_kl
    ref_total.backward()
    ref_grads = lora_grads(model)
    model.zero_grad()

    total, lm, kl = distill_loss(model, X, teacher, settings, chunk_tokens=7)  # 30 tokens: ragged chunks
    total.backward()
    assert kl.item() > 1e-4  # the teacher does differ
    torch.testing.assert_close(lm, ref_lm, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total, ref_total, rtol=1e-10, atol=1e-12)
    for n, g in lora_grads(model).items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-8, atol=1e-12)


def test_mix_zero_is_the_lm_loss_and_skips_the_teacher():
    model, _, _ = student()

    @contextmanager
    def no_teacher():
        raise AssertionError("the teacher must not run when mix = 0")
        yield

    total, lm, kl = distill_loss(model, X, no_teacher, DistillSettings(mix=0.0), chunk_tokens=5)
    total.backward()
    grads = lora_grads(model)
    model.zero_grad()
    ref = causal_lm_loss(model, X, chunk_tokens=5)
    ref.backward()
    torch.testing.assert_close(total, ref, rtol=0, atol=0)
    torch.testing.assert_close(lm, ref, rtol=0, atol=0)
    assert kl.item() == 0.0
    for n, g in lora_grads(model).items():
        torch.testing.assert_close(g, grads[n], rtol=0, atol=0)


def test_teacher_gets_no_gradient_and_runs_under_autocast():
    model, handles, _ = student()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, lm, kl = distill_loss(model, X, dense_teacher(model, *handles), DistillSettings())
    total.backward()
    assert torch.isfinite(total) and total.dtype == torch.float32
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"temperature": 0.0}, "--distill-temperature"),
        ({"temperature": -1.0}, "--distill-temperature"),
        ({"temperature": float("nan")}, "--distill-temperature"),
        ({"mix": -0.1}, "--distill-mix"),
        ({"mix": 1.5}, "--distill-mix"),
        ({"mix": "lots"}, "--distill-mix"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, flag):
    assert flag in check_one_line(lambda: DistillSettings(**kwargs))


def test_settings_carry_help():
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(DistillSettings))


def test_teacher_needs_peft_and_refuses_pissa():
    assert "PEFT" in check_one_line(lambda: dense_teacher(tiny_model()))
    pissa = attach_lora(tiny_model(), LoraSettings(r=4, variant="pissa"))
    assert "PiSSA" in check_one_line(lambda: dense_teacher(pissa))


def test_gradients_are_the_same_with_activation_checkpointing():
    from slimtune.models.arch import unwrap
    from slimtune.training.loop import enable_checkpointing

    model, handles, _ = student()
    model.train()
    settings, teacher = DistillSettings(temperature=3.0, mix=0.6), dense_teacher(model, *handles)
    plain = distill_loss(model, X, teacher, settings, chunk_tokens=8)[0]
    plain.backward()
    want = lora_grads(model)
    model.zero_grad()
    base = unwrap(model)
    enable_checkpointing(base)
    base.enable_input_require_grads()
    total = distill_loss(model, X, teacher, settings, chunk_tokens=8)[0]
    total.backward()
    torch.testing.assert_close(total, plain, rtol=1e-6, atol=1e-6)
    for n, g in lora_grads(model).items():
        torch.testing.assert_close(g, want[n], rtol=1e-4, atol=1e-6)
