#!/usr/bin/env bash
# GPU suite for a lent GPU: one prepared run, well inside 15 minutes including the machine's start.
#
#   bash benchmarks/gpu_suite.sh                     # on the GPU machine; results in $OUT (or benchmarks/out)
#   bash benchmarks/gpu_suite.sh --device cpu --smoke   # the same code path with tiny sizes, on any machine
#
# What it runs (about 3-5 minutes on an H100/H200; each step has its own time limit, 150 s + 420 s + 120 s at most,
# plus 360 s with 2 GPUs, so a hang cannot eat the lease):
#   1. nvidia-smi and the Python/torch environment             -> $OUT/env.txt
#   2. the runtime tests that need the GPU to mean something    -> $OUT/tests.txt  (attention kernels vs SDPA,
#      fp8, offload, out-of-memory translation; CPU-only parts run as well)
#   3. benchmarks/gpu_suite.py: GRN2b bf16 T2I 1024^2 and T2V 480x848x33 (s/step, MFU, peak memory), GRN8b fp8 with
#      block offload under a 23 GiB cap (does it fit a 24 GB card), tokenizer decode of 9 and 33 frames at 480p,
#      correctness checks on the device                        -> $OUT/gpu_suite.json, $OUT/gpu_suite.md, stdout
#   4. with a GPU: the split tokenizer decode on the device (grn_core.runtime.split: bands with their halo, and a
#      latent-frame range after its warm-up, against the whole decode of the released-size tokenizer in bf16: equal
#      bits, or the largest difference)                        -> $OUT/parallel.jsonl
#      Only with 2 or more GPUs (nvidia-smi -L): torchrun over 2 GPUs against one process, --parallel cfg and sp --
#      the tiny model end to end through the command line (wall time, same bits?) and a random refiner of the
#      released GRN2b shape on T2V 480x848x33 (s/step, peak memory per rank vs runtime.memory.parallel_step_bytes,
#      logits vs one process); at most 360 s in all     -> $OUT/parallel.jsonl, $OUT/parallel.log
#      (GRN_SUITE_PARALLEL_CPU=1 runs it on the CPU with gloo, to try the code path: with --smoke, tiny sizes;
#      GRN_SUITE_SKIP_MAIN=1 skips step 3, GRN_SUITE_SKIP_TESTS=1 step 2)
# Extra arguments go to gpu_suite.py (e.g. --sections 2b,8b --repeats 5 --peak-tflops 989).
# From a session with a lent device: run(command="bash benchmarks/gpu_suite.sh", timeout_s=600); the files come back
# from $OUT (env.txt, tests.txt, gpu_suite.json, gpu_suite.md, gpu_suite.log, parallel.jsonl, parallel.log). Append
# gpu_suite.md to BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0

