"""Triton kernel of the fused refinement step (same contract as ``step.fused_step_reference``).

One program handles ``BLOCK_T`` tokens x all ``D`` bits of one batch row, reading each logit once:
guidance, temperature, class-1 probability, sampling, keep mask, mix with Z, entropy of the conditional
prediction, per-bit states, the per-token plurality state, and per-program partial sums (entropy and
state counts; summed afterwards in a fixed order, so the result is deterministic - no float atomics).

On CPU the kernel runs only under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported); that is how the tests check it against the reference.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .step import LN2, StepOutput

try:  # triton is optional: the sampler falls back to the torch reference without it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None


def triton_available() -> bool:
    return triton is not None


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _fused_step_kernel(
        cond_ptr, uncond_ptr, w_ptr, tau_ptr, keep_prob_ptr,
        u_sample_ptr, u_keep_ptr, z_ptr, prev_kept_ptr, prev_bits_ptr,
        sample_ptr, mixed_ptr, kept_ptr, token_state_ptr, ent_part_ptr, count_part_ptr, prob_ptr,
        T, D, n_blocks,
        HAS_UNCOND: tl.constexpr, STORE_PROB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        blk = tl.program_id(1)
        tok = blk * BLOCK_T + tl.arange(0, BLOCK_T)
        bit = tl.arange(0, BLOCK_D)
        tok_ok = tok < T
        valid = tok_ok[:, None] & (bit[None, :] < D)
        idx = row.to(tl.int64) * T * D + tok[:, None].to(tl.int64) * D + bit[None, :]

        c0 = tl.load(cond_ptr + 2 * idx, mask=valid, other=0.0).to(tl.float32)
        c1 = tl.load(cond_ptr + 2 * idx + 1, mask=valid, other=0.0).to(tl.float32)
        dc = c1 - c0
        if HAS_UNCOND:
            w = tl.load(w_ptr + row).to(tl.float32)
            u0 = tl.load(uncond_ptr + 2 * idx, mask=valid, other=0.0).to(tl.float32)
            u1 = tl.load(uncond_ptr + 2 * idx + 1, mask=valid, other=0.0).to(tl.float32)
            du = u1 - u0
            diff = tl.where(w == 1.0, dc, du + w * (dc - du))
        else:
            diff = dc
        tau = tl.load(tau_ptr + row).to(tl.float32)
        p1 = tl.sigmoid(diff / tau)
        if STORE_PROB:
            tl.store(prob_ptr + idx, p1, mask=valid)

        u_s = tl.load(u_sample_ptr + idx, mask=valid, other=1.0)
        u_k = tl.load(u_keep_ptr + idx, mask=valid, other=1.0)
        keep_prob = tl.load(keep_prob_ptr + row).to(tl.float32)
        sample = (u_s < p1).to(tl.uint8)
        kept = u_k < keep_prob
        z = tl.load(z_ptr + idx, mask=valid, other=0)
        mixed = tl.where(kept, sample, z)
        tl.store(sample_ptr + idx, sample, mask=valid)
        tl.store(mixed_ptr + idx, mixed, mask=valid)
        tl.store(kept_ptr + idx, kept.to(tl.uint8), mask=valid)

        # entropy of the conditional softmax, in bits: a = |c1 - c0|, e = exp(-a)
        a = tl.abs(dc)
        e = tl.exp(-a)
        h = (tl.log(1.0 + e) + a * e / (1.0 + e)) / 0.6931471805599453
        h = tl.where(valid, h, 0.0)
        tl.store(ent_part_ptr + row * n_blocks + blk, tl.sum(tl.sum(h, axis=1), axis=0))

        # states: 0 FILL, 1 KEEP, 2 ERASE, 3 BLANK (see states.py)
        prev_kept = tl.load(prev_kept_ptr + idx, mask=valid, other=0) != 0
        prev_bits = tl.load(prev_bits_ptr + idx, mask=valid, other=0)
        unchanged = mixed == prev_bits
        state = tl.where(kept, tl.where(prev_kept & unchanged, 1, 0), tl.where(prev_kept, 2, 3))
        n_fill = tl.sum((valid & (state == 0)).to(tl.int32), axis=1)
        n_keep = tl.sum((valid & (state == 1)).to(tl.int32), axis=1)
        n_erase = tl.sum((valid & (state == 2)).to(tl.int32), axis=1)
        n_blank = tl.sum((valid & (state == 3)).to(tl.int32), axis=1)
        best = tl.zeros([BLOCK_T], dtype=tl.int32)
        best_n = n_fill
        best = tl.where(n_keep > best_n, 1, best)
        best_n = tl.maximum(best_n, n_keep)
        best = tl.where(n_erase > best_n, 2, best)
        best_n = tl.maximum(best_n, n_erase)
        best = tl.where(n_blank > best_n, 3, best)
        tl.store(token_state_ptr + row.to(tl.int64) * T + tok, best.to(tl.uint8), mask=tok_ok)

        base = (row * n_blocks + blk) * 4
        tl.store(count_part_ptr + base + 0, tl.sum(n_fill, axis=0))
        tl.store(count_part_ptr + base + 1, tl.sum(n_keep, axis=0))
        tl.store(count_part_ptr + base + 2, tl.sum(n_erase, axis=0))
        tl.store(count_part_ptr + base + 3, tl.sum(n_blank, axis=0))


def _block_sizes(d: int, block_t: Optional[int]) -> "tuple[int, int]":
    block_d = triton.next_power_of_2(d)
    if block_t is None:
        # ~2k elements per program on a GPU; the interpreter pays per program, so give it more work each
        budget = 65536 if interpreter_active() else 2048
        block_t = max(1, budget // block_d)
    return triton.next_power_of_2(block_t), block_d


def fused_step_triton(cond: torch.Tensor, uncond: Optional[torch.Tensor], w: torch.Tensor, tau: torch.Tensor,
                      u_sample: torch.Tensor, u_keep: torch.Tensor, z: torch.Tensor, keep_prob: torch.Tensor,
                      prev_kept: torch.Tensor, prev_bits: torch.Tensor, return_probs: bool = False,
                      block_t: Optional[int] = None) -> StepOutput:
    """Triton version of ``fused_step_reference`` (one kernel launch)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use step.fused_step_reference or `pip install triton`")
    if cond.device.type != "cuda" and not interpreter_active():
        raise ValueError(f"the Triton kernel needs CUDA tensors (got {cond.device}) or TRITON_INTERPRET=1 set "
                         "before importing triton; use fused_step_reference on CPU")
    rows, t, d, _ = cond.shape
    dev = cond.device
    block_t, block_d = _block_sizes(d, block_t)
    n_blocks = triton.cdiv(t, block_t)
    cond = cond.contiguous()
    unc = uncond.contiguous() if uncond is not None else cond
    as_f32 = lambda v: v.to(device=dev, dtype=torch.float32).reshape(rows).contiguous()  # noqa: E731
    sample = torch.empty((rows, t, d), dtype=torch.uint8, device=dev)
    mixed = torch.empty_like(sample)
    kept = torch.empty_like(sample)
    token_states = torch.empty((rows, t), dtype=torch.uint8, device=dev)
    ent_part = torch.empty((rows, n_blocks), dtype=torch.float32, device=dev)
    count_part = torch.empty((rows, n_blocks, 4), dtype=torch.int32, device=dev)
    probs = torch.empty((rows, t, d), dtype=torch.float32, device=dev) if return_probs else ent_part
    _fused_step_kernel[(rows, n_blocks)](
        cond, unc, as_f32(w), as_f32(tau), as_f32(keep_prob),
        u_sample.contiguous(), u_keep.contiguous(), z.contiguous(),
        prev_kept.contiguous().view(torch.uint8), prev_bits.contiguous(),
        sample, mixed, kept, token_states, ent_part, count_part, probs,
        t, d, n_blocks,
        HAS_UNCOND=uncond is not None, STORE_PROB=return_probs, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return StepOutput(sample, mixed, kept.view(torch.bool), ent_part.double().sum(1),
                      count_part.long().sum(1), token_states, probs if return_probs else None)


__all__ = ["fused_step_triton", "triton_available", "interpreter_active", "LN2"]
