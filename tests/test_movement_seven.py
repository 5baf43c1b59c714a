"""Movement (arXiv 2005.07683) and SEVEN (arXiv 2403.12688) importance: the scores against hand-written
references of their formulas (METHODS.md §3 and §5), the unit reduction, state, skipped steps and
the CLI end to end."""

import io
import json

import pytest
import torch

from slimtune.adapters import LoraSettings, attach_lora, lora_pairs, lora_weights, scaling
from slimtune.errors import SlimtuneError
from slimtune.importance import MovementImportance, SevenImportance, make_importance
from slimtune.importance.base import projection_weights
from slimtune.importance.loraprune import enable_full_grad
from slimtune.importance.reduce import unit_scores
from slimtune.models.arch import get_arch
from tests.conftest import (
    assert_same_safetensors,
    count_host_reads,
    interrupt_training_at,
    run_prune_cli,
    tiny_model,
)

CLASSES = {"movement": MovementImportance, "seven": SevenImportance}


def lora_model(seed=0, dtype=torch.float64):
    model = attach_lora(tiny_model("llama", seed=seed), LoraSettings(r=4, alpha=8.0, dropout=0.0)).to(dtype)
    with torch.no_grad():  # B = 0 at init; a trained-looking B exercises every term of the estimate
        for _, _, m in lora_pairs(model):
            lora_weights(m)[1].normal_(0, 0.05)
    return model


def pairs(model):
    """{(layer, path): (W0, LoRA module)} for every adapted projection."""
    weights = {(i, p): w for i, p, w in projection_weights(model, get_arch(model))}
    return {(i, p): (weights[(i, p)], m) for i, p, m in lora_pairs(model)}


def give_grads(model, metric, gen, magnitude=None):
    """Known gradients on every projection (no backward): W0.grad for metric grad, A/B grads for
    lora. `magnitude(shape)` sets |G| (signs stay random). Returns {key: G} with G = W0.grad or Ĝ."""
    out = {}
    for key, (w0, m) in pairs(model).items():
        A, B = lora_weights(m)
        if metric == "grad":
            g = torch.randn(w0.shape, generator=gen, dtype=w0.dtype)
            if magnitude is not None:
                g = g.sign() * magnitude(g.shape)
            w0.grad = g
        else:
            A.grad = torch.randn(A.shape, generator=gen, dtype=A.dtype)
            B.grad = torch.randn(B.shape, generator=gen, dtype=B.dtype)
            g = B.grad @ A + B @ A.grad - B.grad @ A.grad  # Ĝ, written out
        out[key] = g.detach().clone()
    return out


def effective(model):
    """W = W0 + s·B·A of every adapted projection."""
    return {key: (w0 + scaling(m) * lora_weights(m)[1] @ lora_weights(m)[0]).detach().clone() for key, (w0, m) in pairs(model).items()}


def move_adapters(model, gen):
    """What an optimiser step does between observations: A and B change, so W does."""
    with torch.no_grad():
        for _, m in pairs(model).values():
            for p in lora_weights(m):
                p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def seven_reference(gs, ws, a1=0.8, a2=0.9):
    """SEVEN's released score, written out: I = Σ_k |W ⊙ g ⊙ m̂/v̂| with g = |∇W|."""
    m = v = score = 0.0
    for k, (g, w) in enumerate(zip(gs, ws)):
        g = g.abs()
        m = a1 * m + (1 - a1) * g
        v = a2 * v + (1 - a2) * g**2
        ratio = (m / (1 - a1 ** (k + 1))) / ((v / (1 - a2 ** (k + 1))).sqrt() + 1e-9)
        score = score + (w * g * ratio).abs()
    return score


def run_steps(model, imp, metric, steps, seed=0, magnitude=None, move=True):
    """`steps` observations with known gradients; returns the per-step {key: G} and {key: W}."""
    gen = torch.Generator().manual_seed(seed)
    gs, ws = [], []
    for _ in range(steps):
        gs.append(give_grads(model, metric, gen, magnitude))
        ws.append(effective(model))
        assert imp.observe(model)
        if move:
            move_adapters(model, gen)
    return gs, ws


