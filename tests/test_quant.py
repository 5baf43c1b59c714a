"""Weight fake quantisation: specs, PyTorch semantics, LSQ / LSQ+ analytic gradients, LoRA use."""

import math

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.quant import (
    FakeQuantizer,
    LSQPlusQuantizer,
    LSQQuantizer,
    QuantizerSet,
    QuantSpec,
    fake_quantize,
    make_quantizer,
    merged_weight,
    quantize_merged,
    quantized_linear,
)
from slimtune.quant.fake import round_fp16, to_groups
from tests.conftest import tiny_model


def _qmodel(**overrides):
    """The tiny Llama with widths that split into groups of 32: hidden 96, MLP 160."""
    return tiny_model("llama", **{"hidden_size": 96, "intermediate_size": 160, **overrides})


def _weight(out=6, inp=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.05


# ---- spec ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,bits,group,sym,gguf",
    [("w4g32", 4, 32, True, "Q4_0"), ("w8", 8, None, True, "Q8_0"), ("w4g32a", 4, 32, False, "Q4_1"), ("W8G32", 8, 32, True, "Q8_0"),
     ("w8g32a", 8, 32, False, None), ("w4g16", 4, 16, True, None), ("w4g128", 4, 128, True, "Q4_0"), ("w3g32", 3, 32, True, None)],
)
def test_spec_parse(text, bits, group, sym, gguf):
    spec = QuantSpec.parse(text)
    assert (spec.bits, spec.group_size, spec.symmetric, spec.gguf_type) == (bits, group, sym, gguf)
    assert QuantSpec.parse(str(spec)) == spec


def test_spec_ranges():
    assert (QuantSpec(4).qmin, QuantSpec(4).qmax) == (-8, 7)
    assert (QuantSpec(8).qmin, QuantSpec(8).qmax) == (-128, 127)
    assert (QuantSpec(4, 32, False).qmin, QuantSpec(4, 32, False).qmax) == (0, 15)


@pytest.mark.parametrize("text", ["w9", "w1", "x4", "w4g", "w4g0", "4", "w4g32b", ""])
def test_spec_errors_are_one_line(text):
    with pytest.raises(SlimtuneError) as err:
        QuantSpec.parse(text)
    assert "\n" not in str(err.value)


def test_group_that_does_not_divide_the_layer_is_a_clear_error():
    with pytest.raises(SlimtuneError, match=r"does not divide the 80 input features of layer 0 mlp.down_proj.*e\.g\. 40"):
        QuantSpec.parse("w4g32").groups(80, "layer 0 mlp.down_proj")
    with pytest.raises(SlimtuneError, match="does not divide"):
        make_quantizer("lsq", "w4g32", torch.zeros(4, 48))


# ---- PyTorch fake-quant semantics ----------------------------------------------------------------
def _torch_reference(w, q: FakeQuantizer):
    """torch.fake_quantize_per_channel_affine on the grouped view: channels = (row, group)."""
    rows = to_groups(w, q.group).reshape(-1, q.group)
    out = torch.fake_quantize_per_channel_affine(
        rows, q.scale.reshape(-1), q.zero_point.reshape(-1).to(torch.int32), 0, q.qmin, q.qmax
    )
    return out.reshape(w.shape)


@pytest.mark.parametrize("spec", ["w8", "w4", "w8g32", "w4g32", "w4g32a", "w8a", "w4g16a"])
@pytest.mark.parametrize("fp16", [False, True])
def test_fake_quant_matches_pytorch_forward_and_gradient(spec, fp16):
    w0 = _weight(6, 64, seed=1)
    q = FakeQuantizer(spec, w0, fp16_params=fp16).disable_observer()
    with torch.no_grad():  # shrink the scales so that some weights fall outside the range
        q.scale.mul_(0.6)
    upstream = torch.randn(w0.shape, generator=torch.Generator().manual_seed(2))

    w = w0.clone().requires_grad_(True)
    out = q(w)
    (out * upstream).sum().backward()
    wr = w0.clone().requires_grad_(True)
    ref = _torch_reference(wr, q)
    (ref * upstream).sum().backward()

    assert torch.equal(out, ref)
    assert torch.equal(w.grad, wr.grad)
    clipped = (w.grad == 0).float().mean().item()
    assert 0.0 < clipped < 0.5  # the test exercises both branches
    # and the gradient is exactly the straight-through mask: pass inside, zero outside
    qval = torch.round(to_groups(w0, q.group) * (1.0 / q.scale)) + q.zero_point
    inside = ((qval >= q.qmin) & (qval <= q.qmax)).reshape(w0.shape)
    assert torch.equal(w.grad, upstream * inside)


