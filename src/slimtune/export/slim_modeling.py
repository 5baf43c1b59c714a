"""Causal LMs whose decoder layers each have their own number of heads and MLP width.

Written by slimtune. This file is standalone (it needs only torch and transformers): slimtune
copies it next to every non-uniform pruned model, so that users without slimtune can still load
the model with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. With slimtune
installed, `import slimtune` registers these classes and no remote code is needed.

The config stores, for every resized Linear, its [out_features, in_features, has_bias] under
`slim_linear_shapes`, and per-module attributes (e.g. `num_key_value_groups`) under
`slim_module_attrs`. The model is built as the stock architecture, then those Linears are
replaced by ones of the stored shape before the weights are loaded.
"""

from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


def apply_slim_shapes(model: nn.Module, config) -> None:
    for name, (out_features, in_features, bias) in (getattr(config, "slim_linear_shapes", None) or {}).items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        old = getattr(owner, leaf)
        new = nn.Linear(in_features, out_features, bias=bool(bias), device=old.weight.device, dtype=old.weight.dtype)
        setattr(owner, leaf, new)
    for name, attrs in (getattr(config, "slim_module_attrs", None) or {}).items():
        module = model.get_submodule(name)
        for key, value in attrs.items():
            setattr(module, key, value)


class _SlimMixin:
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_slim_shapes(self, config)


class SlimLlamaConfig(LlamaConfig):
    model_type = "slimtune_llama"


class SlimLlamaForCausalLM(_SlimMixin, LlamaForCausalLM):
    config_class = SlimLlamaConfig


class SlimMistralConfig(MistralConfig):
    model_type = "slimtune_mistral"


class SlimMistralForCausalLM(_SlimMixin, MistralForCausalLM):
    config_class = SlimMistralConfig


class SlimQwen2Config(Qwen2Config):
    model_type = "slimtune_qwen2"


class SlimQwen2ForCausalLM(_SlimMixin, Qwen2ForCausalLM):
    config_class = SlimQwen2Config


class SlimQwen3Config(Qwen3Config):
    model_type = "slimtune_qwen3"


class SlimQwen3ForCausalLM(_SlimMixin, Qwen3ForCausalLM):
    config_class = SlimQwen3Config


class SlimOPTConfig(OPTConfig):
    model_type = "slimtune_opt"


class SlimOPTForCausalLM(_SlimMixin, OPTForCausalLM):
    config_class = SlimOPTConfig


SLIM_CLASSES = {
    "llama": (SlimLlamaConfig, SlimLlamaForCausalLM),
    "mistral": (SlimMistralConfig, SlimMistralForCausalLM),
    "qwen2": (SlimQwen2Config, SlimQwen2ForCausalLM),
    "qwen3": (SlimQwen3Config, SlimQwen3ForCausalLM),
    "opt": (SlimOPTConfig, SlimOPTForCausalLM),
}
