"""--compile: compiled decoder layers train exactly as eager ones, and are eager again afterwards.

The tests compile with the aot_eager backend: it traces with dynamo and AOTAutograd as inductor
does, without generating kernels (a C++ compiler and minutes on this CPU). The GPU benchmark
(benchmarks/loraprune_overhead.py --compile) runs inductor.
"""

from __future__ import annotations

import functools

import torch

from slimtune.adapters import LoraSettings, attach_lora
from slimtune.importance.loraprune import LoRAPruneImportance
from slimtune.models.arch import get_arch, unwrap
from slimtune.pruning.pruner import Pruner, PruneSettings
from slimtune.training import loop
from slimtune.training.compile import compile_layers
from slimtune.training.loop import Trainer, TrainSettings
from slimtune.training.loss import causal_lm_loss
from tests.conftest import tiny_model

TOKENS = torch.randint(0, 96, (16, 16), generator=torch.Generator().manual_seed(5))


def _run(compiled: bool, monkeypatch, steps: int = 6):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = attach_lora(tiny_model("llama", num_hidden_layers=4), LoraSettings(r=4, alpha=8))
    imp = LoRAPruneImportance(model)
    pruner = Pruner(model, PruneSettings(sparsity=0.3, granularity="heads,channels,layers", prune_every=2), imp, total_steps=steps)
    if compiled:
        monkeypatch.setattr(loop, "compile_layers", functools.partial(compile_layers, backend="aot_eager"))
    trainer = Trainer(model, TOKENS, TrainSettings(steps=steps, batch_size=2, lr=1e-2, warmup_steps=0, checkpoint_every=0, compile=compiled), imp, pruner)
    history = trainer.run(progress=False)
    return model, pruner, [row["loss"] for row in history]


def test_compiled_layers_train_as_eager_ones_and_are_eager_afterwards(monkeypatch):
    _, eager_pruner, eager_losses = _run(False, monkeypatch)
    model, pruner, losses = _run(True, monkeypatch)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for name, mask in pruner.masks.state_dict().items():
        assert torch.equal(mask, eager_pruner.masks.state_dict()[name]), name
    assert float(pruner.current) > 0.2  # masks changed while compiled: the gates saw every change
    base = unwrap(model)
    assert all(layer._compiled_call_impl is None for layer in get_arch(base).decoder_layers(base))


def test_one_compiled_graph_serves_every_layer():
    """Layer-wise compilation pays off only if layers share their graphs: recompiles must not grow with depth."""
    counts = []
    for depth in (4, 8):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = attach_lora(tiny_model("llama", num_hidden_layers=depth), LoraSettings(r=4, alpha=8))
        Pruner(model, PruneSettings(sparsity=0.2, granularity="heads,channels", exclude_layers=[]), LoRAPruneImportance(model), total_steps=1)
        compile_layers(model, backend="aot_eager")
        from torch._dynamo.utils import counters

        counters.clear()
        causal_lm_loss(model, TOKENS[:2]).backward()  # as training runs it: no KV cache
        counts.append(counters["stats"]["unique_graphs"])
    assert counts[0] == counts[1] > 0, f"compiled graphs for 4 and 8 layers: {counts}"
