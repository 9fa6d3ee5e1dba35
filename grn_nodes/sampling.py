"""Refine Sampler: widgets → a request the library resolves (size, settings, first frame), the run, its events.

Every decision is the library's (:mod:`grn_core.request`): sizes snap to the grid and frames floor to ``1 + 4k`` as
the official code does, settings start from the task's official preset, adaptive steps use the model's own rule
unless ``adaptive_rule`` is ``custom``, and a first frame is prepared as the official I2V demo prepares it.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from grn_core.pipeline import GenerationRequest, TokenResult, generate_class_tokens, generate_tokens, \
    refiner_stage_bytes
from grn_core.refiner.buckets import BUCKET_SIDES
from grn_core.releases import I2V_FILE
from grn_core.request import SizePlan, prepare_first_frame, resolve_settings
from grn_core.request import plan_size as resolve_size
from grn_core.sampler import C2ISettings, SamplerSettings, StepInfo

from .errors import SAMPLER, GRNNodeError, errors_from
from .loading import LoadedGRN
from .prompting import GRNConditioning
from .widget_events import FIXED_EVERY_EVENT_CELLS, build_step_event

RESOLUTIONS = ("custom",) + tuple(BUCKET_SIDES)
ASPECTS = {"from width/height": None, "1:1": 1.0, "16:9": 9 / 16, "9:16": 16 / 9, "4:3": 3 / 4, "3:4": 4 / 3,
           "3:2": 2 / 3, "2:3": 3 / 2, "2:1": 1 / 2, "1:2": 2.0}  # name w:h -> h/w
# "model": the model's own adaptive rule (its file's calibrated one, else the family's); "custom": the widgets'.
ADAPTIVE_RULES = ("model", "custom")


def choose_task(loaded: LoadedGRN, conditioning: Optional[GRNConditioning], has_first_frame: bool) -> str:
    model = loaded.model
    if model.is_c2i:
        if has_first_frame:
            raise GRNNodeError(f"{SAMPLER}: {loaded.refiner_name} is class-to-image; disconnect first_frame.")
        return "c2i"
    if conditioning is None:
        raise GRNNodeError(f"{SAMPLER}: connect a conditioning from GRN Encode Prompt.")
    if has_first_frame:
        if "i2v" not in model.tasks and model.layout != "joint":
            raise GRNNodeError(
                f"{SAMPLER}: {loaded.refiner_name} has no image-to-video (prefix layout); disconnect first_frame, or "
                f"load the 8B {I2V_FILE}, which does I2V.")
        return "i2v"  # a joint model not trained for it runs with a warning, as the official code allows
    if conditioning.default_task == "i2v":
        if "t2v" in conditioning.features:
            return "t2v"
        raise GRNNodeError(f"{SAMPLER}: the conditioning is for I2V; connect a first_frame image.")
    return conditioning.default_task


def plan_size(loaded: LoadedGRN, width: int, height: int, frames: int, resolution: str = "custom",
              aspect: str = "from width/height", duration: float = 0.0, task: str = "t2v") -> SizePlan:
    """The widgets' size → :func:`grn_core.request.plan_size` (aspect names are width:height)."""
    if resolution not in RESOLUTIONS:
        raise GRNNodeError(f"{SAMPLER}: resolution '{resolution}' is not one of {', '.join(RESOLUTIONS)}.")
    if aspect not in ASPECTS:
        raise GRNNodeError(f"{SAMPLER}: aspect '{aspect}' is not one of {', '.join(ASPECTS)}.")
    with errors_from(SAMPLER):
        return resolve_size(loaded.model, task, width, height, frames, duration=duration or 0.0,
                            resolution=resolution, h_over_w=ASPECTS[aspect])


def whole(node: str, name: str, value: Any) -> int:
    """A widget that must hold a whole number (a workflow file may carry 3.7 or NaN: refused, never truncated)."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or
                                       (isinstance(value, numbers.Real) and float(value).is_integer())):
        raise GRNNodeError(f"{node}: {name} {value!r} must be a whole number.")
    return int(value)


def number(node: str, name: str, value: Any) -> float:
    """A widget that must hold a finite number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise GRNNodeError(f"{node}: {name} {value!r} must be a finite number.")
    return float(value)


