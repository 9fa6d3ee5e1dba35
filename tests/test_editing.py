"""The token map as a canvas (grn_core.editing, sample_bits' init_bits / fixed / start_step, the CLI's --init,
--strength, --mask, --extend, --save-tokens and `encode`) on the built-in tiny model (32x32, 9 frames)."""

import json

import numpy as np
import pytest
import torch

from grn_core.__main__ import main
from grn_core.editing import encode_source, extend_source, mask_to_cells, strength_to_start
from grn_core.media import write_frames
from grn_core.models import tiny_available

pytestmark = pytest.mark.skipif(not tiny_available(), reason="the built-in tiny model is not in this checkout")

STEPS = 8
SIZE = (32, 32, 9)  # width, height, frames


@pytest.fixture(scope="module")
def setup():
    from grn_core.models import load_tiny
    from grn_core.pipeline import encode_prompt
    from grn_core.request import resolve_settings

    torch.set_num_threads(1)
    model = load_tiny()
    feats = encode_prompt(model, None, "a red circle", task="t2v", need_uncond=True)
    settings = resolve_settings(model, "t2v", steps=STEPS)
    from grn_core.pipeline import GenerationRequest, decode_tokens, generate_tokens

    # The source: a picture the model could have made (decoded, then encoded again as a clip of frames).
    made = generate_tokens(model, feats, GenerationRequest(*SIZE, seed=11, settings=settings), preview=False)
    clip = (decode_tokens(model, made)[0] * 255).to(torch.uint8).numpy()
    source = encode_source(model, clip, SIZE[0], SIZE[1], SIZE[2])
    return model, feats, settings, source


def _generate(setup, **edit):
    from grn_core.pipeline import GenerationRequest, generate_tokens

    model, feats, settings, _ = setup
    seed, batch = edit.pop("seed", 1), edit.pop("batch_size", 1)
    request = GenerationRequest(SIZE[0], SIZE[1], SIZE[2], seed=seed, batch_size=batch, settings=settings, **edit)
    return generate_tokens(model, feats, request, preview=False)


def _count_calls(model, monkeypatch, check=None):
    calls = []
    original = model.refiner.step_logits

    def wrapper(bits, *args, **kwargs):
        calls.append(bits.shape[0])
        if check is not None:
            check(bits)
        return original(bits, *args, **kwargs)

    monkeypatch.setattr(model.refiner, "step_logits", wrapper)
    return calls


def half_mask():
    mask = torch.zeros(SIZE[1], SIZE[0])
    mask[:, SIZE[0] // 2:] = 1.0  # right half white: regenerate; left half black: keep
    return mask


def test_strength_maps_to_start_step():
    assert [strength_to_start(s, 8) for s in (1.0, 0.75, 0.5, 0.25, 0.0)] == [0, 2, 4, 6, 8]
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="strength"):
            strength_to_start(bad, 8)


def test_strength_zero_returns_the_source_without_a_network_pass(setup, monkeypatch):
    source = setup[3]
    calls = _count_calls(setup[0], monkeypatch)
    result = _generate(setup, init_bits=source, strength=0.0)
    assert calls == [] and result.sampling.model_calls == 0 and result.sampling.nfe == [0]
    assert torch.equal(result.bits, source)


def test_half_mask_keeps_its_half_exactly_at_every_step(setup, monkeypatch):
    model, _, _, source = setup
    kept = mask_to_cells(half_mask(), model.spatial_factor, model.temporal_factor, size=(SIZE[2], SIZE[1], SIZE[0]))
    assert kept.shape == (3, 4, 4) and kept[:, :, :2].all() and not kept[:, :, 2:].any()
    where = kept[None, None].expand_as(source)

    def check(bits):  # the map the refiner sees: kept bits are the source's at every step
        assert torch.equal(bits[where.expand_as(bits)], source.expand_as(bits)[where.expand_as(bits)])

    calls = _count_calls(model, monkeypatch, check)
    samples = []
    result = _generate(setup, init_bits=source, fixed=kept, strength=1.0)
    assert len(calls) == STEPS
    for t in range(3):  # every latent frame
        assert torch.equal(result.bits[:, :, t][where[:, :, t]], source[:, :, t][where[:, :, t]])
    assert (result.bits[~where] != source[~where]).float().mean() > 0.2  # the free half was regenerated
    # and in every step's full sample (through the preview hook of the loop)
    from grn_core.sampler import sample_bits

    def preview(bits):
        samples.append(bits.clone())

    sample_bits(model.refiner, setup[1].cond, setup[1].uncond, grid=(3, 4, 4), seed=3, settings=setup[2],
                init_bits=source, fixed=kept[None, None], preview_fn=preview, callback=lambda info: None)
    assert len(samples) == STEPS
    for bits in samples:
        assert torch.equal(bits[where], source[where])


