"""The tiny model's training recipe: objective pieces, the differentiable forward, and a one-step smoke run."""

from __future__ import annotations

import json

import pytest
import torch

from grn_core import hbq
from grn_core.checkpoint_files import read_checkpoint
from grn_core.pipeline import load_model
from grn_core.refiner import GRNRefiner, RefinerConfig
from grn_core.train import TinyRecipe, corrupt_bits, quantize_straight_through, training_logits
from grn_core.train.__main__ import main as train_main
from grn_core.train.refiner import bit_loss, init_refiner
from grn_core.train.stages import run_refiner, run_tokenizer


def _random_refiner(dtype=torch.float64, layout="joint") -> GRNRefiner:
    config = RefinerConfig(width=48, depth=2, heads=4, kv_heads=2, mlp_hidden=64, block_chunks=2, text_channels=16,
                           latent_channels=4, rounds=4, layout=layout, step_freq_dim=32)
    torch.manual_seed(0)
    ref = GRNRefiner(config)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)  # non-trivial weights everywhere, the head included
    return ref.to(dtype).eval()


def _training_batch(dtype=torch.float64, text_lens=(5, 1, 5)):
    """Bits ``[B, 16, 2, 3, 4]``, per-sample keep ratios and per-sample prompts of different lengths."""
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 2, (len(text_lens), 16, 2, 3, 4), generator=g, dtype=torch.uint8)
    texts = [torch.randn(n, 16, generator=g, dtype=dtype) for n in text_lens]
    r = torch.linspace(0.0, 0.93, len(text_lens), dtype=dtype)
    return bits, r, texts


def test_training_forward_is_the_inference_forward():
    """Training calls the sampler's pass: with autograd on, the same numbers as step_logits, bit for bit."""
    ref = _random_refiner()
    bits, r, texts = _training_batch()
    train = training_logits(ref, bits, r, texts)
    assert train.grad_fn is not None, "autograd must record the training forward"
    infer, _ = ref.step_logits(bits, r, texts, None)
    assert torch.equal(train, infer)
    # Each sample's prompt is its own: the batch equals one call per sample (other GEMM shapes, so not bit for bit).
    for b in range(bits.shape[0]):
        alone, _ = ref.step_logits(bits[b:b + 1], float(r[b]), texts[b], None)
        err = (train[b:b + 1] - alone).abs().max() / alone.abs().max()
        assert err < 1e-12, f"sample {b}: relative error {float(err):.2e}"


def _loss(ref: GRNRefiner, bits, r, texts, target) -> torch.Tensor:
    return bit_loss(training_logits(ref, bits, r, texts), target)[0]


