"""How much work LoRAPrune's importance pass adds to a step, one projection at a time against
stacked across layers (`LoRAPruneImportance(stack_mib=...)`), on this machine.

    python benchmarks/importance_ops.py [--repeats 5] [--seq-len 64]

On the bundled model after one forward and backward of one sequence: the tensor operations
dispatched (each a kernel launch on a GPU, where a small model's step waits for launches) by the
forward + backward with the gates of a channel pruner on and paused, and by one `observe`; and the
median wall time of `observe` over --repeats calls for each --stack-mib value.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, write  # noqa: E402


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stack-mib", type=float, nargs="+", default=[0.0, 64.0])
    args = ap.parse_args()
    from slimtune.adapters import LoraSettings, attach_lora
    from slimtune.importance.loraprune import LoRAPruneImportance
    from slimtune.models import load_model
    from slimtune.pruning.pruner import Pruner, PruneSettings
    from slimtune.training.loss import causal_lm_loss

    torch.manual_seed(0)
    model, _ = load_model("default")
    net = attach_lora(model, LoraSettings())
    pruner = Pruner(net, PruneSettings(sparsity=0.2), LoRAPruneImportance(net), total_steps=100)
    batch = torch.randint(0, 1000, (1, args.seq_len), generator=torch.Generator().manual_seed(1))

    def step(gated: bool) -> int:
        net.zero_grad(set_to_none=True)
        with _Count() as count:
            if gated:
                causal_lm_loss(net, batch).backward()
            else:
                with pruner.gates.paused():
                    causal_lm_loss(net, batch).backward()
        return count.ops

    ops = {"forward_backward_gated": step(True), "forward_backward_gates_paused": step(False)}
    rows = []
    for mib in args.stack_mib:
        imp = LoRAPruneImportance(net, stack_mib=mib)
        with _Count() as count:
            imp.observe(net)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            imp.observe(net)
            times.append(time.perf_counter() - t0)
        rows.append({"stack_mib": mib, "observe_ops": count.ops, "observe_seconds": times, "median_observe_seconds": median(times)})
        print(rows[-1]["stack_mib"], rows[-1]["observe_ops"], f"{rows[-1]['median_observe_seconds']:.3f} s", flush=True)
    write("importance_ops", {"seq_len": args.seq_len, "repeats": args.repeats, "granularity": "channels (the gates of the default)",
                             **ops, "observe": rows})


if __name__ == "__main__":
    main()
