"""Chunked causal execution of the tokenizer: streaming decode, causality, bounded caches, input errors."""

import pytest
import torch

import grn_core.tokenizer.vae as vae_module
from grn_core.tokenizer import CausalCache, HBQTokenizer, infer_tokenizer_config
from tests._golden import load_golden


@pytest.fixture(scope="module")
def tok():
    weights = load_golden("tokenizer_weights.safetensors")
    model = HBQTokenizer(infer_tokenizer_config(weights))
    model.load_state_dict(weights, strict=True)
    return model.double().eval()


@pytest.fixture(scope="module")
def video():
    gen = torch.Generator().manual_seed(0)
    # smooth-ish random clip: 13 frames = 1 + 4*3, 32x48 pixels
    x = torch.rand(1, 3, 13, 8, 12, generator=gen, dtype=torch.float64) * 2 - 1
    return torch.nn.functional.interpolate(x, size=(13, 32, 48), mode="trilinear")


@pytest.fixture(scope="module")
def latents(tok, video):
    with torch.inference_mode():
        return tok.encode(video)


def test_shapes_of_a_13_frame_clip(latents):
    assert latents.shape == (1, 8, 4, 2, 3)
    assert float(latents.abs().max()) < 1


def test_decode_equals_decode_iter_chunks(tok, latents):
    with torch.inference_mode():
        chunks = list(tok.decode_iter(latents))
        full = tok.decode(latents)
    assert [c.shape[2] for c in chunks] == [1, 4, 4, 4]
    assert full.shape == (1, 3, 13, 32, 48)
    assert torch.equal(torch.cat(chunks, dim=2), full)


def test_encode_is_causal(tok, video, latents):
    """The first 1+4k frames fix the first 1+k latent frames, whatever follows."""
    with torch.inference_mode():
        prefix = tok.encode(video[:, :, :9])
        changed_tail = video.clone()
        changed_tail[:, :, 9:] = -changed_tail[:, :, 9:]
        other = tok.encode(changed_tail)
    assert torch.allclose(prefix, latents[:, :, :3], rtol=0, atol=1e-12)
    assert torch.allclose(other[:, :, :3], latents[:, :, :3], rtol=0, atol=1e-12)
    assert not torch.allclose(other[:, :, 3:], latents[:, :, 3:])


def test_decode_is_causal(tok, latents):
    with torch.inference_mode():
        full = tok.decode(latents)
        prefix = tok.decode(latents[:, :, :2])
        first = tok.decode(latents[:, :, 0])  # a 4-D latent decodes as one frame
    assert prefix.shape[2] == 5 and first.shape == (1, 3, 1, 32, 48)
    assert torch.allclose(prefix, full[:, :, :5], rtol=0, atol=1e-12)
    assert torch.allclose(first, full[:, :, :1], rtol=0, atol=1e-12)


def test_batch_entries_are_independent(tok, video):
    with torch.inference_mode():
        pair = torch.cat([video[:, :, :5], video[:, :, 5:10].flip(2)])
        z_pair = tok.encode(pair)
        z_one = tok.encode(pair[1:])
        rec_pair = tok.decode(z_pair)
        rec_one = tok.decode(z_one)
    assert torch.allclose(z_pair[1:], z_one, rtol=0, atol=1e-12)
    assert torch.allclose(rec_pair[1:], rec_one, rtol=0, atol=1e-12)


def test_caches_hold_at_most_two_frames(tok, latents, video, monkeypatch):
    """Memory is bounded: no layer keeps more than two past frames, however long the clip."""
    seen = []

    class RecordingCache(CausalCache):
        def set(self, layer, value):
            seen.append(value.shape[2])
            super().set(layer, value)

    monkeypatch.setattr(vae_module, "CausalCache", RecordingCache)
    with torch.inference_mode():
        tok.encode(video)
        list(tok.decode_iter(latents))
    assert seen and max(seen) <= 2


def test_encode_bits_and_decode_bits(tok, video):
    with torch.inference_mode():
        bits = tok.encode_bits(video[:, :, :5])
        rec = tok.decode_bits(bits)
    assert bits.dtype == torch.uint8 and bits.shape == (1, 32, 2, 2, 3)
    assert rec.shape == (1, 3, 5, 32, 48)


@pytest.mark.parametrize(
    "shape, fill, message",
    [
        ((1, 3, 10, 32, 48), 0.0, "T=10 frames: the causal tokenizer needs 1\\+4k frames; use 9 or 13"),
        ((1, 3, 5, 40, 48), 0.0, "H=40: .*multiples of 16.*32 or 48"),
        ((1, 3, 32, 50), 0.0, "W=50: .*48 or 64"),
        ((1, 4, 1, 32, 48), 0.0, "4 channels at dim 1"),
        ((1, 32, 48, 3), 0.5, "channel-last"),
        ((1, 3, 32, 48), 255.0, "x / 127.5 - 1"),
        ((1, 3, 32, 48), float("nan"), "NaN"),
        ((3, 32, 48), 0.0, "shape \\(3, 32, 48\\)"),
    ],
)
def test_bad_pixels_raise(tok, shape, fill, message):
    with pytest.raises(ValueError, match=message):
        tok.encode(torch.full(shape, fill, dtype=torch.float64))


def test_bad_latents_raise(tok):
    with pytest.raises(ValueError, match="\\[B, 8, t, h, w\\]"):
        tok.decode(torch.zeros(1, 16, 2, 2, 3))
    with pytest.raises(ValueError, match="decode_bits"):
        tok.decode(torch.zeros(1, 32, 2, 2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(torch.zeros(1, 3, 32, 48, dtype=torch.uint8))
