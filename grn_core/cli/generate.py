"""``python -m grn_core generate``: prompt (or class) → video/image file plus a JSON sidecar of the run.

Sizes, frames, settings and the first frame are resolved by :mod:`grn_core.request`, as the ComfyUI nodes do, so a
flag and the node widget of the same name give the same bits. What was changed (a size snapped to the grid, frames
floored to ``1 + 4k``) is printed as a warning and recorded in the sidecar.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..media import write_frames
from ..request import negative_prompt, plan_size, prepare_first_frame, resolve_settings
from ..sampler import StepInfo
from ..sampler.states import STATE_COLOURS
from .common import ProgressLine, add_model_arguments, load_from_args, set_threads, warn


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", default=None, help="what to generate (text-conditioned models)")
    parser.add_argument("--negative", default=None,
                        help="negative prompt (default: the official demo's — empty for T2I, its quality list for "
                             "T2V/I2V; pass --negative '' for none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="steps (the largest count when adaptive)")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                        help="entropy-guided adaptive steps with the model's own rule (default: off, as the demos)")
    parser.add_argument("--adaptive-rule", type=Path, default=None,
                        help="JSON file from `python -m grn_core calibrate --out` (implies --adaptive)")
    parser.add_argument("--adaptive-k", type=float, default=None, help="override the rule's k (with --adaptive)")
    parser.add_argument("--adaptive-b", type=float, default=None, help="override the rule's b (with --adaptive)")
    parser.add_argument("--warmup", type=int, default=None, help="override the rule's warm-up (with --adaptive)")
    parser.add_argument("--min-steps", type=int, default=None, help="override the rule's minimum (with --adaptive)")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--guidance-interval", type=float, default=None,
                        help="guide only once the kept fraction reaches this value (0: every step)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--shift", type=float, default=None, help="schedule shift (1: none)")
    parser.add_argument("--frames", type=int, default=None, help="1 + 4k frames (floored); 1 makes an image")
    parser.add_argument("--duration", type=float, default=None, help="seconds at 16 fps (overrides --frames)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--resolution", default=None, help="a resolution bucket (0.41M, 1M …) instead of the size")
    parser.add_argument("--aspect", type=float, default=None, help="height / width with --resolution (9/16 = 0.5625)")
    parser.add_argument("--image", type=Path, default=None, help="first frame for image-to-video")
    parser.add_argument("--class-index", type=int, default=None, help="ImageNet class for class-to-image")
    parser.add_argument("--out", type=Path, default=Path("grn_out.mp4"), help=".mp4, .gif, .webp or .png")
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--preview-dir", type=Path, default=None,
                        help="write the token-state map and RGB preview of every step as PNGs")


def state_map_image(states: torch.Tensor, scale: int = 4):
    """uint8 token states ``[t, h, w]`` → a PIL image with the frames side by side in the paper's colours."""
    from PIL import Image

    palette = torch.zeros(256, 3, dtype=torch.uint8)
    palette[: len(STATE_COLOURS)] = torch.tensor(STATE_COLOURS, dtype=torch.uint8)
    t, h, w = states.shape
    strip = palette[states.long()].permute(1, 0, 2, 3).reshape(h, t * w, 3)
    return Image.fromarray(strip.numpy()).resize((t * w * scale, h * scale), Image.NEAREST)


