"""The tiny model's training recipe: every size, step count and learning rate in one dataclass.

``TinyRecipe()`` is the recipe of the shipped checkpoint (``grn_core/assets/tiny``); ``TinyRecipe.micro()`` is a
seconds-long variant for smoke tests. Why these sizes (all measured on the shared 2-core CPU this project targets):

* clips: 9 frames at 32 x 32, the data generator's default and the judge's design point (a shape is 8-13 px wide).
* tokenizer: spatial factor 8 (``dim_mult`` of 3 levels: patchify 2 x two halvings) and temporal factor 4, so a clip
  is a 3 x 4 x 4 latent grid: 48 tokens, each covering an 8 x 8 patch of 4 frames. Factor 16 would leave 2 x 2 cells
  (no spatial layout to refine); factor 4 would give 192-320 tokens and a 4-7x costlier refiner. Encoder width 8,
  decoder width 16, ``dim_mult`` (2, 2, 2) (the same channels at every level: more at full resolution, where edges
  are drawn, than (1, 4, 4)) and one residual block per level. The decoder is the wider one because it draws the
  corners that tell a square from a circle at 8-13 px: an earlier tokenizer with an 8-wide decoder reproduced only
  86 % of shapes (judged round trip of 400 clips; circles and squares confused), which capped generation at about
  that. CPU 3-D convolutions with few channels are bound by memory traffic, not arithmetic, and
  small batches run 3-5x faster per sample than large ones because they stay in cache. Learning goes through a
  plateau (blurred blobs, colours mixed) before shapes get sharp; single images cost ~1/4 of a clip per step, so the
  plateau is crossed on images first (the first chunk of the causal tokenizer is an image tokenizer whose spatial
  weights every later chunk shares), then clips add the temporal paths.
* refiner: width 128, depth 4, 4 heads of 32, SwiGLU 384 (0.94 M parameters); a guided 50-step generation of the
  48-token grid takes ~0.6 s on one core. 4000 steps (~25 min): on the same tokenizer, shape accuracy on the shapes
  benchmark was 78.5 % after 2000 steps, 89.6 % after 3500 and 94.4 % after 4000 (colour and direction 98-100 %);
  the whole recipe then takes ~57 min on the 2-core CPU, inside the 60 min budget.
* text: the download-free hashed encoder at 64 channels (the refiner's ``text_channels``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..refiner import RefinerConfig
from ..tokenizer import TokenizerConfig


def _tiny_tokenizer() -> TokenizerConfig:
    return TokenizerConfig(dim=8, dec_dim=16, z_dim=16, dim_mult=(2, 2, 2), num_res_blocks=1,
                           temporal_downsample=(1, 1), hbq_rounds=4)


def _tiny_refiner() -> RefinerConfig:
    return RefinerConfig(width=128, depth=4, heads=4, kv_heads=4, mlp_hidden=384, block_chunks=1, text_channels=64,
                         latent_channels=16, rounds=4, layout="joint")


@dataclass
class TinyRecipe:
    """Everything the training run depends on besides the seed.

    Data: ``frames`` x ``height`` x ``width`` clips of the shapes grammar (``grn_core.data.shapes``).
    Tokenizer stage: ``tok_image_steps`` AdamW steps of ``tok_image_batch`` fresh images, then ``tok_steps`` of
    ``tok_batch`` fresh clips, peak ``tok_lr`` (linear warm-up, one cosine decay over both phases), loss =
    foreground-weighted L1 + L2 of the reconstruction through HBQ (straight-through estimator);
    ``tok_fg_weight`` is the extra weight of pixels near the shape (the shape covers ~10 % of a frame, and a
    reconstruction that drops it would otherwise look good).
    Refiner stage: ``ref_clips`` clips (plus ``ref_images`` images) are encoded to HBQ bits once; ``ref_steps`` steps of
    ``ref_batch`` samples with the official objective (per-bit keep mask of a sampled ratio, random bits elsewhere,
    cross-entropy on all bits, realised ratio as the step token, ``cond_dropout`` of prompts replaced by the empty
    prompt). Every ``image_every``-th step is an image batch (0: never). ``ema`` decay of the shipped weights.
    """

    frames: int = 9
    height: int = 32
    width: int = 32
    tokenizer: TokenizerConfig = field(default_factory=_tiny_tokenizer)
    refiner: RefinerConfig = field(default_factory=_tiny_refiner)
    text_dim: int = 64

    tok_image_steps: int = 2000
    tok_image_batch: int = 16
    tok_steps: int = 1500
    tok_batch: int = 8
    tok_lr: float = 3e-3
    tok_warmup: int = 100
    tok_fg_weight: float = 8.0

    ref_clips: int = 6144
    ref_images: int = 1024
    ref_steps: int = 4000
    ref_batch: int = 32
    ref_lr: float = 1.5e-3
    ref_warmup: int = 100
    ref_weight_decay: float = 0.01
    cond_dropout: float = 0.1
    image_every: int = 8
    ema: float = 0.995
    grad_clip: float = 1.0

    preview_clips: int = 256
    log_every: int = 50
    threads: int = 1

    @classmethod
    def micro(cls) -> "TinyRecipe":
        """A recipe that trains one step of each stage in seconds (tests only; the result is useless)."""
        return cls(
            frames=5, height=16, width=16,
            tokenizer=TokenizerConfig(dim=4, dec_dim=4, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1,
                                      temporal_downsample=(1, 1), hbq_rounds=4),
            refiner=RefinerConfig(width=32, depth=1, heads=2, kv_heads=2, mlp_hidden=64, block_chunks=1,
                                  text_channels=16, latent_channels=4, rounds=4, layout="joint", step_freq_dim=32),
            text_dim=16, tok_image_steps=1, tok_image_batch=2, tok_steps=1, tok_batch=2, tok_warmup=1, ref_clips=4,
            ref_images=2, ref_steps=1, ref_batch=2, ref_warmup=1, image_every=0, preview_clips=2, log_every=1,
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["tokenizer"] = self.tokenizer.to_dict()
        data["refiner"] = self.refiner.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TinyRecipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TinyRecipe has no field(s) {unknown}; known fields: {sorted(known)}.")
        values = dict(data)
        if isinstance(values.get("tokenizer"), dict):
            values["tokenizer"] = TokenizerConfig.from_dict(values["tokenizer"])
        if isinstance(values.get("refiner"), dict):
            values["refiner"] = RefinerConfig.from_dict(values["refiner"])
        return cls(**values)

    def replace(self, **changes: Any) -> "TinyRecipe":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "TinyRecipe":
        if self.refiner.latent_channels != self.tokenizer.z_dim:
            raise ValueError(f"refiner.latent_channels={self.refiner.latent_channels} must equal the tokenizer's "
                             f"z_dim={self.tokenizer.z_dim}.")
        if self.refiner.rounds != self.tokenizer.hbq_rounds:
            raise ValueError(f"refiner.rounds={self.refiner.rounds} must equal tokenizer.hbq_rounds="
                             f"{self.tokenizer.hbq_rounds}.")
        if self.refiner.text_channels != self.text_dim:
            raise ValueError(f"refiner.text_channels={self.refiner.text_channels} must equal text_dim={self.text_dim}.")
        sf, tf = self.tokenizer.spatial_factor, self.tokenizer.temporal_factor
        if self.height % sf or self.width % sf or (self.frames - 1) % tf:
            raise ValueError(f"clip size {self.frames}x{self.height}x{self.width} does not fit the tokenizer "
                             f"(frames 1+{tf}k, sides multiples of {sf}).")
        if self.tok_image_steps < 0:
            raise ValueError(f"TinyRecipe.tok_image_steps={self.tok_image_steps!r}: must be >= 0.")
        for name in ("tok_steps", "tok_batch", "tok_image_batch", "ref_steps", "ref_batch", "ref_clips", "threads",
                     "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TinyRecipe.{name}={value!r}: must be a positive integer.")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"TinyRecipe.cond_dropout={self.cond_dropout!r}: must be in [0, 1).")
        return self
