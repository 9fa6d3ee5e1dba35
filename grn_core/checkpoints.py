"""Loading GRN networks from checkpoint files: official releases, converted safetensors and our own files.

Every loader reads the file (see :mod:`grn_core.checkpoint_files`), checks that it holds the kind of network asked for,
takes the config from the file's metadata or infers it from tensor shapes, checks every key and shape against the
network before anything is built, and only then materialises the weights — a wrong or damaged file raises a
:class:`CheckpointError` naming the file, and nothing is half-loaded.

    tok = load_tokenizer(path, dtype=torch.float64)
    ref = load_refiner(path, layout="joint", dtype=torch.bfloat16, device="cuda")
    ref = load_refiner(path, dtype="fp8_e4m3fn", device="cuda", attention="auto", offload_blocks=20)
    net = load_c2i(path)
    enc = load_umt5(path, dtype="fp8_e4m3fn")

Weights are cast by :mod:`grn_core.runtime.precision` on the CPU, before anything moves to the device: ``dtype=None``
keeps the file's dtype on the CPU and gives bf16 (fp16 on pre-Ampere GPUs) on any other device — never float32
weights on a GPU unless asked for; fp8 files (and ``dtype="fp8_e4m3fn"`` / ``"fp8_e5m2"``) keep the repeated blocks'
Linear weights in 8 bits, upcast per call to ``compute_dtype`` (bf16 by default).

GGUF files (refiners and class-to-image refiners only; judged by their first bytes, see :mod:`grn_core.formats`)
load through the same loaders: their quantised Linears (Q8_0, Q5_K, Q4_K … blocks) become
:class:`~grn_core.formats.GGUFLinear` layers that keep the blocks as they are — on the device, or streamed by block
offload — and decode one layer's weight per call, on the compute device, in the compute dtype. For such a file
``dtype`` names that compute dtype (``None``: float32 on the CPU, bf16 — fp16 before Ampere — on GPUs; ``bf16``,
``fp16``, ``fp32``), which the few unquantised weights (norms, biases, embeddings, head) take as for a float file;
the storage stays quantised. An fp8 ``dtype`` is refused (the weights are quantised already).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .checkpoint_files import (
    FORMAT_VERSION,
    check_finite,
    fit_problems,
    META_CONFIG,
    META_FORMAT,
    META_KIND,
    META_LAYOUT,
    META_SOURCE,
    META_TASKS,
    CheckpointError,
    RawCheckpoint,
    read_checkpoint,
)

from .formats import GGUFWeight, apply_gguf_weights, dequantize, is_gguf_file, nonfinite_blocks
from .formats import read_gguf_checkpoint
from .formats.gguf_linear import state_tensors
from .presets import BIT_TASKS, TASKS
from .releases import RELEASED_FILES
from .runtime.fp8 import FP8_DTYPES as _FP8_DTYPES
from .runtime.precision import cast_network, dominant_dtype, resolve_precision

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "GGUF_KINDS",
    "KNOWN_FILES",
    "detect_kind",
    "inspect_checkpoint",
    "load_c2i",
    "load_refiner",
    "load_tokenizer",
    "load_umt5",
    "parse_dtype",
    "read_weights",
    "save_checkpoint",
]


@dataclass(frozen=True)
class ModelKind:
    """Where the network class of one kind of checkpoint lives, and how to talk about it in errors."""

    module: str
    model_class: str
    config_class: str
    infer_config: str
    description: str
    hint: str
    preferred_containers: tuple[str, ...] = ()


KINDS: dict[str, ModelKind] = {
    "tokenizer": ModelKind(
        "grn_core.tokenizer", "HBQTokenizer", "TokenizerConfig", "infer_tokenizer_config",
        "an HBQ tokenizer (the video/image VAE)",
        "Tokenizer files are named like HBQ_image_video_tokenizer_64dim_M4_*.ckpt or HBQ_image_tokenizer_16dim_M4.ckpt.",
        ("ema", "vae"),
    ),
    "refiner": ModelKind(
        "grn_core.refiner", "GRNRefiner", "RefinerConfig", "infer_refiner_config",
        "a text-to-image/video GRN refiner (GRN_bit)",
        "Refiner files are named like GRN_T2V_2B_*.pth, GRN_T2I_2B_*.pth or GRN_T2V_TITAN_*.pth.",
    ),
    "c2i": ModelKind(
        "grn_core.c2i", "C2IRefiner", "C2IConfig", "infer_c2i_config",
        "a class-to-image GRN refiner (GRN_ind)",
        "Class-to-image files are named like GRN_ind_B_ep599.pth.",
        ("model_ema1", "model"),
    ),
    "umt5": ModelKind(
        "grn_core.text", "UMT5Encoder", "UMT5Config", "infer_umt5_config",
        "a umt5-xxl text encoder",
        "The text encoder file is models_t5_umt5-xxl-enc-bf16.pth.",
    ),
}


@dataclass(frozen=True)
class KnownFile:
    kind: str
    layout: str | None = None
    tasks: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Any], ...] = ()


# Official release names → what the tensors cannot tell (layout, tasks, config overrides): the release catalogue.
KNOWN_FILES: dict[str, KnownFile] = {
    f.name: KnownFile(f.kind, f.layout, f.tasks, f.overrides) for f in RELEASED_FILES
}

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp64": torch.float64, "float64": torch.float64,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}
FP8_DTYPES = _FP8_DTYPES
LAYOUTS = ("joint", "prefix")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None``/``"default"`` → None (keep the file's dtype); names like ``"bf16"`` → the torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower()
    if key in ("default", "auto", ""):
        return None
    if key not in _DTYPE_NAMES:
        raise ValueError(f"Unknown dtype '{dtype}'. Use one of: default, {', '.join(sorted(_DTYPE_NAMES))}.")
    return _DTYPE_NAMES[key]


def detect_kind(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Which kind of GRN network a flat state dict belongs to, from its key names; None if none fits."""
    keys = tensors.keys()
    if "word_embed.weight" in keys and any(k.startswith("block_chunks.") for k in keys):
        return "refiner"
    if "x_embedder.proj1.weight" in keys and "final_layer.linear.weight" in keys:
        return "c2i"
    if "encoder.conv1.weight" in keys and "decoder.conv1.weight" in keys:
        return "tokenizer"
    if "token_embedding.weight" in keys and "blocks.0.attn.q.weight" in keys:
        return "umt5"
    return None


