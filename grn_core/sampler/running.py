"""The rows of a sampling batch that are still running, shared by the bit and the C2I loops.

With adaptive steps every sample has its own step count (``warmup + D``, ``D`` decided from the entropy at
the end of the warm-up), so samples finish at different steps. A finished sample leaves the batch at once:
its last full sample is stored in the ``RunLedger`` and every per-row value is cut to the remaining rows, so
later model calls see fewer rows. Per-row values are

* the sample ids (batch index k of each row) and the per-sample CPU generators (seeded ``seed + k``);
* named columns: tensors whose first dim is the row (``z``, ``x``, ``kept``, an I2V first frame, class
  labels...) and python lists with one entry per row (kept fraction, remaining steps ``D``...);
* callbacks that cut something the batch does not hold itself (a per-sample text branch: ``keep_rows``).

Each sample draws only from its own generator, and the generator travels with its row, so leaving changes
nothing for the others: sample k of a batch gets the bits of seed ``seed + k`` run alone.

By convention the column ``"remaining"`` holds each row's ``D`` (None until decided); the helpers below
(``decide_steps``, ``planned_steps``, ``row_temperatures``) read or write it for both loops.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from .bookkeeping import RunLedger, make_generators
from .schedule import adaptive_temperature_factor, decide_remaining_steps

Column = Union[torch.Tensor, list]


class RunningBatch:
    """Owns the running rows of one run; ``retire`` takes finished rows out of everything in one call.

    ``batch[name] = value`` registers (or replaces) a column: a tensor with one row per running sample in
    dim 0, or a list with one entry per running sample; ``batch[name]`` reads it back. ``len(batch)`` is the
    number of running rows; an empty batch means the run has ended.
    """

    def __init__(self, ledger: RunLedger, generators: Optional[Sequence[torch.Generator]] = None):
        self.ledger = ledger
        self.ids: List[int] = list(range(len(ledger.seeds)))
        self.generators: List[torch.Generator] = (list(generators) if generators is not None
                                                  else make_generators(ledger.seeds))
        if len(self.generators) != len(self.ids):
            raise ValueError(f"{len(self.generators)} generators for {len(self.ids)} samples; pass one per sample")
        self._columns: Dict[str, Column] = {}
        self._on_keep: List[Callable[[List[int]], Any]] = []

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, name: str) -> bool:
        return name in self._columns

    def __getitem__(self, name: str) -> Column:
        return self._columns[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self._columns.get(name, default)

    def __setitem__(self, name: str, value: Column) -> None:
        if isinstance(value, torch.Tensor):
            rows = value.shape[0] if value.dim() else None
        elif isinstance(value, list):
            rows = len(value)
        else:
            raise TypeError(f"column {name!r} must be a tensor or a list, got {type(value).__name__}")
        if rows != len(self.ids):
            raise ValueError(f"column {name!r} has {rows} rows but {len(self.ids)} samples are running")
        self._columns[name] = value

    def on_keep_rows(self, keep_rows: Callable[[List[int]], Any]) -> None:
        """Call ``keep_rows(stay)`` whenever rows leave; ``stay`` = positions (among the rows running before) kept."""
        self._on_keep.append(keep_rows)

    def retire(self, finished: Sequence[bool], final: torch.Tensor) -> List[int]:
        """Take the rows flagged in ``finished`` out of the run; returns their sample ids.

        ``final[j]`` (the last full sample of row j) is stored in the ledger for every finished row, as its own
        copy so that the batch tensor it came from can be freed. When every row finishes the run ends: the
        columns are dropped at once (nothing is left to slice, and the batch tensors are released).
        """
        rows = len(self.ids)
        if len(finished) != rows or final.shape[0] != rows:
            raise ValueError(f"retire got {len(finished)} flags and {final.shape[0]} final rows "
                             f"for {rows} running rows")
        done = [j for j in range(rows) if finished[j]]
        if not done:
            return []
        for j in done:
            self.ledger.finals[self.ids[j]] = final[j].clone()
        retired = [self.ids[j] for j in done]
        stay = [j for j in range(rows) if not finished[j]]
        self.ids = [self.ids[j] for j in stay]
        self.generators = [self.generators[j] for j in stay]
        if not stay:
            self._columns.clear()
            return retired
        index: Dict[torch.device, torch.Tensor] = {}  # one index tensor per device the columns live on
        for name, value in self._columns.items():
            if isinstance(value, torch.Tensor):
                if value.device not in index:
                    index[value.device] = torch.tensor(stay, dtype=torch.long, device=value.device)
                self._columns[name] = value.index_select(0, index[value.device])
            else:
                self._columns[name] = [value[j] for j in stay]
        for keep_rows in self._on_keep:
            keep_rows(stay)
        return retired


def decide_steps(batch: RunningBatch, entropy: Sequence[float], adaptive: Any, max_steps: int) -> None:
    """The adaptive decision at step ``i = warmup``, for every running row:

        D = round(clip(k * H + b, min_steps - warmup, max_steps - warmup))

    with H the row's mean entropy of the conditional prediction at that step; writes column ``"remaining"``
    and the ledger's ``decision_entropy`` / ``remaining`` of each sample.
    """
    remaining = [decide_remaining_steps(h, adaptive.k, adaptive.b, adaptive.warmup, adaptive.min_steps, max_steps)
                 for h in entropy]
    for k, h, d in zip(batch.ids, entropy, remaining):
        batch.ledger.decision_entropy[k], batch.ledger.remaining[k] = h, d
    batch["remaining"] = remaining


def planned_steps(batch: RunningBatch, settings: Any) -> List[int]:
    """Planned step count of every running row: ``steps`` until decided, then ``warmup + D``."""
    return [settings.steps if d is None else settings.adaptive.warmup + d for d in batch["remaining"]]


def row_temperatures(batch: RunningBatch, settings: Any) -> List[float]:
    """tau of every running row: ``temperature``, times the official ``clip((D-10)/40 + 0.5, 0.5, 1)`` once D is
    decided when ``adaptive_temperature`` is on."""
    return [settings.temperature * (adaptive_temperature_factor(d)
                                    if settings.adaptive_temperature and d is not None else 1.0)
            for d in batch["remaining"]]


def preview_due(step: int, every: int, totals: Sequence[int]) -> bool:
    """Preview every ``every`` steps, and on the last step of any running sample (its final look)."""
    return step % every == 0 or any(step + 1 >= total for total in totals)


__all__ = ["RunningBatch", "decide_steps", "planned_steps", "row_temperatures", "preview_due"]
