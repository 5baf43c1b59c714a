"""AdaLoRA (arXiv 2303.10512) through PEFT, in slimtune's loop (METHODS.md §6): the model is unchanged
at init, the orthogonality penalty is PEFT's, the rank budget ends at r per projection on average with
the cut triplets at zero, LoRA-gradient criteria refuse it (λ starts at 0), the masked forward
trains λ, and a run resumes exactly and saves an adapter PEFT reloads."""

import copy
import json

import pytest
import torch

from slimtune.adapters import LoraSettings, attach_lora, lora_pairs
from slimtune.adapters.adalora import RankBudget
from slimtune.adapters.lora import adapter_params, adapter_product, is_adalora
from slimtune.errors import SlimtuneError
from slimtune.importance.loraprune import LoRAPruneImportance, enable_full_grad
from slimtune.models.arch import base_weight, get_arch
from slimtune.training.loss import causal_lm_loss
from tests.conftest import assert_same_safetensors, interrupt_training_at, run_prune_cli, tiny_model

BATCH = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))


def ada_model(steps=10, dtype=torch.float64, **kw):
    base = tiny_model("llama").to(dtype)
    torch.manual_seed(0)
    settings = LoraSettings(r=4, alpha=8.0, dropout=0.0, variant="adalora", **kw)
    return base, attach_lora(copy.deepcopy(base), settings, steps=steps)


def logits(model):
    with torch.no_grad():
        return model(input_ids=BATCH).logits


def test_output_unchanged_at_init_and_ranks_start_at_one_and_a_half_r():
    base, net = ada_model()
    torch.testing.assert_close(logits(net.eval()), logits(base), atol=1e-12, rtol=0)
    pairs = lora_pairs(net)
    assert pairs and all(is_adalora(m) for _, _, m in pairs)
    Q, lam, P = adapter_params(pairs[0][2])
    assert Q.shape[0] == lam.shape[0] == P.shape[1] == 6 and torch.count_nonzero(lam) == 0
    assert all(p.requires_grad for _, _, m in pairs for p in adapter_params(m))


def test_attach_needs_the_step_count_and_the_trainer_the_same_one():
    from slimtune.training.loop import Trainer, TrainSettings

    with pytest.raises(SlimtuneError, match="steps="):
        attach_lora(tiny_model("llama"), LoraSettings(variant="adalora"))
    _, net = ada_model(steps=10)
    with pytest.raises(SlimtuneError, match="attached for 10 steps but this run has 4"):
        Trainer(net, BATCH, TrainSettings(steps=4, batch_size=1))


def test_orthogonality_penalty_is_pefts_and_zero_for_orthonormal_factors():
    _, net = ada_model()
    budget = RankBudget.of(net)
    with torch.no_grad():
        for _, _, m in lora_pairs(net):
            for p in adapter_params(m):
                p.normal_(0, 0.3)
    # PEFT adds the same term to a loss the model returns itself (labels given); the wrapped model's own loss has none
    with_term = net(input_ids=BATCH, labels=BATCH).loss
    without = net.base_model.model(input_ids=BATCH, labels=BATCH).loss
    torch.testing.assert_close(budget.loss_term(), (with_term - without).to(torch.float64), rtol=1e-5, atol=1e-5)  # HF losses are fp32
    with torch.no_grad():  # orthonormal rows of Q and columns of P: no penalty
        for _, _, m in lora_pairs(net):
            Q, _, P = adapter_params(m)
            Q.copy_(torch.linalg.qr(torch.randn(Q.shape[1], Q.shape[0], dtype=Q.dtype))[0].T)
            P.copy_(torch.linalg.qr(torch.randn(P.shape, dtype=P.dtype))[0])
    assert float(budget.loss_term().detach()) == pytest.approx(0.0, abs=1e-12)


