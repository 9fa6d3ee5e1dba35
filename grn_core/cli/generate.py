"""``python -m grn_core generate``: prompt (or class) → video/image file plus a JSON sidecar of the run.

Sizes, frames, settings and the first frame are resolved by :mod:`grn_core.request`, as the ComfyUI nodes do, so a
flag and the node widget of the same name give the same bits. What was changed (a size snapped to the grid, frames
floored to ``1 + 4k``) is printed as a warning and recorded in the sidecar.

Everything the flags alone decide is checked before the model is loaded (see :mod:`grn_core.cli.common`): the size
against the model's grid (read from its file header), frames, fps, seeds, the settings, the output path and format,
the sidecar, the first-frame image. ``--out``'s missing folders are created. The video and its sidecar
(``NAME.json``, marked ``"grn_sidecar": 1``) are written to temporary files and renamed into place together once both
are complete; a ``NAME.json`` that exists and is not one of our sidecars is never overwritten.

Several prompts: ``--prompts FILE`` (one prompt a line, blank lines skipped) makes ``OUT_stem_{i}.suffix`` (and its
sidecar) for the i-th prompt (from 0), each with ``--seed``, so file i equals ``--prompt LINE_i --seed S`` alone.

Several processes (``torchrun --nproc-per-node N -m grn_core generate ... --parallel MODE``, see
:mod:`grn_core.runtime.distributed`): ``cfg`` (N = 2) splits the two guidance branches of every step between the two
ranks; ``sp`` (N dividing the refiner's heads) splits every step's packed sequence over the N ranks (Ulysses);
``cfg+sp`` (N = 2P) gives each guidance branch P ranks that split its sequence; in these three the prompt is encoded on
rank 0 only (a separate text encoder is loaded there alone) and sent to the others, and all ranks share the decode
(:mod:`grn_core.runtime.split`). ``data`` (any N, with ``--prompts``) gives rank r the prompts i with i % N == r, each
rank encoding and decoding its own and rank 0 writing them all. Only rank 0 prints progress and writes files; every rank checks that it has the same model
files before loading them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..runtime.distributed import PARALLEL_CHOICES, DEFAULT_TIMEOUT_S, ParallelPlan, branch_strategy, \
    check_parallel_mode
from ..media import StagedFile, check_fps, check_output, encode_frames, to_uint8
from ..request import SizeSpec, negative_prompt, plan_size, prepare_first_frame, resolve_settings
from ..sampler import StepInfo
from ..sampler.states import STATE_COLOURS
from .common import (CtrlC, ProgressLine, add_model_arguments, check_device, check_dtype, check_input_file,
                     check_seeds, check_task, load_from_args, model_files, prepare_output_dir, preview_model, set_quiet,
                     set_threads, stage, warn)

SIDECAR_MARK = "grn_sidecar"
# Keys every sidecar written before the mark existed has: such a file is ours too and may be replaced.
LEGACY_SIDECAR_KEYS = frozenset({"model", "task", "seed", "settings", "output", "nfe"})
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own decompression-bomb warning threshold (about 9459 x 9459)


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
    parser.add_argument("--out", type=Path, default=Path("grn_out.mp4"),
                        help=".mp4, .gif, .webp or .png (missing folders are created; NAME.json gets the run's "
                             "record, never overwriting a NAME.json this tool did not write)")
    parser.add_argument("--fps", type=float, default=16.0, help="frames per second of the file, 0.01..1000")
    parser.add_argument("--preview-dir", type=Path, default=None,
                        help="write the token-state map and RGB preview of every step as PNGs")
    parser.add_argument("--init", type=Path, default=None,
                        help="refine a source: an image, a video or a .safetensors from `encode`")
    parser.add_argument("--strength", type=float, default=None,
                        help="with --init: 0 keeps the source, 1 regenerates fully (default 1); start step "
                             "round((1 - strength) * steps)")
    parser.add_argument("--mask", type=Path, default=None,
                        help="with --init: an image, white = regenerate, black = keep (a cell is kept when all its "
                             "pixels are black); resized to the output with a warning")
    parser.add_argument("--mask-grow", type=int, default=0, help="grow the regenerated region by N latent cells")
    parser.add_argument("--extend", type=Path, default=None,
                        help="continue a clip: its last frame becomes the first frame of the new one (a video, an "
                             "image or a .safetensors from `encode`)")
    parser.add_argument("--save-tokens", type=Path, default=None,
                        help="also write the final bits to T.safetensors ([1, rounds*d, t, h, w], as `encode`)")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="a text file, one prompt a line: OUT_stem_{i}.suffix for the i-th (from 0), each with "
                             "--seed (instead of --prompt)")
    parser.add_argument("--parallel", default=None, metavar="|".join(PARALLEL_CHOICES),
                        help="under torchrun: cfg (2 processes, one guidance branch each), sp (N processes split "
                             "each step's sequence; N divides the heads), cfg+sp (2P processes: P per branch) or data "
                             "(--prompts spread over the processes)")
    parser.add_argument("--parallel-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds a rank waits for the others before giving up with an error (default 1800)")


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


def settings_from_args(args: argparse.Namespace, model: Any, task: str, rule: Any = None):
    """Sampler settings from the flags (:func:`grn_core.request.resolve_settings` decides). ``rule``: the
    ``--adaptive-rule`` file's rule, when it was already read."""
    if getattr(args, "adaptive_rule", None) is not None:
        if task == "c2i":
            raise ValueError("--adaptive-rule is for text-conditioned models; class-to-image uses the official "
                             "complexity-aware rule (--adaptive) or fixed steps.")
        if args.adaptive is False:
            raise ValueError("--adaptive-rule with --no-adaptive: drop one of the two.")
        if rule is None:
            from ..calibration import read_rule

            rule = read_rule(args.adaptive_rule)
    adaptive = True if rule is not None else args.adaptive
    return resolve_settings(model, task, steps=args.steps, guidance=args.guidance, temperature=args.temperature,
                            shift=getattr(args, "shift", None), cfg_interval=getattr(args, "guidance_interval", None),
                            adaptive=adaptive, rule=rule, warmup=getattr(args, "warmup", None),
                            min_steps=getattr(args, "min_steps", None), k=getattr(args, "adaptive_k", None),
                            b=getattr(args, "adaptive_b", None))


