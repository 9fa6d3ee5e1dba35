"""umt5 encoder vs. the official (Wan) T5Encoder, Wan's prompt cleaning, and the prompt -> features wrapper."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from grn_core.text import UMT5Config, UMT5Encoder, UMT5PromptEncoder, clean_prompt, infer_umt5_config
from grn_core.text.umt5 import relative_position_buckets
from tests._golden import golden_meta, load_golden, rel_err


@pytest.fixture(scope="module")
def weights():
    return load_golden("umt5_weights.safetensors")


@pytest.fixture(scope="module")
def io():
    return load_golden("umt5_io.safetensors")


def _encoder(weights, dtype=torch.float64):
    enc = UMT5Encoder(infer_umt5_config(weights))
    enc.load_state_dict(weights, strict=True)
    return enc.to(dtype).eval()


# ---------------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------------


def test_infer_config_matches_meta(weights):
    meta = golden_meta("joint")["umt5"]
    cfg = infer_umt5_config(weights)
    assert (cfg.vocab_size, cfg.dim, cfg.dim_attn, cfg.dim_ffn) == (meta["vocab"], meta["dim"], meta["dim_attn"],
                                                                    meta["dim_ffn"])
    assert (cfg.num_heads, cfg.num_layers, cfg.num_buckets) == (meta["num_heads"], meta["num_layers"],
                                                                meta["num_buckets"])
    assert cfg.shared_pos is meta["shared_pos"] is False
    assert UMT5Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-5), (torch.float32, 1e-3)])
def test_golden_hidden_all_rows(weights, io, dtype, tol):
    enc = _encoder(weights, dtype)
    with torch.no_grad():
        hidden = enc(io["ids"], io["mask"])
    assert hidden.shape == io["hidden"].shape == (2, 12, 32)
    err = rel_err(hidden, io["hidden"])
    err_padded_tail = rel_err(hidden[1, 7:], io["hidden"][1, 7:])  # rows past the mask are computed too
    assert err <= tol, f"{dtype}: relative error {err:.3e}"
    assert err_padded_tail <= tol, f"{dtype}: padded rows relative error {err_padded_tail:.3e}"


def test_padding_does_not_change_real_rows(weights, io):
    enc = _encoder(weights)
    with torch.no_grad():
        padded = enc(io["ids"], io["mask"])[1, :7]
        alone = enc(io["ids"][1:, :7])[0]
        full_mask = enc(io["ids"][:1], torch.ones_like(io["ids"][:1]))
        no_mask = enc(io["ids"][:1])
    torch.testing.assert_close(padded, alone, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(full_mask, no_mask, rtol=0, atol=0)


def test_half_precision_runs(weights, io):
    enc = _encoder(weights, torch.bfloat16)
    with torch.no_grad():
        hidden = enc(io["ids"], io["mask"])
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden.float()).all()
    assert rel_err(hidden, io["hidden"]) < 0.1


def test_relative_buckets_known_values():
    b = relative_position_buckets(300)
    assert b[5, 5] == 0
    assert b[5, 6] == 17 and b[6, 5] == 1  # key after query uses the upper half
    assert b[0, 7] == 16 + 7 and b[7, 0] == 7  # below max_exact = 8: exact buckets
    assert b[0, 8] == 24 and b[0, 16] == 26  # log-spaced from 8 on
    assert b[0, 299] == 31 and b[299, 0] == 15  # beyond max_distance: last bucket of each half
    assert torch.equal(b[10:20, 10:20], b[:10, :10])  # depends on key - query only


def test_shared_position_bias_variant():
    torch.manual_seed(0)
    per_layer = UMT5Encoder(UMT5Config(vocab_size=50, dim=16, dim_attn=16, dim_ffn=24, num_heads=2, num_layers=3,
                                       num_buckets=8)).double()
    shared = UMT5Encoder(UMT5Config(vocab_size=50, dim=16, dim_attn=16, dim_ffn=24, num_heads=2, num_layers=3,
                                    num_buckets=8, shared_pos=True)).double()
    sd = shared.state_dict()
    assert "pos_embedding.embedding.weight" in sd and not any("blocks.0.pos_embedding" in k for k in sd)
    cfg = infer_umt5_config(sd)
    assert cfg.shared_pos and cfg.num_heads == 2 and cfg.num_buckets == 8 and cfg.num_layers == 3
    # Copy everything into the per-layer model with each layer holding the shared table: outputs must agree.
    table = sd["pos_embedding.embedding.weight"]
    per_sd = {k: v for k, v in sd.items() if not k.startswith("pos_embedding")}
    per_sd.update({f"blocks.{i}.pos_embedding.embedding.weight": table for i in range(3)})
    per_layer.load_state_dict(per_sd, strict=True)
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(per_layer(ids, mask), shared(ids, mask), rtol=0, atol=0)


def test_umt5_xxl_preset_keys():
    cfg = UMT5Config.preset("umt5-xxl")
    assert (cfg.num_layers, cfg.dim, cfg.num_heads, cfg.dim_ffn, cfg.num_buckets, cfg.vocab_size) == (
        24, 4096, 64, 10240, 32, 256384)
    with torch.device("meta"):
        enc = UMT5Encoder(cfg)
    sd = enc.state_dict()
    assert len(sd) == 2 + 24 * 10
    assert sd["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)
    assert sd["blocks.0.ffn.gate.0.weight"].shape == (10240, 4096)
    assert infer_umt5_config(sd) == cfg


def test_bad_inputs_raise(weights, io):
    enc = _encoder(weights)
    with pytest.raises(ValueError, match="0..119"):
        enc(torch.tensor([[5, 120]]))
    with pytest.raises(ValueError, match="mask shape"):
        enc(io["ids"], io["mask"][:, :5])
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        enc(io["ids"][0])
    with pytest.raises(ValueError, match="token_embedding"):
        infer_umt5_config({"blocks.0.attn.q.weight": torch.zeros(2, 2)})


# ---------------------------------------------------------------------------------------------------------------
# Cleaning (expected values produced with Wan's whitespace_clean(basic_clean(.)), `regex` module)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("schÃ¶n", "schön"),  # ftfy mojibake repair
        ("x &amp;amp; y", "x & y"),  # html unescaped twice
        ("&lt;T2I&gt;a cat", "<T2I>a cat"),
        ("  a\u3000b\xa0\xa0c\n\td  ", "a b c d"),  # Unicode whitespace runs -> one space, stripped
        ("\u201chi\u201d", '"hi"'),  # ftfy uncurls quotes
        ("a\x1cb", "ab"),  # control characters dropped by ftfy
        ("a\u200bb", "a\u200bb"),  # zero-width space is not White_Space: kept
        (" \n\t ", ""),
    ],
)
def test_clean_prompt(raw, cleaned):
    assert clean_prompt(raw) == cleaned


# ---------------------------------------------------------------------------------------------------------------
# Prompt encoder with a small in-test tokenizer (umt5 conventions: <pad> 0, </s> 1, <unk> 2)
# ---------------------------------------------------------------------------------------------------------------

WORDS = ["a", "cat", "dog", "sat", "on", "the", "mat", "&", "<T2I>", '"'] + [f"w{i}" for i in range(100)]


def _tokenizer(with_eos_template: bool = False) -> Tokenizer:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if with_eos_template:  # as in umt5's tokenizer.json: the post-processor appends </s> itself
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


@pytest.fixture(scope="module")
def prompt_encoder(weights):
    return UMT5PromptEncoder(_encoder(weights), _tokenizer())


def _ids(words):
    return [WORDS.index(w) + 3 for w in words]


def test_tokenize_cleans_and_appends_eos(prompt_encoder):
    assert prompt_encoder.tokenize("  a   cat &amp;amp; dog\n") == _ids(["a", "cat", "&", "dog"]) + [1]
    assert prompt_encoder.tokenize("&lt;T2I&gt; a \u201ccat\u201d") == _ids(["<T2I>", "a"]) + [2, 1]  # '"cat"' -> <unk>


def test_no_double_eos_with_template_tokenizer(weights):
    pe = UMT5PromptEncoder(_encoder(weights), _tokenizer(with_eos_template=True))
    assert pe.tokenize("a cat") == _ids(["a", "cat"]) + [1]


def test_truncation_to_512(prompt_encoder):
    words = [f"w{i % 100}" for i in range(600)]
    ids = prompt_encoder.tokenize(" ".join(words))
    assert len(ids) == 512 and ids[-1] == 1
    assert ids[:511] == _ids(words[:511])
    feats = prompt_encoder.encode(" ".join(words))
    assert feats.shape == (512, 32)


def test_features_equal_direct_encoder_call(prompt_encoder, weights):
    prompts = ["a cat sat on the mat", "the dog"]
    feats = [prompt_encoder.encode(p) for p in prompts]
    ids = [prompt_encoder.tokenize(p) for p in prompts]
    assert [f.shape[0] for f in feats] == [7, 3]  # trimmed to tokens + EOS
    length = 12
    batch = torch.zeros(2, length, dtype=torch.long)  # padded with <pad> = 0, as the official tokenizer call
    mask = torch.zeros(2, length, dtype=torch.long)
    for row, seq in enumerate(ids):
        batch[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    with torch.no_grad():
        direct = _encoder(weights)(batch, mask)
    for row, f in enumerate(feats):
        torch.testing.assert_close(f, direct[row, : f.shape[0]], rtol=1e-10, atol=1e-12)


def test_empty_prompt(prompt_encoder, weights):
    for blank in ["", "   \n "]:
        with pytest.raises(ValueError, match="allow_empty"):
            prompt_encoder.encode(blank)
    eos_only = prompt_encoder.encode("", allow_empty=True)  # official empty negative prompt: EOS alone
    assert eos_only.shape == (1, 32)
    with torch.no_grad():
        torch.testing.assert_close(eos_only, _encoder(weights)(torch.tensor([[1]]))[0], rtol=0, atol=0)


def test_deterministic_and_path_loading(prompt_encoder, weights, tmp_path):
    path = tmp_path / "tokenizer.json"
    _tokenizer().save(str(path))
    from_file = UMT5PromptEncoder(_encoder(weights), path)
    a = prompt_encoder.encode("a cat sat")
    assert torch.equal(a, prompt_encoder.encode("a cat sat"))
    assert torch.equal(a, from_file("a  cat\tsat"))


def test_prompt_encoder_errors(weights):
    enc = _encoder(weights)
    with pytest.raises(ValueError, match="eos_token"):
        UMT5PromptEncoder(enc, _tokenizer(), eos_token="<eos>")
    with pytest.raises(ValueError, match="max_length"):
        UMT5PromptEncoder(enc, _tokenizer(), max_length=0)
