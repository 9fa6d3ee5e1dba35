"""Linear layers that keep a GGUF-quantised weight and decode it for each call, on the device of the call.

The counterpart of :class:`~grn_core.runtime.fp8.Fp8Linear` for GGUF files: the weight stays in its GGML blocks
(Q8_0 = 8.5 bits per weight, Q5_K 5.5, Q4_K 4.5) wherever the module is — on the GPU, or on the CPU and streamed by
block offload, which then moves the quantised bytes — and only one layer's weight exists in the compute dtype at a
time, for the duration of its matmul.

    tensors, metadata = read_gguf(path)
    with torch.device("meta"):
        model = GRNRefiner(config)
    apply_gguf_weights(model, tensors, compute_dtype=torch.bfloat16)   # quantised Linears -> GGUFLinear, rest loaded
    model.to("cuda")

Code that runs its own matmuls reads ``layer.weight``: on a :class:`GGUFLinear` that is the weight decoded into
``compute_dtype`` for this use (a fresh tensor each time), so the refiner's fused paths (``matmul_weight``) work
unchanged; :meth:`GGUFLinear.upcast_weight` is the explicit form, with the same signature as ``Fp8Linear``'s.
``state_dict()`` yields the decoded weight in the compute dtype, so a saved dict loads into the plain model; loading a
float weight into a :class:`GGUFLinear` quantises it to the layer's type.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint_files import CheckpointError, fit_problems
from ..runtime.fp8 import ManualCastLinear, is_compute_dtype as _is_compute_dtype
from .gguf_quants import GGUFWeight, QTYPES, dequantize, normalize_qtype, pick_qtype, quantize

log = logging.getLogger(__name__)

__all__ = ["GGUFLinear", "apply_gguf_weights", "gguf_linears", "state_tensors"]


class GGUFLinear(ManualCastLinear):
    """A Linear layer whose weight ``[out, in]`` is kept as GGUF blocks of type ``qtype`` (``weight_blocks``, uint8
    ``[out, row_bytes]``, a non-persistent buffer) and decoded for every use.

    ``forward(x)`` decodes the weight on ``x``'s device in ``x``'s dtype ("manual cast"); ``weight`` /
    :meth:`upcast_weight` give it in ``compute_dtype`` where the blocks are. The bias is kept in ``compute_dtype``.
    Moves (``.to(device)``, ``.cuda()``) move the blocks; casts (``.to(dtype)``, ``.half()``) change the compute dtype
    and the bias, never the blocks.
    """

    _load_errors = (ValueError, TypeError)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, qtype: str = "Q8_0",
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        nn.Module.__init__(self)  # not nn.Linear's: there is no weight Parameter to create
        qtype = normalize_qtype(qtype)
        if not QTYPES[qtype].quantized:
            raise ValueError(f"{qtype} is not a quantised type; a plain nn.Linear holds {qtype} weights.")
        if not _is_compute_dtype(compute_dtype):
            raise ValueError(f"compute_dtype {compute_dtype} is not a float type to compute in.")
        self.in_features = in_features
        self.out_features = out_features
        self.qtype = qtype
        self.compute_dtype = compute_dtype
        row_bytes = QTYPES[qtype].row_bytes(in_features)
        self.register_buffer("weight_blocks", torch.zeros(out_features, row_bytes, dtype=torch.uint8, device=device),
                             persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_weight(cls, weight: GGUFWeight, bias: Optional[torch.Tensor] = None,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "GGUFLinear":
        """A layer holding ``weight`` (kept as it is, on its device) and ``bias`` (cast to ``compute_dtype``)."""
        if weight.ndim != 2:
            raise ValueError(f"a Linear weight is 2-D, got shape {tuple(weight.shape)}.")
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, weight.qtype, compute_dtype, device="meta")
        layer.set_weight(weight)
        if bias is not None:
            layer._set_bias(bias)
        return layer

    @classmethod
    def from_linear(cls, layer: nn.Linear, qtype: str = "Q8_0", compute_dtype: Optional[torch.dtype] = None,
                    device=None) -> "GGUFLinear":
        """Quantise a float ``layer`` in memory (``qtype``, with the fallback rule of
        :func:`~grn_core.formats.gguf_quants.pick_qtype` for rows that do not fit; F16 / F32 fallbacks are refused:
        keep such layers plain). ``device``: where the quantisation arithmetic runs."""
        weight = layer.weight.detach()
        got = pick_qtype(qtype, tuple(weight.shape))
        if not QTYPES[got].quantized:
            raise ValueError(f"rows of {weight.shape[-1]} fit no quantised type of the {normalize_qtype(qtype)} "
                             "family; keep this layer as a plain Linear.")
        dtype = compute_dtype or (weight.dtype if _is_compute_dtype(weight.dtype) else torch.bfloat16)
        quantized = quantize(weight, got, device=device).to(weight.device)
        return cls.from_weight(quantized, None if layer.bias is None else layer.bias.detach(), dtype)

    # -- storage ------------------------------------------------------------------------------------------------------

    @property
    def quantized_weight(self) -> GGUFWeight:
        """The stored weight as a :class:`GGUFWeight` (sharing the buffer's bytes)."""
        return GGUFWeight(self.weight_blocks, self.qtype, (self.out_features, self.in_features))

    def set_weight(self, weight: GGUFWeight | torch.Tensor) -> None:
        """Store ``weight [out, in]``: a :class:`GGUFWeight` as it is (its type becomes the layer's), a float tensor
        quantised to the layer's type. The blocks stay where the layer's blocks are (or on ``weight``'s device when
        the layer is still on the meta device)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight has shape {tuple(weight.shape)}; this layer is "
                             f"[{self.out_features}, {self.in_features}].")
        if isinstance(weight, GGUFWeight):
            if not weight.type.quantized:
                weight = quantize(dequantize(weight), self.qtype)
        elif isinstance(weight, torch.Tensor):
            weight = quantize(weight, self.qtype)
        else:
            raise TypeError(f"weight must be a GGUFWeight or a tensor, not {type(weight).__name__}.")
        target = weight.device if self.weight_blocks.is_meta else self.weight_blocks.device
        self.qtype = weight.qtype
        self.weight_blocks = weight.data.to(target)

    def _set_bias(self, bias: torch.Tensor) -> None:
        if tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        target = bias.device if self.bias is None or self.bias.is_meta else self.bias.device
        self.bias = nn.Parameter(bias.detach().to(target, self.compute_dtype), requires_grad=False)

    # -- decoding -----------------------------------------------------------------------------------------------------

    def upcast_weight(self, dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype`` (default ``compute_dtype``) on ``device`` (default: where the blocks
        are): a fresh tensor for this call only."""
        return dequantize(self.quantized_weight, dtype or self.compute_dtype, device)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The decoded weight in ``compute_dtype`` (see :meth:`upcast_weight`); read-only."""
        return self.upcast_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if _is_compute_dtype(x.dtype) else self.compute_dtype
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=dtype)
        return F.linear(x.to(dtype), self.upcast_weight(dtype, x.device), bias)

    def _storage_device(self) -> torch.device:
        return self.weight_blocks.device

    def _move_storage(self, move) -> None:
        """Moves keep the blocks' bytes."""
        self.weight_blocks = move(self.weight_blocks)

    def extra_repr(self) -> str:
        kind = QTYPES[self.qtype]
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"storage={self.qtype} ({kind.bits_per_weight:g} bits/weight), compute={self.compute_dtype}")