def sidecar_path(out: Path) -> Path:
    return out.with_suffix(".json")


def check_sidecar(out: Path) -> Path:
    """The sidecar's path, refused when a file there is not one of our sidecars (it would be overwritten)."""
    path = sidecar_path(out)
    if not path.exists() and not path.is_symlink():
        return path
    ours = False
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            data = None
        ours = isinstance(data, dict) and (data.get(SIDECAR_MARK) == 1 or LEGACY_SIDECAR_KEYS <= set(data))
    if not ours:
        raise ValueError(f"--out {out}: the run's sidecar would overwrite {path}, which exists and was not written by "
                         "this tool; move that file away, or choose another --out name or folder.")
    return path


def check_flags(args: argparse.Namespace, task: Optional[str]) -> None:
    """Flags the task would ignore or cannot use, refused rather than dropped (``task`` None: not known yet)."""
    if task is None:
        return
    if task == "c2i":
        ignored = [flag for flag, value in (("--prompt", args.prompt), ("--negative", args.negative),
                                            ("--image", args.image), ("--width", args.width),
                                            ("--height", args.height), ("--frames", args.frames),
                                            ("--duration", args.duration), ("--resolution", args.resolution),
                                            ("--aspect", args.aspect)) if value is not None]
        if ignored:
            raise ValueError(f"class-to-image takes a class, not {', '.join(ignored)} (it makes the model's own "
                             "256x256 image); drop them.")
        if args.class_index is None:
            raise ValueError("class-to-image needs --class-index (an ImageNet class, 0..999).")
        return
    if args.class_index is not None:
        raise ValueError(f"--class-index is for class-to-image models; this is a {task.upper()} request, which takes "
                         "--prompt. Drop --class-index, or use a class-to-image model (--model c2i-b).")
    if (args.prompt is None or not str(args.prompt).strip()) and not getattr(args, "prompts", None):
        raise ValueError("--prompt is required for text-to-image/video: describe what to generate.")
    if task == "i2v" and args.image is None:
        raise ValueError("image-to-video needs --image (the first frame).")
    if task != "i2v" and args.image is not None:
        raise ValueError(f"--image is the first frame of image-to-video; this is a {task.upper()} request. Add "
                         "--task i2v (with an image-to-video model), or drop --image.")