def test_lora_gradient_criteria_refuse_adalora():
    """λ starts at 0, so G_P and G_Q vanish and G_λ holds r numbers per projection: the LoRA-gradient
    estimate has nothing per row or column to rank units by (see importance/loraprune.py for the measurement)."""
    from slimtune import LoRAPruneConfig

    _, net = ada_model()
    with pytest.raises(SlimtuneError, match="no per-row or per-column"):
        LoRAPruneImportance(net)
    for name in ("loraprune", "loraprune_unc", "movement", "seven"):
        with pytest.raises(SlimtuneError, match=f"criterion '{name}'.*mask_fisher"):
            LoRAPruneConfig(criterion=name, lora=LoraSettings(variant="adalora"))
    for name in ("grad", "mask_fisher", "movement_grad", "l0"):
        LoRAPruneConfig(criterion=name, lora=LoraSettings(variant="adalora"))


def test_true_gradient_scores_see_the_adalora_update():
    """metric grad scores |G ⊙ (W0 + s·P·diag(λ)·Q)|, one projection at a time and stacked alike."""
    _, net = ada_model()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, _, m in lora_pairs(net):
            for p in adapter_params(m):
                p.normal_(0, 0.2, generator=gen)
    restore = enable_full_grad(net)
    causal_lm_loss(net, BATCH).backward()
    one, stacked = LoRAPruneImportance(net, metric="grad"), LoRAPruneImportance(net, metric="grad", stack_mib=64)
    for i, path, m in lora_pairs(net):
        a, b, s = adapter_product(m)
        w = base_weight(m) + s * (b @ a)
        torch.testing.assert_close(one._element((i, path)), (base_weight(m).grad * w).abs().detach(), rtol=1e-10, atol=1e-14)
    assert one.observe(net) and stacked.observe(net)
    for x, y in zip(one.unit_scores(), stacked.unit_scores()):
        torch.testing.assert_close(x["channels"], y["channels"], rtol=1e-10, atol=1e-14)
    restore()


def test_masked_forward_trains_lambda_and_merges_to_the_same_output():
    from slimtune.adapters import merge_keep_masks
    from slimtune.masking.weights import WeightMasks, attach_weight_masks

    _, net = ada_model()
    with torch.no_grad():
        for _, _, m in lora_pairs(net):
            for p in adapter_params(m):
                p.normal_(0, 0.2)
    masks = WeightMasks(net)
    gen = torch.Generator().manual_seed(5)
    for key in masks.keys():
        masks.set_mask(*key, torch.rand(masks.mask(*key).shape, generator=gen) > 0.4)
    keep = {k: v.clone() for k, v in masks.as_dict().items()}
    handles = attach_weight_masks(net, masks)
    loss = causal_lm_loss(net, BATCH)
    loss.backward()
    assert all(adapter_params(m)[1].grad is not None and adapter_params(m)[1].grad.abs().sum() > 0 for _, _, m in lora_pairs(net))
    masked = logits(net.eval())
    handles.remove()
    merged = merge_keep_masks(net, weight_masks=keep)
    torch.testing.assert_close(logits(merged), masked, rtol=1e-9, atol=1e-10)


def test_a_projection_cut_to_rank_0_saves_quietly_and_reloads_exactly(tmp_path, recwarn):
    """AdaLoRA may take every triplet of a projection; PEFT stores zero-sized factors for it."""
    from peft import PeftModel

    from slimtune.adapters import save_adapters

    base, net = ada_model()
    with torch.no_grad():
        for _, _, m in lora_pairs(net):
            for p in adapter_params(m):
                p.normal_(0, 0.2)
    budget = RankBudget.of(net)
    pattern = {n: [True] * p.shape[0] for n, p in budget.inner.model.named_parameters() if "lora_E" in n}
    first = sorted(pattern)[0]
    pattern[first] = [False] * len(pattern[first])
    budget.config.rank_pattern = pattern
    budget.finalize()
    want = logits(net.eval())
    save_adapters(net, tmp_path / "adapters")
    assert not [w for w in recwarn if "invalid shape" in str(w.message)]
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapters").eval()
    torch.testing.assert_close(logits(again), want, rtol=0, atol=1e-12)