# ---- movement ---------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["lora", "grad"])
def test_movement_is_the_cumulative_minus_g_times_w(metric):
    """S_T = −Σ_t G_t ⊙ W_t (METHODS §3, test 1 in spirit): what SGD from S₀ = 0 on the scores of
    hard movement pruning accumulates, with G = Ĝ (lora) or W0.grad (grad), W = W0 + s·B·A."""
    model = lora_model()
    imp = MovementImportance(model, metric=metric, keep_elements=True)
    gs, ws = run_steps(model, imp, metric, steps=3)
    elements = imp.element_scores()
    for key in pairs(model):
        want = -sum(g[key] * w[key] for g, w in zip(gs, ws))
        torch.testing.assert_close(elements[key[0]][key[1]], want, rtol=1e-10, atol=1e-12)
    assert imp.steps == 3 and imp.signed


def test_movement_units_are_signed_group_sums():
    """A unit's score is the signed sum of its weights' scores (no |.|): q rows and o columns of
    the head, its KV head's k and v rows shared by the group's G query heads; gate/up rows and the
    down column of a channel; the layer's whole sum. With l2 each projection's vector is
    normalised first: reduce.unit_scores of the element scores, without the |.| of signed=True."""
    model = lora_model()
    raw = MovementImportance(model, keep_elements=True, normalise="none")
    l2 = MovementImportance(model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        give_grads(model, "lora", gen)
        raw.observe(model)
        l2.observe(model)
        move_adapters(model, gen)
    spec, elements = raw.spec, raw.element_scores()
    negative = 0
    for i, got in enumerate(raw.unit_scores()):
        if i not in elements:
            continue
        e, g = elements[i], raw.geometry[i]
        hd, group = g.head_dim, g.group_size
        kv = (e[spec.k].reshape(g.num_kv_heads, hd, -1).sum(dim=(1, 2)) + e[spec.v].reshape(g.num_kv_heads, hd, -1).sum(dim=(1, 2))) / group
        heads = torch.stack([e[spec.q][h * hd:(h + 1) * hd].sum() + e[spec.o][:, h * hd:(h + 1) * hd].sum() + kv[h // group]
                             for h in range(g.num_heads)])
        channels = sum(e[p].sum(dim=1) for p in spec.mlp_in) + e[spec.mlp_out].sum(dim=0)
        torch.testing.assert_close(got["heads"], heads.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["channels"], channels.float(), rtol=1e-5, atol=1e-6)
        assert got["layer"] == pytest.approx(float(sum(s.sum() for s in e.values())), rel=1e-5)
        negative += int((got["heads"] < 0).sum() + (got["channels"] < 0).sum())
    assert negative > 0  # signed scores: weights moving toward zero score below zero
    for got, want in zip(l2.unit_scores(), unit_scores(spec, raw.geometry, elements, signed=False, normalise="l2")):
        torch.testing.assert_close(got["heads"], want["heads"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["channels"], want["channels"], rtol=1e-5, atol=1e-6)


def test_full_rank_estimate_is_s_times_the_true_gradient():
    """r ≥ d_in, A with orthonormal columns, B = 0: Ĝ = s·G exactly, so `movement` gives s times
    `movement_grad` and `seven` (m̂/v̂ is scale-free but for the 1e-9 in v̂, which matters for the
    tiny gradients of a random model) s times `seven_grad`, on a real backward."""
    from tests.test_loraprune_importance import full_rank_orthogonal

    model, _ = full_rank_orthogonal()
    restore = enable_full_grad(model)
    crits = {name: make_importance(name, model, keep_elements=True) for name in ("movement", "movement_grad", "seven", "seven_grad")}
    for seed in (1, 2):
        tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))
        model.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        for imp in crits.values():
            assert imp.observe(model)
    restore()
    for name, rtol in (("movement", 1e-7), ("seven", 1e-3)):
        est, ref = crits[name].element_scores(), crits[f"{name}_grad"].element_scores()
        for i in est:
            for path in est[i]:
                torch.testing.assert_close(est[i][path], 2.0 * ref[i][path], rtol=rtol, atol=1e-12)


# ---- SEVEN --------------------------------------------------------------------------------------
def test_seven_constant_gradient_is_cumulative_taylor():
    """A constant gradient gives m̂ = v̂ = |g| at every k (METHODS §5, test 1), so I = Σ_t |W_t·g|."""
    model = lora_model()
    imp = SevenImportance(model, metric="grad", keep_elements=True)
    gen = torch.Generator().manual_seed(0)
    fixed = {key: (torch.rand(w0.shape, generator=gen, dtype=w0.dtype) + 0.5) * torch.randn(w0.shape, generator=gen).sign()
             for key, (w0, _) in pairs(model).items()}  # |g| in [0.5, 1.5]: the 1e-9 is below the tolerance
    ws = []
    for _ in range(4):
        for key, (w0, _) in pairs(model).items():
            w0.grad = fixed[key].clone()
        ws.append(effective(model))
        imp.observe(model)
        move_adapters(model, gen)
    elements = imp.element_scores()
    for key in pairs(model):
        want = sum((w[key] * fixed[key]).abs() for w in ws)
        torch.testing.assert_close(elements[key[0]][key[1]], want, rtol=1e-8, atol=0)


@pytest.mark.parametrize("metric", ["lora", "grad"])
def test_seven_matches_the_written_out_formula(metric):
    model = lora_model()
    imp = SevenImportance(model, metric=metric, keep_elements=True)
    gs, ws = run_steps(model, imp, metric, steps=4, seed=2)
    elements = imp.element_scores()
    for key in pairs(model):
        want = seven_reference([g[key] for g in gs], [w[key] for w in ws])
        torch.testing.assert_close(elements[key[0]][key[1]], want, rtol=1e-10, atol=1e-14)


def test_seven_noisy_magnitudes_score_below_taylor():
    """Random gradient magnitudes give m̂/v̂ < 1: E|g| < √E[g²]. With α₁ = α₂ that holds for every
    weight (Cauchy-Schwarz); with the defaults' different windows for nearly all (METHODS §5)."""
    gen = torch.Generator().manual_seed(5)
    magnitude = lambda shape: torch.rand(shape, generator=gen, dtype=torch.float64) * 2  # noqa: E731
    for alphas, share in (((0.8, 0.9), 0.9), ((0.85, 0.85), 1.0)):
        model = lora_model()
        imp = SevenImportance(model, metric="grad", alpha1=alphas[0], alpha2=alphas[1], keep_elements=True)
        gs, ws = run_steps(model, imp, "grad", steps=4, seed=6, magnitude=magnitude, move=False)
        w = ws[0]  # W fixed: I / Σ|W·g| is a weighted mean of the per-step ratios
        for key in pairs(model):
            ratio = imp.element_scores()[key[0]][key[1]] / sum((w[key] * g[key]).abs() for g in gs)
            assert float((ratio < 1).double().mean()) >= share and float(ratio.mean()) < 0.97


# ---- both: state, skipped steps, options, host reads --------------------------------------------
@pytest.mark.parametrize("name", ["movement", "seven"])
def test_state_dict_round_trip_continues_identically(name):
    model = lora_model()
    a = CLASSES[name](model, keep_elements=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        give_grads(model, "lora", gen)
        a.observe(model)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = CLASSES[name](model, keep_elements=True)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(2):
        give_grads(model, "lora", gen)
        a.observe(model)
        b.observe(model)
    sa, sb = a.state_dict(), b.state_dict()
    assert (sa["steps"], sa["skipped"]) == (sb["steps"], sb["skipped"]) == (4, 0)
    assert set(sa) == set(sb)
    for field in sa:
        if isinstance(sa[field], dict):
            assert sa[field].keys() == sb[field].keys() and sa[field]
            assert all(torch.equal(sa[field][k], sb[field][k]) for k in sa[field]), field
    assert torch.equal(sa["layer"], sb["layer"])
    for x, y in zip(a.unit_scores(), b.unit_scores()):
        assert torch.equal(x["heads"], y["heads"]) and torch.equal(x["channels"], y["channels"]) and x["layer"] == y["layer"]
    other = SevenImportance if name == "movement" else MovementImportance
    with pytest.raises(SlimtuneError, match="does not match"):
        other(model).load_state_dict(a.state_dict())
    with pytest.raises(SlimtuneError, match="does not match"):
        CLASSES[name](model, metric="grad").load_state_dict(a.state_dict())
    if name == "seven":
        with pytest.raises(SlimtuneError, match="alpha"):
            SevenImportance(model, alpha1=0.5).load_state_dict(a.state_dict())


@pytest.mark.parametrize("name", ["movement", "seven"])
@pytest.mark.parametrize("metric", ["lora", "grad"])
def test_non_finite_step_is_skipped_and_changes_nothing(name, metric):
    model = lora_model()
    imp = CLASSES[name](model, metric=metric, keep_elements=True)
    gen = torch.Generator().manual_seed(0)
    give_grads(model, metric, gen)
    assert imp.observe(model)
    before = imp.state_dict()
    give_grads(model, metric, gen)
    w0, m = pairs(model)[(2, get_arch(model).mlp_out)]
    (w0 if metric == "grad" else lora_weights(m)[0]).grad[0, 1] = float("inf")
    assert not imp.observe(model)
    assert (imp.steps, imp.skipped) == (1, 1)
    after = imp.state_dict()
    for field, value in before.items():
        if isinstance(value, dict):
            assert all(torch.equal(value[k], after[field][k]) for k in value), field
    assert torch.equal(before["layer"], after["layer"])
    give_grads(model, metric, gen)
    assert imp.observe(model) and imp.steps == 2


def test_bad_options_are_one_line_errors():
    model = lora_model()
    for kwargs, message in [({"alpha1": 1.0}, "alpha1 1.0 is outside"), ({"alpha2": -0.1}, "alpha2 -0.1 is outside"),
                            ({"metric": "magnitude"}, "metric 'magnitude'"), ({"normalise": "max"}, "normalisation 'max'")]:
        with pytest.raises(SlimtuneError, match=message) as err:
            SevenImportance(model, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(SlimtuneError, match="movement metric 'hessian'"):
        MovementImportance(model, metric="hessian")
    with pytest.raises(SlimtuneError, match="no LoRA adapters"):
        MovementImportance(tiny_model("llama"))
    with pytest.raises(RuntimeError, match="enable_full_grad"):
        SevenImportance(model, metric="grad").observe(model)


@pytest.mark.parametrize("name", ["movement", "seven"])
def test_stacked_scores_equal_one_projection_at_a_time(name):
    """stack_mib > 0 scores the same projection of many layers at once (the GPU path)."""
    model = lora_model()
    per_key, stacked = (CLASSES[name](model, keep_elements=True, stack_mib=mib) for mib in (0, 64))
    run_steps(model, per_key, "lora", steps=2, seed=4, move=False)
    run_steps(model, stacked, "lora", steps=2, seed=4, move=False)
    ea, eb = per_key.element_scores(), stacked.element_scores()
    for i in ea:
        for path in ea[i]:
            torch.testing.assert_close(ea[i][path], eb[i][path], rtol=1e-12, atol=1e-15)
    for x, y in zip(per_key.unit_scores(), stacked.unit_scores()):
        torch.testing.assert_close(x["heads"], y["heads"])
        torch.testing.assert_close(x["channels"], y["channels"])


@pytest.mark.parametrize("name", ["movement", "seven"])
def test_observe_reads_back_to_the_host_once_per_step(monkeypatch, name):
    model = lora_model()
    imp = CLASSES[name](model, keep_elements=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        give_grads(model, "lora", gen)
        reads = count_host_reads(monkeypatch)
        assert imp.observe(model)
        monkeypatch.undo()
        assert reads == ["__bool__"]


# ---- the CLI end to end ---------------------------------------------------------------------------
def prune_cli(capsys, inputs, out, *args):
    return run_prune_cli(capsys, inputs, out, "--steps", "4", *args)


@pytest.mark.parametrize("name, gran", [("movement", "heads,channels"), ("seven", "channels"), ("movement", "unstructured"), ("seven", "unstructured")])
def test_prune_end_to_end(tmp_path, cli_inputs, capsys, name, gran):
    code, err = prune_cli(capsys, cli_inputs, tmp_path / "out", "--criterion", name, "--granularity", gran, "--sparsity", "0.2", "--no-eval")
    assert code == 0, err
    achieved = json.loads((tmp_path / "out" / "report.json").read_text())["sparsity"]["achieved"]
    assert achieved == pytest.approx(0.2, abs=0.01 if gran == "unstructured" else 0.05)


@pytest.mark.parametrize("name, gran", [("seven", "unstructured"), ("movement", "heads,channels")])
def test_kill_then_resume_gives_the_same_masks(tmp_path, cli_inputs, capsys, monkeypatch, name, gran):
    common = ["--criterion", name, "--granularity", gran, "--sparsity", "0.3", "--checkpoint-every", "2", "--prune-every", "1", "--no-eval"]
    code, err = prune_cli(capsys, cli_inputs, tmp_path / "full", *common)
    assert code == 0, err
    restore = interrupt_training_at(monkeypatch, 4)
    code, err = prune_cli(capsys, cli_inputs, tmp_path / "resumed", *common)
    assert code == 130, err
    restore()
    code, err = prune_cli(capsys, cli_inputs, tmp_path / "resumed", *common, "--resume")
    assert code == 0, err
    assert_same_safetensors(tmp_path / "full" / "pruning_masks.safetensors", tmp_path / "resumed" / "pruning_masks.safetensors")
