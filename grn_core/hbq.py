"""Hierarchical Binary Quantization (HBQ): tanh features <-> bit labels <-> index labels <-> one-hot model inputs.

A latent value z in (-1, 1) is refined by M rounds of binary search (M = ``rounds``; 4 in every released model):

    q_0 = 0,   bit_r = 1[z > q_{r-1}],   q_r = q_{r-1} + (2 bit_r - 1) 2^-r,        r = 1..M
    zq  = q_M = sum_r (2 bit_r - 1) 2^-r,   so |z - zq| <= 2^-M.

Layouts (``...`` is any number of trailing dims: ``t, h, w`` for video, ``h, w`` for images):

- bit labels   ``[B, M*d, ...]`` uint8, **round-major**: channel ``r*d + c`` holds bit r+1 of latent channel c
  (what the T2I/T2V/I2V refiner reads and predicts);
- index labels ``[B, d, ...]`` int64 in ``0 .. 2^M - 1``, ``l = sum_r bit_r 2^(M-r)`` (the round-1 bit is the MSB;
  what the class-to-image model reads and predicts);
- one-hot inputs: the bit refiner takes ``[B, M*d*2, ...]`` **label-major** (channel ``label*2 + class``), the
  class-to-image model ``[B, 2^M*d, ...]`` **class-major** (channel ``class*d + label``).

Everything is vectorised over positions; only the M rounds are a Python loop.
"""

from __future__ import annotations

import torch

__all__ = [
    "bits_one_hot",
    "bits_to_features",
    "bits_to_indices",
    "class_major_logits",
    "features_to_bits",
    "features_to_indices",
    "indices_one_hot",
    "indices_to_bits",
    "indices_to_features",
    "labels_one_hot",
]


def _check_rounds(rounds: int) -> None:
    if not isinstance(rounds, int) or isinstance(rounds, bool) or not 1 <= rounds <= 16:
        raise ValueError(f"rounds={rounds!r}: HBQ needs an integer number of rounds in 1..16 (released models use 4).")


def _check_labels(t: torch.Tensor, what: str) -> None:
    if t.dim() < 2:
        raise ValueError(f"{what} has shape {tuple(t.shape)}; expected [B, channels, ...] (at least 2 dims).")


