"""The generation pipeline: prompt → text features → refiner + sampler → bit map → tokenizer decode → frames.

Each stage is one function with a small typed interface, so the CLI, the ComfyUI nodes and tests compose the same
pieces::

    model = load_model("GRN_T2V_2B_FSA_sft147400_ema.pth", "HBQ_image_video_tokenizer_64dim_M4_20260626.ckpt")
    feats = encode_prompt(model, text_encoder, "a red fox in the snow", task="t2v")
    tokens = generate_tokens(model, feats, GenerationRequest(width=848, height=480, frames=33, seed=42))
    frames = decode_tokens(model, tokens)            # [B, T, H, W, 3] float in [0, 1], CPU

Memory (``load_model(..., device="cuda", dtype="fp8_e4m3fn", offload="auto", attention="auto")``): weights are cast
on the CPU and placed by the offload policy (:class:`grn_core.runtime.offload.OffloadPolicy`): ``none`` keeps every
model on the device; ``model`` brings the text encoder, the refiner and the tokenizer to the device only for their
stage; ``blocks`` / ``blocks:N`` also streams the refiner's (last N) blocks from the CPU; ``auto`` picks the least
of these that fits the free memory. Out of memory in a step or a decode raises
:class:`grn_core.runtime.memory.GRNOutOfMemoryError` naming the settings to change.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from . import hbq
from .presets import JOINT_PROMPT_TEMPLATES, MAX_FRAMES, PREFIX_PROMPT_TEMPLATES, TASKS, preset
from .releases import I2V_FILE
from .request import MAX_BUCKET_CELLS, MAX_LATENT_SIDE, _is_number, check_seed
from .checkpoints import inspect_checkpoint, load_c2i, load_refiner, load_tokenizer, parse_dtype
from .runtime.fp8 import Fp8Linear
from .runtime.memory import (decode_advice, format_bytes, oom_guard, parallel_step_bytes, refiner_step_bytes,
                             step_advice)
from .runtime.offload import OffloadPolicy, auto_policy, module_bytes, on_device
from .runtime.precision import resolve_precision
from .sampler import AdaptiveSteps, LatentRGBProjection, SamplerSettings, SamplingResult, StepInfo, bits_preview, sample_bits
from .tokenizer import tiled

UMT5_XXL_BF16_BYTES = 11_360_000_000  # 5.68B parameters: what offload="auto" budgets for the text encoder
log = logging.getLogger(__name__)


class TextEncoder(Protocol):
    """Anything that turns a prompt into features ``[L, C]`` (umt5 prompt encoder, the tiny hashed encoder)."""

    def encode(self, prompt: str, allow_empty: bool = False) -> torch.Tensor: ...


@dataclass
class GRNModel:
    """A refiner and the tokenizer that matches it, plus what the files say about them.

    tasks: what the refiner was released for (``t2i``, ``t2v``, ``i2v``, ``c2i``); unknown files allow all bit tasks.
    text_encoder: a built-in encoder (the tiny model ships one); released models use umt5-xxl, loaded separately.
    preview: a fitted latent → RGB projection for cheap live previews, when one is known for the tokenizer.
    defaults: output size the model was made for (``width``, ``height``, ``frames``), when the file says so.
    adaptive: the adaptive-step rule calibrated for this model, when the file carries one.
    compute_device: where the stages run when the pipeline places the models (``load_model(device=...)``); None:
        the caller places them and the pipeline never moves anything.
    offload: the resolved :class:`~grn_core.runtime.offload.OffloadPolicy` (never ``auto``).
    """

    refiner: nn.Module
    tokenizer: nn.Module
    tasks: tuple[str, ...]
    name: str = ""
    text_encoder: Optional[TextEncoder] = None
    preview: Optional[LatentRGBProjection] = None
    defaults: dict = field(default_factory=dict)
    adaptive: Optional[AdaptiveSteps] = None
    compute_device: Optional[torch.device] = None
    offload: OffloadPolicy = field(default_factory=lambda: OffloadPolicy("none"))

    def __post_init__(self) -> None:
        wanted = self.latent_channels
        have = self.tokenizer.config.z_dim
        if wanted != have:
            raise ValueError(
                f"{self.name or 'model'}: the refiner works on {wanted}-channel latents but the tokenizer has {have} "
                f"channels. Pick the matching tokenizer (64 channels: HBQ_image_video_tokenizer_64dim_M4_*.ckpt for "
                f"T2I/T2V/I2V; 16 channels: HBQ_image_tokenizer_16dim_M4.ckpt for class-to-image)."
            )

    @property
    def is_c2i(self) -> bool:
        return "c2i" in self.tasks

    @property
    def layout(self) -> Optional[str]:
        return getattr(self.refiner.config, "layout", None)

    @property
    def rounds(self) -> int:
        config = self.refiner.config
        return int(getattr(config, "hbq_rounds", getattr(config, "rounds", 4)))

    @property
    def latent_channels(self) -> int:
        return int(self.refiner.config.latent_channels)

    @property
    def spatial_factor(self) -> int:
        return int(self.tokenizer.config.spatial_factor)

    @property
    def temporal_factor(self) -> int:
        return int(self.tokenizer.config.temporal_factor)

    @property
    def text_channels(self) -> Optional[int]:
        return getattr(self.refiner.config, "text_channels", None)

    @property
    def device(self) -> torch.device:
        return next(self.refiner.parameters()).device

    def default_task(self) -> str:
        return self.tasks[0]

    @property
    def weight_dtype(self) -> str:
        """The refiner's weight storage, as a setting name (``bf16``, ``fp8_e4m3fn`` …); ``gguf:q8_0`` and the like
        for a GGUF refiner (the type holding most of its quantised weights)."""
        from .formats import GGUFLinear

        quantised: dict[str, int] = {}
        for module in self.refiner.modules():
            if isinstance(module, Fp8Linear):
                return "fp8_" + str(module.fp8_dtype).split("float8_")[-1]
            if isinstance(module, GGUFLinear):
                quantised[module.qtype] = quantised.get(module.qtype, 0) + module.in_features * module.out_features
        if quantised:
            return "gguf:" + max(quantised, key=quantised.get).lower()
        dtype = next(self.refiner.parameters()).dtype
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                torch.float64: "fp64"}.get(dtype, str(dtype))

    def stage(self, module: Optional[nn.Module]):
        """Context: ``module`` on the compute device for one stage, back on the CPU afterwards when the policy
        offloads models. A no-op when the caller places the models (``compute_device`` None)."""
        if self.compute_device is None or module is None:
            return contextlib.nullcontext(module)
        return on_device(module, self.compute_device, offload_after=self.offload.moves_models)


def load_model(
    refiner_path: str | Path,
    tokenizer_path: str | Path,
    dtype: Any = None,
    device: Any = None,
    layout: Optional[str] = None,
    tokenizer_dtype: Any = None,
    compute_dtype: Any = None,
    attention: str = "auto",
    offload: OffloadPolicy | str | int | None = "auto",
) -> GRNModel:
    """Load a refiner (T2I/T2V/I2V or C2I, told apart by its tensors) and its tokenizer.

    Args:
        dtype: refiner weight storage (``None``: the file's on CPU, bf16 on GPUs; ``bf16``, ``fp16``, ``fp32``,
            ``fp8_e4m3fn``, ``fp8_e5m2``); the tokenizer follows it unless ``tokenizer_dtype`` is given (fp8 → bf16).
        device: where the stages run. ``None`` (default): load on the CPU and never move anything — the caller places
            the models (as the ComfyUI nodes do). Given: the pipeline places the models per ``offload``.
        compute_dtype: matmul dtype for fp8 storage (default bf16).
        attention: ``auto``, ``sdpa``, ``flash`` or ``sage`` (see :mod:`grn_core.runtime.attention`).
        offload: ``auto``, ``none``, ``model``, ``blocks``, ``blocks:N`` or N (see :mod:`grn_core.runtime.offload`).
    """
    managed = device is not None
    target = torch.device(device if managed else "cpu")
    policy = OffloadPolicy.parse(offload)
    info = inspect_checkpoint(refiner_path, layout=layout)
    if info.kind == "c2i":
        refiner = load_c2i(refiner_path, dtype=dtype, device=target, compute_dtype=compute_dtype, keep_on_cpu=True)
        tasks: tuple[str, ...] = ("c2i",)
    else:
        refiner = load_refiner(refiner_path, layout=layout, dtype=dtype, device=target, compute_dtype=compute_dtype,
                               attention=attention, keep_on_cpu=True)
        tasks = info.tasks or ("t2i", "t2v", "i2v")
    tokenizer = load_tokenizer(tokenizer_path, dtype=tokenizer_dtype if tokenizer_dtype is not None else dtype,
                               device=target, keep_on_cpu=True)
    model = GRNModel(refiner, tokenizer, tasks, name=Path(refiner_path).name,
                     compute_device=target if managed else None)
    model.offload = _resolve_policy(model, policy, target, parse_dtype(dtype), compute_dtype)
    if model.offload.mode == "blocks":
        if not hasattr(refiner, "enable_block_offload"):
            raise ValueError(f"offload {policy.describe()!r}: block offload exists for the text-to-image/video "
                             f"refiner only; use offload 'model' for {Path(refiner_path).name}.")
        refiner.enable_block_offload(model.offload.blocks or "all", device="cpu", prefetch=model.offload.prefetch)
    if not model.offload.moves_models:
        refiner.to(target)
        tokenizer.to(target)
    return model


def fit_preview(model: GRNModel, cells: int = 16, seed: int = 0) -> LatentRGBProjection:
    """Fit the live preview's latent → RGB projection for ``model``'s tokenizer.

    Encodes a synthetic image of random colour cells (one cell per latent position), quantises it as the sampler's
    bits are (bits → features), and fits the least-squares map from those features to the cells' colours.
    """
    sf = model.spatial_factor
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(1, 3, cells, cells, generator=g) * 2 - 1
    image = colours.repeat_interleave(sf, 2).repeat_interleave(sf, 3)
    with model.stage(model.tokenizer), torch.inference_mode():
        weight = next(model.tokenizer.parameters())
        z = model.tokenizer.encode(image.to(weight.device, weight.dtype))  # [1, d, 1, cells, cells]
        zq = hbq.bits_to_features(hbq.features_to_bits(z, model.rounds), model.rounds)
    feats = zq[0, :, 0].reshape(zq.shape[1], -1).T.float().cpu()
    return LatentRGBProjection().fit(feats, colours[0].reshape(3, -1).T)


def ensure_preview(model: GRNModel) -> Optional[LatentRGBProjection]:
    """Give ``model`` a live-preview projection if it has none (a nicety: a failure is logged, never raised)."""
    if model.preview is None:
        try:
            model.preview = fit_preview(model)
        except Exception as error:  # noqa: BLE001 - a preview must never fail a load
            log.warning("no live RGB preview for %s (%s)", model.name or "this model", error)
    return model.preview


def _default_grid(model: GRNModel) -> tuple[int, int, int]:
    """Latent grid of the model's default request (the T2V preset for video models, else the T2I one) for memory
    planning."""
    sf, tf = model.spatial_factor, model.temporal_factor
    width, height, frames = preset("t2v" if ("t2v" in model.tasks or "i2v" in model.tasks) else "t2i").size
    return 1 + (frames - 1) // tf, height // sf, width // sf


def _resolve_policy(model: GRNModel, policy: OffloadPolicy, device: torch.device, dtype: Optional[torch.dtype],
                    compute_dtype: Any) -> OffloadPolicy:
    if policy.mode != "auto":
        if device.type == "cpu" and policy.mode != "none":
            return OffloadPolicy("none")  # nothing to offload to
        return policy
    if model.is_c2i or device.type == "cpu":
        return OffloadPolicy("none" if device.type == "cpu" else "model")
    config = model.refiner.config
    blocks = list(model.refiner.blocks)
    precision = resolve_precision(dtype, device, None, parse_dtype(compute_dtype))
    activations = refiner_step_bytes(config, _default_grid(model), compute=precision.compute,
                                     storage=precision.storage)
    # The text encoder is loaded by the caller: budget for umt5-xxl in bf16 so that "none" never leaves it stranded.
    others = module_bytes(model.tokenizer) + UMT5_XXL_BF16_BYTES
    return auto_policy(device, module_bytes(model.refiner), module_bytes(blocks[0]), len(blocks), others, activations)


@dataclass
class PromptFeatures:
    """Encoder features of one prompt and its negative prompt (``uncond`` is None when guidance is off)."""

    cond: torch.Tensor
    uncond: Optional[torch.Tensor]
    task: str
    text: str
    negative: str = ""


def format_prompt(prompt: str, task: str, layout: Optional[str] = "joint") -> str:
    """The prompt as the checkpoints were trained on it: task tag (joint layout) or quality suffix (prefix layout)."""
    if task not in JOINT_PROMPT_TEMPLATES:
        raise ValueError(f"task '{task}' takes no text prompt; use one of t2i, t2v, i2v.")
    templates = PREFIX_PROMPT_TEMPLATES if layout == "prefix" else JOINT_PROMPT_TEMPLATES
    return templates[task].format(prompt.strip())


def _check_task(model: GRNModel, task: Optional[str]) -> str:
    task = (task or model.default_task()).lower()
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; use one of {', '.join(TASKS)}.")
    if task == "i2v" and "i2v" not in model.tasks and model.layout == "joint":
        # The official code lets any joint-layout refiner take a first frame; only one file was trained for it.
        log.warning("%s was not trained for image-to-video (only %s was); running it anyway, as the official "
                    "code allows — expect weaker results.", model.name or "this model", I2V_FILE)
        return task
    if task not in model.tasks:
        raise ValueError(
            f"{model.name or 'this model'} does not do {task.upper()} (it does {', '.join(t.upper() for t in model.tasks)})."
            + (f" Image-to-video needs a joint-layout model; {I2V_FILE} was trained for it." if task == "i2v" else "")
        )
    return task


def encode_prompt(
    model: GRNModel,
    text_encoder: Optional[TextEncoder],
    prompt: str,
    negative: str = "",
    task: Optional[str] = None,
    add_task_tag: bool = True,
    need_uncond: bool = True,
) -> PromptFeatures:
    """Encode prompt and negative prompt for ``model``; the empty negative prompt is the official default."""
    task = _check_task(model, task)
    encoder = text_encoder if text_encoder is not None else model.text_encoder
    if encoder is None:
        raise ValueError(
            f"{model.name or 'this model'} needs a text encoder: load umt5-xxl (models_t5_umt5-xxl-enc-bf16.pth with "
            "its tokenizer.json, or ComfyUI's umt5_xxl_*.safetensors through CLIPLoader type 'wan')."
        )
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: describe what to generate.")
    text = format_prompt(prompt, task, model.layout) if add_task_tag else prompt.strip()
    with model.stage(_encoder_module(encoder)):
        cond = encoder.encode(text, allow_empty=False)
        uncond = encoder.encode(negative or "", allow_empty=True) if need_uncond else None
    _check_text_width(model, cond)
    return PromptFeatures(cond, uncond, task, text, negative or "")


def _encoder_module(encoder: Any) -> Optional[nn.Module]:
    """The torch module behind a prompt encoder (``UMT5PromptEncoder.encoder``), to stage it on the device."""
    if isinstance(encoder, nn.Module):
        return encoder
    inner = getattr(encoder, "encoder", None)
    return inner if isinstance(inner, nn.Module) else None


def _check_text_width(model: GRNModel, features: torch.Tensor) -> None:
    channels = model.text_channels
    if channels is not None and features.shape[-1] != channels:
        raise ValueError(
            f"the text features are {features.shape[-1]}-wide but {model.name or 'the refiner'} expects {channels} "
            f"(umt5-xxl gives 4096). Use the text encoder that belongs to this model."
        )


@dataclass
class GenerationRequest:
    """Output size and sampling settings. ``frames`` = 1 makes an image; videos need 1 + 4k frames."""

    width: int
    height: int
    frames: int = 1
    seed: int = 0
    batch_size: int = 1
    settings: Optional[SamplerSettings] = None
    # Editing (grn_core.editing): the source's bits on the output grid, uint8 [1 or B, rounds*d, t, h, w]; latent
    # cells kept from them, bool [1 or B, 1, t, h, w] or [t, h, w]; strength 1 regenerates the free cells fully,
    # 0 returns init_bits unchanged (start step round((1 - strength) * steps)).
    init_bits: Optional[torch.Tensor] = None
    fixed: Optional[torch.Tensor] = None
    strength: float = 1.0


@dataclass
class TokenResult:
    """The sampler's output: final bit maps ``[B, rounds*d, t, h, w]`` and the run's statistics."""

    bits: torch.Tensor
    sampling: SamplingResult
    task: str
    width: int
    height: int
    frames: int
    extras: dict = field(default_factory=dict)


def latent_grid_for(model: GRNModel, width: int, height: int, frames: int) -> tuple[int, int, int]:
    """Latent ``(t, h, w)`` of an output size, or a ValueError saying which sizes work."""
    sf, tf = model.spatial_factor, model.temporal_factor

    def sane(value: Any) -> bool:  # safe to round for the hint (a 10**400 int would overflow a float)
        return _is_number(value) and abs(value) < 1e12

    for name, size in (("width", width), ("height", height)):
        if isinstance(size, bool) or not isinstance(size, int) or size < sf or size % sf:
            near = max(sf, sf * round(size / sf)) if sane(size) else sf
            raise ValueError(f"{name} {size!r} is not a positive multiple of {sf} pixels; use {near} (or plan the "
                             "size with grn_core.request.plan_size).")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % tf:
        lower = 1 + tf * max(0, (int(frames) - 1) // tf) if sane(frames) else 1
        raise ValueError(f"frames {frames!r}: videos need 1 + {tf}k frames (1 for an image); use {lower} or "
                         f"{lower + tf}.")
    if frames > MAX_FRAMES:
        raise ValueError(f"frames {frames}: at most {MAX_FRAMES}, the longest clip the models were trained on.")
    h, w = height // sf, width // sf
    if h * w > MAX_BUCKET_CELLS or max(h, w) > MAX_LATENT_SIDE:
        raise ValueError(f"{width}x{height} is {h * w} latent cells per frame ({w} x {h}), beyond every trained "
                         f"bucket (at most {MAX_BUCKET_CELLS} cells, {MAX_LATENT_SIDE} on a side); plan the size with "
                         "grn_core.request.plan_size.")
    return 1 + (frames - 1) // tf, height // sf, width // sf


def encode_clip(model: GRNModel, clip: torch.Tensor) -> torch.Tensor:
    """RGB frames ``[1, 3, T, H, W]`` in [-1, 1] (T = 1 + 4k; :func:`grn_core.request.prepare_clip` makes them) →
    their clean bits ``[1, rounds*d, t, h, w]`` on the CPU."""
    if clip.dim() != 5 or clip.shape[:2] != (1, 3):
        raise ValueError(f"expected one RGB clip [1, 3, T, H, W], got shape {tuple(clip.shape)}.")
    lo, hi = float(clip.min()), float(clip.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"the frames span [{lo:.3g}, {hi:.3g}]; pass RGB scaled to [-1, 1] (x * 2 - 1 from [0, 1]).")
    with model.stage(model.tokenizer), torch.inference_mode():
        weight = next(model.tokenizer.parameters())
        z = model.tokenizer.encode(clip.to(weight.device, weight.dtype))
        return hbq.features_to_bits(z, model.rounds).cpu()


def encode_first_frame(model: GRNModel, image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """I2V: an RGB image ``[3, H, W]`` or ``[1, 3, H, W]`` in [-1, 1] → clean bits ``[1, rounds*d, 1, h, w]``."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"the first frame must be one RGB image [3, H, W], got shape {tuple(image.shape)}.")
    if tuple(image.shape[-2:]) != (height, width):
        raise ValueError(
            f"the first frame is {image.shape[-1]}x{image.shape[-2]} but the video is {width}x{height}; "
            "prepare it with grn_core.request.prepare_first_frame (cover-resize and centre crop, as official), or "
            "resize or crop it to the video's size yourself."
        )
    return encode_clip(model, image.unsqueeze(2))


