"""Reading checkpoint files safely: safetensors, and torch pickles only through ``weights_only=True``.

This module knows about files and containers (nesting such as ``['trainer']['gpt_fsdp']`` or ``'ema'``), not about
models; :mod:`grn_core.checkpoints` turns the flat state dicts it returns into networks.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import logging
import pickle
import pickletools
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

log = logging.getLogger(__name__)

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
    """A checkpoint file that cannot be used for what was asked; the message names the file and the fix.

    Structured fields, for callers and tests that should not parse prose: ``path`` (the file, when known), ``key``
    (the tensor name or metadata key at fault, e.g. ``'grn.config'``), ``field`` (a config field inside that
    metadata, e.g. ``'depth'``) and ``value`` (the offending value).
    """

    def __init__(self, message: str, *, path: str | Path | None = None, key: str | None = None,
                 field: str | None = None, value: Any = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.key = key
        self.field = field
        self.value = value


@dataclass
class RawCheckpoint:
    """Everything read from one file: the flat tensor dict and the string metadata (empty for pickles)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    container: str = ""  # where inside the file the tensors were found, e.g. "['trainer']['gpt_fsdp']"

    @property
    def config_dict(self) -> dict | None:
        """The ``grn.config`` metadata as a dict (None when absent); CheckpointError when it is no JSON object."""
        return metadata_json(self.path, self.metadata, META_CONFIG, dict)


def metadata_json(path: Path, metadata: Mapping[str, str], key: str, expected: type | tuple[type, ...] = dict,
                  required: bool = False) -> Any:
    """Parse one JSON-valued metadata entry of ``path``; a CheckpointError naming the file and key when it is
    missing (only if ``required``), not JSON, or not of the ``expected`` JSON type. None when absent and optional."""
    text = metadata.get(key)
    if text is None or text == "":
        if required:
            raise CheckpointError(
                f"{path}: the '{key}' metadata entry is missing. The file is incomplete or was re-saved without "
                "its metadata: use an intact copy of the file.", path=path, key=key)
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise CheckpointError(
            f"{path}: the '{key}' metadata is not valid JSON ({error}; it starts {text[:60]!r}). The metadata is "
            "damaged or was edited by hand: use an intact copy of the file, or re-create it with "
            "`python -m grn_core convert`.", path=path, key=key, value=text[:200]) from error
    if not isinstance(value, expected):
        json_names = {"dict": "JSON object", "list": "JSON array", "str": "string", "NoneType": "null",
                      "int": "number", "float": "number", "bool": "true/false"}
        names = " or ".join(json_names.get(t.__name__, t.__name__)
                            for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise CheckpointError(
            f"{path}: the '{key}' metadata must be a {names}, got {json_names.get(type(value).__name__, 'value')} "
            f"{text[:60]!r}. The metadata "
            "is damaged or was edited by hand: use an intact copy of the file.", path=path, key=key, value=value)
    return value


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


# ---- what a file is, from its first bytes (never from its name) -------------------------------------------------

_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers too
_TEXT_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
                    "STRING"}


