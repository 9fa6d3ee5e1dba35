"""The measuring functions of benchmarks/bf16_fidelity.py, on a tiny random refiner (logic only, nothing timed).

- a path measured against itself has zero logit / probability error and flips no bit;
- a deliberately perturbed path flips bits, exactly those whose uniform falls between the two probabilities;
- with a shared uniform per bit, the flip fraction estimates mean |p1 - p1_64|;
- the official-order re-statement equals our float64 refiner in float64 (both layouts), and under bf16 autocast
  with float32 weights it is close to, but not equal to, the truth;
- bad command-line arguments stop with a message (exit status 2).
"""

import sys
from pathlib import Path

import pytest
import torch

from grn_core.nn import RMSNorm
from grn_core.refiner import GRNRefiner, RefinerConfig
from grn_core.runtime.precision import Precision, cast_network

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bf16_fidelity as fid  # noqa: E402

GRID = (2, 3, 4)
ASPECT = 0.75


def tiny_refiner(layout: str, dtype=torch.float64) -> GRNRefiner:
    cfg = RefinerConfig(width=32, depth=2, heads=2, kv_heads=1, mlp_hidden=64, block_chunks=1, text_channels=8,
                        latent_channels=2, rounds=2, layout=layout)
    torch.manual_seed(1)
    model = GRNRefiner(cfg)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):  # not all-ones, so that the norm weights take part
                module.weight.uniform_(0.5, 1.5)
    return model.to(dtype).eval().requires_grad_(False)


def inputs(cfg: RefinerConfig, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (1, cfg.bits, *GRID), generator=gen, dtype=torch.uint8)
    text_cond = torch.randn(5, cfg.text_channels, generator=gen, dtype=torch.float64)
    text_uncond = torch.randn(2, cfg.text_channels, generator=gen, dtype=torch.float64)
    uniforms = torch.rand(1, *GRID, cfg.bits, generator=gen, dtype=torch.float64)
    return bits, text_cond, text_uncond, uniforms


@pytest.fixture(scope="module")
def truth_case():
    model = tiny_refiner("joint")
    bits, tc, tu, uniforms = inputs(model.config)
    logits = model.step_logits(bits, 0.3, tc, tu, aspect_ratio=ASPECT)
    return model, (bits, tc, tu, uniforms), logits


def test_truth_against_itself_is_exact(truth_case):
    _, (_, _, _, uniforms), truth = truth_case
    m = fid.measure(truth, truth, uniforms, guidance=3.0, tau=1.0)
    assert m == {"max_rel_logit": 0.0, "mean_rel_logit": 0.0, "max_dp1": 0.0, "mean_dp1": 0.0, "flipped": 0.0}


def test_perturbed_path_flips_bits(truth_case):
    _, (_, _, _, uniforms), truth = truth_case
    cond, uncond = truth
    shifted = cond.clone()
    shifted[..., 1] += 0.5  # every guided bit-1 logit moves by w * 0.5
    m = fid.measure((shifted, uncond), truth, uniforms, guidance=3.0, tau=1.0)
    assert m["flipped"] > 0 and m["mean_dp1"] > 0 and m["max_rel_logit"] > 0
    assert m["max_dp1"] <= 1.0 and m["mean_rel_logit"] <= m["max_rel_logit"]
    # A uniform between the two probabilities flips the bit, one outside does not.
    p_true = fid.guided_p1(cond, uncond, 3.0, 1.0)
    p_shift = fid.guided_p1(shifted, uncond, 3.0, 1.0)
    between = (p_true + p_shift) / 2
    assert fid.measure((shifted, uncond), truth, between, 3.0, 1.0)["flipped"] == 1.0
    outside = torch.maximum(p_true, p_shift) + (1 - torch.maximum(p_true, p_shift)) / 2
    assert fid.measure((shifted, uncond), truth, outside, 3.0, 1.0)["flipped"] == 0.0
    with pytest.raises(ValueError, match="uniforms"):
        fid.measure((shifted, uncond), truth, uniforms[..., :1], 3.0, 1.0)


def test_guided_p1_and_relative_error_definitions():
    cond = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    uncond = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    # g = u + 3 (c - u): [[0, 3], [6, 0]] -> p1 = sigmoid(3 / tau), sigmoid(-6 / tau)
    p1 = fid.guided_p1(cond, uncond, 3.0, 2.0)
    assert torch.allclose(p1, torch.sigmoid(torch.tensor([1.5, -3.0], dtype=torch.float64)))
    assert p1.dtype == torch.float64
    truth = torch.tensor([3.0, -4.0])  # RMS = sqrt(12.5)
    rel = fid.relative_logit_error(torch.tensor([3.5, -4.0]), truth)
    assert torch.allclose(rel, torch.tensor([0.5 / 12.5 ** 0.5, 0.0], dtype=torch.float64))


