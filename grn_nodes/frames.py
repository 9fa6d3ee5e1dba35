"""Decode Video and Encode Image: GRN tokens ↔ ComfyUI IMAGE frames, through the library's tokenizer stages."""

from __future__ import annotations

import numbers

import torch

from grn_core.pipeline import DECODE_OVERLAP, TokenResult, decode_tokens, encode_clip
from grn_core.request import prepare_clip

from .errors import DECODE, ENCODE_IMAGE, GRNNodeError, errors_from
from .loading import LoadedGRN


def decode_to_images(loaded: LoadedGRN, tokens: TokenResult, tile: int = 0,
                     overlap: int = DECODE_OVERLAP) -> torch.Tensor:
    """Tokens -> IMAGE ``[B*T, H, W, 3]`` float32 in [0, 1] on the CPU (frames of every sample, in order).

    ``grn_core.pipeline.decode_tokens`` does the work: sample by sample and latent frame by latent frame; ``tile`` > 0
    also splits space into tiles of ``tile`` latent cells with ``overlap`` cells blended (at most half a tile);
    ``tile`` 0 is automatic (whole frames unless the free GPU memory asks for tiles). Out of memory raises
    ``GRNOutOfMemoryError`` saying which settings to change.
    """
    model = loaded.model
    bits = tokens.bits if isinstance(tokens, TokenResult) else tokens
    if bits.shape[1] != model.rounds * model.latent_channels:
        raise GRNNodeError(f"{DECODE}: the tokens have {bits.shape[1]} bit channels but {loaded.tokenizer_name} "
                           f"decodes {model.rounds * model.latent_channels}; use the GRN_MODEL that made them.")
    if isinstance(tile, bool) or not (isinstance(tile, numbers.Integral) or
                                      (isinstance(tile, numbers.Real) and float(tile).is_integer())):
        raise GRNNodeError(f"{DECODE}: tile {tile!r} must be a whole number: 0 (automatic) or a tile size in latent "
                           "cells.")
    if tile < 0:
        raise GRNNodeError(f"{DECODE}: tile {tile} is negative; use 0 (automatic) or a tile size in latent cells.")
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Integral) or overlap < 0:
        raise GRNNodeError(f"{DECODE}: overlap {overlap!r} must be a whole number of latent cells >= 0.")
    with errors_from(DECODE):
        frames = decode_tokens(model, bits, tile=int(tile) if tile else "auto", overlap=int(overlap))
    return frames.flatten(0, 1).contiguous()  # [B, T, H, W, 3] -> [B*T, H, W, 3]


def encode_images(loaded: LoadedGRN, images: torch.Tensor, width: int = 0, height: int = 0) -> TokenResult:
    """IMAGE ``[N, H, W, 3]`` (frames of one clip) → clean tokens ``[1, rounds*d, t, h, w]``.

    The frames are prepared as I2V first frames are (:func:`grn_core.request.prepare_clip`: cover-resize with
    LANCZOS and centre crop to ``width`` x ``height``, 0 = the image's own size floored to the grid); N frames become
    the longest ``1 + 4k`` prefix.
    """
    model = loaded.model
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise GRNNodeError(f"{ENCODE_IMAGE}: expected an IMAGE [N, H, W, 3], got shape {shape}.")
    with errors_from(ENCODE_IMAGE):
        clip = prepare_clip(images, width, height, model.spatial_factor, model.temporal_factor)
        bits = encode_clip(model, clip)
    _, _, frames, h, w = clip.shape
    return TokenResult(bits, None, "encoded", w, h, frames, {"steps": [], "model": loaded.tokenizer_name})