{
  date -u
  (command -v nvidia-smi >/dev/null && nvidia-smi) || echo "no nvidia-smi"
  "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ -n "${GRN_SUITE_SKIP_TESTS:-}" ]; then
  echo "tests skipped (GRN_SUITE_SKIP_TESTS)" >"$OUT/tests.txt"
elif "$PY" -c "import pytest" 2>/dev/null; then
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_runtime_attention.py tests/test_runtime_memory.py \
    tests/test_runtime_fp8.py -rs 2>&1 | tee "$OUT/tests.txt" || status=1
else
  echo "pytest missing: tests skipped" | tee "$OUT/tests.txt"
fi

if [ -z "${GRN_SUITE_SKIP_MAIN:-}" ]; then
  timeout 420 "$PY" benchmarks/gpu_suite.py --out "$OUT/gpu_suite.json" --markdown "$OUT/gpu_suite.md" "$@" \
    2>&1 | tee "$OUT/gpu_suite.log" || status=1
fi

# ---- 4. two GPUs: --parallel cfg / sp against one process ------------------------------------------------------------
gpus=0
if command -v nvidia-smi >/dev/null; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
smoke=0
for arg in "$@"; do [ "$arg" = "--smoke" ] && smoke=1; done
par_device=cuda
if [ -n "${GRN_SUITE_PARALLEL_CPU:-}" ]; then
  par_device=cpu
elif [ "${gpus:-0}" -lt 1 ]; then
  echo "parallel: skipped (no GPU)" | tee "$OUT/parallel.log"
  exit $status
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/grn_parallel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
: >"$OUT/parallel.jsonl"
: >"$OUT/parallel.log"
budget_end=$((SECONDS + 360))

# Is the split decode exact on this device's kernels too? (On the CPU it is bit for bit: tests/test_parallel_split.py.)
cat >"$work/split_decode.py" <<'PYEOF'
import json, sys
from pathlib import Path

import torch

root = Path(sys.argv[1])
sys.path[:0] = [str(root), str(root / "benchmarks")]
from gpu_suite import random_tokenizer  # noqa: E402
from grn_core.runtime.split import _decode_band, decode_frames, plan_decode_split, temporal_receptive_field  # noqa

device, smoke, out = torch.device(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
tok, config = random_tokenizer(device, dtype, smoke)
g = torch.Generator(device=device).manual_seed(5)
row = {"case": "split_decode_exact", "device": str(device), "dtype": str(dtype)}
with torch.inference_mode():
    grid = (3, 2, 16) if smoke else (5, 30, 53)  # 17 frames of 480x848
    z = torch.rand(1, config.z_dim, *grid, device=device, generator=g, dtype=dtype) * 2 - 1
    full = tok.decode(z)
    split = plan_decode_split(config, grid, 2, "space")
    px = config.spatial_factor // 2
    diffs = []
    for a, b in split.parts:
        band = _decode_band(tok, z, a, b, split.axis)
        ref = full[..., a * px:b * px] if split.axis == -1 else full[..., a * px:b * px, :]
        diffs.append((bool(torch.equal(band, ref)), float((band.float() - ref.float()).abs().max())))
    row["space_equal"], row["space_max_abs_diff"] = [d[0] for d in diffs], [d[1] for d in diffs]
    r = temporal_receptive_field(config)
    z = torch.rand(1, config.z_dim, r + 4, 2, 2, device=device, generator=g, dtype=dtype) * 2 - 1
    ref = tok.decode(z)[:, :, 1 + config.temporal_factor * r:]
    part = decode_frames(tok, z, r + 1, r + 4, r)
    row["time_equal"] = bool(torch.equal(part, ref))
    row["time_max_abs_diff"] = float((part.float() - ref.float()).abs().max())
with open(out, "a") as handle:
    handle.write(json.dumps(row) + "\n")
PYEOF
echo "== split_decode" >>"$OUT/parallel.log"
timeout 120 "$PY" "$work/split_decode.py" "$PWD" "$par_device" "$smoke" "$OUT/parallel.jsonl" \
  >>"$OUT/parallel.log" 2>&1 || status=1
if [ -z "${GRN_SUITE_PARALLEL_CPU:-}" ] && [ "${gpus:-0}" -lt 2 ]; then
  echo "parallel: 2-GPU cases skipped (${gpus:-0} GPU; needs 2)" | tee -a "$OUT/parallel.log"
  cat "$OUT/parallel.jsonl"
  exit $status
fi

# One refiner step per mode on random weights of the released 2B shape; rank 0 appends a JSON line.
cat >"$work/parallel_step.py" <<'PYEOF'
import json, os, statistics, sys
from pathlib import Path

import torch

root = Path(sys.argv[1])
sys.path[:0] = [str(root), str(root / "benchmarks")]
from gpu_suite import TEXT_COND, TEXT_UNCOND, random_refiner, timed  # noqa: E402
from grn_core.refiner import GRN2b, RefinerConfig  # noqa: E402
from grn_core.runtime.distributed import ParallelPlan, branch_strategy  # noqa: E402
from grn_core.runtime.memory import parallel_step_bytes  # noqa: E402
from grn_core.sampler.loop import LocalBranches  # noqa: E402

mode, device_type, smoke, out, work = sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5], Path(sys.argv[6])
GiB = 1024 ** 3
if mode == "single":
    plan = ParallelPlan.single("cuda:0" if device_type == "cuda" else "cpu")
else:
    plan = ParallelPlan.from_env(device_type, timeout_s=120)
dev = plan.device
cfg = RefinerConfig(width=64, depth=4, heads=2, kv_heads=2, mlp_hidden=128, block_chunks=2, text_channels=32,
                    latent_channels=8) if smoke else GRN2b()
grid = (3, 4, 6) if smoke else (9, 30, 53)
half = torch.bfloat16 if dev.type == "cuda" else torch.float32
with torch.inference_mode():
    model = random_refiner(cfg, half, dev, seed=0)
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 2, (1, cfg.bits, *grid), dtype=torch.uint8, generator=g).to(dev)
    cond = model.prepare_text(torch.randn(TEXT_COND, cfg.text_channels, generator=g).to(dev))
    uncond = model.prepare_text(torch.randn(TEXT_UNCOND, cfg.text_channels, generator=g).to(dev))
    branches = LocalBranches() if mode == "single" else branch_strategy(plan, mode)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    plan.barrier()

    def step():
        return branches.logits(model, bits, 0.5, cond, uncond, aspect_ratio=grid[1] / grid[2])

    times = timed(step, dev, 2 if smoke else 5)
    logits = step()[0].float().cpu()
