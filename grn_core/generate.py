"""``python -m grn_core generate``: prompt (or class) → video/image file plus a JSON sidecar of the run."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .media import write_frames
from .models import MODEL_CHOICES, load_named
from .sampler import ADAPTIVE_DEFAULTS, AdaptiveSteps, C2ISettings, SamplerSettings, StepInfo
from .sampler.states import BLANK, ERASE, FILL, KEEP

# Paper colours of the four token states (README of the official repository).
STATE_COLOURS = {FILL: (220, 120, 117), KEEP: (88, 160, 227), ERASE: (240, 180, 40), BLANK: (128, 138, 151)}
DEFAULT_SIZES = {"t2i": (1024, 1024, 1), "t2v": (848, 480, 33), "i2v": (848, 480, 33), "c2i": (256, 256, 1)}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which model to load and where to run it (shared by ``generate`` and ``calibrate``)."""
    parser.add_argument("--model", default="tiny",
                        help=f"a refiner file, or one of: {', '.join(MODEL_CHOICES)} (default: tiny)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (with --model PATH)")
    parser.add_argument("--text-encoder", default=None, help="umt5-xxl weights file (with --model PATH)")
    parser.add_argument("--text-tokenizer", default=None, help="umt5-xxl tokenizer.json (with --text-encoder)")
    parser.add_argument("--model-dir", type=Path, default=None, help="folder of released files (default models/grn)")
    parser.add_argument("--download", action="store_true", help="fetch missing released files from Hugging Face")
    parser.add_argument("--task", choices=["t2i", "t2v", "i2v", "c2i"], default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default, bf16, fp16, fp32")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: 1 for the tiny model, whose small matrices only lose time "
                             "synchronising threads; torch's default otherwise)")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", default=None, help="what to generate (text-conditioned models)")
    parser.add_argument("--negative", default="", help="negative prompt (default: empty, as the official code)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="steps (the largest count when adaptive)")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                        help="entropy-guided adaptive steps (default: on where the family rule is calibrated: C2I)")
    parser.add_argument("--adaptive-rule", type=Path, default=None,
                        help="JSON file from `python -m grn_core calibrate --out` (implies --adaptive)")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--frames", type=int, default=None, help="1 + 4k frames; 1 makes an image")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--image", type=Path, default=None, help="first frame for image-to-video")
    parser.add_argument("--class-index", type=int, default=None, help="ImageNet class for class-to-image")
    parser.add_argument("--out", type=Path, default=Path("grn_out.mp4"), help=".mp4, .gif, .webp or .png")
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--preview-dir", type=Path, default=None,
                        help="write the token-state map and RGB preview of every step as PNGs")


class ProgressLine:
    """A one-line progress bar on a terminal (nothing when stderr is redirected)."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()

    def __call__(self, step: int, total: int, entropy: float) -> None:
        if not self.enabled:
            return
        width = 30
        done = int(width * step / max(1, total))
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{total}  entropy {entropy:.3f}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def state_map_image(states: torch.Tensor, scale: int = 4):
    """uint8 token states ``[t, h, w]`` → a PIL image with the frames side by side in the paper's colours."""
    from PIL import Image

    palette = torch.zeros(256, 3, dtype=torch.uint8)
    for state, colour in STATE_COLOURS.items():
        palette[state] = torch.tensor(colour, dtype=torch.uint8)
    t, h, w = states.shape
    strip = palette[states.long()].permute(1, 0, 2, 3).reshape(h, t * w, 3)
    image = Image.fromarray(strip.numpy())
    return image.resize((t * w * scale, h * scale), Image.NEAREST)


def _preview_image(preview: torch.Tensor, scale: int = 4):
    """RGB preview ``[n, t, 3, h, w]`` in about [-1, 1] → PIL strip of the first sample's frames."""
    from PIL import Image

    frames = ((preview[0].float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)  # [t, 3, h, w]
    t, _, h, w = frames.shape
    strip = frames.permute(2, 0, 3, 1).reshape(h, t * w, 3)
    return Image.fromarray(strip.numpy()).resize((t * w * scale, h * scale), Image.NEAREST)


def _settings(args: argparse.Namespace, task: str, model_rule: Optional[AdaptiveSteps] = None):
    """Sampler settings from the flags. ``--adaptive-rule FILE`` uses a rule written by ``calibrate``; ``--adaptive``
    uses the model's own calibrated rule when it has one, else the family's; without either flag adaptive steps are
    on where the family's rule is calibrated (C2I)."""
    overrides = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance),
                                   ("temperature", args.temperature)) if v is not None}
    if task == "c2i":
        if getattr(args, "adaptive_rule", None) is not None:
            raise ValueError("--adaptive-rule is for text-conditioned models; class-to-image uses the official "
                             "complexity-aware rule (--adaptive) or fixed steps (--no-adaptive).")
        base = C2ISettings.official_adaptive() if args.adaptive is not False else C2ISettings()
        return C2ISettings(**{**base.to_dict(), **overrides})
    settings = SamplerSettings.for_task(task, **overrides)
    if getattr(args, "adaptive_rule", None) is not None:
        if args.adaptive is False:
            raise ValueError("--adaptive-rule with --no-adaptive: drop one of the two.")
        from .calibration import read_rule

        return settings.replace(adaptive=read_rule(args.adaptive_rule)).validate()
    own = model_rule is not None and model_rule.calibrated
    rule = model_rule if own else ADAPTIVE_DEFAULTS[task]
    adaptive = args.adaptive if args.adaptive is not None else ADAPTIVE_DEFAULTS[task].calibrated
    return settings.replace(adaptive=rule) if adaptive else settings