def _check_plan(args: argparse.Namespace, model: Any, task: str, out: Path, rule: Any):
    """Size (:func:`plan_size`), output format against its frame count, and settings, for ``model`` (loaded, or
    the :class:`~grn_core.request.SizeSpec` read from its files)."""
    plan = plan_size(model, task, args.width, args.height, args.frames, duration=args.duration,
                     resolution=args.resolution, h_over_w=args.aspect)
    check_output(out, plan.frames)
    settings = settings_from_args(args, model, task, rule)
    return plan, settings


def run(args: argparse.Namespace) -> int:
    with CtrlC() as ctrl_c:
        return _run(args, ctrl_c)


def _run(args: argparse.Namespace, ctrl_c: CtrlC) -> int:
    args.device = check_device(args.device)  # before the process group is joined on it
    parallel = _parallel_plan(args)
    try:
        return _run_on(args, ctrl_c, parallel)
    finally:
        parallel.close()
        set_quiet(False)


def _parallel_plan(args: argparse.Namespace) -> ParallelPlan:
    """``--parallel`` against the environment torchrun set (checked before anything else); joins the group."""
    mode = getattr(args, "parallel", None)
    if mode is None:
        return ParallelPlan.single(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    check_parallel_mode(mode, world)
    if mode == "data" and getattr(args, "prompts", None) is None:
        raise ValueError("--parallel data spreads prompts over the processes: give --prompts FILE (one prompt a "
                         "line). For one prompt use --parallel cfg (2 processes) or --parallel sp.")
    if "WORLD_SIZE" not in os.environ:  # data parallel over 1 process: no group needed
        return ParallelPlan.single(args.device)
    plan = ParallelPlan.from_env(args.device, timeout_s=getattr(args, "parallel_timeout", DEFAULT_TIMEOUT_S))
    args.device = str(plan.device)
    set_quiet(not plan.is_main)
    return plan


def _read_prompts(args: argparse.Namespace) -> Optional[list]:
    """``--prompts FILE``: its non-blank lines (flags that do not fit several prompts refused)."""
    if getattr(args, "prompts", None) is None:
        return None
    if args.prompt is not None:
        raise ValueError("--prompt and --prompts both give the prompt; use one.")
    for flag, value in (("--image", args.image), ("--init", args.init), ("--extend", args.extend),
                        ("--mask", args.mask), ("--preview-dir", args.preview_dir),
                        ("--class-index", args.class_index)):
        if value is not None:
            raise ValueError(f"{flag} is not supported with --prompts yet; run those requests one by one (--prompt).")
    path = check_input_file("--prompts", args.prompts)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"--prompts {path}: not UTF-8 text ({error.reason}); save it as UTF-8.") from error
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt; write one prompt a line.")
    return prompts


def _numbered(path: Optional[Path], i: int) -> Optional[Path]:
    return None if path is None else path.with_name(f"{path.stem}_{i}{path.suffix}")


