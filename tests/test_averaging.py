"""EMA and SWA of the trainable (LoRA) weights: the formulas, the swap in and out, and resume."""

import copy
from dataclasses import fields

import pytest
import torch
from torch import nn

from slimtune.adapters import LoraSettings, attach_lora
from slimtune.errors import SlimtuneError
from slimtune.training.averaging import (
    DEFAULT_EMA_DECAY,
    DEFAULT_SWA_FRACTION,
    AveragingSettings,
    WeightAverager,
    check_export_choice,
)
from tests.conftest import tiny_model


def params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return {
        "a": nn.Parameter(torch.randn(3, 4, generator=g, dtype=dtype)),
        "b": nn.Parameter(torch.randn(5, generator=g, dtype=dtype)),
    }


def snapshots(k, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 4, generator=g, dtype=dtype), "b": torch.randn(5, generator=g, dtype=dtype)} for _ in range(k)]


def run(avg, ps, snaps, first_step=1):
    for t, snap in enumerate(snaps, start=first_step):
        with torch.no_grad():
            for n, v in snap.items():
                ps[n].copy_(v)
        avg.update(t)


def check_one_line(fn):
    with pytest.raises(SlimtuneError) as err:
        fn()
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("d", [0.0, 0.5, 0.9])
def test_ema_is_the_closed_form(d):
    ps, snaps = params(), snapshots(6)
    avg = WeightAverager(ps, AveragingSettings(ema=d))
    run(avg, ps, snaps)
    k = len(snaps)
    for n in ps:
        want = d ** (k - 1) * snaps[0][n] + sum((1 - d) * d ** (k - j) * snaps[j - 1][n] for j in range(2, k + 1))
        torch.testing.assert_close(avg.averaged("ema")[n], want, rtol=1e-12, atol=1e-12)
    assert avg.ema_count == k


def test_ema_of_a_constant_is_that_constant_exactly():
    ps = params(torch.float32)
    avg = WeightAverager(ps, AveragingSettings(ema=0.999))
    const = snapshots(1, torch.float32)[0]
    run(avg, ps, [const] * 7)
    for n in ps:
        assert torch.equal(avg.averaged("ema")[n], const[n])  # no bias correction to get wrong


def test_swa_is_the_mean_of_the_snapshots_in_its_window():
    total, fraction = 10, 0.3  # window: steps 8, 9, 10
    ps, snaps = params(), snapshots(total)
    avg = WeightAverager(ps, AveragingSettings(swa=fraction), total_steps=total)
    run(avg, ps, snaps[:7])
    assert avg.swa_count == 0
    assert "window" in check_one_line(lambda: avg.averaged("swa"))
    run(avg, ps, snaps[7:], first_step=8)
    assert avg.swa_count == 3
    for n in ps:
        want = torch.stack([s[n] for s in snaps[7:]]).mean(0)
        torch.testing.assert_close(avg.averaged("swa")[n], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("total, fraction, window", [(10, 1.0, 10), (10, 0.25, 3), (4, 0.01, 1), (30, 0.1, 3), (7, DEFAULT_SWA_FRACTION, 2)])
def test_swa_window_length(total, fraction, window):
    avg = WeightAverager(params(), AveragingSettings(swa=fraction), total_steps=total)
    assert total - avg.swa_start == window


def test_ema_and_swa_together_and_half_precision_params_average_in_fp32():
    ps = {n: nn.Parameter(p.detach().to(torch.bfloat16)) for n, p in params().items()}
    snaps = snapshots(4, torch.bfloat16)
    avg = WeightAverager(ps, AveragingSettings(ema=0.5, swa=0.5), total_steps=4)
    run(avg, ps, snaps)
    for n in ps:
        assert avg.averaged("ema")[n].dtype == torch.float32
        want = torch.stack([s[n].float() for s in snaps[2:]]).mean(0)
        torch.testing.assert_close(avg.averaged("swa")[n], want, rtol=0, atol=1e-6)


def test_apply_and_restore_swap_the_lora_weights_of_a_peft_model():
    model = attach_lora(tiny_model(), LoraSettings(r=4, dropout=0.0))
    avg = WeightAverager(model, AveragingSettings(ema=0.5, swa=1.0), total_steps=3)
    assert set(avg.params) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in avg.params)
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(2)
    for t in range(1, 4):
        with torch.no_grad():
            for p in avg.params.values():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        avg.update(t)
    last = {n: p.detach().clone() for n, p in avg.params.items()}
    with torch.no_grad():
        out_last = model(input_ids=x).logits
    for kind in ("ema", "swa"):
        with avg.apply_to(kind):
            for n, p in avg.params.items():
                assert torch.equal(p, avg.averaged(kind)[n])
            with torch.no_grad():
                assert not torch.allclose(model(input_ids=x).logits, out_last)
            with pytest.raises(RuntimeError):
                avg.update(4)  # averaging averaged weights would be a bug
        for n, p in avg.params.items():
            assert torch.equal(p, last[n])
    avg.apply_to("last")
    avg.restore()
    # apply_to(model): by name into another copy of the same set-up, e.g. one made for export
    other = copy.deepcopy(model)
    avg.apply_to("ema", other)
    for n, p in other.named_parameters():
        if n in avg.params:
            assert torch.equal(p, avg.averaged("ema")[n])
    avg.restore()
    for n, p in other.named_parameters():
        if n in avg.params:
            assert torch.equal(p, last[n])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, out_last, rtol=0, atol=0)


