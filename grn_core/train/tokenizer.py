"""Stage 1: train the tiny HBQ tokenizer — a causal 3-D conv VAE with HBQ quantization in the loop.

Per step, for a batch of fresh procedural images, then clips, ``x`` ``[B, 3, T, H, W]`` in [-1, 1]:

    z    = tok.encode(x)                            tanh features [B, d, t, h, w]
    zq   = HBQ_M(z)                                 M = 4 rounds of binary search, |z - zq| <= 2^-M
    z~   = z + stopgrad(zq - z)                     straight-through estimator: forward sees zq, gradient flows to z
    loss = L1_w(tok.decode(z~), x) + L2_w(...)      weights 1 + fg_weight on (dilated) shape pixels

so the decoder only ever sees the values the refiner can produce (dequantized bits), and the encoder learns
features that survive quantization. The preview projection (latent -> RGB, for the sampler's live previews) is
fitted afterwards by least squares on the trained tokenizer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import hbq
from ..checkpoints import checkpoint_metadata, load_tokenizer, save_checkpoint
from ..data.shapes import ShapesDataset
from ..sampler import LatentRGBProjection
from ..tokenizer import HBQTokenizer
from .common import (STREAM_PREVIEW, STREAM_TOKENIZER_DATA, STREAM_TOKENIZER_IMAGES, STREAM_TOKENIZER_INIT, Progress,
                     lr_at, set_lr, stream_seed)
from .recipe import TinyRecipe

TOKENIZER_FILE = "tokenizer.safetensors"


def quantize_straight_through(z: torch.Tensor, rounds: int) -> torch.Tensor:
    """HBQ-quantized ``z`` in the forward pass, identity in the backward pass."""
    zq = hbq.bits_to_features(hbq.features_to_bits(z.detach(), rounds), rounds, dtype=z.dtype)
    return z + (zq - z).detach()


def foreground_weights(x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """``1 + fg_weight`` on pixels within 1 px of the shape, 1 on the background; ``[B, 1, T, H, W]``.

    The background is exactly -1 in every channel (``grn_core.data.shapes``); anti-aliased edges are included.
    """
    fg = (x > -0.99).any(dim=1, keepdim=True).to(x.dtype)
    fg = F.max_pool3d(fg, kernel_size=(1, 3, 3), stride=1, padding=(0, 1, 1))
    return 1.0 + fg_weight * fg


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, fg_weight: float) -> tuple[torch.Tensor, dict]:
    """Foreground-weighted L1 + L2 between frames ``[B, 3, T, H, W]``; returns the loss and plain-L1 / PSNR stats."""
    w = foreground_weights(target, fg_weight)
    err = recon - target
    norm = w.sum() * err.shape[1]
    l1 = (w * err.abs()).sum() / norm
    l2 = (w * err.square()).sum() / norm
    with torch.no_grad():
        mse = err.square().mean().clamp_min(1e-10)
        psnr = 10 * torch.log10(4.0 / mse)  # peak-to-peak range 2
    return l1 + l2, {"l1w": float(l1.detach()), "l2w": float(l2.detach()), "psnr": float(psnr)}


def tokenizer_datasets(recipe: TinyRecipe, seed: int) -> tuple[ShapesDataset, ShapesDataset]:
    """(images, clips) streams of fresh training samples for the two tokenizer phases."""
    size = dict(height=recipe.height, width=recipe.width, length=2**40)
    images = ShapesDataset(seed=stream_seed(seed, STREAM_TOKENIZER_IMAGES), kind="image", **size)
    clips = ShapesDataset(seed=stream_seed(seed, STREAM_TOKENIZER_DATA), kind="video", frames=recipe.frames, **size)
    return images, clips


def train_tokenizer(recipe: TinyRecipe, seed: int) -> tuple[HBQTokenizer, dict]:
    """Train the tokenizer from scratch; returns it (eval mode, no grads) and a summary of the run.

    Phase 1 (``tok_image_steps``): single frames. The first chunk of the causal tokenizer is an image tokenizer, and
    every spatial weight it trains is shared with the later chunks; an image costs a fraction of a clip, so the slow
    part of learning (from blobs to sharp shapes in the right colours) is done here. Phase 2 (``tok_steps``): whole
    clips, which adds the temporal paths (time convs, causal caches). One learning-rate schedule spans both.
    """
    recipe.validate()
    torch.manual_seed(stream_seed(seed, STREAM_TOKENIZER_INIT))
    tok = HBQTokenizer(recipe.tokenizer)
    tok.train()
    images, clips = tokenizer_datasets(recipe, seed)
    rounds = recipe.tokenizer.hbq_rounds
    optimizer = torch.optim.AdamW(tok.parameters(), lr=recipe.tok_lr, betas=(0.9, 0.99), weight_decay=0.0)
    total = recipe.tok_image_steps + recipe.tok_steps
    phases = [("tokenizer/images", images, recipe.tok_image_steps, recipe.tok_image_batch, 0),
              ("tokenizer/clips", clips, recipe.tok_steps, recipe.tok_batch, recipe.tok_image_steps)]
    history: list[dict] = []
    started = time.perf_counter()
    final: dict = {}
    for name, data, steps, batch, offset in phases:
        if steps <= 0:
            continue
        progress = Progress(name, steps, recipe.log_every)
        for step in range(steps):
            set_lr(optimizer, lr_at(offset + step, total, recipe.tok_lr, recipe.tok_warmup))
            x = data.batch(range(step * batch, (step + 1) * batch)).pixels
            recon = tok.decode(quantize_straight_through(tok.encode(x), rounds))
            loss, stats = reconstruction_loss(recon, x if x.dim() == 5 else x.unsqueeze(2), recipe.tok_fg_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tok.parameters(), recipe.grad_clip)
            optimizer.step()
            progress.add(step, loss=float(loss.detach()), **stats)
        history += [{"phase": name, **entry} for entry in progress.history]
        final = progress.last
    tok.eval().requires_grad_(False)
    summary = {"steps": total, "seconds": round(time.perf_counter() - started, 1), "final": final,
               "history": history}
    return tok, summary


def latent_rgb_pairs(tok: HBQTokenizer, clips: torch.Tensor, rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized features and the colour of the pixels each latent cell covers, both ``[N, d]`` / ``[N, 3]``.

    Latent frame 0 covers frame 0, latent frame k the ``temporal_factor`` frames after it; a cell covers a
    ``spatial_factor``-square patch: its colour is the patch mean.
    """
    cfg = tok.config
    with torch.no_grad():
        zq = hbq.bits_to_features(tok.encode_bits(clips, rounds), rounds)  # [B, d, t, h, w]
    tf, sf = cfg.temporal_factor, cfg.spatial_factor
    first = clips[:, :, :1]
    rest = clips[:, :, 1:]
    b, c, t_rest, hh, ww = rest.shape
    rest = rest.reshape(b, c, t_rest // tf, tf, hh, ww).mean(3)
    per_latent = torch.cat([first, rest], dim=2)  # [B, 3, t, H, W]
    rgb = F.avg_pool3d(per_latent, kernel_size=(1, sf, sf))  # [B, 3, t, h, w]
    return zq.movedim(1, -1).reshape(-1, zq.shape[1]), rgb.movedim(1, -1).reshape(-1, 3)


def fit_preview(tok: HBQTokenizer, recipe: TinyRecipe, seed: int) -> tuple[LatentRGBProjection, dict]:
    """Least-squares latent -> RGB projection on ``preview_clips`` held-out clips; returns it and its fit error."""
    data = ShapesDataset(seed=stream_seed(seed, STREAM_PREVIEW), length=2**40, kind="video",
                         frames=recipe.frames, height=recipe.height, width=recipe.width)
    features, rgb = [], []
    for start in range(0, recipe.preview_clips, 32):
        clips = data.batch(range(start, min(recipe.preview_clips, start + 32))).pixels
        f, c = latent_rgb_pairs(tok, clips, recipe.tokenizer.hbq_rounds)
        features.append(f)
        rgb.append(c)
    features, rgb = torch.cat(features), torch.cat(rgb)
    projection = LatentRGBProjection().fit(features, rgb)
    pred = features @ projection.weight + projection.bias
    rmse = float((pred - rgb).square().mean().sqrt())
    return projection, {"cells": int(features.shape[0]), "rmse": round(rmse, 4)}


def save_tokenizer(tok: HBQTokenizer, out_dir: Path, seed: int, extra: dict[str, str] | None = None) -> Path:
    meta = checkpoint_metadata("tokenizer", tok.config, source=f"grn_core.train tiny recipe, seed {seed}")
    meta.update(extra or {})
    return save_checkpoint(tok.state_dict(), Path(out_dir) / TOKENIZER_FILE, meta)


def load_trained_tokenizer(out_dir: Path) -> HBQTokenizer:
    path = Path(out_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist: run `python -m grn_core.train tokenizer --out {out_dir}` first.")
    return load_tokenizer(path, dtype=torch.float32)


def preview_metadata(projection: LatentRGBProjection) -> str:
    return json.dumps(projection.to_dict())
