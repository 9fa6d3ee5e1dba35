"""Attention kernels: exact scaled-dot-product attention, the fastest one available for the device and dtype.

Every backend computes ``softmax(q k^T / sqrt(D)) v`` without a mask, on tensors laid out as
``q [n, L, H, D]``, ``k, v [n, S, Hkv, D]`` (grouped-query: ``H`` a multiple of ``Hkv``) → ``[n, L, H, D]``:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. On CUDA PyTorch dispatches to its FlashAttention-2,
  memory-efficient or cuDNN kernel, on the CPU to its fused flash kernel; none materialises the L×S score matrix.
  Always available; the reference the others are tested against.
- ``flash``: the FlashAttention package — ``flash_attn_interface`` (FlashAttention-3, Hopper) when importable on an
  sm90 GPU, else ``flash_attn`` (FlashAttention-2). CUDA, fp16/bf16, compute capability ≥ 8.0, head_dim ≤ 256 and a
  multiple of 8. Exact (same maths as SDPA, another summation order); takes our ``[n, L, H, D]`` layout natively.
- ``sage``: SageAttention (``sageattention.sageattn``). CUDA, fp16/bf16. It quantises q·k to int8: fast, but an
  approximation — only used when asked for by name.

``auto`` picks ``flash`` when it is importable and usable for the call, else ``sdpa``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["ATTENTION_BACKENDS", "attend", "backend_status", "check_backend", "refresh_backends", "resolve_backend"]

ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "sage")
_HALF = (torch.float16, torch.bfloat16)
_INSTALL = {
    "flash": "pip install flash-attn --no-build-isolation (or flash_attn_interface from FlashAttention-3's hopper/)",
    "sage": "pip install sageattention",
}

# Import results are cached (a failed import would otherwise rescan sys.path on every call).
_modules: dict[str, Optional[Any]] = {}
_capabilities: dict[int, tuple[int, int]] = {}


def refresh_backends() -> None:
    """Forget cached imports and device capabilities (after installing a package, or in tests)."""
    _modules.clear()
    _capabilities.clear()


def _module(name: str) -> Optional[Any]:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(name)
        except Exception:  # ImportError, or a broken CUDA extension raising anything at import
            _modules[name] = None
    return _modules[name]


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capabilities:
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities[index]


def _flash_function(device: Optional[torch.device] = None) -> Optional[Callable]:
    """FlashAttention-3 on Hopper when installed, else FlashAttention-2, else None."""
    if device is not None and device.type == "cuda" and _capability(device)[0] == 9:
        fa3 = _module("flash_attn_interface")
        if fa3 is not None and hasattr(fa3, "flash_attn_func"):
            return fa3.flash_attn_func
    fa2 = _module("flash_attn")
    return getattr(fa2, "flash_attn_func", None) if fa2 is not None else None


def _sage_function() -> Optional[Callable]:
    sage = _module("sageattention")
    return getattr(sage, "sageattn", None) if sage is not None else None


def backend_status() -> dict[str, str]:
    """``{backend: "available" or why not}`` — importability only; device and dtype are checked per call."""
    status = {"sdpa": "available"}
    status["flash"] = "available" if (_module("flash_attn_interface") or _flash_function()) else (
        f"not installed ({_INSTALL['flash']})")
    status["sage"] = "available" if _sage_function() else f"not installed ({_INSTALL['sage']})"
    return status


def check_backend(name: str) -> str:
    """Validate a backend name (and, for an explicit choice, that its package imports); returns it lower-cased."""
    key = str(name).lower()
    if key not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(ATTENTION_BACKENDS)}.")
    if key in ("flash", "sage"):
        status = backend_status()[key]
        if status != "available":
            raise ValueError(f"attention backend {key!r} is {status}; or use attention='auto' / 'sdpa'.")
    return key


def _unusable(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why ``backend`` cannot run this call (None when it can)."""
    if backend == "sdpa":
        return None
    if device.type != "cuda":
        return f"it runs on CUDA GPUs only (the model is on {device.type})"
    if dtype not in _HALF:
        return f"it needs fp16/bf16 activations (the model computes in {str(dtype).replace('torch.', '')})"
    if backend == "flash":
        if _capability(device) < (8, 0):
            return f"it needs compute capability 8.0+ (this GPU is {'.'.join(map(str, _capability(device)))})"
        if head_dim > 256 or head_dim % 8:
            return f"head_dim {head_dim} is not a multiple of 8 up to 256"
        if _flash_function(device) is None:
            return f"it is not installed ({_INSTALL['flash']})"
    if backend == "sage" and _sage_function() is None:
        return f"it is not installed ({_INSTALL['sage']})"
    return None


def resolve_backend(name: str, device: Any, dtype: torch.dtype, head_dim: int) -> str:
    """The concrete backend for one call: ``auto`` → ``flash`` if usable, else ``sdpa``; an explicit choice that
    cannot run this call raises ``ValueError`` naming the reason and the alternative."""
    device = torch.device(device)
    key = str(name).lower()
    if key == "auto":
        return "flash" if _unusable("flash", device, dtype, head_dim) is None else "sdpa"
    if key not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(ATTENTION_BACKENDS)}.")
    reason = _unusable(key, device, dtype, head_dim)
    if reason is not None:
        raise ValueError(f"attention backend {key!r} cannot run here: {reason}. Use attention='auto' or 'sdpa'.")
    return key


def _repeat_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    """``[n, S, Hkv, D]`` -> ``[n, S, heads, D]``: query head h reads kv head ``h // (heads / Hkv)``."""
    rep = heads // k.shape[2]
    return k if rep == 1 else k.repeat_interleave(rep, dim=2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """``q [n, L, H, D]``, ``k, v [n, S, Hkv, D]`` -> ``[n, L, H, D]`` (softmax scale ``D ** -0.5``).

    ``backend`` is a concrete name (see :func:`resolve_backend`); the output may be a non-contiguous view.
    """
    heads = q.shape[2]
    if heads % k.shape[2]:
        raise ValueError(f"{heads} query heads are not a multiple of {k.shape[2]} key/value heads.")
    if backend == "sdpa":
        k, v = _repeat_kv(k, heads), _repeat_kv(v, heads)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "flash":
        fn = _flash_function(q.device)
        if fn is None:
            raise ValueError(f"attention backend 'flash' is not installed ({_INSTALL['flash']}).")
        out = fn(q, k, v, causal=False)  # grouped-query heads are native
        return out[0] if isinstance(out, tuple) else out  # some FlashAttention-3 builds also return the LSE
    if backend == "sage":
        fn = _sage_function()
        if fn is None:
            raise ValueError(f"attention backend 'sage' is not installed ({_INSTALL['sage']}).")
        return fn(q, _repeat_kv(k, heads), _repeat_kv(v, heads), tensor_layout="NHD", is_causal=False)
    raise ValueError(f"attention backend {backend!r} is not one of sdpa, flash, sage (resolve 'auto' first).")
