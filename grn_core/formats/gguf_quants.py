"""GGML block quantisation in torch: the block layouts GGUF files use, their quantisers and their dequantisers.

A quantised GGML tensor is a run of *blocks*; a block holds ``block`` consecutive weights of one row in ``nbytes``
bytes, and a row of ``n`` weights is ``n / block`` whole blocks (a row whose length is not a multiple of the block
cannot use the type). Every scale is an IEEE half float (``f16``); everything is little-endian. Per type, with
``q`` the stored integer codes and ``w`` the weight they stand for:

- ``Q8_0`` — 32 weights in 34 bytes (8.5 bits/weight): ``d:f16 | q[32]:int8``; ``w = d * q``.
- ``Q4_0`` — 32 in 18 B (4.5 b/w): ``d:f16 | qs[16]``; ``q[j] = qs[j] & 15``, ``q[j + 16] = qs[j] >> 4``;
  ``w = d * (q - 8)``.
- ``Q4_1`` — 32 in 20 B (5 b/w): ``d:f16 | m:f16 | qs[16]`` (nibbles as Q4_0); ``w = d * q + m``.
- ``Q5_0`` — 32 in 22 B (5.5 b/w): ``d:f16 | qh:u32 | qs[16]``; the low 4 bits of ``q`` as Q4_0, bit 4 of ``q[i]`` is
  bit ``i`` of ``qh``; ``w = d * (q - 16)``.
- ``Q5_1`` — 32 in 24 B (6 b/w): ``d:f16 | m:f16 | qh:u32 | qs[16]``; ``w = d * q + m``.
- ``Q4_K`` — 256 in 144 B (4.5 b/w): ``d:f16 | dmin:f16 | scales[12] | qs[128]``: 8 sub-blocks of 32 weights, each
  with a 6-bit scale ``sc[s]`` and a 6-bit min ``m[s]`` packed into the 12 bytes ``b`` (``s < 4``: ``sc = b[s] & 63``,
  ``m = b[s + 4] & 63``; ``s >= 4``: ``sc = (b[s + 4] & 15) | (b[s - 4] >> 6) << 4``,
  ``m = (b[s + 4] >> 4) | (b[s] >> 6) << 4``). Sub-block ``s = 2c + h`` stores its codes in nibble ``h`` (0 low,
  1 high) of ``qs[32c : 32c + 32]``; ``w = d * sc[s] * q - dmin * m[s]``.
- ``Q5_K`` — 256 in 176 B (5.5 b/w): ``d:f16 | dmin:f16 | scales[12] | qh[32] | qs[128]``: as Q4_K with 5-bit codes;
  bit 4 of weight ``j`` of sub-block ``s`` is bit ``s`` of ``qh[j]``.
- ``Q6_K`` — 256 in 210 B (6.5625 b/w): ``ql[128] | qh[64] | sc[16]:int8 | d:f16``: 16 sub-blocks of 16 weights with
  an int8 scale; weight ``32k + l`` (``k < 8``) takes nibble ``k % 2`` of ``ql[64 (k // 4) + 32 ((k // 2) % 2) + l]``
  and bits ``2 (k % 4)`` of ``qh[32 (k // 4) + l]`` as its high 2 bits; ``w = d * sc[s] * (q - 32)``.
- ``F32``, ``F16``, ``BF16`` (and ``F64``, ``I8``–``I64``): plain arrays, one element per weight.

Dequantisation (:func:`dequantize`) runs in torch on any device, vectorised over all blocks, in float32 (the same
operations in the same order as the ``gguf`` package's numpy reference, hence the same bits), then casts to the
requested dtype. Quantisation (:func:`quantize`) also runs in torch: ``Q8_0``, ``Q5_0`` and ``Q4_0`` reproduce
llama.cpp's reference quantisers (``quantize_row_q*_0_ref``) bit for bit; ``Q4_K`` and ``Q5_K`` follow llama.cpp's
reference algorithm (``quantize_row_q4_K_ref`` / ``q5_K_ref``: per sub-block a weighted least-squares search for
scale and min, ``make_qkx2_quants``, then 6-bit codes for those against the block's ``d`` / ``dmin``), with sums
accumulated in a different order, so a rare code may differ from llama-quantize's while the file stays standard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = [
    "FALLBACKS",
    "GGMLType",
    "GGUFWeight",
    "QTYPES",
    "QUANTIZABLE",
    "QUANTIZED",
    "SUPPORTED",
    "dequantize",
    "fits",
    "nonfinite_blocks",
    "normalize_qtype",
    "pick_qtype",
    "qtype_by_id",
    "quantize",
]

QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    """One GGML tensor type: its name, its id in GGUF files, weights per block and bytes per block."""

    name: str
    id: int
    block: int
    nbytes: int
    torch_dtype: Optional[torch.dtype] = None  # plain (unquantised) types only

    @property
    def quantized(self) -> bool:
        return self.torch_dtype is None

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.block

    def row_bytes(self, row_length: int) -> int:
        if row_length % self.block:
            raise ValueError(f"a row of {row_length} weights is not a whole number of {self.name} blocks "
                             f"({self.block} weights each).")
        return row_length // self.block * self.nbytes


QTYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("F32", 0, 1, 4, torch.float32),
    GGMLType("F16", 1, 1, 2, torch.float16),
    GGMLType("Q4_0", 2, 32, 18),
    GGMLType("Q4_1", 3, 32, 20),
    GGMLType("Q5_0", 6, 32, 22),
    GGMLType("Q5_1", 7, 32, 24),
    GGMLType("Q8_0", 8, 32, 34),
    GGMLType("Q4_K", 12, QK_K, 144),
    GGMLType("Q5_K", 13, QK_K, 176),
    GGMLType("Q6_K", 14, QK_K, 210),
    GGMLType("I8", 24, 1, 1, torch.int8),
    GGMLType("I16", 25, 1, 2, torch.int16),
    GGMLType("I32", 26, 1, 4, torch.int32),
    GGMLType("I64", 27, 1, 8, torch.int64),
    GGMLType("F64", 28, 1, 8, torch.float64),
    GGMLType("BF16", 30, 1, 2, torch.bfloat16),
)}
_BY_ID = {t.id: t for t in QTYPES.values()}

# What a GGUF file may hold for us to read it; what write_gguf can produce.
SUPPORTED = tuple(QTYPES)
QUANTIZED = tuple(name for name, t in QTYPES.items() if t.quantized)
QUANTIZABLE = ("Q8_0", "Q5_K", "Q5_0", "Q4_K", "Q4_0")

# The type a tensor gets when its rows do not fit the requested one: the nearest type that fits, as llama.cpp does
# (K-quants need rows of a multiple of 256; Q*_0 of 32; F16 always fits).
FALLBACKS: dict[str, tuple[str, ...]] = {
    "Q8_0": ("Q8_0", "F16"),
    "Q5_K": ("Q5_K", "Q5_0", "Q8_0", "F16"),
    "Q5_0": ("Q5_0", "Q8_0", "F16"),
    "Q4_K": ("Q4_K", "Q4_0", "Q8_0", "F16"),
    "Q4_0": ("Q4_0", "Q8_0", "F16"),
    "BF16": ("BF16",),
    "F16": ("F16",),
    "F32": ("F32",),
}

_F16_MAX = 65504.0


def normalize_qtype(qtype: str) -> str:
    """``"q4_k"`` / ``"Q4_K"`` → ``"Q4_K"``; a ValueError listing the known types otherwise."""
    name = str(qtype).strip().upper()
    if name not in QTYPES:
        raise ValueError(f"unknown GGML type '{qtype}'; known: {', '.join(SUPPORTED)}.")
    return name


def qtype_by_id(type_id: int) -> Optional[GGMLType]:
    """The type with GGUF id ``type_id``, or None when it is one this module does not handle."""
    return _BY_ID.get(int(type_id))


def fits(qtype: str, row_length: int) -> bool:
    """Whether rows of ``row_length`` weights are whole blocks of ``qtype``."""
    return row_length % QTYPES[normalize_qtype(qtype)].block == 0


def pick_qtype(requested: str, shape: Sequence[int], absmax: Optional[float] = None) -> str:
    """The type a tensor of ``shape`` gets when ``requested`` is asked for: the first of ``FALLBACKS[requested]``
    whose block divides the row length (the last dimension); F16 becomes F32 when ``absmax`` exceeds the F16 range."""
    name = normalize_qtype(requested)
    if name not in FALLBACKS:
        raise ValueError(f"{name} cannot be written; write one of {', '.join(FALLBACKS)}.")
    row = int(shape[-1]) if len(shape) else 1
    for candidate in FALLBACKS[name]:
        if row % QTYPES[candidate].block == 0:
            if candidate == "F16" and absmax is not None and absmax > _F16_MAX:
                return "F32"
            return candidate
    return "F32"  # unreachable: F16 always fits


# ----------------------------------------------------------------------------------------------------------------------
# The in-memory form of a quantised tensor


class GGUFWeight:
    """A tensor as a GGUF file stores it: raw bytes (``data``, uint8 ``[rows, row_bytes]``), the GGML type name
    (``qtype``) and the logical shape (``shape``, torch order: the last dimension is the row).

    It stays quantised in memory and on any device it is moved to (``to``); :meth:`dequantize` gives the float tensor.
    It answers the few tensor questions loaders ask of a state dict's values (``shape``, ``dtype`` — the storage
    dtype uint8 —, ``device``, ``numel()``, ``is_floating_point()`` — False, so float-only checks skip it).
    """

    __slots__ = ("data", "qtype", "shape")

    def __init__(self, data: torch.Tensor, qtype: str, shape: Sequence[int]):
        qtype = normalize_qtype(qtype)
        shape = torch.Size(int(s) for s in shape)
        kind = QTYPES[qtype]
        if data.dtype != torch.uint8:
            raise ValueError(f"GGUFWeight data must be uint8 bytes, got {data.dtype}.")
        row = shape[-1] if len(shape) else 1
        rows = shape.numel() // row if row else 0
        row_bytes = kind.row_bytes(row)
        if data.numel() != rows * row_bytes:
            raise ValueError(f"{qtype} tensor of shape {tuple(shape)} needs {rows * row_bytes} bytes, got "
                             f"{data.numel()}.")
        self.data = data.reshape(rows, row_bytes)
        self.qtype = qtype
        self.shape = shape

    @property
    def type(self) -> GGMLType:
        return QTYPES[self.qtype]

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def numel(self) -> int:
        return self.shape.numel()

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def is_floating_point(self) -> bool:
        return False

    def to(self, device=None, non_blocking: bool = False) -> "GGUFWeight":
        """The same weight with its bytes on ``device`` (dtypes do not apply: use :meth:`dequantize`)."""
        if device is None or torch.device(device) == self.data.device:
            return self
        return GGUFWeight(self.data.to(device, non_blocking=non_blocking), self.qtype, self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        return dequantize(self, dtype, device)

    def __repr__(self) -> str:
        return (f"GGUFWeight({self.qtype}, shape={tuple(self.shape)}, {self.nbytes} bytes, "
                f"device={self.data.device})")


# ----------------------------------------------------------------------------------------------------------------------
# Dequantisation: uint8 blocks [n, nbytes] -> float32 [n, block]


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The half float at byte ``offset`` of every block -> ``[n, 1]`` float32 (a view of the blocks as f16, no copy:
    every block size and f16 offset is even)."""
    return blocks.view(torch.float16)[:, offset // 2:offset // 2 + 1].to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[n, 16]`` bytes -> ``[n, 32]`` codes: all low nibbles, then all high nibbles (the Q4_0/Q5_0 order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """``[n, 4]`` bytes of a little-endian u32 -> ``[n, 32]`` bits (bit ``i`` of the u32 at column ``i``)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of a Q4_K/Q5_K block -> 8 six-bit scales and 8 six-bit mins (uint8 ``[n, 8]`` each)."""
    b = scales.reshape(-1, 3, 4)
    d, m, md = b[:, 0], b[:, 1], b[:, 2]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc, mn


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[n, 128]`` bytes -> ``[n, 8, 32]`` codes: sub-block ``2c + h`` is nibble ``h`` of bytes ``32c .. 32c + 31``."""
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).view(1, 1, 2, 1)
    return ((qs.reshape(-1, 4, 1, 32) >> shifts) & 0x0F).reshape(-1, 8, 32)


# Integer codes meet float scales in one multiply (int * float32 -> float32, exact for these small integers).

def _dq_q8_0(b: torch.Tensor) -> torch.Tensor:
    return torch.mul(b[:, 2:].view(torch.int8), _f16(b, 0))


def _dq_q4_0(b: torch.Tensor) -> torch.Tensor:
    return torch.mul(_f16(b, 0), _nibbles(b[:, 2:]).view(torch.int8) - 8)


def _dq_q4_1(b: torch.Tensor) -> torch.Tensor:
    return torch.mul(_f16(b, 0), _nibbles(b[:, 4:])).add_(_f16(b, 2))


def _dq_q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)
    return torch.mul(_f16(b, 0), q.view(torch.int8) - 16)


def _dq_q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    return torch.mul(_f16(b, 0), q).add_(_f16(b, 2))


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``d * sc`` and ``dmin * m`` of every sub-block of Q4_K/Q5_K blocks -> two ``[n, 8, 1]`` float32."""
    sc, mn = _scale_min_k4(b[:, 4:16])
    return (_f16(b, 0) * sc).unsqueeze(-1), (_f16(b, 2) * mn).unsqueeze(-1)


def _dq_q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dm = _k_scales(b)
    return torch.mul(d, _k_nibbles(b[:, 16:144])).sub_(dm).reshape(-1, QK_K)


def _dq_q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dm = _k_scales(b)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
    high = (b[:, 16:48].reshape(-1, 1, 32) >> shifts) & 1  # [n, 8 sub-blocks, 32]
    return torch.mul(d, _k_nibbles(b[:, 48:176]) | (high << 4)).sub_(dm).reshape(-1, QK_K)


def _dq_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8)).reshape(n, 16, 1)
    low_shift = torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(1, 1, 2, 1)
    ql = ((b[:, :128].reshape(n, 2, 1, 64) >> low_shift) & 0x0F).reshape(n, 8, 32)
    high_shift = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> high_shift) & 0x03).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).view(torch.int8) - 32).reshape(n, 16, 16)
    return torch.mul(d, q).reshape(n, QK_K)


