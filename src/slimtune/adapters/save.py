"""Save LoRA-family adapters (PEFT format) so that they apply to the original, unpruned base model.

LoRA, rsLoRA and DoRA leave the base weights alone, so `save_pretrained` is all they need. PiSSA
(arXiv 2404.02948) does not: it starts s·B₀A₀ at the top-r SVD part of W and replaces W, in place,
by the residual W_res = W − s·B₀A₀. A PiSSA adapter therefore only fits W_res. At save time PEFT
turns it into a plain LoRA on W:

    W_res + s·B·A = W + s·(B·A − B₀·A₀) = W + s·[B | −B₀]·[A ; A₀]

a rank-2r adapter with the same s (PEFT doubles r and α; with rsLoRA α is multiplied by √2). This
needs A₀ and B₀, so `save_initial_adapters` must run right after `attach_lora`, before any
training step (and before pruning touches any weight).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

from torch import nn

from ..errors import SlimtuneError
from .lora import MUTATING

INITIAL_NAME = "pissa_init"  # PEFT loads the initial adapter under its folder's name: no dots allowed
CONFIG = "adapter_config.json"


def _peft_configs(peft_model: nn.Module, caller: str) -> dict:
    if not hasattr(peft_model, "save_pretrained") or not hasattr(peft_model, "peft_config"):
        raise SlimtuneError(f"{caller} needs the PeftModel returned by attach_lora, before merging")
    return peft_model.peft_config


def mutates_base(peft_model: nn.Module) -> bool:
    """True when an adapter rewrote the base weights at init (PiSSA, LoRA-GA): saving it needs a conversion."""
    configs = _peft_configs(peft_model, "mutates_base")
    return any(str(getattr(c, "init_lora_weights", "")).lower().startswith(MUTATING) for c in configs.values())


def save_initial_adapters(peft_model: nn.Module, directory) -> Path | None:
    """Save the adapter as initialised (A₀, B₀) under `directory`/pissa_init for PiSSA and LoRA-GA and return that
    folder; None (nothing written) for variants that leave the base weights alone. Call it right
    after `attach_lora`, before the first training step."""
    configs = _peft_configs(peft_model, "save_initial_adapters")
    if not mutates_base(peft_model):
        return None
    target = Path(directory) / INITIAL_NAME
    inits = {name: c.init_lora_weights for name, c in configs.items()}
    try:  # the saved config must say "plain init", or loading it would redo the SVD on W_res
        for c in configs.values():
            c.init_lora_weights = True
        peft_model.save_pretrained(str(target))
    finally:
        for name, c in configs.items():
            c.init_lora_weights = inits[name]
    return target


def _initial_adapter(peft_model: nn.Module, initial_dir) -> Path:
    fix = "call save_initial_adapters(model, dir) right after attach_lora and pass its result as initial_dir"
    if initial_dir is None:
        raise SlimtuneError(f"a PiSSA or LoRA-GA adapter can only be saved for the original base model with its initial state; {fix}")
    folder = Path(initial_dir)
    if not (folder / CONFIG).is_file() and (folder / INITIAL_NAME / CONFIG).is_file():
        folder = folder / INITIAL_NAME  # the directory given to save_initial_adapters
    if not (folder / CONFIG).is_file():
        raise SlimtuneError(f"no initial adapter in {folder}; {fix}")
    saved = json.loads((folder / CONFIG).read_text())
    live = peft_model.peft_config["default"] if "default" in peft_model.peft_config else next(iter(peft_model.peft_config.values()))
    if saved.get("r") != live.r or saved.get("lora_alpha") != live.lora_alpha:
        raise SlimtuneError(f"the initial adapter in {folder} has r={saved.get('r')}, alpha={saved.get('lora_alpha')}, "
                            f"not r={live.r}, alpha={live.lora_alpha}; {fix}")
    return folder


def _record_base(path: Path, base_name: str) -> None:
    """Name the base model (e.g. a hub id) in adapter_config.json and the model card, instead of the
    local path it was loaded from: the folder stays usable on another machine."""
    for config in [path / CONFIG, *path.glob(f"*/{CONFIG}")]:  # sub-folders: non-default adapters
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = base_name
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    card_path = path / "README.md"
    if card_path.is_file():
        from huggingface_hub import ModelCard

        card = ModelCard.load(card_path)
        card.data.base_model = base_name
        tag = "base_model:adapter:"
        card.data.tags = [tag + base_name if t.startswith(tag) else t for t in (card.data.tags or [])]
        card.save(card_path)


def save_adapters(peft_model: nn.Module, path, initial_dir=None, base_name: str | None = None) -> None:
    """Save the adapter alone (PEFT `save_pretrained`) so that it applies to the original base model.

    PiSSA and LoRA-GA adapters are converted to plain LoRA with the initial adapter in `initial_dir` (what
    `save_initial_adapters` returned); other variants ignore it. `base_name` (e.g. a hub id) is
    recorded as the adapter's base model. Call it BEFORE `merge_keep_masks`: merging unloads the
    adapter, after which there is nothing left to save."""
    _peft_configs(peft_model, "save_adapters")
    path = Path(path)
    if mutates_base(peft_model):
        initial = _initial_adapter(peft_model, initial_dir)
        with tempfile.TemporaryDirectory() as tmp:
            # PEFT rewrites the initial adapter's config during the conversion: give it a copy
            work = Path(tmp) / INITIAL_NAME
            shutil.copytree(initial, work)
            with warnings.catch_warnings():  # PEFT warns about PiSSA while it loads the initial adapter
                warnings.filterwarnings("ignore", message=".*PiSSA changes the base weights.*")
                peft_model.save_pretrained(str(path), path_initial_model_for_weight_conversion=str(work))
    else:
        with warnings.catch_warnings():
            # AdaLoRA may cut a projection to rank 0; PEFT saves it as a zero-sized tensor (and reloads it
            # exactly) but warns that such a tensor looks like an ungathered DeepSpeed/FSDP shard
            if any(getattr(c, "peft_type", None) == "ADALORA" for c in peft_model.peft_config.values()):
                warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
            peft_model.save_pretrained(str(path))
    if base_name:
        _record_base(path, base_name)