def build_settings(loaded: LoadedGRN, task: str, steps: int, guidance: float, temperature: float,
                   shift: float = 1.0, guidance_interval: float = 0.0, adaptive: bool = False, min_steps: int = 20,
                   warmup: int = 5, k: float = 90.0, b: float = 0.0,
                   adaptive_rule: str = "model") -> SamplerSettings | C2ISettings:
    """The widgets' settings → :func:`grn_core.request.resolve_settings`. With ``adaptive_rule`` ``model`` the
    rule's numbers are the model's own (the warm-up/min/k/b widgets are for ``custom``)."""
    if adaptive_rule not in ADAPTIVE_RULES:
        raise GRNNodeError(f"{SAMPLER}: adaptive_rule '{adaptive_rule}' is not one of {', '.join(ADAPTIVE_RULES)}.")
    custom = dict(warmup=whole(SAMPLER, "warmup", warmup), min_steps=whole(SAMPLER, "min_steps", min_steps),
                  k=number(SAMPLER, "k", k), b=number(SAMPLER, "b", b)) \
        if adaptive and adaptive_rule == "custom" else {}
    bit_only = {} if task == "c2i" else dict(shift=number(SAMPLER, "shift", shift),
                                             cfg_interval=number(SAMPLER, "guidance_interval", guidance_interval))
    with errors_from(SAMPLER):
        return resolve_settings(loaded.model, task, steps=whole(SAMPLER, "steps", steps),
                                guidance=number(SAMPLER, "guidance", guidance),
                                temperature=number(SAMPLER, "temperature", temperature), adaptive=bool(adaptive),
                                **bit_only, **custom)


def describe_settings(settings: SamplerSettings | C2ISettings) -> str:
    """One line for the node's text output: what the run used (the adaptive rule's numbers included)."""
    text = f"{settings.steps} steps, guidance {settings.guidance:g}, temperature {settings.temperature:g}"
    rule = settings.adaptive
    if rule is not None:
        text += (f"; adaptive: D = {rule.k:g}*H {rule.b:+g}, warm-up {rule.warmup}, at least {rule.min_steps} steps"
                 + (" (calibrated)" if rule.calibrated else ""))
    return text


def first_frame_from_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, 3]`` (the first image is used) → first frame ``[3, height, width]`` in [-1, 1],
    prepared as the official I2V demo prepares its image (:func:`grn_core.request.prepare_first_frame`)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (3, 4) or \
            image.shape[0] < 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise GRNNodeError(f"{SAMPLER}: first_frame must be an IMAGE [B, H, W, 3] with at least one image, got shape "
                           f"{shape}.")
    with errors_from(SAMPLER):
        return prepare_first_frame(image[0], width, height)


# ==== editing: the token map as a canvas ==============================================================================

@dataclass
class EditPlan:
    """What Refine Sampler hands the library for an edit (:mod:`grn_core.editing`): the source's bits on the plan's
    grid, the kept latent cells ``[t, h, w]`` (or None), the strength, and a note for the node's text."""

    init_bits: Optional[torch.Tensor] = None
    fixed: Optional[torch.Tensor] = None
    strength: float = 1.0
    note: str = ""
    warnings: list[str] = field(default_factory=list)


