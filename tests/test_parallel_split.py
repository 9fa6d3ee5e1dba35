"""Work shared by the ranks around sampling: the tokenizer decode split over ranks gives the single-process frames bit
for bit; the prompt features encoded on rank 0 arrive equal everywhere; per-rank memory of the parallel modes.

Why bit for bit (not just within rounding): every value a rank keeps is computed from bit-identical inputs by the same
operations on tensors of the same shapes as in one process. Time split: after a warm-up of R latent frames (the
decoder's temporal receptive field) the causal cache holds exactly the single-process values. Space split: the tail
of the decoder runs on a band plus a halo as wide as its spatial receptive field; convolutions compute each output
from the same inputs whatever the crop, and on the CPU a conv's result does not depend on the spatial extent. The
tests compare with ``torch.equal``.

2-process cases spawn fresh processes on gloo (127.0.0.1), as tests/test_parallel.py does; a worker saves what it got
to ``rank{r}.pt`` and the test compares it with a single-process run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from grn_core.refiner import GRN2b, GRN8b
from grn_core.runtime.distributed import DistributedError, ParallelPlan
from grn_core.runtime.memory import (ParallelLayoutError, parallel_layout, parallel_step_bytes, refiner_step_bytes,
                                     refiner_weight_bytes)
from grn_core.runtime.split import (SplitError, _decode_band, broadcast_features, decode_frames, decode_split,
                                    decode_tokens_split, plan_decode_split, stem_span, temporal_receptive_field)
from grn_core.tokenizer import HBQTokenizer, TokenizerConfig
from tests._ranks import join_group_env, spawn_ranks

PROMPT = "a red circle moving right"
needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
# The released tokenizer's layout (levels, residual blocks, temporal steps) at tiny widths: same receptive fields.
RELEASED_LAYOUT = TokenizerConfig(dim=4, dec_dim=4, z_dim=4)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    from grn_core.models import load_tiny

    return load_tiny()


@pytest.fixture(scope="module")
def released_layout():
    torch.manual_seed(3)
    return HBQTokenizer(RELEASED_LAYOUT).eval()


def _latents(shape, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, d, *shape, generator=g) * 2 - 1


def _bits(shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, shape, generator=g, dtype=torch.uint8)


# ---- receptive fields and single-process exactness -------------------------------------------------------------------
def _last_changed_chunk(tokenizer, z: torch.Tensor, frame: int) -> int:
    with torch.inference_mode():
        before = list(tokenizer.decode_iter(z))
        bumped = z.clone()
        bumped[:, :, frame] += 0.5
        after = list(tokenizer.decode_iter(bumped))
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if not torch.equal(a, b)]
    assert changed[0] == frame
    return changed[-1]


def test_temporal_receptive_field_is_the_reach_of_one_latent_frame(tiny, released_layout, one_thread):
    """Changing latent frame 2 changes output chunks 2 .. 2 + R and no later one, for both layouts."""
    assert temporal_receptive_field(tiny.tokenizer.config) == 28
    assert temporal_receptive_field(TokenizerConfig()) == temporal_receptive_field(RELEASED_LAYOUT) == 38
    assert _last_changed_chunk(tiny.tokenizer, _latents((36, 2, 2)), 2) == 2 + 28
    assert _last_changed_chunk(released_layout, _latents((46, 1, 1), d=4), 2) == 2 + 38


def test_warm_up_of_r_frames_is_exact_and_one_less_is_not(tiny, one_thread):
    tok = tiny.tokenizer
    z = _latents((33, 2, 2))
    r = temporal_receptive_field(tok.config)
    with torch.inference_mode():
        full = tok.decode(z)
        for start, stop in ((29, 33), (30, 32), (32, 33)):
            ref = full[:, :, 1 + 4 * (start - 1):1 + 4 * (stop - 1)]
            assert torch.equal(decode_frames(tok, z, start, stop, r), ref)  # warm-up from frame start - R >= 1
            assert not torch.equal(decode_frames(tok, z, start, stop, r - 1), ref)  # R is tight
        assert torch.equal(decode_frames(tok, z, 0, 3), full[:, :, :9])  # from frame 0: the plain decode
        assert torch.equal(decode_frames(tok, z, 5, 9), full[:, :, 17:33])  # warm-up reaches frame 0
        assert decode_frames(tok, z, 4, 4).shape[2] == 0
    with pytest.raises(SplitError, match="outside 0..33"):
        decode_frames(tok, z, 30, 34)


def test_bands_with_their_halo_equal_the_whole_frame(tiny, released_layout, one_thread):
    cases = [(tiny.tokenizer, _latents((5, 4, 16)), 4), (released_layout, _latents((3, 2, 16), d=4), 8)]
    with torch.inference_mode():
        for tok, z, px in cases:
            full = tok.decode(z)
            cols, rows = 2 * z.shape[4], 2 * z.shape[3]
            for a, b in ((0, cols // 2), (cols // 2, cols), (3, cols - 5), (0, cols)):
                assert torch.equal(_decode_band(tok, z, a, b, -1), full[..., a * px:b * px])
            for a, b in ((0, 1), (1, rows), (1, rows - 1)):
                assert torch.equal(_decode_band(tok, z, a, b, -2), full[..., a * px:b * px, :])
    # the halo: 12 stem cells (96 px) each side for the released layout (tiled.tail_receptive_field: 99 px)
    assert stem_span(TokenizerConfig(), 40, 50, 100) == (28, 62)
    assert stem_span(TokenizerConfig(), 0, 10, 100) == (0, 22)
    assert stem_span(tiny.tokenizer.config, 10, 20, 32) == (3, 27)


def test_the_plan_splits_81_frames_in_space_and_long_clips_in_time(tiny):
    released = TokenizerConfig()
    for grid in ((21, 30, 53), (21, 45, 80)):  # 480x848 and 720x1280, 81 frames
        for world in (2, 4):
            split = plan_decode_split(released, grid, world)
            assert split.strategy == "space" and split.axis == -1 and split.work < 0.65, split
            assert split.parts[0][0] == 0 and split.parts[-1][1] == grid[2] * 2
            assert all(a[1] == b[0] for a, b in zip(split.parts, split.parts[1:]))
            forced = plan_decode_split(released, grid, world, "time")
            assert forced.strategy == "time" and forced.work == 1.0  # R = 38 > 21 frames: nothing to gain
    long = plan_decode_split(released, (400, 30, 53), 2)  # 1597 frames: t/2 + R/2 beats the bands
    assert long.strategy == "time" and long.parts == ((0, 219), (219, 400)) and long.work < 0.55
    assert plan_decode_split(tiny.tokenizer.config, (5, 2, 2), 2).strategy == "single"  # 32x32: too small
    assert plan_decode_split(tiny.tokenizer.config, (5, 4, 16), 2).axis == -1
    assert plan_decode_split(tiny.tokenizer.config, (3, 16, 2), 2).axis == -2
    assert plan_decode_split(released, (21, 30, 53), 1).strategy == "single"
    with pytest.raises(SplitError, match="strategy='tiles'"):
        plan_decode_split(released, (21, 30, 53), 2, "tiles")


def test_one_process_decodes_and_passes_features_through(tiny, one_thread):
    from grn_core.pipeline import decode_tokens, encode_prompt

    plan = ParallelPlan.single()
    bits = _bits((2, 64, 3, 2, 2))
    assert torch.equal(decode_tokens_split(plan, tiny, bits), decode_tokens(tiny, bits, tile=None))
    z = _latents((5, 4, 16))
    with torch.inference_mode():
        assert torch.equal(decode_split(plan, tiny.tokenizer, z, strategy="space"), tiny.tokenizer.decode(z))
    feats = encode_prompt(tiny, tiny.text_encoder, PROMPT, "", task="t2v")
    assert broadcast_features(plan, feats) is feats
    assert broadcast_features(plan, lambda: feats) is feats
    with pytest.raises(SplitError, match="got None"):
        broadcast_features(plan, None)
    with pytest.raises(SplitError, match="decodes \\[B, 64, t, h, w\\]"):
        decode_tokens_split(plan, tiny, bits[:, :32])


def test_a_gpu_short_of_memory_leaves_the_decode_to_rank_0_tiled(tiny, one_thread, monkeypatch):
    """Where ``decode_tokens`` would tile (a tight GPU), the split decode hands it the whole job (rank 0)."""
    import grn_core.pipeline as pipeline
    import grn_core.runtime.split as split

    bits = _bits((1, 64, 3, 2, 2))
    assert not split._needs_tiles(tiny, bits)  # the CPU: never tiles
    calls = []
    real = pipeline.decode_tokens
    monkeypatch.setattr(pipeline, "decode_tokens", lambda model, bits, **kw: calls.append(kw) or real(model, bits))
    monkeypatch.setattr(split, "_needs_tiles", lambda model, bits: True)
    assert torch.equal(decode_tokens_split(ParallelPlan.single(), tiny, bits), real(tiny, bits))
    assert calls == [{}]  # decode_tokens' own choice of tiles ("auto")


# ---- two processes ---------------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, job: str, folder: str) -> None:
    join_group_env(rank, world, port)
    torch.set_num_threads(1)
    result: dict = {}
    started = time.monotonic()
    try:
        plan = ParallelPlan.from_env("cpu", timeout_s=30)
        try:
            result.update(_decode_job(plan) if job == "decode" else _features_job(plan))
        finally:
            plan.close()
    except Exception as error:  # noqa: BLE001 - the test reads it
        result["error"] = f"{type(error).__name__}: {error}"
    result["seconds"] = time.monotonic() - started
    torch.save(result, Path(folder, f"rank{rank}.pt"))


def _decode_job(plan: ParallelPlan) -> dict:
    from grn_core.models import load_tiny

    model = load_tiny()
    tok = model.tokenizer
    out = {}
    with torch.inference_mode():
        out["space"] = decode_split(plan, tok, _latents((5, 4, 16)))                       # auto: column bands
        out["time"] = decode_split(plan, tok, _latents((33, 2, 2)), strategy="time")      # rank 1 warms up from 3
        out["single"] = decode_split(plan, tok, _latents((3, 2, 2)), everywhere=True)     # too small to split
        out["rows"] = decode_split(plan, tok, _latents((3, 16, 2)), everywhere=True)      # auto: row bands
    out["tokens"] = decode_tokens_split(plan, model, _bits((2, 64, 5, 2, 8)))
    return out


def _features_job(plan: ParallelPlan) -> dict:
    from grn_core.pipeline import PromptFeatures, encode_prompt

    def never():
        raise AssertionError("rank 1 ran the text encoder")

    if plan.is_main:
        from grn_core.models import load_tiny

        model = load_tiny()
        prompt = lambda: encode_prompt(model, model.text_encoder, PROMPT, "blurry", task="t2v")  # noqa: E731
        g = torch.Generator().manual_seed(4)
        listed = PromptFeatures([torch.randn(3, 8, generator=g).bfloat16(), torch.randn(5, 8, generator=g)], None,
                                "t2i", "two prompts", "")

        def broken():
            raise ValueError("the prompt is empty: describe what to generate.")
    else:
        prompt = listed = broken = never
    out = {"prompt": broadcast_features(plan, prompt), "listed": broadcast_features(plan, listed)}
    try:
        broadcast_features(plan, broken)
    except ValueError as error:
        out["broken"] = f"{type(error).__name__}: {error}"
    out["after"] = broadcast_features(plan, (lambda: PromptFeatures(torch.ones(2, 2), torch.zeros(0, 2), "t2v", "x"))
                                      if plan.is_main else None)  # the group still works after a failure
    return out


def _spawn(job: str, folder: Path, world: int = 2, timeout: float = 90.0) -> list:
    spawn_ranks(_worker, (job, str(folder)), world, timeout)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


@needs_gloo
def test_split_decode_on_two_ranks_equals_one_process(tmp_path, tiny, one_thread):
    from grn_core.pipeline import decode_tokens

    first, second = _spawn("decode", tmp_path)
    assert "error" not in first and "error" not in second, (first.get("error"), second.get("error"))
    tok = tiny.tokenizer
    with torch.inference_mode():
        expected = {name: tok.decode(_latents(shape)) for name, shape in
                    (("space", (5, 4, 16)), ("time", (33, 2, 2)), ("single", (3, 2, 2)), ("rows", (3, 16, 2)))}
    expected["tokens"] = decode_tokens(tiny, _bits((2, 64, 5, 2, 8)), tile=None)
    for name, frames in expected.items():
        assert torch.equal(first[name], frames), name
    assert torch.equal(second["single"], expected["single"]) and torch.equal(second["rows"], expected["rows"])
    assert second["space"] is None and second["time"] is None and second["tokens"] is None
    assert first["seconds"] < 60, first["seconds"]


@needs_gloo
def test_prompt_features_encoded_on_rank_0_arrive_equal(tmp_path, tiny, one_thread):
    from grn_core.pipeline import encode_prompt

    first, second = _spawn("features", tmp_path)
    assert "error" not in first and "error" not in second, (first.get("error"), second.get("error"))
    reference = encode_prompt(tiny, tiny.text_encoder, PROMPT, "blurry", task="t2v")
    for got in (first["prompt"], second["prompt"]):
        assert torch.equal(got.cond, reference.cond) and torch.equal(got.uncond, reference.uncond)
        assert (got.task, got.text, got.negative) == (reference.task, reference.text, reference.negative)
    a, b = first["listed"], second["listed"]
    assert isinstance(b.cond, list) and len(b.cond) == 2 and b.uncond is None and b.task == "t2i"
    assert [t.dtype for t in b.cond] == [torch.bfloat16, torch.float32]
    assert all(torch.equal(x, y) for x, y in zip(a.cond, b.cond))
    assert first["broken"] == "ValueError: the prompt is empty: describe what to generate."
    assert "DistributedError" in second["broken"] and "rank 0 could not encode the prompt" in second["broken"]
    assert "the prompt is empty" in second["broken"]
    assert torch.equal(second["after"].cond, torch.ones(2, 2)) and second["after"].uncond.shape == (0, 2)
    assert issubclass(DistributedError, ValueError)


# ---- per-rank memory -------------------------------------------------------------------------------------------------
GRID_480 = (21, 30, 53)   # 480x848, 81 frames
GRID_720 = (21, 45, 80)   # 720x1280, 81 frames


def test_per_rank_memory_of_the_parallel_modes():
    for config in (GRN2b(), GRN8b()):
        for grid in (GRID_480, GRID_720):
            one = parallel_step_bytes(config, grid, text_tokens=120)
            assert one.activations == refiner_step_bytes(config, grid, text_tokens=120)
            assert one.weights == refiner_weight_bytes(config, torch.bfloat16)["total"]
            assert parallel_step_bytes(config, grid, "data", 4, text_tokens=120).activations == one.activations
            cfg = parallel_step_bytes(config, grid, "cfg", 2, text_tokens=120)
            assert cfg.branches == 1 and cfg.weights == one.weights  # weights are never split
            assert 0.45 < cfg.activations / one.activations < 0.55  # one branch: about half
            sp2 = parallel_step_bytes(config, grid, "sp", 2, text_tokens=120)
            assert sp2.degree == 2 and sp2.branches == 2
            assert 0.5 < sp2.activations / one.activations < 0.7  # rows / 2, plus the all-to-all buffers
            cfg_sp = parallel_step_bytes(config, grid, "cfg+sp", 4, text_tokens=120)
            assert cfg_sp.activations < min(cfg.activations, sp2.activations)
            # Guidance 1: one branch. sp splits it; cfg's conditional side runs it whole, as one process does.
            alone = refiner_step_bytes(config, grid, text_tokens=120, branches=1)
            sp_one = parallel_step_bytes(config, grid, "sp", 2, text_tokens=120, guided=False)
            assert sp_one.branches == 1 and 0.5 < sp_one.activations / alone < 0.75
            assert parallel_step_bytes(config, grid, "cfg", 2, text_tokens=120, guided=False).activations >= alone
    # Ulysses: activations fall with the degree, towards what does not split (gathered logits, sampler state)
    degrees = [parallel_step_bytes(GRN8b(), GRID_720, "sp", p).activations for p in (2, 4, 8, 16, 32)]
    assert degrees == sorted(degrees, reverse=True)
    assert 1.8 < degrees[0] / degrees[1] < 2.0 and degrees[3] / degrees[4] < 1.6
    assert parallel_step_bytes(GRN8b(), GRID_720, "cfg+sp", 8).activations < \
        parallel_step_bytes(GRN8b(), GRID_720, "cfg+sp", 4).activations
    # fp8 weights halve the floor every rank pays
    fp8 = parallel_step_bytes(GRN8b(), GRID_720, "cfg", 2, storage=torch.float8_e4m3fn)
    assert fp8.weights < 0.55 * parallel_step_bytes(GRN8b(), GRID_720, "cfg", 2).weights


def test_per_rank_memory_refuses_layouts_that_cannot_run():
    for mode, world, config, words in (("cfg", 3, None, "exactly 2 processes"),
                                       ("cfg+sp", 6 + 1, None, "even number of processes"),
                                       ("cfg+sp", 2, None, "use --parallel cfg or --parallel sp"),
                                       ("sp", 1, None, "at least 2 processes"),
                                       ("sp", 4, GRN2b(), "18 heads .* 2, 3, 6, 9, 18"),
                                       ("tp", 2, None, "one of cfg, sp, cfg\\+sp, data"),
                                       ("data", 0, None, "an int >= 1")):
        with pytest.raises(ParallelLayoutError, match=words):
            parallel_layout(mode, world, config)
    assert parallel_layout("cfg+sp", 6, GRN2b()) == (3, 1)
    assert parallel_layout("sp", 4, GRN8b()) == (4, 2)
    assert issubclass(ParallelLayoutError, ValueError)


def test_the_memory_check_counts_one_ranks_share(tiny):
    from grn_core.pipeline import memory_need

    for guidance in (1.0, 3.0):
        alone = memory_need(tiny, 1024, 1024, 81, "t2v", guidance).host
        assert memory_need(tiny, 1024, 1024, 81, "t2v", guidance, parallel=("sp", 2)).host < alone
        assert memory_need(tiny, 1024, 1024, 81, "t2v", guidance, parallel=("data", 2)).host == alone