def gguf_linears(model: nn.Module) -> dict[str, GGUFLinear]:
    """The :class:`GGUFLinear` layers of ``model`` by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, GGUFLinear)}


def state_tensors(model: nn.Module, decode: bool = True):
    """``(key, tensor)`` of every entry of ``model``'s state dict, one at a time: a :class:`GGUFLinear`'s weight is
    decoded in its compute dtype only when its turn comes (``model.state_dict()`` would decode them all at once), or,
    with ``decode=False``, stands as a meta tensor of its shape (nothing materialised)."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, GGUFLinear):
            yield prefix + "weight", (module.upcast_weight() if decode else
                                      torch.empty(module.out_features, module.in_features, device="meta"))
        for key, param in module._parameters.items():
            if param is not None:
                yield prefix + key, param
        for key, buf in module._buffers.items():
            if buf is not None and key not in module._non_persistent_buffers_set:
                yield prefix + key, buf


def _expected(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every key of ``model``'s state dict with its shape, without materialising anything (GGUF layers included)."""
    return {key: tuple(tensor.shape) for key, tensor in state_tensors(model, decode=False)}


def apply_gguf_weights(model: nn.Module, tensors: Mapping[str, Any], compute_dtype: Optional[torch.dtype] = None,
                       path: str | Path | None = None) -> list[str]:
    """Load ``tensors`` (from :func:`~grn_core.formats.gguf_file.read_gguf`) into ``model`` in place: every
    ``nn.Linear`` whose weight is a quantised :class:`GGUFWeight` becomes a :class:`GGUFLinear` holding it as it is;
    all other tensors load normally (quantised tensors of other modules are decoded to float32, with a log line).

    ``compute_dtype``: the GGUF layers' compute dtype (default: the dtype of the Linear each replaces — float32 for
    a model built on the meta device). Works on a model built on the meta device (tensors are assigned) or on a
    materialised one (values copied into its parameters). Keys and shapes are checked against the model first: a
    mismatch raises :class:`~grn_core.checkpoint_files.CheckpointError` (naming ``path``) with the model untouched.
    Returns the qualified names of the layers that became :class:`GGUFLinear`.
    """
    where = str(path) if path is not None else "GGUF weights"
    problems, _ = fit_problems(_expected(model), tensors)
    if problems:
        raise CheckpointError(f"{where}: the tensors do not fit the network: {'; '.join(problems)}. The file may be "
                              "damaged, or for a different model version.", path=path)

    replace = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        weight = tensors.get(prefix + "weight")
        if isinstance(module, nn.Linear) and isinstance(weight, GGUFWeight) and weight.type.quantized:
            replace.append((name, module, weight, tensors.get(prefix + "bias")))
    layers = []
    for name, module, weight, bias in replace:
        if compute_dtype is not None:
            dtype = compute_dtype
        elif isinstance(module, GGUFLinear):
            dtype = module.compute_dtype
        else:
            dtype = module.weight.dtype if _is_compute_dtype(module.weight.dtype) else torch.float32
        if isinstance(bias, GGUFWeight):
            bias = dequantize(bias, torch.float32)
        layers.append((name, GGUFLinear.from_weight(weight, bias, dtype)))
    consumed = {f"{name}.{key}" if name else key for name, _, _, bias in replace
                for key in (("weight", "bias") if bias is not None else ("weight",))}
    rest = {}
    for key, value in tensors.items():
        if key in consumed:
            continue
        if isinstance(value, GGUFWeight):
            log.info("%s: %s (%s) belongs to no Linear layer; it is decoded to float32.", where, key, value.qtype)
            value = dequantize(value, torch.float32)
        rest[key] = value

    for name, layer in layers:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer)
    assign = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    result = model.load_state_dict(rest, strict=False, assign=assign)
    left = [k for k in result.missing_keys if k not in consumed]
    if left or result.unexpected_keys:  # cannot happen after the checks above; a bug if it does
        raise RuntimeError(f"{where}: load left {left[:4]} missing and {result.unexpected_keys[:4]} unexpected.")
    return [name for name, _ in layers]
