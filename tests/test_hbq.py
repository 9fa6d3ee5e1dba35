"""HBQ: quantization rule, layouts (round-major bits, MSB-first indices) and both one-hot orderings."""

import pytest
import torch

from grn_core import hbq


def reference_bits(z: torch.Tensor, rounds: int) -> torch.Tensor:
    """The official per-round loop, element by element, for a 1-D tensor of values -> [rounds, n] bits."""
    out = torch.zeros(rounds, z.numel(), dtype=torch.uint8)
    for i, value in enumerate(z.tolist()):
        q = 0.0
        for r in range(rounds):
            bit = value > q
            out[r, i] = int(bit)
            q += 0.5 ** (r + 1) if bit else -(0.5 ** (r + 1))
    return out


def test_hand_made_value():
    # 0.3: >0 -> 1 (q 0.5); >0.5 -> 0 (q 0.25); >0.25 -> 1 (q 0.375); >0.375 -> 0 (q 0.3125)
    z = torch.tensor([[0.3, -0.8, 0.0]])  # [B=1, d=3]
    bits = hbq.features_to_bits(z, rounds=4)
    assert bits.dtype == torch.uint8 and bits.shape == (1, 12)
    per_round = bits.view(1, 4, 3)
    assert per_round[0, :, 0].tolist() == [1, 0, 1, 0]
    assert per_round[0, :, 1].tolist() == [0, 0, 0, 1]  # -0.8: q -0.5, -0.75, -0.875, then > -0.875 -> 1
    assert per_round[0, :, 2].tolist() == [0, 1, 1, 1]  # exactly on a threshold the bit is 0 (strict >)
    zq = hbq.bits_to_features(bits, rounds=4)
    assert zq.tolist()[0] == pytest.approx([0.3125, -0.8125, -0.0625])
    idx = hbq.bits_to_indices(bits, rounds=4)
    assert idx.tolist() == [[0b1010, 0b0001, 0b0111]]
    assert torch.equal(hbq.indices_to_bits(idx, rounds=4), bits)


def test_round_major_layout_matches_official_loop():
    torch.manual_seed(0)
    b, d, rounds = 2, 5, 4
    z = torch.tanh(torch.randn(b, d, 3, 4) * 2)
    bits = hbq.features_to_bits(z, rounds)
    assert bits.shape == (b, rounds * d, 3, 4)
    ref = reference_bits(z.movedim(1, -1).reshape(-1), rounds)  # [rounds, b*3*4*d], channel fastest
    ours = bits.view(b, rounds, d, 3, 4).permute(1, 0, 3, 4, 2).reshape(rounds, -1)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("rounds", [1, 2, 4, 7])
@pytest.mark.parametrize("shape", [(3, 6), (2, 4, 5), (1, 8, 2, 3, 3)])
def test_round_trips_and_error_bound(rounds, shape):
    torch.manual_seed(rounds)
    z = torch.rand(shape, dtype=torch.float64) * 2 - 1
    bits = hbq.features_to_bits(z, rounds)
    assert bits.shape == (shape[0], rounds * shape[1], *shape[2:])
    zq = hbq.bits_to_features(bits, rounds, dtype=torch.float64)
    assert zq.shape == z.shape
    assert float((z - zq).abs().max()) <= 2.0**-rounds
    # zq is a fixed point: quantizing the dequantized value gives the same bits.
    assert torch.equal(hbq.features_to_bits(zq, rounds), bits)
    idx = hbq.bits_to_indices(bits, rounds)
    assert idx.dtype == torch.long and idx.shape == z.shape and int(idx.max()) < 2**rounds
    assert torch.equal(hbq.indices_to_bits(idx, rounds), bits)
    assert torch.equal(hbq.features_to_indices(z, rounds), idx)
    assert torch.equal(hbq.indices_to_features(idx, rounds, dtype=torch.float64), zq)


def test_every_index_maps_to_its_msb_first_bits():
    idx = torch.arange(16).view(1, 16)
    bits = hbq.indices_to_bits(idx, rounds=4).view(4, 16)
    for value in range(16):
        assert bits[:, value].tolist() == [(value >> (3 - r)) & 1 for r in range(4)]
    # Index order is value order: larger index -> larger dequantized feature.
    zq = hbq.indices_to_features(idx, rounds=4)[0]
    assert torch.all(zq[1:] > zq[:-1])