def sniff_format(path: Path) -> str:
    """``'safetensors'``, ``'zip'`` (a torch zip checkpoint) or ``'pickle'`` (a legacy torch checkpoint), judged by
    the file's first bytes; a CheckpointError saying what the file really is when it is none of them."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError as error:
        raise CheckpointError(f"{path}: the file cannot be read ({error.strerror or error}). Check its permissions.",
                              path=path) from error
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes): the download or copy did not finish. "
                              "Download it again.", path=path)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = struct.unpack("<Q", head[:8])[0]
        if header_len > _SAFETENSORS_MAX_HEADER or header_len < 2:
            raise CheckpointError(
                f"{path}: a damaged safetensors file: its header-length field says {header_len} bytes, which no "
                "safetensors file has. Download it again.", path=path)
        return "safetensors"
    raise CheckpointError(f"{path}: not a PyTorch checkpoint or safetensors file: {_describe_bytes(head, size)}",
                          path=path, value=head[:16])


def _describe_bytes(head: bytes, size: int) -> str:
    text = head.lstrip().lower()
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head) >= 0.9 * len(head)
    if not printable:
        text = b""
    if text.startswith(b"version https://git-lfs"):
        return ("it is a Git LFS pointer (a small text file standing in for the weights), not the weights. Fetch the "
                "real file with `git lfs pull`, or download it directly.")
    if text.startswith((b"<!doctype", b"<html", b"<?xml")) or (text[:1] == b"<" and text[1:2].isalpha()):
        return ("it is an HTML/XML page (an error or login page saved instead of the weights?), not weights. "
                "Download the file again.")
    if text.startswith((b"{", b"[")):
        return ("it is JSON text (a config or an index file?), not weights. Point to the weights file itself "
                "(.safetensors, .pth, .pt or .ckpt).")
    if head.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed: decompress it first."
    if head.startswith(b"GGUF"):
        return "it is a GGUF file (a quantised format with its own reader): give it a .gguf name."
    if head.startswith(b"\x93NUMPY"):
        return "it is a NumPy .npy array, not a checkpoint."
    if head.startswith(b"\x89HDF"):
        return "it is an HDF5 (.h5) file, not a PyTorch checkpoint."
    return (f"it starts with bytes {head[:16]!r} ({size} bytes in all), which match no known weights format. "
            "The file is damaged or something else: download it again (GRN reads .safetensors files and torch "
            ".pth/.pt/.ckpt checkpoints).")


# ---- torch pickles ----------------------------------------------------------------------------------------------


def _pickle_globals(path: Path, limit: int = 64 << 20) -> list[str]:
    """The ``module.name`` globals a legacy (non-zip) pickle file refers to, read with :mod:`pickletools` — which
    only parses opcodes and never runs anything. Legacy torch files are a few pickles in a row; the first four are
    scanned."""
    names: list[str] = []
    try:
        with open(path, "rb") as handle:
            for _ in range(4):
                strings: list[str] = []
                memo: dict[int, Any] = {}
                last: Any = None
                for op, arg, _pos in pickletools.genops(handle):
                    pushed = None
                    if op.name == "GLOBAL" and isinstance(arg, str):
                        names.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    elif op.name in _TEXT_STRING_OPS and isinstance(arg, (str, bytes)):
                        pushed = arg.decode("latin-1") if isinstance(arg, bytes) else arg
                    elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                        memo[arg] = last
                    elif op.name == "MEMOIZE":
                        memo[len(memo)] = last
                    elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(arg), str):
                        pushed = memo[arg]
                    if pushed is not None:
                        strings.append(pushed)
                    if op.name not in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                        last = pushed
                    if handle.tell() > limit:
                        return list(dict.fromkeys(names))
    except Exception:  # noqa: BLE001 - the end of the pickles, or garbage: what was found so far is the answer
        pass
    return list(dict.fromkeys(names))


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    for marker in ("Unsupported", "Trying to load", "unexpected EOF", "PytorchStreamReader"):
        at = text.find(marker)
        if at > 0:
            text = text[at:]
            break
    return text[:limit] + ("…" if len(text) > limit else "")


def _torch_load(path: Path, fmt: str = "") -> Any:
    """``torch.load(weights_only=True)``, widened only to the benign globals above when the file needs them."""
    zipped = (fmt or sniff_format(path)) == "zip"

    def load() -> Any:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:  # torch.load would go by the name: hand it the bytes
            with open(path, "rb") as handle:
                return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)

    try:
        return load()
    except pickle.UnpicklingError as first_error:
        needed: list[str] = []
        if zipped:
            try:
                needed = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
            except Exception:  # noqa: BLE001 - unreadable archive: nothing more can be said safely
                needed = []
        else:
            needed = [name for name in _pickle_globals(path)
                      if not name.startswith("torch.") and name not in ("collections.OrderedDict", "_codecs.encode")]
        benign = _benign_globals()
        refused = [name for name in needed if name not in benign]
        if refused:
            raise CheckpointError(
                f"{path}: the file holds Python objects other than tensors ({', '.join(refused[:8])}); it is refused "
                "because checkpoints are only unpickled with weights_only=True, which never runs code from a file. "
                "Use the official weights file, or a .safetensors export of it.", path=path, value=refused
            ) from first_error
        if not needed:
            raise CheckpointError(
                f"{path}: the file is damaged or truncated, or a pickle of something other than model weights: "
                f"torch's weights-only reader stopped with \"{_first_line(first_error)}\". Download it again, or use "
                "a .safetensors export of it.", path=path
            ) from first_error
        with torch.serialization.safe_globals([benign[name] for name in needed]):
            return load()


# ---- safetensors ------------------------------------------------------------------------------------------------


def _check_safetensors_header(path: Path) -> None:
    """Find truncation and header damage before the safetensors library does, to say which it is."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        if 8 + header_len > size:
            raise CheckpointError(
                f"{path}: the safetensors file is truncated: its header alone should be {header_len} bytes but the "
                f"file has {size} bytes. The download or copy was cut off: download it again.", path=path)
        raw_header = handle.read(header_len)
    try:
        header = json.loads(raw_header)
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{path}: the safetensors header is damaged (not valid JSON: {error}). Download the "
                              "file again.", path=path) from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is damaged (not a JSON object). Download the file "
                              "again.", path=path)
    end = 0
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) and name != "__metadata__" else None
        if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
            end = max(end, offsets[1])
    expected = 8 + header_len + end
    if expected > size:
        raise CheckpointError(
            f"{path}: the safetensors file is truncated: its header describes {expected} bytes but the file has "
            f"{size} ({100 * size / expected:.1f}%). The download or copy was cut off: download it again.", path=path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    _check_safetensors_header(path)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
        return tensors, metadata
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({_first_line(error)}). The file is damaged, truncated or "
            "still downloading: download it again.", path=path
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
    missing, unknown suffix, not a weights file at all, truncated/corrupt, a pickle holding code, or no tensors
    inside. The format is judged from the content, so a safetensors file named ``.pth`` (or the reverse) still
    loads, with a warning to rename it.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: this is a folder, not a model file. Pick the weights file inside it.",
                              path=path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file. Put the model file there or pick another one.", path=path)
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unsupported file type '{suffix}'. GRN weights are .safetensors, .pth, .pt or .ckpt files.",
            path=path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        if suffix not in SAFETENSORS_SUFFIXES:
            log.warning("%s is a safetensors file with a %s name; it is read as safetensors. Rename it to "
                        ".safetensors.", path, suffix)
        tensors, metadata = _read_safetensors(path)
        if not tensors:
            raise CheckpointError(f"{path}: the safetensors file holds no tensors.", path=path)
        return RawCheckpoint(path, tensors, metadata)
    if suffix in SAFETENSORS_SUFFIXES:
        log.warning("%s is a torch checkpoint with a %s name; it is read as one (weights_only=True, no code from the "
                    "file runs). Rename it to .pth.", path, suffix)
    try:
        obj = _torch_load(path, fmt)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a damaged file makes torch raise, the answer is the same
        raise CheckpointError(
            f"{path}: the file is truncated or corrupt ({path.stat().st_size} bytes): it could not be read as a "
            f"torch checkpoint ({_first_line(error)}). Download it again.", path=path
        ) from error
    found, where = _find_tensor_dict(obj, preferred)
    if found is None:
        keys = list(obj.keys())[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: no state dict of tensors found in the file (top level: {keys}).", path=path)
    return RawCheckpoint(path, _strip_wrapper_prefixes(found), {}, where)


# ---- finiteness -------------------------------------------------------------------------------------------------

# 8-bit floats have no aminmax kernel, but their NaN/Inf bytes sit at the top of the signed or unsigned byte range,
# so two byte reductions (no temporary) find them: (smallest bad positive byte as int8 or None, smallest bad
# negative byte as uint8 or None, a bad byte as int8 found by its minimum or None).
_FP8_BAD_BYTES: dict[str, tuple[int | None, int | None, int | None]] = {
    "float8_e4m3fn": (0x7F, 0xFF, None),    # S.1111.111 is NaN; no infinities
    "float8_e5m2": (0x7C, 0xFC, None),      # exponent 11111: Inf (mantissa 0) or NaN
    "float8_e4m3fnuz": (None, None, -128),  # 0x80 (negative zero's pattern) is the only NaN
    "float8_e5m2fnuz": (None, None, -128),
    "float8_e8m0fnu": (None, 0xFF, None),   # 0xFF is NaN
}
_CHUNK = 1 << 24
_SERIAL = 32000  # elements per serial piece (torch reduces serially below its grain size of 32768)
_SMALL = 1 << 20  # tensors up to this size are checked in serial pieces, larger ones in one parallel reduction


def _pieces(flat: torch.Tensor) -> Iterable[torch.Tensor]:
    if flat.numel() <= _SMALL:
        # Serial pieces: below torch's parallel grain size no worker threads are woken, which on a busy machine
        # costs far more than the reduction itself (12 ms instead of 15 us for 64k floats on 2 shared cores).
        return flat.reshape(-1).split(_SERIAL)
    return (flat,)


def fit_problems(expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """How ``tensors`` fail to fit the keys and shapes ``expected`` — phrases for an error message (missing,
    unexpected, other shapes; empty when they fit) — and the first key at fault (None when they fit)."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [k for k, shape in expected.items() if k in tensors and tuple(tensors[k].shape) != tuple(shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
    if wrong:
        shown = "; ".join(f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k])}" for k in wrong[:3])
        problems.append(f"{len(wrong)} with other shapes (e.g. {shown})")
    first = (missing or unexpected or wrong or [None])[0]
    return problems, first


def is_finite_tensor(t: torch.Tensor) -> bool:
    """True when a tensor holds no NaN/Inf (integer tensors always do).

    One read of the data and no full-size temporary: ``aminmax`` propagates NaN and shows Inf in the min or the max;
    8-bit floats are checked on their raw bytes (see ``_FP8_BAD_BYTES``). About 10 GB/s on one desktop core pair,
    against well under 1 GB/s for ``torch.isfinite(t).all()``.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    name = str(t.dtype).replace("torch.", "")
    if name in _FP8_BAD_BYTES:
        positive, negative, lowest = _FP8_BAD_BYTES[name]
        for piece in _pieces(t.reshape(-1).view(torch.uint8)):
            signed = piece.view(torch.int8)
            if positive is not None and int(signed.amax()) >= positive:
                return False
            if negative is not None and int(piece.amax()) >= negative:
                return False
            if lowest is not None and int(signed.amin()) <= lowest:
                return False
        return True
    if t.element_size() < 2:  # another 8-bit float: upcast in chunks
        return all(bool(torch.isfinite(c.float()).all()) for c in t.reshape(-1).split(_CHUNK))
    if t.numel() <= _SERIAL:  # one serial pass either way; this is the fewest calls
        return bool(torch.isfinite(t).all())
    bounds = [bound for piece in _pieces(t) for bound in torch.aminmax(piece)]
    return bool(torch.isfinite(torch.stack(bounds)).all())


def check_finite(path: str | Path, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
    """CheckpointError naming ``path`` and the first tensor holding NaN or Inf values."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, tensor in items:
        if not is_finite_tensor(tensor):
            bad = int((~torch.isfinite(tensor.float())).sum())
            raise CheckpointError(
                f"{path}: tensor '{name}' ({str(tensor.dtype).replace('torch.', '')}, shape {tuple(tensor.shape)}) "
                f"holds {bad} NaN/Inf value(s) of {tensor.numel()}. The weights are damaged (a diverged training "
                "run, or a broken download or conversion) and would give wrong output: use another copy of the "
                "file.", path=path, key=name, value=bad)
