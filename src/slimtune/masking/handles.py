"""What `attach_*` returns: a switch that pauses the attached behaviour, and the undo.

Gates, weight masks and fake quantizers all let a block run the dense model (the distillation
teacher) with `paused()`, and the two that swap a projection's forward share `remove()`.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


class Pausable:
    """`enabled` is read by the attached hooks/forwards; `paused()` turns it off for a block (nests)."""

    def __init__(self):
        self.enabled = True

    @contextmanager
    def paused(self):
        was, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = was


class PatchedForwards(Pausable):
    """Projections whose `forward` was replaced on the instance; `remove()` gives each its own back."""

    what = "patched"  # names the wrapper in the error below

    def __init__(self, patched: list[tuple[nn.Module, bool, object, object]] | None = None):
        super().__init__()
        self._patched = [] if patched is None else patched  # (module, had an instance forward, that forward, ours)

    def remove(self) -> None:
        for module, had, original, ours in self._patched:
            if module.__dict__.get("forward") is not ours:
                raise RuntimeError(f"another wrapper replaced the forward of a {self.what} projection after slimtune's; remove it first")
            if had:
                module.forward = original
            else:
                del module.forward
        self._patched = []
