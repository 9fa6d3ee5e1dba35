"""Configuration of the HBQ tokenizer, the released presets, and reading a config back from a state dict."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

__all__ = ["TOKENIZER_PRESETS", "PATCH_SIZE", "TokenizerConfig", "infer_tokenizer_config", "tokenizer_preset"]

# The official tokenizer always folds 2x2 pixel patches into channels before the first conv (3 -> 12 channels).
PATCH_SIZE = 2
IMAGE_CHANNELS = 3


@dataclass(frozen=True)
class TokenizerConfig:
    """Sizes of the causal 3-D conv VAE (Wan2.2-style) behind HBQ.

    Encoder level widths are ``dim * [1] + dim * dim_mult`` (one entry per level input/output), decoder widths
    ``dec_dim * [dim_mult[-1]] + dec_dim * reversed(dim_mult)``. Every level but the last halves H and W; level i
    also halves time when ``temporal_downsample[i]`` is 1 (the decoder mirrors it).

    Attributes:
        dim: encoder base width (160 released).
        dec_dim: decoder base width (256 released).
        z_dim: latent channels d (64 for the image/video tokenizers, 16 for the ImageNet image tokenizer).
        dim_mult: width multipliers per level.
        num_res_blocks: residual blocks per encoder level (the decoder has one more per level).
        temporal_downsample: 0/1 per down-sampling level (``len(dim_mult) - 1`` entries; shorter lists are padded
            with 0).
        hbq_rounds: HBQ rounds M used by :meth:`HBQTokenizer.encode_bits` / ``decode_bits`` (not stored in weights).
    """

    dim: int = 160
    dec_dim: int = 256
    z_dim: int = 64
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[int, ...] = (0, 1, 1)
    hbq_rounds: int = 4

    def __post_init__(self) -> None:
        for name in ("dim", "dec_dim", "z_dim", "num_res_blocks", "hbq_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TokenizerConfig.{name}={value!r}: must be a positive integer.")
        mult = tuple(int(m) for m in self.dim_mult)
        if len(mult) < 1 or any(m < 1 for m in mult):
            raise ValueError(f"TokenizerConfig.dim_mult={self.dim_mult!r}: needs at least one positive multiplier.")
        temporal = tuple(int(bool(t)) for t in self.temporal_downsample)
        levels = len(mult) - 1
        if len(temporal) > levels:
            raise ValueError(
                f"TokenizerConfig.temporal_downsample={self.temporal_downsample!r} has {len(temporal)} entries but "
                f"only {levels} levels down-sample (len(dim_mult) - 1); drop the extra entries."
            )
        temporal = temporal + (0,) * (levels - len(temporal))
        object.__setattr__(self, "dim_mult", mult)
        object.__setattr__(self, "temporal_downsample", temporal)
        # The parameter-free shortcuts average / repeat channel groups: the widths must divide evenly.
        enc = self.encoder_widths
        for i in range(len(mult)):
            factor = (2 ** temporal[i] * 4) if i < levels else 1
            if (enc[i] * factor) % enc[i + 1]:
                raise ValueError(
                    f"TokenizerConfig: encoder level {i} goes {enc[i]} -> {enc[i + 1]} channels, which the averaging "
                    f"shortcut cannot split into equal groups; choose dim_mult so widths divide evenly."
                )
        dec = self.decoder_widths
        for i in range(levels):
            factor = 2 ** temporal[levels - 1 - i] * 4
            if (dec[i + 1] * factor) % dec[i]:
                raise ValueError(
                    f"TokenizerConfig: decoder level {i} goes {dec[i]} -> {dec[i + 1]} channels, which the duplicating "
                    f"shortcut cannot map; choose dim_mult so widths divide evenly."
                )

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def encoder_widths(self) -> list[int]:
        return [self.dim * m for m in (1, *self.dim_mult)]

    @property
    def decoder_widths(self) -> list[int]:
        return [self.dec_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult))]

    @property
    def temporal_upsample(self) -> tuple[int, ...]:
        """Per decoder level (deepest first): the encoder's flags reversed."""
        return tuple(reversed(self.temporal_downsample))

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along H and W (16 released: patchify 2 x three halvings)."""
        return PATCH_SIZE * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first (4 released): T = 1 + temporal_factor * (t - 1)."""
        return 2 ** sum(self.temporal_downsample)

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.temporal_factor

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_factor * (latent_frames - 1)

    # ---- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dim_mult"] = list(self.dim_mult)
        d["temporal_downsample"] = list(self.temporal_downsample)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TokenizerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        # Accept the official argument names too, so a config written from the official args reads as is.
        aliases = {"latent_channels": "z_dim", "temperal_downsample": "temporal_downsample"}
        values = {aliases.get(k, k): v for k, v in d.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TokenizerConfig.from_dict: unknown keys {unknown}; known: {sorted(known)}.")
        for key in ("dim_mult", "temporal_downsample"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


# Released files: HBQ_image_video_tokenizer_64dim_M4_*.ckpt / HBQ_tokenizer_64dim_M4.ckpt (T2I/T2V/I2V) and
# HBQ_image_tokenizer_16dim_M4.ckpt (ImageNet C2I). infer_tokenizer_config on the real weights is authoritative.
TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    "hbq_64d": TokenizerConfig(dim=160, dec_dim=256, z_dim=64),
    "hbq_16d": TokenizerConfig(dim=160, dec_dim=256, z_dim=16),
}


def tokenizer_preset(name: str, **overrides: Any) -> TokenizerConfig:
    if name not in TOKENIZER_PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(TOKENIZER_PRESETS)}.")
    return dataclasses.replace(TOKENIZER_PRESETS[name], **overrides)


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"not an HBQ tokenizer state dict: key '{key}' is missing.")
    return tuple(sd[key].shape)


