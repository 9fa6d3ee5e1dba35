"""GRN refinement samplers: T2I / T2V / I2V bit maps (``sample_bits``) and class-to-image labels (``sample_c2i``).

Typical use::

    from grn_core.sampler import SamplerSettings, sample_bits
    result = sample_bits(refiner, text_cond, text_uncond, grid=(t, h, w), seed=42,
                         settings=SamplerSettings.for_task("t2i"))
    frames = tok.decode(hbq.bits_to_features(result.bits))

Modules: ``schedule`` (kept-fraction formulas), ``settings`` (settings, defaults, validation), ``step`` (torch
reference of one fused step), ``triton_step`` (its Triton kernel), ``loop`` / ``c2i_loop`` (the loops),
``running`` (the rows still running, retired together), ``states`` / ``events`` (callback payloads and
results), ``preview`` (latent -> RGB projection).
"""

from .c2i_loop import sample_c2i
from .events import SamplingInterrupted, SamplingResult, StepInfo
from .loop import sample_bits
from .preview import LatentRGBProjection, bits_preview
from .schedule import (bit_keep_fraction, c2i_keep_fraction, decide_remaining_steps, layout_cap, refine_fraction,
                       shift_progress)
from .settings import ADAPTIVE_DEFAULTS, AdaptiveSteps, C2ISettings, SamplerSettings
from .states import BLANK, ERASE, FILL, KEEP, StateCounts
from .step import StepOutput, fused_step_reference

__all__ = [
    "sample_bits", "sample_c2i", "SamplerSettings", "C2ISettings", "AdaptiveSteps", "ADAPTIVE_DEFAULTS",
    "SamplingResult", "StepInfo", "SamplingInterrupted", "StateCounts", "FILL", "KEEP", "ERASE", "BLANK",
    "LatentRGBProjection", "bits_preview", "fused_step_reference", "StepOutput",
    "layout_cap", "shift_progress", "refine_fraction", "bit_keep_fraction", "c2i_keep_fraction",
    "decide_remaining_steps",
]