@dataclass(frozen=True)
class CheckpointInfo:
    """What a file holds, without building the network: for UIs that list models and check pairings."""

    path: Path
    kind: str
    layout: str | None
    tasks: tuple[str, ...]
    config: Any


def _known(path: Path) -> KnownFile | None:
    return KNOWN_FILES.get(path.name)


def _check_format(raw: RawCheckpoint) -> None:
    version = raw.metadata.get(META_FORMAT)
    if version is not None and version != FORMAT_VERSION:
        raise CheckpointError(
            f"{raw.path}: its '{META_FORMAT}' metadata says format {version[:40]!r}, but this version of ComfyUI-GRN "
            f"reads format {FORMAT_VERSION!r}. Update ComfyUI-GRN, or re-create the file from the original weights "
            "with `python -m grn_core convert`.", path=raw.path, key=META_FORMAT, value=version)


def _kind_of(raw: RawCheckpoint) -> str:
    """The kind of network in ``raw``: from its ``grn.kind`` metadata (which must name a known kind and agree with
    the tensors) or from its tensor names."""
    _check_format(raw)
    stored = raw.metadata.get(META_KIND)
    detected = detect_kind(raw.tensors)
    if stored:
        if stored not in KINDS:
            seen = f" (its tensors are those of {KINDS[detected].description})" if detected else ""
            raise CheckpointError(
                f"{raw.path}: its '{META_KIND}' metadata says {stored[:40]!r}, which is not a GRN model kind (valid: "
                f"{', '.join(KINDS)}){seen}. The metadata is damaged or was edited by hand: use an intact copy of the "
                "file, or re-create it with `python -m grn_core convert`.", path=raw.path, key=META_KIND, value=stored)
        if detected is not None and detected != stored:
            raise CheckpointError(
                f"{raw.path}: its '{META_KIND}' metadata says {stored!r}, but its tensors are those of "
                f"{KINDS[detected].description}. The metadata is damaged or was edited by hand: use an intact copy of "
                "the file.", path=raw.path, key=META_KIND, value=stored)
        return stored
    if detected is None:
        sample = ", ".join(list(raw.tensors)[:5])
        raise CheckpointError(
            f"{raw.path}: not a GRN checkpoint — its tensors ({sample}, …) match no GRN tokenizer, refiner, "
            "class-to-image model or umt5 text encoder.", path=raw.path
        )
    return detected


# The kinds a GGUF file may hold: the refiners, whose repeated blocks' Linears hold nearly all the weights. The
# tokenizer (convolutions) and the umt5 text encoder stay .safetensors / .pth (umt5 takes fp8 for its memory).
GGUF_KINDS = ("refiner", "c2i")
_CONTAINERS = ("ema", "vae", "model_ema1", "model")


def read_weights(path: str | Path, preferred: tuple[str, ...] = _CONTAINERS, load_data: bool = True
                 ) -> RawCheckpoint:
    """Read any weights file the loaders take: GGUF (judged by its first bytes, whatever its name; quantised tensors
    stay :class:`~grn_core.formats.GGUFWeight`) or what :func:`~grn_core.checkpoint_files.read_checkpoint` reads.

    ``load_data=False`` reads a GGUF file's header alone (meta-device tensors: enough to inspect it); other formats
    are read whole either way. A ``.gguf`` name on a file that is not GGUF is a CheckpointError saying what it is.
    """
    path = Path(path)
    if is_gguf_file(path):
        if path.suffix.lower() != ".gguf":
            log.warning("%s is a GGUF file with a %s name; it is read as GGUF. Rename it to .gguf.", path,
                        path.suffix or "suffix-less")
        return read_gguf_checkpoint(path, load_data=load_data)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return read_gguf_checkpoint(path, load_data=load_data)  # its error says what the file is instead
    return read_checkpoint(path, preferred)