def test_resume_from_state_dict_equals_an_uninterrupted_run():
    settings, total = AveragingSettings(ema=0.7, swa=0.5), 8
    snaps = snapshots(total)
    ps_a = params()
    full = WeightAverager(ps_a, settings, total_steps=total)
    run(full, ps_a, snaps)
    ps_b = params()
    first = WeightAverager(ps_b, settings, total_steps=total)
    run(first, ps_b, snaps[:5])  # the SWA window (steps 5..8) has begun
    state = copy.deepcopy(first.state_dict())
    ps_c = params()
    resumed = WeightAverager(ps_c, AveragingSettings(ema=0.7, swa=0.5), total_steps=total)
    resumed.load_state_dict(state)
    run(resumed, ps_c, snaps[5:], first_step=6)
    for kind in ("ema", "swa"):
        for n in ps_a:
            torch.testing.assert_close(resumed.averaged(kind)[n], full.averaged(kind)[n], rtol=0, atol=0)
    with pytest.raises(ValueError):
        resumed.update(8)  # steps must increase


def test_resume_with_other_options_is_a_one_line_error():
    state = WeightAverager(params(), AveragingSettings(ema=0.9), total_steps=5).state_dict()
    assert "--ema" in check_one_line(lambda: WeightAverager(params(), AveragingSettings(ema=0.99)).load_state_dict(state))
    swa = WeightAverager(params(), AveragingSettings(swa=0.5), total_steps=10).state_dict()
    assert "--steps" in check_one_line(lambda: WeightAverager(params(), AveragingSettings(swa=0.5), total_steps=12).load_state_dict(swa))
    other = {"c": nn.Parameter(torch.zeros(2))}
    assert "--resume" in check_one_line(lambda: WeightAverager(other, AveragingSettings(ema=0.9)).load_state_dict(state))


@pytest.mark.parametrize(
    "kwargs, flag",
    [({"ema": 1.0}, "--ema"), ({"ema": -0.1}, "--ema"), ({"ema": "high"}, "--ema"), ({"swa": 0.0}, "--swa"), ({"swa": 1.2}, "--swa"), ({"swa": "x"}, "--swa")],
)
def test_bad_settings_are_one_line_errors(kwargs, flag):
    assert flag in check_one_line(lambda: AveragingSettings(**kwargs))


def test_settings_defaults_and_help():
    s = AveragingSettings()
    assert not s.enabled and AveragingSettings(ema=DEFAULT_EMA_DECAY).enabled
    assert all(f.metadata.get("help") for f in fields(AveragingSettings))


def test_export_choice():
    s = AveragingSettings(ema=0.9)
    assert check_export_choice("last", s) == "last" and check_export_choice("ema", s) == "ema"
    assert "--swa" in check_one_line(lambda: check_export_choice("swa", s))
    assert "--ema" in check_one_line(lambda: check_export_choice("ema", AveragingSettings()))
    assert "last, ema, swa" in check_one_line(lambda: check_export_choice("best", s))
    avg = WeightAverager(params(), s)
    assert "train longer" in check_one_line(lambda: avg.averaged("ema"))


def test_nothing_trainable_is_an_error():
    model = tiny_model()
    model.requires_grad_(False)
    assert "LoRA" in check_one_line(lambda: WeightAverager(model, AveragingSettings(ema=0.9)))


def test_an_ema_longer_than_the_run_is_flagged_with_a_decay_that_fits(capsys):
    """Bare --ema (0.999) on 48 steps exports almost the first step's adapters (README v8): say so."""
    WeightAverager(params(), AveragingSettings(ema=DEFAULT_EMA_DECAY), total_steps=48)
    err = capsys.readouterr().err
    assert "--ema 0.999 remembers about 1000 steps but the run has 48" in err
    assert f"keep {0.999 ** 47:.0%}" in err and "--ema 0.9" in err
    WeightAverager(params(), AveragingSettings(ema=0.9), total_steps=48)  # window 10 <= 24: silent
    WeightAverager(params(), AveragingSettings(ema=DEFAULT_EMA_DECAY), total_steps=4000)
    assert capsys.readouterr().err == ""
