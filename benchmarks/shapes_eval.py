"""Quality benchmark of the built-in tiny GRN: generate the shapes grammar's captions, judge every clip.

    python benchmarks/shapes_eval.py                          # shipped model, 72 prompts x seeds 0 1, both modes
    python benchmarks/shapes_eval.py --model-dir /tmp/run     # a model trained with python -m grn_core.train
    python benchmarks/shapes_eval.py --model-file /tmp/tiny.Q8_0.gguf --modes fixed50   # another refiner file
    python benchmarks/shapes_eval.py --write-md /work/brief/tiny_results.md

Every video caption ``a {color} {shape} moving {direction}`` (72) is generated with each seed, one clip per call as
the CLI does (batch 1), in two modes: ``fixed50`` (the official 50-step schedule) and ``adaptive`` (entropy-guided
step count with the model's calibrated rule), interleaved prompt by prompt so machine load hits both alike.
Each clip is judged by ``grn_core.data.judge`` (colour, shape, direction of motion). Reported per mode: accuracy
per attribute and for all three, mean network evaluations (NFE, cond + uncond counted separately), mean steps and
mean seconds per clip (sampling + tokenizer decode; judging excluded). Prints JSON.

``--model-file PATH``: a refiner file used instead of the model directory's own ``refiner.safetensors`` (e.g. the tiny
refiner converted to GGUF: ``python -m grn_core.convert grn_core/assets/tiny/refiner.safetensors /tmp/tiny.Q8_0.gguf
--dtype q8_0``), loaded by the normal loader (``grn_core.pipeline.load_model``, default dtype: float32 compute on the
CPU) with the directory's tokenizer, text encoder, adaptive rule and default size. Its network must have the same
config as the directory's refiner.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grn_core.data.shapes import video_captions  # noqa: E402
from grn_core.models import TINY_DIR  # noqa: E402
from grn_core.pipeline import GRNModel, load_model  # noqa: E402
from grn_core.sampler import ADAPTIVE_DEFAULTS, SamplerSettings  # noqa: E402
from grn_core.train.evaluate import adaptive_rule, generate_batch, judge_frames, load_model_dir  # noqa: E402

ATTRIBUTES = ("color", "shape", "direction", "all")
SECTION_START = "<!-- tiny-shapes-benchmark:start -->"
SECTION_END = "<!-- tiny-shapes-benchmark:end -->"


def _settings(model_dir: Path) -> dict[str, SamplerSettings]:
    base = SamplerSettings.for_task("t2v")
    rule = adaptive_rule(model_dir)
    if rule is None and ADAPTIVE_DEFAULTS["t2v"].calibrated:
        rule = ADAPTIVE_DEFAULTS["t2v"]
    modes = {"fixed50": base}
    if rule is not None:
        modes["adaptive"] = dataclasses.replace(base, adaptive=rule)
    return modes


def load_benchmark_model(model_dir: Path, model_file: Path | None = None) -> GRNModel:
    """The model of ``model_dir`` (refiner, tokenizer, text encoder, preview, default size), with the refiner of
    ``model_file`` instead of the directory's own when given (same config required)."""
    model = load_model_dir(model_dir)
    if model_file is None:
        return model
    other = load_model(model_file, model_dir / "tokenizer.safetensors")
    if other.refiner.config != model.refiner.config:
        raise SystemExit(f"--model-file {model_file}: its refiner config {other.refiner.config} differs from "
                         f"{model_dir}'s ({model.refiner.config}); the tokenizer and text encoder would not fit.")
    return dataclasses.replace(model, refiner=other.refiner, name=Path(model_file).name)