peak = (torch.cuda.max_memory_allocated(dev) - base) / GiB if dev.type == "cuda" else None
peaks = plan.all_gather_object(peak, "gathering the peaks")
if plan.is_main:
    world = plan.world_size if plan.active else 1
    estimate = parallel_step_bytes(cfg, grid, None if mode == "single" else mode, world, text_tokens=TEXT_COND,
                                   compute=half)
    row = {"case": f"2b_step_{mode}", "world": world, "grid": list(grid),
           "s_per_step": round(statistics.median(times), 4), "s_per_step_all": [round(t, 4) for t in times], "activation_peak_gib": peaks,
           "activation_estimate_gib": round(estimate.activations / GiB, 3)}
    reference = work / "single_logits.pt"
    if mode == "single":
        torch.save(logits, reference)
    elif reference.exists():
        ref = torch.load(reference)
        row["logits_max_abs_diff_vs_single"] = float((logits - ref).abs().max())
        row["logits_equal_single"] = bool(torch.equal(logits, ref))
    with open(out, "a") as handle:
        handle.write(json.dumps(row) + "\n")
plan.close()
PYEOF

# The tiny model end to end: wall time of the whole command, and whether the bits equal one process's.
tiny_flags=(generate --model tiny --prompt "a red circle moving right" --steps 8 --guidance 3 --seed 5
            --device "$par_device")
if [ "$smoke" = 1 ]; then tiny_flags+=(--frames 9 --width 64 --height 64); else
  tiny_flags+=(--frames 33 --width 256 --height 256); fi
run_case() {  # name, limit in seconds, command...: one JSON line with the exit code and the wall time
  local name=$1 limit=$2
  shift 2
  if [ $SECONDS -ge $budget_end ]; then
    echo "{\"case\": \"$name\", \"skipped\": \"over the 360 s budget\"}" >>"$OUT/parallel.jsonl"
    return 0
  fi
  local t0=$SECONDS
  if [ $((SECONDS + limit)) -gt $budget_end ]; then limit=$((budget_end - SECONDS)); fi
  echo "== $name" >>"$OUT/parallel.log"
  timeout "$limit" "$@" >>"$OUT/parallel.log" 2>&1
  local rc=$?
  echo "{\"case\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - t0))}" >>"$OUT/parallel.jsonl"
  [ $rc -eq 0 ] || status=1
}
torchrun=("$PY" -m torch.distributed.run --standalone --nproc-per-node 2)
run_case tiny_cli_single 120 "$PY" -m grn_core "${tiny_flags[@]}" --out "$work/single.webp" \
  --save-tokens "$work/single.safetensors"
for mode in cfg sp; do
  run_case "tiny_cli_$mode" 120 "${torchrun[@]}" -m grn_core "${tiny_flags[@]}" --parallel "$mode" \
    --out "$work/$mode.webp" --save-tokens "$work/$mode.safetensors"
done
"$PY" - "$work" >>"$OUT/parallel.jsonl" 2>>"$OUT/parallel.log" <<'PYEOF'
import json, sys
from pathlib import Path

from safetensors.torch import load_file

work = Path(sys.argv[1])
single = work / "single.safetensors"
for mode in ("cfg", "sp"):
    other = work / f"{mode}.safetensors"
    if single.exists() and other.exists():
        a, b = load_file(str(single))["bits"], load_file(str(other))["bits"]
        row = {"case": f"tiny_bits_{mode}", "same_bits": bool((a == b).all()),
               "differing_bits": float((a != b).float().mean())}
        print(json.dumps(row))
PYEOF
run_case 2b_step_single 150 "$PY" "$work/parallel_step.py" "$PWD" single "$par_device" "$smoke" \
  "$OUT/parallel.jsonl" "$work"
for mode in cfg sp; do
  run_case "2b_step_$mode" 150 "${torchrun[@]}" "$work/parallel_step.py" "$PWD" "$mode" "$par_device" "$smoke" \
    "$OUT/parallel.jsonl" "$work"
done
cat "$OUT/parallel.jsonl"
exit $status