def _split_rounds(bits: torch.Tensor, rounds: int) -> torch.Tensor:
    """[B, M*d, ...] round-major -> [B, M, d, ...]."""
    _check_rounds(rounds)
    _check_labels(bits, "bits")
    channels = bits.shape[1]
    if channels % rounds:
        raise ValueError(
            f"bits have {channels} channels, not a multiple of rounds={rounds}; bit labels are [B, rounds*d, ...] "
            f"(e.g. {rounds * 64} channels for d=64). Pass the rounds the bits were made with."
        )
    return bits.reshape(bits.shape[0], rounds, channels // rounds, *bits.shape[2:])


def features_to_bits(z: torch.Tensor, rounds: int = 4) -> torch.Tensor:
    """HBQ bit labels of tanh features.

    Args:
        z: ``[B, d, ...]`` features in (-1, 1) (any float dtype; the comparisons run in that dtype).
        rounds: number of binary-search rounds M.
    Returns:
        uint8 ``[B, rounds*d, ...]``, round-major (channel ``r*d + c``).
    """
    _check_rounds(rounds)
    _check_labels(z, "z")
    if not z.is_floating_point():
        raise ValueError(f"z has dtype {z.dtype}; HBQ quantizes float features (the tokenizer's tanh output).")
    threshold = torch.zeros_like(z)
    bits = []
    for r in range(rounds):
        bit = z > threshold
        # Every q_r is a dyadic rational with r+1 significant bits, so this update is exact in any float dtype.
        threshold = threshold + (bit.to(z.dtype) * 2 - 1) * 0.5 ** (r + 1)
        bits.append(bit)
    return torch.stack(bits, dim=1).to(torch.uint8).flatten(1, 2)


def bits_to_features(bits: torch.Tensor, rounds: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize bit labels: ``[B, rounds*d, ...]`` (0/1, any int or bool dtype) -> zq ``[B, d, ...]``.

    ``zq = sum_r (2 bit_r - 1) 2^-r`` — exact in every float dtype for rounds <= 8 (bf16 keeps 8 significant bits).
    """
    per_round = _split_rounds(bits, rounds)
    weights = torch.tensor([0.5 ** (r + 1) for r in range(rounds)], dtype=dtype, device=bits.device)
    weights = weights.view(1, rounds, *([1] * (per_round.dim() - 2)))
    signs = per_round.to(dtype) * 2 - 1
    return (signs * weights).sum(dim=1)


def bits_to_indices(bits: torch.Tensor, rounds: int = 4) -> torch.Tensor:
    """Bit labels ``[B, rounds*d, ...]`` -> index labels ``[B, d, ...]`` (int64; the round-1 bit is the MSB)."""
    per_round = _split_rounds(bits, rounds).to(torch.long)
    place = torch.tensor([1 << (rounds - 1 - r) for r in range(rounds)], dtype=torch.long, device=bits.device)
    return (per_round * place.view(1, rounds, *([1] * (per_round.dim() - 2)))).sum(dim=1)


def indices_to_bits(indices: torch.Tensor, rounds: int = 4) -> torch.Tensor:
    """Index labels ``[B, d, ...]`` in ``0 .. 2^rounds - 1`` -> uint8 bit labels ``[B, rounds*d, ...]`` round-major."""
    _check_rounds(rounds)
    _check_labels(indices, "indices")
    idx = _as_index_labels(indices, rounds)
    shifts = torch.tensor([rounds - 1 - r for r in range(rounds)], dtype=torch.long, device=idx.device)
    bits = (idx.unsqueeze(1) >> shifts.view(1, rounds, *([1] * (idx.dim() - 1)))) & 1
    return bits.to(torch.uint8).flatten(1, 2)


def features_to_indices(z: torch.Tensor, rounds: int = 4) -> torch.Tensor:
    """Tanh features ``[B, d, ...]`` -> index labels ``[B, d, ...]`` (the C2I target)."""
    return bits_to_indices(features_to_bits(z, rounds), rounds)


def indices_to_features(indices: torch.Tensor, rounds: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Index labels ``[B, d, ...]`` -> dequantized features zq ``[B, d, ...]``."""
    return bits_to_features(indices_to_bits(indices, rounds), rounds, dtype)


def _as_index_labels(indices: torch.Tensor, num_classes_or_rounds: int, *, is_classes: bool = False) -> torch.Tensor:
    if indices.is_floating_point() or indices.is_complex():
        raise ValueError(f"labels have dtype {indices.dtype}; pass integer class labels (e.g. .long()).")
    k = num_classes_or_rounds if is_classes else 1 << num_classes_or_rounds
    idx = indices.to(torch.long)
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"labels span {lo}..{hi}, outside 0..{k - 1} ({k} classes); check rounds / num_classes.")
    return idx


def labels_one_hot(
    labels: torch.Tensor, num_classes: int, order: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """One-hot model input of class labels ``[B, D, ...]`` -> ``[B, D*K, ...]``.

    ``order="label_major"``: channel ``label*K + class`` (T2I/T2V/I2V bit refiner);
    ``order="class_major"``: channel ``class*D + label`` (class-to-image model).
    """
    _check_labels(labels, "labels")
    if order not in ("label_major", "class_major"):
        raise ValueError(f"order={order!r}; use 'label_major' (bit refiner) or 'class_major' (class-to-image).")
    idx = _as_index_labels(labels, num_classes, is_classes=True)
    hot = torch.nn.functional.one_hot(idx, num_classes).to(dtype)  # [B, D, ..., K]
    b, d = hot.shape[:2]
    spatial = hot.shape[2:-1]
    if order == "label_major":
        hot = hot.movedim(-1, 2)  # [B, D, K, ...]
    else:
        hot = hot.movedim(-1, 1)  # [B, K, D, ...]
    return hot.reshape(b, d * num_classes, *spatial)


def bits_one_hot(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Refiner input of bit labels: ``[B, C, ...]`` (0/1) -> ``[B, 2*C, ...]``, channel ``label*2 + class``.

    Channel ``2c`` is 1 where bit c is 0 and channel ``2c+1`` is 1 where it is 1 (label-major, K = 2).
    """
    _check_labels(bits, "bits")
    on = bits.to(dtype)
    if bits.dtype != torch.bool and bits.numel() and bool(((bits != 0) & (bits != 1)).any()):
        raise ValueError("bits must be 0/1; got other values. Use hbq.indices_to_bits for index labels.")
    hot = torch.stack((1 - on, on), dim=2)  # [B, C, 2, ...]
    return hot.flatten(1, 2)


def indices_one_hot(indices: torch.Tensor, rounds: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Class-to-image input of index labels ``[B, D, ...]`` -> ``[B, K*D, ...]`` with K = 2**rounds, class-major."""
    _check_rounds(rounds)
    return labels_one_hot(indices, 1 << rounds, order="class_major", dtype=dtype)


def class_major_logits(x: torch.Tensor, h: int, w: int, num_classes: int) -> torch.Tensor:
    """Read a class-to-image head output ``[B, h*w, K*D]`` (class-major channels) into ``[B, K, D, h, w]``.

    Token n = row n // w, column n % w; channel ``k*D + c`` is class k of latent channel c.
    """
    if x.dim() != 3 or x.shape[1] != h * w or x.shape[2] % num_classes:
        raise ValueError(
            f"head output has shape {tuple(x.shape)}; expected [B, h*w={h * w}, K*D] with K={num_classes} dividing "
            f"the last dim."
        )
    b, _, kd = x.shape
    return x.reshape(b, h, w, num_classes, kd // num_classes).permute(0, 3, 4, 1, 2)
