"""The FLOP count behind the refiner-step GFLOP/s figures (benchmarks/refiner_step.py) counts every matmul once.

PyTorch's FLOP counter sees each mm / addmm / bmm the step runs; SDPA's CPU flash kernel is invisible to it, so the
step runs under the math backend, which computes the same attention as two batched matmuls.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from grn_core.refiner import GRNRefiner, RefinerConfig, swiglu_hidden

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from refiner_step import step_flops  # noqa: E402


@pytest.mark.parametrize("layout, first_frame, kv_heads", [
    ("joint", False, 4), ("joint", True, 2), ("prefix", False, 2),
])
def test_step_flops_equal_the_counted_matmuls(layout, first_frame, kv_heads):
    cfg = RefinerConfig(width=64, depth=2, heads=4, kv_heads=kv_heads, mlp_hidden=swiglu_hidden(64, 3.55),
                        block_chunks=1, text_channels=32, latent_channels=8, layout=layout)
    torch.manual_seed(0)
    model = GRNRefiner(cfg).eval().requires_grad_(False)
    grid, batch, text_lens = (2, 3, 5), 2, [7, 3]
    bits = torch.randint(0, 2, (batch, cfg.bits, *grid), dtype=torch.uint8)
    first = torch.randint(0, 2, (batch, cfg.bits, 1, *grid[1:]), dtype=torch.uint8) if first_frame else None
    cond, uncond = (model.prepare_text(torch.randn(n, cfg.text_channels)) for n in text_lens)

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.step_logits(bits, torch.rand(batch), cond, uncond, aspect_ratio=grid[1] / grid[2],
                          first_frame_bits=first)

    counted = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in counted.items() if "bmm" in str(op))
    expected = step_flops(cfg, grid, text_lens, batch, first_frame=first_frame)
    assert attention == expected["attention"]
    assert counter.get_total_flops() == expected["total"]