def _run_on(args: argparse.Namespace, ctrl_c: CtrlC, parallel: ParallelPlan) -> int:
    from ..pipeline import check_memory, decode_tokens, encode_prompt, generate_class_tokens

    started = time.perf_counter()
    main_rank = parallel.is_main
    # 1. What the flags alone decide: no model, no weights read (a mistake costs milliseconds).
    args.device = check_device(args.device)
    check_dtype(args.dtype)
    set_threads(args)
    check_seeds("--seed", args.seed)
    check_fps(args.fps, "--fps")
    prompts = _read_prompts(args)
    preview = preview_model(args)
    task = preview.task(args.task)
    check_task(preview, task)
    check_flags(args, task)
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a file name such as {args.out / 'grn_out.mp4'}.")
    out = check_output(args.out)
    outs = [out] if prompts is None else [_numbered(out, i) for i in range(len(prompts))]
    if main_rank:  # only rank 0 writes: only its file system matters
        for path in outs:
            check_sidecar(path)
        prepare_output_dir("--out", out.parent if str(out.parent) else Path("."))
        if args.preview_dir is not None:
            prepare_output_dir("--preview-dir", args.preview_dir)
    rule = None
    if args.adaptive_rule is not None:
        from ..calibration import read_rule

        if args.adaptive is False:
            raise ValueError("--adaptive-rule with --no-adaptive: drop one of the two.")
        rule = read_rule(check_input_file("--adaptive-rule", args.adaptive_rule))
    picture = _read_image(args.image) if args.image is not None else None
    edit = _read_edit_inputs(args, task)
    if preview.spec is not None and task is not None:
        _check_plan(args, preview.spec, task, out, rule)
    else:  # factors or task unknown until loaded: refuse only what no released tokenizer (at most 16 px a cell) allows
        plan_size(SizeSpec(), task or "t2v", args.width, args.height, args.frames, duration=args.duration,
                  resolution=args.resolution, h_over_w=args.aspect)
    if parallel.active:
        parallel.check_same_files(model_files(args))

    # 2. The model; then the same checks with it (the authority), and the memory the request needs.
    splits_steps = args.parallel in ("cfg", "sp", "cfg+sp")  # every rank takes part in every step
    with stage("loading the model"):  # ranks that receive the prompt features from rank 0 need no text encoder
        model, encoder, default_task = load_from_args(args, text_encoder=main_rank or not splits_steps)
    task = args.task or default_task
    check_flags(args, task)
    if splits_steps and task == "c2i":
        raise ValueError(f"--parallel {args.parallel} splits the text-conditioned refiner's steps; class-to-image is "
                         "not supported yet. Run it without --parallel (or --parallel data with --prompts).")
    if parallel.active:
        config = model.refiner.config
        check_parallel_mode(args.parallel, parallel.world_size, (config.heads, config.kv_heads))
    _size_from_tokens(args, edit, model)
    plan, settings = _check_plan(args, model, task, out, rule)
    if plan.snapped:
        warn(f"making {plan.note}.")
    negative = negative_prompt(model, task, args.negative)
    check_memory(model, plan.width, plan.height, plan.frames, task, settings.guidance,
                 parallel=(args.parallel, parallel.world_size))
    if args.parallel in ("cfg", "cfg+sp") and settings.guidance == 1.0:
        warn(f"--parallel {args.parallel} with guidance 1: there is no unconditional branch, its ranks only wait.")

    progress = ProgressLine()
    if args.preview_dir is not None:
        from ..pipeline import ensure_preview

        ensure_preview(model)

    def on_step(info: StepInfo) -> None:
        progress(info.step + 1, info.total_steps, info.entropy[0])
        if args.preview_dir is not None and main_rank:
            state_map_image(info.token_states[0]).save(args.preview_dir / f"step{info.step:03d}_states.png")
            if info.preview is not None:
                _preview_image(info.preview).save(args.preview_dir / f"step{info.step:03d}_rgb.png")
        ctrl_c.check()  # Ctrl-C between steps (the refiner also checks between its blocks)

    if task == "c2i":
        try:
            with ctrl_c.cooperative(model.refiner):
                tokens = generate_class_tokens(model, [args.class_index], seed=args.seed, settings=settings,
                                               callback=on_step)
        finally:
            progress.close()
        jobs = [(0, args, tokens)]
    else:
        branches = branch_strategy(parallel, args.parallel)
        shared = parallel if splits_steps else None
        mine = parallel.shard(len(outs)) if args.parallel == "data" else list(range(len(outs)))
        jobs = []
        for i in mine:
            job_args = args if prompts is None else argparse.Namespace(**{**vars(args), "prompt": prompts[i]})
            tokens = _sample_prompt(job_args, model, encoder, task, negative, plan, settings, picture, edit, ctrl_c,
                                    on_step, progress, branches, shared)
            jobs.append((i, job_args, tokens))
    done = []  # (index, uint8 pixels, sidecar text, bits or None, summary)
    for i, job_args, tokens in jobs:
        with stage("decoding"):
            if splits_steps:  # every rank holds the same bits: they share the decode, rank 0 gets the frames
                from ..runtime.split import decode_tokens_split

                frames = decode_tokens_split(parallel, model, tokens)
                if not main_rank:
                    continue
                video = frames[0]
            else:
                video = decode_tokens(model, tokens)[0]
        text = sidecar_text(outs[i], job_args, task, negative, plan, settings, tokens, int(video.shape[0]), started)
        result = tokens.sampling
        done.append((i, to_uint8(video), text, tokens.bits[:1].cpu() if args.save_tokens is not None else None,
                     (int(video.shape[0]), result.steps[0], result.nfe[0])))
    if args.parallel == "data" and parallel.active:
        gathered = parallel.gather_object(done, "collecting the generated videos on rank 0")
        if not main_rank:
            return 0
        done = sorted((item for part in gathered for item in part), key=lambda item: item[0])
    if not main_rank:
        return 0  # rank 0 writes
    for i, pixels, text, bits, (frames, steps, nfe) in done:
        with stage(f"writing {outs[i]}"):
            _write_files(outs[i], pixels, text, float(args.fps))
        if args.save_tokens is not None:
            from .encode import tokens_metadata, write_tokens

            target = args.save_tokens if prompts is None else _numbered(Path(args.save_tokens), i)
            with stage(f"writing {target}"):
                write_tokens(target, bits, tokens_metadata(model, bits, seed=args.seed, output=outs[i]),
                             sidecar=False)
        print(f"wrote {outs[i]} ({frames} frames, {steps} steps, {nfe} network passes, "
              f"{time.perf_counter() - started:.1f} s)")
    return 0


