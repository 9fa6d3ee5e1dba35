"""``python -m grn_core.train {all,tokenizer,refiner,calibrate} --out DIR --seed 0``: the tiny model's recipe.

Loss lines go to stdout. ``--set name=value`` overrides a field of :class:`grn_core.train.recipe.TinyRecipe`
(e.g. ``--set tok_steps=200``); ``--micro`` starts from the seconds-long smoke-test recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from .recipe import TinyRecipe
from .stages import default_cache_dir, run_all, run_calibration, run_refiner, run_tokenizer


def _apply_overrides(recipe: TinyRecipe, items: list[str]) -> TinyRecipe:
    fields = {f.name: f for f in dataclasses.fields(TinyRecipe)}
    changes = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields or name in ("tokenizer", "refiner"):
            settable = sorted(n for n in fields if n not in ("tokenizer", "refiner"))
            raise ValueError(f"--set {item!r}: use NAME=VALUE with NAME one of {settable}.")
        current = getattr(recipe, name)
        try:
            changes[name] = type(current)(json.loads(value)) if not isinstance(current, str) else value
        except (ValueError, TypeError) as error:
            raise ValueError(f"--set {item!r}: {value!r} is not a valid {type(current).__name__}.") from error
    return recipe.replace(**changes).validate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grn_core.train",
                                     description="Train the built-in tiny GRN on procedural shape clips.")
    parser.add_argument("stage", choices=["all", "tokenizer", "refiner", "calibrate"])
    parser.add_argument("--out", type=Path, required=True, help="model directory (e.g. grn_core/assets/tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--micro", action="store_true", help="the seconds-long smoke-test recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override a recipe field (repeatable)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"where encoded training bits are cached (default {default_cache_dir()})")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the bits cache")
    parser.add_argument("--no-calibrate", action="store_true", help="refiner stage: skip the adaptive-step fit")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    try:
        recipe = _apply_overrides(TinyRecipe.micro() if args.micro else TinyRecipe(), args.overrides)
        torch.set_num_threads(recipe.threads)
        args.out.mkdir(parents=True, exist_ok=True)
        cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
        if args.stage == "all":
            run_all(recipe, args.out, args.seed, cache)
        elif args.stage == "tokenizer":
            run_tokenizer(recipe, args.out, args.seed)
        elif args.stage == "refiner":
            run_refiner(recipe, args.out, args.seed, cache, calibrate=not args.no_calibrate)
        else:
            run_calibration(args.out)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
