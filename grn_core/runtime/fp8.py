"""fp8 weight storage: Linear layers that keep their weight matrix in 8 bits and upcast it for each call.

An fp8 weight takes half the memory of bf16 and crosses the PCIe bus in half the time (block offload), while the
matmul itself still runs in the model's compute dtype (bf16 on GPUs): the weight is upcast per call, so only one
layer's weight exists in 16 bits at any time.

Quantisation is per output row: ``W ≈ scale[o] * Q[o, :]`` with ``scale[o] = max_i |W[o, i]| / fp8_max`` — the
row's largest entry lands on the largest fp8 value, so small rows do not fall into fp8's subnormal range (for
e4m3fn, plain casting of typical weights of std 0.02 would leave about half of them subnormal). Weights that come
from an fp8 file are used as stored (no scale), since that is what the file's producer intended.

    quantize_linears(model, torch.float8_e4m3fn, compute_dtype=torch.bfloat16)   # repeated blocks only
    matmul_weight(layer)   # the weight in the dtype its matmul runs in, for code that calls F.linear itself

``state_dict()`` of an :class:`Fp8Linear` yields the dequantised weight in the compute dtype, so a saved dict loads
into the plain model; loading a float weight into an :class:`Fp8Linear` quantises it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FP8_DTYPES", "Fp8Linear", "ManualCastLinear", "is_compute_dtype", "is_fp8", "matmul_weight",
           "quantize_linears", "quantize_rows", "in_repeated_block"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def is_compute_dtype(dtype: torch.dtype) -> bool:
    """A float dtype a matmul can run in (fp8 is storage only)."""
    return dtype.is_floating_point and not is_fp8(dtype)


def quantize_rows(weight: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` (any float) -> ``(q [out, in] fp8, scale [out, 1] float32)``, ``weight ≈ q * scale``.

    All-zero rows get scale 1 (their quantised row is zero either way).
    """
    if not is_fp8(fp8_dtype):
        raise ValueError(f"fp8_dtype {fp8_dtype} is not an fp8 type; use torch.float8_e4m3fn or torch.float8_e5m2.")
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / torch.finfo(fp8_dtype).max, torch.ones_like(amax))
    q = (w / scale).to(fp8_dtype)
    return q, scale


class ManualCastLinear(nn.Linear):
    """What Linear layers with a compact weight storage share (:class:`Fp8Linear`,
    :class:`~grn_core.formats.GGUFLinear`): a ``compute_dtype`` and a bias kept in it, moves and casts that keep the
    storage as it is, and a state dict in the plain Linear's language (official keys, float weights).

    A subclass gives :meth:`_storage_device`, :meth:`_move_storage`, :meth:`set_weight`, :meth:`_set_bias` and
    :meth:`upcast_weight`; ``_load_errors`` are the exceptions of those setters that become load error messages.
    """

    _load_errors: tuple[type[Exception], ...] = (ValueError,)

    def _storage_device(self) -> torch.device:
        raise NotImplementedError

    def _move_storage(self, move: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse: bool = True):
        """Moves and casts (``.to``, ``.cuda()``, ``.half()``, ``to_empty``) keep the storage: a cast changes the
        compute dtype (and the bias), a move moves everything."""
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self._storage_device()))
        if is_compute_dtype(probe.dtype):
            self.compute_dtype = probe.dtype

        def move(t: torch.Tensor) -> torch.Tensor:
            if t.device == probe.device:
                return t
            return torch.empty_like(t, device=probe.device) if t.is_meta else t.to(probe.device)

        self._move_storage(move)
        if self.bias is not None:
            self.bias = nn.Parameter(move(self.bias.detach()).to(self.compute_dtype), requires_grad=False)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.upcast_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("weight", "bias"):
            key = prefix + name
            if name == "bias" and self.bias is None:
                if key in state_dict and strict:
                    unexpected_keys.append(key)
                continue
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            try:
                if name == "weight":
                    self.set_weight(state_dict[key])
                else:
                    self._set_bias(state_dict[key])
            except self._load_errors as error:
                error_msgs.append(f"{key}: {error}")
        if strict:
            for key in state_dict:
                rest = key[len(prefix):] if key.startswith(prefix) else None
                if rest is not None and "." not in rest and rest not in ("weight", "bias"):
                    unexpected_keys.append(key)


