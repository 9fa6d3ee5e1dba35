"""Everything the GRN nodes do, as plain Python over ``grn_core`` and torch (no ComfyUI import).

The ComfyUI classes in ``comfy_nodes.py`` only translate sockets and widgets into calls of these functions and
their results back; unit tests call these functions directly. Errors are ``GRNNodeError`` (a ``ValueError``) whose
message starts with the node's display name and says what to change.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from grn_core import hbq
from grn_core.checkpoints import inspect_checkpoint
from grn_core.pipeline import (DECODE_OVERLAP, GenerationRequest, GRNModel, PromptFeatures, TokenResult,
                               decode_tokens, encode_prompt, generate_class_tokens, generate_tokens, load_model)
from grn_core.models import load_tiny
from grn_core.refiner.buckets import BUCKET_SIDES, FPS, MAX_FRAMES, pixel_size, video_num_frames
from grn_core.runtime.fp8 import Fp8Linear
from grn_core.runtime.memory import GRNOutOfMemoryError, refiner_step_bytes
from grn_core.runtime.offload import OffloadPolicy, module_bytes
from grn_core.sampler import (ADAPTIVE_DEFAULTS, AdaptiveSteps, C2ISettings, LatentRGBProjection, SamplerSettings,
                              SamplingInterrupted, StepInfo)
from grn_core.text.cleaning import clean_prompt

from . import model_files
from .widget_events import build_step_event

log = logging.getLogger(__name__)

# Display names: the prefix of every error message, so the user knows which node to fix.
LOAD = "Load GRN"
ENCODE_PROMPT = "GRN Encode Prompt"
SAMPLER = "GRN Refine Sampler"
DECODE = "GRN Decode Video"
ENCODE_IMAGE = "GRN Encode Image"
STATS = "GRN Refine Stats"

WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2")
LAYOUTS = ("auto", "joint", "prefix")
# Offload choices as the library names them (grn_core.runtime.offload.OffloadPolicy): "auto" picks the least offload
# that fits the free memory; "model" brings each model to the GPU only for its stage; "blocks" / "blocks:N" also
# streams all / the last N refiner blocks from the CPU. The two older names stay accepted (saved workflows).
OFFLOAD_CHOICES = ("auto", "none", "model", "blocks", "blocks:4", "blocks:8", "blocks:16")
LEGACY_OFFLOAD = {"offload after run": "model", "keep on device": "none"}
OFFLOAD_POLICIES = OFFLOAD_CHOICES + tuple(LEGACY_OFFLOAD)
TASK_CHOICES = ("auto", "t2i", "t2v", "i2v")
RESOLUTIONS = ("custom",) + tuple(BUCKET_SIDES)
ASPECTS = {"from width/height": None, "1:1": 1.0, "16:9": 9 / 16, "9:16": 16 / 9, "4:3": 3 / 4, "3:4": 4 / 3,
           "3:2": 2 / 3, "2:3": 3 / 2, "2:1": 1 / 2, "1:2": 2.0}  # name w:h -> h/w
# Largest latent cells per frame the released models were trained on (the 2M bucket: 90 x 90).
MAX_LATENT_CELLS = max(BUCKET_SIDES.values()) ** 2
UMT5_WIDTH = 4096
UMT5_MAX_TOKENS = 512  # 511 tokens + EOS, as the official pipeline truncates
UMT5_EOS = 1


class GRNNodeError(ValueError):
    """A problem the user can fix; the message names the node and the fix."""


def node_error(node: str, error: BaseException | str) -> GRNNodeError:
    text = str(error)
    return GRNNodeError(text if text.startswith(node) else f"{node}: {text}")


@contextlib.contextmanager
def errors_from(node: str) -> Iterator[None]:
    """Re-raise library ValueErrors / missing files as ``GRNNodeError`` naming ``node``; out-of-memory errors stay
    ``GRNOutOfMemoryError`` (with their advice) and get the node's name in front as well."""
    try:
        yield
    except GRNNodeError:
        raise
    except GRNOutOfMemoryError as error:
        text = str(error)
        if text.startswith(node):
            raise
        raise GRNOutOfMemoryError(f"{node}: {text}", error.stage, error.advice) from error
    except (ValueError, FileNotFoundError) as error:
        raise node_error(node, error) from error


# ==== Load GRN ========================================================================================================