def mask_frames(mask: Any) -> torch.Tensor:
    """ComfyUI MASK ``[B, H, W]`` or ``[H, W]`` (floats 0..1) → ``[T, H, W]`` for :func:`grn_core.editing.mask_to_cells`
    (a batch of one is a single-frame mask for every frame)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3) or min(mask.shape) < 1:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise GRNNodeError(f"{SAMPLER}: mask must be a MASK [B, H, W] or [H, W] (white 1 = regenerate, black 0 = "
                           f"keep), got shape {shape}.")
    return mask.detach().float().cpu()


def plan_edit(loaded: LoadedGRN, plan: SizePlan, task: str, source_tokens: Any = None, mask: Any = None,
              strength: Any = 1.0, extend_from: Any = None, grow: int = 0) -> Optional[EditPlan]:
    """The editing inputs → an :class:`EditPlan`, or None for a plain run. Only translation: the library decides
    which cells are kept (``mask_to_cells``), the start step (``strength_to_start``) and what extending keeps
    (``extend_source``, which encodes: run it where the tokenizer is loaded, see :func:`extend_bits`)."""
    from grn_core.editing import check_strength
    from grn_core.pipeline import latent_grid_for

    with errors_from(SAMPLER):
        strength = check_strength(strength)
    edited = source_tokens is not None or mask is not None or extend_from is not None or strength != 1.0
    if not edited:
        return None
    if task == "c2i":
        raise GRNNodeError(f"{SAMPLER}: {loaded.refiner_name} is class-to-image; editing (source_tokens, mask, "
                           "extend_from, strength below 1) needs a text-to-image or text-to-video model.")
    model = loaded.model
    with errors_from(SAMPLER):
        grid = latent_grid_for(model, plan.width, plan.height, plan.frames)
    if extend_from is not None:
        if source_tokens is not None or mask is not None:
            raise GRNNodeError(f"{SAMPLER}: extend_from continues a clip from its last frame; disconnect "
                               "source_tokens and mask (or extend_from to edit a source).")
        if strength != 1.0:
            raise GRNNodeError(f"{SAMPLER}: extend_from generates the new frames; set strength to 1 (strength "
                               "below 1 refines source_tokens).")
        if grid[0] < 2:
            raise GRNNodeError(f"{SAMPLER}: extending a clip makes a video; set frames to at least 5 (the kept "
                               "frame plus new ones).")
        return EditPlan(strength=1.0, note="extending: latent frame 1 is the given clip's last frame (kept)")
    if source_tokens is None:
        raise GRNNodeError(f"{SAMPLER}: " + ("a mask" if mask is not None else f"strength {strength:g}") +
                           " needs source_tokens: connect Encode Image's tokens of the image or clip to edit "
                           "(or set strength to 1 and disconnect the mask).")
    bits = getattr(source_tokens, "bits", source_tokens)
    expected = (model.rounds * model.latent_channels, *grid)
    if not isinstance(bits, torch.Tensor) or bits.dim() != 5 or bits.shape[0] != 1 or tuple(bits.shape[1:]) != expected:
        shape = tuple(bits.shape) if isinstance(bits, torch.Tensor) else type(bits).__name__
        src = ""
        if all(hasattr(source_tokens, k) for k in ("width", "height", "frames")):
            src = f" ({source_tokens.width}x{source_tokens.height}, {source_tokens.frames} frames)"
        raise GRNNodeError(
            f"{SAMPLER}: source_tokens{src} have shape {shape} but this {plan.width}x{plan.height}, {plan.frames}-"
            f"frame output needs [1, {', '.join(map(str, expected))}]; set width/height/frames to the source's, or "
            f"encode it with Encode Image at width {plan.width}, height {plan.height} from {plan.frames} frames.")
    result = EditPlan(init_bits=bits.to(torch.uint8), strength=strength)
    if mask is not None:
        from grn_core.editing import mask_to_cells

        def warn(text: str) -> None:
            logging.getLogger(__name__).warning("%s: %s", SAMPLER, text)
            result.warnings.append(text)

        with errors_from(SAMPLER):
            result.fixed = mask_to_cells(mask_frames(mask), model.spatial_factor, model.temporal_factor,
                                         grow=whole(SAMPLER, "grow", grow),
                                         size=(plan.frames, plan.height, plan.width), strength=strength, warn=warn)
    return result


def extend_bits(loaded: LoadedGRN, plan: SizePlan, extend_from: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``extend_from`` IMAGE ``[N, H, W, 3]`` (the previous clip) → ``(init_bits, fixed)`` from its last frame,
    prepared as a first frame (:func:`grn_core.request.prepare_first_frame`) and encoded by
    :func:`grn_core.editing.extend_source` (needs the tokenizer)."""
    from grn_core.editing import extend_source
    from grn_core.pipeline import latent_grid_for

    if not isinstance(extend_from, torch.Tensor) or extend_from.dim() != 4 or extend_from.shape[-1] not in (3, 4) \
            or extend_from.shape[0] < 1:
        shape = tuple(extend_from.shape) if isinstance(extend_from, torch.Tensor) else type(extend_from).__name__
        raise GRNNodeError(f"{SAMPLER}: extend_from must be an IMAGE [N, H, W, 3] (the previous clip's frames, e.g. "
                           f"from Decode Video), got shape {shape}.")
    with errors_from(SAMPLER):
        last = prepare_first_frame(extend_from[-1], plan.width, plan.height)
        init, fixed = extend_source(loaded.model, last, latent_grid_for(loaded.model, plan.width, plan.height,
                                                                        plan.frames))
    return init, fixed[0, 0]


