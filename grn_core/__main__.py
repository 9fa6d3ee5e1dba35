"""Command line: ``python -m grn_core {generate,inspect,convert} ...``."""

from __future__ import annotations

import argparse
import json
import sys

from .checkpoint_files import CheckpointError


def _inspect(args: argparse.Namespace) -> int:
    from .checkpoints import inspect_checkpoint

    info = inspect_checkpoint(args.path, layout=args.layout)
    print(json.dumps({"path": str(info.path), "kind": info.kind, "layout": info.layout, "tasks": list(info.tasks),
                      "config": info.config.to_dict()}, indent=1))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from . import generate as generate_module

    return generate_module.run_cli(args)


def _calibrate(args: argparse.Namespace) -> int:
    from .calibration import run_calibrate_cli

    return run_calibrate_cli(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grn_core", description="GRN: generative refinement networks.")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="print what a checkpoint file holds (kind, layout, config)")
    inspect.add_argument("path")
    inspect.add_argument("--layout", choices=["auto", "joint", "prefix"], default=None)
    inspect.set_defaults(run=_inspect)

    commands.add_parser("convert", help="same as python -m grn_core.convert", add_help=False)

    try:
        from .generate import add_generate_arguments
    except ImportError:  # the generation pipeline is optional while parts of the library are missing
        add_generate_arguments = None
    if add_generate_arguments is not None:
        generate = commands.add_parser("generate", help="prompt → image or video")
        add_generate_arguments(generate)
        generate.set_defaults(run=_generate)
        calibrate = commands.add_parser("calibrate", help="fit the adaptive-step rule (k, b) on a prompt list")
        from .calibration import add_calibrate_arguments

        add_calibrate_arguments(calibrate)
        calibrate.set_defaults(run=_calibrate)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        from .convert import main as convert_main

        return convert_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