def test_fake_quant_observer_formulas():
    w = _weight(4, 64, seed=3)
    sym = FakeQuantizer("w8g32", w, fp16_params=False)
    wg = to_groups(w, 32)
    absmax = torch.maximum(-wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0))
    assert torch.allclose(sym.scale.squeeze(-1), absmax / 127.5)
    assert torch.count_nonzero(sym.zero_point) == 0
    aff = FakeQuantizer("w4g32a", w, fp16_params=False)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    s = (hi - lo) / 15
    assert torch.allclose(aff.scale.squeeze(-1), s)
    assert torch.equal(aff.zero_point.squeeze(-1), (0 - torch.round(lo / aff.scale.squeeze(-1))).clamp(0, 15))
    # fp16 mode: scales are fp16 values
    f = FakeQuantizer("w4g32", w)
    assert torch.equal(f.scale, round_fp16(f.scale))


def test_fake_quant_observer_follows_the_weight_in_training_only():
    w = _weight(4, 64)
    q = FakeQuantizer("w4g32", w)
    s0 = q.scale.clone()
    q.eval()(w * 3)
    assert torch.equal(q.scale, s0)
    q.train()(w * 3)
    assert not torch.equal(q.scale, s0)
    q.disable_observer()(w * 9)
    assert torch.allclose(q.scale, round_fp16(s0 * 3), rtol=1e-3)


def test_one_shot_fake_quantize_error_is_bounded():
    w = _weight(8, 64, seed=4)
    out = fake_quantize(w, "w8g32")
    step = to_groups(w, 32).abs().amax(-1, keepdim=True) / 127.5
    assert bool((to_groups(out - w, 32).abs() <= step / 2 + 1e-7).all())


def test_codes_and_dequantize_reproduce_the_forward():
    w = _weight(6, 64, seed=5)
    for kind, spec in [("fake", "w4g32"), ("fake", "w8"), ("fake", "w4g32a"), ("lsq", "w4g32"), ("lsq", "w8g64"), ("lsq+", "w4g32a"), ("lsq+", "w4a")]:
        q = make_quantizer(kind, spec, w)
        codes = q.codes(w)
        assert int(codes.min()) >= q.qmin and int(codes.max()) <= q.qmax
        assert torch.equal(q.dequantize(codes), q(w)), (kind, spec)


# ---- LSQ / LSQ+ ----------------------------------------------------------------------------------
def test_lsq_init_and_gradient_scale_follow_the_paper():
    w = _weight(4, 64, seed=6)
    q = LSQQuantizer("w4g32", w, fp16_params=False)
    expect = 2 * to_groups(w, 32).abs().mean(-1, keepdim=True) / math.sqrt(7)
    assert torch.allclose(q.scale, expect)
    assert q.grad_scale == pytest.approx(1 / math.sqrt(32 * 7))
    per_channel = LSQQuantizer("w8", w)
    assert per_channel.grad_scale == pytest.approx(1 / math.sqrt(64 * 127))


def test_lsq_plus_init_by_min_max():
    w = _weight(4, 64, seed=7)
    q = LSQPlusQuantizer("w4g32a", w, fp16_params=False)
    wg = to_groups(w, 32)
    assert torch.allclose(q.scale, (wg.amax(-1, keepdim=True) - wg.amin(-1, keepdim=True)) / 15)
    assert torch.allclose(q.offset, wg.amin(-1, keepdim=True))
    # at init every weight lies inside [β, β + 15 s]: nothing is clipped by more than rounding
    assert torch.allclose(q(w), w, atol=q.scale.max().item() / 2 + 1e-6)


