"""The shipped tiny model: loads through the library's loaders and makes the video its prompt asks for."""

from __future__ import annotations

import json

import pytest
import torch

from grn_core.checkpoint_files import read_checkpoint
from grn_core.data.judge import judge
from grn_core.models import TINY_DIR, load_tiny, tiny_available
from grn_core.pipeline import GenerationRequest, decode_tokens, encode_prompt, generate_tokens
from grn_core.sampler import SamplerSettings
from grn_core.train.refiner import weights_fingerprint

pytestmark = pytest.mark.skipif(
    not tiny_available(),
    reason=f"the tiny model is not in {TINY_DIR} (make it with `python -m grn_core.train all --out {TINY_DIR}`)",
)


@pytest.fixture(scope="module")
def tiny():
    # One thread: the tiny model's ops are too small to split, and on a busy 2-core machine a second OpenMP
    # thread waiting for a core makes every op slower (20-50x measured); restored for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_tiny()
    torch.set_num_threads(threads)


def _generate(model, prompt: str, seed: int, settings: SamplerSettings) -> tuple[torch.Tensor, object]:
    d = model.defaults
    features = encode_prompt(model, None, prompt, task="t2v")
    request = GenerationRequest(width=d["width"], height=d["height"], frames=d["frames"], seed=seed, settings=settings)
    tokens = generate_tokens(model, features, request)
    video = decode_tokens(model, tokens)[0]  # [T, H, W, 3] in [0, 1]
    return video, tokens


def test_shipped_files_are_small_and_self_describing():
    sizes = {p.name: p.stat().st_size for p in TINY_DIR.glob("*.safetensors")}
    assert set(sizes) == {"refiner.safetensors", "tokenizer.safetensors"}
    assert sum(sizes.values()) <= 20 * 1024 * 1024, sizes
    meta = read_checkpoint(TINY_DIR / "refiner.safetensors").metadata
    for key in ("grn.config", "grn.layout", "grn.tasks", "grn.text_encoder", "grn.preview", "grn.defaults"):
        assert key in meta, f"refiner metadata lacks {key}"
    assert meta["grn.layout"] == "joint"
    partner = weights_fingerprint(TINY_DIR / "tokenizer.safetensors")
    assert meta.get("grn.tokenizer_fingerprint") == partner, "the tokenizer file is not the one the refiner learned"
    defaults = json.loads(meta["grn.defaults"])
    assert defaults["frames"] >= 9 and defaults["width"] >= 32 and defaults["height"] >= 32


def test_model_shape_and_text_encoder(tiny):
    assert tiny.name == "tiny" and tiny.default_task() == "t2v"
    assert tiny.text_encoder.dim == tiny.text_channels
    assert tiny.preview is not None
    # Same features for the same prompt, in any process: the encoder is download-free and deterministic.
    assert torch.equal(tiny.text_encoder.encode("a red circle"), tiny.text_encoder.encode("a red circle"))


# One prompt per colour; every shape and direction appears twice.
PROMPTS = [
    ("a red circle moving right", 0), ("a green square moving up", 1), ("a blue triangle moving left", 2),
    ("a yellow circle moving down", 3), ("a white square moving left", 4), ("a magenta triangle moving right", 5),
]


def test_generations_match_their_prompts(tiny):
    """Default settings: colour and motion right every time (100 % on the benchmark); shape (its weakest attribute,
    94 % there, circles sometimes drawn squarish) right in at least 4 of the 6."""
    verdicts = []
    for prompt, seed in PROMPTS:
        video, tokens = _generate(tiny, prompt, seed, SamplerSettings.for_task("t2v"))
        d = tiny.defaults
        assert video.shape == (d["frames"], d["height"], d["width"], 3)
        verdict = judge(video.permute(3, 0, 1, 2) * 2 - 1)
        verdicts.append((prompt, verdict.caption, verdict.matches(prompt)))
    report = "; ".join(f"{p!r} -> {c!r}" for p, c, _ in verdicts)
    assert all(h["color"] and h["direction"] for _, _, h in verdicts), report
    assert sum(h["shape"] for _, _, h in verdicts) >= 4, report


def test_generation_is_deterministic(tiny):
    settings = SamplerSettings.for_task("t2v", steps=12)
    first, _ = _generate(tiny, "a green triangle moving down", 3, settings)
    again, _ = _generate(tiny, "a green triangle moving down", 3, settings)
    assert torch.equal(first, again)