def test_difference_grows_with_strength(setup):
    source = setup[3]
    diff = {s: (_generate(setup, init_bits=source, strength=s).bits != source).float().mean().item()
            for s in (0.25, 0.5, 1.0)}
    assert 0 < diff[0.25] < diff[0.5] < diff[1.0]


def test_seeds_reproduce_and_batch_items_equal_their_seed_alone(setup):
    source = setup[3]
    kept = mask_to_cells(half_mask(), 8, 4, size=(SIZE[2], SIZE[1], SIZE[0]))
    edit = dict(init_bits=source, fixed=kept, strength=0.5)
    batch = _generate(setup, seed=7, batch_size=2, **edit).bits
    assert torch.equal(batch, _generate(setup, seed=7, batch_size=2, **edit).bits)
    for k in range(2):
        assert torch.equal(batch[k:k + 1], _generate(setup, seed=7 + k, **edit).bits)


def test_plain_generation_is_unchanged_by_the_new_arguments(setup):
    from grn_core.sampler import sample_bits

    model, feats, settings, _ = setup
    args = dict(grid=(3, 4, 4), seed=5, settings=settings)
    plain = sample_bits(model.refiner, feats.cond, feats.uncond, **args).bits
    assert torch.equal(plain, sample_bits(model.refiner, feats.cond, feats.uncond, init_bits=None, fixed=None,
                                          start_step=0, **args).bits)


def test_masks_of_another_size_empty_and_all_white():
    warnings = []
    small = torch.zeros(16, 16)
    small[:, 8:] = 1
    kept = mask_to_cells(small, 8, 4, size=(9, 32, 32), warn=warnings.append)
    assert len(warnings) == 1 and "resizing" in warnings[0]
    assert kept[:, :, :2].all() and not kept[:, :, 2:].any()
    with pytest.raises(ValueError, match="all black"):
        mask_to_cells(torch.zeros(32, 32), 8, 4, size=(9, 32, 32), strength=0.5)
    assert mask_to_cells(torch.zeros(32, 32), 8, 4, size=(9, 32, 32), strength=0.0).all()
    assert not mask_to_cells(torch.ones(32, 32), 8, 4, size=(9, 32, 32)).any()


def test_mask_cells_rule_frames_and_grow():
    mask = torch.zeros(9, 32, 32)
    mask[0, 0, 0] = 1.0     # one white pixel in frame 0: cell (0, 0, 0) regenerated
    mask[4, 31, 31] = 0.6   # frame 4 belongs to latent frame 1 (frames 1..4)
    mask[5, 9, 9] = 0.4     # below 0.5: black
    kept = mask_to_cells(mask, 8, 4)
    assert not kept[0, 0, 0] and not kept[1, 3, 3] and kept[2].all() and kept.sum() == 3 * 16 - 2
    grown = mask_to_cells(mask, 8, 4, grow=1)
    assert not grown[0, :2, :2].any() and grown[0, 2:, :].all() and grown[2].all()


def test_refused_inputs(setup):
    source = setup[3]
    with pytest.raises(ValueError, match="init_bits"):
        _generate(setup, strength=0.5)
    with pytest.raises(ValueError, match="init_bits has shape"):
        _generate(setup, init_bits=source[:, :, :1])
    from grn_core.sampler import AdaptiveSteps, SamplerSettings
    from grn_core.sampler import sample_bits

    model, feats = setup[0], setup[1]
    settings = SamplerSettings(steps=8, adaptive=AdaptiveSteps(k=1.0, b=4.0, warmup=2, min_steps=4))
    with pytest.raises(ValueError, match="adaptive"):
        sample_bits(model.refiner, feats.cond, None, grid=(3, 4, 4), settings=settings.__class__(
            **{**settings.__dict__, "guidance": 1.0}), init_bits=source, start_step=3)