def _analytic(w, s, beta, qmin, qmax, upstream, g, group):
    """The straight-through gradients of LSQ (arXiv 1902.08153 eq. 3) and LSQ+ (arXiv 2004.09576)."""
    wg = to_groups(w.double(), group)
    s, up = s.double(), to_groups(upstream.double(), group)
    b = beta.double() if beta is not None else torch.zeros_like(s)
    u = (wg - b) / s
    lo, hi = u < qmin, u > qmax
    inside = ~(lo | hi)
    out = torch.round(u.clamp(qmin, qmax)) * s + b
    dw = up * inside
    ds = torch.where(inside, torch.round(u) - u, torch.where(lo, torch.full_like(u, qmin), torch.full_like(u, qmax)))
    gs = g * (up * ds).sum(-1, keepdim=True)
    gb = g * (up * (~inside)).sum(-1, keepdim=True)
    return out.reshape(w.shape), dw.reshape(w.shape), gs, gb, inside


@pytest.mark.parametrize("spec", ["w4g32", "w8", "w4"])
def test_lsq_gradients_match_the_analytic_straight_through_formulas(spec):
    w0 = _weight(5, 64, seed=8)
    q = LSQQuantizer(spec, w0, fp16_params=False)
    with torch.no_grad():  # clip beyond ±1.5 σ
        q.scale.fill_(1.5 * w0.std().item() / q.qmax).add_(torch.rand(q.scale.shape) * 1e-4)
    upstream = torch.randn(w0.shape, generator=torch.Generator().manual_seed(9))
    w = w0.clone().requires_grad_(True)
    out = q(w)
    (out * upstream).sum().backward()
    exp_out, exp_dw, exp_ds, _, inside = _analytic(w0, q.scale.detach(), None, q.qmin, q.qmax, upstream, q.grad_scale, q.group)
    assert 0.0 < (~inside).float().mean().item() < 0.5
    assert torch.allclose(out.double(), exp_out, atol=1e-7)
    assert torch.equal(w.grad, upstream * inside.reshape(w0.shape))
    assert torch.allclose(q.scale.grad.double(), exp_ds, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["w4g32a", "w8a", "w4a"])
def test_lsq_plus_gradients_match_the_analytic_straight_through_formulas(spec):
    w0 = _weight(5, 64, seed=10)
    q = LSQPlusQuantizer(spec, w0, fp16_params=False)
    with torch.no_grad():  # clip below -1.2 σ and above 1.5 σ
        sigma = w0.std().item()
        q.scale.fill_(2.7 * sigma / q.qmax).add_(torch.rand(q.scale.shape) * 1e-4)
        q.offset.fill_(-1.2 * sigma)
    upstream = torch.randn(w0.shape, generator=torch.Generator().manual_seed(11))
    w = w0.clone().requires_grad_(True)
    out = q(w)
    (out * upstream).sum().backward()
    exp_out, exp_dw, exp_ds, exp_db, inside = _analytic(w0, q.scale.detach(), q.offset.detach(), q.qmin, q.qmax, upstream, q.grad_scale, q.group)
    assert 0.0 < (~inside).float().mean().item() < 0.5
    assert torch.allclose(out.double(), exp_out, atol=1e-7)
    assert torch.equal(w.grad, upstream * inside.reshape(w0.shape))
    assert torch.allclose(q.scale.grad.double(), exp_ds, rtol=1e-5, atol=1e-5)
    assert torch.allclose(q.offset.grad.double(), exp_db, rtol=1e-5, atol=1e-5)


