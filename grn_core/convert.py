"""Convert an official GRN checkpoint (or any file our loaders read) into one self-describing safetensors or GGUF file.

    python -m grn_core.convert SRC DST.safetensors [--dtype bf16|fp16|fp32|fp8_e4m3fn|fp8_e5m2] [--layout joint|prefix]
    python -m grn_core.convert SRC DST.gguf --dtype q8_0|q5_k|q4_k|bf16|f16|f32        # refiners only

The output carries the config, kind, layout and tasks in its metadata, so it loads later with no flags.
fp8 applies to the weight matrices of linear and conv layers only; norms, biases and embedding tables keep 16 bits,
because they are small and their precision matters more.

A ``.gguf`` output (chosen by the name; refiners and class-to-image refiners only) quantises the matrices of the
repeated blocks (and other matrices of at least 2**20 weights) to the ``--dtype`` type: ``q8_0`` (8.5 bits per weight),
``q5_k`` (5.5), ``q4_k`` (4.5), or stores them as ``bf16`` / ``f16`` / ``f32``; rows that are no whole number of the
type's blocks take the nearest type that fits (K-quants need rows of a multiple of 256, then Q5_0 / Q4_0, Q8_0, F16),
and norms, biases, the bit embedding and the head stay F32 (see :mod:`grn_core.formats.gguf_file`). The GGUF metadata
holds ``general.architecture = "grn"``, the same ``grn.*`` entries and ``grn.quantization`` (the types chosen).
A GGUF source is decoded to float32 first (re-quantising adds error: convert from the original file when you can).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from .checkpoint_files import CheckpointError, check_finite, is_finite_tensor
from .checkpoints import (
    FP8_DTYPES,
    GGUF_KINDS,
    KINDS,
    _check_gguf_finite,
    _check_keys,
    _kind_of,
    _layout_for,
    _model_api,
    _resolve_config,
    checkpoint_metadata,
    parse_dtype,
    read_weights,
    save_checkpoint,
    tasks_of,
)
from .formats import WRITE_TYPES, GGUFWeight, dequantize, write_gguf

log = logging.getLogger(__name__)

_EMBEDDING_TABLES = ("token_embedding.weight", "y_embedder.embedding_table.weight", "pos_embed", "in_context_posemb")


def cast_for_storage(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The stored form of one tensor: integers untouched, floats to ``dtype``; fp8 only for weight matrices."""
    if dtype is None or not tensor.is_floating_point():
        return tensor
    if dtype in FP8_DTYPES:
        is_matrix = tensor.ndim >= 2 and name.endswith(".weight") and not name.endswith(_EMBEDDING_TABLES)
        return tensor.to(dtype if is_matrix else torch.bfloat16)
    return tensor.to(dtype)


# --dtype names of GGUF types (besides WRITE_TYPES themselves) -> the GGUF type.
_GGUF_NAMES = {"bfloat16": "bf16", "fp16": "f16", "float16": "f16", "fp32": "f32", "float32": "f32"}
_QUANT_TYPES = ("q8_0", "q5_k", "q4_k")


def gguf_type(dst: Path, dtype: str | torch.dtype | None) -> str:
    """The GGUF type a ``--dtype`` asks for (CheckpointError naming ``dst`` and the choices otherwise)."""
    choices = "q8_0 (8.5 bits per weight), q5_k (5.5), q4_k (4.5), bf16, f16 or f32"
    if dtype is None:
        raise CheckpointError(f"{dst}: a .gguf output needs --dtype: {choices}. q8_0 stays closest to the original; "
                              "q4_k is the smallest.", path=dst)
    name = str(dtype).replace("torch.", "").lower()
    name = _GGUF_NAMES.get(name, name)
    if name in WRITE_TYPES:
        return name
    if name.startswith(("fp8", "float8")):
        raise CheckpointError(f"{dst}: GGUF has no fp8 type; use --dtype q8_0 (8.5 bits per weight, a scale per 32 "
                              f"weights) for a .gguf file, or write {dst.with_suffix('.safetensors').name} for fp8.",
                              path=dst, value=str(dtype))
    raise CheckpointError(f"{dst}: --dtype {dtype} is not a type GRN writes to GGUF; use {choices}.", path=dst,
                          value=str(dtype))