def test_unstructured_qat_trains_lambda_and_keeps_every_pruned_weight_zero_and_a_code(monkeypatch):
    """The quantised forward fake-quantises W0 + s·P·diag(λ)·Q: λ keeps its gradient while QAT is on."""
    from slimtune import LoRAPruneConfig
    from slimtune.api import prune_
    from slimtune.models.arch import get_arch
    from slimtune.pruning.pruner import PruneSettings
    from slimtune.quant.qat import QuantSettings
    from slimtune.training.loop import TrainSettings
    from tests.test_qat import TOKENS, _qmodel

    grads = []
    after = RankBudget.after_step

    def recording(self, step):
        grads.append(sum(float(adapter_params(m)[1].grad.abs().sum()) for m in self.modules))
        return after(self, step)

    monkeypatch.setattr(RankBudget, "after_step", recording)
    config = LoRAPruneConfig(criterion="grad", prune=PruneSettings(granularity="unstructured", sparsity=0.3, warmup=0.0, cooldown=0.25),
                             lora=LoraSettings(r=4, alpha=8.0, dropout=0.0, variant="adalora"),
                             train=TrainSettings(steps=8, batch_size=2, lr=5e-3, warmup_steps=0, checkpoint_every=0),
                             quant=QuantSettings(spec="w4g32", quant_start=0.25))
    result = prune_(_qmodel(), config, TOKENS, progress=False)
    assert result.quant["start_step"] == 2 and len(grads) == 8 and all(g > 0 for g in grads[2:])
    layers = get_arch(result.model).decoder_layers(result.model)
    for (i, path), keep in result.masks.as_dict().items():
        w = layers[i].get_submodule(path).weight.detach()
        assert torch.equal(w[~keep], torch.zeros(int((~keep).sum())))
        assert torch.equal(result.quantizers[i, path](w), w)  # every weight is on its quantiser's grid


def test_structured_qat_shrinks_the_factors_and_resumes_exactly(tmp_path, monkeypatch):
    """Channels are sliced out of P and Q when QAT starts (the allocator's EMAs restart, as AdamW's do);
    λ trains on, and a run killed after the shrink resumes to the same result."""
    from slimtune import LoRAPruneConfig
    from slimtune.api import prune_
    from tests.test_qat import TOKENS, _config, _projections, _qmodel

    config = _config(LoRAPruneConfig, steps=6, granularity="channels", sparsity=0.2, warmup=0.34, cooldown=0.34, train={"checkpoint_every": 1})
    config = LoRAPruneConfig(criterion="grad", prune=config.prune, train=config.train, quant=config.quant,
                             lora=LoraSettings(r=4, alpha=8.0, dropout=0.0, variant="adalora"))
    shapes = []
    after = RankBudget.after_step

    def recording(self, step):
        shapes.append([tuple(adapter_params(m)[0].shape) for m in self.modules])
        assert all(adapter_params(m)[1].grad is not None for m in self.modules)
        return after(self, step)

    monkeypatch.setattr(RankBudget, "after_step", recording)
    full = prune_(_qmodel(), copy.deepcopy(config), TOKENS, work_dir=tmp_path / "a", progress=False)
    assert full.quant["shrunk_at_start"] and full.quant["start_step"] == 4
    assert shapes[0] != shapes[-1]  # Q lost the pruned input columns of down_proj
    widths = [layer.mlp.down_proj.in_features for layer in full.model.model.layers]
    assert min(widths) < 160 and all(w % 32 == 0 for w in widths)
    restore = interrupt_training_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        prune_(_qmodel(), copy.deepcopy(config), TOKENS, work_dir=tmp_path / "b", progress=False)
    restore()
    resumed = prune_(_qmodel(), copy.deepcopy(config), TOKENS, work_dir=tmp_path / "b", resume=True, progress=False)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-5)
    for (_, _, a), (_, _, b) in zip(_projections(full.model), _projections(resumed.model)):
        assert torch.allclose(a, b, atol=1e-6)


def test_settings_refuse_bad_values():
    for kw, match in [({"adalora_init_r": 3}, "--adalora-init-r"), ({"adalora_warmup": 0.6, "adalora_final": 0.5}, "leave no step"),
                      ({"adalora_final": 1.0}, "--adalora-final"), ({"adalora_every": 0}, "--adalora-every"), ({"adalora_orth": -1}, "--adalora-orth")]:
        with pytest.raises(SlimtuneError, match=match):
            LoraSettings(r=4, variant="adalora", **kw)