def _preview_image(preview: torch.Tensor, scale: int = 4):
    """RGB preview ``[n, t, 3, h, w]`` in about [-1, 1] → PIL strip of the first sample's frames."""
    from PIL import Image

    frames = ((preview[0].float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)  # [t, 3, h, w]
    t, _, h, w = frames.shape
    strip = frames.permute(2, 0, 3, 1).reshape(h, t * w, 3)
    return Image.fromarray(strip.numpy()).resize((t * w * scale, h * scale), Image.NEAREST)


def settings_from_args(args: argparse.Namespace, model: Any, task: str):
    """Sampler settings from the flags (:func:`grn_core.request.resolve_settings` decides)."""
    rule = None
    if getattr(args, "adaptive_rule", None) is not None:
        if task == "c2i":
            raise ValueError("--adaptive-rule is for text-conditioned models; class-to-image uses the official "
                             "complexity-aware rule (--adaptive) or fixed steps.")
        if args.adaptive is False:
            raise ValueError("--adaptive-rule with --no-adaptive: drop one of the two.")
        from ..calibration import read_rule

        rule = read_rule(args.adaptive_rule)
    adaptive = True if rule is not None else args.adaptive
    return resolve_settings(model, task, steps=args.steps, guidance=args.guidance, temperature=args.temperature,
                            shift=getattr(args, "shift", None), cfg_interval=getattr(args, "guidance_interval", None),
                            adaptive=adaptive, rule=rule, warmup=getattr(args, "warmup", None),
                            min_steps=getattr(args, "min_steps", None), k=getattr(args, "adaptive_k", None),
                            b=getattr(args, "adaptive_b", None))


def run(args: argparse.Namespace) -> int:
    from ..pipeline import GenerationRequest, decode_tokens, encode_prompt, generate_class_tokens, generate_tokens

    started = time.perf_counter()
    set_threads(args)
    model, encoder, default_task = load_from_args(args)
    task = args.task or default_task
    plan = plan_size(model, task, args.width, args.height, args.frames, duration=args.duration or 0.0,
                     resolution=args.resolution, h_over_w=args.aspect)
    if plan.snapped:
        warn(f"making {plan.note}.")
    settings = settings_from_args(args, model, task)
    negative = negative_prompt(model, task, args.negative)

    progress = ProgressLine()
    if args.preview_dir is not None:
        args.preview_dir.mkdir(parents=True, exist_ok=True)
        from ..pipeline import ensure_preview

        ensure_preview(model)

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
        feats = encode_prompt(model, encoder, args.prompt, negative, task=task, need_uncond=settings.guidance != 1.0)
        image = None
        if args.image is not None:
            image = prepare_first_frame(_read_image(args.image), plan.width, plan.height)
        request = GenerationRequest(width=plan.width, height=plan.height, frames=plan.frames, seed=args.seed,
                                    settings=settings)
        tokens = generate_tokens(model, feats, request, first_frame=image, callback=on_step,
                                 preview=args.preview_dir is not None)
    progress.close()
    video = decode_tokens(model, tokens)[0]
    out = write_frames(video, args.out, fps=args.fps)
    _write_sidecar(out, args, task, negative, plan, settings, tokens, video, started)
    result = tokens.sampling
    print(f"wrote {out} ({int(video.shape[0])} frames, {result.steps[0]} steps, {result.nfe[0]} network passes, "
          f"{time.perf_counter() - started:.1f} s)")
    return 0


def _read_image(path: Path):
    from PIL import Image

    if not path.is_file():
        raise ValueError(f"--image {path}: no such file.")
    with Image.open(path) as image:
        return image.convert("RGB")


def _write_sidecar(out: Path, args: argparse.Namespace, task: str, negative: str, plan, settings, tokens, video,
                   started: float) -> Path:
    result = tokens.sampling
    sidecar = {
        "model": args.model, "task": task, "prompt": args.prompt, "negative": negative, "seed": args.seed,
        "width": plan.width, "height": plan.height, "frames": int(video.shape[0]), "size_note": plan.note,
        "steps": result.steps[0], "nfe": result.nfe[0], "entropy": result.entropy[0],
        "kept_fraction": result.kept_fraction[0],
        "adaptive_decision": result.remaining_steps[0] if result.remaining_steps else None,
        "settings": settings.to_dict(), "seconds": round(time.perf_counter() - started, 3),
        "sampling_seconds": round(result.seconds, 3), "output": str(out),
    }
    path = out.with_suffix(".json")
    path.write_text(json.dumps(sidecar, indent=1, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
