"""Tiled, frame-chunked tokenizer decode (grn_core.tokenizer.tiled): exactness, blending, error bounds, memory.

What tiling may change, and what these tests pin down:

* ``tile=None`` or a tile covering the grid is the plain decode, bit for bit.
* The assembly (tile layout, linear ramps, per-tile causal caches) is exact: with a decoder made spatially local
  (only the centre tap of every spatial kernel, attention output zeroed; time convs untouched) tiled == untiled to
  float32 rounding, for a 2-D tiling with uneven seams.
* The only approximation is the conv padding at tile borders in the tiled tail (the attention runs on whole frames):
  pixels farther than ``tail_receptive_field`` (99 px for the released layout) from every inner tile border are
  exact up to float32 rounding, for the golden and a random-weight tokenizer.
* Overall tolerance, random weights, tiles of >= 16 cells with overlap 4: max |tiled - untiled| <= 10 % of
  max |untiled| and mean <= 0.2 %. Measured (float32, z uniform in [-1, 1], 2 latent frames, grid 1x40, max / mean
  as % of max |untiled|): golden 4.3 / 0.062 (tile 16), 1.8 / 0.017 (tile 24); random-weight (dim 8, dec_dim 16)
  4.0 / 0.091, 2.5 / 0.026; tiles of 8 (not asserted) 4.3-5.0 / 0.24-0.37. The bounds are ~2x the worst measured
  case. Random untrained decoders spread border effects further than trained ones (no learned locality), so
  trained weights should do better; that cannot be checked here without the released file.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from grn_core.checkpoints import load_tokenizer
from grn_core.tokenizer import CausalCache, HBQTokenizer, TokenizerConfig
from grn_core.tokenizer import tiled
from grn_core.tokenizer.tiled import (
    choose_tile,
    decode_tiled,
    decode_tiled_iter,
    estimate_decode_memory,
    tail_receptive_field,
    tile_starts,
)

GOLDEN = Path(__file__).parent / "golden" / "tokenizer_weights.safetensors"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These convs are small: on a loaded 2-core machine a second thread costs far more than it gives (measured
    2-10x slower). Nothing asserted here depends on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# float32 throughout: CPU float64 3-D convs take a slow path, and every claim below holds at float32 rounding.
@pytest.fixture(scope="module")
def golden():
    return load_tokenizer(GOLDEN, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def random_tok():
    torch.manual_seed(0)
    return HBQTokenizer(TokenizerConfig(dim=8, dec_dim=16, z_dim=8)).eval()


@pytest.fixture(scope="module")
def z():
    """2 latent frames (5 pixel frames: the first chunk and a cached one), grid 1x40 (640 px wide)."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 8, 2, 1, 40, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def references(golden, random_tok, z):
    with torch.inference_mode():
        return {"golden": golden.decode(z), "random": random_tok.decode(z)}


@pytest.fixture(scope="module")
def tiled_outputs(golden, random_tok, z):
    """decode_tiled with tiles of 16 / 24 columns (all rows), overlap 4, for both tokenizers (computed once)."""
    out = {}
    with torch.inference_mode():
        for name, tok in (("golden", golden), ("random", random_tok)):
            for tile in (16, 24):
                out[name, tile] = decode_tiled(tok, z, tile=(1, tile), overlap=4)
    return out


def _tok(name, golden, random_tok):
    return {"golden": golden, "random": random_tok}[name]


# ---- exactness ----------------------------------------------------------------------------------------------------
def test_untiled_is_decode_bit_for_bit(golden, z, references):
    ref = references["golden"]
    with torch.inference_mode():
        assert torch.equal(decode_tiled(golden, z), ref)
        assert torch.equal(decode_tiled(golden, z, tile=None), ref)
        assert torch.equal(decode_tiled(golden, z, tile=(1, 40)), ref)  # one tile covering the grid
        assert torch.equal(decode_tiled(golden, z, tile=64), ref)
        chunks = list(decode_tiled_iter(golden, z))
        plain = list(golden.decode_iter(z))
    assert [c.shape[2] for c in chunks] == [1, 4]
    assert all(torch.equal(a, b) for a, b in zip(chunks, plain))


