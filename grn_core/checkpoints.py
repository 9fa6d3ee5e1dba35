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
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .checkpoint_files import (
    FORMAT_VERSION,
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

from .releases import RELEASED_FILES
from .runtime.fp8 import FP8_DTYPES as _FP8_DTYPES
from .runtime.precision import cast_network, dominant_dtype, resolve_precision

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "KNOWN_FILES",
    "detect_kind",
    "inspect_checkpoint",
    "load_c2i",
    "load_refiner",
    "load_tokenizer",
    "load_umt5",
    "parse_dtype",
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


def _kind_of(raw: RawCheckpoint) -> str:
    kind = raw.metadata.get(META_KIND) or detect_kind(raw.tensors)
    if kind is None:
        sample = ", ".join(list(raw.tensors)[:5])
        raise CheckpointError(
            f"{raw.path}: not a GRN checkpoint — its tensors ({sample}, …) match no GRN tokenizer, refiner, "
            "class-to-image model or umt5 text encoder."
        )
    return kind


def _read_expecting(path: str | Path, expected: str) -> tuple[RawCheckpoint, str]:
    raw = read_checkpoint(path, KINDS[expected].preferred_containers)
    kind = _kind_of(raw)
    if kind != expected:
        spec = KINDS[expected]
        found = KINDS[kind].description if kind in KINDS else f"a '{kind}' file"
        raise CheckpointError(
            f"{raw.path}: this file is {found}, but {spec.description} was expected here. {spec.hint}"
        )
    return raw, kind


def _model_api(kind: str) -> tuple[type[nn.Module], Any, Any]:
    spec = KINDS[kind]
    module = importlib.import_module(spec.module)
    return getattr(module, spec.model_class), getattr(module, spec.config_class), getattr(module, spec.infer_config)


def _resolve_config(raw: RawCheckpoint, kind: str, overrides: dict[str, Any]) -> Any:
    _, config_class, infer = _model_api(kind)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        stored = raw.config_dict
        if stored is not None:
            return config_class.from_dict({**stored, **overrides})
        known = _known(raw.path)
        if known is not None:
            overrides = {**dict(known.overrides), **overrides}
        return infer(raw.tensors, **overrides)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{raw.path}: cannot read the {KINDS[kind].description} config: {error}") from error


def _check_keys(raw: RawCheckpoint, kind: str, model: nn.Module) -> None:
    """Compare file and network key by key and shape by shape, so a mismatch is reported before any weight moves."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in raw.tensors]
    unexpected = [k for k in raw.tensors if k not in expected]
    wrong_shape = [
        f"{k} {tuple(raw.tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in raw.tensors and tuple(raw.tensors[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with other shapes (e.g. {'; '.join(wrong_shape[:3])})")
    if problems:
        raise CheckpointError(
            f"{raw.path}: the tensors do not fit {KINDS[kind].description} with the inferred config: "
            f"{'; '.join(problems)}. The file may be damaged, or a different model version."
        )


def _materialise(raw: RawCheckpoint, kind: str, config: Any, dtype: torch.dtype | None, device: Any,
                 compute_dtype: torch.dtype | None = None, stay_on_cpu: bool = False) -> nn.Module:
    """Build the network on the meta device, assign the file's tensors, cast them (on the CPU), then move to ``device``.

    ``stay_on_cpu``: leave the weights on the CPU (the caller places them, e.g. with block offload).
    """
    model_class, _, _ = _model_api(kind)
    precision = resolve_precision(dtype, device, dominant_dtype(raw.tensors), parse_dtype(compute_dtype))
    # Build on the meta device: an 8B network is never initialised randomly just to be overwritten.
    with torch.device("meta"):
        model = model_class(config)
    _check_keys(raw, kind, model)
    state = {k: raw.tensors[k] for k in model.state_dict()}
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
    cast_network(model, precision)
    if not stay_on_cpu:
        model.to(device=device)
    model.eval()
    return model


def _layout_for(raw: RawCheckpoint, layout: str | None) -> str:
    if layout not in (None, "auto"):
        if layout not in ("joint", "prefix"):
            raise ValueError(f"layout '{layout}' is not one of: auto, joint, prefix.")
        return layout
    if raw.metadata.get(META_LAYOUT):
        return raw.metadata[META_LAYOUT]
    known = _known(raw.path)
    if known is not None and known.layout:
        return known.layout
    log.warning(
        "%s: attention layout not recorded in the file; assuming 'joint' (all current releases). "
        "Pass layout='prefix' for the first MGenAI T2I/T2V files.", raw.path,
    )
    return "joint"


def tasks_of(raw: RawCheckpoint, kind: str) -> tuple[str, ...]:
    if raw.metadata.get(META_TASKS):
        return tuple(t for t in raw.metadata[META_TASKS].split(",") if t)
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
    """Kind, layout, tasks and config of a file, without building its network."""
    raw = read_checkpoint(path, ("ema", "vae", "model_ema1", "model"))
    kind = _kind_of(raw)
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
    """Write tensors + metadata as one safetensors file (contiguous CPU copies; shared storage is split)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(flat, str(path), metadata=dict(metadata))
    return path