def test_extend_fixes_the_encoded_last_frame(setup):
    model, _, _, source = setup
    frame = torch.rand(3, 32, 32) * 2 - 1
    init, fixed = extend_source(model, frame, (3, 4, 4))
    assert fixed[0, 0, 0].all() and not fixed[0, 0, 1:].any()
    result = _generate(setup, init_bits=init, fixed=fixed)
    assert torch.equal(result.bits[:, :, :1], init[:, :, :1])


def _cli(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_cli_encode_init_mask_extend_and_save_tokens(tmp_path, capsys):
    from safetensors import safe_open

    from grn_core.models import load_tiny
    from grn_core.pipeline import encode_clip
    from grn_core.request import prepare_first_frame

    g = np.random.default_rng(0)
    video = g.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    src = tmp_path / "src.gif"
    write_frames(torch.from_numpy(video).float() / 255, src)
    from grn_core.media import read_video
    frames = read_video(src)
    common = ["--model", "tiny", "--device", "cpu", "--threads", "1", "--prompt", "a red circle", "--steps", "4"]

    tokens = tmp_path / "src.safetensors"
    rc, err = _cli(["encode", str(src), "--model", "tiny", "--device", "cpu", "--out", str(tokens)], capsys)
    assert rc == 0, err
    with safe_open(str(tokens), framework="pt") as handle:
        bits = handle.get_tensor("bits")
        assert handle.metadata()["grn_tokens"] == "1"
    assert bits.dtype == torch.uint8 and bits.shape == (1, 64, 3, 4, 4)
    assert json.loads(tokens.with_suffix(".json").read_text())["frames"] == "9"

    out, saved = tmp_path / "same.gif", tmp_path / "same.safetensors"
    rc, err = _cli(["generate", *common, "--init", str(tokens), "--strength", "0", "--out", str(out),
                    "--save-tokens", str(saved)], capsys)
    assert rc == 0, err
    with safe_open(str(saved), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("bits"), bits)

    mask = tmp_path / "mask.png"
    from PIL import Image
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(mask)
    rc, err = _cli(["generate", *common, "--init", str(src), "--mask", str(mask), "--out", str(tmp_path / "m.gif")],
                   capsys)
    assert rc == 2 and "\nerror: the mask is all black" in err and err.startswith("warning: the mask is 16x16")

    half = np.zeros((32, 32), np.uint8)
    half[:, 16:] = 255
    Image.fromarray(half).save(mask)
    saved = tmp_path / "masked.safetensors"
    rc, err = _cli(["generate", *common, "--init", str(src), "--mask", str(mask), "--strength", "0.5",
                    "--out", str(tmp_path / "m.gif"), "--save-tokens", str(saved)], capsys)
    assert rc == 0, err
    with safe_open(str(saved), framework="pt") as handle:
        masked = handle.get_tensor("bits")
    assert torch.equal(masked[..., :2], bits[..., :2])

    saved = tmp_path / "ext.safetensors"
    rc, err = _cli(["generate", *common, "--extend", str(src), "--out", str(tmp_path / "e.gif"),
                    "--save-tokens", str(saved)], capsys)
    assert rc == 0, err
    with safe_open(str(saved), framework="pt") as handle:
        extended = handle.get_tensor("bits")
    model = load_tiny()
    last = encode_clip(model, prepare_first_frame(frames[-1], 32, 32)[None, :, None])
    assert torch.equal(extended[:, :, :1], last)

    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file
    save_file({"bits": torch.zeros(1, 12, 3, 4, 4, dtype=torch.uint8)}, str(bad))
    rc, err = _cli(["generate", *common, "--init", str(bad), "--out", str(tmp_path / "b.gif")], capsys)
    assert rc == 2 and "bad.safetensors" in err and "12 bit channels" in err
    save_file({"bits": torch.zeros(1, 64, 0, 4, 4, dtype=torch.uint8)}, str(bad))
    rc, err = _cli(["generate", *common, "--init", str(bad), "--out", str(tmp_path / "b.gif")], capsys)
    assert rc == 2 and "bad.safetensors" in err
    rc, err = _cli(["generate", *common, "--strength", "0.5", "--out", str(tmp_path / "b.gif")], capsys)
    assert rc == 2 and "--init" in err