@pytest.mark.parametrize("layout", ["joint", "prefix"])
def test_gradients_reach_every_parameter_and_are_right(layout):
    """Backward through the model's forward gives every parameter (word_embed, text_proj, pt_embedder, each block's
    weights, head) a non-zero gradient, and each equals the loss's central difference along a random direction d:
    ``<grad, d> = (L(p + eps d) - L(p - eps d)) / 2 eps`` with L evaluated by the inference pass (no autograd)."""
    ref = _random_refiner(layout=layout)
    bits, r, texts = _training_batch()
    target = torch.randint(0, 2, bits.shape, generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    _loss(ref, bits, r, texts, target).backward()
    params = dict(ref.named_parameters())
    assert {name.split(".")[0] for name in params} == {"word_embed", "text_proj", "pt_embedder", "block_chunks",
                                                         "head"}
    dead = [name for name, p in params.items()
            if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().max() > 0]
    assert not dead, f"no (finite, non-zero) gradient for {dead}"

    g, eps = torch.Generator().manual_seed(3), 1e-5
    for name, p in params.items():
        direction = torch.randn(p.shape, generator=g, dtype=p.dtype)
        with torch.no_grad():
            p.add_(direction, alpha=eps)
            up = _loss(ref, bits, r, texts, target)
            p.sub_(direction, alpha=2 * eps)
            down = _loss(ref, bits, r, texts, target)
            p.add_(direction, alpha=eps)
        numeric, analytic = float(up - down) / (2 * eps), float((p.grad * direction).sum())
        assert abs(numeric - analytic) <= 1e-6 * max(abs(numeric), 1e-3), f"{name}: {analytic} vs {numeric}"


def test_a_few_optimizer_steps_reduce_the_loss():
    """Micro config from its even-odds initialisation: AdamW on one fixed batch, through the model's forward."""
    recipe = TinyRecipe.micro()
    torch.manual_seed(0)
    ref = GRNRefiner(recipe.refiner)
    init_refiner(ref)
    ref.train()
    g = torch.Generator().manual_seed(4)
    bits = torch.randint(0, 2, (3, recipe.refiner.bits, 2, 2, 2), generator=g, dtype=torch.uint8)
    mixed, ratio = corrupt_bits(bits, g)
    texts = [torch.randn(n, recipe.text_dim, generator=g) for n in (4, 4, 1)]
    optimizer = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _ = bit_loss(training_logits(ref, mixed, ratio, texts), bits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert abs(losses[0] - 0.6931) < 1e-3, "starts at ln 2 (zero head)"
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.05, losses


def test_corrupt_bits_keeps_true_bits_and_reports_the_realised_ratio():
    g = torch.Generator().manual_seed(3)
    bits = torch.randint(0, 2, (64, 8, 2, 3, 3), generator=g, dtype=torch.uint8)
    mixed, ratio = corrupt_bits(bits, g)
    agree = (mixed == bits).flatten(1).float().mean(1)
    # A dropped bit is replaced by a fair coin, so agreement = r + (1 - r) / 2 on average.
    assert torch.allclose(agree, ratio + (1 - ratio) / 2, atol=0.12)
    assert float(ratio.min()) >= 0 and float(ratio.max()) <= 1 and float(ratio.std()) > 0.1
    assert mixed.dtype == torch.uint8 and mixed.shape == bits.shape
    g2 = torch.Generator().manual_seed(3)
    torch.randint(0, 2, (64, 8, 2, 3, 3), generator=g2, dtype=torch.uint8)
    assert torch.equal(corrupt_bits(bits, g2)[0], mixed), "same generator state -> same corruption"


def test_straight_through_quantization():
    z = torch.linspace(-0.99, 0.99, 50).view(1, 2, 25).requires_grad_()
    zs = quantize_straight_through(z, 4)
    expected = hbq.bits_to_features(hbq.features_to_bits(z.detach(), 4), 4)
    assert torch.equal(zs.detach(), expected)
    (zs * torch.arange(50.0).view(1, 2, 25)).sum().backward()
    assert torch.equal(z.grad, torch.arange(50.0).view(1, 2, 25)), "the backward pass is the identity"


def test_init_starts_at_even_odds():
    recipe = TinyRecipe.micro()
    ref = GRNRefiner(recipe.refiner)
    init_refiner(ref)
    logits = training_logits(ref, torch.zeros(1, recipe.refiner.bits, 1, 2, 2, dtype=torch.uint8),
                             torch.tensor([0.5]), [torch.randn(2, recipe.text_dim)])
    assert torch.allclose(logits, torch.zeros_like(logits))


def test_recipe_checks_and_round_trip():
    recipe = TinyRecipe()
    assert TinyRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert recipe.tokenizer.spatial_factor == 8 and recipe.tokenizer.temporal_factor == 4
    with pytest.raises(ValueError, match="text_dim"):
        recipe.replace(text_dim=32).validate()
    with pytest.raises(ValueError, match="does not fit the tokenizer"):
        recipe.replace(frames=8).validate()
    with pytest.raises(ValueError, match="no field"):
        TinyRecipe.from_dict({"bogus": 1})


def test_cli_rejects_unknown_override(capsys, tmp_path):
    assert train_main(["tokenizer", "--out", str(tmp_path), "--micro", "--set", "nope=1"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


def test_one_step_of_each_stage(tmp_path):
    """Micro recipe: one tokenizer step and one refiner step produce files the library's loaders read."""
    recipe = TinyRecipe.micro()
    tok_summary = run_tokenizer(recipe, tmp_path, seed=0)
    ref_summary = run_refiner(recipe, tmp_path, seed=0, cache_dir=tmp_path / "cache", calibrate=False)
    # The tokenizer stage trains on images first, then on clips: one step of each in the micro recipe.
    assert tok_summary["train"]["steps"] == recipe.tok_image_steps + recipe.tok_steps == 2
    assert ref_summary["train"]["steps"] == recipe.ref_steps == 1
    for summary in (tok_summary["train"]["final"], ref_summary["train"]["final"]):
        assert all(torch.isfinite(torch.tensor(v)) for k, v in summary.items() if isinstance(v, float))
    assert 0.6 < ref_summary["train"]["final"]["loss"] < 0.8, "one step from even odds: about ln 2"

    model = load_model(tmp_path / "refiner.safetensors", tmp_path / "tokenizer.safetensors")
    assert model.refiner.config == recipe.refiner
    assert model.tokenizer.config == recipe.tokenizer
    meta = read_checkpoint(tmp_path / "refiner.safetensors").metadata
    assert json.loads(meta["grn.text_encoder"])["dim"] == recipe.text_dim
    assert json.loads(meta["grn.defaults"]) == {"width": 16, "height": 16, "frames": 5}
    assert len(json.loads(meta["grn.preview"])["weight"]) == recipe.tokenizer.z_dim
    assert list((tmp_path / "cache").glob("tiny_bits_*.pt")), "encoded bits are cached for the refiner stage"
    summary = json.loads((tmp_path / "training.json").read_text())
    assert set(summary) >= {"tokenizer", "refiner"}


def test_training_is_reproducible(tmp_path):
    """Same recipe, seed and code -> bit-identical weights, run after run.

    Not a claim about the shipped refiner: it was trained through an earlier re-implementation of the forward that
    rounded differently (same loss curve for the recipe's first 21 steps, weights 1e-7 apart after 20 steps and
    1.6e-6 after 100), so a retrain now reproduces it only to within training noise, not bit for bit."""
    recipe = TinyRecipe.micro().replace(tok_image_steps=2, tok_steps=2, ref_steps=2)
    outputs = []
    for run in ("a", "b"):
        run_tokenizer(recipe, tmp_path / run, seed=5)
        run_refiner(recipe, tmp_path / run, seed=5, cache_dir=None, calibrate=False)
        outputs.append({name: read_checkpoint(tmp_path / run / name).tensors
                        for name in ("tokenizer.safetensors", "refiner.safetensors")})
    for name, tensors in outputs[0].items():
        other = outputs[1][name]
        assert tensors.keys() == other.keys()
        assert all(torch.equal(tensors[k], other[k]) for k in tensors), f"{name} differs between runs"
