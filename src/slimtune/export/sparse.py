"""Save an unstructured or N:M pruned model so that its pruned weights take no space on disk.

`save_model` writes pruned projections dense: a 50% sparse model is as large as the dense one.
`save_sparse` writes the decoder projections that hold zeros in one of the two sparse layouts of
the compressed-tensors format (config.json: `quantization_config.sparsity_config`):

- "sparse-bitmask" (`format="bitmask"`, any pattern): per projection `<name>.compressed` (the
  non-zero values, 1-D, row-major), `<name>.bitmask` (uint8 [out, ceil(in/8)], one bit per weight,
  little-endian bit order within each byte), `<name>.row_offsets` (int64 [out], index in
  `compressed` where each row starts) and `<name>.shape` (int64 [2]).
- "sparse-24-bitmask" (`format="sparse-24"`, at most 2 non-zeros in every group of 4 consecutive
  inputs): `<name>.compressed` holds exactly 2 values per group ([out, in/2]; a group with fewer
  non-zeros stores zeros), `<name>.bitmask` as above, `<name>.shape` (int64 [2, 1]).

`format="auto"` picks sparse-24 when every pruned projection fits it, else bitmask. Projections
without zeros, and with the bitmask layout those it would not make smaller, stay dense (`.weight`);
`sparsity_config.targets` names the stored-sparse modules.

Who reads it (checked in 2026 against the released packages):
- `load_sparse(dir)` here, which rebuilds the dense model bit-exactly.
- compressed-tensors <= 0.14 (its BitmaskCompressor / Sparse24BitMaskCompressor decode these files;
  tests/test_sparse_export.py checks that when such a version is importable). Those versions
  require transformers < 5, so they cannot be installed next to slimtune.
- NOT compressed-tensors >= 0.15 (sparse compression removed), NOT transformers 5 (its
  compressed-tensors integration ignores `sparsity_config`: a plain
  `AutoModelForCausalLM.from_pretrained(dir)` leaves the sparse projections randomly initialised
  and only prints a MISSING/UNEXPECTED table), and NOT current vLLM (2:4 support was removed in
  2026; newer releases refuse any `sparsity_config`). Load these directories with `load_sparse`.

A weight counts as zero when all its bits are zero, so a -0.0 is stored as a value and the round
trip is bit-exact.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import SlimtuneError
from ..io import MARKER, atomic_directory, check_output_dir
from ..masking.weights import WeightMasks
from ..models.arch import SLIM_PREFIX, get_arch, unwrap
from . import slim_modeling
from .save import MODELING_FILE, _write_marker, export_model

FORMATS = ("auto", "bitmask", "sparse-24")
BITMASK, SPARSE24 = "sparse-bitmask", "sparse-24-bitmask"  # compressed-tensors' names
_CT_FORMAT = {"bitmask": BITMASK, "sparse-24": SPARSE24}
_PARTS = ("compressed", "bitmask", "shape", "row_offsets")


# ---- per-tensor encoding ----------------------------------------------------------------------
def _nonzero(w: torch.Tensor) -> torch.Tensor:
    """True where a weight's bits are not all zero (so -0.0 is kept as a value)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]
    return w.contiguous().view(ints) != 0


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)], bit j of byte k = column 8k+j."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def _unpack(bits: torch.Tensor, shape: list[int]) -> torch.Tensor:
    rows, cols = shape
    out = np.unpackbits(bits.cpu().numpy(), axis=-1, count=cols, bitorder="little")
    return torch.from_numpy(out.reshape(rows, cols).astype(bool))


