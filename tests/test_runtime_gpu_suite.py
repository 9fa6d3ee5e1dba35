"""The GPU suite's code path runs on the CPU with tiny sizes (``--smoke``) and reports what it promises.

Only the machinery is checked here (sections, JSON fields, offload checks, summary/markdown); the numbers come from
a lent GPU (``bash benchmarks/gpu_suite.sh``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


def test_suite_sections_on_cpu(tmp_path, capsys):
    out = tmp_path / "suite.json"
    results = gpu_suite.main(["--device", "cpu", "--smoke", "--repeats", "1", "--sections", "device,2b,8b",
                              "--out", str(out), "--markdown", str(tmp_path / "suite.md")])
    assert json.loads(out.read_text())["t2v_2b"]["grid"] == [3, 4, 6]
    for name in ("t2i_2b", "t2v_2b"):
        case = results[name]
        assert "error" not in case, case
        assert case["s_per_step"] > 0 and case["tflop_per_step"] >= 0 and case["activation_estimate_gib"] >= 0
    assert results["t2v_2b"]["sampler"]["steps"] == 3
    eight = results["t2v_8b_fp8_offload"]
    assert "error" not in eight, eight
    streamed = eight["all_blocks"] if "all_blocks" in eight else eight["auto"]
    assert streamed["streamed_blocks"] == 4 and streamed["peak_streamed_blocks_on_device"] <= 2
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert "summary" in lines[-1] and "t2v_2b" in lines[-1]["summary"]
    assert "| t2v_2b |" in (tmp_path / "suite.md").read_text()


def test_shell_script_runs_the_suite(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), GRN_SUITE_SKIP_TESTS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--device", "cpu", "--smoke",
                           "--sections", "device"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((tmp_path / "gpu_suite.json").read_text())["device"]["name"]
    assert (tmp_path / "env.txt").is_file() and (tmp_path / "gpu_suite.md").is_file()


@pytest.mark.parametrize("name, expected", [("NVIDIA H200", 989), ("NVIDIA GeForce RTX 4090", 165),
                                            ("NVIDIA A100-SXM4-80GB", 312), ("Mystery GPU", None)])
def test_peak_table(name, expected):
    assert gpu_suite.peak_tflops(name, None) == expected
    assert gpu_suite.peak_tflops(name, 123.0) == 123.0
