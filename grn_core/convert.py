"""Convert an official GRN checkpoint (or any file our loaders read) into one self-describing safetensors file.

    python -m grn_core.convert SRC DST.safetensors [--dtype bf16|fp16|fp32|fp8_e4m3fn|fp8_e5m2] [--layout joint|prefix]

The output carries the config, kind, layout and tasks in its metadata, so it loads later with no flags.
fp8 applies to the weight matrices of linear and conv layers only; norms, biases and embedding tables keep 16 bits,
because they are small and their precision matters more.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .checkpoint_files import CheckpointError, check_finite, is_finite_tensor, read_checkpoint
from .checkpoints import (
    FP8_DTYPES,
    _check_keys,
    _kind_of,
    _layout_for,
    _model_api,
    _resolve_config,
    checkpoint_metadata,
    parse_dtype,
    save_checkpoint,
    tasks_of,
)

_EMBEDDING_TABLES = ("token_embedding.weight", "y_embedder.embedding_table.weight", "pos_embed", "in_context_posemb")


def cast_for_storage(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The stored form of one tensor: integers untouched, floats to ``dtype``; fp8 only for weight matrices."""
    if dtype is None or not tensor.is_floating_point():
        return tensor
    if dtype in FP8_DTYPES:
        is_matrix = tensor.ndim >= 2 and name.endswith(".weight") and not name.endswith(_EMBEDDING_TABLES)
        return tensor.to(dtype if is_matrix else torch.bfloat16)
    return tensor.to(dtype)


def convert(src: str | Path, dst: str | Path, dtype: str | torch.dtype | None = None,
            layout: str | None = None, in_context_start: int | None = None) -> Path:
    """Read ``src``, validate it against its network, and write ``dst`` (.safetensors) with full metadata.

    Everything is checked before a byte is written: kind, config, keys, shapes and dtypes, and that every weight is
    finite both in ``src`` and in the storage dtype. ``dst`` is replaced only once the new file is complete, so a
    failed conversion leaves an existing ``dst`` as it was.
    """
    dst = Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise CheckpointError(
            f"{dst}: the output must be a .safetensors file (e.g. {dst.with_suffix('.safetensors')}).", path=dst)
    if dst.is_dir():
        raise CheckpointError(f"{dst}: this is a folder; give the output a file name, e.g. "
                              f"{dst / 'model.safetensors'}.", path=dst)
    storage = parse_dtype(dtype)
    raw = read_checkpoint(src, ("ema", "vae", "model_ema1", "model"))
    kind = _kind_of(raw)
    overrides: dict = {}
    resolved_layout = None
    if kind == "refiner":
        resolved_layout = _layout_for(raw, layout)
        overrides["layout"] = resolved_layout
    if kind == "c2i":
        overrides["in_context_start"] = in_context_start
    config = _resolve_config(raw, kind, overrides)
    model_class, _, _ = _model_api(kind)
    with torch.device("meta"):
        network = model_class(config)
    _check_keys(raw, kind, network)
    names = list(network.state_dict())
    check_finite(raw.path, ((k, raw.tensors[k]) for k in names))  # never copy NaN/Inf weights into a new file
    tensors = {k: cast_for_storage(k, raw.tensors[k], storage) for k in names}
    if storage is not None:
        _check_storage_range(raw, tensors, storage)
    meta = checkpoint_metadata(kind, config, resolved_layout, tasks_of(raw, kind), source=Path(src).name)
    return save_checkpoint(tensors, dst, meta)


def _largest_magnitude(t: torch.Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    if t.element_size() == 1:  # fp8: no aminmax kernel; upcast in chunks
        return max(float(c.float().abs().amax()) for c in t.reshape(-1).split(1 << 24))
    low, high = torch.aminmax(t)
    return max(-float(low), float(high))


def _check_storage_range(raw, tensors: dict[str, torch.Tensor], storage: torch.dtype) -> None:
    """Weights finite in the source must stay finite (and fp8 ones unsaturated) in the storage dtype."""
    for name, stored in tensors.items():
        source = raw.tensors[name]
        if stored.dtype == source.dtype or not stored.is_floating_point():
            continue
        limit = torch.finfo(stored.dtype).max
        largest = _largest_magnitude(source.detach())
        if largest > limit or not is_finite_tensor(stored):
            target = str(stored.dtype).replace("torch.", "")
            raise CheckpointError(
                f"{raw.path}: tensor '{name}' holds values up to {largest:g}, beyond the range of {target} (largest "
                f"{limit:g}); stored as {target} they would become Inf/NaN or be clipped. Convert with --dtype bf16 "
                "or fp32 instead.", path=raw.path, key=name, value=target)


if __name__ == "__main__":  # ``python -m grn_core.convert ...`` is ``python -m grn_core convert ...``
    from grn_core.cli import main

    sys.exit(main(["convert", *sys.argv[1:]]))