def fits_24(w: torch.Tensor, nz: torch.Tensor | None = None) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive inputs of every row."""
    rows, cols = w.shape
    nz = _nonzero(w) if nz is None else nz
    return cols % 4 == 0 and bool((nz.view(rows, cols // 4, 4).sum(-1) <= 2).all())


def _first_24_violation(w: torch.Tensor) -> str:
    rows, cols = w.shape
    if cols % 4:
        return f"its {cols} inputs are not a multiple of 4"
    counts = _nonzero(w).view(rows, cols // 4, 4).sum(-1)
    r, g = (counts > 2).nonzero()[0].tolist()
    return f"row {r}, inputs {4 * g}..{4 * g + 3} keep {int(counts[r, g])} of 4"


def encode_bitmask(w: torch.Tensor, nz: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    w = w.detach().cpu()
    keep = _nonzero(w) if nz is None else nz.cpu()
    counts = keep.sum(-1)
    return {
        "compressed": w.masked_select(keep),
        "bitmask": _pack(keep),
        "row_offsets": (torch.cumsum(counts, 0) - counts).cpu(),
        "shape": torch.tensor(list(w.shape)),
    }


def encode_24(w: torch.Tensor, nz: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Exactly 2 stored values per group of 4: the non-zeros, topped up with the group's first zeros."""
    w = w.detach().cpu()
    rows, cols = w.shape
    nz = (_nonzero(w) if nz is None else nz.cpu()).view(rows, cols // 4, 4)
    need = 2 - nz.sum(-1, keepdim=True)  # >= 0 when the tensor fits 2:4
    if bool((need < 0).any()):
        raise ValueError("not 2:4")
    zero = ~nz
    stored = nz | (zero & (torch.cumsum(zero.to(torch.int8), -1) <= need))
    stored = stored.view(rows, cols)
    return {
        "compressed": w.masked_select(stored).reshape(rows, cols // 2),
        "bitmask": _pack(stored),
        "shape": torch.tensor([rows, cols]).reshape(-1, 1),
    }


def decode(parts: dict[str, torch.Tensor], name: str = "weight") -> torch.Tensor:
    """Either layout back to the dense tensor."""
    shape = [int(x) for x in parts["shape"].flatten().tolist()]
    if len(shape) != 2:
        raise SlimtuneError(f"{name}.shape is {shape}, not [rows, cols]; the sparse checkpoint is damaged, save it again")
    keep = _unpack(parts["bitmask"], shape)
    values = parts["compressed"].flatten()
    if int(keep.sum()) != values.numel():
        raise SlimtuneError(f"{name}: the bitmask marks {int(keep.sum())} weights but {values.numel()} values are stored; the sparse checkpoint is damaged, save it again")
    return torch.zeros(shape, dtype=values.dtype).masked_scatter_(keep, values)


def _sparse_bytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


# ---- choosing what to store sparse ------------------------------------------------------------
def _candidates(root: nn.Module, masks) -> list[tuple[str, nn.Module]]:
    """(full module name, Linear) of every decoder projection to consider; with `masks`, only the
    masked ones, after checking that their pruned weights are zero."""
    spec = get_arch(root)
    layers = spec.decoder_layers(root)
    if masks is None:
        keys = [(i, p) for i in range(len(layers)) for p in spec.projections()]
        mask_of = {}
    else:
        mask_of = masks.as_dict() if isinstance(masks, WeightMasks) else dict(masks)
        keys = list(mask_of)
    out = []
    for i, path in keys:
        if not 0 <= i < len(layers):
            raise SlimtuneError(f"masks name layer {i}, but the model has layers 0..{len(layers) - 1}; pass the masks of this model")
        module = layers[i].get_submodule(path)
        if hasattr(module, "get_base_layer") or type(module) is not nn.Linear:
            raise SlimtuneError(f"layer {i} {path} is a {type(module).__name__}, not a plain Linear; merge the adapters first (adapters.merge_keep_masks), then save")
        keep = mask_of.get((i, path))
        if keep is not None:
            keep = keep.to(device=module.weight.device, dtype=torch.bool)
            if keep.shape != module.weight.shape:
                raise SlimtuneError(f"the mask of layer {i} {path} is {tuple(keep.shape)} but the weight is {tuple(module.weight.shape)}; pass the masks of this model")
            if bool(_nonzero(module.weight)[~keep].any()):
                raise SlimtuneError(f"layer {i} {path} has non-zero weights where the masks prune; call masking.weights.zero_masked_weights(model, masks) before saving")
        out.append((f"{spec.layers}.{i}.{path}", module))
    return out


def plan_sparse(model: nn.Module, format: str = "auto", masks=None) -> tuple[str, dict[str, dict[str, torch.Tensor]], list[dict]]:
    """Encode the projections to store sparse, without writing anything.

    Returns (compressed-tensors format name, {module name: encoded parts}, per-module rows for the
    report). Raises SlimtuneError for a format that cannot hold the model's pattern."""
    if format not in FORMATS:
        raise SlimtuneError(f"sparse format '{format}' is unknown; pass one of {', '.join(FORMATS)}")
    root = unwrap(model)
    with torch.no_grad():
        pruned = []
        for name, module in _candidates(root, masks):
            nz = _nonzero(module.weight.detach())
            if not bool(nz.all()):
                pruned.append((name, module.weight.detach(), nz))
        if not pruned:
            raise SlimtuneError("no decoder projection holds a zero weight, so there is nothing to store sparse; prune the model first or save it with save_model")
        if format == "sparse-24":
            for name, w, nz in pruned:
                if not fits_24(w, nz):
                    raise SlimtuneError(f"{name} is not 2:4 sparse along its inputs ({_first_24_violation(w)}); prune with --granularity nm --nm 2:4 or save with format 'bitmask' or 'auto'")
            chosen = "sparse-24"
        elif format == "auto":
            chosen = "sparse-24" if all(fits_24(w, nz) for _, w, nz in pruned) else "bitmask"
        else:
            chosen = "bitmask"
        encoded, rows = {}, []
        for name, w, nz in pruned:
            parts = encode_24(w, nz) if chosen == "sparse-24" else encode_bitmask(w, nz)
            dense_bytes = w.numel() * w.element_size()
            stored = chosen if chosen == "sparse-24" or _sparse_bytes(parts) < dense_bytes else "dense"
            if stored != "dense":
                encoded[name] = parts
            rows.append({
                "module": name, "shape": list(w.shape), "sparsity": 1.0 - int(nz.sum()) / nz.numel(),
                "stored": stored, "dense_bytes": dense_bytes, "stored_bytes": _sparse_bytes(parts) if stored != "dense" else dense_bytes,
            })
    if not encoded:
        raise SlimtuneError("no pruned projection is sparse enough for the bitmask layout to make it smaller; save the model with save_model")
    return _CT_FORMAT[chosen], encoded, rows


# ---- saving -----------------------------------------------------------------------------------
def _dense_state_bytes(model: nn.Module) -> int:
    """Bytes of tensor data in the dense save (shared tensors, e.g. tied embeddings, once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def sparsity_config(ct_format: str, targets: list[str], global_sparsity: float) -> dict:
    """The `quantization_config` block compressed-tensors writes for a sparse-only model."""
    return {
        "quant_method": "compressed-tensors",
        "sparsity_config": {
            "format": ct_format,
            "targets": sorted(targets),
            "ignore": [],
            "global_sparsity": global_sparsity,
            "sparsity_structure": "2:4" if ct_format == SPARSE24 else "unstructured",
        },
        "transform_config": {},
    }


def save_sparse(model: nn.Module, out_dir: str | Path, tokenizer=None, format: str = "auto", masks=None, overwrite: bool = False) -> dict:
    """Write `model` (merged, zeros in its pruned weights) with its pruned projections stored sparse.

    Atomic like `save_model` (temporary sibling directory, one rename; `overwrite` replaces only a
    directory slimtune wrote). `masks` (WeightMasks or {(layer, path): bool keep}) limits the sparse
    projections to the masked ones and checks that their pruned weights are zero. Load the result
    with `load_sparse(out_dir)`. Returns a report: format, bytes of the weight files against the
    dense save, per-module sparsity and how each projection was stored.
    """
    check_output_dir(out_dir, overwrite)
    ct_format, encoded, rows = plan_sparse(model, format, masks)  # refusals before anything is written
    out = export_model(model)
    state = out.state_dict()
    dense_bytes = _dense_state_bytes(out)
    total_params = sum(p.numel() for p in out.parameters())
    zeros = sum(int((~_nonzero(p.detach())).sum()) for p in out.parameters())
    sparse_state = {}
    for key, value in state.items():
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module in encoded:
            for part, tensor in encoded[module].items():
                sparse_state[f"{module}.{part}"] = tensor
        else:
            sparse_state[key] = value
    missing = set(encoded) - {k[: -len(".weight")] for k in state if k.endswith(".weight")}
    if missing:  # export_model renamed modules; cannot happen for the supported architectures
        raise SlimtuneError(f"cannot find {sorted(missing)[0]}.weight in the exported model; save with save_model instead")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _write_marker(tmp)
        out.save_pretrained(tmp, state_dict=sparse_state)
        if out.config.model_type.startswith(SLIM_PREFIX):
            shutil.copyfile(slim_modeling.__file__, tmp / MODELING_FILE)
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text())
        config["quantization_config"] = sparsity_config(ct_format, list(encoded), zeros / max(total_params, 1))
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        weight_bytes = sum(f.stat().st_size for f in _weight_files(tmp))
    return {
        "path": str(out_dir),
        "format": ct_format,
        "weight_bytes": weight_bytes,
        "dense_weight_bytes": dense_bytes,
        "ratio": weight_bytes / max(dense_bytes, 1),
        "sparse_modules": len(encoded),
        "global_sparsity": zeros / max(total_params, 1),
        "modules": rows,
        "load": f"slimtune.export.sparse.load_sparse({str(out_dir)!r})",
    }


# ---- loading ----------------------------------------------------------------------------------
def read_sparsity_config(path: str | Path) -> dict | None:
    """The `sparsity_config` of a saved directory, or None when its weights are stored dense."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    sparsity = (config.get("quantization_config") or {}).get("sparsity_config") or {}
    return sparsity if sparsity.get("format") in (BITMASK, SPARSE24) else None


def dense_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every safetensors file of `path` and decode the sparse projections to dense weights."""
    from safetensors import safe_open

    files = _weight_files(Path(path))
    index = Path(path) / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [Path(path) / n for n in names]
    if not files:
        raise SlimtuneError(f"{path} holds no .safetensors weight file; pass the directory save_sparse wrote")
    raw: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                raw[key] = f.get_tensor(key)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    dense = {}
    for key, tensor in raw.items():
        module, _, part = key.rpartition(".")
        if part in _PARTS and f"{module}.bitmask" in raw:
            groups.setdefault(module, {})[part] = tensor
        else:
            dense[key] = tensor
    for module, parts in groups.items():
        lacking = {"compressed", "bitmask", "shape"} - parts.keys()
        if lacking:
            raise SlimtuneError(f"{module} lacks {sorted(lacking)[0]} in the sparse checkpoint; the directory is damaged, save it again")
        dense[f"{module}.weight"] = decode(parts, module)
    return dense


def load_sparse(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a directory written by `save_sparse` into the transformers model it came from, with the
    same weights bit for bit (dtype=None keeps the stored dtype)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise SlimtuneError(f"{path} has no config.json; pass the directory save_sparse wrote")
    if read_sparsity_config(path) is None:
        raise SlimtuneError(f"{path} holds no sparse weights (no sparsity_config in config.json); load it with AutoModelForCausalLM.from_pretrained")
    quant = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if quant.get("config_groups"):
        raise SlimtuneError(f"{path} is quantised as well as sparse; load_sparse reads sparse-only checkpoints, load it with a compressed-tensors release that supports it")
    state = dense_state_dict(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with contextlib.suppress(AttributeError):
        delattr(config, "quantization_config")  # the weights are dense again
    if dtype is None:
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()  # from_config may leave tied weights (lm_head) untied until now
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    loaded = {id(t) for n, t in tensors.items() if n in state}
    missing = [k for k in result.missing_keys if id(tensors.get(k)) not in loaded]  # tied weights come with their twin
    if missing or result.unexpected_keys:
        what = f"missing {missing[0]}" if missing else f"unexpected {result.unexpected_keys[0]}"
        raise SlimtuneError(f"{path}: the weights do not match the model in config.json ({what}); save the model again with save_sparse")
    return model.to(device).eval()


def is_sparse_dir(path: str | Path) -> bool:
    """True for a directory save_sparse wrote (slimtune's marker and a sparse config)."""
    return (Path(path) / MARKER).is_file() and read_sparsity_config(path) is not None
