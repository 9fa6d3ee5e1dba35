"""Building blocks of the tokenizer's encoder and decoder: norm, residual and attention blocks, resolution levels.

Attribute names and ``nn.Sequential`` positions mirror the official modules so that ``state_dict()`` keys match the
released checkpoints exactly (e.g. ``residual.2.weight`` is the first conv of a residual block).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import compute_dtype
from .causal import AvgDown3D, CausalCache, CausalConv3d, DownResample, DupUp3D, UpResample

__all__ = ["AttentionBlock", "ChannelNorm", "DownLevel", "ResidualBlock", "UpLevel"]


class ChannelNorm(nn.Module):
    """``y = x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over the channel dim 1 (official "RMS_norm").

    This is L2 normalisation (no mean, no +eps inside a root), computed in at least float32.
    ``spatial_dims`` (2 for ``[N, C, H, W]``, 3 for ``[B, C, T, H, W]``) only fixes gamma's stored shape.
    """

    def __init__(self, channels: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.scale = math.sqrt(channels)
        self.gamma = nn.Parameter(torch.ones(channels, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = compute_dtype(x.dtype)
        h = F.normalize(x.to(work), dim=1, eps=1e-12)
        return (h * self.scale * self.gamma.to(work)).to(x.dtype)


class ResidualBlock(nn.Module):
    """``x -> shortcut(x) + conv(silu(norm(conv(silu(norm(x))))))`` with causal 3x3x3 convs.

    ``residual`` keeps the official positions: 0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 dropout, 6 conv.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            ChannelNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            ChannelNorm(out_dim),
            nn.SiLU(),
            nn.Dropout(0.0),  # training-only in the official code; kept so the indices line up
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x)), cache)
        h = conv2(F.silu(norm2(h)), cache)
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately, plus the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = ChannelNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames))  # [N, 3C, H, W]: channels [q | k | v]
        work = compute_dtype(x.dtype)
        q, k, v = qkv.flatten(2).transpose(1, 2).unsqueeze(1).to(work).chunk(3, dim=-1)  # each [N, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v).to(x.dtype)
        out = out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        out = self.proj(out).reshape(b, t, c, h, w).transpose(1, 2)
        return x + out


class DownLevel(nn.Module):
    """One encoder resolution level: ``num_res_blocks`` residual blocks, an optional down-sampling step, and a
    parameter-free averaging shortcut around all of it (official ``Down_ResidualBlock``)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, spatial: bool, temporal: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2 if spatial else 1)
        layers: list[nn.Module] = []
        for i in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim if i == 0 else out_dim, out_dim))
        if spatial:
            layers.append(DownResample(out_dim, temporal=temporal))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        h = x
        for layer in self.downsamples:
            h = layer(h, cache)
        return h + self.avg_shortcut(x)


class UpLevel(nn.Module):
    """One decoder resolution level: ``num_res_blocks + 1`` residual blocks, an optional up-sampling step, and (when
    it up-samples) a parameter-free duplicating shortcut (official ``Up_ResidualBlock``)."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, spatial: bool, temporal: bool) -> None:
        super().__init__()
        self.avg_shortcut = (
            DupUp3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2) if spatial else None
        )
        layers: list[nn.Module] = []
        for i in range(num_blocks):
            layers.append(ResidualBlock(in_dim if i == 0 else out_dim, out_dim))
        if spatial:
            layers.append(UpResample(out_dim, temporal=temporal))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        h = x
        for layer in self.upsamples:
            h = layer(h, cache)
        if self.avg_shortcut is None:
            return h
        return h + self.avg_shortcut(x, first_chunk=cache.first_chunk)
