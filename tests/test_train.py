"""Progressive LoRAPrune training: monotone masks, resume == uninterrupted, NaN stops cleanly,
and the TrainerCallback drives the same components inside a transformers.Trainer."""

import copy

import pytest
import torch

from slimtune.adapters import LoraSettings, attach_lora, merge_keep_masks
from slimtune.errors import SlimtuneError
from slimtune.export import shrink_
from slimtune.importance.loraprune import LoRAPruneImportance
from slimtune.pruning.pruner import Pruner, PruneSettings
from slimtune.training.loop import Trainer, TrainSettings
from tests.conftest import tiny_model

TOKENS = torch.randint(0, 96, (16, 16), generator=torch.Generator().manual_seed(3))


def _setup(steps=8, tmp=None, sparsity=0.4):
    torch.manual_seed(0)
    model = attach_lora(tiny_model("llama", num_hidden_layers=4), LoraSettings(r=4, alpha=8))
    imp = LoRAPruneImportance(model)
    pruner = Pruner(model, PruneSettings(sparsity=sparsity, granularity="heads,channels", prune_every=2, exclude_layers=[0]), imp, total_steps=steps)
    trainer = Trainer(model, TOKENS, TrainSettings(steps=steps, batch_size=2, lr=1e-2, warmup_steps=0, checkpoint_every=2), imp, pruner, checkpoint_dir=tmp)
    return model, imp, pruner, trainer


def test_progressive_masks_grow_and_reach_target():
    model, imp, pruner, trainer = _setup()
    snapshots = []
    while trainer.step < trainer.s.steps:
        trainer.train_step()
        pruner.step(trainer.step)
        snapshots.append(copy.deepcopy(pruner.masks))
    for prev, cur in zip(snapshots, snapshots[1:]):
        assert cur.is_subset_of(prev)
    info = pruner.finalize()
    assert info["achieved"] == pytest.approx(0.4, abs=0.05)
    assert imp.steps == 8 and imp.skipped == 0


def test_resume_equals_uninterrupted(tmp_path):
    _, _, full_pruner, full = _setup(tmp=tmp_path / "a")
    full.run(progress=False)
    # interrupted after 4 steps (a checkpoint is written every 2), then resumed in a fresh set-up
    _, _, _, first = _setup(tmp=tmp_path / "b")
    first.s.steps = 4
    first.run(progress=False)
    _, _, resumed_pruner, resumed = _setup(tmp=tmp_path / "b")
    assert resumed.load_checkpoint() and resumed.step == 4
    resumed.run(progress=False)
    for a, b in zip(full_pruner.masks.buffers(), resumed_pruner.masks.buffers()):
        assert torch.equal(a, b)
    assert [h["loss"] for h in full.history] == pytest.approx([h["loss"] for h in resumed.history], rel=1e-5)


def test_a_gpu_checkpoint_resumes_on_a_cpu(tmp_path):
    """On CUDA the optimiser is AdamW's fused kernel; the option travels in the checkpoint and must
    not follow it onto a device without that kernel."""
    _, _, _, first = _setup(tmp=tmp_path)
    first.s.steps = 2
    first.run(progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = True  # as a run on a GPU saves it
    torch.save(state, tmp_path / "checkpoint.pt")
    _, _, _, resumed = _setup(tmp=tmp_path)
    assert resumed.load_checkpoint()
    assert all(not group["fused"] for group in resumed.opt.param_groups)
    resumed.train_step()


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    model, _, _, trainer = _setup(tmp=tmp_path)
    trainer.s.steps = 2
    trainer.run(progress=False)
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        model.get_base_model().model.embed_tokens.weight.fill_(float("nan"))
    trainer.s.steps = 4
    with pytest.raises(SlimtuneError, match=r"at step 3; the last good checkpoint"):
        trainer.run(progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_merge_then_shrink_matches_gated_model():
    model, _, pruner, trainer = _setup()
    trainer.run(progress=False)
    pruner.finalize()
    model.eval()  # no LoRA dropout
    x = TOKENS[:2]
    with torch.no_grad():
        gated = model(input_ids=x).logits
    pruner.remove_gates()
    merged = merge_keep_masks(model, pruner.masks)
    shrink_(merged, pruner.masks)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, gated, rtol=1e-4, atol=1e-4)


def test_trainer_callback_runs_inside_hf_trainer(tmp_path):
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments

    from slimtune.training.callback import PruneCallback

    model, imp, pruner, _ = _setup(steps=6)
    data = [{"input_ids": row, "labels": row} for row in TOKENS]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0)
    HFTrainer(model=model, args=args, train_dataset=data, callbacks=[PruneCallback(pruner, imp)]).train()
    assert imp.steps == 6
    assert float(pruner.current) == pytest.approx(0.4)
    assert pruner.masks.pruned_fraction()["channels"] > 0