@dataclass
class LoadedGRN:
    """What travels on a ``GRN_MODEL`` socket: the model and how the nodes should treat it.

    ``offload``: the policy asked for, as the library names it (``auto``, ``none``, ``model``, ``blocks:N`` …); the
    resolved one is ``model.offload`` when the pipeline places the models (``model.compute_device`` set).
    ``keep_on_device``: whether :func:`on_device` leaves the models on the device after a run when the caller places
    them (``compute_device`` None: tests, or a model built outside ``load_grn``).
    """

    model: GRNModel
    refiner_name: str
    tokenizer_name: str
    weight_dtype: str = "default"
    keep_on_device: bool = False
    max_latent_cells: int = MAX_LATENT_CELLS
    offload: str = "auto"

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.model.tasks

    @property
    def offload_setting(self) -> str:
        """The offload in effect, for messages: the resolved policy when the pipeline places the models."""
        return self.model.offload.describe() if self.model.compute_device is not None else self.offload

    def describe(self) -> str:
        m = self.model
        text = (f"{self.refiner_name} + {self.tokenizer_name}: tasks {','.join(m.tasks)}, layout {m.layout}, "
                f"{m.latent_channels}-channel latents, {m.spatial_factor}x spatial / {m.temporal_factor}x temporal")
        if m.compute_device is not None:
            text += f"; {m.weight_dtype} weights, offload {m.offload.describe()} on {m.compute_device}"
        return text


def offload_policy(choice: str) -> str:
    """The offload widget's value as the library's policy string (older saved names mapped), or a node error."""
    policy = LEGACY_OFFLOAD.get(choice, choice)
    try:
        OffloadPolicy.parse(policy)
    except ValueError as error:
        if str(choice).startswith("blocks:"):
            raise node_error(LOAD, error) from error
        raise node_error(LOAD, f"offload '{choice}' is not one of {', '.join(OFFLOAD_POLICIES)}.") from error
    return policy


