"""LoRA-family adapters (through PEFT), their saving for the original base model, and a merge that
keeps pruned weights at zero."""

from .lora import LoraSettings, attach_lora, linear_leaf_names, lora_pairs, lora_weights, scaling
from .merge import merge_keep_masks
from .save import mutates_base, save_adapters, save_initial_adapters

__all__ = [
    "LoraSettings",
    "attach_lora",
    "linear_leaf_names",
    "lora_pairs",
    "lora_weights",
    "merge_keep_masks",
    "mutates_base",
    "save_adapters",
    "save_initial_adapters",
    "scaling",
]