def _is_gguf(raw: RawCheckpoint) -> bool:
    return is_gguf_file(raw.path)


def _quantised_types(raw: RawCheckpoint) -> dict[str, int]:
    """The quantised GGML types of a GGUF file's tensors with how many tensors have each ({} for float files)."""
    counts: dict[str, int] = {}
    for value in raw.tensors.values():
        if isinstance(value, GGUFWeight):
            counts[value.qtype] = counts.get(value.qtype, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def _refuse_gguf_kind(path: Path, kind: str) -> None:
    if kind not in GGUF_KINDS:
        what = KINDS[kind].description if kind in KINDS else f"a '{kind}' network"
        raise CheckpointError(
            f"{path}: this GGUF file holds {what}; GRN reads GGUF files of refiners only (text-to-image/video and "
            "class-to-image). Use the .safetensors / .pth file of this model"
            + (" (dtype='fp8_e4m3fn' halves the text encoder's memory)." if kind == "umt5" else "."),
            path=path, value=kind)


def _read_expecting(path: str | Path, expected: str) -> tuple[RawCheckpoint, str]:
    if expected not in GGUF_KINDS and is_gguf_file(path):
        spec = KINDS[expected]
        raise CheckpointError(
            f"{path}: a GGUF file, but {spec.description} was expected here. GRN reads GGUF files of refiners only; "
            f"{spec.description} stays a .safetensors / .pth file. {spec.hint}", path=path, value="gguf")
    raw = read_weights(path, KINDS[expected].preferred_containers)
    kind = _kind_of(raw)
    if kind in KINDS:
        tasks_of(raw, kind)  # damaged task metadata is refused by every loader, not only where tasks are used
    if kind != expected:
        spec = KINDS[expected]
        found = KINDS[kind].description if kind in KINDS else f"a '{kind}' file"
        raise CheckpointError(
            f"{raw.path}: this file is {found}, but {spec.description} was expected here. {spec.hint}", path=raw.path,
            value=kind)
    if _is_gguf(raw):
        _refuse_gguf_kind(raw.path, kind)
    return raw, kind


def _model_api(kind: str) -> tuple[type[nn.Module], Any, Any]:
    spec = KINDS[kind]
    module = importlib.import_module(spec.module)
    return getattr(module, spec.model_class), getattr(module, spec.config_class), getattr(module, spec.infer_config)


# ---- config validation: bounded work whatever a file's metadata claims ------------------------------------------

# Fields the tensors cannot tell; every other field is read back from the tensors and must agree.
_NOT_IN_TENSORS: dict[str, tuple[str, ...]] = {
    "refiner": ("layout", "rounds", "norm_eps", "rope_base"),
    "tokenizer": ("hbq_rounds",),
    "c2i": ("in_context_start", "rounds"),
    "umt5": ("max_distance", "eps"),
}
_MAX_INT = 1 << 24  # wider than any real width, vocabulary or class count
_INT_RANGES: dict[str, tuple[int, int]] = {  # every other integer field: 1.._MAX_INT
    "rounds": (1, 16), "hbq_rounds": (1, 16), "depth": (1, 1024), "num_layers": (1, 1024),
    "block_chunks": (1, 1024), "patch_size": (1, 64), "in_context_len": (0, 4096), "in_context_start": (0, 1024),
}
_FLOAT_RANGES: dict[str, tuple[float, float]] = {"norm_eps": (0.0, 1.0), "eps": (0.0, 1.0), "rope_base": (1.0, 1e12)}
# Tensors the config inference reads, with their number of dimensions (odd ones get a clear error, not a crash).
_INFER_NDIM: dict[str, tuple[tuple[str, int], ...]] = {
    "refiner": (("word_embed.weight", 2), ("text_proj.weight", 2), ("head.proj.weight", 2),
                ("pt_embedder.mlp.0.weight", 2), ("block_chunks.0.module.0.attn.q_norm.weight", 1),
                ("block_chunks.0.module.0.attn.q_proj.weight", 2), ("block_chunks.0.module.0.attn.k_proj.weight", 2),
                ("block_chunks.0.module.0.mlp.gate_proj.weight", 2)),
    "tokenizer": (("encoder.conv1.weight", 5), ("decoder.conv1.weight", 5), ("conv1.weight", 5),
                  ("conv2.weight", 5), (r"encoder\.downsamples\.\d+\.downsamples\.0\.residual\.6\.weight", 5)),
    "c2i": (("pos_embed", 3), ("x_embedder.proj1.weight", 4), ("blocks.0.attn.q_norm.weight", 1),
            ("blocks.0.mlp.w12.weight", 2), ("y_embedder.embedding_table.weight", 2), ("in_context_posemb", 3),
            ("final_layer.linear.weight", 2)),
    "umt5": (("token_embedding.weight", 2), ("blocks.0.attn.q.weight", 2), ("blocks.0.ffn.fc1.weight", 2),
             ("pos_embedding.embedding.weight", 2), ("blocks.0.pos_embedding.embedding.weight", 2)),
}
_CONFIG_ERRORS = (ValueError, KeyError, TypeError, IndexError, ArithmeticError, AttributeError)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _sentence(error: BaseException) -> str:
    return str(error).rstrip(". ")


def _where(raw: RawCheckpoint, source: str, name: str, value: Any) -> tuple[str, str]:
    """(what said ``name=value``, how to fix it) for an error message."""
    value = _short(value)
    if source == "metadata":
        return (f"its '{META_CONFIG}' metadata says {name}={value}",
                "The metadata is damaged or was edited by hand: use an intact copy of the file, or re-create it from "
                "the original weights with `python -m grn_core convert ORIGINAL OUT.safetensors`.")
    if source == "argument":
        return (f"the requested {name}={value}", f"Pass another {name}, or leave it out and let the file decide.")
    return (f"its tensor shapes give {name}={value}", "The file is damaged or not a GRN model.")


def _config_value_error(kind: str, name: str, value: Any) -> str | None:
    """Why one config value is unusable (None when it is fine)."""
    _, config_class, _ = _model_api(kind)
    types = {f.name: getattr(f.type, "__name__", str(f.type)) for f in dataclasses.fields(config_class)}
    if name not in types:
        return f"there is no such {config_class.__name__} field (known: {', '.join(sorted(types))})"
    kind_of_field = types[name]
    if kind_of_field == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"it must be an integer, not {type(value).__name__}"
        low, high = _INT_RANGES.get(name, (1, _MAX_INT))
        if not low <= value <= high:
            return f"it must lie in {low}..{high}"
    elif kind_of_field == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"it must be a number, not {type(value).__name__}"
        if not math.isfinite(value):
            return "it must be a finite number"
        low, high = _FLOAT_RANGES.get(name, (-1e12, 1e12))
        if not low < value <= high:
            return f"it must lie in ({low:g}, {high:g}]"
    elif kind_of_field == "bool":
        if not isinstance(value, bool):
            return f"it must be true or false, not {type(value).__name__}"
    elif kind_of_field == "str":
        if not isinstance(value, str) or len(value) > 64:
            return "it must be a short string"
        if name == "layout" and value not in ("joint", "prefix"):
            return "it must be 'joint' or 'prefix'"
    elif kind_of_field.startswith("tuple"):
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 8:
            return "it must be a list of 1 to 8 integers"
        if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 64 for v in value):
            return "its entries must be integers in 0..64"
    return None