_DEQUANTIZERS = {
    "Q8_0": _dq_q8_0, "Q4_0": _dq_q4_0, "Q4_1": _dq_q4_1, "Q5_0": _dq_q5_0, "Q5_1": _dq_q5_1,
    "Q4_K": _dq_q4_k, "Q5_K": _dq_q5_k, "Q6_K": _dq_q6_k,
}


# Weights decoded per pass: a large matrix is decoded in pieces straight into its output, so the float32 temporaries
# (8-13 bytes per weight of the piece, by type) stay bounded (~64-110 MB) whatever the matrix: the peak of decoding
# a matrix is its output (2 bytes per weight in bf16) plus one piece, not 8-13 bytes per weight of the whole matrix.
_DECODE_WEIGHTS = 1 << 23


def dequantize(weight, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``weight`` as a ``dtype`` tensor of its logical shape on ``device`` (default: where its bytes are).

    A :class:`GGUFWeight`'s bytes move to ``device`` first (the quantised size crosses the bus) and are decoded
    there, in float32, then cast to ``dtype`` (matrices of more than ``_DECODE_WEIGHTS`` weights piece by piece into
    the output: the same values, a bounded temporary); a plain tensor is only moved and cast.
    """
    if isinstance(weight, torch.Tensor):
        return weight.to(device=device, dtype=dtype)
    if not isinstance(weight, GGUFWeight):
        raise TypeError(f"dequantize takes a GGUFWeight or a tensor, not {type(weight).__name__}.")
    data = weight.data if device is None else weight.data.to(device, non_blocking=True)
    kind = weight.type
    if not kind.quantized:
        flat = data.reshape(-1).view(kind.torch_dtype)
        return flat.reshape(weight.shape).to(dtype)
    blocks = data.reshape(-1, kind.nbytes).contiguous()
    decode = _DEQUANTIZERS[weight.qtype]
    step = max(1, _DECODE_WEIGHTS // kind.block)
    if blocks.shape[0] <= step:
        return decode(blocks).reshape(weight.shape).to(dtype)
    out = torch.empty(blocks.shape[0], kind.block, dtype=dtype, device=blocks.device)
    for start in range(0, blocks.shape[0], step):
        out[start:start + step] = decode(blocks[start:start + step])  # copy_ casts as .to(dtype) does
    return out.reshape(weight.shape)


# Byte offsets of the f16 fields (scales, mins) of each quantised type's block: every other field is an integer code,
# so a block decodes to finite values exactly when these are finite.
_HALF_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2),
                "Q5_K": (0, 2), "Q6_K": (208,)}


def nonfinite_blocks(weight: GGUFWeight) -> int:
    """How many blocks of ``weight`` decode to NaN or Inf values — those whose f16 scale or min is NaN or Inf — read
    from those fields alone, without decoding (for a plain type: how many elements are NaN or Inf)."""
    kind = weight.type
    if not kind.quantized:
        if not kind.torch_dtype.is_floating_point:
            return 0
        return int((~torch.isfinite(dequantize(weight, kind.torch_dtype))).sum())
    halves = weight.data.reshape(-1, kind.nbytes).view(torch.float16)  # every block size is even
    bad = None
    for offset in _HALF_FIELDS[weight.qtype]:
        field = ~torch.isfinite(halves[:, offset // 2])
        bad = field if bad is None else bad | field
    return int(bad.sum()) if bad is not None else 0


# ----------------------------------------------------------------------------------------------------------------------
# Quantisation: float32 blocks [n, block] -> uint8 [n, nbytes]


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[n]`` or ``[n, 1]`` -> its f16 (round to nearest even) as 2 bytes per row."""
    return x.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf`` (halves away from zero), computed exactly: ``floor(|x|) + floor(2 * frac(|x|))``."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per row the entry of largest magnitude, with its sign (the first one on ties) -> ``[n, 1]``."""
    return torch.gather(x, 1, x.abs().argmax(dim=1, keepdim=True))


def _q_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _round_away(x * _inverse(d))
    return torch.cat([_half_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=1)


def _q_q4_0(x: torch.Tensor) -> torch.Tensor:
    d = _signed_absmax(x) / -8
    q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_half_bytes(d), q[:, :16] | (q[:, 16:] << 4)], dim=1)


