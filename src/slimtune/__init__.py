"""slimtune: prune and fine-tune LLMs at LoRA's memory cost, and ship models Hugging Face loads."""

__version__ = "0.1.0"


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
