"""Batch-size-aware learning rate: √ for Adam-type, linear for SGD, clamped, with an opt-out."""

import math

import pytest

from slimtune.errors import SlimtuneError
from slimtune.training.lr_rule import global_batch, rule_for, scaled_lr


def check_one_line(fn):
    with pytest.raises(SlimtuneError) as err:
        fn()
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("batch, factor", [(16, 1.0), (32, math.sqrt(2)), (64, 2.0), (4, 0.5), (8, math.sqrt(0.5)), (128, math.sqrt(8))])
def test_adam_uses_the_square_root(batch, factor):
    assert scaled_lr(1e-4, 16, batch, optimizer="adamw") == pytest.approx(1e-4 * factor, rel=1e-12)
    assert scaled_lr(1e-4, 16, batch, optimizer="Adam") == pytest.approx(1e-4 * factor, rel=1e-12)


@pytest.mark.parametrize("batch, factor", [(16, 1.0), (32, 2.0), (48, 3.0), (8, 0.5), (64, 4.0)])
def test_sgd_is_linear(batch, factor):
    assert scaled_lr(0.1, 16, batch, optimizer="sgd") == pytest.approx(0.1 * factor, rel=1e-12)


def test_cap_clamps_both_ways():
    assert scaled_lr(1.0, 8, 8 * 100, optimizer="adamw") == pytest.approx(4.0)  # √100 = 10 -> 4
    assert scaled_lr(1.0, 800, 8, optimizer="adamw") == pytest.approx(0.25)  # 1/10 -> 1/4
    assert scaled_lr(1.0, 1, 9, optimizer="sgd", cap=2.0) == pytest.approx(2.0)
    assert scaled_lr(1.0, 9, 1, optimizer="sgd", cap=2.0) == pytest.approx(0.5)
    assert scaled_lr(1.0, 1, 100, optimizer="sgd", cap=math.inf) == pytest.approx(100.0)
    assert scaled_lr(1.0, 1, 100, optimizer="sgd", cap=1.0) == 1.0
    assert scaled_lr(1.0, 4, 9, optimizer="adamw", cap=4.0) == pytest.approx(1.5)  # inside the cap: untouched


def test_opt_out_and_explicit_rules():
    assert scaled_lr(3e-4, 8, 512, rule="none") == 3e-4
    assert scaled_lr(3e-4, 8, 512, optimizer="mystery", rule="none") == 3e-4
    assert scaled_lr(1.0, 4, 16, optimizer="adamw", rule="linear") == pytest.approx(4.0)
    assert scaled_lr(1.0, 4, 16, optimizer="sgd", rule="sqrt") == pytest.approx(2.0)
    assert rule_for("adamw") == "sqrt" and rule_for("SGD") == "linear" and rule_for("lion", "none") == "none"


def test_global_batch_is_devices_times_micro_times_accumulation():
    assert global_batch(4, grad_accum=8, devices=2) == 64
    assert global_batch(2) == 2
    assert scaled_lr(1e-4, 16, global_batch(4, 8, 2)) == pytest.approx(2e-4)
    assert "--grad-accum" in check_one_line(lambda: global_batch(4, grad_accum=0))


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: scaled_lr(1e-4, 8, 16, optimizer="shampoo"), "--lr-rule"),
        (lambda: scaled_lr(1e-4, 8, 16, rule="cubic"), "--lr-rule"),
        (lambda: scaled_lr(1e-4, 8, 16, cap=0.5), "--lr-scale-cap"),
        (lambda: scaled_lr(0.0, 8, 16), "--lr"),
        (lambda: scaled_lr(1e-4, 0, 16), "--lr-base-batch"),
        (lambda: scaled_lr(1e-4, 8, 2.5), "global batch"),
    ],
)
def test_bad_arguments_are_one_line_errors(call, words):
    assert words in check_one_line(call)
