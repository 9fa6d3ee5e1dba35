"""The T2I / T2V / I2V refiner of GRN ("GRN_bit"): config, model, 3-D RoPE and resolution buckets.

    from grn_core.refiner import GRNRefiner, RefinerConfig, infer_refiner_config
    ref = GRNRefiner(infer_refiner_config(state_dict, layout="joint"))
    ref.load_state_dict(state_dict, strict=True)
    cond, uncond = ref.step_logits(bits, step_value, text_cond, text_uncond, aspect_ratio=h / w)
"""

from .buckets import (
    ASPECT_RATIOS,
    ASPECT_TEMPLATES,
    BUCKET_SIDES,
    aspect_template,
    latent_frames,
    latent_grid,
    nearest_aspect,
    pixel_size,
    truncate_template,
    video_num_frames,
)
from .config import KEEP_CAP, LAYOUTS, PRESETS, GRN2b, GRN8b, RefinerConfig, infer_refiner_config, swiglu_hidden
from .model import GRNRefiner, TextContext

__all__ = [
    "ASPECT_RATIOS",
    "ASPECT_TEMPLATES",
    "BUCKET_SIDES",
    "GRN2b",
    "GRN8b",
    "GRNRefiner",
    "KEEP_CAP",
    "LAYOUTS",
    "PRESETS",
    "RefinerConfig",
    "TextContext",
    "aspect_template",
    "infer_refiner_config",
    "latent_frames",
    "latent_grid",
    "nearest_aspect",
    "pixel_size",
    "swiglu_hidden",
    "truncate_template",
    "video_num_frames",
]