def set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.model == "tiny" and args.device == "cpu":
        torch.set_num_threads(1)


def load_from_args(args: argparse.Namespace):
    from .checkpoints import load_umt5
    from .pipeline import load_model
    from .text import UMT5PromptEncoder

    if args.model in MODEL_CHOICES:
        return load_named(args.model, args.model_dir, args.download, device=args.device, dtype=args.dtype)
    if args.tokenizer is None:
        raise ValueError("--model PATH needs --tokenizer PATH (the HBQ tokenizer file that belongs to it).")
    model = load_model(args.model, args.tokenizer, dtype=args.dtype, device=args.device)
    encoder = None
    if args.text_encoder is not None:
        if args.text_tokenizer is None:
            raise ValueError("--text-encoder needs --text-tokenizer (the umt5-xxl tokenizer.json).")
        encoder = UMT5PromptEncoder(load_umt5(args.text_encoder, dtype=args.dtype, device=args.device),
                                    str(args.text_tokenizer))
    return model, encoder, model.default_task()


def _first_frame(path: Path, width: int, height: int) -> torch.Tensor:
    from PIL import Image

    if not path.is_file():
        raise ValueError(f"--image {path}: no such file.")
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.BICUBIC)
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def run_cli(args: argparse.Namespace) -> int:
    from .pipeline import GenerationRequest, decode_tokens, encode_prompt, generate_class_tokens, generate_tokens

    started = time.perf_counter()
    set_threads(args)
    model, encoder, default_task = load_from_args(args)
    task = args.task or default_task
    defaults = model.defaults
    width, height, frames = DEFAULT_SIZES[task]
    width = args.width or defaults.get("width", width)
    height = args.height or defaults.get("height", height)
    frames = args.frames or (defaults.get("frames", frames) if task in ("t2v", "i2v") else 1)
    settings = _settings(args, task, model.adaptive)

    progress = ProgressLine()
    if args.preview_dir is not None:
        args.preview_dir.mkdir(parents=True, exist_ok=True)

    def on_step(info: StepInfo) -> None:
        progress(info.step + 1, info.total_steps, info.entropy[0])
        if args.preview_dir is not None:
            state_map_image(info.token_states[0]).save(args.preview_dir / f"step{info.step:03d}_states.png")
            if info.preview is not None:
                _preview_image(info.preview).save(args.preview_dir / f"step{info.step:03d}_rgb.png")

    if task == "c2i":
        if args.class_index is None:
            raise ValueError("class-to-image needs --class-index (an ImageNet class, 0..999).")
        tokens = generate_class_tokens(model, [args.class_index], seed=args.seed, settings=settings, callback=on_step)
    else:
        if not args.prompt:
            raise ValueError("--prompt is required for text-to-image/video.")
        feats = encode_prompt(model, encoder, args.prompt, args.negative, task=task,
                              need_uncond=settings.guidance != 1.0)
        image = _first_frame(args.image, width, height) if args.image is not None else None
        request = GenerationRequest(width=width, height=height, frames=frames, seed=args.seed, settings=settings)
        tokens = generate_tokens(model, feats, request, first_frame=image, callback=on_step)
    progress.close()
    video = decode_tokens(model, tokens)[0]
    out = write_frames(video, args.out, fps=args.fps)
    result = tokens.sampling
    sidecar = {
        "model": args.model, "task": task, "prompt": args.prompt, "negative": args.negative, "seed": args.seed,
        "width": width, "height": height, "frames": int(video.shape[0]),
        "steps": result.steps[0], "nfe": result.nfe[0], "entropy": result.entropy[0],
        "kept_fraction": result.kept_fraction[0], "adaptive_decision": result.remaining_steps[0]
        if result.remaining_steps else None,
        "settings": settings.to_dict(), "seconds": round(time.perf_counter() - started, 3),
        "sampling_seconds": round(result.seconds, 3), "output": str(out),
    }
    sidecar_path = out.with_suffix(".json")
    sidecar_path.write_text(json.dumps(sidecar, indent=1, default=_json_default))
    print(f"wrote {out} ({sidecar['frames']} frames, {sidecar['steps']} steps, {sidecar['nfe']} network passes, "
          f"{sidecar['seconds']:.1f} s)")
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
