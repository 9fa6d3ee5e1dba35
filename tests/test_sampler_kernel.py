"""The Triton fused step against the torch reference, on CPU under Triton's interpreter (in a subprocess,
because TRITON_INTERPRET must be set before triton is imported)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from grn_core.sampler.step import fused_step_reference

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r'''
    import json, os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from grn_core.sampler import SamplerSettings, sample_bits
    from grn_core.sampler.step import fused_step_reference
    from grn_core.sampler.triton_step import fused_step_triton

    def case(rows, tokens, bits, dtype, with_uncond, seed, block_t):
        g = torch.Generator().manual_seed(seed)
        cond = (torch.randn(rows, tokens, bits, 2, generator=g) * 3).to(dtype)
        unc = (torch.randn(rows, tokens, bits, 2, generator=g) * 3).to(dtype) if with_uncond else None
        w = torch.tensor([3.0, 1.0, 0.0][:rows]); tau = torch.tensor([1.1, 0.7, 2.0][:rows])
        keep_prob = torch.tensor([0.3, 0.95, 0.0][:rows])
        u_s = torch.rand(rows, tokens, bits, generator=g); u_k = torch.rand(rows, tokens, bits, generator=g)
        z = torch.randint(0, 2, (rows, tokens, bits), generator=g, dtype=torch.uint8)
        prev_kept = torch.rand(rows, tokens, bits, generator=g) < 0.4
        prev_bits = torch.where(prev_kept, torch.randint(0, 2, z.shape, generator=g, dtype=torch.uint8), z)
        args = (cond, unc, w, tau)
        raw_ref = fused_step_reference(*args, u_s, u_k, z, keep_prob, prev_kept, prev_bits, return_probs=True)
        raw_tri = fused_step_triton(*args, u_s, u_k, z, keep_prob, prev_kept, prev_bits, return_probs=True, block_t=block_t)
        near = (u_s - raw_ref.probs).abs() < 1e-6
        raw_diff = int((raw_ref.sample != raw_tri.sample).sum())
        # move uniforms off near-ties, then everything must agree exactly
        u_s2 = torch.where(near, (raw_ref.probs + torch.where(raw_ref.probs < 0.5, 1e-5, -1e-5)).clamp(0, 0.9999999), u_s)
        ref = fused_step_reference(*args, u_s2, u_k, z, keep_prob, prev_kept, prev_bits, return_probs=True)
        tri = fused_step_triton(*args, u_s2, u_k, z, keep_prob, prev_kept, prev_bits, return_probs=True, block_t=block_t)
        # exact ties: the reference's strict "<" gives 0
        tie = fused_step_reference(*args, ref.probs, u_k, z, keep_prob, prev_kept, prev_bits)
        return dict(
            prob_err=float((ref.probs - tri.probs).abs().max()),
            equal={k: bool(torch.equal(getattr(ref, k), getattr(tri, k)))
                   for k in ("sample", "mixed", "kept", "token_states", "state_counts")},
            entropy_rel=float(((ref.entropy_sum - tri.entropy_sum).abs() / ref.entropy_sum).max()),
            counts_total=tri.state_counts.sum(1).tolist(), n_bits=tokens * bits,
            near=int(near.sum()), raw_diff=raw_diff, tie_ones=int(tie.sample.sum()))

    out = {"cases": [
        case(2, 300, 32, torch.float32, True, 0, 16),
        case(3, 77, 24, torch.float32, True, 1, None),     # bits not a power of 2, tokens not a block multiple
        case(1, 50, 256, torch.bfloat16, False, 2, 4),     # half logits, no uncond, 256 bits
        case(2, 1000, 16, torch.float32, True, 3, None),
    ]}

    import sys
    sys.path.insert(0, os.getcwd())
    from tests.test_sampler_loop import FakeRefiner, text
    runs = {}
    for kernel in ("torch", "triton"):
        runs[kernel] = sample_bits(FakeRefiner(), text(1.0), text(0.5), grid=(2, 5, 6), batch_size=2, seed=9,
                                   settings=SamplerSettings(steps=5, kernel=kernel))
    out["loop_equal"] = bool(torch.equal(runs["torch"].bits, runs["triton"].bits))
    out["loop_entropy_err"] = max(abs(a - b) for a, b in zip(runs["torch"].entropy[0], runs["triton"].entropy[0]))
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def interpreted():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton) - the kernel cannot be checked here")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_kernel_matches_reference(interpreted):
    for c in interpreted["cases"]:
        assert c["prob_err"] < 1e-6, c
        assert all(c["equal"].values()), c
        assert c["entropy_rel"] < 1e-5, c
        assert all(total == c["n_bits"] for total in c["counts_total"]), c
        assert c["raw_diff"] <= c["near"], c     # with raw uniforms only near-ties may differ
        assert c["tie_ones"] == 0, c             # u == p1 exactly -> 0 ("<" is strict)


def test_loop_with_kernel_equals_loop_with_reference(interpreted):
    assert interpreted["loop_equal"]
    assert interpreted["loop_entropy_err"] < 1e-6


def test_reference_states_sum_and_guidance_one_is_cond():
    g = torch.Generator().manual_seed(4)
    cond, unc = torch.randn(2, 10, 6, 2, generator=g), torch.randn(2, 10, 6, 2, generator=g)
    u = torch.rand(2, 2, 10, 6, generator=g)
    z = torch.randint(0, 2, (2, 10, 6), generator=g, dtype=torch.uint8)
    prev = torch.zeros(2, 10, 6, dtype=torch.bool)
    one = torch.ones(2)
    a = fused_step_reference(cond, unc, one, one, u[0], u[1], z, torch.tensor([0.5, 0.5]), prev, z, return_probs=True)
    b = fused_step_reference(cond, None, one, one, u[0], u[1], z, torch.tensor([0.5, 0.5]), prev, z, return_probs=True)
    assert torch.equal(a.probs, b.probs)                      # w == 1 uses cond exactly
    assert a.state_counts.sum(1).tolist() == [60, 60]
    assert a.state_counts[:, 1].tolist() == [0, 0] and a.state_counts[:, 2].tolist() == [0, 0]  # no KEEP/ERASE at step 0