def load_grn(
    refiner_path: Optional[Path],
    tokenizer_path: Optional[Path],
    weight_dtype: str = "default",
    layout: str = "auto",
    offload: str = "auto",
    fit_preview: bool = True,
    device: Any = None,
) -> LoadedGRN:
    """Load a refiner file (``None`` = the built-in tiny model) and its tokenizer; see ``model_files`` for paths.

    ``device``: where the stages run (ComfyUI's torch device); the pipeline then casts the weights for it and places
    the models per ``offload``. ``None`` loads on the CPU and never moves anything (:func:`on_device` does).
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise node_error(LOAD, f"weight_dtype '{weight_dtype}' is not one of {', '.join(WEIGHT_DTYPES)}.")
    if layout not in LAYOUTS:
        raise node_error(LOAD, f"layout '{layout}' is not one of {', '.join(LAYOUTS)}.")
    policy = offload_policy(offload)
    dtype = None if weight_dtype == "default" else weight_dtype
    with errors_from(LOAD):
        if refiner_path is None:
            model, max_cells = _load_tiny(dtype, device, policy)
            refiner_name, tokenizer_name = model_files.TINY, model_files.TINY
        else:
            if tokenizer_path is None:
                raise node_error(LOAD, "no tokenizer file: pick one, or 'auto' with the matching HBQ tokenizer in "
                                       "models/grn.")
            model = load_model(refiner_path, tokenizer_path, dtype=dtype, device=device,
                               layout=None if layout == "auto" else layout, offload=policy, attention="auto")
            model.name = Path(refiner_path).name
            refiner_name, tokenizer_name, max_cells = Path(refiner_path).name, Path(tokenizer_path).name, MAX_LATENT_CELLS
    if fit_preview and model.preview is None:
        try:
            model.preview = fit_preview_projection(model)
        except Exception as error:  # a preview is a nicety: never fail the load for it
            log.warning("GRN: no live RGB preview for %s (%s)", refiner_name, error)
    keep = OffloadPolicy.parse(policy).mode == "none"
    return LoadedGRN(model, refiner_name, tokenizer_name, weight_dtype, keep, max_cells, policy)


def _load_tiny(dtype: Optional[str], device: Any = None, offload: str = "auto") -> tuple[GRNModel, int]:
    """The tiny model shipped in ``grn_core/assets/tiny``, with its text encoder, preview projection, native size and
    calibrated adaptive rule (``grn_core.models.load_tiny`` reads them from the file)."""
    if not model_files.tiny_available():
        raise GRNNodeError(model_files.tiny_missing_message(LOAD))
    return load_tiny(device=device, dtype=dtype, offload=offload), MAX_LATENT_CELLS


class PromptEncoderAdapter:
    """Gives ``encode(prompt, allow_empty=...)`` (the pipeline's TextEncoder protocol) to encoders whose ``encode``
    takes the prompt alone (``HashedTextEncoder`` decides about empty prompts at construction)."""

    def __init__(self, encoder: Any):
        self.encoder = encoder

    def encode(self, prompt: str, allow_empty: bool = False) -> torch.Tensor:
        if not prompt.strip() and not allow_empty:
            raise ValueError("the prompt is empty: describe what to generate.")
        return self.encoder.encode(prompt)


def fit_preview_projection(model: GRNModel, cells: int = 16, seed: int = 0) -> LatentRGBProjection:
    """Fit latent -> RGB on a synthetic image of random colour cells, one cell per latent position.

    Uses the quantised features (bits -> features), which is what the sampler's preview sees.
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
    rgb = colours[0].reshape(3, -1).T
    return LatentRGBProjection().fit(feats, rgb)


def tokenizer_for(refiner_path: Path, choice: str, folder_paths: Any) -> Path:
    """Resolve the tokenizer widget (a file name or ``auto``) for ``refiner_path``."""
    if choice != model_files.AUTO:
        return model_files.resolve_file(folder_paths, choice, (model_files.GRN_FOLDER,), node=LOAD)
    released = model_files.RELEASED.get(refiner_path.name)
    if released is not None:
        channels = released.latent_channels
    else:
        with errors_from(LOAD):
            info = inspect_checkpoint(refiner_path)
        channels = int(info.config.latent_channels)
    local = [n for n in model_files.tokenizer_choices(folder_paths) if n != model_files.AUTO]
    present = [n for n in local if _exists(folder_paths, n)]
    name = model_files.pick_tokenizer(channels, present)
    if name is None:
        wanted = model_files.released_tokenizer(channels) or f"an HBQ tokenizer with {channels} latent channels"
        raise GRNNodeError(
            f"{LOAD}: tokenizer 'auto' found no tokenizer for {refiner_path.name} ({channels}-channel latents) in "
            f"models/grn. Download {wanted} from {model_files.HF_REPO} into ComfyUI/models/grn/, or pick the file.")
    return model_files.resolve_file(folder_paths, name, (model_files.GRN_FOLDER,), node=LOAD)


def _exists(folder_paths: Any, name: str) -> bool:
    try:
        full = folder_paths.get_full_path(model_files.GRN_FOLDER, name)
    except KeyError:
        return False
    return bool(full) and Path(full).is_file()


# ==== device handling ==================================================================================================

@contextlib.contextmanager
def on_device(loaded: LoadedGRN, device: Any, offload_device: Any = "cpu",
              after: Optional[Callable[[], None]] = None) -> Iterator[GRNModel]:
    """Around a node's run: call ``after`` (ComfyUI's cache cleanup) in ``finally``.

    When the pipeline places the models (``model.compute_device`` set by ``load_grn(device=...)``) each stage moves
    what it needs per the offload policy, so nothing is moved here. Otherwise refiner + tokenizer go to ``device`` for
    the run and back to ``offload_device`` afterwards unless ``keep_on_device``.
    """
    model = loaded.model
    if model.compute_device is not None:
        try:
            yield model
        finally:
            if after is not None:
                after()
        return
    try:
        model.refiner.to(device)
        model.tokenizer.to(device)
        yield model
    finally:
        if not loaded.keep_on_device:
            model.refiner.to(offload_device)
            model.tokenizer.to(offload_device)
        if after is not None:
            after()


# ==== Encode Prompt ===================================================================================================

@dataclass
class GRNConditioning:
    """What travels on a ``GRN_CONDITIONING`` socket: features per task (the sampler picks I2V when given a frame)."""

    features: dict[str, PromptFeatures]
    default_task: str
    source: str = ""

    def for_task(self, task: str) -> PromptFeatures:
        if task not in self.features:
            raise GRNNodeError(
                f"{SAMPLER}: the conditioning was encoded for {', '.join(t.upper() for t in self.features)} only, "
                f"not {task.upper()}; set Encode Prompt's task to 'auto' or '{task}'.")
        return self.features[task]


class ClipPromptEncoder:
    """GRN text features from a ComfyUI ``CLIP`` loaded by CLIPLoader (type ``wan``, umt5-xxl).

    Same cleaning and tokenization as the official pipeline: no weight syntax, no padding, 511 tokens + EOS.
    """

    def __init__(self, clip: Any):
        self.clip = clip

    def tokenize(self, text: str) -> dict:
        tokens = self.clip.tokenize(text, disable_weights=True, tokenizer_options={"umt5xxl_min_length": 1})
        if not isinstance(tokens, dict) or "umt5xxl" not in tokens:
            kinds = ", ".join(sorted(tokens)) if isinstance(tokens, dict) else type(tokens).__name__
            raise GRNNodeError(
                f"{ENCODE_PROMPT}: the CLIP input is not umt5-xxl (it tokenizes for {kinds}). Load "
                "umt5_xxl_fp16.safetensors or umt5_xxl_fp8_e4m3fn_scaled.safetensors with CLIPLoader, type 'wan'.")
        batches = tokens["umt5xxl"]
        flat = [pair for batch in batches for pair in batch]
        ids = [pair for pair in flat if int(pair[0]) != UMT5_EOS and int(pair[0]) != 0]
        ids = ids[: UMT5_MAX_TOKENS - 1] + [(UMT5_EOS, 1.0)]
        return {"umt5xxl": [ids]}

    def encode(self, prompt: str, allow_empty: bool = False) -> torch.Tensor:
        text = clean_prompt(prompt)
        if not text and not allow_empty:
            raise GRNNodeError(f"{ENCODE_PROMPT}: the prompt is empty after cleaning; write a prompt.")
        out = self.clip.encode_from_tokens(self.tokenize(text), return_dict=True)
        cond = out["cond"][0]
        if cond.shape[-1] != UMT5_WIDTH:
            raise GRNNodeError(f"{ENCODE_PROMPT}: the CLIP input gives {cond.shape[-1]}-wide features, umt5-xxl gives "
                               f"{UMT5_WIDTH}; load a umt5-xxl file with CLIPLoader type 'wan'.")
        return cond.float()


_UMT5_CACHE: dict[tuple, Any] = {}


def umt5_tokenizer_json(umt5_path: Path) -> Path:
    """Where the umt5 ``tokenizer.json`` for GRN's own umt5 file must be (next to it, as its stem or in umt5-xxl/)."""
    folder = umt5_path.parent
    for candidate in (folder / f"{umt5_path.stem}.tokenizer.json", folder / "umt5-xxl" / "tokenizer.json",
                      folder / "google" / "umt5-xxl" / "tokenizer.json", folder / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    raise GRNNodeError(
        f"{ENCODE_PROMPT}: {umt5_path.name} needs the umt5-xxl tokenizer: put google/umt5-xxl's tokenizer.json at "
        f"{folder / 'umt5-xxl' / 'tokenizer.json'}, or connect a CLIP input from CLIPLoader (type 'wan') instead.")


def umt5_file_encoder(umt5_path: Path, dtype: Any = None, device: Any = "cpu") -> Any:
    """GRN's own umt5 file + tokenizer.json -> a prompt encoder (one kept in memory at a time)."""
    from grn_core.checkpoints import load_umt5
    from grn_core.text import UMT5PromptEncoder

    key = (str(umt5_path), umt5_path.stat().st_mtime, str(dtype), str(device))
    if key not in _UMT5_CACHE:
        _UMT5_CACHE.clear()
        with errors_from(ENCODE_PROMPT):
            encoder = load_umt5(umt5_path, dtype=dtype, device=device)
            _UMT5_CACHE[key] = UMT5PromptEncoder(encoder, umt5_tokenizer_json(umt5_path))
    return _UMT5_CACHE[key]


def encode_prompt_for(loaded: LoadedGRN, encoder: Any, prompt: str, negative: str = "", task: str = "auto",
                      add_task_tag: bool = True, source: str = "") -> GRNConditioning:
    """Features for every task of the model (``auto``) or for one task; the task tag is added unless switched off."""
    model = loaded.model
    if model.is_c2i:
        raise GRNNodeError(f"{ENCODE_PROMPT}: {loaded.refiner_name} is a class-to-image model and takes no prompt; "
                           "set the class index on GRN Refine Sampler and leave its conditioning unconnected.")
    if task not in TASK_CHOICES:
        raise GRNNodeError(f"{ENCODE_PROMPT}: task '{task}' is not one of {', '.join(TASK_CHOICES)}.")
    if encoder is None and model.text_encoder is None:
        raise GRNNodeError(
            f"{ENCODE_PROMPT}: {loaded.refiner_name} needs a umt5-xxl text encoder: connect a CLIP from CLIPLoader "
            "(type 'wan', umt5_xxl_fp16.safetensors) or pick models_t5_umt5-xxl-enc-bf16.pth in umt5_file.")
    if task == "auto":
        tasks = [t for t in model.tasks if t != "c2i"]
        default = tasks[0]
    else:
        if task not in model.tasks:
            raise GRNNodeError(f"{ENCODE_PROMPT}: {loaded.refiner_name} does not do {task.upper()} (it does "
                               f"{', '.join(t.upper() for t in model.tasks)}); set task to 'auto'.")
        tasks, default = [task], task
    features = {}
    with errors_from(ENCODE_PROMPT):
        for t in tasks:
            features[t] = encode_prompt(model, encoder, prompt, negative, task=t, add_task_tag=add_task_tag)
    return GRNConditioning(features, default, source)


# ==== Refine Sampler: sizes, settings, first frame ====================================================================

@dataclass(frozen=True)
class SizePlan:
    width: int
    height: int
    frames: int
    snapped: bool
    note: str

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}" + (f", {self.frames} frames" if self.frames > 1 else "")


def snap_frames(frames: int, temporal_factor: int = 4) -> int:
    """Nearest 1 + k*temporal_factor frame count (>= 1)."""
    k = max(0, (int(frames) - 1 + temporal_factor // 2) // temporal_factor)  # halves round up
    return 1 + k * temporal_factor


def plan_size(loaded: LoadedGRN, width: int, height: int, frames: int, resolution: str = "custom",
              aspect: str = "from width/height", duration: float = 0.0, task: str = "t2v") -> SizePlan:
    """The output size the sampler will make: buckets or custom sizes snapped to the model's grid, frames to 1+4k."""
    model = loaded.model
    sf, tf = model.spatial_factor, model.temporal_factor
    if resolution not in RESOLUTIONS:
        raise GRNNodeError(f"{SAMPLER}: resolution '{resolution}' is not one of {', '.join(RESOLUTIONS)}.")
    if aspect not in ASPECTS:
        raise GRNNodeError(f"{SAMPLER}: aspect '{aspect}' is not one of {', '.join(ASPECTS)}.")
    if width < 1 or height < 1:
        raise GRNNodeError(f"{SAMPLER}: width and height must be positive, got {width}x{height}.")
    if resolution != "custom":
        h_over_w = ASPECTS[aspect] if ASPECTS[aspect] is not None else height / width
        out_h, out_w = pixel_size(resolution, h_over_w)
        if sf != 16:  # a model with another tokenizer stride: keep the bucket's latent grid
            out_h, out_w = out_h // 16 * sf, out_w // 16 * sf
    else:
        if ASPECTS[aspect] is not None:
            height = width * ASPECTS[aspect]
        out_w = max(sf, sf * round(width / sf))
        out_h = max(sf, sf * round(height / sf))
    cells = (out_w // sf) * (out_h // sf)
    if cells > loaded.max_latent_cells:
        side = int(math.isqrt(loaded.max_latent_cells)) * sf
        raise GRNNodeError(
            f"{SAMPLER}: {out_w}x{out_h} is {cells} latent cells per frame, beyond the model's largest bucket "
            f"({loaded.max_latent_cells} cells, about {side}x{side}); lower width/height or pick a resolution bucket.")
    if duration and duration > 0:
        frames = video_num_frames(duration, FPS, MAX_FRAMES)
    out_frames = 1 if task in ("t2i", "c2i") else snap_frames(frames, tf)
    if task == "i2v" and out_frames < 1 + tf:
        out_frames = 1 + tf
    snapped = (out_w, out_h, out_frames) != (int(width), int(height), int(frames))
    note = f"{out_w}x{out_h}" + (f", {out_frames} frames" if out_frames > 1 else "")
    if snapped:
        note += f" (snapped from {int(width)}x{int(round(height))}" + (f", {frames} frames" if out_frames > 1 else "") + ")"
    return SizePlan(out_w, out_h, out_frames, snapped, note)


def build_settings(task: str, steps: int, guidance: float, temperature: float, shift: float = 1.0,
                   guidance_interval: float = 0.0, adaptive: bool = False, min_steps: int = 20, warmup: int = 5,
                   k: Optional[float] = None, b: Optional[float] = None) -> SamplerSettings | C2ISettings:
    """Sampler settings from the node's widgets (adaptive k/b default to the family's constants)."""
    adaptive_steps = None
    if adaptive:
        base = ADAPTIVE_DEFAULTS.get(task, ADAPTIVE_DEFAULTS["t2v"])
        adaptive_steps = AdaptiveSteps(warmup=int(warmup), k=float(base.k if k is None else k),
                                       b=float(base.b if b is None else b), min_steps=int(min_steps))
    with errors_from(SAMPLER):
        if task == "c2i":
            return C2ISettings(steps=int(steps), guidance=float(guidance), temperature=float(temperature),
                               adaptive=adaptive_steps).validate()
        return SamplerSettings(steps=int(steps), guidance=float(guidance), temperature=float(temperature),
                               shift=float(shift), cfg_interval=float(guidance_interval),
                               adaptive=adaptive_steps).validate()


def image_to_frame(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, 3]`` in [0, 1] -> first frame ``[3, height, width]`` in [-1, 1] (centre crop, resize)."""
    if image.dim() != 4 or image.shape[-1] not in (3, 4):
        raise GRNNodeError(f"{SAMPLER}: first_frame must be an IMAGE [B, H, W, 3], got shape {tuple(image.shape)}.")
    frame = image[0, :, :, :3].permute(2, 0, 1).float().unsqueeze(0)  # [1, 3, H, W]
    return resize_crop(frame, width, height)[0] * 2 - 1


def resize_crop(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``[N, 3, H, W]`` -> ``[N, 3, height, width]``: scale to cover, then centre crop (no distortion)."""
    _, _, h, w = frames.shape
    if (h, w) == (height, width):
        return frames.clamp(0, 1)
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    return frames[:, :, top:top + height, left:left + width].clamp(0, 1)


def choose_task(loaded: LoadedGRN, conditioning: Optional[GRNConditioning], has_first_frame: bool) -> str:
    model = loaded.model
    if model.is_c2i:
        if has_first_frame:
            raise GRNNodeError(f"{SAMPLER}: {loaded.refiner_name} is class-to-image; disconnect first_frame.")
        return "c2i"
    if conditioning is None:
        raise GRNNodeError(f"{SAMPLER}: connect a conditioning from GRN Encode Prompt.")
    if has_first_frame:
        if "i2v" not in model.tasks:
            raise GRNNodeError(
                f"{SAMPLER}: {loaded.refiner_name} has no image-to-video; disconnect first_frame, or load the 8B "
                "GRN_T2V_TITAN_FSA_sft10600_ema.pth, which does I2V.")
        return "i2v"
    if conditioning.default_task == "i2v":
        if "t2v" in conditioning.features:
            return "t2v"
        raise GRNNodeError(f"{SAMPLER}: the conditioning is for I2V; connect a first_frame image.")
    return conditioning.default_task


# ==== Refine Sampler: the run ==========================================================================================

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
                token_states=states, preview_rgb=rgb, size=self.size, decided=self.decided))
        if self.progress is not None:
            self.progress(info.step + 1, total, rgb)


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
                recorder: Optional[StepRecorder] = None) -> TokenResult:
    """Sample tokens. ``first_frame``: ``[3, H, W]`` in [-1, 1] at the plan's size (or its clean bits)."""
    model = loaded.model
    with errors_from(SAMPLER):
        if task == "c2i":
            num_classes = int(model.refiner.config.num_classes)
            if not 0 <= int(class_index) < num_classes:
                raise GRNNodeError(f"{SAMPLER}: class_index {class_index} is outside 0..{num_classes - 1}.")
            result = generate_class_tokens(model, [int(class_index)], seed=int(seed), settings=settings,
                                           callback=recorder)
        else:
            feats = conditioning.for_task(task)
            request = GenerationRequest(width=plan.width, height=plan.height, frames=plan.frames, seed=int(seed),
                                        settings=settings)
            if first_frame_bits is not None:
                result = _generate_from_bits(model, feats, request, first_frame_bits, recorder)
            else:
                result = generate_tokens(model, feats, request, first_frame=first_frame, callback=recorder)
    result.extras["steps"] = list(recorder.records) if recorder is not None else []
    result.extras["model"] = loaded.refiner_name
    return result


def _generate_from_bits(model: GRNModel, feats: PromptFeatures, request: GenerationRequest, bits: torch.Tensor,
                        recorder: Optional[Callable]) -> TokenResult:
    """I2V from first-frame tokens made by GRN Encode Image (the bits are decoded back to an image first)."""
    expected = (request.height // model.spatial_factor, request.width // model.spatial_factor)
    if tuple(bits.shape[-2:]) != expected:
        raise GRNNodeError(f"{SAMPLER}: the first-frame tokens are {bits.shape[-1]}x{bits.shape[-2]} cells but the "
                           f"video needs {expected[1]}x{expected[0]}; encode the image at {request.width}x{request.height}.")
    frame = decode_tokens(model, bits[:1, :, :1])[0, 0].permute(2, 0, 1) * 2 - 1
    return generate_tokens(model, feats, request, first_frame=frame, callback=recorder)


def refiner_memory_bytes(loaded: LoadedGRN, plan: SizePlan, task: str, settings: SamplerSettings | C2ISettings,
                         conditioning: Optional[GRNConditioning] = None) -> int:
    """Device bytes the refiner stage still needs: its weights (unless they stay on the device between runs, offload
    ``none``) plus one step's peak activations — what ComfyUI is asked to free before the run. Class-to-image steps
    are small next to the weights: weights only."""
    model = loaded.model
    resident = model.compute_device is not None and not model.offload.moves_models and \
        model.compute_device.type != "cpu"
    weights = 0 if resident else module_bytes(model.refiner)
    if model.is_c2i:
        return weights
    config = model.refiner.config
    sf, tf = model.spatial_factor, model.temporal_factor
    t, h, w = 1 + (plan.frames - 1) // tf, plan.height // sf, plan.width // sf
    if task == "i2v":
        t -= 1  # the refiner sees the given frame's tokens as a prefix, not as generated rows
    text_tokens = 128
    if conditioning is not None and task in conditioning.features:
        text_tokens = int(conditioning.features[task].cond.shape[0])
    storage, compute = _refiner_dtypes(model.refiner)
    activations = refiner_step_bytes(config, (t, h, w), text_tokens=text_tokens,
                                     branches=1 if float(settings.guidance) == 1.0 else 2, compute=compute,
                                     first_frame=task == "i2v", storage=storage)
    return weights + activations


def _refiner_dtypes(refiner: torch.nn.Module) -> tuple[torch.dtype, torch.dtype]:
    """(weight storage, matmul compute) dtypes of a loaded refiner."""
    for module in refiner.modules():
        if isinstance(module, Fp8Linear):
            return module.fp8_dtype, module.compute_dtype
    for module in refiner.modules():
        if isinstance(module, torch.nn.Linear):
            return module.weight.dtype, module.weight.dtype
    dtype = next(refiner.parameters()).dtype
    return dtype, dtype


def interrupted(result: TokenResult) -> bool:
    return bool(getattr(result.sampling, "interrupted", False))


# ==== Decode Video / Encode Image =====================================================================================

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
    if tile < 0:
        raise GRNNodeError(f"{DECODE}: tile {tile} is negative; use 0 (automatic) or a tile size in latent cells.")
    with errors_from(DECODE):
        frames = decode_tokens(model, bits, tile=int(tile) if tile else "auto", overlap=int(overlap))
    return frames.flatten(0, 1).contiguous()  # [B, T, H, W, 3] -> [B*T, H, W, 3]


def encode_images(loaded: LoadedGRN, images: torch.Tensor, width: int = 0, height: int = 0) -> TokenResult:
    """IMAGE ``[N, H, W, 3]`` (frames of one clip) -> clean tokens ``[1, rounds*d, t, h, w]``.

    Sizes snap down to the tokenizer grid (centre crop) unless width/height are given; N frames become the longest
    1 + 4k prefix.
    """
    model = loaded.model
    if images.dim() != 4 or images.shape[-1] not in (3, 4):
        raise GRNNodeError(f"{ENCODE_IMAGE}: expected an IMAGE [N, H, W, 3], got shape {tuple(images.shape)}.")
    sf, tf = model.spatial_factor, model.temporal_factor
    n, h, w = images.shape[:3]
    width = width or max(sf, w // sf * sf)
    height = height or max(sf, h // sf * sf)
    if width % sf or height % sf:
        raise GRNNodeError(f"{ENCODE_IMAGE}: width/height must be multiples of {sf}, got {width}x{height}.")
    frames = 1 + (n - 1) // tf * tf
    clip = resize_crop(images[:frames, :, :, :3].permute(0, 3, 1, 2).float(), width, height) * 2 - 1
    video = clip.permute(1, 0, 2, 3).unsqueeze(0)  # [1, 3, T, H, W]
    with errors_from(ENCODE_IMAGE), model.stage(model.tokenizer), torch.inference_mode():
        weight = next(model.tokenizer.parameters())
        z = model.tokenizer.encode(video.to(weight.device, weight.dtype))
        bits = hbq.features_to_bits(z, model.rounds).cpu()
    return TokenResult(bits, None, "encoded", width, height, frames, {"steps": [], "model": loaded.tokenizer_name})


# ==== Refine Stats =====================================================================================================

STATE_COLOURS = {"fill": (220, 120, 117), "keep": (88, 160, 227), "erase": (240, 180, 40), "blank": (128, 138, 151)}


def render_stats(tokens: TokenResult, width: int = 768, height: int = 512) -> torch.Tensor:
    """A chart of the run as IMAGE ``[1, height, width, 3]``: token states per step (stacked), entropy and kept
    fraction curves, and the adaptive decision (step count and the entropy it was read from)."""
    from PIL import Image, ImageDraw

    records = tokens.extras.get("steps", []) if isinstance(tokens, TokenResult) else []
    image = Image.new("RGB", (width, height), (24, 26, 30))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 48, width - 16, 40, height - 56
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 100))
    sampling = getattr(tokens, "sampling", None)
    title = f"GRN refinement: {len(records)} steps"
    decision = None
    if sampling is not None and getattr(sampling, "remaining_steps", None):
        if sampling.remaining_steps[0] is not None:
            decision = (sampling.decision_entropy[0], sampling.remaining_steps[0])
            title += f"  |  adaptive: H={decision[0]:.3f} -> {decision[1]} more steps"
    if sampling is not None and getattr(sampling, "interrupted", False):
        title += "  |  interrupted"
    draw.text((left, 12), title, fill=(230, 230, 230))
    if not records:
        draw.text((left + 10, top + 10), "no sampler steps recorded (tokens from GRN Encode Image?)", fill=(200, 200, 200))
        return pil_to_image(image)
    n = len(records)
    col_w = (right - left) / n
    for i, r in enumerate(records):
        total = max(1, r["fill"] + r["keep"] + r["erase"] + r["blank"])
        y = bottom
        for name in ("keep", "fill", "erase", "blank"):
            hgt = (bottom - top) * r[name] / total
            x0, x1 = left + i * col_w, left + (i + 1) * col_w
            draw.rectangle([x0, y - hgt, max(x0, x1 - 1), y], fill=STATE_COLOURS[name])
            y -= hgt

    def curve(key: str, colour: tuple[int, int, int]) -> None:
        pts = [(left + (i + 0.5) * col_w, bottom - (bottom - top) * min(1.0, max(0.0, r[key])))
               for i, r in enumerate(records)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=3)
        else:
            draw.ellipse([pts[0][0] - 3, pts[0][1] - 3, pts[0][0] + 3, pts[0][1] + 3], fill=colour)

    curve("entropy", (255, 255, 255))
    curve("kept", (40, 40, 40))
    if decision is not None:
        warm = next((i for i, r in enumerate(records) if r["total"] != records[0]["total"]), None)
        if warm is not None:
            x = left + warm * col_w
            draw.line([(x, top), (x, bottom)], fill=(255, 80, 200), width=2)
    legend = [("fill", STATE_COLOURS["fill"]), ("keep", STATE_COLOURS["keep"]), ("erase", STATE_COLOURS["erase"]),
              ("blank", STATE_COLOURS["blank"]), ("entropy", (255, 255, 255)), ("kept fraction", (40, 40, 40))]
    x = left
    for name, colour in legend:
        draw.rectangle([x, height - 36, x + 14, height - 22], fill=colour, outline=(200, 200, 200))
        draw.text((x + 20, height - 36), name, fill=(220, 220, 220))
        x += 24 + 8 * len(name) + 16
    draw.text((left, bottom + 4), "step 1", fill=(180, 180, 180))
    draw.text((right - 60, bottom + 4), f"step {n}", fill=(180, 180, 180))
    return pil_to_image(image)


def pil_to_image(image: Any) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)


def stats_summary(tokens: TokenResult) -> dict:
    """JSON-friendly statistics of a run (the sampler's plus the recorded steps)."""
    sampling = getattr(tokens, "sampling", None)
    out = sampling.stats() if sampling is not None and hasattr(sampling, "stats") else {}
    out["steps_recorded"] = tokens.extras.get("steps", [])
    return out


__all__ = [name for name in dir() if not name.startswith("_")]
_ = SamplingInterrupted  # re-exported for the ComfyUI layer
