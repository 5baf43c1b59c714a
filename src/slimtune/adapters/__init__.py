"""LoRA-family adapters (through PEFT) and a merge that keeps pruned weights at zero."""

from .lora import LoraSettings, attach_lora, linear_leaf_names, lora_pairs, lora_weights, scaling
from .merge import merge_keep_masks, save_adapters

__all__ = [
    "LoraSettings",
    "attach_lora",
    "linear_leaf_names",
    "lora_pairs",
    "lora_weights",
    "merge_keep_masks",
    "save_adapters",
    "scaling",
]
