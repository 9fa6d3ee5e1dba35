"""GGUF files for GRN networks: writing (with quantisation), reading (weights stay quantised) and their metadata.

A GGUF file (version 3, little-endian) is: ``"GGUF" | version:u32 | n_tensors:u64 | n_kv:u64``, then ``n_kv``
typed key/value pairs (the metadata), then per tensor ``name | n_dims:u32 | dims:u64[n_dims] (innermost first) |
type:u32 | offset:u64``, then, aligned to 32 bytes, the tensor data (each tensor's bytes aligned to 32, offsets
relative to the start of the data). Strings are ``length:u64 | utf-8 bytes``.

Our files describe themselves like our safetensors files: ``general.architecture = "grn"`` and the same ``grn.*``
string entries (``grn.kind``, ``grn.config`` JSON, ``grn.layout``, ``grn.tasks``, ``grn.format``, ``grn.source``, see
:mod:`grn_core.checkpoint_files`), plus ``grn.quantization``: a JSON summary of the requested type, how many tensors
got each type, and the tensors that fell back to another type (the per-tensor types are in the tensor infos).

    summary = write_gguf(tensors, "refiner-Q4_K.gguf", "q4_k", metadata)   # atomic: temp file + rename
    tensors, metadata = read_gguf("refiner-Q4_K.gguf")                     # GGUFWeight values stay quantised

Which tensors are quantised (:func:`default_select`): every 2-D ``.weight`` matrix but the bit embedding and the
head; those two, norms and biases stay F32 (as llama.cpp keeps 1-D tensors in F32). A row whose length is not a whole number of blocks of the
requested type takes the next type of :data:`~grn_core.formats.gguf_quants.FALLBACKS` that fits.

Nothing in this module imports :mod:`grn_core.checkpoints`; dispatch GGUF files from there (see the package
docstring) so the modules keep importing downwards only.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Optional, Sequence

import torch

from ..checkpoint_files import CheckpointError, RawCheckpoint, read_checkpoint, sniff_format
from .gguf_quants import (
    QTYPES,
    SUPPORTED,
    GGUFWeight,
    normalize_qtype,
    pick_qtype,
    qtype_by_id,
    quantize,
)

log = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURE",
    "BIG_TENSOR",
    "GGUFSummary",
    "META_QUANTIZATION",
    "WRITE_TYPES",
    "checkpoint_to_gguf",
    "default_select",
    "is_gguf_file",
    "plan_gguf",
    "read_gguf",
    "read_gguf_checkpoint",
    "write_gguf",
]

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32
ARCHITECTURE = "grn"
META_ARCHITECTURE = "general.architecture"
META_QUANTIZATION_VERSION = "general.quantization_version"
META_ALIGNMENT = "general.alignment"
META_QUANTIZATION = "grn.quantization"
GGML_QUANT_VERSION = 2

WRITE_TYPES = ("q8_0", "q5_k", "q4_k", "bf16", "f16", "f32")  # what write_gguf's qtype accepts (case-insensitive)
# How to make a GRN GGUF file (for error messages).
HOW_TO_WRITE = ("python -m grn_core convert ORIGINAL OUT.gguf --dtype q8_0 (or q5_k, q4_k, bf16, f16) from the "
                "original .pth / .safetensors file")

# Default choice of what to quantise (see default_select).
BLOCK_PREFIXES = ("block_chunks.", "blocks.", "layers.")
KEEP_PREFIXES = ("head.", "word_embed.", "token_embedding.", "y_embedder.", "final_layer.")
BIG_TENSOR = 1 << 20

_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_COUNT = 1 << 24  # sanity bounds for counts read from a header (a damaged header must not allocate terabytes)

# GGUF metadata value types: id -> struct format (scalars), 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


def default_select(name: str, shape: Sequence[int]) -> bool:
    """Whether ``write_gguf`` quantises tensor ``name`` by default: every 2-D ``.weight`` matrix (the repeated
    blocks' and the text / step-token projections'), except the modules GRN keeps in float (the bit embedding
    ``word_embed``, the ``head``, embedding tables) and norms. Small projections are quantised too: in a small model
    they are a large share of the file (the tiny refiner's Q8_0 file: 0.34x of float32 with them in F32, 0.29x
    without)."""
    if len(shape) != 2 or not name.endswith(".weight") or name.startswith(KEEP_PREFIXES):
        return False
    return "norm" not in name.rsplit(".", 2)[-2]


@dataclass
class GGUFSummary:
    """What :func:`write_gguf` wrote (or :func:`plan_gguf` would write): the type of every tensor, the tensors that
    fell back from the requested type (``{name: (wanted, got)}``) and the file size in bytes (0 for a plan)."""

    path: Optional[Path]
    requested: str
    types: dict[str, str]
    fallbacks: dict[str, tuple[str, str]] = field(default_factory=dict)
    bytes: int = 0
    data_bytes: int = 0  # tensor data alone (aligned), known from the plan

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for qtype in self.types.values():
            out[qtype] = out.get(qtype, 0) + 1
        return dict(sorted(out.items()))

    def metadata_json(self) -> str:
        return json.dumps({"requested": self.requested, "counts": self.counts,
                           "fallbacks": {k: got for k, (_, got) in sorted(self.fallbacks.items())}}, sort_keys=True)


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def plan_gguf(tensors: Mapping[str, torch.Tensor], qtype: str = "q8_0",
              select: Optional[Callable[[str, Sequence[int]], bool]] = None) -> GGUFSummary:
    """The type every tensor gets when written as ``qtype`` (nothing is quantised or written).

    Selected tensors (``select(name, shape)``, default :func:`default_select`) get ``qtype`` or its fallback (see
    :func:`~grn_core.formats.gguf_quants.pick_qtype`); the others keep F32 — or their own type for integer tensors.
    """
    if str(qtype).lower() not in WRITE_TYPES:
        raise ValueError(f"qtype '{qtype}' cannot be written; use one of {', '.join(WRITE_TYPES)}.")
    requested = normalize_qtype(qtype)
    select = select or default_select
    types: dict[str, str] = {}
    fallbacks: dict[str, tuple[str, str]] = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor '{name}' is a {type(tensor).__name__}, not a torch.Tensor.")
        if tensor.ndim > _MAX_DIMS:
            raise ValueError(f"tensor '{name}' has {tensor.ndim} dimensions; GGUF stores at most {_MAX_DIMS}.")
        if not tensor.is_floating_point():
            by_dtype = {t.torch_dtype: t.name for t in QTYPES.values() if t.torch_dtype is not None}
            if tensor.dtype not in by_dtype:
                raise ValueError(f"tensor '{name}' has dtype {tensor.dtype}, which GGUF cannot store.")
            types[name] = by_dtype[tensor.dtype]
            continue
        if tensor.ndim >= 1 and select(name, tuple(tensor.shape)):
            got = pick_qtype(requested, tuple(tensor.shape))
            if got == "F16" and not tensor.is_meta and tensor.numel():  # only then do the values matter
                got = pick_qtype(requested, tuple(tensor.shape), float(tensor.detach().abs().max()))
            if got != requested:
                fallbacks[name] = (requested, got)
        else:
            got = "F32"
        types[name] = got
    data_bytes = sum(_align(_tensor_bytes(tensor.shape, types[name])) for name, tensor in tensors.items())
    return GGUFSummary(None, requested, types, fallbacks, data_bytes=data_bytes)


def _tensor_bytes(shape: Sequence[int], qtype: str) -> int:
    dims = _stored_shape(shape)
    rows = 1
    for dim in dims[1:]:
        rows *= dim
    return QTYPES[qtype].row_bytes(dims[0]) * rows


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kv_string(key: str, value: str) -> bytes:
    return _string(key) + struct.pack("<I", _STRING) + _string(value)


def _kv_uint32(key: str, value: int) -> bytes:
    return _string(key) + struct.pack("<I", _UINT32) + struct.pack("<I", value)


def _align(offset: int, alignment: int = ALIGNMENT) -> int:
    return offset + (-offset % alignment)


def _stored_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Torch shape -> GGUF dims (innermost first); 0-D tensors are stored as one element."""
    return tuple(reversed([int(s) for s in shape])) if len(shape) else (1,)