def _check_config_values(raw: RawCheckpoint, kind: str, data: Mapping[str, Any], source: str) -> None:
    for name, value in data.items():
        why = _config_value_error(kind, name, value)
        if why is not None:
            said, fix = _where(raw, source, name, value)
            raise CheckpointError(f"{raw.path}: {said}, but {why}. {fix}", path=raw.path,
                                  key=META_CONFIG if source == "metadata" else None, field=name, value=value)


def _check_inference_tensors(raw: RawCheckpoint, kind: str) -> None:
    """The tensors the config is read from have the right number of dimensions, and no tensor is empty."""
    for pattern, ndim in _INFER_NDIM.get(kind, ()):
        for name in ([pattern] if pattern in raw.tensors else [k for k in raw.tensors if re.fullmatch(pattern, k)]):
            tensor = raw.tensors[name]
            if tensor.ndim != ndim:
                raise CheckpointError(
                    f"{raw.path}: tensor '{name}' has shape {tuple(tensor.shape)}, but {KINDS[kind].description} "
                    f"stores it with {ndim} dimensions. The file is damaged or not a GRN model.",
                    path=raw.path, key=name, value=tuple(tensor.shape))
    for name, tensor in raw.tensors.items():
        if 0 in tensor.shape:
            raise CheckpointError(
                f"{raw.path}: tensor '{name}' is empty (shape {tuple(tensor.shape)}); no GRN network has empty "
                "weights. The file is damaged.", path=raw.path, key=name, value=tuple(tensor.shape))