def _sample_prompt(args: argparse.Namespace, model: Any, encoder: Any, task: str, negative: str, plan, settings,
                   picture: Any, edit: dict, ctrl_c: CtrlC, on_step, progress: ProgressLine, branches: Any,
                   shared: Optional[ParallelPlan] = None):
    """One text request's tokens (``branches``: the sampler's branch strategy, None for this process alone;
    ``shared``: the group whose rank 0 encodes the prompt for all)."""
    from ..pipeline import GenerationRequest, encode_prompt, generate_tokens

    def encode():
        return encode_prompt(model, encoder, args.prompt, negative, task=task, need_uncond=settings.guidance != 1.0)

    with stage("encoding the prompt"):
        if shared is not None:
            from ..runtime.split import broadcast_features

            feats = broadcast_features(shared, encode if shared.is_main else None)
        else:
            feats = encode()
    image = prepare_first_frame(picture, plan.width, plan.height) if picture is not None else None
    init_bits, fixed, strength = _edit_request(args, edit, model, plan, settings)
    first_bits = None
    if shared is not None:  # every rank starts from rank 0's encodings of the sources (see ParallelPlan.broadcast_)
        if image is not None:
            from ..pipeline import encode_first_frame

            first_bits = shared.broadcast_(encode_first_frame(model, image, plan.width, plan.height),
                                           "sharing the first frame's bits")
            image = None
        init_bits = shared.broadcast_(init_bits, "sharing the source's bits")
        fixed = shared.broadcast_(fixed, "sharing the kept cells")
    request = GenerationRequest(width=plan.width, height=plan.height, frames=plan.frames, seed=args.seed,
                                settings=settings, init_bits=init_bits, fixed=fixed, strength=strength)
    try:
        with ctrl_c.cooperative(model.refiner):
            tokens = generate_tokens(model, feats, request, first_frame=image, callback=on_step,
                                     preview=args.preview_dir is not None, branches=branches,
                                     first_frame_bits=first_bits)
    finally:
        progress.close()
    if shared is not None:
        shared.check_same_tensor(tokens.bits, "bits")
    return tokens