def infer_tokenizer_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> TokenizerConfig:
    """Read the tokenizer sizes from tensor names and shapes alone.

    ``hbq_rounds`` is not stored in the weights (default 4); pass it (or any other field) as an override.
    Raises ValueError naming the missing / odd key when the dict is not an HBQ tokenizer.
    """
    keys = state_dict.keys()
    if "encoder.conv1.weight" not in keys and any(k in keys for k in ("ema", "vae")):
        raise ValueError("this is an official tokenizer file's outer dict; pass its 'ema' (or 'vae') entry.")
    conv_in = _shape(state_dict, "encoder.conv1.weight")  # [dim, 12, 3, 3, 3]
    if len(conv_in) != 5 or conv_in[1] != IMAGE_CHANNELS * PATCH_SIZE**2:
        raise ValueError(
            f"not an HBQ tokenizer: 'encoder.conv1.weight' has shape {conv_in}; expected [dim, 12, 3, 3, 3]."
        )
    dim = conv_in[0]
    z_dim = _shape(state_dict, "conv2.weight")[0]
    if _shape(state_dict, "conv1.weight")[0] != 2 * z_dim:
        raise ValueError(f"odd tokenizer: 'conv1.weight' should have 2*z_dim={2 * z_dim} outputs.")

    level_re = re.compile(r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.")
    blocks: dict[int, set[int]] = {}
    for k in keys:
        m = level_re.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ValueError("not an HBQ tokenizer: no contiguous 'encoder.downsamples.{i}' levels.")
    levels = len(blocks)
    num_res_blocks = sum(1 for j in blocks[0] if f"encoder.downsamples.0.downsamples.{j}.residual.0.gamma" in keys)
    if num_res_blocks < 1:
        raise ValueError("not an HBQ tokenizer: 'encoder.downsamples.0.downsamples.0.residual.0.gamma' is missing.")

    dim_mult = []
    for i in range(levels):
        out = _shape(state_dict, f"encoder.downsamples.{i}.downsamples.0.residual.6.weight")[0]
        if out % dim:
            raise ValueError(f"odd tokenizer: encoder level {i} width {out} is not a multiple of dim={dim}.")
        dim_mult.append(out // dim)
    temporal = [
        int(f"encoder.downsamples.{i}.downsamples.{num_res_blocks}.time_conv.weight" in keys) for i in range(levels - 1)
    ]

    dec_in = _shape(state_dict, "decoder.conv1.weight")[0]
    if dec_in % dim_mult[-1]:
        raise ValueError(f"odd tokenizer: 'decoder.conv1.weight' width {dec_in} is not a multiple of {dim_mult[-1]}.")
    dec_dim = dec_in // dim_mult[-1]
    # The decoder must mirror the encoder's temporal steps, or decode would not invert encode's frame count.
    for i, flag in enumerate(reversed(temporal)):
        has = f"decoder.upsamples.{i}.upsamples.{num_res_blocks + 1}.time_conv.weight" in keys
        if has != bool(flag):
            raise ValueError(
                f"odd tokenizer: decoder level {i} {'has' if has else 'lacks'} a time_conv but the encoder "
                f"{'does not down-sample' if has else 'down-samples'} time at the mirrored level."
            )
    values: dict[str, Any] = dict(
        dim=dim,
        dec_dim=dec_dim,
        z_dim=z_dim,
        dim_mult=tuple(dim_mult),
        num_res_blocks=num_res_blocks,
        temporal_downsample=tuple(temporal),
    )
    values.update(overrides)
    return TokenizerConfig.from_dict(values)