def describe_edit(edit: EditPlan, settings: SamplerSettings | C2ISettings) -> str:
    """One line for the node's text: what was kept and where the run started."""
    from grn_core.editing import strength_to_start

    parts = [edit.note] if edit.note else []
    if edit.fixed is not None:
        kept, total = int(edit.fixed.sum()), edit.fixed.numel()
        parts.append(f"kept {kept} of {total} latent cells (fixed)")
    if edit.init_bits is not None or edit.fixed is not None:
        start = strength_to_start(edit.strength, settings.steps)
        parts.append(f"strength {edit.strength:g}: starts at step {start} of {settings.steps}")
    parts += [f"warning: {w}" for w in edit.warnings]
    return "; ".join(parts)


# ==== the run ==========================================================================================================

@dataclass
class StepRecorder:
    """Turns sampler ``StepInfo`` callbacks into per-step records (for Refine Stats) and widget events.

    ``send(event)`` delivers a widget event; ``progress(step, total, preview_rgb)`` drives the progress bar and may
    raise to interrupt (ComfyUI's hook does). Only the first running sample is reported.
    """

    node: str = ""
    prompt_id: Optional[str] = None
    size: Optional[tuple[int, int, int]] = None
    send: Optional[Callable[[dict], None]] = None
    progress: Optional[Callable[[int, int, Optional[torch.Tensor]], None]] = None
    records: list[dict] = field(default_factory=list)
    decided: Optional[int] = None
    planned: Optional[int] = None
    fixed: Optional[torch.Tensor] = None  # kept latent cells [t, h, w] of an edit: the widget paints them "fixed"

    def __call__(self, info: StepInfo) -> None:
        total = int(info.total_steps_per_sample[0])
        if self.planned is None:
            self.planned = total
        if self.decided is None and total != self.planned:
            self.decided = total
        counts = info.token_counts[0]
        self.records.append({
            "step": info.step, "total": total, "entropy": float(info.entropy[0]),
            "kept": float(info.kept_fraction[0]), "guided": bool(info.guided[0]),
            "fill": counts.fill, "keep": counts.keep, "erase": counts.erase, "blank": counts.blank,
        })
        rgb = preview_of(info)
        states = info.token_states[0] if info.token_states is not None else None
        if self.send is not None:
            self.send(build_step_event(
                node=self.node, prompt_id=self.prompt_id, step=info.step, total=total, planned=self.planned,
                entropy=info.entropy[0], kept=info.kept_fraction[0], guided=info.guided[0], counts=counts,
                token_states=states, preview_rgb=rgb, size=self.size, decided=self.decided,
                fixed_cells=self.fixed if self._send_fixed() else None))
        if self.progress is not None:
            self.progress(info.step + 1, total, rgb)


    def _send_fixed(self) -> bool:
        """The kept-cell map goes with the run's first event, and with every event while it is small (the widget
        keeps the last one it got for the run)."""
        return self.fixed is not None and (len(self.records) == 1 or self.fixed.numel() <= FIXED_EVERY_EVENT_CELLS)