def test_gradient_accumulation_matches_bigger_batch():
    """Two micro-batches of 1 with accumulation give the same LoRA update as one batch of 2."""
    results = []
    for bs, acc in ((2, 1), (1, 2)):
        model, imp, pruner, trainer = _setup(steps=1)
        trainer.s.batch_size, trainer.s.grad_accum = bs, acc
        model.eval()  # no dropout, so both paths see the same function
        model.train = lambda mode=True, m=model: m  # keep eval mode inside train_step
        trainer.train_step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("option", ["gradient_checkpointing", "bf16"])
def test_checkpointing_and_bf16_autocast_run(option):
    model, imp, pruner, trainer = _setup(steps=4)
    if option == "gradient_checkpointing":
        trainer = Trainer(model, TOKENS, TrainSettings(steps=4, batch_size=2, gradient_checkpointing=True, checkpoint_every=0), imp, pruner)
    else:
        trainer = Trainer(model, TOKENS, TrainSettings(steps=4, batch_size=2, mixed_precision="bf16", checkpoint_every=0), imp, pruner)
    history = trainer.run(progress=False)
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert imp.steps == 4 and float(pruner.current) > 0


def test_true_gradient_metric_observes_but_never_trains_base_weights():
    from slimtune.importance.loraprune import enable_full_grad

    torch.manual_seed(0)
    model = attach_lora(tiny_model("llama", num_hidden_layers=4), LoraSettings(r=4, alpha=8))
    imp = LoRAPruneImportance(model, metric="grad")
    pruner = Pruner(model, PruneSettings(sparsity=0.3, granularity="heads,channels", prune_every=2, exclude_layers=[0]), imp, total_steps=4)
    trainer = Trainer(model, TOKENS, TrainSettings(steps=4, batch_size=2, lr=1e-2, warmup_steps=0, checkpoint_every=0), imp, pruner)
    enable_full_grad(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainer.run(progress=False)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), f"{n} was trained"
            assert p.grad is None
    assert imp.steps == 4 and float(pruner.current) == pytest.approx(0.3)
    assert set(trainer.state_dict()["trainable"]) == set(trainer.params) and all("lora_" in n for n in trainer.params)


def test_lora_plus_puts_b_at_its_ratio_through_schedule_rebuild_and_resize():
    from slimtune.adapters import lora_pairs, lora_weights

    def one_step(ratio):
        torch.manual_seed(0)
        model = attach_lora(tiny_model("llama", num_hidden_layers=2), LoraSettings(r=4, alpha=8, dropout=0.0))
        with torch.no_grad():  # B = 0 at init would leave A without a gradient
            for _, _, m in lora_pairs(model):
                lora_weights(m)[1].normal_(0, 0.05)
        trainer = Trainer(model, TOKENS, TrainSettings(steps=6, batch_size=2, lr=1e-3, warmup_steps=0, lr_schedule="cosine",
                                                       checkpoint_every=0, lora_plus_ratio=ratio))
        before = [(lora_weights(m)[0].detach().clone(), lora_weights(m)[1].detach().clone()) for _, _, m in lora_pairs(model)]
        trainer.train_step()
        after = [(lora_weights(m)[0].detach(), lora_weights(m)[1].detach()) for _, _, m in lora_pairs(model)]
        return trainer, [(a1 - a0, b1 - b0) for (a0, b0), (a1, b1) in zip(before, after)]

    plain, moves = one_step(1.0)
    plus, plus_moves = one_step(16.0)
    assert len(plain.opt.param_groups) == 1 and len(plus.opt.param_groups) == 2
    for (da, db), (pa, pb) in zip(moves, plus_moves):  # Adam's first step is lr x sign-like: B moves 16x as far, A alike
        torch.testing.assert_close(pa, da, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(pb, 16 * db, rtol=1e-4, atol=1e-9)

    def ratio(trainer):
        slow, fast = trainer.opt.param_groups[:2]
        return fast["lr"] / slow["lr"]

    for _ in range(3):  # the cosine schedule scales both groups alike
        plus.train_step()
        assert ratio(plus) == pytest.approx(16.0)
    plus.rebuild_optimizer([{"params": [torch.nn.Parameter(torch.ones(3))], "lr": 0.1}])  # as QAT adds its step sizes
    assert ratio(plus) == pytest.approx(16.0) and plus.opt.param_groups[2]["lr"] != plus.opt.param_groups[0]["lr"]
    plus._resized(saved=2)  # a resume under another world size re-derives the LRs per group
    assert ratio(plus) == pytest.approx(16.0)
    with pytest.raises(SlimtuneError, match="--lora-plus-ratio must be a positive number"):
        TrainSettings(lora_plus_ratio=0)