def _read_edit_inputs(args: argparse.Namespace, task: Optional[str]) -> dict:
    """--init / --strength / --mask / --extend / --save-tokens: combinations checked and files read, before any
    model is loaded."""
    from ..editing import check_strength
    from .encode import read_source

    edit: dict = {}
    if args.init is not None and args.extend is not None:
        raise ValueError("--init and --extend both give a source; use one (--extend continues a clip, --init "
                         "refines one).")
    if args.init is None:
        for flag, value in (("--strength", args.strength), ("--mask", args.mask)):
            if value is not None:
                raise ValueError(f"{flag} needs --init SRC (the image, video or tokens to refine).")
    if args.mask_grow and args.mask is None:
        raise ValueError("--mask-grow needs --mask.")
    if args.strength is not None:
        check_strength(args.strength)
    if args.save_tokens is not None and Path(args.save_tokens).suffix.lower() != ".safetensors":
        raise ValueError(f"--save-tokens {args.save_tokens}: token files are .safetensors.")
    if (args.init is not None or args.extend is not None) and task in ("c2i", "i2v"):
        raise ValueError(f"--init / --extend refine text-to-image/video requests; this is {task.upper()}.")
    if args.init is not None:
        edit["init"] = read_source("--init", args.init)
    if args.extend is not None:
        edit["extend"] = read_source("--extend", args.extend)
    if args.mask is not None:
        from PIL import Image

        path = check_input_file("--mask", args.mask)
        try:
            with Image.open(path) as image:
                edit["mask"] = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        except Exception as error:  # noqa: BLE001 - Pillow's ways of saying "damaged"
            raise ValueError(f"--mask {path}: not a readable picture ({error}); give a black-and-white "
                             "PNG.") from error
    return edit


def _size_from_tokens(args: argparse.Namespace, edit: dict, model: Any) -> None:
    """A tokens source sets the output size when --width/--height/--frames are not given."""
    source = edit.get("init")
    if source is None or source[0] != "tokens":
        return
    bits = source[1][0]
    sf, tf = model.spatial_factor, model.temporal_factor
    if args.width is None and args.height is None and args.resolution is None:
        args.width, args.height = bits.shape[4] * sf, bits.shape[3] * sf
    if args.frames is None and args.duration is None:
        args.frames = 1 + (bits.shape[2] - 1) * tf


def _edit_request(args: argparse.Namespace, edit: dict, model: Any, plan, settings):
    """(init_bits, fixed, strength) of the request from the sources read by :func:`_read_edit_inputs`."""
    from ..editing import encode_source, extend_source, mask_to_cells
    from ..pipeline import latent_grid_for
    from .encode import check_tokens

    if not edit or ("init" not in edit and "extend" not in edit):
        return None, None, 1.0
    grid = latent_grid_for(model, plan.width, plan.height, plan.frames)
    strength = 1.0 if args.strength is None else float(args.strength)
    if "extend" in edit:
        kind, source = edit["extend"]
        if kind == "tokens":  # its last latent frame decoded to pixels, then encoded as a 1-frame clip
            from ..pipeline import decode_tokens

            bits = check_tokens("--extend", args.extend, source[0], model)
            with stage("encoding --extend"):
                last = decode_tokens(model, bits[:, :, -1:])[0, -1]  # [H, W, 3] in [0, 1]
                frame = prepare_first_frame(last, plan.width, plan.height)
                init, fixed = extend_source(model, frame, grid)
        else:
            frame = prepare_first_frame(source[-1], plan.width, plan.height)
            with stage("encoding --extend"):
                init, fixed = extend_source(model, frame, grid)
        return init, fixed, 1.0
    kind, source = edit["init"]
    if kind == "tokens":
        init = check_tokens("--init", args.init, source[0], model, grid)
    else:
        with stage("encoding --init"):
            try:
                init = encode_source(model, source, plan.width, plan.height, plan.frames)
            except ValueError as error:
                raise ValueError(f"--init {args.init}: {error}") from error
    fixed = None
    if "mask" in edit:
        fixed = mask_to_cells(edit["mask"], model.spatial_factor, model.temporal_factor, grow=args.mask_grow,
                              size=(plan.frames, plan.height, plan.width), strength=strength, warn=warn)
    return init, fixed, strength


