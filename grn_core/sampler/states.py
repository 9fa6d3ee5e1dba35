"""Per-bit / per-token refinement states shown to the user while sampling.

Rule, per bit (or per index label for C2I) at step i, from the keep state before the step
(``prev_kept``: the bit's value in ``x_i`` came from a kept sample), the keep state drawn now
(``kept``) and whether the value in the new map differs from the old one (``changed``)::

    FILL  = kept and (not prev_kept or changed)   # a sampled value was newly committed or rewritten
    KEEP  = kept and prev_kept and not changed    # a committed value stayed as it was
    ERASE = not kept and prev_kept                # a committed value went back to the random map Z
    BLANK = not kept and not prev_kept            # still showing Z

Exactly one state per bit, so the four bit counts of a sample add up to its number of bits, and
FILL + KEEP is the number of kept bits. A token (one latent position with its ``rounds*d`` bits) takes
the plurality state of its bits; ties go to the earlier state in the order FILL, KEEP, ERASE, BLANK
(the more active one), so token counts add up to the number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FILL, KEEP, ERASE, BLANK = 0, 1, 2, 3
STATE_NAMES = ("fill", "keep", "erase", "blank")
# The paper's colours of the four states (RGB, in code order): pink, blue, yellow, gray. Every picture of the states
# (the CLI's step maps, the Refine Stats chart, the widget through its events) reads them from here.
STATE_COLOURS = ((220, 120, 117), (88, 160, 227), (240, 180, 40), (128, 138, 151))
# Cells clamped to a source while editing (grn_core.editing) are KEEP in the states; pictures mark them in this colour.
FIXED_COLOUR = (150, 110, 210)
MAX_MAP_SIDE = 64


@dataclass(frozen=True)
class StateCounts:
    fill: int
    keep: int
    erase: int
    blank: int

    @classmethod
    def from_row(cls, row) -> "StateCounts":
        return cls(*(int(v) for v in row))

    @property
    def total(self) -> int:
        return self.fill + self.keep + self.erase + self.blank


def classify_states(prev_kept: torch.Tensor, kept: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
    """uint8 state code per element (same shape as the bool inputs).

    Not kept: ERASE (2) or BLANK (3) = 2 + (not prev_kept); kept: FILL (0) or KEEP (1) = prev_kept and not changed.
    """
    dropped = ~kept
    low_bit = torch.where(kept, prev_kept & ~changed, ~prev_kept)
    return dropped.to(torch.uint8) * 2 + low_bit.to(torch.uint8)


def plurality_states(states: torch.Tensor, dim: int = -1) -> "tuple[torch.Tensor, torch.Tensor]":
    """Per-token plurality state over ``dim`` -> (uint8 token states, int64 per-state bit counts [..., 4])."""
    counts = torch.stack([(states == s).sum(dim) for s in (FILL, KEEP, ERASE, BLANK)], dim=-1)
    best = torch.zeros(counts.shape[:-1], dtype=torch.uint8, device=counts.device)
    best_n = counts[..., FILL]
    for s in (KEEP, ERASE, BLANK):  # strict ">" keeps the earlier state on ties
        better = counts[..., s] > best_n
        best = torch.where(better, torch.full_like(best, s), best)
        best_n = torch.where(better, counts[..., s], best_n)
    return best, counts


def count_states(states: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, 4] int64 counts of each state code in ``states`` (first dim = rows)."""
    flat = states.reshape(rows, -1).long()
    offsets = torch.arange(rows, device=flat.device).unsqueeze(1) * 4
    return torch.bincount((flat + offsets).reshape(-1), minlength=rows * 4).reshape(rows, 4)


def downsample_state_map(token_states: torch.Tensor, max_side: int = MAX_MAP_SIDE) -> torch.Tensor:
    """Nearest-neighbour thinning of a [R, t, h, w] uint8 map so that h, w <= ``max_side`` (CPU copy).

    States are categories, so a pixel keeps one token's state instead of an average.
    """
    _, _, h, w = token_states.shape
    if h > max_side:
        rows = (torch.arange(max_side, device=token_states.device) * h) // max_side
        token_states = token_states.index_select(2, rows)
    if w > max_side:
        cols = (torch.arange(max_side, device=token_states.device) * w) // max_side
        token_states = token_states.index_select(3, cols)
    return token_states.to("cpu", torch.uint8)
