"""Generating from a tiny-model directory and judging the clips: shared by calibration, benchmark and tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint_files import read_checkpoint
from ..data.judge import judge
from ..pipeline import GRNModel, decode_tokens, format_prompt, load_model
from ..sampler import AdaptiveSteps, LatentRGBProjection, SamplerSettings, sample_bits
from ..text.hashed import HashedTextEncoder


def load_model_dir(path: str | Path) -> GRNModel:
    """A directory with ``refiner.safetensors`` + ``tokenizer.safetensors`` made by ``python -m grn_core.train``,
    loaded as ``grn_core.models.load_tiny`` loads the shipped one (text encoder, preview, defaults from metadata)."""
    path = Path(path)
    model = load_model(path / "refiner.safetensors", path / "tokenizer.safetensors")
    meta = read_checkpoint(path / "refiner.safetensors").metadata
    model.text_encoder = HashedTextEncoder.from_config(json.loads(meta["grn.text_encoder"]))
    if "grn.preview" in meta:
        model.preview = LatentRGBProjection.from_dict(json.loads(meta["grn.preview"]))
    if "grn.defaults" in meta:
        model.defaults = json.loads(meta["grn.defaults"])
    model.name = path.name
    return model


def adaptive_rule(path: str | Path) -> AdaptiveSteps | None:
    """The calibrated adaptive-step rule stored in a trained refiner's metadata (``grn.adaptive``), if any."""
    meta = read_checkpoint(Path(path) / "refiner.safetensors").metadata
    return AdaptiveSteps(**json.loads(meta["grn.adaptive"])) if "grn.adaptive" in meta else None


def prompt_features(model: GRNModel, prompts: Sequence[str], task: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Features of each prompt (formatted as ``pipeline.encode_prompt`` formats it) and of the empty negative."""
    encoder = model.text_encoder
    cond = [encoder.encode(format_prompt(p, task, model.layout)) for p in prompts]
    return cond, encoder.encode("", allow_empty=True)


def generate_batch(model: GRNModel, prompts: Sequence[str], seed: int, settings: SamplerSettings,
                   frames: int, height: int, width: int, task: str = "t2v"):
    """One sample per prompt (sample k uses seed ``seed + k``) → (frames ``[B, T, H, W, 3]`` in [0, 1], result)."""
    cond, uncond = prompt_features(model, prompts, task)
    sf, tf = model.spatial_factor, model.temporal_factor
    grid = (1 + (frames - 1) // tf, height // sf, width // sf)
    with torch.inference_mode():
        result = sample_bits(model.refiner, cond, uncond if settings.guidance != 1.0 else None, grid=grid,
                             batch_size=len(prompts), seed=seed, settings=settings, aspect_ratio=height / width)
    return decode_tokens(model, result.bits), result


def judge_frames(frames: torch.Tensor, prompt: str) -> dict[str, bool]:
    """Judge one decoded sample ``[T, H, W, 3]`` in [0, 1] against its prompt (per attribute and ``all``)."""
    clip = frames.permute(3, 0, 1, 2) * 2 - 1  # [3, T, H, W] in [-1, 1], the judge's layout
    return judge(clip).matches(prompt)