def test_trainer_session_is_refused():
    from slimtune import LoRAPruneConfig, PruneSession

    config = LoRAPruneConfig(criterion="grad", lora=LoraSettings(variant="adalora"))
    with pytest.raises(SlimtuneError, match="orthogonality"):
        PruneSession(tiny_model("llama"), config, total_steps=4)


# ---- the CLI end to end ---------------------------------------------------------------------------
def prune_cli(capsys, inputs, out, *args):
    return run_prune_cli(capsys, inputs, out, "--steps", "8", "--lora-variant", "adalora", "--lora-r", "4", *args)


def _lambdas(adapter_dir):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items() if "lora_E" in k}


def test_budget_ends_at_r_per_projection_and_the_adapter_reloads(tmp_path, cli_inputs, capsys):
    """--sparsity 0 keeps every unit, so the merged output is the base model plus the adapter PEFT reloads."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code, err = prune_cli(capsys, cli_inputs, tmp_path / "out", "--criterion", "mask_fisher", "--sparsity", "0", "--no-eval", "--ema", "0.5",
                          "--lora-dropout", "0")
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "adapters" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 6 and config["target_r"] == 4
    kept = [sum(v) for v in config["rank_pattern"].values()]
    assert sum(kept) == 4 * len(kept) and len(set(kept)) > 1  # the budget moved rank between projections
    lambdas = _lambdas(tmp_path / "out" / "adapters")
    assert sorted(v.shape[0] for v in lambdas.values()) == sorted(kept)  # saved at the kept ranks
    assert all(torch.count_nonzero(v) == v.shape[0] for v in lambdas.values())  # only kept triplets, none zero (after the EMA too)
    base = AutoModelForCausalLM.from_pretrained(cli_inputs[0])
    reloaded = PeftModel.from_pretrained(base, tmp_path / "out" / "adapters").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    batch = BATCH[:, :8]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=batch).logits, reloaded(input_ids=batch).logits, rtol=1e-4, atol=1e-4)


def test_kill_then_resume_gives_the_same_masks_and_adapter(tmp_path, cli_inputs, capsys, monkeypatch):
    common = ["--criterion", "mask_fisher", "--granularity", "heads,channels", "--sparsity", "0.3", "--checkpoint-every", "2",
              "--prune-every", "1", "--no-eval"]
    code, err = prune_cli(capsys, cli_inputs, tmp_path / "full", *common)
    assert code == 0, err
    restore = interrupt_training_at(monkeypatch, 6)
    code, err = prune_cli(capsys, cli_inputs, tmp_path / "resumed", *common)
    assert code == 130, err
    restore()
    code, err = prune_cli(capsys, cli_inputs, tmp_path / "resumed", *common, "--adalora-init-r", "8", "--resume")
    assert code == 2 and "--adalora-init-r" in err  # another budget would not continue the same run
    code, err = prune_cli(capsys, cli_inputs, tmp_path / "resumed", *common, "--resume")
    assert code == 0, err
    for name in ("pruning_masks.safetensors", "adapters/adapter_model.safetensors"):
        assert_same_safetensors(tmp_path / "full" / name, tmp_path / "resumed" / name)


@pytest.mark.parametrize("args, match", [(["--criterion", "grad", "--lora-pro"], "three"),
                                         (["--criterion", "loraprune"], "no per-row or per-column")])
def test_cli_refuses_what_adalora_cannot_do(tmp_path, cli_inputs, capsys, args, match):
    code, err = prune_cli(capsys, cli_inputs, tmp_path / "out", *args)
    assert code == 2 and match in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_pruning_counts_no_adapter_tensor_as_a_decoder_parameter():
    """The audit's report said 123,420 -> 98,460 where the saved model has 123,392 -> 98,432: AdaLoRA's
    `ranknum` (one Parameter per projection) was counted with the decoder."""
    from slimtune.models.arch import own_params

    plain = tiny_model("llama")
    wrapped = attach_lora(tiny_model("llama"), LoraSettings(r=4, variant="adalora"), steps=10)
    assert own_params(get_arch(wrapped).decoder_layers(wrapped)) == own_params(plain.model.layers)
