"""Stage 2: train the tiny GRN_bit refiner with the official objective on cached tokenizer bits.

For a sample with ground-truth HBQ bits ``x`` ``[M*d, t, h, w]`` and prompt features ``c``:

    s      ~ U(0, 1)                                  sampled keep ratio, one per sample
    keep   ~ Bernoulli(s) per bit;  z ~ Bernoulli(1/2) per bit
    x_s    = where(keep, x, z)                        the refiner sees the true bit where kept, a random one elsewhere
    r      = mean(keep)                               the realised ratio is the step token's value
    c      = empty-prompt features with probability cond_dropout (what guidance subtracts at sampling time)
    loss   = CE(refiner(x_s, r, c), x)                cross-entropy on ALL bits, kept ones included

The forward is the refiner's own (``GRNRefiner.forward``: for the joint layout, ``[visual | text | step token]``
attend to each other, as in the official ``GRN.forward`` + ``video_encode``), run with autograd on. Prompts are
formatted exactly as the pipeline formats them at generation time (``<T2V>... high aesthetic and high quality
video.``; images ``<T2I>...``), and the empty prompt is the encoder's EOS row alone, as the pipeline's default
negative prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint_files import read_checkpoint
from ..checkpoints import checkpoint_metadata, save_checkpoint
from ..data.shapes import ShapesDataset
from ..pipeline import format_prompt
from ..refiner import GRNRefiner
from ..text.hashed import HashedTextEncoder
from ..tokenizer import HBQTokenizer
from .common import (STREAM_REFINER_IMAGE, STREAM_REFINER_INIT, STREAM_REFINER_STEPS, STREAM_REFINER_VIDEO,
                     Progress, WeightAverage, lr_at, set_lr, stream_seed)
from .recipe import TinyRecipe

log = logging.getLogger("grn_core.train")

REFINER_FILE = "refiner.safetensors"
CACHE_VERSION = 2


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class EncodedShapes:
    """HBQ bits of the training set: clips ``[N, M*d, t, h, w]`` and images ``[K, M*d, 1, h, w]`` (uint8)."""

    video_bits: torch.Tensor
    video_captions: list[str]
    image_bits: torch.Tensor
    image_captions: list[str]


def _encode(tok: HBQTokenizer, data: ShapesDataset, count: int, batch: int = 32) -> tuple[torch.Tensor, list[str]]:
    bits, captions = [], []
    with torch.no_grad():
        for start in range(0, count, batch):
            part = data.batch(range(start, min(count, start + batch)))
            bits.append(tok.encode_bits(part.pixels))
            captions.extend(part.captions)
    return torch.cat(bits), captions


def encode_dataset(tok: HBQTokenizer, recipe: TinyRecipe, seed: int) -> EncodedShapes:
    """Encode ``ref_clips`` clips and ``ref_images`` images of the shapes grammar with the trained tokenizer."""
    size = dict(height=recipe.height, width=recipe.width)
    videos = ShapesDataset(seed=stream_seed(seed, STREAM_REFINER_VIDEO), length=2**40, kind="video",
                           frames=recipe.frames, **size)
    video_bits, video_captions = _encode(tok, videos, recipe.ref_clips)
    if recipe.ref_images > 0:
        images = ShapesDataset(seed=stream_seed(seed, STREAM_REFINER_IMAGE), length=2**40, kind="image", **size)
        image_bits, image_captions = _encode(tok, images, recipe.ref_images)
    else:
        grid = video_bits.shape[1:2] + (1,) + video_bits.shape[3:]
        image_bits, image_captions = torch.zeros((0, *grid), dtype=torch.uint8), []
    return EncodedShapes(video_bits, video_captions, image_bits, image_captions)


def cached_encoded_dataset(tok: HBQTokenizer, tokenizer_fingerprint: str, recipe: TinyRecipe, seed: int,
                           cache_dir: Optional[Path]) -> EncodedShapes:
    """``encode_dataset``, stored in ``cache_dir`` under a key of the tokenizer's weights (``weights_fingerprint``
    of its file, which the caller has already computed), data sizes and seed."""
    if cache_dir is None:
        return encode_dataset(tok, recipe, seed)
    key_source = json.dumps({
        "version": CACHE_VERSION, "seed": seed, "frames": recipe.frames, "height": recipe.height,
        "width": recipe.width, "clips": recipe.ref_clips, "images": recipe.ref_images,
        "tokenizer": tokenizer_fingerprint,
    }, sort_keys=True)
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"tiny_bits_{key}.pt"
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        log.info("refiner: using cached tokenizer bits %s", path)
        return EncodedShapes(stored["video_bits"], list(stored["video_captions"]), stored["image_bits"],
                             list(stored["image_captions"]))
    data = encode_dataset(tok, recipe, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"video_bits": data.video_bits, "video_captions": data.video_captions,
                "image_bits": data.image_bits, "image_captions": data.image_captions}, path)
    log.info("refiner: cached tokenizer bits of %d clips and %d images in %s", len(data.video_captions),
             len(data.image_captions), path)
    return data


class PromptBank:
    """Encoder features of each training caption, formatted as the pipeline formats prompts; cached per caption."""

    def __init__(self, encoder: HashedTextEncoder, layout: str = "joint") -> None:
        self.encoder = encoder
        self.layout = layout
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self.empty = encoder.encode("", allow_empty=True)

    def features(self, caption: str, task: str) -> torch.Tensor:
        key = (caption, task)
        if key not in self._cache:
            self._cache[key] = self.encoder.encode(format_prompt(caption, task, self.layout))
        return self._cache[key]


# ---------------------------------------------------------------------------------------------- objective
def corrupt_bits(bits: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each bit of sample b with probability ``s_b ~ U(0, 1)``, else a fair random bit.

    bits: uint8 ``[B, C, t, h, w]``. Returns the mixed map (uint8, same shape) and the realised kept fraction
    ``[B]`` (float32): the value the step token is given.
    """
    batch = bits.shape[0]
    ratio = torch.rand(batch, generator=generator)
    keep = torch.rand(bits.shape, generator=generator) < ratio.view(-1, 1, 1, 1, 1)
    noise = torch.randint(0, 2, bits.shape, generator=generator, dtype=torch.uint8)
    mixed = torch.where(keep, bits, noise)
    return mixed, keep.flatten(1).float().mean(1)