class Fp8Linear(ManualCastLinear):
    """A Linear layer whose ``weight`` is stored in fp8 (``[out, in]``) with an optional per-row float32 scale.

    ``forward(x)`` upcasts the weight (and bias) to ``x.dtype`` for the call ("manual cast"); code that runs its own
    matmuls uses :meth:`upcast_weight` or :func:`matmul_weight`, which give the weight in ``compute_dtype``.
    ``weight_scale`` (``[out, 1]`` float32 or None) is a non-persistent buffer: the state dict keeps the official
    key names (see the module docstring).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 fp8_dtype: torch.dtype = torch.float8_e4m3fn, compute_dtype: torch.dtype = torch.bfloat16,
                 device=None):
        if not is_fp8(fp8_dtype):
            raise ValueError(f"fp8_dtype {fp8_dtype} is not an fp8 type; use torch.float8_e4m3fn or float8_e5m2.")
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.fp8_dtype = fp8_dtype
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=fp8_dtype, device=device),
                                   requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                     requires_grad=False)
        self.register_buffer("weight_scale", None, persistent=False)

    @classmethod
    def from_linear(cls, layer: nn.Linear, fp8_dtype: torch.dtype, compute_dtype: torch.dtype,
                    scaled: bool = True) -> "Fp8Linear":
        """Quantise ``layer`` (on its own device). An fp8 weight is taken as is; ``scaled=False`` plain-casts."""
        out = cls(layer.in_features, layer.out_features, layer.bias is not None, fp8_dtype, compute_dtype,
                  device=layer.weight.device)
        out.set_weight(layer.weight.detach(), scaled=scaled)
        if layer.bias is not None:
            out.bias = nn.Parameter(layer.bias.detach().to(compute_dtype), requires_grad=False)
        return out

    def set_weight(self, weight: torch.Tensor, scaled: bool = True) -> None:
        """Store ``weight [out, in]``: fp8 of this layer's kind as is; other floats quantised (per-row scaled unless
        ``scaled=False``); the other fp8 kind is requantised from its exact float32 value."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight has shape {tuple(weight.shape)}; this layer is "
                             f"[{self.out_features}, {self.in_features}].")
        weight = weight.detach()
        if weight.dtype == self.fp8_dtype:
            q, scale = weight, None
        elif scaled or is_fp8(weight.dtype):
            q, scale = quantize_rows(weight, self.fp8_dtype)
        else:
            q, scale = weight.to(self.fp8_dtype), None
        self.weight = nn.Parameter(q.to(self.weight.device), requires_grad=False)
        self.weight_scale = None if scale is None else scale.to(self.weight.device)

    def upcast_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype`` (default ``compute_dtype``): a fresh tensor for this call only."""
        dtype = dtype or self.compute_dtype
        w = self.weight
        out = w.to(dtype) if w.dtype != dtype else w.clone()
        if self.weight_scale is not None:
            out.mul_(self.weight_scale.to(device=out.device))
        return out

    def _storage_device(self) -> torch.device:
        return self.weight.device

    def _move_storage(self, move: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Moves keep the fp8 storage and the float32 scales."""
        self.weight = nn.Parameter(move(self.weight.detach()), requires_grad=False)
        if self.weight_scale is not None:
            self.weight_scale = move(self.weight_scale)

    def _set_bias(self, bias: torch.Tensor) -> None:
        if tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self.bias = nn.Parameter(bias.detach().to(self.bias.device, self.compute_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if is_compute_dtype(x.dtype) else self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.upcast_weight(dtype), bias)

    def extra_repr(self) -> str:
        scaled = "per-row scale" if self.weight_scale is not None else "unscaled"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"storage={self.fp8_dtype}, {scaled}, compute={self.compute_dtype}")


def matmul_weight(layer: nn.Linear) -> torch.Tensor:
    """``layer``'s weight in the dtype its matmul runs in: the stored tensor, or an upcast copy for fp8 storage."""
    if isinstance(layer, Fp8Linear):
        return layer.upcast_weight()
    return layer.weight


def in_repeated_block(model: nn.Module) -> Callable[[str], bool]:
    """Default choice of layers worth storing in fp8: Linears inside an ``nn.ModuleList`` (the repeated transformer
    blocks, which hold nearly all parameters); embeddings, text/step projections and heads keep the compute dtype."""
    lists = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    return lambda name: any(name.startswith(prefix + ".") for prefix in lists)


def quantize_linears(
    model: nn.Module,
    fp8_dtype: torch.dtype,
    compute_dtype: torch.dtype = torch.bfloat16,
    select: Optional[Callable[[str], bool]] = None,
    scaled: bool = True,
) -> int:
    """Replace the selected ``nn.Linear`` layers of ``model`` by :class:`Fp8Linear` in place; returns how many.

    ``select(qualified_name)`` picks layers (default :func:`in_repeated_block`). Each layer is converted on its own
    device, one at a time, so the peak extra memory is one layer's float32 copy. Layers that already are
    :class:`Fp8Linear` are left alone.
    """
    select = select or in_repeated_block(model)
    targets = [(name, layer) for name, layer in model.named_modules() if type(layer) is nn.Linear and select(name)]
    for name, layer in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Fp8Linear.from_linear(layer, fp8_dtype, compute_dtype, scaled=scaled))
    return len(targets)
