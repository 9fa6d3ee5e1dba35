"""The shapes judge: accuracy on clean and degraded generator output, input layouts, edge cases."""

import numpy as np
import pytest
import torch

from grn_core.data.judge import STATIC, caption_accuracy, judge
from grn_core.data.shapes import ShapesDataset, image_captions, sample_clip, sample_image, video_captions


def _degrade(x: torch.Tensor, noise: float, blur: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur (sigma ``blur`` px, per frame, edges replicated) then Gaussian noise (std ``noise`` in
    [-1, 1] units), clamped to [-1, 1]. numpy for the blur: independent of the judge's own blur code."""
    if blur > 0:
        radius = int(np.ceil(2 * blur))
        k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / blur) ** 2)
        k = k / k.sum()
        a = x.numpy().astype(np.float64)
        h, w = a.shape[-2:]
        pad = [(0, 0)] * (a.ndim - 2) + [(radius, radius), (radius, radius)]
        a = np.pad(a, pad, mode="edge")
        a = sum(k[i] * a[..., i:i + h, :] for i in range(2 * radius + 1))
        a = sum(k[i] * a[..., :, i:i + w] for i in range(2 * radius + 1))
        x = torch.from_numpy(a.astype(np.float32))
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1)


def _accuracy(captions, seeds, noise=0.0, blur=0.0):
    totals = {"color": 0, "shape": 0, "direction": 0, "all": 0}
    n = 0
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        for caption in captions:
            s = sample_clip(g, caption) if "moving" in caption else sample_image(g, caption)
            x = _degrade(s.pixels, noise, blur, g)
            for k, hit in judge(x).matches(caption).items():
                totals[k] += hit
            n += 1
    return {k: v / n for k, v in totals.items()}


def test_clean_accuracy_every_caption():
    # Each attribute separately, over all 72 video captions x 4 seeds and all 18 image captions x 4 seeds.
    video = _accuracy(video_captions(), seeds=(0, 1, 2, 3))
    image = _accuracy(image_captions(), seeds=(4, 5, 6, 7))
    for name, acc in (("video", video), ("image", image)):
        for attribute, value in acc.items():
            assert value >= 0.99, f"{name} {attribute} accuracy {value:.3f} on clean clips"


@pytest.mark.parametrize("noise, blur", [(0.1, 0.7), (0.2, 1.0)])
def test_accuracy_under_noise_and_blur(noise, blur):
    # noise: std in [-1, 1] units; blur: Gaussian sigma in pixels (a 32 x 32 shape is 8-13 px wide).
    acc = _accuracy(video_captions(), seeds=(8, 9), noise=noise, blur=blur)
    for attribute, value in acc.items():
        assert value >= 0.99, f"{attribute} accuracy {value:.3f} at noise {noise}, blur {blur}"
    images = _accuracy(image_captions(), seeds=(10, 11), noise=noise, blur=blur)
    assert images["all"] >= 0.97, f"image accuracy {images} at noise {noise}, blur {blur}"


def test_heavy_degradation_degrades_gracefully():
    # Beyond "mild": small blurred shapes become ambiguous, but colour and motion stay readable.
    acc = _accuracy(video_captions(), seeds=(12,), noise=0.3, blur=1.2)
    assert acc["color"] >= 0.99 and acc["direction"] >= 0.99 and acc["shape"] >= 0.85, acc


def test_images_and_single_frames_are_static():
    s = sample_image(torch.Generator().manual_seed(0), "a green square")
    assert judge(s.pixels).direction == STATIC and judge(s.pixels).caption == "a green square"
    clip = sample_clip(torch.Generator().manual_seed(0), "a red circle moving left").pixels
    still = clip[:, :1].expand_as(clip)  # the first frame held for the whole clip
    verdict = judge(still)
    assert verdict.direction == STATIC and verdict.shape == "circle" and verdict.color == "red"


def test_uint8_frames_and_numpy_input():
    s = sample_clip(torch.Generator().manual_seed(4), "a white triangle moving up")
    frames = ((s.pixels.permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8)  # [T, H, W, 3]
    assert judge(frames).caption == s.caption
    assert judge(frames.numpy()).caption == s.caption
    assert judge(s.pixels.numpy().astype(np.float64)).caption == s.caption
    assert judge(frames[0]).caption == "a white triangle"  # one uint8 image [H, W, 3]


def test_dim_shape_on_grey_background():
    # Generated clips may be dimmer or have a lifted background; both are normalised away.
    s = sample_clip(torch.Generator().manual_seed(5), "a blue square moving right")
    dim_grey = (s.pixels + 1) * 0.35 - 0.6  # background -0.6, shape at 35 % brightness
    verdict = judge(dim_grey)
    assert verdict.caption == s.caption
    assert all(0.0 <= c <= 1.0 for c in verdict.confidence.values())


def test_track_and_size_estimates():
    s = sample_clip(torch.Generator().manual_seed(6), "a magenta circle moving down")
    verdict = judge(s.pixels)
    assert np.allclose(verdict.positions, np.array(s.label.positions), atol=0.05)  # circle centroid = centre
    assert verdict.size == pytest.approx(s.label.size, rel=0.1)
    assert verdict.confidence["shape"] > 0.5 and verdict.confidence["direction"] > 0.9


def test_empty_clip_is_not_found():
    verdict = judge(torch.full((3, 9, 32, 32), -1.0))
    assert not verdict.found and verdict.caption is None and verdict.direction is None
    assert verdict.matches("a red circle moving left") == {"color": False, "shape": False, "direction": False,
                                                           "all": False}
    assert np.isnan(verdict.positions).all()


def test_caption_accuracy_helper():
    batch = ShapesDataset(seed=9).batch(range(12))
    assert caption_accuracy(batch.pixels, batch.captions) == {"color": 1.0, "shape": 1.0, "direction": 1.0,
                                                              "all": 1.0}
    wrong = [c.replace(" moving ", " x ").split(" x ")[0] + " moving " + {"left": "right", "right": "left",
             "up": "down", "down": "up"}[c.split()[-1]] for c in batch.captions]
    acc = caption_accuracy(batch.pixels, wrong)
    assert acc["direction"] == 0.0 and acc["color"] == 1.0 and acc["all"] == 0.0
    with pytest.raises(ValueError):
        caption_accuracy([], [])


@pytest.mark.parametrize("bad", [
    torch.zeros(9, 32, 32, 3),  # float channels-last
    torch.zeros(2, 3, 9, 32, 32),  # a batch
    torch.zeros(3, 9, 32, 32, dtype=torch.int32),
    np.zeros((9, 32, 32, 4), dtype=np.uint8),
])
def test_bad_layouts_are_rejected(bad):
    with pytest.raises(ValueError):
        judge(bad)