def training_logits(ref: GRNRefiner, bits: torch.Tensor, step_values: torch.Tensor,
                    texts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Differentiable bit logits of one guidance branch, ``refiner(x_s, r, c)``: ``[B, t, h, w, M*d, 2]``.

    The refiner's own forward (:meth:`GRNRefiner.forward`, the pass ``step_logits`` samples with) under autograd.
    bits: uint8 ``[B, M*d, t, h, w]``; step_values ``[B]``; texts: one ``[L_b, C_text]`` per sample, lengths free
    (the pass attends consecutive samples of equal text length in one call: ``_batch`` orders them so).
    """
    return ref(bits, step_values, list(texts))


def bit_loss(logits: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the 2 classes of every bit, and the per-bit accuracy map.

    logits ``[B, t, h, w, C, 2]``, bits uint8 ``[B, C, t, h, w]``.
    """
    target = bits.permute(0, 2, 3, 4, 1).long()
    loss = F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1))
    correct = (logits[..., 1] > logits[..., 0]).long() == target
    return loss, correct


def init_refiner(ref: GRNRefiner) -> None:
    """GPT-style initialisation: N(0, 0.02) weights, zero biases, residual outputs scaled by 1/sqrt(2 depth)."""
    residual_std = 0.02 / (2 * ref.config.depth) ** 0.5
    for name, module in ref.named_modules():
        if isinstance(module, nn.Linear):
            std = residual_std if name.endswith(("o_proj", "down_proj")) else 0.02
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.zeros_(ref.head.proj.weight)  # start at p = 1/2 for every bit


def _optimizer(ref: GRNRefiner, recipe: TinyRecipe) -> torch.optim.Optimizer:
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    other = [p for p in ref.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.ref_weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.ref_lr, betas=(0.9, 0.98))