def preview_of(info: StepInfo) -> Optional[torch.Tensor]:
    """RGB preview ``[t, 3, h, w]`` of the first running sample, if the sampler made one."""
    preview = info.preview
    if not isinstance(preview, torch.Tensor):
        return None
    rgb = preview[0]
    if rgb.dim() == 3:  # images: [3, h, w]
        rgb = rgb.unsqueeze(0)
    return rgb.float().cpu() if rgb.dim() == 4 and rgb.shape[1] == 3 else None


def preview_image(rgb: torch.Tensor, min_side: int = 256) -> "Any":
    """The middle frame of an RGB preview ``[t, 3, h, w]`` as a PIL image, upscaled (nearest) for the node."""
    from PIL import Image

    frame = rgb[rgb.shape[0] // 2]
    h, w = frame.shape[-2:]
    factor = max(1, math.ceil(min_side / max(h, w)))
    frame = frame.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    pixels = ((frame.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)


def run_sampler(loaded: LoadedGRN, conditioning: Optional[GRNConditioning], plan: SizePlan, seed: int,
                settings: SamplerSettings | C2ISettings, task: str, first_frame: Optional[torch.Tensor] = None,
                first_frame_bits: Optional[torch.Tensor] = None, class_index: int = 0,
                recorder: Optional[StepRecorder] = None, edit: Optional[EditPlan] = None, pool: Any = None,
                should_stop: Optional[Callable[[], bool]] = None) -> TokenResult:
    """Sample tokens. I2V: ``first_frame`` ``[3, H, W]`` in [-1, 1] at the plan's size, or its tokens
    ``first_frame_bits`` from Encode Image (used as they are: no decode / encode round trip). ``edit``: the source's
    bits, kept cells and strength (:func:`plan_edit`).

    ``pool`` (Load GRN ``devices``, a :class:`grn_nodes.pool.DevicePool`): the same request runs on its workers and
    every step comes back to ``recorder`` here, as in a run in this process; ``should_stop`` (ComfyUI's
    ``processing_interrupted``) is polled while waiting, and the workers' stop is raised as ``RefinerInterrupted``."""
    model = loaded.model
    with errors_from(SAMPLER):
        if task == "c2i":
            if pool is not None:
                result = pool.generate_class_tokens([int(class_index)], seed=int(seed), settings=settings,
                                                    callback=recorder, should_stop=should_stop)
            else:
                result = generate_class_tokens(model, [int(class_index)], seed=int(seed), settings=settings,
                                               callback=recorder)
        else:
            feats = conditioning.for_task(task)
            editing = {} if edit is None else dict(init_bits=edit.init_bits, fixed=edit.fixed, strength=edit.strength)
            request = GenerationRequest(width=plan.width, height=plan.height, frames=plan.frames, seed=int(seed),
                                        settings=settings, **editing)
            if pool is not None:
                result = pool.generate_tokens(feats, request, first_frame=first_frame, callback=recorder,
                                              first_frame_bits=first_frame_bits, preview=model.preview,
                                              should_stop=should_stop)
            else:
                result = generate_tokens(model, feats, request, first_frame=first_frame, callback=recorder,
                                         first_frame_bits=first_frame_bits)
    result.extras["steps"] = list(recorder.records) if recorder is not None else []
    result.extras["model"] = loaded.refiner_name
    return result


def refiner_memory_bytes(loaded: LoadedGRN, plan: SizePlan, task: str, settings: SamplerSettings | C2ISettings,
                         conditioning: Optional[GRNConditioning] = None) -> int:
    """What ComfyUI is asked to free before the run (:func:`grn_core.pipeline.refiner_stage_bytes`)."""
    text_tokens = 128
    if conditioning is not None and task in conditioning.features:
        text_tokens = int(conditioning.features[task].cond.shape[0])
    return refiner_stage_bytes(loaded.model, plan.width, plan.height, plan.frames, task, float(settings.guidance),
                               text_tokens)
