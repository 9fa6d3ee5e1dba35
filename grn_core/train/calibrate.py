"""Calibrating the tiny model's adaptive steps during training: the general method (``grn_core.calibration``) with
the shapes judge as the score, on the grammar's captions (seeds the benchmark does not use)."""

from __future__ import annotations

from typing import Optional, Sequence

from ..calibration import calibrate, judge_scorer, run_ladder
from ..pipeline import GRNModel
from ..sampler import SamplerSettings

__all__ = ["calibrate_adaptive"]


def calibrate_adaptive(model: GRNModel, prompts: Sequence[str], seeds: Sequence[int], frames: int, height: int,
                       width: int, base: Optional[SamplerSettings] = None) -> dict:
    """Run the ladder for ``prompts`` x ``seeds``, judge every clip and fit (k, b); returns the report."""
    run = run_ladder(model, prompts, seeds, width=width, height=height, frames=frames, task="t2v",
                     scorer=judge_scorer, base=base or SamplerSettings.for_task("t2v"), batch_size=8)
    return calibrate(run, judge_scorer)