def generate_tokens(
    model: GRNModel,
    features: PromptFeatures,
    request: GenerationRequest,
    first_frame: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[StepInfo], Any]] = None,
    preview: bool = True,
    first_frame_bits: Optional[torch.Tensor] = None,
    branches: Any = None,
) -> TokenResult:
    """Run the refinement sampler for ``request``.

    I2V takes the first frame either as an image ``first_frame`` ``[3, H, W]`` in [-1, 1] at the request's size
    (:func:`grn_core.request.prepare_first_frame` makes one from any picture), or as its tokens ``first_frame_bits``
    ``[1, rounds*d, t, h, w]`` (e.g. from encoding an image; the first latent frame is used, no decode/encode trip).
    ``branches``: where a step's logits are computed (``grn_core.sampler.loop`` "Parallel sampling"; e.g.
    ``grn_core.runtime.distributed.CFGParallel``); None: this process.
    """
    task = features.task
    if model.is_c2i:
        raise ValueError("class-to-image models take a class index, not a prompt: use generate_class_tokens.")
    check_seed(request.seed)
    grid = latent_grid_for(model, request.width, request.height, request.frames)
    if task == "t2i" and request.frames != 1:
        raise ValueError(f"text-to-image makes one frame, got frames={request.frames}; use a T2V model for video.")
    given = first_frame is not None or first_frame_bits is not None
    if task == "i2v":
        if not given:
            raise ValueError("image-to-video needs a first frame image.")
        if first_frame is not None and first_frame_bits is not None:
            raise ValueError("give the first frame once: as an image or as its tokens, not both.")
        if grid[0] < 2:
            raise ValueError("image-to-video needs at least 5 frames (the given frame plus one latent frame).")
        if first_frame is not None:
            first_frame_bits = encode_first_frame(model, first_frame, request.width, request.height)
        else:
            first_frame_bits = _first_latent_frame(model, first_frame_bits, grid)
    elif given:
        raise ValueError(f"a first frame was given but the task is {task.upper()}; use task 'i2v' with an I2V model.")
    settings = request.settings or SamplerSettings.for_task(task)
    uncond = features.uncond
    if settings.guidance != 1.0 and uncond is None:
        raise ValueError("guidance needs the negative-prompt features: encode the prompt with need_uncond=True.")
    init_bits, fixed, start_step = _edit_inputs(model, request, grid, settings)
    preview_fn = bits_preview(model.preview, model.rounds) if (preview and model.preview is not None) else None
    size = f"{request.width}x{request.height}" + (f"x{request.frames} frames" if request.frames > 1 else "")
    advice = lambda: step_advice(model.weight_dtype, model.offload.describe(), size, request.batch_size,  # noqa: E731
                                 settings.guidance)
    with model.stage(model.refiner), oom_guard("the refiner step", advice, model.compute_device), \
            torch.inference_mode():
        result = sample_bits(
            model.refiner, features.cond, uncond if settings.guidance != 1.0 else None,
            grid=grid, batch_size=request.batch_size, seed=request.seed, settings=settings,
            aspect_ratio=request.height / request.width, first_frame_bits=first_frame_bits,
            callback=callback, preview_fn=preview_fn, init_bits=init_bits, fixed=fixed, start_step=start_step,
            branches=branches,
        )
    return TokenResult(result.bits, result, task, request.width, request.height, request.frames)