def run(model_dir: Path, prompts: list[str], seeds: list[int], modes: list[str],
        model_file: Path | None = None) -> dict:
    model = load_benchmark_model(model_dir, model_file)
    size = model.defaults or {"width": 32, "height": 32, "frames": 9}
    settings = _settings(model_dir)
    missing = [m for m in modes if m not in settings]
    if missing:
        raise SystemExit(f"mode(s) {missing} unavailable: the model has no calibrated adaptive rule.")
    tallies = {m: {"hits": dict.fromkeys(ATTRIBUTES, 0), "nfe": 0, "steps": 0, "seconds": 0.0, "n": 0} for m in modes}
    failures: dict[str, list] = {m: [] for m in modes}
    # Warm-up (first-call allocations and kernel selection), not counted.
    generate_batch(model, prompts[:1], 0, settings[modes[0]], size["frames"], size["height"], size["width"])
    for seed in seeds:
        for prompt in prompts:
            for mode in modes:
                started = time.perf_counter()
                video, result = generate_batch(model, [prompt], seed, settings[mode], size["frames"], size["height"],
                                               size["width"])
                elapsed = time.perf_counter() - started
                verdict = judge_frames(video[0], prompt)
                t = tallies[mode]
                for a in ATTRIBUTES:
                    t["hits"][a] += int(verdict[a])
                t["nfe"] += result.nfe[0]
                t["steps"] += result.steps[0]
                t["seconds"] += elapsed
                t["n"] += 1
                if not verdict["all"]:
                    failures[mode].append({"prompt": prompt, "seed": seed,
                                           "wrong": [a for a in ATTRIBUTES[:3] if not verdict[a]]})
    report = {}
    for mode, t in tallies.items():
        n = t["n"]
        report[mode] = {
            "accuracy": {a: round(t["hits"][a] / n, 4) for a in ATTRIBUTES},
            "mean_nfe": round(t["nfe"] / n, 2), "mean_steps": round(t["steps"] / n, 2),
            "mean_seconds": round(t["seconds"] / n, 4), "samples": n,
            "settings": settings[mode].to_dict(), "failures": failures[mode],
        }
    if "fixed50" in report and "adaptive" in report:
        f, a = report["fixed50"], report["adaptive"]
        report["adaptive_vs_fixed50"] = {
            "nfe_reduction": round(1 - a["mean_nfe"] / f["mean_nfe"], 4),
            "seconds_reduction": round(1 - a["mean_seconds"] / f["mean_seconds"], 4),
            "accuracy_delta_points": {k: round(100 * (a["accuracy"][k] - f["accuracy"][k]), 2) for k in ATTRIBUTES},
        }
    return report


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def _markdown(result: dict) -> str:
    modes = [m for m in ("fixed50", "adaptive") if m in result["modes"]]
    lines = [
        SECTION_START,
        "## Tiny model: shapes benchmark (`benchmarks/shapes_eval.py`)",
        "",
        f"- date: {result['date']}",
        f"- machine: {result['machine']}",
        f"- command: `{result['command']}`",
        f"- model: `{result['model_dir']}`"
        + (f" with refiner `{result['model_file']}` ({result['weight_dtype']})" if result.get("model_file") else "")
        + f" ({result['model_bytes'] / 1e6:.2f} MB); "
        f"{result['prompts']} prompts x seeds {result['seeds']} = {result['samples']} clips per mode, "
        f"{result['size']['frames']} frames at {result['size']['width']}x{result['size']['height']}",
        "",
        "| mode | color | shape | direction | all three | mean NFE | mean steps | mean s/clip |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in modes:
        r = result["modes"][m]
        acc = r["accuracy"]
        lines.append(f"| {m} | {100 * acc['color']:.1f} % | {100 * acc['shape']:.1f} % | "
                     f"{100 * acc['direction']:.1f} % | {100 * acc['all']:.1f} % | {r['mean_nfe']:.1f} | "
                     f"{r['mean_steps']:.1f} | {r['mean_seconds']:.3f} |")
    if "adaptive_vs_fixed50" in result["modes"]:
        c = result["modes"]["adaptive_vs_fixed50"]
        rule = result["modes"]["adaptive"]["settings"]["adaptive"]
        lines += ["", f"Adaptive vs fixed 50: {100 * c['nfe_reduction']:.1f} % fewer NFE, "
                      f"{100 * c['seconds_reduction']:.1f} % less wall-clock, accuracy change (points) "
                      f"{c['accuracy_delta_points']}. Rule: warmup {rule['warmup']}, k {rule['k']}, b {rule['b']}, "
                      f"min_steps {rule['min_steps']}, max 50 steps."]
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def replace_section(path: Path, section: str, start: str, end: str) -> None:
    """Put ``section`` (which starts with ``start`` and ends with ``end``) in place of the file's old one, or append
    it when the file has none (the benchmarks' ``--write-md``)."""
    text = path.read_text() if path.is_file() else ""
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end) + "\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else (text + ("\n" if text else "") + section)
    path.write_text(text)


def write_markdown(path: Path, result: dict) -> None:
    replace_section(path, _markdown(result), SECTION_START, SECTION_END)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=TINY_DIR)
    parser.add_argument("--model-file", type=Path, default=None,
                        help="a refiner file (e.g. a .gguf) used instead of the model directory's refiner")
    parser.add_argument("--prompts", type=int, default=72, help="first N of the 72 video captions (spread evenly)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--modes", nargs="+", default=["fixed50", "adaptive"], choices=["fixed50", "adaptive"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the library's)")
    parser.add_argument("--write-md", type=Path, default=None, help="replace this benchmark's section in a file")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    captions = video_captions()
    step = max(1, len(captions) // args.prompts)
    prompts = captions[::step][: args.prompts]
    started = time.perf_counter()
    modes = run(args.model_dir, prompts, args.seeds, args.modes, args.model_file)
    refiner_file = args.model_file or args.model_dir / "refiner.safetensors"
    files = [refiner_file, args.model_dir / "tokenizer.safetensors"]
    model = load_benchmark_model(args.model_dir, args.model_file)
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _machine(),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix() if argv is None else "benchmarks/shapes_eval.py",
                                        *(sys.argv[1:] if argv is None else argv)]),
        "model_dir": str(args.model_dir), "model_bytes": sum(f.stat().st_size for f in files),
        "model_file": str(args.model_file) if args.model_file else None, "weight_dtype": model.weight_dtype,
        "refiner_bytes": refiner_file.stat().st_size,
        "size": model.defaults, "prompts": len(prompts), "seeds": args.seeds,
        "samples": len(prompts) * len(args.seeds), "modes": modes,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.write_md:
        write_markdown(args.write_md, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
