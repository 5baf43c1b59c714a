"""Architecture specs: where the prunable units of each model family live.

This is the only place in slimtune that knows module names and head sizes. Everything else asks
an `ArchSpec` for the decoder layers, the q/k/v/o projections and the MLP projections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import SlimtuneError

SLIM_PREFIX = "slimtune_"  # model_type prefix of the per-layer (non-uniform) variants, see export/slim_modeling.py


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    layers: str  # path from the *ForCausalLM root to the ModuleList of decoder layers
    attention: str  # attention module, relative to a decoder layer
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]  # projections whose output rows are MLP channels (gate, up)
    mlp_out: str  # projection whose input columns are MLP channels (down)
    intermediate_field: str = "intermediate_size"
    kv_heads_field: str | None = "num_key_value_heads"
    # Can the stock config express a model whose layers all have fewer heads? OPT derives
    # head_dim = hidden_size / num_heads, so pruned heads need the per-layer config.
    stock_head_pruning: bool = True
    extra_norms: tuple[str, ...] = field(default=())  # per-head-dim norms that need no slicing (Qwen3)

    # ---- lookup -------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        root = unwrap(model)
        return root.get_submodule(self.layers)

    def head_dim(self, config) -> int:
        hd = getattr(config, "head_dim", None)
        return int(hd) if hd else config.hidden_size // config.num_attention_heads

    def num_heads(self, layer: nn.Module, head_dim: int) -> int:
        return layer.get_submodule(self.q).out_features // head_dim

    def num_kv_heads(self, layer: nn.Module, head_dim: int) -> int:
        return layer.get_submodule(self.k).out_features // head_dim

    def intermediate(self, layer: nn.Module) -> int:
        return layer.get_submodule(self.mlp_out).in_features

    def projections(self) -> tuple[str, ...]:
        """All prunable Linear paths of one decoder layer."""
        return (self.q, self.k, self.v, self.o, *self.mlp_in, self.mlp_out)

    def leaf_names(self) -> list[str]:
        """Leaf module names of the projections: PEFT `target_modules`."""
        return [p.rsplit(".", 1)[-1] for p in self.projections()]

    def attention_attrs(self, num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, int]:
        """Per-layer attributes the attention forward reads, for layers with their own head count."""
        if self.family == "opt":
            return {"num_heads": num_heads, "head_dim": head_dim}
        return {"num_key_value_groups": num_heads // num_kv_heads}

    def set_stock_sizes(self, config, num_heads: int, num_kv_heads: int, intermediate: int, head_dim: int) -> None:
        config.num_attention_heads = num_heads
        if self.kv_heads_field:
            setattr(config, self.kv_heads_field, num_kv_heads)
        setattr(config, self.intermediate_field, intermediate)
        if self.stock_head_pruning:
            config.head_dim = head_dim


def base_layer(module: nn.Module) -> nn.Module:
    """The Linear under a PEFT LoRA wrapper (the module itself when it is not wrapped)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def base_weight(module: nn.Module) -> nn.Parameter:
    """The frozen base weight of a projection, also when PEFT has wrapped it in a LoRA layer."""
    return base_layer(module).weight


ADAPTER_MARKERS = ("lora_", "ranknum")  # PEFT's adapter tensors (AdaLoRA's rank count is a Parameter too)


def own_params(module: nn.Module) -> int:
    """Parameters of `module` without any LoRA adapter tensors (what pruning counts)."""
    return sum(p.numel() for name, p in module.named_parameters() if not any(m in name for m in ADAPTER_MARKERS))


def unwrap(model: nn.Module) -> nn.Module:
    """Reach the HF model under PEFT wrappers (PeftModel -> LoraModel -> *ForCausalLM)."""
    while hasattr(model, "get_base_model") and model.get_base_model() is not model:
        model = model.get_base_model()
    return model


_LLAMA_LIKE = dict(
    layers="model.layers",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
)

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(family="llama", model_types=("llama", "mistral", "qwen2"), **_LLAMA_LIKE),
    ArchSpec(family="qwen3", model_types=("qwen3",), extra_norms=("self_attn.q_norm", "self_attn.k_norm"), **_LLAMA_LIKE),
    ArchSpec(
        family="opt",
        model_types=("opt",),
        layers="model.decoder.layers",
        attention="self_attn",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
        mlp_in=("fc1",),
        mlp_out="fc2",
        intermediate_field="ffn_dim",
        kv_heads_field=None,
        stock_head_pruning=False,
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for s in SPECS for t in s.model_types)


def base_model_type(model_type: str) -> str:
    return model_type[len(SLIM_PREFIX):] if model_type.startswith(SLIM_PREFIX) else model_type


def get_arch(model_or_config) -> ArchSpec:
    config = getattr(unwrap(model_or_config), "config", model_or_config)
    model_type = base_model_type(getattr(config, "model_type", "") or "")
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    raise SlimtuneError(
        f"unsupported architecture '{model_type}'; slimtune supports {', '.join(supported_model_types())}"
    )
