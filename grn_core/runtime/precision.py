"""Weight storage and compute dtypes: how the loaders cast a network for inference.

Three storage families (``Precision.storage``):

- float32 / float64: everything in that dtype (CPU default for official fp32 files; float64 for golden tests);
- bf16 / fp16: every weight in that dtype — except, for networks that list them in ``FLOAT32_MODULES``, the norms and
  the modules named there (the refiner's ``head``), which stay float32 as in the official code (its head runs under a
  float32 autocast, its RMS norms in float32). They are tiny; the logits they produce feed the sampler's softmax;
- fp8 (e4m3fn / e5m2): the Linears of the repeated blocks are :class:`~grn_core.runtime.fp8.Fp8Linear` (8-bit weight,
  per-row scale, upcast per call); all other weights take the compute dtype (bf16 by default), with the same float32
  exceptions as above.

Never float32 weights on a GPU by default: with no dtype asked for, a float32 file loads as bf16 (fp16 on GPUs
without bf16) on any device but the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from ..nn import RMSNorm
from .fp8 import Fp8Linear, is_fp8, quantize_linears

__all__ = ["Precision", "cast_network", "default_half_dtype", "dominant_dtype", "resolve_precision"]

_HALF = (torch.bfloat16, torch.float16)
_FULL = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Precision:
    """``storage``: dtype of the big weight matrices; ``compute``: dtype of the matmuls and activations."""

    storage: torch.dtype
    compute: torch.dtype

    @property
    def is_fp8(self) -> bool:
        return is_fp8(self.storage)

    def describe(self) -> str:
        name = str(self.storage).replace("torch.", "")
        return name if self.storage == self.compute else f"{name} (compute {str(self.compute).replace('torch.', '')})"


def default_half_dtype(device: Any) -> torch.dtype:
    """bf16, or fp16 on CUDA devices without bf16 support (before Ampere)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        if torch.cuda.get_device_capability(index) < (8, 0):
            return torch.float16
    return torch.bfloat16


def dominant_dtype(tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> Optional[torch.dtype]:
    """The floating dtype holding the most elements (a file's storage dtype; fp8 files keep norms in 16 bits)."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    counts: dict[torch.dtype, int] = {}
    for t in values:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else None


def resolve_precision(
    requested: Optional[torch.dtype],
    device: Any,
    file_dtype: Optional[torch.dtype] = None,
    compute: Optional[torch.dtype] = None,
) -> Precision:
    """What to store and compute in, from the asked-for dtype (None: decide), the device and the file's dtype.

    ``compute`` only applies to fp8 storage (half and full storage compute in their own dtype); by default it is
    bf16 (fp16 on GPUs without bf16).
    """
    device = torch.device(device)
    if compute is not None and compute not in _HALF + _FULL:
        raise ValueError(f"compute_dtype {compute} is not a float type; use torch.bfloat16, float16 or float32.")
    storage = requested
    if storage is None:
        storage = file_dtype or torch.float32
        if storage in _FULL and device.type != "cpu":
            storage = default_half_dtype(device)  # never float32 weights on a GPU unless asked for
    if is_fp8(storage):
        return Precision(storage, compute or default_half_dtype(device))
    if storage not in _HALF + _FULL:
        raise ValueError(f"weight dtype {storage} is not supported; use bf16, fp16, fp32, fp64, fp8_e4m3fn or "
                         f"fp8_e5m2.")
    if compute is not None and compute != storage:
        raise ValueError(f"compute_dtype {compute} differs from the {storage} weights; a separate compute dtype "
                         f"only exists for fp8 storage (omit compute_dtype, or store in fp8).")
    return Precision(storage, storage)


def _float32_names(model: nn.Module) -> set[str]:
    """Qualified names of the modules a network keeps in float32 under half / fp8 storage (opt-in per class)."""
    keep = getattr(model, "FLOAT32_MODULES", None)
    if keep is None:
        return set()
    names = set(keep)
    names.update(name for name, module in model.named_modules() if isinstance(module, RMSNorm))
    return names


def _cast_own(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the module's own (non-recursive) float parameters and buffers."""
    for name, param in module._parameters.items():
        if param is not None and param.is_floating_point() and param.dtype != dtype:
            module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
    for name, buf in module._buffers.items():
        if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
            module._buffers[name] = buf.to(dtype)


def cast_network(model: nn.Module, precision: Precision) -> nn.Module:
    """Cast ``model`` in place (on its current device) to ``precision``; returns it, with gradients off."""
    keep = _float32_names(model) if precision.compute in _HALF else set()
    if precision.is_fp8:
        quantize_linears(model, precision.storage, precision.compute)
    kept_prefixes = tuple(name + "." for name in keep)
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            continue
        inside_kept = name in keep or name.startswith(kept_prefixes)
        _cast_own(module, torch.float32 if inside_kept else precision.compute)
    model.requires_grad_(False)
    return model
