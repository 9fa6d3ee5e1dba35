"""The HBQ tokenizer: a causal 3-D conv VAE whose squashed mean ``tanh(mu)`` is quantized by HBQ.

    encode:  x [B,3,T,H,W] in [-1,1] -> patchify(2) -> Encoder3d (chunked: frame 0, then chunks of 4 frames)
             -> conv1 -> mu (first z_dim channels; log-variance unused) -> tanh -> z [B,d,1+(T-1)/4,H/16,W/16]
    decode:  z -> conv2 -> Decoder3d (one latent frame at a time: 1 frame, then 4 per latent frame)
             -> unpatchify -> frames [B,3,T,H,W]
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import hbq
from .blocks import AttentionBlock, ChannelNorm, DownLevel, ResidualBlock, UpLevel
from .causal import CausalCache, CausalConv3d, patchify, unpatchify
from .config import IMAGE_CHANNELS, PATCH_SIZE, TokenizerConfig

__all__ = ["Decoder3d", "Encoder3d", "HBQTokenizer"]

# Inputs are RGB in [-1, 1]; resampled images overshoot a little, but beyond this the caller passed [0, 255] or
# some other range by mistake.
_RANGE_LIMIT = 1.5


class Encoder3d(nn.Module):
    """Patchified frames ``[B, 12, T, H/2, W/2]`` -> ``[B, 2*z_dim, t, H/16, W/16]`` (one chunk at a time)."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        widths = config.encoder_widths
        levels = len(config.dim_mult)
        self.conv1 = CausalConv3d(IMAGE_CHANNELS * PATCH_SIZE**2, widths[0], 3, padding=1)
        self.downsamples = nn.Sequential(
            *(
                DownLevel(
                    widths[i],
                    widths[i + 1],
                    config.num_res_blocks,
                    spatial=i != levels - 1,
                    temporal=i < levels - 1 and bool(config.temporal_downsample[i]),
                )
                for i in range(levels)
            )
        )
        top = widths[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = nn.Sequential(ChannelNorm(top), nn.SiLU(), CausalConv3d(top, 2 * config.z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        h = self.conv1(x, cache)
        for level in self.downsamples:
            h = level(h, cache)
        res1, attn, res2 = self.middle
        h = res2(attn(res1(h, cache)), cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(h)), cache)


class Decoder3d(nn.Module):
    """One latent frame ``[B, z_dim, 1, h, w]`` -> patchified frames ``[B, 12, n, 8h, 8w]`` (n = 1 on the first
    chunk, ``temporal_factor`` after)."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        widths = config.decoder_widths
        levels = len(config.dim_mult)
        self.conv1 = CausalConv3d(config.z_dim, widths[0], 3, padding=1)
        top = widths[0]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.upsamples = nn.Sequential(
            *(
                UpLevel(
                    widths[i],
                    widths[i + 1],
                    config.num_res_blocks + 1,
                    spatial=i != levels - 1,
                    temporal=i < levels - 1 and bool(config.temporal_upsample[i]),
                )
                for i in range(levels)
            )
        )
        self.head = nn.Sequential(
            ChannelNorm(widths[-1]), nn.SiLU(), CausalConv3d(widths[-1], IMAGE_CHANNELS * PATCH_SIZE**2, 3, padding=1)
        )

    def forward(self, z: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        h = self.conv1(z, cache)
        res1, attn, res2 = self.middle
        h = res2(attn(res1(h, cache)), cache)
        for level in self.upsamples:
            h = level(h, cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(h)), cache)


class HBQTokenizer(nn.Module):
    """Causal video/image tokenizer of GRN (state-dict keys equal the official ``HBQ_Tokenizer``'s).

    ``encode`` maps RGB in [-1, 1] to tanh features in (-1, 1) (quantize them with :mod:`grn_core.hbq`);
    ``decode`` / ``decode_iter`` map features (or dequantized ``zq``) back to frames in about [-1, 1].
    Both run chunk by chunk with an explicit :class:`CausalCache`, so memory does not grow with the frame count.
    Run under ``torch.inference_mode()`` (or ``no_grad``) unless you need gradients.
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)  # -> (mu, log-variance)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    # ---- helpers --------------------------------------------------------------------------------------------------
    def _like_weights(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv2.weight
        return x.to(device=w.device, dtype=w.dtype)

    def _check_pixels(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError(
                f"x must be a float tensor in [-1, 1]; got {type(x).__name__}"
                f"{'' if not torch.is_tensor(x) else ' of dtype ' + str(x.dtype)}. Convert uint8 images with "
                f"x.float() / 127.5 - 1."
            )
        if x.dim() not in (4, 5):
            raise ValueError(
                f"x has shape {tuple(x.shape)}; the tokenizer takes a video [B, 3, T, H, W] or an image [B, 3, H, W]."
            )
        if x.shape[1] != IMAGE_CHANNELS:
            hint = ""
            if x.shape[-1] in (3, 4):
                hint = (
                    " It looks channel-last (e.g. a ComfyUI IMAGE [B, H, W, 3] in [0, 1]): "
                    "use x.permute(0, 3, 1, 2) * 2 - 1."
                )
            raise ValueError(
                f"x has {x.shape[1]} channels at dim 1 (shape {tuple(x.shape)}); the tokenizer takes RGB "
                f"[B, 3, T, H, W] or [B, 3, H, W].{hint}"
            )
        if x.dim() == 4:
            x = x.unsqueeze(2)
        t, h, w = x.shape[2:]
        tf = cfg.temporal_factor
        if t < 1:
            raise ValueError(f"T={t} frames: the tokenizer needs at least one frame (1+{tf}k frames).")
        if (t - 1) % tf:
            lower = 1 + tf * ((t - 1) // tf)
            raise ValueError(
                f"T={t} frames: the causal tokenizer needs 1+{tf}k frames; use {lower} or {lower + tf}"
                f" (trim or pad the clip)."
            )
        sf = cfg.spatial_factor
        for name, size in (("H", h), ("W", w)):
            if size % sf or size == 0:
                lower = sf * (size // sf)
                options = f"{lower} or {lower + sf}" if lower else f"{sf}"
                raise ValueError(
                    f"{name}={size}: the tokenizer needs H and W that are multiples of {sf}; resize or crop to "
                    f"{options}."
                )
        if x.numel():
            lo, hi = float(x.amin()), float(x.amax())
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("x contains NaN or infinite values; the tokenizer takes finite RGB values in [-1, 1].")
            if lo < -_RANGE_LIMIT or hi > _RANGE_LIMIT:
                raise ValueError(
                    f"x spans [{lo:.3g}, {hi:.3g}]; the tokenizer takes RGB in [-1, 1]. "
                    f"From [0, 255] use x / 127.5 - 1; from [0, 1] use x * 2 - 1."
                )
        return x

    def _check_latents(self, z: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(z) or not z.is_floating_point():
            raise ValueError(
                "z must be float features [B, d, t, h, w]; for HBQ bit labels use decode_bits(bits) or "
                "hbq.bits_to_features first."
            )
        if z.dim() == 4:
            z = z.unsqueeze(2)
        if z.dim() != 5 or z.shape[1] != self.config.z_dim or 0 in z.shape[2:]:
            raise ValueError(
                f"z has shape {tuple(z.shape)}; this tokenizer decodes [B, {self.config.z_dim}, t, h, w] features "
                f"(z_dim={self.config.z_dim}). Check that the tokenizer matches the model that made them."
            )
        return z

    # ---- encode ---------------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, H, W]`` or ``[B, 3, H, W]`` in [-1, 1] (T = 1 + 4k) -> ``tanh(mu)`` ``[B, d, 1 + k, H/16, W/16]``.

        Runs frame 0 alone, then chunks of ``temporal_factor`` frames, carrying the causal cache between them.
        """
        x = self._like_weights(self._check_pixels(x))
        patches = patchify(x)
        tf = self.config.temporal_factor
        starts = [0] + list(range(1, patches.shape[2], tf))
        cache = CausalCache()
        z_dim = self.config.z_dim
        outs = []
        for start in starts:
            chunk = patches[:, :, start : start + (1 if start == 0 else tf)]
            h = self.encoder(chunk, cache)
            # conv1 yields (mu, log-variance); inference uses mu only, so only its half of the 1x1x1 conv is run.
            mu = F.conv3d(h, self.conv1.weight[:z_dim], self.conv1.bias[:z_dim])
            outs.append(torch.tanh(mu))
            cache.advance()
        return torch.cat(outs, dim=2)

    def encode_bits(self, x: torch.Tensor, rounds: int | None = None) -> torch.Tensor:
        """Encode and quantize: uint8 HBQ bit labels ``[B, rounds*d, t, h, w]`` (rounds defaults to the config's)."""
        return hbq.features_to_bits(self.encode(x), rounds or self.config.hbq_rounds)

    # ---- decode ---------------------------------------------------------------------------------------------------
    def decode_iter(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """Decode latent frame by latent frame, yielding frame chunks ``[B, 3, n, H, W]``.

        n = 1 for the first latent frame and ``temporal_factor`` (4) for each later one. Only one chunk of
        activations plus the causal cache is alive at a time.
        """
        z = self._like_weights(self._check_latents(z))
        cache = CausalCache()
        for i in range(z.shape[2]):
            h = self.conv2(z[:, :, i : i + 1])
            yield unpatchify(self.decoder(h, cache))
            cache.advance()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, d, t, h, w]`` (or ``[B, d, h, w]``) features -> frames ``[B, 3, 1 + 4(t-1), 16h, 16w]`` in about [-1, 1]."""
        return torch.cat(list(self.decode_iter(z)), dim=2)

    def decode_bits(self, bits: torch.Tensor, rounds: int | None = None) -> torch.Tensor:
        """Dequantize HBQ bit labels ``[B, rounds*d, t, h, w]`` and decode them to frames."""
        rounds = rounds or self.config.hbq_rounds
        return self.decode(hbq.bits_to_features(bits, rounds, dtype=self.conv2.weight.dtype))

    def extra_repr(self) -> str:
        c = self.config
        return f"z_dim={c.z_dim}, dim={c.dim}, dec_dim={c.dec_dim}, factors=(t {c.temporal_factor}, s {c.spatial_factor})"