def _edit_inputs(model: GRNModel, request: GenerationRequest, grid: tuple[int, int, int], settings: SamplerSettings
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], int]:
    """``init_bits`` / ``fixed`` / start step of a request, checked against its grid (ValueError naming the fix)."""
    from .request import check_strength, strength_to_start

    strength = check_strength(request.strength)
    init, fixed = request.init_bits, request.fixed
    if init is None:
        if fixed is not None or strength != 1.0:
            raise ValueError("a strength below 1 or kept cells need init_bits (the source's bits: encode it with "
                             "grn_core.editing.encode_source or `python -m grn_core encode`).")
        return None, None, 0
    expected = (model.rounds * model.latent_channels, *grid)
    if not isinstance(init, torch.Tensor) or init.dim() != 5 or tuple(init.shape[1:]) != expected or \
            init.shape[0] not in (1, request.batch_size):
        shape = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
        raise ValueError(f"init_bits has shape {shape} but a {request.width}x{request.height}, {request.frames}-frame "
                         f"output needs [1, {', '.join(map(str, expected))}]; encode the source at the output's size "
                         "and frame count.")
    if isinstance(fixed, torch.Tensor) and fixed.dim() == 3:
        fixed = fixed[None, None]
    if fixed is not None and (not isinstance(fixed, torch.Tensor) or tuple(fixed.shape[-3:]) != grid):
        shape = tuple(fixed.shape) if isinstance(fixed, torch.Tensor) else type(fixed).__name__
        raise ValueError(f"the kept-cell map has shape {shape}; expected [{', '.join(map(str, grid))}] latent cells "
                         "(grn_core.editing.mask_to_cells with the output's size).")
    if fixed is not None:
        fixed = fixed.bool()
    return init, fixed, strength_to_start(strength, settings.steps)