def test_dequantize_is_exact_in_half_types():
    bits = hbq.features_to_bits(torch.linspace(-0.99, 0.99, 50).view(1, 1, 50), rounds=4)
    ref = hbq.bits_to_features(bits, 4, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(hbq.bits_to_features(bits, 4, dtype=dtype).double(), ref)


def test_bits_one_hot_is_label_major():
    bits = torch.tensor([[1, 0, 1]], dtype=torch.uint8).view(1, 3, 1, 1)  # [B, C=3, h, w]
    hot = hbq.bits_one_hot(bits)
    assert hot.shape == (1, 6, 1, 1) and hot.dtype == torch.float32
    # channel label*2 + class
    assert hot.view(6).tolist() == [0, 1, 1, 0, 0, 1]
    assert torch.equal(hot, hbq.labels_one_hot(bits.long(), 2, order="label_major"))
    video = torch.randint(0, 2, (2, 8, 3, 4, 5), dtype=torch.uint8)
    hot = hbq.bits_one_hot(video, dtype=torch.bfloat16)
    assert hot.shape == (2, 16, 3, 4, 5)
    assert torch.equal(hot[:, 1::2].to(torch.uint8), video) and torch.equal(hot[:, 0::2].to(torch.uint8), 1 - video)


def test_indices_one_hot_is_class_major():
    d, k = 3, 16
    idx = torch.tensor([5, 0, 15]).view(1, d, 1, 1)
    hot = hbq.indices_one_hot(idx, rounds=4)
    assert hot.shape == (1, k * d, 1, 1)
    on = hot.view(-1).nonzero().view(-1).tolist()
    # channel class*D + label
    assert on == sorted([5 * d + 0, 0 * d + 1, 15 * d + 2])
    torch.manual_seed(0)
    idx = torch.randint(0, k, (2, 4, 6, 7))
    hot = hbq.indices_one_hot(idx, rounds=4).view(2, k, 4, 6, 7)
    assert torch.equal(hot.argmax(dim=1), idx) and torch.equal(hot.sum(dim=1), torch.ones(2, 4, 6, 7))


def test_class_major_logits_reader():
    b, h, w, k, d = 2, 3, 4, 16, 5
    # value encodes (token, class, channel) so the reshuffle can be checked entry by entry
    tok = torch.arange(h * w).view(1, h * w, 1)
    cls = torch.arange(k).repeat_interleave(d).view(1, 1, k * d)
    ch = torch.arange(d).repeat(k).view(1, 1, k * d)
    x = (tok * 10000 + cls * 100 + ch).expand(b, -1, -1).double()
    out = hbq.class_major_logits(x, h, w, k)
    assert out.shape == (b, k, d, h, w)
    for kk, c, y, xx in [(0, 0, 0, 0), (15, 4, 2, 3), (7, 2, 1, 0), (3, 1, 0, 2)]:
        assert out[1, kk, c, y, xx] == (y * w + xx) * 10000 + kk * 100 + c


def test_errors():
    with pytest.raises(ValueError, match="multiple of rounds=4"):
        hbq.bits_to_features(torch.zeros(1, 10, 2, 2, dtype=torch.uint8), rounds=4)
    with pytest.raises(ValueError, match="rounds=0"):
        hbq.features_to_bits(torch.zeros(1, 2), rounds=0)
    with pytest.raises(ValueError, match="outside 0..15"):
        hbq.indices_to_bits(torch.tensor([[16]]), rounds=4)
    with pytest.raises(ValueError, match="integer class labels"):
        hbq.indices_one_hot(torch.zeros(1, 2, 2, 2), rounds=4)
    with pytest.raises(ValueError, match="0/1"):
        hbq.bits_one_hot(torch.full((1, 2), 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="float features"):
        hbq.features_to_bits(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="h\\*w=12"):
        hbq.class_major_logits(torch.zeros(1, 10, 32), 3, 4, 16)
