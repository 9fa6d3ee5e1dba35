"""The download-free hashed text encoder: shapes, determinism across processes, config, edge cases."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grn_core.data.shapes import image_captions, video_captions
from grn_core.text.hashed import EOS_KEY, VERSION, HashedTextEncoder, _word_vector, tokenize


def test_rows_are_words_plus_eos():
    enc = HashedTextEncoder(dim=32)
    x = enc.encode("a red circle moving left")
    assert x.shape == (6, 32) and x.dtype == torch.float32
    assert enc.encode("").shape == (1, 32)  # an empty negative prompt: EOS only, like umt5
    assert enc.encode("  ,;!  ").shape == (1, 32)
    assert torch.equal(enc.encode(""), enc.encode("?!"))
    assert enc("a red circle").shape == (4, 32)


def test_normalisation_of_case_and_punctuation():
    enc = HashedTextEncoder(dim=16)
    assert torch.equal(enc.encode("A RED, circle!"), enc.encode("a red circle"))
    assert tokenize("Don't stop: the_end 3D Café.") == ["don't", "stop", "the", "end", "3d", "café"]


def test_word_order_and_position_matter():
    enc = HashedTextEncoder(dim=32)
    a, b = enc.encode("red circle"), enc.encode("circle red")
    assert not torch.allclose(a[0], b[1])  # same word, different position
    # The word part is position-free: row differences of two words swap places exactly.
    assert torch.allclose(a[0] - b[0], b[1] - a[1], atol=1e-6)


def test_values_are_pinned():
    # SHAKE-256 + correctly rounded float64 arithmetic: the same numbers in every process and on every machine.
    x = HashedTextEncoder(dim=8).encode("a red circle", dtype=torch.float64)
    expected = [[0.41211322453472327, -0.07927353290331424, -0.021357450589170292],
                [0.5693633318886813, 0.4187251651082529, 0.09892259456226701],
                [-0.15658340104520124, -0.6201994866106023, -0.3287715282885957],
                [0.1402487174971889, -0.151312547272431, -0.3086904109638798]]
    assert torch.allclose(x[:, :3], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


def test_same_features_in_a_process_with_another_hash_seed():
    prompt = "a magenta triangle moving up, zxqv flurble"
    here = hashlib.sha256(HashedTextEncoder(dim=48).encode(prompt).numpy().tobytes()).hexdigest()
    code = (
        "import hashlib; from grn_core.text.hashed import HashedTextEncoder as E; "
        f"print(hashlib.sha256(E(dim=48).encode({prompt!r}).numpy().tobytes()).hexdigest())"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == here


def test_unknown_words_and_vocabulary_geometry():
    enc = HashedTextEncoder(dim=64)
    words = sorted({w for c in video_captions() for w in tokenize(c)} | {"zxqv", "flurble"})
    first = torch.stack([enc.encode(w)[0] for w in words])  # every word at position 0
    vectors = torch.stack([torch.tensor(_word_vector(w, 64), dtype=torch.float32) for w in words])
    position = first - vectors  # the same position-0 code under every word
    assert torch.allclose(position, position[0:1].expand_as(position), atol=1e-6)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(len(words)), atol=1e-6)
    cos = vectors @ vectors.T - torch.eye(len(words))
    assert cos.abs().max() < 0.5  # nearly orthogonal: every word, known or not, is its own direction


def test_every_caption_encodes_differently():
    enc = HashedTextEncoder(dim=32)
    seen = {enc.encode(c).numpy().tobytes() for c in video_captions() + image_captions()}
    assert len(seen) == 72 + 18


def test_truncation_keeps_eos_last():
    enc = HashedTextEncoder(dim=16, max_tokens=4)
    long = enc.encode("one two three four five six")
    assert long.shape == (4, 16)
    assert torch.equal(long, HashedTextEncoder(dim=16).encode("one two three"))
    assert HashedTextEncoder(dim=16, max_tokens=1).encode("one two").shape == (1, 16)


def test_allow_empty_false_rejects_empty_prompts():
    enc = HashedTextEncoder(dim=16, allow_empty=False)
    with pytest.raises(ValueError, match="no words"):
        enc.encode("   ")
    assert enc.encode("hi").shape == (2, 16)
    assert enc.encode("", allow_empty=True).shape == (1, 16)  # per call, like UMT5PromptEncoder.encode


def test_per_call_allow_empty_overrides_the_default():
    enc = HashedTextEncoder(dim=16)  # accepts empty prompts unless a call says otherwise
    assert enc.encode("").shape == (1, 16)
    with pytest.raises(ValueError, match="allow_empty=True"):
        enc.encode(" ... ", allow_empty=False)
    assert torch.equal(enc.encode("a red circle", allow_empty=False), enc.encode("a red circle"))


def test_config_round_trip():
    enc = HashedTextEncoder(dim=24, max_tokens=77, allow_empty=False)
    cfg = json.loads(json.dumps(enc.config))
    assert cfg == {"type": "hashed", "version": VERSION, "dim": 24, "max_tokens": 77, "allow_empty": False}
    again = HashedTextEncoder.from_config(cfg)
    assert torch.equal(again.encode("a blue square"), enc.encode("a blue square"))
    assert again.config == enc.config


@pytest.mark.parametrize("cfg, word", [
    ({"dim": 8, "version": 99}, "99"),
    ({"dim": 8, "type": "umt5"}, "umt5"),
    ({"max_tokens": 8}, "dim"),
    ({"dim": 0}, "dim=0"),
    ({"dim": 8, "max_tokens": 0}, "max_tokens=0"),
])
def test_bad_configs_are_rejected(cfg, word):
    with pytest.raises(ValueError, match=word):
        HashedTextEncoder.from_config(cfg)


def test_bad_prompt_type_and_dtype_option():
    enc = HashedTextEncoder(dim=8)
    with pytest.raises(ValueError, match="str"):
        enc.encode(None)
    assert enc.encode("x", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert EOS_KEY not in tokenize(EOS_KEY)  # no prompt word can collide with the EOS key