def _q_q5_0(x: torch.Tensor) -> torch.Tensor:
    d = _signed_absmax(x) / -16
    q = torch.trunc(x * _inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    qs = (q[:, :16] & 0x0F) | (q[:, 16:] << 4)
    return torch.cat([_half_bytes(d), _pack_bits((q >> 4) & 1), qs], dim=1)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``[n, 8k]`` zeros and ones -> ``[n, k]`` bytes, bit ``i`` of byte ``j`` from column ``8j + i``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (bits.reshape(bits.shape[0], -1, 8) << shifts).sum(dim=2, dtype=torch.uint8)


def _make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
               nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's ``make_qkx2_quants`` for many sub-blocks at once: ``x, w [N, 32]`` -> ``(scale [N], min [N],
    L [N, 32])`` with ``x ≈ scale * L - min``, ``0 <= L <= nmax``, ``min >= 0``.

    Start from the range-spanning scale, then try ``nstep + 1`` stretched scales; for each, the weighted
    least-squares scale and offset of its codes, kept if the weighted squared error drops. As in the reference the
    current offset (``lo`` below) is updated as better fits are found and used by the following trials.
    """
    lo = x.amin(dim=1).clamp(max=0)
    hi = x.amax(dim=1)
    flat = hi == lo
    sum_w = w.sum(dim=1)
    sum_x = (w * x).sum(dim=1)

    def codes(iscale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return torch.round(iscale[:, None] * (x - offset[:, None])).nan_to_num(0.0, 0.0, 0.0).clamp(0, nmax)

    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    iscale = nmax / span
    scale = 1 / iscale
    best_l = codes(iscale, lo)
    best = (w * (scale[:, None] * best_l + lo[:, None] - x).square()).sum(dim=1)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / torch.where(flat, torch.ones_like(hi), hi - lo)
        cand = codes(iscale, lo)
        weighted = w * cand
        sum_l = weighted.sum(dim=1)
        sum_l2 = (weighted * cand).sum(dim=1)
        sum_xl = (weighted * x).sum(dim=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe_det = torch.where(det > 0, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)),
                                 this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = (w * (this_scale[:, None] * cand + this_min[:, None] - x).square()).sum(dim=1)
        better = (det > 0) & (err < best) & ~flat
        best = torch.where(better, err, best)
        best_l = torch.where(better[:, None], cand, best_l)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    best_l = torch.where(flat[:, None], torch.zeros_like(best_l), best_l)
    return scale, -lo, best_l


def _q_k(x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """The part Q4_K and Q5_K share: ``x [n, 256]`` -> ``(d, dmin)`` as f16 bytes, the 12 packed scale bytes and the
    codes ``L [n, 8, 32]`` (uint8, ``0..nmax``)."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    av_x = torch.sqrt(sub.square().sum(dim=2, keepdim=True) / 32)
    weights = av_x + sub.abs()
    scales, mins, first_l = _make_qkx2(sub.reshape(-1, 32), weights.reshape(-1, 32), nmax, rmin, rdelta, nstep)
    scales, mins, first_l = scales.reshape(n, 8), mins.reshape(n, 8), first_l.reshape(n, 8, 32)
    max_scale = scales.amax(dim=1).clamp(min=0)
    max_min = mins.amax(dim=1).clamp(min=0)
    inv_scale = torch.where(max_scale > 0, 63 / torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale)),
                            torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / torch.where(max_min > 0, max_min, torch.ones_like(max_min)),
                          torch.zeros_like(max_min))
    ls = torch.round(inv_scale[:, None] * scales).clamp(0, 63).to(torch.uint8)
    lm = torch.round(inv_min[:, None] * mins).clamp(0, 63).to(torch.uint8)
    d16 = (max_scale / 63).to(torch.float16)
    dmin16 = (max_min / 63).to(torch.float16)
    packed = torch.cat([
        ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
        lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
        (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4),
    ], dim=1)
    d = (d16.to(torch.float32)[:, None] * ls.to(torch.float32))[:, :, None]
    dm = (dmin16.to(torch.float32)[:, None] * lm.to(torch.float32))[:, :, None]
    final = torch.round((sub + dm) / torch.where(d == 0, torch.ones_like(d), d)).clamp(0, nmax)
    codes = torch.where(d == 0, first_l, final).to(torch.uint8)  # a zero scale keeps the search's codes, as llama.cpp
    head = torch.cat([_half_bytes(d16), _half_bytes(dmin16), packed], dim=1)
    return head, codes