def _check_config_fits_tensors(raw: RawCheckpoint, kind: str, config: Any, stored: Mapping | None,
                               overrides: Mapping[str, Any]) -> None:
    """Read the config back from the tensors (with the fields they cannot tell taken from ``config``, a config
    object or a dict of every field) and compare: a stored ``depth: 1000000`` next to 4 blocks is refused here,
    before any network is built."""
    _, _, infer = _model_api(kind)
    values = config if isinstance(config, Mapping) else {f.name: getattr(config, f.name)
                                                         for f in dataclasses.fields(config)}
    fixed = {name: values[name] for name in _NOT_IN_TENSORS[kind]}
    try:
        from_tensors = infer(raw.tensors, **fixed)
    except CheckpointError:
        raise
    except _CONFIG_ERRORS as error:
        said = f" with the config stored in its '{META_CONFIG}' metadata" if stored is not None else ""
        raise CheckpointError(
            f"{raw.path}: the tensors do not fit {KINDS[kind].description}{said}: {_sentence(error)}. The file is "
            "damaged, or its metadata was edited: use an intact copy of the file.", path=raw.path,
            key=META_CONFIG if stored is not None else None) from error
    for f in dataclasses.fields(from_tensors):
        mine, theirs = values[f.name], getattr(from_tensors, f.name)
        if mine == theirs or (isinstance(mine, list) and tuple(mine) == theirs):
            continue
        source = "argument" if f.name in overrides else ("metadata" if stored is not None else "tensors")
        said, fix = _where(raw, source, f.name, mine)
        if source == "metadata" and f.name not in stored:
            said = f"its '{META_CONFIG}' metadata lacks {f.name} (so the default {f.name}={_short(mine)} applies)"
        raise CheckpointError(
            f"{raw.path}: {said}, but the tensors in the file give {f.name}={_short(theirs)}. {fix}", path=raw.path,
            key=META_CONFIG if source == "metadata" else None, field=f.name, value=mine)


def _resolve_config(raw: RawCheckpoint, kind: str, overrides: dict[str, Any]) -> Any:
    """The network config: stored in the metadata, or read from the tensor shapes; either way checked against the
    tensors (types, ranges, and every field the shapes tell) before anything is built, so the work is bounded by the
    file's tensors whatever its metadata claims."""
    _, config_class, infer = _model_api(kind)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    stored = raw.config_dict
    not_in_tensors = _NOT_IN_TENSORS[kind]
    if stored is not None:  # first what the tensors cannot check, then compare the rest with the tensors
        _check_config_values(raw, kind, {k: v for k, v in stored.items() if k in not_in_tensors
                                         or k not in {f.name for f in dataclasses.fields(config_class)}}, "metadata")
    _check_config_values(raw, kind, overrides, "argument")
    _check_inference_tensors(raw, kind)
    if stored is not None:
        defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
        _check_config_fits_tensors(raw, kind, {**defaults, **stored, **overrides}, stored, overrides)
        _check_config_values(raw, kind, stored, "metadata")
    try:
        if stored is not None:
            config = config_class.from_dict({**stored, **overrides})
        else:
            known = _known(raw.path)
            if known is not None:
                overrides = {**dict(known.overrides), **overrides}
            config = infer(raw.tensors, **overrides)
    except CheckpointError:
        raise
    except _CONFIG_ERRORS as error:
        where = f"its '{META_CONFIG}' metadata" if stored is not None else "its tensors"
        named = [f.name for f in dataclasses.fields(config_class) if re.search(rf"\b{f.name}\b", str(error))]
        raise CheckpointError(
            f"{raw.path}: cannot read the config of {KINDS[kind].description} from {where}: {_sentence(error)}. "
            + ("The metadata is damaged or was edited by hand: use an intact copy of the file." if stored is not None
               else "The file is damaged or not a GRN model."),
            path=raw.path, key=META_CONFIG if stored is not None else None,
            field=named[0] if named else None) from error
    _check_config_values(raw, kind, config.to_dict(), "tensors" if stored is None else "metadata")
    _check_config_fits_tensors(raw, kind, config, stored, overrides)
    return config


