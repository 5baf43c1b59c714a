"""The training step on a GPU: few host syncs, and the same step as on the CPU (issue 9).

Skipped without CUDA (CI has none); benchmarks/gpu_session.sh runs them on a lent GPU machine.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from slimtune.adapters import LoraSettings, attach_lora
from slimtune.importance.loraprune import LoRAPruneImportance
from slimtune.pruning.pruner import Pruner, PruneSettings
from slimtune.training.loop import Trainer, TrainSettings
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOKENS = torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(7))


def _trainer(device: str, mixed_precision: str = "no"):
    torch.manual_seed(0)
    model = attach_lora(tiny_model("llama").to(device), LoraSettings(r=4, alpha=8))
    imp = LoRAPruneImportance(model)
    pruner = Pruner(model, PruneSettings(sparsity=0.2, granularity="heads,channels", prune_every=3, warmup=0.0, cooldown=0.0), imp, total_steps=12)
    trainer = Trainer(model, TOKENS, TrainSettings(steps=12, batch_size=2, grad_accum=2, warmup_steps=0, checkpoint_every=0,
                                                   mixed_precision=mixed_precision), imp, pruner)
    return trainer, pruner


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_a_loraprune_step_syncs_with_the_host_a_few_times_not_per_layer(mixed_precision):
    trainer, pruner = _trainer("cuda", mixed_precision)
    for _ in range(4):  # warm-up, with a mask update at step 3: the gates are closed somewhere
        trainer.train_step()
        pruner.step(trainer.step)
    assert float(pruner.current) > 0
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step()  # two micro-batches, no mask update
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]
    # per step: reading the loss and the importance's finite check; per micro-batch: copying the batch
    # to the GPU and transformers' packed-sequence check. Not per layer (the gates: 90 per forward before).
    micro = trainer.s.grad_accum
    assert len(syncs) <= 2 + 2 * micro, f"{len(syncs)} host syncs in one step of {micro} micro-batches: {syncs}"


def test_the_cuda_step_computes_the_cpu_step():
    losses = {}
    for device in ("cpu", "cuda"):
        trainer, pruner = _trainer(device)
        out = []
        for _ in range(6):
            out.append(trainer.train_step()["loss"])
            pruner.step(trainer.step)
        losses[device] = out
    torch.testing.assert_close(losses["cuda"], losses["cpu"], rtol=1e-3, atol=1e-4)


def test_the_reported_training_peak_covers_every_step():
    """Per-step memory rows must not reset the allocator's peak that the run's report reads."""
    from slimtune.evaluate.memory import track_peak_memory

    trainer, _ = _trainer("cuda")
    trainer.s.steps = 3
    with track_peak_memory("cuda") as memory:
        history = trainer.run(progress=False)
    assert memory["peak_allocated_mb"] >= max(row["memory_mib"] for row in history) > memory["baseline_allocated_mb"]


def test_stacked_importance_on_cuda_equals_one_projection_at_a_time():
    trainer, _ = _trainer("cuda")
    trainer.train_step()  # leaves no gradients: take them again
    model = trainer.model
    tokens = TOKENS[:2].cuda()
    model.zero_grad(set_to_none=True)
    model(input_ids=tokens, labels=tokens).loss.backward()
    per_key, stacked = LoRAPruneImportance(model), LoRAPruneImportance(model, stack_mib=64)
    assert per_key.observe(model) and stacked.observe(model)
    for a, b in zip(stacked.unit_scores(), per_key.unit_scores()):
        torch.testing.assert_close(a["heads"], b["heads"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a["channels"], b["channels"], rtol=1e-5, atol=1e-7)