def _pack_k_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[n, 8, 32]`` 4-bit codes -> ``[n, 128]`` bytes (inverse of ``_k_nibbles``)."""
    pairs = codes.reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _q_q4_k(x: torch.Tensor) -> torch.Tensor:
    head, codes = _q_k(x, 15, -1.0, 0.1, 20)
    return torch.cat([head, _pack_k_nibbles(codes)], dim=1)


def _q_q5_k(x: torch.Tensor) -> torch.Tensor:
    head, codes = _q_k(x, 31, -0.5, 0.1, 15)
    shifts = torch.arange(8, dtype=torch.uint8, device=x.device).view(1, 8, 1)
    qh = (((codes >> 4) & 1) << shifts).sum(dim=1, dtype=torch.uint8)  # [n, 32]: bit s from sub-block s
    return torch.cat([head, qh, _pack_k_nibbles(codes & 0x0F)], dim=1)


_QUANTIZERS = {"Q8_0": _q_q8_0, "Q4_0": _q_q4_0, "Q5_0": _q_q5_0, "Q4_K": _q_q4_k, "Q5_K": _q_q5_k}
_CHUNK_WEIGHTS = 1 << 18  # weights quantised per pass: the K-quant search's ~10 float32 temporaries stay in cache


def quantize(tensor: torch.Tensor, qtype: str, device=None) -> GGUFWeight:
    """``tensor`` (any float dtype; rows = last dimension) as a :class:`GGUFWeight` of ``qtype`` (bytes on the CPU).

    Quantised types need rows of a whole number of blocks (see :func:`pick_qtype` for the fallback rule); plain
    types (F32, F16, BF16, ...) are stored as they are. ``device`` is where the arithmetic runs (default: the
    tensor's device; a GPU makes K-quants of large models fast). Non-finite weights are refused.
    """
    name = normalize_qtype(qtype)
    kind = QTYPES[name]
    shape = tuple(tensor.shape)
    if not kind.quantized:
        plain = tensor.detach().to("cpu", kind.torch_dtype).contiguous()
        return GGUFWeight(plain.reshape(-1).view(torch.uint8), name, shape)
    if name not in _QUANTIZERS:
        raise ValueError(f"{name} can be read but not written; write one of {', '.join(QUANTIZABLE)}.")
    if not tensor.is_floating_point():
        raise ValueError(f"only float tensors can be quantised to {name}, got {tensor.dtype}.")
    row = shape[-1] if shape else 1
    kind.row_bytes(row)  # raises when the rows are not whole blocks
    values = tensor.detach().to(device or tensor.device, torch.float32).reshape(-1, kind.block)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"the tensor holds NaN or Inf values; they cannot be quantised to {name}.")
    step = max(1, _CHUNK_WEIGHTS // kind.block)
    out = torch.empty(values.shape[0], kind.nbytes, dtype=torch.uint8)
    for start in range(0, values.shape[0], step):
        out[start:start + step] = _QUANTIZERS[name](values[start:start + step]).cpu()
    return GGUFWeight(out, name, shape)