def convert(src: str | Path, dst: str | Path, dtype: str | torch.dtype | None = None,
            layout: str | None = None, in_context_start: int | None = None) -> Path:
    """Read ``src``, validate it against its network, and write ``dst`` with full metadata: a .safetensors file, or
    for a ``.gguf`` name a GGUF file quantised to ``dtype`` (``q8_0``, ``q5_k``, ``q4_k``, ``bf16``, ``f16``, ``f32``;
    refiners and class-to-image refiners only).

    Everything is checked before a byte is written: kind, config, keys, shapes and dtypes, and that every weight is
    finite both in ``src`` and in the storage dtype. ``dst`` is replaced only once the new file is complete, so a
    failed conversion leaves an existing ``dst`` as it was.
    """
    dst = Path(dst)
    suffix = dst.suffix.lower()
    if suffix not in (".safetensors", ".gguf"):
        raise CheckpointError(
            f"{dst}: the output must be a .safetensors file (e.g. {dst.with_suffix('.safetensors')}) or, for a "
            f"quantised refiner, a .gguf file (e.g. {dst.with_suffix('.gguf')}).", path=dst)
    if dst.is_dir():
        raise CheckpointError(f"{dst}: this is a folder; give the output a file name, e.g. "
                              f"{dst / ('model' + suffix)}.", path=dst)
    qtype = gguf_type(dst, dtype) if suffix == ".gguf" else None
    if qtype is None and str(dtype).lower() in _QUANT_TYPES:
        raise CheckpointError(
            f"{dst}: --dtype {dtype} is a GGUF quantisation, which .safetensors files cannot hold. Name the output "
            f"{dst.with_suffix('.gguf')} to write a GGUF file, or pick a safetensors dtype (bf16, fp16, fp32, "
            "fp8_e4m3fn, fp8_e5m2).", path=dst, value=str(dtype))
    storage = parse_dtype(dtype) if qtype is None else None
    raw = read_weights(src)
    kind = _kind_of(raw)
    if qtype is not None and kind not in GGUF_KINDS:
        raise CheckpointError(
            f"{raw.path}: this file holds {KINDS[kind].description}; GRN writes GGUF files of refiners only "
            "(text-to-image/video and class-to-image). Write "
            f"{dst.with_suffix('.safetensors').name} instead"
            + (" (--dtype fp8_e4m3fn halves the text encoder)." if kind == "umt5" else "."), path=raw.path,
            value=kind)
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
    _check_gguf_finite(raw, {k: raw.tensors[k] for k in names})  # quantised sources: their block scales
    if any(isinstance(raw.tensors[k], GGUFWeight) for k in names):
        log.warning("%s is quantised already; its weights are decoded to float32%s.", raw.path,
                    " and quantised again (the errors add up: convert from the original file when you can)"
                    if qtype in _QUANT_TYPES else "")
        raw.tensors = {k: dequantize(v) if isinstance(v, GGUFWeight) else v for k, v in raw.tensors.items()}
    meta = checkpoint_metadata(kind, config, resolved_layout, tasks_of(raw, kind), source=Path(src).name)
    if qtype is not None:
        return _write_gguf({k: raw.tensors[k] for k in names}, dst, qtype, meta)
    tensors = {k: cast_for_storage(k, raw.tensors[k], storage) for k in names}
    if storage is not None:
        _check_storage_range(raw, tensors, storage)
    return save_checkpoint(tensors, dst, meta)


def _write_gguf(tensors: dict[str, torch.Tensor], dst: Path, qtype: str, meta: dict[str, str]) -> Path:
    """:func:`~grn_core.formats.write_gguf` (atomic), with file-system failures as CheckpointError naming ``dst``."""
    try:
        write_gguf(tensors, dst, qtype, meta)
    except OSError as error:
        blocker = next((p for p in dst.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else (error.strerror or str(error))
        raise CheckpointError(f"{dst}: writing the file failed ({why}); nothing was changed there. Check the free "
                              "space and permissions.", path=dst) from error
    return dst


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
