"""GGUF refiners: logit error, file size and CPU step time of Q8_0 / Q5_K / Q4_K against float32.

    python benchmarks/gguf_eval.py                         # all sections, markdown tables on stdout
    python benchmarks/gguf_eval.py --json out.json         # also the raw figures as JSON
    python benchmarks/gguf_eval.py --sections accuracy sizes --repeats 3
    python benchmarks/gguf_eval.py --write-tiny DIR        # only write the tiny refiner as DIR/refiner.<TYPE>.gguf

Sections:

- ``accuracy`` — the golden joint refiner (``tests/golden/refiner_joint_weights.safetensors``) on the golden t2v and
  i2v records (3 steps each, both guidance branches, as ``tests/test_refiner_golden.py`` runs them): float32 weights
  against the same weights written as GGUF, read back and run through ``GGUFLinear`` (compute float32). Error of the
  visual logits: max and mean ``|Δ|`` relative to the float32 logits' RMS, and the fraction of bits whose predicted
  value (argmax of the two logits) changes. Also each type's relative RMS weight error on a Gaussian 1024×1024
  matrix (rows fit every type), since the golden network's 128-wide rows cannot hold K-quant blocks.
- ``sizes`` — the built-in tiny refiner (``grn_core/assets/tiny/refiner.safetensors``) as GGUF of each type against
  its float32 safetensors size, with the types every tensor got (fallbacks), and the planned sizes and fallbacks of
  the released 2B / 8B refiner shapes (from a meta-device model: no weights needed).
- ``speed`` — seconds per refiner step on the CPU, plain float32 against GGUFLinear (weights decoded per call),
  measured in one process, interleaved run by run; the golden network (width 128), ``refiner_step.py``'s default
  random network (width 512, depth 4, grid 3×12×21, text 64 + 16) and the trained tiny refiner at the shapes
  benchmark's size (where decoding is a larger share of a small step).

``sizes`` also gives the quantised tensors alone (the matrices the type applies to) against their float32 bytes,
since the tiny refiner's F32 tensors (bit embedding, head, norms, biases) are a large share of its file.

``--write-tiny DIR`` leaves the quantised tiny refiner files (as ``checkpoint_to_gguf`` writes them, with all the
tiny's metadata) for the shapes benchmark: ``benchmarks/shapes_eval.py --model-file DIR/refiner.Q8_0.gguf`` (see
:func:`write_tiny_gguf`); ``python -m grn_core.convert grn_core/assets/tiny/refiner.safetensors OUT.gguf --dtype q8_0``
writes the same tensors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grn_core.checkpoint_files import read_checkpoint  # noqa: E402
from grn_core.formats import (  # noqa: E402
    GGUFLinear,
    apply_gguf_weights,
    checkpoint_to_gguf,
    plan_gguf,
    quantize,
    read_gguf,
    write_gguf,
)
from grn_core.formats import gguf_file  # noqa: E402
from grn_core.runtime.fp8 import Fp8Linear, quantize_linears  # noqa: E402
from grn_core.refiner import GRN2b, GRN8b, GRNRefiner, RefinerConfig, infer_refiner_config, swiglu_hidden  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from shapes_eval import _machine  # noqa: E402  (the shapes benchmark's machine line)

GOLDEN = ROOT / "tests" / "golden"
TINY_REFINER = ROOT / "grn_core" / "assets" / "tiny" / "refiner.safetensors"
QUANT_TYPES = ("q8_0", "q5_k", "q4_k")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def gguf_model(tensors: dict[str, torch.Tensor], config: RefinerConfig, qtype: str, folder: Path,
               compute_dtype: torch.dtype = torch.float32) -> tuple[GRNRefiner, dict]:
    """``tensors`` written as a ``qtype`` GGUF file in ``folder``, read back and loaded into a meta-built refiner
    (quantised Linears as GGUFLinear); also the write summary."""
    path = folder / f"refiner.{qtype}.gguf"
    summary = write_gguf(tensors, path, qtype, {"grn.kind": "refiner", "grn.config": json.dumps(config.to_dict())})
    loaded, metadata = read_gguf(path)
    with torch.device("meta"):
        model = GRNRefiner(RefinerConfig.from_dict(json.loads(metadata["grn.config"])))
    apply_gguf_weights(model, loaded, compute_dtype=compute_dtype, path=path)
    # A BF16 / F16 file keeps its matrices as plain half Linears but their biases F32 (biases are never converted):
    # give such a Linear's bias its weight's dtype, so the layer runs in the half dtype like the bias-free ones.
    for layer in model.modules():
        if (type(layer) is torch.nn.Linear and layer.bias is not None
                and layer.bias.dtype != layer.weight.dtype):
            layer.bias = torch.nn.Parameter(layer.bias.to(layer.weight.dtype), requires_grad=False)
    _rebuild_meta_buffers(model)
    return model.eval().requires_grad_(False), {"bytes": summary.bytes, "types": summary.counts,
                                                "fallbacks": len(summary.fallbacks)}


def _rebuild_meta_buffers(model: GRNRefiner) -> None:
    """Non-persistent buffers (tables computed in ``__init__``) are not in a file: compute them for real, as the
    loaders do."""
    still_meta = [name for name, t in model.named_buffers() if t.is_meta]
    if not still_meta:
        return
    fresh = GRNRefiner(model.config)
    for name in still_meta:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._buffers[attr] = fresh.get_buffer(name)


# ----------------------------------------------------------------------------------------------------------------------
# Accuracy


def _golden_logits(model: GRNRefiner, io: dict, meta: dict) -> list[torch.Tensor]:
    aspect = meta["aspect_template"]
    out = []
    with torch.no_grad():
        cond_ctx, uncond_ctx = model.prepare_text(io["text_cond"]), model.prepare_text(io["text_uncond"])
        for task in ("t2v", "i2v"):
            first = io["i2v.first_frame_labels"] if task == "i2v" else None
            for k in range(io[f"{task}.pt_values"].numel()):
                bits = io[f"{task}.step{k}.labels"]
                step = float(io[f"{task}.pt_values"][k])
                cond, uncond = model.step_logits(bits, step, cond_ctx, uncond_ctx, aspect_ratio=aspect,
                                                 first_frame_bits=first)
                out += [cond.to(torch.float64), uncond.to(torch.float64)]
    return out


def _logit_errors(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    r, g = torch.cat([t.reshape(-1) for t in ref]), torch.cat([t.reshape(-1) for t in got])
    rms = r.square().mean().sqrt()
    diff = (g - r).abs()
    flips = sum(int((a.argmax(-1) != b.argmax(-1)).sum()) for a, b in zip(ref, got))
    bits = sum(a[..., 0].numel() for a in ref)
    return {"max_rel": float(diff.max() / rms), "mean_rel": float(diff.mean() / rms), "bit_flips": flips / bits}


def accuracy(folder: Path) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(GOLDEN / "refiner_joint_weights.safetensors"))
    io = load_file(str(GOLDEN / "refiner_joint_io.safetensors"))
    meta = json.loads((GOLDEN / "meta_joint.json").read_text())["refiner_joint"]
    config = infer_refiner_config(weights, layout="joint")
    plain = GRNRefiner(config)
    plain.load_state_dict(weights, strict=True)
    plain = plain.float().eval().requires_grad_(False)
    ref = _golden_logits(plain, io, meta)
    rows = {}
    for qtype in ("bf16",) + QUANT_TYPES:
        model, info = gguf_model(weights, config, qtype, folder)
        rows[qtype] = {**_logit_errors(ref, _golden_logits(model, io, meta)), **info}
    # For comparison: the loaders' fp8 storage of the same weights (Fp8Linear, per-row scale; compute float32).
    fp8 = GRNRefiner(config)
    fp8.load_state_dict(weights, strict=True)
    quantize_linears(fp8.float().eval().requires_grad_(False), torch.float8_e4m3fn, torch.float32)
    rows["fp8_e4m3fn"] = {**_logit_errors(ref, _golden_logits(fp8, io, meta)), "bytes": 0,
                          "types": {"fp8 blocks": sum(isinstance(m, Fp8Linear) for m in fp8.modules())}}
    torch.manual_seed(0)
    gauss = torch.randn(1024, 1024)
    weight_err = {}
    for qtype in ("BF16", "Q8_0", "Q5_K", "Q5_0", "Q4_K", "Q4_0"):
        decoded = quantize(gauss, qtype).dequantize()
        weight_err[qtype] = float((decoded - gauss).square().mean().sqrt() / gauss.square().mean().sqrt())
    return {"logits": rows, "gaussian_weight_rel_rms": weight_err,
            "logit_count": sum(t.numel() for t in ref), "records": "joint t2v + i2v, 3 steps each, cond + uncond"}


def _tiny_inputs(config: RefinerConfig, metadata: dict, clips: int = 6, keep=(0.25, 0.5, 0.75)) -> list[tuple]:
    """Realistic refiner inputs for the trained tiny model: shapes clips encoded by the tiny tokenizer, each bit kept
    with probability ``keep`` and otherwise random (as in training, ``grn_core.train.refiner.corrupt_bits``), with
    the caption's text features. -> ``[(bits, clean_bits, step_value, text, empty_text)]``."""
    from grn_core.checkpoints import load_tokenizer
    from grn_core.data.shapes import sample_clip, video_captions
    from grn_core.pipeline import format_prompt
    from grn_core.text.hashed import HashedTextEncoder

    tok = load_tokenizer(TINY_REFINER.with_name("tokenizer.safetensors"), dtype=torch.float32)
    encoder = HashedTextEncoder.from_config(json.loads(metadata["grn.text_encoder"]))
    empty = encoder.encode("", allow_empty=True)
    gen = torch.Generator().manual_seed(0)
    captions = video_captions()
    out = []
    with torch.no_grad():
        for i in range(clips):
            caption = captions[(i * len(captions)) // clips]
            clean = tok.encode_bits(sample_clip(gen, caption).pixels[None])
            text = encoder.encode(format_prompt(caption, "t2v", config.layout))
            for ratio in keep:
                kept = torch.rand(clean.shape, generator=gen) < ratio
                noise = torch.randint(0, 2, clean.shape, generator=gen, dtype=torch.uint8)
                out.append((torch.where(kept, clean, noise), clean, float(kept.float().mean()), text, empty))
    return out


def _tiny_logits(model: GRNRefiner, inputs: list[tuple]) -> tuple[list[torch.Tensor], float]:
    """Cond and uncond logits for every input, and the fraction of bits the cond branch predicts right."""
    logits, right, total = [], 0, 0
    with torch.no_grad():
        for bits, clean, step, text, empty in inputs:
            cond, uncond = model.step_logits(bits, step, text, empty, aspect_ratio=bits.shape[-2] / bits.shape[-1])
            logits += [cond.to(torch.float64), uncond.to(torch.float64)]
            predicted = cond.argmax(-1)  # [1, t, h, w, bits]
            right += int((predicted == clean.permute(0, 2, 3, 4, 1).long()).sum())
            total += predicted.numel()
    return logits, right / total


def tiny_accuracy(folder: Path) -> dict:
    raw = read_checkpoint(TINY_REFINER)
    config = RefinerConfig.from_dict(json.loads(raw.metadata["grn.config"]))
    plain = GRNRefiner(config)
    plain.load_state_dict(raw.tensors, strict=True)
    plain = plain.float().eval().requires_grad_(False)
    inputs = _tiny_inputs(config, raw.metadata)
    ref, ref_acc = _tiny_logits(plain, inputs)
    rows = {"float32": {"bit_accuracy": ref_acc}}
    for qtype in ("bf16",) + QUANT_TYPES:
        model, info = gguf_model(raw.tensors, config, qtype, folder)
        got, acc = _tiny_logits(model, inputs)
        rows[qtype] = {**_logit_errors(ref, got), "bit_accuracy": acc, **info}
    return {"logits": rows, "inputs": f"{len(inputs)} maps: 6 shapes clips x keep 25/50/75 %, cond + uncond",
            "logit_count": sum(t.numel() for t in ref)}


# ----------------------------------------------------------------------------------------------------------------------
# Sizes


def write_tiny_gguf(folder: str | Path, qtypes=QUANT_TYPES) -> dict[str, Path]:
    """The built-in tiny refiner as ``folder/refiner.<TYPE>.gguf`` for each of ``qtypes`` (its metadata carried over:
    config, layout, tasks, text encoder, adaptive rule …). Returns ``{qtype: path}``."""
    folder = Path(folder)
    out = {}
    for qtype in qtypes:
        path = folder / f"refiner.{qtype.upper()}.gguf"
        checkpoint_to_gguf(TINY_REFINER, path, qtype)
        out[qtype] = path
    return out


def _fallback_groups(summary) -> list[str]:
    groups: dict[tuple[str, str], list[str]] = {}
    for name, (wanted, got) in summary.fallbacks.items():
        groups.setdefault((wanted, got), []).append(name)
    return [f"{len(names)} × {wanted}→{got}" for (wanted, got), names in sorted(groups.items())]


def sizes(folder: Path) -> dict:
    raw = read_checkpoint(TINY_REFINER)
    out = {"float32_safetensors_bytes": TINY_REFINER.stat().st_size, "files": {}}
    for qtype in ("f32", "bf16") + QUANT_TYPES:
        summary = checkpoint_to_gguf(TINY_REFINER, folder / f"tiny.{qtype}.gguf", qtype)
        chosen = [name for name, t in summary.types.items() if t != "F32"]  # the tensors the type applied to
        chosen_bytes = sum(gguf_file._tensor_bytes(raw.tensors[n].shape, summary.types[n]) for n in chosen)
        chosen_float32 = sum(4 * raw.tensors[n].numel() for n in chosen)
        out["files"][qtype] = {"bytes": summary.bytes, "types": summary.counts, "fallbacks": _fallback_groups(summary),
                               "ratio": summary.bytes / out["float32_safetensors_bytes"],
                               "quantised_bytes": chosen_bytes, "quantised_float32_bytes": chosen_float32,
                               "quantised_ratio": chosen_bytes / chosen_float32 if chosen_float32 else 1.0}
    rows = sorted({tuple(t.shape) for n, t in raw.tensors.items() if t.ndim == 2})
    out["tiny_matrix_shapes"] = [list(s) for s in rows]
    released = {}
    for name, make in (("GRN2b", GRN2b), ("GRN8b", GRN8b)):
        with torch.device("meta"):
            state = GRNRefiner(make()).state_dict()
        float32 = sum(t.numel() * 4 for t in state.values())
        released[name] = {"float32_bytes": float32, "plans": {}}
        for qtype in ("bf16",) + QUANT_TYPES:
            plan = plan_gguf(state, qtype)
            released[name]["plans"][qtype] = {"data_bytes": plan.data_bytes, "types": plan.counts,
                                              "fallbacks": _fallback_groups(plan)}
    out["released"] = released
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Speed


def _step_fn(model: GRNRefiner, bits, step_value, text_cond, text_uncond, aspect, first):
    cond = model.prepare_text(text_cond)
    uncond = model.prepare_text(text_uncond)

    def step():
        model.step_logits(bits, step_value, cond, uncond, aspect_ratio=aspect, first_frame_bits=first)
    return step


def speed(folder: Path, repeats: int, warmup: int) -> dict:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cases = {}
    weights = load_file(str(GOLDEN / "refiner_joint_weights.safetensors"))
    io = load_file(str(GOLDEN / "refiner_joint_io.safetensors"))
    golden_cfg = infer_refiner_config(weights, layout="joint")
    cases["golden (width 128, grid 3×12×21)"] = (golden_cfg, weights, io["t2v.step0.labels"], io["text_cond"],
                                                 io["text_uncond"])
    cfg = RefinerConfig(width=512, depth=4, heads=4, kv_heads=4, mlp_hidden=swiglu_hidden(512, 3.55), block_chunks=1,
                        text_channels=4096, latent_channels=64, layout="joint")
    random_weights = {k: v.clone() for k, v in GRNRefiner(cfg).state_dict().items()}
    bits = torch.randint(0, 2, (1, cfg.bits, 3, 12, 21), dtype=torch.uint8)
    cases["random (width 512, grid 3×12×21)"] = (cfg, random_weights, bits, torch.randn(64, cfg.text_channels),
                                                 torch.randn(16, cfg.text_channels))
    # The trained tiny refiner on a shapes clip at the shapes benchmark's size (32×32, 9 frames).
    raw = read_checkpoint(TINY_REFINER)
    tiny_cfg = RefinerConfig.from_dict(json.loads(raw.metadata["grn.config"]))
    bits, _, _, text, empty = _tiny_inputs(tiny_cfg, raw.metadata, clips=1, keep=(0.5,))[0]
    grid = "×".join(str(n) for n in bits.shape[-3:])
    cases[f"tiny (width 128, grid {grid}, the shapes clips)"] = (tiny_cfg, dict(raw.tensors), bits, text, empty)
    results = {}
    for label, (config, state, bits, text_cond, text_uncond) in cases.items():
        plain = GRNRefiner(config)
        plain.load_state_dict(state, strict=True)
        models = {"float32": plain.float().eval().requires_grad_(False)}
        for qtype in QUANT_TYPES:
            models[qtype], _ = gguf_model(state, config, qtype, folder)
        aspect = bits.shape[-2] / bits.shape[-1]
        with torch.no_grad():
            steps = {name: _step_fn(m, bits, 0.5, text_cond, text_uncond, aspect, None) for name, m in models.items()}
            for fn in steps.values():
                for _ in range(warmup):
                    fn()
            times = {name: [] for name in steps}
            for _ in range(repeats):  # interleaved: machine load hits every variant alike
                for name, fn in steps.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        base, base_min = statistics.median(times["float32"]), min(times["float32"])
        results[label] = {
            name: {"s_per_step": statistics.median(t), "s_per_step_min": min(t),
                   "ratio_to_float32": statistics.median(t) / base, "ratio_to_float32_best": min(t) / base_min,
                   "gguf_layers": sum(isinstance(m, GGUFLinear) for m in models[name].modules())}
            for name, t in times.items()
        }
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Report


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def markdown(result: dict) -> str:
    lines = [f"`python benchmarks/gguf_eval.py {' '.join(result['argv'])}`".replace(" `", "`"),
             f"— {result['date']}, {result['machine']}", ""]
    if "accuracy" in result:
        acc = result["accuracy"]
        lines += [f"**Logit error** vs float32, golden joint refiner ({acc['records']}; {acc['logit_count']} logits):",
                  "", "| type | max \\|Δ\\| / RMS | mean \\|Δ\\| / RMS | bits flipped | file | tensor types |",
                  "|---|---|---|---|---|---|"]
        for qtype, row in acc["logits"].items():
            types = ", ".join(f"{k} {v}" for k, v in row["types"].items())
            lines.append(f"| {qtype.upper()} | {row['max_rel']:.2e} | {row['mean_rel']:.2e} | "
                         f"{100 * row['bit_flips']:.3f} % | {_mb(row['bytes']) if row['bytes'] else '—'} | {types} |")
        lines += ["", "Relative RMS weight error on a Gaussian 1024×1024 matrix: " + ", ".join(
            f"{k} {v:.4f}" for k, v in acc["gaussian_weight_rel_rms"].items()), ""]
    if "tiny_accuracy" in result:
        acc = result["tiny_accuracy"]
        lines += [f"**Logit error** vs float32, trained tiny refiner ({acc['inputs']}; {acc['logit_count']} logits; "
                  "bit accuracy: cond-branch argmax vs the clean bits):", "",
                  "| type | max \\|Δ\\| / RMS | mean \\|Δ\\| / RMS | bits flipped | bit accuracy | tensor types |",
                  "|---|---|---|---|---|---|"]
        for qtype, row in acc["logits"].items():
            if qtype == "float32":
                lines.append(f"| float32 | — | — | — | {100 * row['bit_accuracy']:.2f} % | F32 |")
                continue
            types = ", ".join(f"{k} {v}" for k, v in row["types"].items())
            lines.append(f"| {qtype.upper()} | {row['max_rel']:.2e} | {row['mean_rel']:.2e} | "
                         f"{100 * row['bit_flips']:.3f} % | {100 * row['bit_accuracy']:.2f} % | {types} |")
        lines.append("")
    if "sizes" in result:
        sz = result["sizes"]
        base = sz["float32_safetensors_bytes"]
        lines += [f"**Tiny refiner file size** (float32 safetensors {_mb(base)}; matrix shapes "
                  f"{', '.join('×'.join(map(str, s)) for s in sz['tiny_matrix_shapes'])}):", "",
                  "| type | GGUF size | vs float32 | quantised tensors alone vs their float32 | tensor types | "
                  "fallbacks |", "|---|---|---|---|---|---|"]
        for qtype, row in sz["files"].items():
            types = ", ".join(f"{k} {v}" for k, v in row["types"].items())
            alone = (f"{_mb(row['quantised_bytes'])} / {_mb(row['quantised_float32_bytes'])} = "
                     f"{100 * row['quantised_ratio']:.1f} %") if row["quantised_float32_bytes"] else "—"
            lines.append(f"| {qtype.upper()} | {_mb(row['bytes'])} | {100 * row['ratio']:.1f} % | {alone} | {types} | "
                         f"{'; '.join(row['fallbacks']) or 'none'} |")
        lines += ["", "**Released shapes** (planned tensor data, from meta-device models):", "",
                  "| model | float32 | " + " | ".join(t.upper() for t in ("bf16",) + QUANT_TYPES) + " | fallbacks |",
                  "|---|---|" + "---|" * (len(QUANT_TYPES) + 1) + "---|"]
        for name, row in sz["released"].items():
            cells = [_mb(p["data_bytes"]) for p in row["plans"].values()]
            fallbacks = sorted({f for p in row["plans"].values() for f in p["fallbacks"]})
            lines.append(f"| {name} | {_mb(row['float32_bytes'])} | {' | '.join(cells)} | "
                         f"{'; '.join(fallbacks) or 'none'} |")
        lines.append("")
    if "speed" in result:
        lines += [f"**CPU step time**, float32 vs GGUFLinear (compute float32), median of {result['repeats']} "
                  "interleaved steps (best-of figures are less disturbed by other processes):", "",
                  "| network | weights | s / step (median, best) | vs float32 (median, best) |", "|---|---|---|---|"]
        for label, rows in result["speed"].items():
            for name, row in rows.items():
                lines.append(f"| {label} | {name.upper() if name != 'float32' else 'float32'} "
                             f"({row['gguf_layers']} GGUFLinear) | "
                             f"{row['s_per_step']:.4f}, {row['s_per_step_min']:.4f} "
                             f"| {row['ratio_to_float32']:.2f}×, {row['ratio_to_float32_best']:.2f}× |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=["accuracy", "sizes", "speed"],
                        choices=["accuracy", "sizes", "speed"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--write-tiny", type=Path, default=None, metavar="DIR",
                        help="only write the tiny refiner as DIR/refiner.<TYPE>.gguf (Q8_0, Q5_K, Q4_K) and exit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.write_tiny is not None:
        paths = write_tiny_gguf(args.write_tiny)
        print(json.dumps({q: str(p) for q, p in paths.items()}))
        return {"written": {q: str(p) for q, p in paths.items()}}
    result: dict = {"argv": list(argv if argv is not None else sys.argv[1:]),
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "machine": _machine(), "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "accuracy" in args.sections:
            result["accuracy"] = accuracy(folder)
            result["tiny_accuracy"] = tiny_accuracy(folder)
        if "sizes" in args.sections:
            result["sizes"] = sizes(folder)
        if "speed" in args.sections:
            result["speed"] = speed(folder, args.repeats, args.warmup)
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