def test_lsq_interior_step_gradient_is_not_the_finite_difference():
    """Inside the range LSQ's ∂ŵ/∂s = round(w/s) - w/s; a finite difference sees round(w/s) only
    (METHODS pitfall, LSQ §2.1): the analytic formula, not FD, is what the tests pin down."""
    w = torch.tensor([[0.26, -0.13] + [0.0] * 30])
    q = LSQQuantizer("w4g32", w, fp16_params=False, use_grad_scale=False)
    with torch.no_grad():
        q.scale.fill_(0.1)
    q(w)[0, 0].backward()
    assert q.scale.grad.item() == pytest.approx(round(2.6) - 2.6, abs=1e-5)


@pytest.mark.parametrize("cls,spec", [(LSQQuantizer, "w4g32"), (LSQPlusQuantizer, "w4g32a")])
def test_gradient_scale_changes_only_the_step_and_offset_gradients(cls, spec):
    w0 = _weight(4, 64, seed=12)
    upstream = torch.randn(w0.shape, generator=torch.Generator().manual_seed(13))
    runs = []
    for use in (False, True):
        q = cls(spec, w0, use_grad_scale=use)
        with torch.no_grad():
            q.scale.mul_(0.4)
        w = w0.clone().requires_grad_(True)
        out = q(w)
        (out * upstream).sum().backward()
        runs.append((q, out, w.grad))
    (q0, out0, gw0), (q1, out1, gw1) = runs
    assert torch.equal(out0, out1)
    assert torch.equal(gw0, gw1)
    assert torch.allclose(q1.scale.grad, q0.scale.grad * q1.grad_scale, rtol=1e-6, atol=1e-9)
    if cls is LSQPlusQuantizer:
        assert torch.allclose(q1.offset.grad, q0.offset.grad * q1.grad_scale, rtol=1e-6, atol=1e-9)


def test_fp16_params_round_in_the_forward_and_pass_gradients_straight_through():
    w = _weight(4, 64, seed=14)
    q = LSQQuantizer("w4g32", w, use_grad_scale=False)
    with torch.no_grad():
        q.scale.add_(1e-6)  # not an fp16 value any more
    s16 = round_fp16(q.scale.detach())
    assert not torch.equal(q.scale.detach(), s16)
    assert torch.equal(q(w), torch.round((to_groups(w, 32) / s16).clamp(-8, 7)).mul(s16).reshape(w.shape))
    assert torch.equal(q.qparams()[0], s16.squeeze(-1))
    q(w).sum().backward()
    assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all()


def test_kind_and_spec_mismatch_are_clear_errors():
    w = _weight()
    with pytest.raises(SlimtuneError, match="lsq\\+"):
        make_quantizer("lsq", "w4g32a", w)
    with pytest.raises(SlimtuneError, match="w4g32a"):
        make_quantizer("lsq+", "w4g32", w)
    with pytest.raises(SlimtuneError, match="unknown quantizer 'gptq'"):
        make_quantizer("gptq", "w4g32", w)
    q = make_quantizer("lsq", "w4g32", w)
    with pytest.raises(SlimtuneError, match="rebuild the quantisers"):
        q(torch.zeros(3, 64))


def test_all_zero_group_stays_finite():
    w = _weight(2, 64)
    w[0, :32] = 0.0
    for kind, spec in [("lsq", "w4g32"), ("lsq+", "w4g32a"), ("fake", "w4g32"), ("fake", "w4g32a")]:
        q = make_quantizer(kind, spec, w)
        out = q(w.requires_grad_(True))
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.equal(out[0, :32], torch.zeros(32)), kind
        w.grad = None


