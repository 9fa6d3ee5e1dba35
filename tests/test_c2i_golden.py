"""Class-to-image GRN_ind network vs. the official implementation (golden c2i_* records)."""

import json

import pytest
import torch

from grn_core.c2i import (
    C2I_PRESETS,
    C2IConfig,
    C2IRefiner,
    infer_c2i_config,
    sincos_pos_embed_2d,
)
from tests._golden import golden_meta, load_golden, rel_err


@pytest.fixture(scope="module")
def weights():
    return load_golden("c2i_weights.safetensors")


@pytest.fixture(scope="module")
def io():
    return load_golden("c2i_io.safetensors")


@pytest.fixture(scope="module")
def config(weights):
    return infer_c2i_config(weights, in_context_start=golden_meta("joint")["c2i"]["ictx_start"])


def _net(config, weights, dtype):
    net = C2IRefiner(config)
    net.load_state_dict(weights, strict=True)
    return net.to(dtype).eval()


def test_infer_config_matches_meta(config):
    meta = golden_meta("joint")["c2i"]
    assert config.width == meta["hidden"]
    assert config.depth == meta["depth"]
    assert config.num_heads == meta["heads"]
    assert config.bottleneck == meta["bott"]
    assert config.in_context_len == meta["ictx"]
    assert config.in_context_start == meta["ictx_start"]
    assert config.num_classes == meta["ncls"]
    assert config.latent_channels == meta["d"]
    assert config.input_size == meta["input"]
    assert config.patch_size == meta["patch_size"]
    assert config.rounds == meta["hbq_rounds"]
    assert config.mlp_hidden == int(int(meta["hidden"] * meta["mlp_ratio"]) * 2 / 3)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-5), (torch.float32, 1e-3)])
def test_golden_output(config, weights, io, dtype, tol):
    net = _net(config, weights, dtype)
    with torch.no_grad():
        out = net(io["z"], io["t"], io["y"])
    assert out.shape == io["out"].shape == (2, 16, 4, 8, 8)
    assert out.dtype == dtype
    err = rel_err(out, io["out"])
    assert err <= tol, f"{dtype}: relative error {err:.3e} > {tol}"


def test_bf16_runs_and_returns_float32_logits(config, weights, io):
    net = _net(config, weights, torch.bfloat16)
    with torch.no_grad():
        out = net(io["z"], io["t"], io["y"])
    assert out.dtype == torch.float32
    assert rel_err(out, io["out"]) < 3e-2


def test_deterministic_and_batch_independent(config, weights, io):
    net = _net(config, weights, torch.float64)
    with torch.no_grad():
        a = net(io["z"], io["t"], io["y"])
        b = net(io["z"], io["t"], io["y"])
        single = net(io["z"][1:], io["t"][1:], io["y"][1:])
    assert torch.equal(a, b)
    torch.testing.assert_close(single[0], a[1], rtol=1e-10, atol=1e-10)


def test_scalar_t_broadcasts(config, weights, io):
    net = _net(config, weights, torch.float64)
    with torch.no_grad():
        a = net(io["z"], 0.25, io["y"])
        b = net(io["z"], torch.full((2,), 0.25, dtype=torch.float64), io["y"])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_golden_pos_embed_is_fixed_sincos(weights, config):
    table = sincos_pos_embed_2d(config.width, config.grid_size)
    torch.testing.assert_close(weights["pos_embed"][0].double(), table, rtol=0, atol=1e-6)


def test_output_read_class_major():
    """A final layer that copies feature j to output channel j lands at logits[k, c] for j = k*d + c."""
    cfg = C2IConfig(width=32, depth=1, num_heads=2, bottleneck=8, input_size=2, latent_channels=2, rounds=2,
                    num_classes=3, in_context_len=0, mlp_hidden=16)
    net = C2IRefiner(cfg).double()
    flat = torch.arange(2 * 2 * 8, dtype=torch.float64).view(1, 4, 8)  # [B, N=h*w, K*d]
    logits = net._to_label_logits(flat)
    for k in range(4):
        for c in range(2):
            for pos in range(4):
                assert logits[0, k, c, pos // 2, pos % 2] == flat[0, pos, k * 2 + c]


def test_config_roundtrip(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert C2IConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="unknown"):
        C2IConfig.from_dict({**data, "bogus": 1})


def test_missing_in_context_start_raises(weights):
    with pytest.raises(ValueError, match="in_context_start"):
        infer_c2i_config(weights)


def test_overrides_and_bad_dicts(weights):
    cfg = infer_c2i_config(weights, in_context_start=2, num_classes=10)
    assert cfg.in_context_start == 2
    with pytest.raises(ValueError, match="unknown"):
        infer_c2i_config(weights, in_context_start=1, bogus=3)
    with pytest.raises(ValueError, match="pos_embed"):
        infer_c2i_config({"foo": torch.zeros(1)})
    prefixed = {f"net.{k}": v for k, v in weights.items()}
    with pytest.raises(ValueError, match="net."):
        infer_c2i_config(prefixed, in_context_start=1)


@pytest.mark.parametrize("name", sorted(C2I_PRESETS))
def test_presets_roundtrip_through_shapes(name):
    preset = C2IConfig.preset(name)
    with torch.device("meta"):
        net = C2IRefiner(preset)
    sd = net.state_dict()
    assert infer_c2i_config(sd) == preset  # in_context_start found through the matching preset
    spec = {"B": (12, 768, 12, 128, 4), "L": (24, 1024, 16, 128, 8),
            "H": (32, 1280, 16, 256, 10), "G": (40, 1664, 16, 256, 10)}[name]
    assert (preset.depth, preset.width, preset.num_heads, preset.bottleneck, preset.in_context_start) == spec
    assert sd["in_context_posemb"].shape == (1, 32, preset.width)
    assert sd["x_embedder.proj1.weight"].shape == (preset.bottleneck, 256, 1, 1)


def test_patch_size_two_shapes():
    cfg = C2IConfig(width=32, depth=2, num_heads=2, bottleneck=8, patch_size=2, input_size=4, latent_channels=2,
                    rounds=4, num_classes=5, in_context_len=3, in_context_start=1, mlp_hidden=40)
    net = C2IRefiner(cfg)
    labels = torch.randint(0, 16, (2, 2, 4, 4))
    out = net(labels, torch.tensor([0.1, 0.9]), torch.tensor([0, 5]))
    assert out.shape == (2, 16, 2, 4, 4)
    assert infer_c2i_config(net.state_dict(), in_context_start=1) == cfg


def test_bad_inputs_raise(config, weights, io):
    net = _net(config, weights, torch.float32)
    z, t, y = io["z"], io["t"], io["y"]
    with pytest.raises(ValueError, match="0..15"):
        net(z.long() + 16, t, y)
    with pytest.raises(ValueError, match="integer"):
        net(z.float(), t, y)
    with pytest.raises(ValueError, match="shape"):
        net(z[:, :2], t, y)
    with pytest.raises(ValueError, match="class ids"):
        net(z, t, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="t must be"):
        net(z, torch.zeros(3), y)


def test_config_validation():
    with pytest.raises(ValueError, match="in_context_start"):
        C2IConfig(width=64, depth=3, num_heads=2, in_context_start=3)
    with pytest.raises(ValueError, match="num_heads"):
        C2IConfig(width=64, depth=3, num_heads=3)
    with pytest.raises(ValueError, match="preset"):
        C2IConfig.preset("XL")
