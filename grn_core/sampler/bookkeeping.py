"""Bookkeeping shared by the bit and the C2I loops: seeds, per-sample statistics, callbacks and their payload.

The rows still running (and their retirement) are in ``running``."""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .events import SamplingInterrupted, SamplingResult, StepInfo
from .states import StateCounts, count_states, downsample_state_map

SEED_MODULUS = 1 << 64


def sample_seeds(seed: Optional[int], batch_size: int) -> List[int]:
    """Seed of every batch sample: ``seed + k`` (mod 2**64); a fresh random base seed when ``seed`` is None."""
    if seed is None:
        seed = secrets.randbits(63)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    return [(seed + k) % SEED_MODULUS for k in range(batch_size)]


def make_generators(seeds: Sequence[int]) -> List[torch.Generator]:
    """One CPU generator per sample: every random draw of sample k comes from its own stream, so a sample
    does not depend on the batch it runs in, and CPU and CUDA runs draw the same numbers."""
    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]


def draw_uniforms(generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """[2, R, *shape] float32 uniforms (sampling, keep), drawn on CPU row by row and moved to ``device``."""
    per_row = [torch.rand((2, *shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(per_row, dim=1).to(device)


def call_callback(callback: Optional[Callable[[StepInfo], Any]], info: StepInfo) -> bool:
    """Run the user's callback; False when it asked to stop (returned False or raised SamplingInterrupted)."""
    if callback is None:
        return True
    try:
        return callback(info) is not False
    except SamplingInterrupted:
        return False


def make_step_info(step: int, ids: Sequence[int], totals: Sequence[int], entropy: Sequence[float],
                   fraction: Sequence[float], guided: Sequence[bool], bit_counts: torch.Tensor,
                   token_states: torch.Tensor, preview: Any, seconds: float) -> StepInfo:
    """The callback payload of one step (one entry per running row).

    ``bit_counts``: CPU ``[R, 4]`` counts of FILL, KEEP, ERASE, BLANK over the row's bits (or labels);
    ``token_states``: uint8 ``[R, t, h, w]`` plurality state per token, counted here and thinned for display.
    """
    rows = len(ids)
    return StepInfo(
        step=step, total_steps=max(totals), sample_ids=tuple(ids), total_steps_per_sample=tuple(totals),
        entropy=tuple(entropy), kept_fraction=tuple(fraction), guided=tuple(guided),
        bit_counts=tuple(StateCounts.from_row(r) for r in bit_counts.long().tolist()),
        token_counts=tuple(StateCounts.from_row(r) for r in count_states(token_states, rows).tolist()),
        token_states=downsample_state_map(token_states), preview=preview, seconds=seconds,
    )


class RunLedger:
    """Per-sample statistics of one run (indexed by batch sample)."""

    def __init__(self, seeds: List[int]):
        n = len(seeds)
        self.seeds = seeds
        self.start = time.perf_counter()
        self.steps = [0] * n
        self.nfe = [0] * n
        self.entropy: List[List[float]] = [[] for _ in range(n)]
        self.kept: List[List[float]] = [[] for _ in range(n)]
        self.decision_entropy: List[Optional[float]] = [None] * n
        self.remaining: List[Optional[int]] = [None] * n
        self.rows_per_call: List[int] = []
        self.finals: Dict[int, torch.Tensor] = {}

    def model_call(self, rows: int) -> None:
        self.rows_per_call.append(rows)

    def record(self, ids: Sequence[int], entropy: Sequence[float], kept: Sequence[float],
               branches: Sequence[int]) -> None:
        for j, k in enumerate(ids):
            self.steps[k] += 1
            self.nfe[k] += branches[j]
            self.entropy[k].append(entropy[j])
            self.kept[k].append(kept[j])

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def result(self, bits: torch.Tensor, interrupted: bool) -> SamplingResult:
        return SamplingResult(
            bits=bits, seeds=self.seeds, steps=self.steps, nfe=self.nfe, model_calls=len(self.rows_per_call),
            rows_per_call=self.rows_per_call, entropy=self.entropy, kept_fraction=self.kept,
            decision_entropy=self.decision_entropy, remaining_steps=self.remaining,
            seconds=self.seconds(), interrupted=interrupted,
        )