def _read_image(path: Path):
    """The ``--image`` file as an RGB picture, fully decoded now (before any model is loaded)."""
    from PIL import Image

    check_input_file("--image", path)
    fix = "give a PNG/JPEG/WebP picture"
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width < 1 or height < 1:
                raise ValueError(f"--image {path} is {width}x{height} pixels; {fix} with pixels in it.")
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(f"--image {path} is {width}x{height} ({width * height / 1e6:.0f} megapixels), more "
                                 f"than the {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels accepted; the first frame is "
                                 "resized to the video's size anyway, so give a smaller picture.")
            return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise ValueError(f"--image {path}: {error}; give a smaller picture.") from error
    except (OSError, SyntaxError, EOFError, struct.error, zlib.error) as error:  # Pillow's ways of saying "damaged"
        what = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise ValueError(f"--image {path}: not a readable picture ({what}); {fix}.") from error


def sidecar_text(out: Path, args: argparse.Namespace, task: str, negative: str, plan, settings, tokens, frames: int,
                 started: float) -> str:
    """The sidecar as strict JSON (no NaN / Infinity: those are not JSON and a run never produces them)."""
    result = tokens.sampling
    sidecar = {
        SIDECAR_MARK: 1,
        "model": args.model, "task": task, "prompt": args.prompt, "negative": negative, "seed": args.seed,
        "width": plan.width, "height": plan.height, "frames": frames, "size_note": plan.note,
        "steps": result.steps[0], "nfe": result.nfe[0], "entropy": result.entropy[0],
        "kept_fraction": result.kept_fraction[0],
        "adaptive_decision": result.remaining_steps[0] if result.remaining_steps else None,
        "settings": settings.to_dict(), "seconds": round(time.perf_counter() - started, 3),
        "sampling_seconds": round(result.seconds, 3), "output": str(out),
    }
    if args.class_index is not None:
        sidecar["class_index"] = args.class_index
    if args.image is not None:
        sidecar["image"] = str(args.image)
    for key in ("init", "mask", "extend"):
        if getattr(args, key, None) is not None:
            sidecar[key] = str(getattr(args, key))
    if getattr(args, "init", None) is not None:
        sidecar["strength"] = 1.0 if args.strength is None else float(args.strength)
    try:
        return json.dumps(sidecar, indent=1, default=_json_default, allow_nan=False)
    except ValueError as error:
        bad = [key for key, value in sidecar.items() if _has_non_finite(value)]
        raise ValueError(f"the run's record holds NaN or infinite values ({', '.join(bad) or error}); nothing was "
                         "written. The weights or the inputs are damaged.") from error


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    return False


def _write_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError,)
    try:
        import av

        errors += (av.FFmpegError,)
    except (ImportError, AttributeError):
        pass
    return errors


def _write_outputs(out: Path, video: torch.Tensor, args: argparse.Namespace, task: str, negative: str, plan,
                   settings, tokens, started: float) -> None:
    """The video and its sidecar: both written to temporary files, then renamed into place (nothing on failure)."""
    text = sidecar_text(out, args, task, negative, plan, settings, tokens, int(video.shape[0]), started)
    _write_files(out, to_uint8(video), text, float(args.fps))


def _write_files(out: Path, pixels: Any, text: str, fps: float) -> None:
    """uint8 frames and the sidecar text, staged and renamed into place together."""
    sidecar = check_sidecar(out)  # again: a file may have appeared there while the run went on
    try:
        with StagedFile(out) as staged_video, StagedFile(sidecar) as staged_sidecar:
            encode_frames(pixels, staged_video.temp, out.suffix.lower(), fps)
            staged_sidecar.temp.write_text(text + "\n", encoding="utf-8")
            staged_video.commit()
            staged_sidecar.commit()
    except _write_errors() as error:
        why = getattr(error, "strerror", None) or str(error).splitlines()[0][:200] or type(error).__name__
        raise ValueError(f"--out {out}: writing failed ({why}); nothing was replaced. Free disk space or choose "
                         "another --out folder.") from error


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
