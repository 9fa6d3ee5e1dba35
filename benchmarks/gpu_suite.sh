#!/usr/bin/env bash
# GPU suite for a lent GPU: one prepared run, well inside 15 minutes including the machine's start.
#
#   bash benchmarks/gpu_suite.sh                     # on the GPU machine; results in $OUT (or benchmarks/out)
#   bash benchmarks/gpu_suite.sh --device cpu --smoke   # the same code path with tiny sizes, on any machine
#
# What it runs (about 3-5 minutes on an H100/H200; each step has its own time limit, 150 s + 420 s at most, so a
# hang cannot eat the lease):
#   1. nvidia-smi and the Python/torch environment             -> $OUT/env.txt
#   2. the runtime tests that need the GPU to mean something    -> $OUT/tests.txt  (attention kernels vs SDPA,
#      fp8, offload, out-of-memory translation; CPU-only parts run as well)
#   3. benchmarks/gpu_suite.py: GRN2b bf16 T2I 1024^2 and T2V 480x848x33 (s/step, MFU, peak memory), GRN8b fp8 with
#      block offload under a 23 GiB cap (does it fit a 24 GB card), tokenizer decode of 9 and 33 frames at 480p,
#      correctness checks on the device                        -> $OUT/gpu_suite.json, $OUT/gpu_suite.md, stdout
# Extra arguments go to gpu_suite.py (e.g. --sections 2b,8b --repeats 5 --peak-tflops 989).
# From a session with a lent device: run(command="bash benchmarks/gpu_suite.sh", timeout_s=600); the files come back
# from $OUT (env.txt, tests.txt, gpu_suite.json, gpu_suite.md, gpu_suite.log). Append gpu_suite.md to BENCHMARKS.md.
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

timeout 420 "$PY" benchmarks/gpu_suite.py --out "$OUT/gpu_suite.json" --markdown "$OUT/gpu_suite.md" "$@" \
  2>&1 | tee "$OUT/gpu_suite.log" || status=1
exit $status
