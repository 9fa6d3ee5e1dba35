"""``python -m grn_core calibrate``: fit the adaptive-step rule (k, b) of a model on a prompt list.

The method is :mod:`grn_core.calibration`; this module reads the flags, the prompts and writes the report. Every
number is checked before the model is loaded, so that the rule written is one ``generate`` accepts
(``0 <= warmup < min_steps <= steps``); the report is written whole (temporary file, then rename) or not at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..calibration import (BINS, D_LADDER, MIN_STEPS, WARMUP, calibrate, judge_scorer, likelihood_scorer,
                           run_ladder)
from ..data.shapes import parse_caption, video_captions
from ..media import StagedFile
from ..pipeline import check_memory
from ..request import MAX_GUIDANCE, MAX_STEPS, SizeSpec, plan_size
from ..sampler import SamplerSettings
from .common import (CtrlC, add_model_arguments, check_device, check_dtype, check_number, check_positive_int,
                     check_seeds, check_task, load_from_args, prepare_output_dir, preview_model, progress_enabled,
                     set_threads, stage, warn)


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompts", type=Path, default=None,
                        help="text file, one prompt per line (default for tiny: the 72 shapes captions)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--scorer", choices=["auto", "judge", "likelihood"], default="auto",
                        help="judge: the shapes judge (shapes captions only); likelihood: any model and prompts "
                             "(auto: judge for the tiny model with shapes captions, else likelihood)")
    parser.add_argument("--steps", type=int, default=50, help="the largest step count (schedule length)")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--min-steps", type=int, default=MIN_STEPS)
    parser.add_argument("--bins", type=int, default=BINS, help="entropy groups the need is measured in")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="score loss a group may take (judge: accuracy, default 0.05; likelihood: fraction of "
                             "the gain from the shortest to the best rung, default 0.1)")
    parser.add_argument("--noise-z", type=float, default=None,
                        help="also accept a rung whose shortfall is within this many standard errors (judge: "
                             "default 1; likelihood: default 0)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="write the report (rule + fit) as JSON here")


def _read_prompts(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"--prompts {path}: cannot read it ({error.strerror}); give a text file with one prompt "
                         f"per line.") from error
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte")
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"--prompts {path}: not UTF-8 text (byte {error.start} is not); give a text file with one "
                         "prompt per line.") from error
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompts; write one prompt per line.")
    return prompts


def _is_shapes_caption(prompt: str) -> bool:
    try:
        parse_caption(prompt)
    except ValueError:
        return False
    return True


def check_calibrate_flags(args: argparse.Namespace) -> None:
    """Every number of the command, checked before the model is loaded; the rule it will write must be one that
    ``generate`` accepts (``0 <= warmup < min_steps <= steps``)."""
    check_positive_int("--steps", args.steps, "e.g. 50 (the official schedule)")
    if args.steps > MAX_STEPS:
        raise ValueError(f"--steps {args.steps}: at most {MAX_STEPS} (the official schedule is 50).")
    check_positive_int("--bins", args.bins, f"e.g. {BINS}")
    check_positive_int("--batch-size", args.batch_size, "e.g. 8")
    if not args.seeds:
        raise ValueError("--seeds needs at least one seed, e.g. --seeds 0 1.")
    check_seeds("--seeds", *args.seeds)
    if isinstance(args.warmup, bool) or not isinstance(args.warmup, int) or args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup!r} must be a whole number >= 0, e.g. {WARMUP}.")
    if max(D_LADDER) + args.warmup > args.steps:
        raise ValueError(f"--steps {args.steps}: the ladder runs up to --warmup {args.warmup} + {max(D_LADDER)} steps; "
                         f"use --steps {max(D_LADDER) + args.warmup} or more, or a smaller --warmup.")
    if isinstance(args.min_steps, bool) or not isinstance(args.min_steps, int) or \
            not args.warmup < args.min_steps <= args.steps:
        raise ValueError(f"--min-steps {args.min_steps!r} must be from --warmup + 1 = {args.warmup + 1} to --steps "
                         f"{args.steps}; generate refuses a rule outside that range.")
    check_number("--tolerance", args.tolerance, 0.0, 1.0)
    check_number("--noise-z", args.noise_z, 0.0, 100.0)
    check_number("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    check_number("--temperature", args.temperature, 0.0, low_open=True)


def run(args: argparse.Namespace) -> int:
    with CtrlC() as ctrl_c:
        return _run(args, ctrl_c)


def _run(args: argparse.Namespace, ctrl_c: CtrlC) -> int:
    # 1. What the flags alone decide (no model loaded).
    args.device = check_device(args.device)
    check_dtype(args.dtype)
    set_threads(args)
    check_calibrate_flags(args)
    preview = preview_model(args)
    task = preview.task(args.task)
    check_task(preview, task)
    if task is not None and task not in ("t2i", "t2v"):
        raise ValueError(f"calibrate fits text-to-image/video models; {task} is not one (C2I ships the official rule, "
                         f"I2V can use its T2V sibling's rule).")
    shapes = args.prompts is None
    if shapes and args.model != "tiny":
        raise ValueError("--prompts FILE is needed for this model (one prompt per line, ideally 50+ of the kind "
                         "you generate).")
    prompts = video_captions() if shapes else _read_prompts(args.prompts)
    readable = [_is_shapes_caption(p) for p in prompts]
    if args.scorer == "auto":
        scorer_name = "judge" if args.model == "tiny" and all(readable) else "likelihood"
    else:
        scorer_name = args.scorer
    if scorer_name == "judge" and not all(readable):
        bad = prompts[readable.index(False)]
        raise ValueError(f"--scorer judge reads only captions of the shapes grammar ('a red circle moving right'); "
                         f"{bad!r} is not one. Use --scorer likelihood for other prompts.")
    scorer = judge_scorer if scorer_name == "judge" else likelihood_scorer
    if args.out is not None:
        if args.out.is_dir():
            raise ValueError(f"--out {args.out} is a folder; give a file name such as {args.out / 'rule.json'}.")
        prepare_output_dir("--out", args.out.parent if str(args.out.parent) else Path("."))
    overrides = {k: v for k, v in (("guidance", args.guidance), ("temperature", args.temperature)) if v is not None}
    if preview.spec is not None and task is not None:
        plan_size(preview.spec, task, args.width, args.height, args.frames)
        SamplerSettings.for_task(task, steps=args.steps, **overrides).validate()
    else:  # factors or task unknown until loaded: refuse only what no released tokenizer (16 px a cell) allows
        plan_size(SizeSpec(), task or "t2v", args.width, args.height, args.frames)

    # 2. The model, and the same checks with it.
    with stage("loading the model"):
        model, encoder, default_task = load_from_args(args)
    task = args.task or default_task
    if task not in ("t2i", "t2v"):
        raise ValueError(f"calibrate fits text-to-image/video models; {task} is not one (C2I ships the official rule, "
                         f"I2V can use its T2V sibling's rule).")
    plan = plan_size(model, task, args.width, args.height, args.frames)
    if plan.snapped:
        warn(f"calibrating at {plan.note}.")
    width, height, frames = plan.width, plan.height, plan.frames
    base = SamplerSettings.for_task(task, steps=args.steps, **overrides).validate()
    check_memory(model, width, height, frames, task, base.guidance, batch_size=min(args.batch_size, len(prompts)))

    def progress(done: int, total: int) -> None:
        if progress_enabled():
            print(f"\rcalibrating: {done}/{total} batches", end="", file=sys.stderr, flush=True)
        ctrl_c.check()

    with ctrl_c.cooperative(model.refiner):
        ladder = run_ladder(model, prompts, args.seeds, width=width, height=height, frames=frames, task=task,
                            scorer=scorer, base=base, warmup=args.warmup, text_encoder=encoder,
                            batch_size=args.batch_size, progress=progress)
    if progress_enabled():
        print(file=sys.stderr)
    report = calibrate(ladder, scorer, warmup=args.warmup, min_steps=args.min_steps, max_steps=args.steps,
                       bins=args.bins, tolerance=args.tolerance, noise_z=args.noise_z)
    report.update({"model": args.model, "task": task, "size": [width, height, frames],
                   "settings": base.to_dict()})
    try:
        text = json.dumps(report, indent=1, allow_nan=False)
    except ValueError as error:
        raise ValueError("the calibration report holds NaN or infinite values (the scores or entropies of the run); "
                         "nothing was written. The weights or the prompts' features are damaged.") from error
    if args.out is not None:
        try:
            with StagedFile(args.out) as staged:
                staged.temp.write_text(text + "\n", encoding="utf-8")
                staged.commit()
        except OSError as error:
            raise ValueError(f"--out {args.out}: writing failed ({error.strerror or error}); nothing was replaced. "
                             "Free disk space or choose another --out folder.") from error
    print(text)
    return 0
