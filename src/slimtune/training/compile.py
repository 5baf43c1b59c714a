"""`--compile`: torch.compile each decoder layer for the training loop.

Compiling layer by layer, not the whole model, keeps one compiled graph for all layers of the same
shape: the layers share their code, their weights are graph inputs, and so the compile cost is paid
about once, not once per layer. The gate hooks (masking/gates.py) run eagerly between the compiled
pieces (`torch.compiler.disable`), since each closes over its layer index. Nothing in the saved
weights changes: `Module.compile` leaves the module tree and its state_dict as they were, and
`undo()` drops the compiled callables before the model is shrunk, evaluated or saved.

It pays where kernel launches dominate, i.e. on a GPU with a small model; on a CPU the first steps
only pay the compilation. benchmarks/loraprune_overhead.py --compile measures it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..models.arch import get_arch, unwrap


def compile_layers(model: nn.Module, backend: str = "inductor") -> Callable[[], None]:
    """Compile every decoder layer in place; returns the function that makes them eager again."""
    base = unwrap(model)
    layers = list(get_arch(base).decoder_layers(base))
    for layer in layers:
        layer.compile(backend=backend)

    def undo() -> None:
        for layer in layers:
            layer._compiled_call_impl = None  # what Module.compile set; None is nn.Module's own "not compiled"

    return undo
