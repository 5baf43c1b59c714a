"""TensorBoard events of a training run, when the `tensorboard` package is installed.

Every numeric field of a step's history row (loss, distillation loss, sparsity, LR, seconds,
tokens/s, memory) becomes the scalar `train/<field>` at that optimiser step. The events live next
to the checkpoint (`<work>/tensorboard/`) and are copied into the output directory with it, so
`tensorboard --logdir pruned/tensorboard` shows the run. Without the package nothing is written and
nothing is imported; the JSONL log holds the same rows either way.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

EVENTS_DIR = "tensorboard"


class StepWriter:
    """A SummaryWriter that takes history rows; a no-op when TensorBoard is missing or not wanted.
    The writer (and its events file) is created at the first row, so a Trainer that never runs
    leaves nothing behind."""

    def __init__(self, work_dir: str | Path | None, enabled: bool = True):
        wanted = enabled and work_dir is not None and importlib.util.find_spec("tensorboard") is not None
        self._log_dir = str(Path(work_dir) / EVENTS_DIR) if wanted else None
        self._writer = None

    def write(self, row: dict) -> None:
        if self._log_dir is None:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self._log_dir)
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
