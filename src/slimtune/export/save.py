"""Save a shrunk model so that `AutoModelForCausalLM.from_pretrained(dir)` loads it.

Uniform layers get the stock config. Layers of differing shape get the per-layer config of
`slim_modeling.py`, plus a copy of that file and an `auto_map` as a fallback for users who do not
have slimtune installed (they need `trust_remote_code=True`; with slimtune imported they don't).
Without slimtune imported, `AutoTokenizer.from_pretrained(dir)` asks about that code too: in
transformers 5 it reads config.json (and its auto_map) before tokenizer_config.json, so no
tokenizer file can prevent it. `PreTrainedTokenizerFast.from_pretrained(dir)` loads without asking.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from ..io import MARKER, atomic_directory, check_output_dir
from ..models.arch import SLIM_PREFIX, base_model_type, get_arch, unwrap
from . import slim_modeling

MODELING_FILE = "modeling_slimtune.py"


def layer_shapes(model: nn.Module) -> list[dict]:
    """Heads, KV heads and MLP width of every decoder layer, read off the weights."""
    root = unwrap(model)
    spec = get_arch(root)
    hd = spec.head_dim(root.config)
    return [
        {"num_heads": spec.num_heads(layer, hd), "num_kv_heads": spec.num_kv_heads(layer, hd), "intermediate": spec.intermediate(layer)}
        for layer in spec.decoder_layers(root)
    ]


def is_uniform(model: nn.Module) -> bool:
    root = unwrap(model)
    spec = get_arch(root)
    shapes = layer_shapes(root)
    if any(s != shapes[0] for s in shapes):
        return False
    heads_changed = shapes[0]["num_heads"] != root.config.hidden_size // spec.head_dim(root.config)
    if heads_changed and not spec.stock_head_pruning:
        return False
    try:  # transformers validates e.g. hidden_size % num_attention_heads == 0 on save and load,
        # not when stock_config sets the sizes, so validate here
        stock_config(root).validate()
    except (ValueError, TypeError, StrictDataclassError):
        return False
    return True


def stock_config(model: nn.Module):
    """The model's config with sizes updated to the (uniform) shrunk layers."""
    root = unwrap(model)
    spec = get_arch(root)
    config = root.config.__class__.from_dict(root.config.to_dict())
    shape = layer_shapes(root)[0]
    spec.set_stock_sizes(config, shape["num_heads"], shape["num_kv_heads"], shape["intermediate"], spec.head_dim(root.config))
    return config


def slim_config(model: nn.Module):
    """A per-layer config (model_type slimtune_<base>) that records every projection's shape."""
    root = unwrap(model)
    spec = get_arch(root)
    base = base_model_type(root.config.model_type)
    config_cls, model_cls = slim_modeling.SLIM_CLASSES[base]
    data = root.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "slim_linear_shapes", "slim_module_attrs", "transformers_version"):
        data.pop(key, None)
    hd = spec.head_dim(root.config)
    shapes, attrs = {}, {}
    for i, layer in enumerate(spec.decoder_layers(root)):
        prefix = f"{spec.layers}.{i}"
        for path in spec.projections():
            lin = layer.get_submodule(path)
            shapes[f"{prefix}.{path}"] = [lin.out_features, lin.in_features, lin.bias is not None]
        n_heads, n_kv = spec.num_heads(layer, hd), spec.num_kv_heads(layer, hd)
        attrs[f"{prefix}.{spec.attention}"] = spec.attention_attrs(n_heads, n_kv, hd)
    config = config_cls(**data, slim_linear_shapes=shapes, slim_module_attrs=attrs)
    config.head_dim = hd  # the stock formula hidden/heads no longer holds
    config.auto_map = {
        "AutoConfig": f"{MODELING_FILE[:-3]}.{config_cls.__name__}",
        "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{model_cls.__name__}",
    }
    config.architectures = [model_cls.__name__]
    return config, model_cls


def export_model(model: nn.Module) -> nn.Module:
    """Return a model whose class and config describe its (possibly non-uniform) shapes."""
    root = unwrap(model)
    if is_uniform(root):
        root.config = stock_config(root)
        return root
    config, model_cls = slim_config(root)
    with torch.device("meta"):
        slim = model_cls(config)
    slim.load_state_dict(root.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        slim.tie_weights()
    return slim.to(next(root.parameters()).dtype)


def save_model(model: nn.Module, out_dir: str | Path, tokenizer=None, overwrite: bool = False, extra=None) -> Path:
    """Save atomically: write into a temporary sibling directory, then rename it into place.

    `extra` is an optional callable(tmp_dir) that writes more files (reports, adapters) into the
    same atomic directory. With `overwrite`, only a directory slimtune wrote is replaced (see
    `io.check_output_dir`); every saved directory gets the `.slimtune` marker that says so.
    """
    check_output_dir(out_dir, overwrite)
    out = export_model(model)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _write_marker(tmp)
        out.save_pretrained(tmp)
        if out.config.model_type.startswith(SLIM_PREFIX):
            shutil.copyfile(slim_modeling.__file__, tmp / MODELING_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return Path(out_dir)


def _write_marker(directory: Path) -> None:
    from .. import __version__

    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    info = {"written_by": "slimtune", "version": __version__, "date": date}
    (directory / MARKER).write_text(json.dumps(info) + "\n")