def test_stem_and_tail_are_the_decoder(golden, z, references):
    """The whole-frame stem followed by the tail on the whole frame is Decoder3d.forward, bit for bit."""
    stem_cache, tail_cache, chunks = CausalCache(), CausalCache(), []
    with torch.inference_mode():
        for i in range(z.shape[2]):
            features = tiled.decode_stem(golden, z[:, :, i : i + 1], stem_cache)
            chunks.append(tiled.decode_tail(golden, features, tail_cache))
            stem_cache.advance()
            tail_cache.advance()
    assert torch.equal(torch.cat(chunks, dim=2), references["golden"])


def _spatially_local(tok: HBQTokenizer) -> HBQTokenizer:
    """A copy whose decoder has no spatial context: centre taps only, attention output zeroed; time convs kept."""
    local = HBQTokenizer(tok.config).eval()
    local.load_state_dict(tok.state_dict())
    with torch.no_grad():
        for m in local.decoder.modules():
            if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d)) and m.kernel_size[-1] == 3:
                centre = m.weight[..., 1:2, 1:2].clone()
                m.weight.zero_()
                m.weight[..., 1:2, 1:2] = centre
        attn = local.decoder.middle[1]
        attn.proj.weight.zero_()
        attn.proj.bias.zero_()
    return local


def test_assembly_is_exact_for_a_local_decoder(golden):
    """Layout, ramps, normalisation and per-tile causal caches add no error of their own, up to float32 rounding of
    the blend: a 2-D tiling of 2 x 3 tiles whose column starts [0, 4, 7] give uneven seams and three tiles
    overlapping at column 7; 3 latent frames (the first, second and cached-third chunk rules)."""
    tile, overlap = (4, 8), 2
    assert tile_starts(15, 8, 2) == [0, 4, 7]
    local = _spatially_local(golden)
    g = torch.Generator().manual_seed(2)
    zl = torch.rand(1, 8, 3, 5, 15, generator=g) * 2 - 1
    with torch.inference_mode():
        ref = local.decode(zl)
        by_tile = decode_tiled(local, zl, tile=tile, overlap=overlap)
        by_frame = torch.cat(list(decode_tiled_iter(local, zl, tile=tile, overlap=overlap)), dim=2)
    assert by_tile.shape == ref.shape
    scale = ref.abs().max()
    assert (by_tile - ref).abs().max() < 1e-5 * scale
    assert (by_frame - ref).abs().max() < 1e-5 * scale


def test_both_orders_give_the_same_frames(golden, z, tiled_outputs):
    with torch.inference_mode():
        by_frame = torch.cat(list(decode_tiled_iter(golden, z, tile=(1, 16), overlap=4)), dim=2)
    assert (tiled_outputs["golden", 16] - by_frame).abs().max() < 1e-6


# ---- approximation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["golden", "random"])
def test_differences_stay_within_the_tail_receptive_field(name, golden, random_tok, references, tiled_outputs):
    tok, ref = _tok(name, golden, random_tok), references[name]
    reach = tail_receptive_field(tok.config)
    assert reach == 99  # released layout: 4 levels, 2 res blocks, 16 px per latent cell
    sf = tok.config.spatial_factor
    tile_w, overlap = 24, 4
    out = tiled_outputs[name, tile_w]
    starts = tile_starts(40, tile_w, overlap)
    inner_borders = [s * sf for s in starts[1:]] + [(s + tile_w) * sf for s in starts[:-1]]
    column = torch.arange(40 * sf, dtype=torch.float64) + 0.5
    distance = torch.stack([(column - b).abs() for b in inner_borders]).amin(0)
    err = (out - ref).abs().amax(dim=(0, 1, 2, 3))  # per pixel column
    far = distance > reach
    scale = ref.abs().max()
    assert far.sum() > 100
    assert err[far].max() < 1e-5 * scale  # float32 rounding (conv kernels may block a tile differently)
    assert err[~far].max() > 1e-3 * scale  # the borders do differ: the check above is not vacuous


