"""Causal-in-time pieces of the tokenizer: the per-call cache, cached causal convs, and the resampling layers.

The tokenizer never sees a whole video at once: the encoder runs on frame 0 alone, then on chunks of
``temporal_factor`` frames; the decoder runs on one latent frame at a time. Every layer that looks back in time keeps
what it needs from earlier chunks in a :class:`CausalCache` that the caller creates per encode/decode call and passes
down explicitly, so memory stays bounded by one chunk (plus at most two cached frames per layer) however long the
video is.

Ordinary k=3 causal convs keep the last two frames they were fed, so chunked == unchunked. The temporal resampling
convs follow the official chunk rules instead (see :class:`DownResample` and :class:`UpResample`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import PATCH_SIZE

__all__ = [
    "AvgDown3D",
    "CausalCache",
    "CausalConv3d",
    "DownResample",
    "DupUp3D",
    "NearestUp2x",
    "UpResample",
    "frame_conv2d",
    "patchify",
    "unpatchify",
]


class CausalCache:
    """Temporal state of one encode or decode call: per layer, what it remembers of earlier chunks.

    Layers use themselves as keys (``cache.get(self)`` / ``cache.set(self, t)``); the driver calls :meth:`advance`
    after each chunk. ``first_chunk`` is True while the first chunk (frame 0 / latent frame 0) runs.
    """

    def __init__(self) -> None:
        self._state: dict[nn.Module, Any] = {}
        self.chunk_index = 0

    @property
    def first_chunk(self) -> bool:
        return self.chunk_index == 0

    def get(self, layer: nn.Module) -> Any:
        return self._state.get(layer)

    def set(self, layer: nn.Module, value: Any) -> None:
        self._state[layer] = value

    def advance(self) -> None:
        self.chunk_index += 1

    def __len__(self) -> int:
        return len(self._state)


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


class CausalConv3d(nn.Conv3d):
    """Conv3d that is causal in time: ``padding=(p_t, p_h, p_w)`` pads H and W symmetrically but puts all ``2 p_t``
    time padding in front, filled from the cache (the last ``2 p_t`` frames fed before) and zeros where the video
    has no past. Input/output ``[B, C, T, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0) -> None:
        pt, ph, pw = _triple(padding)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:  # type: ignore[override]
        if self.time_pad == 0:
            return super().forward(x)
        past = cache.get(self) if cache is not None else None
        parts = [x] if past is None else [past, x]
        missing = self.time_pad - (0 if past is None else past.shape[2])
        if missing > 0:
            parts.insert(0, x.new_zeros(x.shape[0], x.shape[1], missing, *x.shape[3:]))
        padded = torch.cat(parts, dim=2) if len(parts) > 1 else x
        if cache is not None:
            # clone: a view would pin the whole chunk's activation until the next chunk.
            cache.set(self, padded[:, :, -self.time_pad:].clone())
        return super().forward(padded)


def frame_conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D conv to every frame of ``[B, C, T, H, W]`` (as a 1xkxk 3-D conv: no reshuffling of frames)."""
    return F.conv3d(
        x, conv.weight.unsqueeze(2), conv.bias, stride=(1, *conv.stride), padding=(0, *conv.padding)
    )


class NearestUp2x(nn.Module):
    """Nearest-neighbour 2x up-sampling of H and W of ``[B, C, T, H, W]`` (= PyTorch 'nearest-exact' at factor 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        return x[:, :, :, :, None, :, None].expand(b, c, t, h, 2, w, 2).reshape(b, c, t, 2 * h, 2 * w)


class DownResample(nn.Module):
    """Halve H and W (zero-pad right/bottom by 1, 3x3 conv stride 2, per frame); with ``temporal``, then halve time.

    The time conv (k=3, stride 2, no padding) follows the official chunk rule: on the first chunk it is skipped
    (frame 0 passes through and is remembered); on later chunks it sees ``[last frame of the previous chunk, chunk]``,
    so a 4-frame chunk gives 2 frames and a 2-frame chunk 1 frame.
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if temporal:
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = frame_conv2d(self.resample[1], F.pad(x, (0, 1, 0, 1)))
        if not self.temporal:
            return x
        last = x[:, :, -1:].clone()
        if cache.first_chunk:
            cache.set(self, last)
            return x
        previous = cache.get(self)
        cache.set(self, last)
        return self.time_conv(torch.cat([previous, x], dim=2))


class UpResample(nn.Module):
    """With ``temporal``, first double time; then double H and W (nearest, then a 3x3 conv, per frame).

    The time conv (causal, k=3, 2*C outputs = two frames per input frame) follows the official chunk rule: skipped
    on the first chunk (latent frame 0 is not doubled), run with zero past on the second chunk (frame 0's features
    are never used as context), and from the third chunk on with the cached last two inputs.
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.resample = nn.Sequential(NearestUp2x(), nn.Conv2d(dim, dim, 3, padding=1))
        if temporal:
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if self.temporal and not cache.first_chunk:
            b, c, t, h, w = x.shape
            pairs = self.time_conv(x, cache)  # [B, 2C, t, h, w]: channels [first frame | second frame]
            x = pairs.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return frame_conv2d(self.resample[1], self.resample[0](x))


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of a down-sampling level: fold (time, H, W) blocks into channels, then average groups
    of channels down to ``out_channels``. Time is zero-padded *in front* to a multiple of ``factor_t`` (a 1-frame
    chunk is averaged with a zero frame).
    """

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.factor_t = factor_t
        self.factor_s = factor_s
        self.group_size = in_channels * factor_t * factor_s * factor_s // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        pad_t = (-x.shape[2]) % ft
        if pad_t:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_channels, self.group_size, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut of an up-sampling level: repeat channels, then unfold them into (time, H, W) blocks
    (depth-to-space/time). On the first chunk the first ``factor_t - 1`` frames are dropped, matching the main path,
    which does not double latent frame 0.
    """

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.factor_t = factor_t
        self.factor_s = factor_s
        self.repeats = out_channels * factor_t * factor_s * factor_s // in_channels

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        b, c, t, h, w = x.shape
        x = x[:, :, None].expand(b, c, self.repeats, t, h, w)  # channel c*repeats + j
        x = x.reshape(b, self.out_channels, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first_chunk else x


def patchify(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, T, H, W]`` -> ``[B, C*4, T, H/2, W/2]``; channel ``c*4 + dw*2 + dh`` (official order: c, w-offset,
    h-offset)."""
    p = PATCH_SIZE
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, C*4, T, h, w]`` -> ``[B, C, T, 2h, 2w]``."""
    p = PATCH_SIZE
    b, cpp, t, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cpp // (p * p), t, h * p, w * p)
