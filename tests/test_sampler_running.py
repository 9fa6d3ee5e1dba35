"""The running batch shared by both sampling loops: rows retire in one call and every per-row value follows.

End-to-end equality of a batch with its samples run alone is also checked in
``test_sampler_loop.test_batch_item_equals_single_run_with_seed_plus_k`` (shared negative prompt, no I2V) and
``test_sampler_c2i.test_batch_equals_single_and_seeds``; the one here adds the per-row I2V first frame and a
per-sample negative prompt, the other two things retirement must cut.
"""

from types import SimpleNamespace

import pytest
import torch

from grn_core.sampler import AdaptiveSteps, SamplerSettings, sample_bits
from grn_core.sampler.bookkeeping import RunLedger, make_generators
from grn_core.sampler.loop import TextBranch
from grn_core.sampler.running import RunningBatch, decide_steps, planned_steps, preview_due, row_temperatures
from grn_core.sampler.schedule import adaptive_temperature_factor, decide_remaining_steps
from tests.test_sampler_loop import N_BITS, TEXT_C, TEXTS, FakeRefiner, text

SEEDS = [40, 41, 42, 43]


def by_row(values):
    """[R, 2, 3] tensor whose row j is filled with values[j]: shows which rows a slice kept."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).expand(-1, 2, 3).clone()


def make_batch():
    batch = RunningBatch(RunLedger(list(SEEDS)))
    batch["x"] = by_row([0, 1, 2, 3])
    batch["first"] = torch.arange(4).view(4, 1).expand(4, 3)             # a broadcast view, as the I2V frame
    batch["name"] = ["a", "b", "c", "d"]
    batch["remaining"] = [None, 5, None, 7]
    return batch


def test_retire_takes_finished_rows_out_in_one_call():
    batch = make_batch()
    final = by_row([10, 11, 12, 13])
    assert batch.retire([False, True, False, True], final) == [1, 3]
    assert batch.ids == [0, 2] and len(batch) == 2
    assert sorted(batch.ledger.finals) == [1, 3]
    assert torch.equal(batch.ledger.finals[1], final[1]) and torch.equal(batch.ledger.finals[3], final[3])
    final.zero_()                                                       # stored finals are copies, not views
    assert float(batch.ledger.finals[3].max()) == 13.0
    assert torch.equal(batch["x"], by_row([0, 2]))
    assert batch["name"] == ["a", "c"] and batch["remaining"] == [None, None]


def test_columns_generators_and_callbacks_follow_their_rows():
    batch = make_batch()
    gens = list(batch.generators)
    for g in gens:                                                      # a step's worth of draws from every row
        torch.rand(5, generator=g)
    stays = []
    batch.on_keep_rows(stays.append)
    raw = [torch.full((2, TEXT_C), float(k)) for k in range(4)]
    branch = TextBranch(SimpleNamespace(), "text_cond", raw, 4, TEXT_C, batch_may_shrink=True)
    batch.on_keep_rows(branch.keep_rows)

    batch.retire([False, True, False, False], by_row([0, 1, 2, 3]))     # sample 1 leaves
    batch.retire([True, False, False], by_row([0, 2, 3]))               # then sample 0 (row 0 of three)
    assert batch.ids == [2, 3]
    assert stays == [[0, 2, 3], [1, 2]]                                  # positions among the rows running before
    assert batch.generators[0] is gens[2] and batch.generators[1] is gens[3]
    assert torch.equal(batch["x"], by_row([2, 3]))
    assert batch["first"].tolist() == [[2, 2, 2], [3, 3, 3]]
    assert batch["name"] == ["c", "d"] and batch["remaining"] == [None, 7]
    assert [float(t.mean()) for t in branch.current()] == [2.0, 3.0]
    # each row still draws the continuation of its own seed's stream
    for g, seed in zip(batch.generators, SEEDS[2:]):
        alone = torch.Generator().manual_seed(seed)
        torch.rand(5, generator=alone)
        assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=alone))


def test_retiring_every_row_ends_the_run():
    batch = make_batch()
    stays = []
    batch.on_keep_rows(stays.append)
    batch.retire([False, False, True, False], by_row([0, 1, 2, 3]))
    assert batch.retire([True, True, True], by_row([5, 6, 7])) == [0, 1, 3]
    assert len(batch) == 0 and not batch and batch.ids == [] and batch.generators == []
    assert "x" not in batch and batch.get("first") is None               # the batch tensors are released
    assert stays == [[0, 1, 3]]                                          # nothing to keep: no callback
    assert {k: float(v.max()) for k, v in batch.ledger.finals.items()} == {0: 5.0, 1: 6.0, 2: 2.0, 3: 7.0}


def test_nothing_finished_changes_nothing():
    batch = make_batch()
    x, names = batch["x"], batch["name"]
    batch.on_keep_rows(lambda stay: pytest.fail("no row left"))
    assert batch.retire([False] * 4, by_row([0, 1, 2, 3])) == []
    assert batch["x"] is x and batch["name"] is names and batch.ids == [0, 1, 2, 3]
    assert batch.ledger.finals == {}


def test_rejects_values_that_are_not_one_per_running_row():
    batch = make_batch()
    with pytest.raises(ValueError, match="3 rows but 4"):
        batch["y"] = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="5 rows but 4"):
        batch["y"] = [0] * 5
    with pytest.raises(ValueError, match="rows"):
        batch["y"] = torch.tensor(1.0)
    with pytest.raises(TypeError, match="tensor or a list"):
        batch["y"] = (1, 2, 3, 4)
    with pytest.raises(ValueError, match="3 flags"):
        batch.retire([True, False, False], by_row([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="final rows"):
        batch.retire([True] * 4, by_row([0, 1]))
    with pytest.raises(ValueError, match="generators"):
        RunningBatch(RunLedger([1, 2]), make_generators([1]))
    assert batch.ids == [0, 1, 2, 3] and batch.ledger.finals == {}


def test_adaptive_row_helpers():
    adaptive = AdaptiveSteps(warmup=2, k=10.0, b=0.0, min_steps=4)
    settings = SamplerSettings(steps=12, temperature=1.1, adaptive=adaptive, adaptive_temperature=True)
    batch = RunningBatch(RunLedger([0, 1, 2]))
    batch["remaining"] = [None] * 3
    assert planned_steps(batch, settings) == [12, 12, 12] and row_temperatures(batch, settings) == [1.1] * 3
    batch.retire([False, True, False], torch.zeros(3, 1))
    decide_steps(batch, [0.05, 0.9], adaptive, settings.steps)
    d = [decide_remaining_steps(h, 10.0, 0.0, 2, 4, 12) for h in (0.05, 0.9)]
    assert batch["remaining"] == d == [2, 9]
    assert batch.ledger.remaining == [2, None, 9] and batch.ledger.decision_entropy == [0.05, None, 0.9]
    assert planned_steps(batch, settings) == [4, 11]
    assert row_temperatures(batch, settings) == [1.1 * adaptive_temperature_factor(n) for n in d]
    assert row_temperatures(batch, settings.replace(adaptive_temperature=False)) == [1.1, 1.1]
    assert preview_due(4, 2, [12]) and not preview_due(5, 2, [12]) and preview_due(5, 2, [6, 12])


def test_samples_finishing_at_different_steps_match_their_single_runs():
    """I2V with one first frame and one negative prompt per sample: both are cut when a sample leaves."""
    settings = SamplerSettings(steps=12, adaptive=AdaptiveSteps(warmup=2, k=10.0, b=0.0, min_steps=4))
    gen = torch.Generator().manual_seed(1)
    first = torch.randint(0, 2, (3, N_BITS, 1, 3, 4), generator=gen, dtype=torch.uint8)
    uncond = [text(0.5), text(0.2), text(2.0)]
    kw = dict(grid=(3, 3, 4), settings=settings)
    ref = FakeRefiner()
    batch = sample_bits(ref, TEXTS, uncond, batch_size=3, seed=4, first_frame_bits=first, **kw)
    assert len(set(batch.steps)) == 3, batch.steps                      # three different retirement steps
    assert [c["rows"] for c in ref.calls] == [sum(s > i for s in batch.steps) for i in range(max(batch.steps))]
    assert [c["first"] for c in ref.calls] == [c["rows"] for c in ref.calls]
    for k in range(3):
        single = sample_bits(FakeRefiner(), [TEXTS[k]], [uncond[k]], batch_size=1, seed=4 + k,
                             first_frame_bits=first[k:k + 1], **kw)
        assert torch.equal(batch.bits[k], single.bits[0])
        assert batch.steps[k] == single.steps[0] and batch.nfe[k] == single.nfe[0]
        assert batch.entropy[k] == pytest.approx(single.entropy[0], abs=1e-12)
        assert batch.kept_fraction[k] == single.kept_fraction[0]