# ---- with LoRA -----------------------------------------------------------------------------------
def test_quantize_merged_trains_lora_through_the_straight_through_gradient():
    torch.manual_seed(0)
    w0 = _weight(8, 64, seed=15)
    a = (torch.randn(4, 64) * 0.05).requires_grad_(True)
    b = (torch.randn(8, 4) * 0.05).requires_grad_(True)
    keep = torch.rand(8, 64) > 0.3
    scaling = 2.0
    q = LSQQuantizer("w4g32", w0)
    wm = torch.addmm(w0, b, a, alpha=scaling)
    out = quantize_merged(wm, q, keep)
    assert torch.equal(out[~keep], torch.zeros(int((~keep).sum())))  # symmetric: pruned stays exactly 0
    upstream = torch.randn(8, 64)
    (out * upstream).sum().backward()
    # dL/dW_merged = upstream · inside · keep, then the LoRA chain rule
    s = q.qparams()[0].unsqueeze(-1)
    u = to_groups(wm.detach().masked_fill(~keep, 0.0), 32) / s
    inside = ((u >= q.qmin) & (u <= q.qmax)).reshape(8, 64)
    gw = upstream * inside * keep
    assert torch.allclose(b.grad, scaling * gw @ a.detach().T, atol=1e-6)
    assert torch.allclose(a.grad, scaling * b.detach().T @ gw, atol=1e-6)


def test_quantized_linear_recompute_matches_plain_autograd():
    torch.manual_seed(1)
    w0 = _weight(8, 64, seed=16)
    a = (torch.randn(4, 64) * 0.05).requires_grad_(True)
    b = (torch.randn(8, 4) * 0.05).requires_grad_(True)
    x = torch.randn(3, 5, 64, requires_grad=True)
    q = LSQPlusQuantizer("w4g32a", w0)
    results = []
    for recompute in (False, True):
        for t in (a, b, x, q.scale, q.offset):
            t.grad = None
        y = quantized_linear(x, lambda: torch.addmm(w0, b, a, alpha=0.5), None, q, recompute=recompute)
        y.square().sum().backward()
        results.append([y.detach()] + [t.grad.clone() for t in (a, b, x, q.scale, q.offset)])
    for r0, r1 in zip(*results):
        assert torch.allclose(r0, r1, atol=1e-6)


