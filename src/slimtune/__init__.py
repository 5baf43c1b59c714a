"""slimtune: prune and fine-tune LLMs at LoRA's memory cost, and ship models Hugging Face loads.

    import slimtune
    result = slimtune.prune_(model, slimtune.LoRAPruneConfig(), data=tokens)

The API names below load lazily, so `import slimtune` stays cheap (it only registers the
per-layer model types that non-uniform pruned models use).
"""

__version__ = "0.1.0"

_LAZY = {
    "prune_": "api", "check_config": "api", "PruneSession": "api", "PruneResult": "api",
    "LoRAPruneConfig": "config", "OneShotConfig": "config", "LayerwiseConfig": "config", "MethodConfig": "config",
    "QuantSettings": "quant.qat", "DistillSettings": "training.distill", "AveragingSettings": "training.averaging",
    "PruneSettings": "pruning.pruner", "TrainSettings": "training.loop", "LoraSettings": "adapters.lora",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'slimtune' has no attribute {name!r}")


def _register_slim_models() -> None:
    """Let AutoConfig/AutoModelForCausalLM load non-uniform pruned models without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .export import slim_modeling

    for config_cls, model_cls in slim_modeling.SLIM_CLASSES.values():
        try:
            AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
            AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        except TypeError:  # older transformers without exist_ok
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModelForCausalLM.register(config_cls, model_cls)


_register_slim_models()