def _first_latent_frame(model: GRNModel, bits: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """The first latent frame ``[1, rounds*d, 1, h, w]`` of encoded tokens, checked against the request's grid."""
    expected = model.rounds * model.latent_channels
    if not isinstance(bits, torch.Tensor) or bits.dim() != 5 or bits.shape[0] != 1 or bits.shape[1] != expected:
        shape = tuple(bits.shape) if isinstance(bits, torch.Tensor) else type(bits).__name__
        raise ValueError(f"the first-frame tokens have shape {shape}; expected [1, {expected}, t, h, w] bits from "
                         "this model's tokenizer.")
    if tuple(bits.shape[-2:]) != grid[1:]:
        sf = model.spatial_factor
        raise ValueError(f"the first-frame tokens are {bits.shape[-1]}x{bits.shape[-2]} cells but the video needs "
                         f"{grid[2]}x{grid[1]}; encode the image at {grid[2] * sf}x{grid[1] * sf}.")
    return bits[:, :, :1].to(torch.uint8)


def refiner_stage_bytes(model: GRNModel, width: int, height: int, frames: int, task: str, guidance: float,
                        text_tokens: int = 128) -> int:
    """Device bytes the refiner stage still needs: its weights (unless they stay on the device between runs, offload
    ``none``) plus one step's peak activations. Class-to-image steps are small next to the weights: weights only."""
    resident = model.compute_device is not None and not model.offload.moves_models and \
        model.compute_device.type != "cpu"
    weights = 0 if resident else module_bytes(model.refiner)
    if model.is_c2i:
        return weights
    sf, tf = model.spatial_factor, model.temporal_factor
    t, h, w = 1 + (frames - 1) // tf, height // sf, width // sf
    if task == "i2v":
        t -= 1  # the refiner sees the given frame's tokens as a prefix, not as generated rows
    storage, compute = _refiner_dtypes(model.refiner)
    activations = refiner_step_bytes(model.refiner.config, (t, h, w), text_tokens=text_tokens,
                                     branches=1 if float(guidance) == 1.0 else 2, compute=compute,
                                     first_frame=task == "i2v", storage=storage)
    return weights + activations


def _refiner_dtypes(refiner: nn.Module) -> tuple[torch.dtype, torch.dtype]:
    """(weight storage, matmul compute) dtypes of a loaded refiner."""
    for module in refiner.modules():
        if isinstance(module, Fp8Linear):
            return module.fp8_dtype, module.compute_dtype
    for module in refiner.modules():
        if isinstance(module, nn.Linear):
            return module.weight.dtype, module.weight.dtype
    dtype = next(refiner.parameters()).dtype
    return dtype, dtype


def available_memory(device: Any) -> Optional[int]:
    """Bytes free for new tensors on ``device``: CUDA's free memory, or the system's available RAM for the CPU
    (``MemAvailable`` of /proc/meminfo; None where that file does not exist). None: unknown, nothing is checked."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError):
            return None
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a request needs: on the compute device (weights not resident there + one refiner step) and in host RAM
    (the decoded frames, float32 plus the stacked copy)."""

    device: int
    host: int


def memory_need(model: GRNModel, width: int, height: int, frames: int, task: str, guidance: float,
                text_tokens: int = 128, batch_size: int = 1, parallel: tuple = (None, 1)) -> MemoryNeed:
    """What :func:`check_memory` compares with the free memory (estimates of :mod:`grn_core.runtime.memory`);
    ``parallel``: ``(mode, world size)`` of ``--parallel`` — what one rank needs."""
    host = 2 * 4 * 3 * int(frames) * int(width) * int(height) * int(batch_size)
    if model.is_c2i:
        return MemoryNeed(0, host)  # class-to-image steps are small and the size is fixed
    device = model.compute_device or model.device
    sf, tf = model.spatial_factor, model.temporal_factor
    t, h, w = 1 + (frames - 1) // tf, height // sf, width // sf
    if task == "i2v":
        t -= 1
    storage, compute = _refiner_dtypes(model.refiner)
    mode, world = parallel  # this rank's share of the step (one process: all of it)
    step = parallel_step_bytes(model.refiner.config, (max(t, 1), h, w), mode, world, text_tokens=text_tokens,
                               batch=batch_size, compute=compute, storage=storage, first_frame=task == "i2v",
                               guided=float(guidance) != 1.0).activations
    weights = 0
    if device.type != "cpu" and model.offload.moves_models:  # weights come to the device for the stage
        if model.offload.mode == "blocks":
            blocks = list(model.refiner.blocks)
            streamed = len(blocks) if model.offload.blocks is None else min(len(blocks), model.offload.blocks)
            weights = module_bytes(model.refiner) - module_bytes(blocks[0]) * max(0, streamed - model.offload.prefetch
                                                                                  - 1)
        else:
            weights = module_bytes(model.refiner)
    if device.type == "cpu":
        return MemoryNeed(0, max(step, host))  # the device is the host: the step and the frames never coexist
    return MemoryNeed(weights + step, host)


def check_memory(model: GRNModel, width: int, height: int, frames: int, task: str, guidance: float,
                 text_tokens: int = 128, batch_size: int = 1,
                 free: Optional[tuple[Optional[int], Optional[int]]] = None, parallel: tuple = (None, 1)) -> MemoryNeed:
    """Refuse (ValueError) a request whose refiner step or decoded frames would not fit the free memory, naming the
    largest size (at this aspect and frame count) and the most frames (at this size) that fit.

    ``free``: ``(device bytes, host bytes)`` to compare with (default: :func:`available_memory` now); None entries
    (unknown, e.g. no /proc/meminfo) are not checked. Estimates are those of ``parallel_step_bytes``, so a request
    just under the limit may still run out of memory (then ``GRNOutOfMemoryError`` says what to change)."""
    device = model.compute_device or model.device
    if free is None:
        on_host = device.type == "cpu"
        free = (None if on_host else available_memory(device), available_memory("cpu"))
    free_device, free_host = free

    def fits(w: int, h: int, f: int) -> bool:
        need = memory_need(model, w, h, f, task, guidance, text_tokens, batch_size, parallel)
        return (free_device is None or need.device <= free_device) and (free_host is None or need.host <= free_host)

    need = memory_need(model, width, height, frames, task, guidance, text_tokens, batch_size, parallel)
    if fits(width, height, frames):
        return need
    sf, tf = model.spatial_factor, model.temporal_factor
    cells_w, cells_h = width // sf, height // sf
    size = None
    for cw in range(cells_w - 1, 0, -1):  # the same aspect, smaller
        ch = max(1, round(cw * cells_h / cells_w))
        if fits(cw * sf, ch * sf, frames):
            size = f"{cw * sf}x{ch * sf}"
            break
    fewer = None
    for f in range(frames - tf, 0, -tf):
        if fits(width, height, f):
            fewer = f
            break
    where = "the host" if device.type == "cpu" else str(device)
    if free_device is not None and need.device > free_device:
        what = (f"about {format_bytes(need.device)} on {where} for one refiner step (with the weights it brings "
                f"there) but {format_bytes(free_device)} is free")
    else:
        what = f"about {format_bytes(need.host)} of memory but {format_bytes(free_host)} is available on the host"
    label = f"{width}x{height}" + (f", {frames} frames" if frames > 1 else "")
    fixes = []
    if size is not None:
        fixes.append(f"{size}" + (f" at {frames} frames" if frames > 1 else "") + " fits")
    if fewer is not None:
        fixes.append(f"{fewer} frames at {label.split(',')[0]} fit")
    if float(guidance) != 1.0 and not model.is_c2i:
        fixes.append("guidance 1 halves the step (no unconditional branch)")
    hint = "; ".join(fixes) if fixes else "free memory (close other programs) or use a device with more memory"
    raise ValueError(f"{label} needs {what}; the largest request that fits: {hint}.")


DECODE_OVERLAP = 4  # latent cells shared by neighbouring decode tiles; the tokenizer's tail sees ~4 cells around


def decode_tokens(model: GRNModel, tokens: TokenResult | torch.Tensor, tile: int | str | None = "auto",
                  overlap: int = DECODE_OVERLAP) -> torch.Tensor:
    """Bit maps → frames ``[B, T, H, W, 3]`` float32 in [0, 1] on the CPU, one sample and one latent frame at a time.

    ``tile``: ``None`` or 0 decodes whole frames; an int decodes spatial tiles of that many latent cells with
    ``overlap`` cells blended (clamped to half a tile), so memory is bounded by the tile rather than the frame;
    ``"auto"`` (default) tiles only on a CUDA device and only as much as its free memory requires
    (:func:`grn_core.tokenizer.tiled.choose_tile`). Frames are assembled on the CPU either way.
    """
    bits = tokens.bits if isinstance(tokens, TokenResult) else tokens
    expected = model.rounds * model.latent_channels
    if bits.dim() != 5 or bits.shape[1] != expected:
        raise ValueError(f"the tokens have shape {tuple(bits.shape)} but this tokenizer decodes [B, {expected}, t, h, "
                         f"w] bit maps; decode with the model that made them.")
    if isinstance(tile, bool) or not (tile is None or tile == "auto" or (isinstance(tile, int) and tile >= 0)):
        raise ValueError(f"tile={tile!r}: use 'auto', 0 / None (whole frames) or a tile size in latent cells.")
    samples = []
    with model.stage(model.tokenizer), torch.inference_mode():
        weight = next(model.tokenizer.parameters())
        size = _decode_tile(model, tuple(bits.shape[3:]), tile, overlap, weight)
        cells = size or 0
        advice = lambda: decode_advice(cells, model.offload.describe())  # noqa: E731
        with oom_guard("the tokenizer decode", advice, model.compute_device):
            for b in range(bits.shape[0]):
                samples.append(_decode_sample(model, bits[b:b + 1], size, overlap, weight))
    return torch.stack(samples)


def _decode_tile(model: GRNModel, grid: tuple[int, int], tile: int | str | None, overlap: int,
                 weight: torch.Tensor) -> Optional[int]:
    """The tile side in latent cells (None: whole frames) for ``decode_tokens``' ``tile`` argument."""
    if tile != "auto":
        return int(tile) if tile else None
    if weight.device.type != "cuda":
        return None  # CPU memory is the system's; per-latent-frame decoding already bounds it by one frame
    free, _ = torch.cuda.mem_get_info(weight.device)
    try:
        chosen = tiled.choose_tile(model.tokenizer.config, grid, int(free * 0.8), overlap, weight.dtype)
    except ValueError:
        return 16  # not even small tiles fit by the estimate: try them anyway, out of memory then says what to do
    return None if chosen is None else max(chosen)


def _decode_sample(model: GRNModel, bits: torch.Tensor, tile: Optional[int], overlap: int,
                   weight: torch.Tensor) -> torch.Tensor:
    """One sample's bits ``[1, rounds*d, t, h, w]`` → frames ``[T, H, W, 3]`` in [0, 1] on the CPU.

    Its own function so that its device tensors are already released when an out-of-memory error reaches
    ``oom_guard`` (which empties the cache).
    """
    z = hbq.bits_to_features(bits.to(weight.device), model.rounds, dtype=weight.dtype)
    overlap = min(overlap, tile // 2) if tile else overlap
    video = tiled.decode_tiled(model.tokenizer, z, tile=tile, overlap=overlap, out_device="cpu",
                               out_dtype=torch.float32)  # [1, 3, T, H, W]
    return ((video[0] + 1) / 2).clamp_(0, 1).permute(1, 2, 3, 0).contiguous()


def generate_class_tokens(
    model: GRNModel,
    class_ids: list[int],
    seed: int = 0,
    settings: Any = None,
    callback: Optional[Callable[[StepInfo], Any]] = None,
) -> TokenResult:
    """Class-to-image: one ImageNet class per sample → HBQ bit maps ``[B, rounds*d, 1, h, w]``."""
    from .sampler import sample_c2i

    if not model.is_c2i:
        raise ValueError(f"{model.name or 'this model'} is a text-conditioned model; class indices need a GRN_ind file.")
    num_classes = int(model.refiner.config.num_classes)
    if isinstance(class_ids, (str, bytes)) or not hasattr(class_ids, "__len__") or len(class_ids) == 0:
        raise ValueError(f"class_ids {class_ids!r}: pass a list of ImageNet class indices (0..{num_classes - 1}), "
                         "one per sample.")
    for class_id in class_ids:
        if isinstance(class_id, torch.Tensor) and class_id.numel() == 1 and not class_id.is_floating_point():
            class_id = int(class_id)
        if isinstance(class_id, bool) or not isinstance(class_id, numbers.Integral):
            raise ValueError(f"class index {class_id!r} is not a whole number; use an ImageNet class index "
                             f"0..{num_classes - 1} ({num_classes} = unconditional).")
        if not 0 <= int(class_id) <= num_classes:
            raise ValueError(f"class index {class_id} is outside 0..{num_classes - 1} ({num_classes} = unconditional).")
    check_seed(seed)
    advice = lambda: step_advice(model.weight_dtype, model.offload.describe())  # noqa: E731
    with model.stage(model.refiner), oom_guard("the class-to-image step", advice, model.compute_device), \
            torch.inference_mode():
        result = sample_c2i(model.refiner, [int(c) for c in class_ids], seed=seed, settings=settings,
                            callback=callback)
    bits = hbq.indices_to_bits(result.bits, model.rounds).unsqueeze(2)  # [B, rounds*d, 1, h, w]
    side = int(model.refiner.config.input_size) * model.spatial_factor
    return TokenResult(bits, result, "c2i", side, side, 1)
