"""What the sampler reports: per-step callback payload, the run result, and the stop signal."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch

from .states import StateCounts


class SamplingInterrupted(Exception):
    """Raise from a step callback (or return ``False``) to stop sampling cleanly.

    The run then returns a ``SamplingResult`` with ``interrupted=True`` holding, for every sample,
    its latest full sample.
    """


@dataclass(frozen=True)
class StepInfo:
    """Payload of the per-step callback; every tuple has one entry per sample still running.

    step: 0-based index of the step just taken.
    total_steps: planned step count of the longest running sample (updated by the adaptive decision).
    sample_ids: batch indices of the running samples.
    total_steps_per_sample: planned step count of each running sample.
    entropy: mean entropy of the conditional prediction, in [0, 1] (bits: binary entropy / log 2).
    kept_fraction: realised kept fraction after this step (the next step token).
    guided: whether guidance was applied to the sample at this step.
    bit_counts / token_counts: state counts (see ``states``) over bits / tokens.
    token_states: uint8 [n, t, h', w'] plurality state per token, h', w' <= 64 (nearest thinning).
    preview: whatever ``preview_fn`` returned this step, else None.
    seconds: wall time since the run started.
    """

    step: int
    total_steps: int
    sample_ids: Tuple[int, ...]
    total_steps_per_sample: Tuple[int, ...]
    entropy: Tuple[float, ...]
    kept_fraction: Tuple[float, ...]
    guided: Tuple[bool, ...]
    bit_counts: Tuple[StateCounts, ...]
    token_counts: Tuple[StateCounts, ...]
    token_states: torch.Tensor
    preview: Any = None
    seconds: float = 0.0


@dataclass
class SamplingResult:
    """Outcome of one run (lists are indexed by batch sample).

    bits: T2I/T2V/I2V: uint8 [B, rounds*d, t, h, w] (I2V: the given first frame, then the generated ones);
          C2I: int64 index labels [B, d, h, w]. The last full sample, not the mixed map.
    seeds: the generator seed of each sample (``seed + k``).
    steps: steps taken by each sample.
    nfe: network forward evaluations of each sample, counting the cond and uncond branches separately.
    model_calls / rows_per_call: calls made to the network and the batch rows passed each time.
    entropy / kept_fraction: per-sample curves, one value per step taken.
    decision_entropy / remaining_steps: adaptive decision (H at the warm-up end, D), None when fixed.
    seconds: wall time of the run; interrupted: stopped by the callback.
    """

    bits: torch.Tensor
    seeds: List[int]
    steps: List[int]
    nfe: List[int]
    model_calls: int
    rows_per_call: List[int]
    entropy: List[List[float]]
    kept_fraction: List[List[float]]
    decision_entropy: List[Optional[float]] = field(default_factory=list)
    remaining_steps: List[Optional[int]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def nfe_total(self) -> int:
        return sum(self.nfe)

    def stats(self) -> dict:
        """JSON-friendly per-run statistics."""
        return {
            "seeds": self.seeds, "steps": self.steps, "nfe": self.nfe, "nfe_total": self.nfe_total,
            "model_calls": self.model_calls, "rows_per_call": self.rows_per_call,
            "entropy": self.entropy, "kept_fraction": self.kept_fraction,
            "decision_entropy": self.decision_entropy, "remaining_steps": self.remaining_steps,
            "seconds": self.seconds, "interrupted": self.interrupted,
        }
