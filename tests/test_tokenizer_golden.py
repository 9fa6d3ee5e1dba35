"""HBQ tokenizer vs the official implementation (tests/golden/tokenizer_*), through the public API only."""

import json

import pytest
import torch

from grn_core import hbq
from grn_core.tokenizer import (
    TOKENIZER_PRESETS,
    HBQTokenizer,
    TokenizerConfig,
    infer_tokenizer_config,
    tokenizer_preset,
)
from tests._golden import golden_meta, load_golden, rel_err

TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-3}
# float32 may flip a bit only where z sits this close to an HBQ threshold.
NEAR_THRESHOLD = 1e-4


@pytest.fixture(scope="module")
def weights():
    return load_golden("tokenizer_weights.safetensors")


@pytest.fixture(scope="module")
def io():
    return load_golden("tokenizer_io.safetensors")


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["fp64", "fp32"])
def run(request, weights, io):
    """All golden records computed once per dtype: {name: (ours, expected)}."""
    dtype = request.param
    tok = HBQTokenizer(infer_tokenizer_config(weights))
    tok.load_state_dict(weights, strict=True)
    tok = tok.to(dtype).eval()
    with torch.inference_mode():
        z_video = tok.encode(io["x_video"].to(dtype))
        bits = hbq.features_to_bits(z_video, rounds=4)
        out = {
            "z_video": z_video,
            "bits_video": bits,
            "zq_video": hbq.bits_to_features(bits, rounds=4, dtype=dtype),
            "rec_video": tok.decode(io["zq_video"].to(dtype)),
            "z_image": tok.encode(io["x_image"].to(dtype)),  # the 4-D image path
            "rec_image": tok.decode(io["z_image"].to(dtype)),
        }
    return dtype, out


@pytest.mark.parametrize("name", ["z_video", "zq_video", "rec_video", "z_image", "rec_image"])
def test_golden_record(run, io, name):
    dtype, out = run
    ours, expected = out[name], io[name]
    assert ours.shape == expected.shape, name
    assert ours.dtype == dtype
    err = rel_err(ours, expected)
    print(f"{name} {dtype}: max rel err {err:.3e}")
    assert err <= TOLERANCE[dtype], f"{name}: {err:.3e}"


def test_golden_bits(run, io):
    dtype, out = run
    ours, expected = out["bits_video"], io["bits_video"]
    assert ours.dtype == torch.uint8 and ours.shape == expected.shape
    differ = ours != expected
    print(f"bits_video {dtype}: {int(differ.sum())} of {differ.numel()} bits differ")
    if dtype == torch.float64:
        assert not differ.any()
        return
    # Where a bit differs, the official z must lie within NEAR_THRESHOLD of that round's threshold.
    z = io["z_video"].double()
    rounds = 4
    thresholds, q = [], torch.zeros_like(z)
    for r in range(rounds):
        thresholds.append(q.clone())
        q = q + torch.where(z > q, 0.5 ** (r + 1), -(0.5 ** (r + 1)))
    gap = (z.unsqueeze(1) - torch.stack(thresholds, dim=1)).abs().flatten(1, 2)
    assert bool((gap[differ] < NEAR_THRESHOLD).all())
    assert int(differ.sum()) <= max(1, differ.numel() // 1000)


def test_state_dict_keys_equal_official(weights):
    tok = HBQTokenizer(infer_tokenizer_config(weights))
    ours = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in weights.items()}
    assert ours == theirs


def test_infer_config_reads_golden_meta(weights):
    meta = golden_meta("joint")["tokenizer"]
    cfg = infer_tokenizer_config(weights)
    assert cfg.dim == meta["dim"] and cfg.dec_dim == meta["dec_dim"] and cfg.z_dim == meta["latent_channels"]
    assert list(cfg.dim_mult) == meta["dim_mult"] and cfg.num_res_blocks == meta["num_res_blocks"]
    assert list(cfg.temporal_downsample) == meta["temporal_downsample"]
    assert cfg.hbq_rounds == meta["hbq_rounds"]
    assert cfg.spatial_factor == 16 and cfg.temporal_factor == 4
    assert infer_tokenizer_config(weights, hbq_rounds=6).hbq_rounds == 6


def test_config_round_trips_through_json(weights):
    cfg = infer_tokenizer_config(weights)
    again = TokenizerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    official = {"dim": 8, "dec_dim": 8, "latent_channels": 8, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                "temperal_downsample": [0, 1, 1]}
    assert TokenizerConfig.from_dict(official) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        TokenizerConfig.from_dict({"dim": 8, "width": 3})


@pytest.mark.parametrize("name", sorted(TOKENIZER_PRESETS))
def test_released_presets_build_and_infer_back(name):
    cfg = tokenizer_preset(name)
    with torch.device("meta"):
        tok = HBQTokenizer(cfg)
    sd = tok.state_dict()
    assert sd["encoder.conv1.weight"].shape == (160, 12, 3, 3, 3)
    assert sd["decoder.conv1.weight"].shape == (1024, cfg.z_dim, 3, 3, 3)
    assert infer_tokenizer_config(sd) == cfg
    assert cfg.spatial_factor == 16 and cfg.temporal_factor == 4


def test_infer_rejects_other_dicts(weights):
    refiner = load_golden("refiner_joint_weights.safetensors")
    with pytest.raises(ValueError, match="encoder.conv1.weight"):
        infer_tokenizer_config(refiner)
    with pytest.raises(ValueError, match="'ema'"):
        infer_tokenizer_config({"ema": weights, "vae": weights})
    broken = dict(weights)
    del broken["conv2.weight"]
    with pytest.raises(ValueError, match="conv2.weight"):
        infer_tokenizer_config(broken)


def test_half_precision_runs_close_to_fp64(weights, io):
    tok = HBQTokenizer(infer_tokenizer_config(weights))
    tok.load_state_dict(weights, strict=True)
    with torch.inference_mode():
        tok = tok.to(torch.bfloat16)
        z = tok.encode(io["x_video"])
        rec = tok.decode(io["zq_video"])
    assert z.dtype == torch.bfloat16 and rec.dtype == torch.bfloat16
    assert rel_err(z, io["z_video"]) < 5e-2
    assert rel_err(rec, io["rec_video"]) < 5e-2