def test_flip_fraction_estimates_mean_probability_error():
    gen = torch.Generator().manual_seed(3)
    n = 200_000
    logits64 = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    noisy = logits64 + 0.05 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    zeros = torch.zeros_like(logits64)
    uniforms = torch.rand(n, generator=gen, dtype=torch.float64)
    m = fid.measure((noisy, zeros), (logits64, zeros), uniforms, guidance=1.0, tau=1.0)
    assert m["flipped"] == pytest.approx(m["mean_dp1"], rel=0.1)


def test_summaries():
    cases = [dict(max_rel_logit=1.0, mean_rel_logit=0.1, max_dp1=0.2, mean_dp1=0.02, flipped=0.01),
             dict(max_rel_logit=3.0, mean_rel_logit=0.3, max_dp1=0.1, mean_dp1=0.04, flipped=0.03)]
    s = fid.summarize_cases(cases)
    assert s == pytest.approx(dict(max_rel_logit=3.0, mean_rel_logit=0.2, max_dp1=0.2, mean_dp1=0.03, flipped=0.02))
    assert fid.mean_spread([1.0]) == {"mean": 1.0, "std": 0.0}
    assert fid.mean_spread([1.0, 3.0]) == pytest.approx({"mean": 2.0, "std": 2 ** 0.5})
    # Text lengths alternate over cases and seeds: every kept fraction meets both pairs over two seeds.
    for i in range(len(fid.KEPT_FRACTIONS)):
        assert {fid.case_text_lengths(0, i), fid.case_text_lengths(1, i)} == set(fid.TEXT_LENGTHS)


@pytest.mark.parametrize("layout", ["joint", "prefix"])
def test_official_order_matches_our_refiner(layout):
    model64 = tiny_refiner(layout)
    bits, tc, tu, uniforms = inputs(model64.config, seed=1)
    ours = model64.step_logits(bits, 0.7, tc, tu, aspect_ratio=ASPECT)
    official = fid.official_style_logits(model64, bits, 0.7, tc, tu, ASPECT, base=torch.float64)
    for o, r in zip(official, ours):
        assert o.shape == r.shape == (1, *GRID, model64.config.bits, 2)
        assert float(fid.relative_logit_error(o, r).max()) < 1e-10

    # Float32 weights under CPU bf16 autocast: near the truth, yet not equal to it (the bf16 rounding happens).
    model32 = tiny_refiner(layout, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fid.official_style_logits(model32, bits, 0.7, tc.float(), tu.float(), ASPECT)
    assert all(t.dtype == torch.float32 for t in auto)  # the head runs in float32, as on CUDA
    m = fid.measure(auto, ours, uniforms, 3.0, 1.0)
    assert 0 < m["mean_rel_logit"] < 0.1
    # The diagnostic float32 residual stream is a no-op in float64 and changes the bf16-autocast result.
    same = fid.official_style_logits(model64, bits, 0.7, tc, tu, ASPECT, base=torch.float64, residual=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(same, official))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wide = fid.official_style_logits(model32, bits, 0.7, tc.float(), tu.float(), ASPECT, residual=torch.float32)
    assert not torch.equal(wide[0], auto[0])


def test_run_paths_dispatches_every_path():
    model64 = tiny_refiner("joint")
    models = {"fp64": model64, "fp32": tiny_refiner("joint", torch.float32),
              "bf16": cast_network(tiny_refiner("joint", torch.float32), Precision(torch.bfloat16, torch.bfloat16)),
              "fp64_bf16w": tiny_refiner("joint")}
    fid.round_weights_like_bf16(models["fp64_bf16w"])
    bits, tc, tu, uniforms = inputs(model64.config, seed=2)
    case = dict(bits=bits, kept=0.95, text_cond=tc, text_uncond=tu, uniforms=uniforms)
    paths = fid.PATHS + fid.DIAGNOSTIC_PATHS
    out = fid.run_paths(models, case, paths)
    assert set(out) == {"truth", *paths}
    errors = {path: fid.measure(out[path], out["truth"], uniforms, 3.0, 1.0)["mean_rel_logit"] for path in paths}
    assert errors["fp32"] < 1e-5
    for path in paths:
        if path != "fp32":
            assert errors["fp32"] < errors[path] < 0.1, path
    with pytest.raises(ValueError, match="unknown path"):
        fid.run_paths(models, case, ("fp16",))


def test_round_weights_like_bf16_spares_norms_and_head():
    model = tiny_refiner("joint")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fid.round_weights_like_bf16(model)
    after = model.state_dict()
    for name, value in after.items():
        assert value.dtype == torch.float64
        if name.startswith("head.") or name.endswith("norm.weight") or "layernorm" in name:
            assert torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, value.to(torch.bfloat16).to(torch.float64)), name
    assert not torch.equal(after["word_embed.weight"], before["word_embed.weight"])


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats"),
    (["--seed", "-1"], "--seed"),
    (["--layouts", "joint,diagonal"], "--layouts"),
    (["--tau", "0"], "--tau"),
    (["--guidance", "nan"], "--guidance"),
    (["--json", "/nonexistent-dir/out.json"], "--json"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        fid.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
