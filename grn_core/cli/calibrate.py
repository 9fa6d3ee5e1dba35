"""``python -m grn_core calibrate``: fit the adaptive-step rule (k, b) of a model on a prompt list.

The method is :mod:`grn_core.calibration`; this module reads the flags, the prompts and writes the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..calibration import BINS, MIN_STEPS, WARMUP, calibrate, judge_scorer, likelihood_scorer, run_ladder
from ..data.shapes import parse_caption, video_captions
from ..request import plan_size
from ..sampler import SamplerSettings
from .common import add_model_arguments, load_from_args, set_threads, warn


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
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"--prompts {path}: cannot read it ({error.strerror}); give a text file with one prompt "
                         f"per line.") from error
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


def run(args: argparse.Namespace) -> int:
    set_threads(args)
    model, encoder, default_task = load_from_args(args)
    task = args.task or default_task
    if task not in ("t2i", "t2v"):
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
    plan = plan_size(model, task, args.width, args.height, args.frames)
    if plan.snapped:
        warn(f"calibrating at {plan.note}.")
    width, height, frames = plan.width, plan.height, plan.frames
    overrides = {k: v for k, v in (("guidance", args.guidance), ("temperature", args.temperature)) if v is not None}
    base = SamplerSettings.for_task(task, steps=args.steps, **overrides)

    def progress(done: int, total: int) -> None:
        print(f"\rcalibrating: {done}/{total} batches", end="", file=sys.stderr, flush=True)

    run = run_ladder(model, prompts, args.seeds, width=width, height=height, frames=frames, task=task, scorer=scorer,
                     base=base, warmup=args.warmup, text_encoder=encoder, batch_size=args.batch_size,
                     progress=progress if sys.stderr.isatty() else None)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    report = calibrate(run, scorer, warmup=args.warmup, min_steps=args.min_steps, max_steps=args.steps,
                       bins=args.bins, tolerance=args.tolerance, noise_z=args.noise_z)
    report.update({"model": args.model, "task": task, "size": [width, height, frames],
                   "settings": base.to_dict()})
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0