def test_lsq_qat_learns():
    """A few steps of LoRA + LSQ on a regression target lower the loss of the quantised layer."""
    torch.manual_seed(2)
    w0 = _weight(16, 64, seed=17)
    target = w0 + 0.02 * torch.randn(16, 64)
    x = torch.randn(256, 64)
    y = x @ target.T
    a = torch.nn.Parameter(torch.randn(4, 64) * 0.01)
    b = torch.nn.Parameter(torch.zeros(16, 4))
    q = LSQQuantizer("w4g32", w0)
    opt = torch.optim.Adam([a, b, *q.parameters()], lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (quantized_linear(x, lambda: torch.addmm(w0, b, a), None, q) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---- the per-model set ---------------------------------------------------------------------------
def test_quantizer_set_covers_every_projection_and_names_bad_widths():
    with pytest.raises(SlimtuneError, match=r"does not divide the 80 input features of layer 0 mlp.down_proj"):
        QuantizerSet(_qmodel(intermediate_size=80), "w4g32")
    model = _qmodel()
    qs = QuantizerSet(model, "w4g32", kind="lsq", excluded={3})
    assert len(qs.keys()) == 3 * 7
    assert (3, "mlp.down_proj") not in qs and (0, "mlp.down_proj") in qs
    assert sum(p.numel() for p in qs.parameters()) == sum(q.out_features * q.n_groups for q in qs.as_dict().values())
    w = model.model.layers[1].self_attn.k_proj.weight
    assert torch.equal(qs[1, "self_attn.k_proj"](w), qs.get(1, "self_attn.k_proj")(w))


def test_quantizer_set_reads_the_merged_lora_weight():
    from slimtune.adapters.lora import attach_lora, lora_pairs

    model = attach_lora(_qmodel())
    for _, _, m in lora_pairs(model):
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    qs = QuantizerSet(model, "w4g32a", kind="lsq+")
    i, path, m = lora_pairs(model)[2]
    w = merged_weight(m)
    wg = to_groups(w.detach(), 32)
    assert torch.allclose(qs[i, path].offset, wg.amin(-1, keepdim=True), atol=1e-3)  # fp16-rounded scale
    base = m.get_base_layer().weight
    assert not torch.allclose(w, base)


def test_quantizer_set_follows_shrink_when_groups_stay_whole():
    from slimtune.export import shrink_
    from slimtune.masking.structured import StructuredMasks

    model = _qmodel()
    qs = QuantizerSet(model, "w4g32", kind="lsq")
    before = {k: (q.scale.detach().clone()) for k, q in qs.as_dict().items()}
    masks = StructuredMasks(model)
    channels = torch.ones(160)
    channels[32:64] = 0  # one whole group of down_proj's input
    masks.set(1, channels=channels)
    masks.set(2, layer=0)
    qs.shrink_(masks)
    shrink_(model, masks)
    assert len(qs.keys()) == 3 * 7
    layer = model.model.layers[1]
    down = qs[1, "mlp.down_proj"]
    assert (down.in_features, down.n_groups) == (128, 4)
    assert torch.equal(down.scale, before[(1, "mlp.down_proj")][:, [0, 2, 3, 4]])
    assert torch.equal(qs[1, "mlp.up_proj"].scale, before[(1, "mlp.up_proj")][torch.cat([torch.arange(32), torch.arange(64, 160)])])
    assert torch.equal(qs[2, "self_attn.q_proj"].scale, before[(3, "self_attn.q_proj")])  # layer 3 is now layer 2
    for path in ("mlp.down_proj", "mlp.up_proj", "self_attn.o_proj"):
        qs[1, path](layer.get_submodule(path).weight)  # shapes agree


def test_quantizer_set_refuses_a_shrink_that_splits_groups():
    from slimtune.masking.structured import StructuredMasks

    model = _qmodel()
    qs = QuantizerSet(model, "w4g32", kind="lsq")
    masks = StructuredMasks(model)
    channels = torch.ones(160)
    channels[5] = 0
    masks.set(0, channels=channels)
    with pytest.raises(SlimtuneError, match="split quantisation groups of 32"):
        qs.shrink_(masks)
    per_channel = QuantizerSet(model, "w8", kind="lsq")
    per_channel.shrink_(masks)  # per-channel scales do not care which columns remain
    assert per_channel[0, "mlp.down_proj"].in_features == 159


# ---- the patched forward -------------------------------------------------------------------------
def test_attach_quantizers_runs_the_quantised_merged_forward_and_trains_lora_and_steps(tokens):
    from slimtune.adapters.lora import attach_lora, lora_pairs
    from slimtune.quant import attach_quantizers

    model = attach_lora(_qmodel())
    for _, _, m in lora_pairs(model):
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.02)
    qs = QuantizerSet(model, "w4g32", kind="lsq")
    keep = {(0, "mlp.up_proj"): torch.rand(160, 96, generator=torch.Generator().manual_seed(0)) > 0.5}
    # reference: a plain model whose projections hold Q((W0 + s·B·A) ⊙ M)
    ref = _qmodel()
    with torch.no_grad():
        for i, path, m in lora_pairs(model):
            w = merged_weight(m).masked_fill(~keep.get((i, path), torch.ones(1, dtype=torch.bool)), 0.0)
            ref.model.layers[i].get_submodule(path).weight.copy_(qs[i, path](w))
    handles = attach_quantizers(model, qs, weight_masks=keep)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, ref(tokens).logits, atol=1e-5)
        with handles.paused():
            dense = model(tokens).logits
        assert not torch.allclose(dense, ref(tokens).logits, atol=1e-3)
    model.train()
    model(tokens, labels=tokens).loss.backward()
    i, path, m = lora_pairs(model)[0]
    assert m.lora_A["default"].weight.grad.abs().sum() > 0
    assert qs[i, path].scale.grad.abs().sum() > 0
    with pytest.raises(SlimtuneError, match="already attached"):
        attach_quantizers(model, qs)
    handles.remove()
    assert "forward" not in m.__dict__
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, dense)


def test_attach_quantizers_refuses_mismatched_shapes():
    from slimtune.quant import attach_quantizers

    qs = QuantizerSet(_qmodel(), "w4g32", kind="fake")
    with pytest.raises(SlimtuneError, match="rebuild the quantisers"):
        attach_quantizers(_qmodel(intermediate_size=128), qs)