def _check_keys(raw: RawCheckpoint, kind: str, model: nn.Module) -> None:
    """Compare file and network key by key and shape by shape, so a mismatch is reported before any weight moves."""
    expected = model.state_dict()
    _check_dtypes(raw, expected)
    problems, first = fit_problems({k: tuple(v.shape) for k, v in expected.items()}, raw.tensors)
    if problems:
        raise CheckpointError(
            f"{raw.path}: the tensors do not fit {KINDS[kind].description} with the inferred config: "
            f"{'; '.join(problems)}. The file may be damaged, or a different model version.", path=raw.path,
            key=first
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_dtypes(raw: RawCheckpoint, expected: Mapping[str, torch.Tensor]) -> None:
    """Every weight the network takes as floating point is a dense floating-point tensor in the file."""
    for name, want in expected.items():
        have = raw.tensors.get(name)
        if have is None:
            continue
        if isinstance(have, GGUFWeight):  # quantised blocks decode to floats
            if not want.is_floating_point():
                raise CheckpointError(
                    f"{raw.path}: tensor '{name}' is stored quantised ({have.qtype}), but the network keeps it as "
                    f"{_dtype_name(want.dtype)}. The file is damaged or was written by another tool: make it again "
                    "with `python -m grn_core convert ORIGINAL OUT.gguf --dtype q8_0`.",
                    path=raw.path, key=name, value=have.qtype)
            continue
        if have.layout != torch.strided or getattr(have, "is_quantized", False):
            raise CheckpointError(
                f"{raw.path}: tensor '{name}' is stored as a {str(have.layout).replace('torch.', '')}"
                f"{' quantized' if have.is_quantized else ''} tensor; GRN networks take dense weights. The file "
                "is damaged or was written by another tool: use the official file or a .safetensors export of it.",
                path=raw.path, key=name, value=str(have.layout))
        if want.is_floating_point() and not have.is_floating_point():
            raise CheckpointError(
                f"{raw.path}: tensor '{name}' is stored as {_dtype_name(have.dtype)}, but it is a weight of "
                f"floating-point type {_dtype_name(want.dtype)} (files may hold float32, float16, bfloat16, float64 "
                "or fp8). The file is damaged or was written by another tool: use an intact copy of the file.",
                path=raw.path, key=name, value=_dtype_name(have.dtype))
        if not want.is_floating_point() and (have.is_floating_point() or have.is_complex()):
            raise CheckpointError(
                f"{raw.path}: tensor '{name}' is stored as {_dtype_name(have.dtype)}, but the network keeps it as "
                f"{_dtype_name(want.dtype)}. The file is damaged: use an intact copy of the file.",
                path=raw.path, key=name, value=_dtype_name(have.dtype))


def _materialise(raw: RawCheckpoint, kind: str, config: Any, dtype: torch.dtype | None, device: Any,
                 compute_dtype: torch.dtype | None = None, stay_on_cpu: bool = False) -> nn.Module:
    """Build the network on the meta device, assign the file's tensors, cast them (on the CPU), then move to ``device``.

    ``stay_on_cpu``: leave the weights on the CPU (the caller places them, e.g. with block offload).
    """
    model_class, _, _ = _model_api(kind)
    quantised = _quantised_types(raw)
    compute = parse_dtype(compute_dtype)
    file_dtype = dominant_dtype(raw.tensors)
    if quantised:
        dtype = _gguf_compute_dtype(raw, quantised, dtype, compute)
        compute, file_dtype = None, torch.float32  # the blocks decode to float32: the CPU default computes in it
    precision = resolve_precision(dtype, device, file_dtype, compute)
    # Build on the meta device: an 8B network is never initialised randomly just to be overwritten.
    with torch.device("meta"):
        model = model_class(config)
    _check_keys(raw, kind, model)
    state = {k: raw.tensors[k] for k in model.state_dict()}
    check_finite(raw.path, state)  # NaN/Inf weights would give wrong output silently
    if quantised:
        _check_gguf_finite(raw, state)
        # Quantised Linears become GGUFLinear (blocks kept, decoded per call in the compute dtype); the rest loads.
        apply_gguf_weights(model, state, compute_dtype=precision.compute, path=raw.path)
    else:
        model.load_state_dict(state, strict=True, assign=True)
    still_meta = [name for name, t in model.named_buffers() if t.is_meta]
    if still_meta:
        # Non-persistent buffers (tables computed in __init__) are not in the file: rebuild them for real.
        fresh = model_class(config)
        for name in still_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            owner._buffers[attr] = fresh.get_buffer(name)
        del fresh
    cast_network(model, precision)  # GGUFLinear keeps its blocks: only its bias takes the compute dtype
    wider = (torch.float32, torch.float64, torch.bfloat16)
    if precision.storage == torch.float16 and any(isinstance(t, GGUFWeight) or t.dtype in wider
                                                  for t in state.values()):
        _check_cast_overflow(raw, model, "float16")
    if not stay_on_cpu:
        model.to(device=device)
    model.eval()
    return model


def _gguf_compute_dtype(raw: RawCheckpoint, quantised: Mapping[str, int], dtype: torch.dtype | None,
                        compute: torch.dtype | None) -> torch.dtype | None:
    """The ``dtype`` a quantised GGUF file loads with: the compute dtype of its GGUF layers and the dtype of its
    unquantised weights (``compute_dtype``, when given, must agree or stand alone); fp8 is refused."""
    types = ", ".join(f"{name} ×{count}" for name, count in quantised.items())
    if dtype is not None and dtype in FP8_DTYPES:
        raise CheckpointError(
            f"{raw.path}: a GGUF file whose weights are quantised already ({types}); they cannot be stored as "
            f"{_dtype_name(dtype)} too. Load it with dtype default, bf16, fp16 or fp32 (the dtype its layers compute "
            "in; the weights stay quantised), or for fp8 weights convert the original float file instead: "
            f"`python -m grn_core convert ORIGINAL OUT.safetensors --dtype {_fp8_name(dtype)}`.",
            path=raw.path, value=_dtype_name(dtype))
    if compute is not None:
        if dtype is not None and dtype != compute:
            raise ValueError(
                f"{raw.path}: for a GGUF file dtype is the compute dtype (the weights stay quantised); dtype "
                f"{_dtype_name(dtype)} and compute_dtype {_dtype_name(compute)} disagree. Give one of them.")
        dtype = compute
    return dtype


def _fp8_name(dtype: torch.dtype) -> str:
    return _dtype_name(dtype).replace("float8_", "fp8_")


def _check_gguf_finite(raw: RawCheckpoint, state: Mapping[str, Any]) -> None:
    """Quantised blocks whose f16 scale is NaN/Inf decode to NaN/Inf: refused like NaN weights of float files."""
    for name, value in state.items():
        if isinstance(value, GGUFWeight):
            bad = nonfinite_blocks(value)
            if bad:
                blocks = value.data.shape[0] * value.data.shape[1] // value.type.nbytes
                raise CheckpointError(
                    f"{raw.path}: tensor '{name}' ({value.qtype}, shape {tuple(value.shape)}) has {bad} block(s) of "
                    f"{blocks} whose scale is NaN/Inf, so its weights decode to NaN/Inf. The weights are damaged (a "
                    "broken download or conversion) and would give wrong output: use another copy of the file.",
                    path=raw.path, key=name, value=bad)


def _check_cast_overflow(raw: RawCheckpoint, model: nn.Module, target: str) -> None:
    """A weight finite in the file but beyond the range of the storage dtype (65504 for float16) becomes Inf."""
    for name, tensor in state_tensors(model):  # GGUF layers decoded one at a time
        try:
            check_finite(raw.path, [(name, tensor)])
        except CheckpointError as error:
            source = raw.tensors.get(name)
            largest = float("nan") if source is None else float(dequantize(source).abs().max())
            raise CheckpointError(
                f"{raw.path}: tensor '{name}' holds values beyond the range of {target} (largest magnitude in the "
                f"file: {largest:g}); stored as {target} they become Inf. Load it with dtype='bf16' or 'fp32' "
                "instead.", path=raw.path, key=name, value=target) from error


def _layout_for(raw: RawCheckpoint, layout: str | None) -> str:
    if layout not in (None, "auto"):
        if layout not in ("joint", "prefix"):
            raise ValueError(f"layout '{layout}' is not one of: auto, joint, prefix.")
        return layout
    if raw.metadata.get(META_LAYOUT):
        stored = raw.metadata[META_LAYOUT]
        if stored not in LAYOUTS:
            raise CheckpointError(
                f"{raw.path}: its '{META_LAYOUT}' metadata says {stored[:40]!r}; valid layouts: "
                f"{', '.join(LAYOUTS)}. The metadata is damaged or was edited by hand: pass layout='joint' or "
                "'prefix' explicitly, or use an intact copy of the file.", path=raw.path, key=META_LAYOUT,
                value=stored)
        return stored
    known = _known(raw.path)
    if known is not None and known.layout:
        return known.layout
    log.warning(
        "%s: attention layout not recorded in the file; assuming 'joint' (all current releases). "
        "Pass layout='prefix' for the first MGenAI T2I/T2V files.", raw.path,
    )
    return "joint"


_KIND_TASKS: dict[str, tuple[str, ...]] = {"refiner": BIT_TASKS, "c2i": ("c2i",)}


def tasks_of(raw: RawCheckpoint, kind: str) -> tuple[str, ...]:
    """The tasks a file's network does: from its ``grn.tasks`` metadata (checked against the valid tasks of its
    kind), its release name, or its kind."""
    if raw.metadata.get(META_TASKS):
        stored = raw.metadata[META_TASKS]
        tasks = tuple(t for t in stored.split(",") if t)
        valid = _KIND_TASKS.get(kind, TASKS)
        bad = [t for t in tasks if t not in valid]
        if bad or not tasks:
            raise CheckpointError(
                f"{raw.path}: its '{META_TASKS}' metadata says {stored[:60]!r}; valid tasks for "
                f"{KINDS[kind].description if kind in KINDS else kind} are: {', '.join(valid)} (comma-separated). "
                "The metadata is damaged or was edited by hand: use an intact copy of the file, or re-create it "
                "with `python -m grn_core convert`.", path=raw.path, key=META_TASKS, value=stored)
        return tasks
    known = _known(raw.path)
    if known is not None and known.tasks:
        return known.tasks
    return {"c2i": ("c2i",)}.get(kind, ())


def load_tokenizer(path: str | Path, dtype: str | torch.dtype | None = None, device: Any = "cpu",
                   keep_on_cpu: bool = False) -> nn.Module:
    """Load an HBQ tokenizer (weights under ``'ema'`` if present, else ``'vae'``, or flat/safetensors).

    Its convolutions have no fp8 path: an fp8 ``dtype`` (or file) gives bf16 weights. ``keep_on_cpu``: cast for
    ``device`` but leave the weights on the CPU (the caller moves them per stage) — the same for every loader.
    """
    raw, kind = _read_expecting(path, "tokenizer")
    config = _resolve_config(raw, kind, {})
    return _materialise(raw, kind, config, parse_dtype(dtype), device, stay_on_cpu=keep_on_cpu)


def load_refiner(
    path: str | Path,
    layout: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: Any = "cpu",
    compute_dtype: str | torch.dtype | None = None,
    attention: str = "auto",
    offload_blocks: int = 0,
    prefetch: int = 1,
    keep_on_cpu: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Load a T2I/T2V/I2V refiner.

    Args:
        layout: ``joint``/``prefix``; overrides what the file or its name says.
        dtype: weight storage: ``None`` (file dtype on CPU, bf16 on GPUs), ``bf16``, ``fp16``, ``fp32``, ``fp64``,
            ``fp8_e4m3fn``, ``fp8_e5m2`` (or torch dtypes). Half and fp8 storage keep the norms and the head in
            float32 (see :mod:`grn_core.runtime.precision`).
        compute_dtype: matmul dtype of fp8 storage (default bf16).
        attention: ``auto`` / ``sdpa`` / ``flash`` / ``sage`` (see :mod:`grn_core.runtime.attention`).
        offload_blocks: how many of the transformer blocks stay on the CPU and are streamed to ``device`` for each
            use, ``prefetch`` blocks ahead (0: all on the device; see :mod:`grn_core.runtime.offload`).
        keep_on_cpu: cast for ``device`` but leave every weight on the CPU (the caller moves the model per stage).
    """
    raw, kind = _read_expecting(path, "refiner")
    config = _resolve_config(raw, kind, {"layout": _layout_for(raw, layout), **overrides})
    model = _materialise(raw, kind, config, parse_dtype(dtype), device, compute_dtype,
                         stay_on_cpu=keep_on_cpu or bool(offload_blocks))
    model.set_attention(attention)
    if offload_blocks:
        model.enable_block_offload(offload_blocks, device="cpu" if keep_on_cpu else device, prefetch=prefetch)
    return model


def load_c2i(
    path: str | Path,
    in_context_start: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: Any = "cpu",
    compute_dtype: str | torch.dtype | None = None,
    keep_on_cpu: bool = False,
) -> nn.Module:
    """Load a class-to-image GRN_ind model (``model_ema1`` of the official file)."""
    raw, kind = _read_expecting(path, "c2i")
    config = _resolve_config(raw, kind, {"in_context_start": in_context_start})
    return _materialise(raw, kind, config, parse_dtype(dtype), device, compute_dtype, stay_on_cpu=keep_on_cpu)


def load_umt5(path: str | Path, dtype: str | torch.dtype | None = None, device: Any = "cpu",
              compute_dtype: str | torch.dtype | None = None, keep_on_cpu: bool = False) -> nn.Module:
    """Load the umt5-xxl encoder from Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` layout (or a converted file).

    ``dtype="fp8_e4m3fn"`` stores its 24 blocks' Linears in fp8 (11.4 GB of bf16 weights become about 6.7 GB: the
    1B-parameter token embedding stays bf16).
    """
    raw, kind = _read_expecting(path, "umt5")
    config = _resolve_config(raw, kind, {})
    return _materialise(raw, kind, config, parse_dtype(dtype), device, compute_dtype, stay_on_cpu=keep_on_cpu)


def inspect_checkpoint(path: str | Path, layout: str | None = None) -> CheckpointInfo:
    """Kind, layout, tasks and config of a file, without building its network (of a GGUF file, its header alone
    is read)."""
    raw = read_weights(path, _CONTAINERS, load_data=False)
    kind = _kind_of(raw)
    if _is_gguf(raw):
        _refuse_gguf_kind(raw.path, kind)
    resolved_layout = _layout_for(raw, layout) if kind == "refiner" else None
    extra = {"layout": resolved_layout} if kind == "refiner" else {}
    return CheckpointInfo(raw.path, kind, resolved_layout, tasks_of(raw, kind), _resolve_config(raw, kind, extra))


def checkpoint_metadata(kind: str, config: Any, layout: str | None = None, tasks: tuple[str, ...] = (),
                        source: str = "") -> dict[str, str]:
    """The string metadata our safetensors files carry so that they load with no flags."""
    meta = {META_FORMAT: FORMAT_VERSION, META_KIND: kind, META_CONFIG: json.dumps(config.to_dict(), sort_keys=True)}
    if layout:
        meta[META_LAYOUT] = layout
    if tasks:
        meta[META_TASKS] = ",".join(tasks)
    if source:
        meta[META_SOURCE] = source
    return meta


def save_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str],
) -> Path:
    """Write tensors + metadata as one safetensors file (contiguous CPU copies; shared storage is split).

    The file is written next to ``path`` under a temporary name and renamed into place only once complete: a failure
    (full disk, a bad tensor, an interrupt) leaves any previous file at ``path`` untouched and no partial file behind.
    A folder, or a place that cannot be written, is a :class:`CheckpointError` naming it.
    """
    import os
    import tempfile

    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: this is a folder; give the output a file name, e.g. {path / 'model.safetensors'}.", path=path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(handle)
    except OSError as error:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else (error.strerror or str(error))
        raise CheckpointError(f"{path}: cannot write here ({why}). Pick a folder you can write to.",
                              path=path) from error
    temp = Path(temp_name)
    try:
        flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(flat, str(temp), metadata=dict(metadata))
        if path.exists():  # keep the old file's permission bits; mkstemp creates 0600
            os.chmod(temp, path.stat().st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, path)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointError(
                f"{path}: writing the file failed ({error.strerror or error}); nothing was changed there. Check the "
                "free space and permissions.", path=path) from error
        if type(error).__name__ == "SafetensorError":
            raise CheckpointError(f"{path}: writing the file failed ({error}); nothing was changed there.",
                                  path=path) from error
        raise
    return path
