"""Structured masks: which query heads, MLP channels and decoder layers survive.

Masks live per decoder layer and are stored at query-head resolution; a KV head survives while
any query head of its group does. They are plain tensors, so they checkpoint with `state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.arch import ArchSpec, get_arch


@dataclass
class LayerGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    hidden: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


class StructuredMasks(nn.Module):
    """One {0,1} vector per layer for heads [H], channels [I] and the layer itself [1]."""

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        super().__init__()
        self.spec = spec or get_arch(model)
        config = _config(model)
        hd = self.spec.head_dim(config)
        self.geometry: list[LayerGeometry] = []
        for i, layer in enumerate(self.spec.decoder_layers(model)):
            g = LayerGeometry(
                num_heads=self.spec.num_heads(layer, hd),
                num_kv_heads=self.spec.num_kv_heads(layer, hd),
                head_dim=hd,
                intermediate=self.spec.intermediate(layer),
                hidden=config.hidden_size,
            )
            self.geometry.append(g)
            self.register_buffer(f"heads_{i}", torch.ones(g.num_heads))
            self.register_buffer(f"channels_{i}", torch.ones(g.intermediate))
            self.register_buffer(f"layer_{i}", torch.ones(1))

    def __len__(self) -> int:
        return len(self.geometry)

    def heads(self, i: int) -> torch.Tensor:
        return getattr(self, f"heads_{i}")

    def channels(self, i: int) -> torch.Tensor:
        return getattr(self, f"channels_{i}")

    def layer(self, i: int) -> torch.Tensor:
        return getattr(self, f"layer_{i}")

    def kv_heads(self, i: int) -> torch.Tensor:
        g = self.geometry[i]
        return self.heads(i).view(g.num_kv_heads, g.group_size).amax(dim=1)

    def set(self, i: int, heads=None, channels=None, layer=None) -> None:
        for name, value in (("heads", heads), ("channels", channels), ("layer", layer)):
            if value is not None:
                buf = getattr(self, f"{name}_{i}")
                buf.copy_(torch.as_tensor(value, dtype=buf.dtype).reshape(buf.shape))

    def pruned_fraction(self) -> dict[str, float]:
        heads = sum(int((self.heads(i) == 0).sum()) for i in range(len(self)))
        chans = sum(int((self.channels(i) == 0).sum()) for i in range(len(self)))
        layers = sum(int(self.layer(i).item() == 0) for i in range(len(self)))
        return {
            "heads": heads / sum(g.num_heads for g in self.geometry),
            "channels": chans / sum(g.intermediate for g in self.geometry),
            "layers": layers / len(self),
        }

    def per_layer(self) -> list[dict]:
        """Kept units per layer, for reports and plots."""
        rows = []
        for i, g in enumerate(self.geometry):
            removed = self.layer(i).item() == 0
            rows.append(
                {
                    "layer": i,
                    "removed": removed,
                    "heads_kept": 0 if removed else int(self.heads(i).sum()),
                    "heads_total": g.num_heads,
                    "kv_heads_kept": 0 if removed else int(self.kv_heads(i).sum()),
                    "channels_kept": 0 if removed else int(self.channels(i).sum()),
                    "channels_total": g.intermediate,
                }
            )
        return rows

    def is_subset_of(self, other: StructuredMasks) -> bool:
        """True when every unit pruned in `other` is pruned here too (masks only grow)."""
        for a, b in zip(self.buffers(), other.buffers()):
            if bool(((b == 0) & (a != 0)).any()):
                return False
        return True


def _config(model: nn.Module):
    from ..models.arch import unwrap

    return unwrap(model).config