@pytest.mark.parametrize("name", ["golden", "random"])
@pytest.mark.parametrize("tile", [16, 24])
def test_tiled_is_close_to_untiled(name, tile, references, tiled_outputs):
    ref, out = references[name], tiled_outputs[name, tile]
    scale = ref.abs().max()
    diff = (out - ref).abs()
    assert diff.max() <= 0.10 * scale
    assert diff.mean() <= 0.002 * scale


# ---- layout ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [5, 12, 15, 30, 53, 64])
@pytest.mark.parametrize("tile,overlap", [(4, 1), (8, 2), (8, 4), (12, 3), (16, 4), (16, 0)])
def test_tile_starts_cover_with_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    if tile >= size:
        assert starts == [0]
        return
    assert starts[0] == 0 and starts[-1] == size - tile
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(0 < g <= tile - overlap for g in gaps)  # covered, overlapping by >= overlap
    assert max(gaps) - min(gaps) <= 1  # evenly spread
    assert len(starts) == 1 + -(-(size - tile) // (tile - overlap))  # the fewest tiles that achieve it


def test_ramps_sum_to_one_where_two_tiles_meet():
    for starts, tile in (([0, 6, 12], 8), ([0, 12, 24], 16), ([0, 5, 11, 16], 8)):
        total = torch.zeros((starts[-1] + tile) * 16, dtype=torch.float64)
        for s, w in zip(starts, tiled._ramps(starts, tile, 16)):
            total[s * 16 : (s + tile) * 16] += w
        assert torch.allclose(total, torch.ones_like(total), atol=1e-12, rtol=0)


# ---- interface ----------------------------------------------------------------------------------------------------
def test_progress_and_dtypes(golden, z):
    calls = []
    small = z[:, :, :2, :, :12]
    with torch.inference_mode():
        out = decode_tiled(golden, small, tile=(1, 8), overlap=2, progress=lambda d, n: calls.append((d, n)),
                           out_dtype=torch.float64)
    tiles = len(tile_starts(12, 8, 2))
    assert out.dtype == torch.float64 and out.shape == (1, 3, 5, 16, 192)
    assert calls[-1] == (2 * (1 + tiles), 2 * (1 + tiles)) and len(calls) == 2 * (1 + tiles)

    half = HBQTokenizer(golden.config).to(torch.bfloat16).eval()
    half.load_state_dict(golden.state_dict())
    with torch.inference_mode():
        assert decode_tiled(half, small, tile=(1, 8), overlap=2).dtype == torch.bfloat16
        untiled = decode_tiled(half, small, out_dtype=torch.float32)
        assert untiled.dtype == torch.float32
        assert torch.equal(untiled, half.decode(small).float())


@pytest.mark.parametrize("kwargs,match", [
    (dict(tile=0), "positive int"),
    (dict(tile=(4,)), "positive int"),
    (dict(tile=(4, 2.5)), "positive int"),
    (dict(tile=4, overlap=-1), "overlap"),
    (dict(tile=(1, 6), overlap=4), "at most half the tile"),
])
def test_bad_arguments_raise(golden, z, kwargs, match):
    with pytest.raises(ValueError, match=match):
        decode_tiled(golden, z, **kwargs)
    with pytest.raises(ValueError, match=match):
        next(decode_tiled_iter(golden, z, **kwargs))


def test_wrong_latents_raise(golden):
    with pytest.raises(ValueError, match="z_dim=8"):
        decode_tiled(golden, torch.zeros(1, 16, 1, 4, 4), tile=2, overlap=1)


# ---- memory -------------------------------------------------------------------------------------------------------
def _accounting():
    spec = importlib.util.spec_from_file_location("memory_accounting", BENCHMARKS / "memory_accounting.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MID = TokenizerConfig(dim=16, dec_dim=32, z_dim=16)
GRID = (16, 24)


def test_peak_memory_does_not_grow_with_frames_and_tiles_bound_it():
    """Tensor storage traced on the meta device (no allocation): 3 vs 4 latent frames (9 vs 13 pixel frames; from
    the third latent frame on, every cache is full; benchmarks/tokenizer_decode.py measures 9 vs 33 in RSS)."""
    acc = _accounting()
    whole = [acc.tracked_decode_bytes(MID, torch.float32, GRID, n) for n in (3, 4)]
    streamed = [acc.tracked_decode_bytes(MID, torch.float32, GRID, n, tile=12) for n in (3, 4)]
    by_tile = [acc.tracked_tile_by_tile_bytes(MID, torch.float32, GRID, 8, latent_frames=n) for n in (3, 4)]
    assert whole[0] == whole[1] and streamed[0] == streamed[1] and by_tile[0] == by_tile[1]
    assert by_tile[0] < 0.5 * whole[0]  # decode_tiled: one tile's cache and activations (+ a whole-frame stem)
    assert streamed[0] < 1.3 * whole[0]  # decode_tiled_iter keeps every tile's cache: not bounded by the tile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimate_covers_the_traced_peak(dtype):
    acc = _accounting()
    for tile, traced in ((None, acc.tracked_decode_bytes(MID, dtype, GRID, 3)),
                         (12, acc.tracked_decode_bytes(MID, dtype, GRID, 3, tile=12))):
        estimate = estimate_decode_memory(MID, GRID, tile, overlap=4, dtype=dtype, order="frames").total
        assert traced <= estimate <= 1.3 * traced, (tile, traced, estimate)
    traced = acc.tracked_tile_by_tile_bytes(MID, dtype, GRID, 8, latent_frames=3)
    estimate = estimate_decode_memory(MID, GRID, 8, overlap=4, dtype=dtype, order="tiles").total
    assert traced <= estimate <= 1.3 * traced, ("tiles", traced, estimate)


def test_choose_tile_fits_the_budget():
    config, grid = TokenizerConfig(), (30, 53)  # released sizes, 480x848
    whole = estimate_decode_memory(config, grid, None, dtype=torch.bfloat16).total
    assert choose_tile(config, grid, whole + 1, dtype=torch.bfloat16) is None
    budget = whole // 4
    tile = choose_tile(config, grid, budget, dtype=torch.bfloat16)
    assert tile is not None and tile[0] * tile[1] < grid[0] * grid[1]
    assert estimate_decode_memory(config, grid, tile, dtype=torch.bfloat16).total <= budget
    with pytest.raises(ValueError, match="GiB"):
        choose_tile(config, grid, 10 * 2**20, dtype=torch.bfloat16)


def test_out_of_memory_says_what_to_change(golden, z, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield  # a generator, like decode_iter

    monkeypatch.setattr(golden, "decode_iter", no_memory)
    with pytest.raises(torch.OutOfMemoryError, match=r"decode in tiles \(tile=.*out_device='cpu'"):
        decode_tiled(golden, z)
    monkeypatch.setattr(tiled, "decode_tail", lambda *a, **k: no_memory().__next__())
    with pytest.raises(torch.OutOfMemoryError, match=r"16x16-cell tiles: use smaller tiles \(e\.g\. tile=\(8, 8\)\)"):
        decode_tiled(golden, torch.zeros(1, 8, 1, 20, 20), tile=16)
    with pytest.raises(torch.OutOfMemoryError, match="smaller tiles"):
        next(decode_tiled_iter(golden, torch.zeros(1, 8, 1, 20, 20), tile=16))