def write_gguf(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    qtype: str = "q8_0",
    metadata: Optional[Mapping[str, str]] = None,
    *,
    select: Optional[Callable[[str, Sequence[int]], bool]] = None,
    device: Any = None,
) -> GGUFSummary:
    """Write ``tensors`` as one GGUF file: the selected matrices as ``qtype`` (``q8_0``, ``q5_k``, ``q4_k``, ``bf16``,
    ``f16``, ``f32``; fallbacks as described in the module docstring), the rest F32.

    ``metadata``: string entries (our ``grn.*`` keys); ``general.architecture = "grn"`` and ``grn.quantization`` are
    added. ``device``: where quantisation runs (default: each tensor's own device). Tensors are quantised one at a
    time while the file is written, so memory stays at one tensor's worth. The file appears only when complete
    (written to a temporary file in the same folder, then renamed over ``path``); on any error no file is left and an
    existing ``path`` is untouched. Returns the :class:`GGUFSummary`.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the GGUF file a name, e.g. {path / 'model.gguf'}.")
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map strings to strings (as in safetensors); '{key}' -> "
                            f"{type(value).__name__}.")
    if metadata.get(META_ARCHITECTURE, ARCHITECTURE) != ARCHITECTURE:
        raise ValueError(f"{META_ARCHITECTURE} of a GRN file is '{ARCHITECTURE}', not "
                         f"'{metadata[META_ARCHITECTURE]}'.")
    metadata.pop(META_ARCHITECTURE, None)
    for reserved in (META_QUANTIZATION, META_QUANTIZATION_VERSION, META_ALIGNMENT):
        metadata.pop(reserved, None)
    summary = plan_gguf(tensors, qtype, select)
    summary.path = path

    kv = [_kv_string(META_ARCHITECTURE, ARCHITECTURE), _kv_uint32(META_QUANTIZATION_VERSION, GGML_QUANT_VERSION),
          _kv_string(META_QUANTIZATION, summary.metadata_json())]
    kv += [_kv_string(key, value) for key, value in metadata.items()]
    infos, sizes, offset = [], [], 0
    for name, tensor in tensors.items():
        kind = QTYPES[summary.types[name]]
        dims = _stored_shape(tensor.shape)
        nbytes = _tensor_bytes(tensor.shape, kind.name)
        infos.append(_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                     + struct.pack("<IQ", kind.id, offset))
        sizes.append(nbytes)
        offset = _align(offset + nbytes)
    header = (GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(infos), len(kv)) + b"".join(kv) + b"".join(infos))
    header += b"\0" * (-len(header) % ALIGNMENT)

    path.parent.mkdir(parents=True, exist_ok=True)
    # A new name beside the target (same file system, so the rename is atomic); plain open() so the file gets the
    # usual permissions (umask), not a private temporary file's 0600.
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    handle = open(temp, "xb")
    try:
        with handle:
            handle.write(header)
            for (name, tensor), nbytes in zip(tensors.items(), sizes):
                _write_tensor(handle, name, tensor, summary.types[name], nbytes, device)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    summary.bytes = path.stat().st_size
    return summary


def _write_tensor(handle: BinaryIO, name: str, tensor: torch.Tensor, qtype: str, nbytes: int, device: Any) -> None:
    try:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all()):
            raise ValueError("it holds NaN or Inf values")
        weight = quantize(tensor.reshape(-1) if tensor.ndim == 0 else tensor, qtype, device=device)
    except ValueError as error:
        raise ValueError(f"tensor '{name}' {tuple(tensor.shape)} cannot be written as {qtype}: {error}") from error
    data = weight.data.reshape(-1)
    if data.numel() != nbytes:  # a bug, not bad input: the header already promised nbytes
        raise RuntimeError(f"tensor '{name}': {data.numel()} bytes quantised, {nbytes} planned.")
    handle.write(data.numpy().tobytes())
    handle.write(b"\0" * (-nbytes % ALIGNMENT))


def checkpoint_to_gguf(src: str | Path, dst: str | Path, qtype: str = "q8_0",
                       metadata: Optional[Mapping[str, str]] = None, **kwargs: Any) -> GGUFSummary:
    """Write the checkpoint ``src`` (read with :func:`~grn_core.checkpoint_files.read_checkpoint`) as the GGUF file
    ``dst``, with ``src``'s metadata updated by ``metadata``.

    The result must say what it holds: ``src`` must be one of our self-describing files (``python -m grn_core
    convert`` output, the built-in tiny model) or ``metadata`` must give ``grn.kind`` and ``grn.config``.
    """
    raw = read_checkpoint(src)
    merged = {**raw.metadata, **dict(metadata or {})}
    missing = [key for key in ("grn.kind", "grn.config") if not merged.get(key)]
    if missing:
        raise CheckpointError(
            f"{raw.path}: the file does not record {' and '.join(missing)}, so a GGUF made from it would not say what "
            "it holds. Convert it first (`python -m grn_core convert SRC DST.safetensors`) and quantise that file.",
            path=raw.path, key=missing[0])
    return write_gguf(raw.tensors, dst, qtype, merged, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Reading


class _Truncated(Exception):
    pass


class _Reader:
    """Reads exact byte counts from a file; a short read means the file ends early."""

    def __init__(self, handle: BinaryIO, size: int):
        self.handle, self.size = handle, size

    def take(self, count: int) -> bytes:
        if count < 0 or self.handle.tell() + count > self.size:
            raise _Truncated()
        data = self.handle.read(count)
        if len(data) != count:
            raise _Truncated()
        return data

    def unpack(self, fmt: str) -> Any:
        values = struct.unpack(fmt, self.take(struct.calcsize(fmt)))
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.unpack("<Q")
        return self.take(length).decode("utf-8", errors="replace")

    def value(self, type_id: int, depth: int = 0) -> Any:
        if type_id in _SCALARS:
            return self.unpack(_SCALARS[type_id])
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY and depth < 4:
            item_type, count = self.unpack("<IQ")
            if count > self.size:
                raise _Truncated()
            return [self.value(item_type, depth + 1) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {type_id}")


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order
    type_id: int
    offset: int


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` starts with the GGUF magic bytes (the name does not matter)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _what_else(path: Path) -> str:
    """The end of a 'not a GGUF file' message: what the file is instead, when it is a weights file we know."""
    try:
        fmt = sniff_format(path)
    except CheckpointError:
        return ". Download it again, or pick the right file."
    what, suffix = {"safetensors": ("a safetensors file", ".safetensors"), "zip": ("a PyTorch checkpoint", ".pth"),
                    "pickle": ("a legacy PyTorch checkpoint", ".pth")}[fmt]
    return f": it is {what}. Rename it to {path.with_suffix(suffix).name}."


def _meta_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _read_header(path: Path, handle: BinaryIO, size: int) -> tuple[dict[str, Any], list[_TensorInfo], int]:
    reader = _Reader(handle, size)
    if reader.take(4) != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF'){_what_else(path)}",
                              path=path)
    version = reader.unpack("<I")
    if version not in (2, 3):
        endian = " (a big-endian file?)" if version >= 1 << 16 else ""
        raise CheckpointError(f"{path}: GGUF version {version}{endian} is not supported; GRN reads little-endian GGUF "
                              "versions 2 and 3.", path=path, value=version)
    n_tensors, n_kv = reader.unpack("<QQ")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise CheckpointError(f"{path}: the GGUF header is damaged ({n_tensors} tensors, {n_kv} metadata entries). "
                              "Download the file again.", path=path)
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = reader.string()
        metadata[key] = reader.value(reader.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = reader.string()
        n_dims = reader.unpack("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise CheckpointError(f"{path}: tensor '{name}' has {n_dims} dimensions; GGUF allows 1 to {_MAX_DIMS}. "
                                  "The file is damaged: download it again.", path=path, key=name)
        dims = reader.unpack(f"<{n_dims}Q")
        dims = (dims,) if isinstance(dims, int) else dims
        type_id, offset = reader.unpack("<IQ")
        infos.append(_TensorInfo(name, tuple(int(d) for d in reversed(dims)), int(type_id), int(offset)))
    alignment = metadata.get(META_ALIGNMENT, ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise CheckpointError(f"{path}: {META_ALIGNMENT} = {alignment!r} is not a positive multiple of 8.", path=path)
    return metadata, infos, _align(handle.tell(), alignment)


def read_gguf(path: str | Path, architecture: Optional[str] = ARCHITECTURE, load_data: bool = True
              ) -> tuple[dict[str, torch.Tensor | GGUFWeight], dict[str, str]]:
    """Read a GGUF file: ``(tensors, metadata)``.

    Quantised tensors are :class:`~grn_core.formats.gguf_quants.GGUFWeight` (raw blocks, still quantised; decode them
    with :func:`~grn_core.formats.gguf_quants.dequantize` or let :func:`~grn_core.formats.gguf_linear.
    apply_gguf_weights` keep them so); F32 / F16 / BF16 / integer tensors are plain CPU tensors (a 0-D tensor
    written by :func:`write_gguf` comes back with shape ``(1,)``: GGUF has no scalars). ``metadata`` maps every key
    to a string (non-string values as JSON).

    ``load_data=False`` reads the header alone: every tensor then lives on the meta device (shapes, types and the
    checks below, no bytes read) — what inspecting a file needs.

    Raises :class:`~grn_core.checkpoint_files.CheckpointError` naming the file, before any tensor data is read, for a
    file that is not GGUF, of another architecture than ``architecture`` (None: any), damaged or truncated, or that
    holds a tensor type GRN does not read (the message lists the supported types).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file. Put the GGUF file there or pick another one.", path=path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        try:
            metadata, infos, data_start = _read_header(path, handle, size)
        except _Truncated:
            raise CheckpointError(
                f"{path}: the GGUF file is truncated: it ends ({size} bytes) inside its header. The download or copy "
                "was cut off: download it again.", path=path) from None
        except (ValueError, UnicodeError, struct.error) as error:
            raise CheckpointError(f"{path}: the GGUF header is damaged ({error}). Download the file again.",
                                  path=path) from error
        found_arch = metadata.get(META_ARCHITECTURE)
        if architecture is not None and found_arch != architecture:
            what = f"'{found_arch}'" if found_arch is not None else "not recorded"
            raise CheckpointError(
                f"{path}: this GGUF file is not a GRN model: its architecture ({META_ARCHITECTURE}) is {what}, "
                f"expected '{architecture}'. GRN reads the GGUF files of GRN refiners that grn_core writes (tensor "
                f"types {', '.join(SUPPORTED)}); a GGUF of another model (e.g. for ComfyUI-GGUF's loaders) cannot be "
                f"used here. Make one with `{HOW_TO_WRITE}`.",
                path=path, key=META_ARCHITECTURE, value=found_arch)
        plan = []
        names = set()
        for info in infos:
            kind = qtype_by_id(info.type_id)
            if kind is None:
                raise CheckpointError(
                    f"{path}: tensor '{info.name}' is stored as GGML type {_type_name(info.type_id)}, which GRN does "
                    f"not read. Supported types: {', '.join(SUPPORTED)}. Re-quantise the model with "
                    f"`{HOW_TO_WRITE}`.",
                    path=path, key=info.name, value=_type_name(info.type_id))
            if info.name in names:
                raise CheckpointError(f"{path}: tensor '{info.name}' appears twice. The file is damaged.", path=path,
                                      key=info.name)
            names.add(info.name)
            row = info.shape[-1]
            if row % kind.block:
                raise CheckpointError(
                    f"{path}: tensor '{info.name}' {info.shape} is {kind.name} but its rows of {row} are not whole "
                    f"blocks of {kind.block}. The file is damaged.", path=path, key=info.name)
            rows = 1
            for dim in info.shape[:-1]:
                rows *= dim
            nbytes = rows * kind.row_bytes(row)
            plan.append((info, kind, nbytes))
        end = max((data_start + info.offset + nbytes for info, _, nbytes in plan), default=data_start)
        if end > size:
            raise CheckpointError(
                f"{path}: the GGUF file is truncated: its header describes {end} bytes but the file has {size} "
                f"({100 * size / end:.0f}%). The download or copy was cut off: download it again.", path=path)
        tensors: dict[str, torch.Tensor | GGUFWeight] = {}
        for info, kind, nbytes in plan:
            if not load_data:
                tensors[info.name] = (GGUFWeight(torch.empty(nbytes, dtype=torch.uint8, device="meta"), kind.name,
                                                 info.shape) if kind.quantized
                                      else torch.empty(info.shape, dtype=kind.torch_dtype, device="meta"))
                continue
            handle.seek(data_start + info.offset)
            data = torch.empty(nbytes, dtype=torch.uint8)
            if nbytes and handle.readinto(memoryview(data.numpy())) != nbytes:
                raise CheckpointError(f"{path}: the GGUF file ended while reading tensor '{info.name}'. Download it "
                                      "again.", path=path, key=info.name)
            if kind.quantized:
                tensors[info.name] = GGUFWeight(data, kind.name, info.shape)
            else:
                tensors[info.name] = data.view(kind.torch_dtype).reshape(info.shape)
    return tensors, {key: _meta_text(value) for key, value in metadata.items()}


def _type_name(type_id: int) -> str:
    names = {9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
             20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0",
             39: "MXFP4", 40: "NVFP4"}
    kind = qtype_by_id(type_id)
    return kind.name if kind else f"{names.get(type_id, 'unknown')} (id {type_id})"


def read_gguf_checkpoint(path: str | Path, load_data: bool = True) -> RawCheckpoint:
    """:func:`read_gguf` as the :class:`~grn_core.checkpoint_files.RawCheckpoint` the loaders take (``grn.*``
    metadata as in our safetensors files, so ``config_dict`` and the kind / layout / tasks lookups work as they are).
    ``load_data=False``: the header alone (meta-device tensors), for inspecting a file."""
    tensors, metadata = read_gguf(path, load_data=load_data)
    if not tensors:
        raise CheckpointError(f"{path}: the GGUF file holds no tensors.", path=path)
    return RawCheckpoint(Path(path), tensors, metadata)  # type: ignore[arg-type]

