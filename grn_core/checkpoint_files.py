"""Reading checkpoint files safely: safetensors, and torch pickles only through ``weights_only=True``.

This module knows about files and containers (nesting such as ``['trainer']['gpt_fsdp']`` or ``'ema'``), not about
models; :mod:`grn_core.checkpoints` turns the flat state dicts it returns into networks.
"""

from __future__ import annotations

import argparse
import collections
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")

# Metadata keys written by ``python -m grn_core.convert`` (and the tiny model): strings, as safetensors requires.
META_FORMAT = "grn.format"
META_KIND = "grn.kind"
META_CONFIG = "grn.config"
META_LAYOUT = "grn.layout"
META_TASKS = "grn.tasks"
META_SOURCE = "grn.source"
FORMAT_VERSION = "1"


KNOWN_CONTAINERS = ("ema", "vae", "model_ema1", "model", "state_dict", "module")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used for what was asked; the message names the file and the fix."""


@dataclass
class RawCheckpoint:
    """Everything read from one file: the flat tensor dict and the string metadata (empty for pickles)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    container: str = ""  # where inside the file the tensors were found, e.g. "['trainer']['gpt_fsdp']"

    @property
    def config_dict(self) -> dict | None:
        text = self.metadata.get(META_CONFIG)
        return json.loads(text) if text else None


# Globals that checkpoint writers commonly leave in an otherwise weights-only pickle (training arguments, numpy
# scalars for epoch counters). They carry no code; everything else is refused.
def _benign_globals() -> dict[str, Any]:
    found: dict[str, Any] = {
        "argparse.Namespace": argparse.Namespace,
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
    }
    try:
        import numpy as np

        found["numpy.dtype"] = np.dtype
        for module_name in ("numpy.core.multiarray", "numpy._core.multiarray"):
            try:
                module = __import__(module_name, fromlist=["scalar"])
                found[f"{module_name}.scalar"] = module.scalar
            except (ImportError, AttributeError):
                pass
        for dtype_class in {type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)}:
            found[f"{dtype_class.__module__}.{dtype_class.__name__}"] = dtype_class
    except ImportError:
        pass
    return found


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, widened only to the benign globals above when the file needs them."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as first_error:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a zip checkpoint: nothing more can be said safely
            needed = []
        benign = _benign_globals()
        refused = [name for name in needed if name not in benign]
        if refused or not needed:
            names = ", ".join(refused or needed) or "unknown objects"
            raise CheckpointError(
                f"{path}: the file holds Python objects other than tensors ({names}); it is refused because "
                "checkpoints are only unpickled with weights_only=True, which never runs code from a file. "
                "Use the official weights file, or a .safetensors export of it."
            ) from first_error
        with torch.serialization.safe_globals([benign[name] for name in needed]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
        return tensors, metadata
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({error}). The file may be truncated or still downloading: "
            "download it again."
        ) from error


def _find_tensor_dict(obj: Any, preferred: tuple[str, ...]) -> tuple[Mapping[str, torch.Tensor] | None, str]:
    """Locate the state dict inside a loaded pickle.

    Official files are flat dicts, ``{'trainer': {'gpt_fsdp': sd}}`` (T2I/T2V), ``{'ema': sd, 'vae': sd}`` (tokenizers,
    EMA first) or ``{'model': sd, 'model_ema1': sd, ...}`` (C2I, EMA 1 is what the official evaluation uses).
    """
    if _is_tensor_dict(obj):
        return obj, ""
    if not isinstance(obj, Mapping):
        return None, ""
    if isinstance(obj.get("trainer"), Mapping) and _is_tensor_dict(obj["trainer"].get("gpt_fsdp")):
        return obj["trainer"]["gpt_fsdp"], "['trainer']['gpt_fsdp']"
    # The expected kind's containers first, then every container any GRN file uses, so that a file of another kind
    # is still read far enough to say what it is.
    for key in preferred + KNOWN_CONTAINERS:
        if _is_tensor_dict(obj.get(key)):
            return obj[key], f"['{key}']"
    return None, ""


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)
    )


def _strip_wrapper_prefixes(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop prefixes that DDP/FSDP/torch.compile add in front of every key (``module.``, ``_orig_mod.``)."""
    out = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod.", "_fsdp_wrapped_module."):
        if out and all(key.startswith(prefix) for key in out):
            out = {key[len(prefix):]: value for key, value in out.items()}
    return out


def read_checkpoint(path: str | Path, preferred: tuple[str, ...] = ()) -> RawCheckpoint:
    """Read ``path`` into a flat tensor dict.

    ``preferred`` lists container keys to try first for nested pickles (``('ema', 'vae')`` for tokenizers,
    ``('model_ema1', 'model')`` for C2I). Raises :class:`CheckpointError` naming the file for anything unusable:
    missing, unknown suffix, truncated/corrupt, a pickle holding code, or no tensors inside.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file. Put the model file there or pick another one.")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        tensors, metadata = _read_safetensors(path)
        if not tensors:
            raise CheckpointError(f"{path}: the safetensors file holds no tensors.")
        return RawCheckpoint(path, tensors, metadata)
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unsupported file type '{suffix}'. GRN weights are .safetensors, .pth, .pt or .ckpt files."
        )
    try:
        obj = _torch_load(path)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as error:
        raise CheckpointError(
            f"{path}: the file could not be read as a torch checkpoint ({error}). It is probably truncated or "
            "corrupt: download it again."
        ) from error
    found, where = _find_tensor_dict(obj, preferred)
    if found is None:
        keys = list(obj.keys())[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: no state dict of tensors found in the file (top level: {keys}).")
    return RawCheckpoint(path, _strip_wrapper_prefixes(found), {}, where)