def _batch(data: EncodedShapes, image: bool, size: int, prompts: PromptBank, dropout: float,
           generator: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    bits_all = data.image_bits if image else data.video_bits
    captions = data.image_captions if image else data.video_captions
    task = "t2i" if image else "t2v"
    index = torch.randint(0, bits_all.shape[0], (size,), generator=generator)
    dropped = torch.rand(size, generator=generator) < dropout
    # Prompted samples first, empty-prompt ones last: equal-length neighbours share one attention call.
    order = torch.cat([index[~dropped], index[dropped]])
    texts = [prompts.features(captions[i], task) for i in index[~dropped].tolist()]
    texts += [prompts.empty] * int(dropped.sum())
    return bits_all[order], texts


def train_refiner(recipe: TinyRecipe, seed: int, data: EncodedShapes,
                  encoder: HashedTextEncoder) -> tuple[GRNRefiner, dict]:
    """Train from scratch; returns the weight-averaged refiner (eval mode, no grads) and a summary of the run."""
    recipe.validate()
    torch.manual_seed(stream_seed(seed, STREAM_REFINER_INIT))
    ref = GRNRefiner(recipe.refiner)
    init_refiner(ref)
    ref.train()
    average = WeightAverage(ref, recipe.ema)
    optimizer = _optimizer(ref, recipe)
    prompts = PromptBank(encoder, recipe.refiner.layout)
    generator = torch.Generator().manual_seed(stream_seed(seed, STREAM_REFINER_STEPS))
    use_images = recipe.image_every > 0 and data.image_bits.shape[0] > 0
    progress = Progress("refiner", recipe.ref_steps, recipe.log_every)
    for step in range(recipe.ref_steps):
        set_lr(optimizer, lr_at(step, recipe.ref_steps, recipe.ref_lr, recipe.ref_warmup))
        image = use_images and step % recipe.image_every == recipe.image_every - 1
        bits, texts = _batch(data, image, recipe.ref_batch, prompts, recipe.cond_dropout, generator)
        mixed, ratio = corrupt_bits(bits, generator)
        logits = training_logits(ref, mixed, ratio, texts)
        loss, correct = bit_loss(logits, bits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), recipe.grad_clip)
        optimizer.step()
        average.update(ref)
        with torch.no_grad():
            hidden = (mixed != bits).permute(0, 2, 3, 4, 1)  # bits the input got wrong: the real prediction task
            flipped_acc = correct[hidden].float().mean() if hidden.any() else torch.tensor(1.0)
        values = {"loss": float(loss.detach()), "acc": float(correct.float().mean()), "acc_flipped": float(flipped_acc)}
        progress.add(step, **values)
    model = average.model
    model.eval().requires_grad_(False)
    summary = {"steps": recipe.ref_steps, "seconds": round(progress.elapsed, 1), "final": progress.last,
               "history": progress.history}
    return model, summary


# -------------------------------------------------------------------------------------------------- files
def weights_fingerprint(path: Path) -> str:
    """SHA-256 of a safetensors file's tensors (names, dtypes, shapes, bytes in name order).

    Not of the file's bytes: safetensors writes its metadata header in no fixed order, so two saves of the same
    weights can differ byte-wise.
    """
    digest = hashlib.sha256()
    tensors = read_checkpoint(path).tensors
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def refiner_metadata(ref: GRNRefiner, seed: int, encoder: HashedTextEncoder, recipe: TinyRecipe,
                     preview: Optional[str], adaptive: Optional[dict], tokenizer_fingerprint: str) -> dict[str, str]:
    """The metadata ``grn_core.models.load_tiny`` reads (text encoder, preview, default size), plus the recipe, the
    calibrated adaptive rule and the fingerprint of the tokenizer weights the refiner was trained on (its partner)."""
    tasks = ("t2v", "t2i") if recipe.ref_images > 0 and recipe.image_every > 0 else ("t2v",)
    meta = checkpoint_metadata("refiner", ref.config, layout=ref.config.layout, tasks=tasks,
                               source=f"grn_core.train tiny recipe, seed {seed}")
    meta["grn.text_encoder"] = json.dumps(encoder.config, sort_keys=True)
    meta["grn.defaults"] = json.dumps({"width": recipe.width, "height": recipe.height, "frames": recipe.frames})
    meta["grn.recipe"] = json.dumps({"seed": seed, **recipe.to_dict()}, sort_keys=True)
    meta["grn.tokenizer_fingerprint"] = tokenizer_fingerprint
    if preview is not None:
        meta["grn.preview"] = preview
    if adaptive is not None:
        meta["grn.adaptive"] = json.dumps(adaptive, sort_keys=True)
    return meta


def save_refiner(ref: GRNRefiner, out_dir: Path, metadata: dict[str, str]) -> Path:
    return save_checkpoint(ref.state_dict(), Path(out_dir) / REFINER_FILE, metadata)
