"""The pipeline stages compose: prompt → features → tokens → frames, with seeds, I2V and clear errors.

The model is the official golden refiner (d = 8, 32-wide text) with the golden tokenizer (d = 8): random weights,
so these tests check plumbing, shapes, determinism and errors, not picture quality.
"""

import hashlib

import pytest
import torch

from grn_core import hbq
from grn_core.checkpoints import load_c2i, load_refiner, load_tokenizer
from grn_core.pipeline import (
    GenerationRequest,
    GRNModel,
    decode_tokens,
    encode_prompt,
    format_prompt,
    generate_class_tokens,
    generate_tokens,
    latent_grid_for,
)
from grn_core.sampler import C2ISettings, SamplerSettings
from grn_core.tokenizer import HBQTokenizer, TokenizerConfig
from tests._golden import GOLDEN


class WordHashEncoder:
    """A deterministic stand-in text encoder: one pseudo-random row per word, plus an end row."""

    def __init__(self, dim: int = 32):
        self.dim = dim
        self.calls: list[str] = []

    def _row(self, word: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def encode(self, prompt: str, allow_empty: bool = False) -> torch.Tensor:
        if not prompt.strip() and not allow_empty:
            raise ValueError("empty prompt")
        self.calls.append(prompt)
        return torch.stack([self._row(w) for w in prompt.split()] + [self._row("</s>")])


@pytest.fixture(scope="module")
def model() -> GRNModel:
    refiner = load_refiner(GOLDEN / "refiner_joint_weights.safetensors", layout="joint")
    tokenizer = load_tokenizer(GOLDEN / "tokenizer_weights.safetensors")
    return GRNModel(refiner, tokenizer, ("t2v", "i2v", "t2i"), name="golden")


FAST = SamplerSettings(steps=3, guidance=3.0)


def test_text_to_video_end_to_end_is_seeded(model):
    encoder = WordHashEncoder()
    feats = encode_prompt(model, encoder, "a red circle", task="t2v")
    assert encoder.calls == ["<T2V>a red circle high aesthetic and high quality video.", ""]
    request = GenerationRequest(width=64, height=48, frames=9, seed=7, settings=FAST)
    first = generate_tokens(model, feats, request)
    again = generate_tokens(model, feats, request)
    other = generate_tokens(model, feats, GenerationRequest(width=64, height=48, frames=9, seed=8, settings=FAST))
    assert first.bits.shape == (1, 32, 3, 3, 4)
    assert torch.equal(first.bits, again.bits)
    assert not torch.equal(first.bits, other.bits)
    assert first.sampling.nfe == [6]  # 3 steps × (cond + uncond)
    frames = decode_tokens(model, first)
    assert frames.shape == (1, 9, 48, 64, 3)
    assert frames.dtype == torch.float32 and 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0


def test_decode_tiles_bound_memory_and_check_their_input(model):
    bits = torch.randint(0, 2, (1, 32, 2, 3, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    whole = decode_tokens(model, bits, tile=None)
    assert whole.shape == (1, 5, 48, 64, 3)
    assert torch.equal(decode_tokens(model, bits), whole)  # "auto" on a CPU: whole frames
    assert torch.equal(decode_tokens(model, bits, tile=4), whole)  # a tile covering the grid
    tiled = decode_tokens(model, bits, tile=2, overlap=4)  # overlap clamped to half the tile
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)
    assert (tiled - whole).abs().mean() < 0.1  # seams only
    with pytest.raises(ValueError, match=r"tile=-1: use 'auto', 0 / None"):
        decode_tokens(model, bits, tile=-1)
    with pytest.raises(ValueError, match=r"tokens have shape \(1, 16, 2, 3, 4\).*\[B, 32, t, h, w\]"):
        decode_tokens(model, bits[:, :16])


def test_guidance_one_skips_the_negative_prompt(model):
    encoder = WordHashEncoder()
    feats = encode_prompt(model, encoder, "a blue square", task="t2i", need_uncond=False)
    assert feats.uncond is None
    tokens = generate_tokens(model, feats, GenerationRequest(64, 32, 1, settings=SamplerSettings(steps=2, guidance=1.0)))
    assert tokens.sampling.nfe == [2]
    assert decode_tokens(model, tokens).shape == (1, 1, 32, 64, 3)


def test_image_to_video_keeps_the_given_frame(model):
    encoder = WordHashEncoder()
    feats = encode_prompt(model, encoder, "a green triangle", task="i2v")
    image = torch.rand(3, 48, 64) * 2 - 1
    tokens = generate_tokens(model, feats, GenerationRequest(64, 48, 9, seed=1, settings=FAST), first_frame=image)
    expected = hbq.features_to_bits(model.tokenizer.encode(image[None]), 4)
    assert torch.equal(tokens.bits[:, :, :1], expected)
    assert tokens.bits.shape == (1, 32, 3, 3, 4)


@pytest.mark.parametrize(
    "kwargs, first_frame, message",
    [
        (dict(width=60, height=48, frames=9), None, "width 60 is not a positive multiple of 16"),
        (dict(width=64, height=48, frames=10), None, "1 \\+ 4k frames"),
        (dict(width=64, height=48, frames=9), torch.zeros(3, 32, 64), "resize or crop"),
        (dict(width=64, height=48, frames=9), torch.full((3, 48, 64), 2.0), "\\[-1, 1\\]"),
    ],
)
def test_bad_requests_fail_before_sampling(model, kwargs, first_frame, message):
    task = "i2v" if first_frame is not None else "t2v"
    feats = encode_prompt(model, WordHashEncoder(), "a dot", task=task)
    with pytest.raises(ValueError, match=message):
        generate_tokens(model, feats, GenerationRequest(**kwargs, settings=FAST), first_frame=first_frame)


def test_prompt_errors(model):
    with pytest.raises(ValueError, match="prompt is empty"):
        encode_prompt(model, WordHashEncoder(), "   ", task="t2v")
    with pytest.raises(ValueError, match="16-wide but golden expects 32"):
        encode_prompt(model, WordHashEncoder(dim=16), "a dot", task="t2v")
    with pytest.raises(ValueError, match="needs a text encoder"):
        encode_prompt(model, None, "a dot", task="t2v")
    with pytest.raises(ValueError, match="unknown task"):
        encode_prompt(model, WordHashEncoder(), "a dot", task="x2y")


def test_i2v_on_a_joint_model_not_trained_for_it_runs_with_a_warning(model, caplog):
    """The official code lets any joint-layout refiner take a first frame; we allow it too, and say so."""
    only_t2v = GRNModel(model.refiner, model.tokenizer, ("t2v",), name="t2v-only")
    with caplog.at_level("WARNING"):
        feats = encode_prompt(only_t2v, WordHashEncoder(), "a dot", task="i2v")
    assert feats.task == "i2v"
    assert any("not trained for image-to-video" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="does not do T2I"):
        encode_prompt(only_t2v, WordHashEncoder(), "a dot", task="t2i")


def test_prompt_templates_follow_the_layout():
    assert format_prompt(" a cat ", "t2i", "joint") == "<T2I>a cat"
    assert format_prompt("a cat", "t2v", "prefix") == "a cat. masterpiece, high quality."


def test_mismatched_tokenizer_is_named():
    refiner = load_refiner(GOLDEN / "refiner_joint_weights.safetensors", layout="joint")
    with torch.device("meta"):
        wrong = HBQTokenizer(TokenizerConfig(dim=8, dec_dim=8, z_dim=16))
    with pytest.raises(ValueError, match="8-channel latents but the tokenizer has 16"):
        GRNModel(refiner, wrong, ("t2v",))


def test_latent_grid_for_video(model):
    assert latent_grid_for(model, 848, 480, 33) == (9, 30, 53)


def test_class_to_image_tokens_decode():
    net = load_c2i(GOLDEN / "c2i_weights.safetensors", in_context_start=1)
    torch.manual_seed(0)
    tokenizer = HBQTokenizer(TokenizerConfig(dim=8, dec_dim=8, z_dim=4)).eval()
    model = GRNModel(net, tokenizer, ("c2i",), name="c2i")
    tokens = generate_class_tokens(model, [3, 10], seed=5, settings=C2ISettings(steps=3))
    assert tokens.bits.shape == (2, 16, 1, 8, 8)
    assert decode_tokens(model, tokens).shape == (2, 1, 128, 128, 3)
    with pytest.raises(ValueError, match="outside 0..9"):
        generate_class_tokens(model, [11])


def test_latent_grid_refuses_absurd_sides_with_a_size_error(model):
    """A side of 10**400 is a ValueError naming the size (float conversion of it would overflow)."""
    from grn_core.pipeline import latent_grid_for

    with pytest.raises(ValueError):
        latent_grid_for(model, 10**400 + 1, 64, 1)
