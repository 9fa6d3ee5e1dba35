"""Hostile and damaged model files: every one is a CheckpointError naming the file (and the tensor or metadata key at
fault), in bounded time; nothing runs code from a file, nothing is half-loaded and no existing file is damaged.

Every file is made on the fly in tmp_path from the golden weights (tests/golden) or a copy of the tiny model.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import random
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from grn_core.c2i import infer_c2i_config
from grn_core.checkpoint_files import CheckpointError, check_finite, is_finite_tensor, read_checkpoint
from grn_core.checkpoints import (
    checkpoint_metadata,
    inspect_checkpoint,
    load_c2i,
    load_refiner,
    load_tokenizer,
    load_umt5,
)
from grn_core.cli import main as cli_main
from grn_core.convert import convert
from grn_core.models import TINY_DIR, load_tiny, tiny_available
from grn_core.refiner import infer_refiner_config
from grn_core.text.umt5 import infer_umt5_config
from grn_core.tokenizer import infer_tokenizer_config
from tests._golden import GOLDEN, load_golden, rel_err

FAST = 20.0  # seconds: every refusal here takes well under a second; a claimed depth of 1e6 used to take minutes

BASE = {
    "refiner": ("refiner_joint_weights.safetensors", lambda t: infer_refiner_config(t, layout="joint")),
    "tokenizer": ("tokenizer_weights.safetensors", infer_tokenizer_config),
    "c2i": ("c2i_weights.safetensors", lambda t: infer_c2i_config(t, in_context_start=1)),
    "umt5": ("umt5_weights.safetensors", infer_umt5_config),
}
LOADERS: dict[str, Callable[..., Any]] = {
    "refiner": load_refiner, "tokenizer": load_tokenizer, "c2i": load_c2i, "umt5": load_umt5,
}
# A tensor of each kind that the network takes as a floating-point weight.
SAMPLE_WEIGHT = {
    "refiner": "block_chunks.0.module.0.mlp.up_proj.weight",
    "tokenizer": "encoder.conv1.weight",
    "c2i": "blocks.0.mlp.w12.weight",
    "umt5": "blocks.0.attn.q.weight",
}
_CACHE: dict[str, dict[str, torch.Tensor]] = {}


def weights(kind: str) -> dict[str, torch.Tensor]:
    if kind not in _CACHE:
        _CACHE[kind] = load_golden(BASE[kind][0])
    return {k: v.clone() for k, v in _CACHE[kind].items()}


def base_config(kind: str) -> dict:
    return BASE[kind][1](weights(kind)).to_dict()


def write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def described(tmp_path: Path, kind: str, config: dict | None = None, raw_config: str | None = None,
              tensors: dict[str, torch.Tensor] | None = None, name: str = "", **meta: str) -> Path:
    """A self-describing safetensors file (as convert writes them) with optionally edited config or metadata."""
    full = {"grn.format": "1", "grn.kind": kind,
            "grn.config": raw_config if raw_config is not None else json.dumps(config or base_config(kind))}
    if kind == "refiner":
        full.update({"grn.layout": "joint", "grn.tasks": "t2v,t2i"})
    full.update(meta)
    full = {k: v for k, v in full.items() if v is not None}
    return write(tmp_path / (name or f"{kind}.safetensors"), tensors if tensors is not None else weights(kind), full)


def load(kind: str, path: Path) -> Any:
    if kind == "c2i":
        return load_c2i(path, in_context_start=1)
    return LOADERS[kind](path)


def expect_error(call: Callable[[], Any], path: Path, key: str | None = None, field: str | None = None,
                 limit: float = FAST) -> CheckpointError:
    """The call raises a CheckpointError naming ``path`` (and ``key``/``field`` when given), within ``limit`` s."""
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        call()
    elapsed = time.monotonic() - start
    error = info.value
    assert elapsed < limit, f"took {elapsed:.1f}s: {error}"
    assert error.path == Path(path), (error.path, str(error))
    assert str(path) in str(error)
    if key is not None:
        assert error.key == key, (error.key, str(error))
    if field is not None:
        assert error.field == field, (error.field, str(error))
    assert "Traceback" not in str(error)
    return error


ENTRY_POINTS = ("load", "inspect", "convert")


def enter(how: str, kind: str, path: Path, tmp_path: Path) -> Any:
    if how == "load":
        return load(kind, path)
    if how == "inspect":
        return inspect_checkpoint(path)
    return convert(path, tmp_path / "out" / "converted.safetensors", in_context_start=1 if kind == "c2i" else None)


# ================================================================================================================
# 1. A stored config cannot make the loader hang or build something the tensors are not
# ================================================================================================================

CONFIG_EDITS = [
    # (kind, field, value): each is refused before any network is built
    ("refiner", "depth", 1_000_000),
    ("refiner", "depth", 8),
    ("refiner", "depth", 0),
    ("refiner", "depth", -4),
    ("refiner", "depth", "4"),
    ("refiner", "depth", 4.5),
    ("refiner", "depth", True),
    ("refiner", "depth", None),
    ("refiner", "width", 256),
    ("refiner", "width", 10**12),
    ("refiner", "heads", 0),
    ("refiner", "heads", 1),
    ("refiner", "kv_heads", 3),
    ("refiner", "mlp_hidden", 10**9),
    ("refiner", "block_chunks", 4),
    ("refiner", "text_channels", 7),
    ("refiner", "rounds", 1_000_000),
    ("refiner", "rounds", 8),
    ("refiner", "layout", "diagonal"),
    ("refiner", "norm_eps", float("nan")),
    ("refiner", "norm_eps", -1.0),
    ("refiner", "rope_base", float("inf")),
    ("refiner", "rope_base", 0.0),
    ("refiner", "step_freq_dim", 10**7),
    ("refiner", "no_such_field", 1),
    ("tokenizer", "dim_mult", [1] * 100_000),
    ("tokenizer", "dim_mult", [2, 2]),
    ("tokenizer", "dim_mult", "2,2,2"),
    ("tokenizer", "temporal_downsample", [1, 1, 1, 1, 1, 1]),
    ("tokenizer", "temporal_downsample", [0, 0]),
    ("tokenizer", "num_res_blocks", 1_000_000),
    ("tokenizer", "z_dim", 10**6),
    ("tokenizer", "dim", 0),
    ("tokenizer", "dec_dim", 17),
    ("tokenizer", "hbq_rounds", 10**9),
    ("c2i", "depth", 1_000_000),
    ("c2i", "depth", 4),
    ("c2i", "width", 48),
    ("c2i", "num_heads", 0),
    ("c2i", "in_context_start", 10**6),
    ("c2i", "in_context_len", -1),
    ("c2i", "rounds", 64),
    ("c2i", "num_classes", 10**7),
    ("c2i", "input_size", 10**5),
    ("c2i", "patch_size", 0),
    ("umt5", "num_layers", 1_000_000),
    ("umt5", "num_layers", 1),
    ("umt5", "vocab_size", 10**8),
    ("umt5", "num_heads", 3),
    ("umt5", "eps", float("nan")),
    ("umt5", "max_distance", -1),
    ("umt5", "shared_pos", "yes"),
    ("umt5", "num_buckets", 10**6),
]


@pytest.mark.parametrize("kind, field, value", CONFIG_EDITS,
                         ids=[f"{k}-{f}-{str(v)[:12]}" for k, f, v in CONFIG_EDITS])
def test_stored_config_must_match_the_tensors(tmp_path, kind, field, value):
    config = base_config(kind)
    if field == "no_such_field":
        config[field] = value
    elif value is None:
        del config[field]
    else:
        config[field] = value
    path = described(tmp_path, kind, config)
    if kind == "c2i":  # the loader's own in_context_start would hide the edited one
        call = lambda: load_c2i(path)  # noqa: E731
    else:
        call = lambda: load(kind, path)  # noqa: E731
    error = expect_error(call, path, key="grn.config")
    if field == "rounds" and value == 8:  # the tensors only tell rounds * latent_channels: either is named
        assert error.field in ("rounds", "latent_channels"), str(error)
    elif field != "depth" or value is not None:
        assert error.field == field, str(error)
    else:  # a missing depth means the default applies: it must still fit the tensors
        assert error.field == "depth" and "lacks depth" in str(error)


@pytest.mark.parametrize("how", ENTRY_POINTS)
def test_claimed_depth_of_a_million_is_refused_quickly_everywhere(tmp_path, how):
    config = base_config("refiner")
    config["depth"] = 1_000_000
    path = described(tmp_path, "refiner", config)
    error = expect_error(lambda: enter(how, "refiner", path, tmp_path), path, key="grn.config", field="depth",
                         limit=5.0)
    assert error.value == 1_000_000
    assert "depth=1000000" in str(error) and "depth=4" in str(error)  # the claimed and the real value


@pytest.mark.skipif(not tiny_available(), reason="the tiny model is not in this checkout")
def test_tiny_refiner_with_claimed_depth_of_a_million(tmp_path):
    folder = _tiny_copy(tmp_path)
    path = folder / "refiner.safetensors"
    _edit_metadata(path, lambda m: m.update({"grn.config": json.dumps({**json.loads(m["grn.config"]),
                                                                       "depth": 1_000_000})}))
    expect_error(lambda: load_tiny(folder=folder), path, key="grn.config", field="depth", limit=5.0)


@pytest.mark.parametrize("raw_config", ["{", "[1, 2]", "null", '"depth"', "42", "{'depth': 4}", "{" * 100_000,
                                        "[" * 100_000, '{"depth": 4, "depth": 1e999}'])
@pytest.mark.parametrize("how", ENTRY_POINTS)
def test_config_metadata_that_is_no_json_object(tmp_path, raw_config, how):
    path = described(tmp_path, "refiner", raw_config=raw_config)
    expect_error(lambda: enter(how, "refiner", path, tmp_path), path, key="grn.config")


def _odd_tensors(kind: str, edit: Callable[[dict], None]) -> dict[str, torch.Tensor]:
    tensors = weights(kind)
    edit(tensors)
    return tensors


ODD_TENSORS = [
    ("refiner", "word_embed 3-D", lambda t: t.__setitem__("word_embed.weight", t["word_embed.weight"][None])),
    ("refiner", "q_norm empty", lambda t: t.__setitem__("block_chunks.0.module.0.attn.q_norm.weight",
                                                        torch.zeros(0))),
    ("refiner", "q_norm scalar", lambda t: t.__setitem__("block_chunks.0.module.0.attn.q_norm.weight",
                                                         torch.tensor(1.0))),
    ("refiner", "gapped blocks", lambda t: t.update({k.replace("block_chunks.0.module.1.", "block_chunks.0.module.9."):
                                                      t.pop(k) for k in [k for k in t if ".module.1." in k]})),
    ("refiner", "head wider", lambda t: t.__setitem__("head.proj.weight",
                                                       torch.zeros(7, t["head.proj.weight"].shape[1]))),
    ("refiner", "missing word_embed", lambda t: t.pop("word_embed.weight")),
    ("refiner", "an empty extra tensor", lambda t: t.__setitem__("junk", torch.zeros(0, 10**9))),
    ("tokenizer", "conv1 4-D", lambda t: t.__setitem__("encoder.conv1.weight", t["encoder.conv1.weight"][0])),
    ("tokenizer", "level width scalar", lambda t: t.__setitem__(
        "encoder.downsamples.0.downsamples.0.residual.6.weight", torch.tensor(1.0))),
    ("tokenizer", "z empty", lambda t: t.__setitem__("conv2.weight", torch.zeros(0, 1, 1, 1, 1))),
    ("c2i", "pos_embed not square", lambda t: t.__setitem__("pos_embed", torch.zeros(1, 7, t["pos_embed"].shape[2]))),
    ("c2i", "pos_embed 2-D", lambda t: t.__setitem__("pos_embed", t["pos_embed"][0])),
    ("c2i", "patch not square", lambda t: t.__setitem__("x_embedder.proj1.weight",
                                                         torch.zeros(*t["x_embedder.proj1.weight"].shape[:2], 1, 2))),
    ("c2i", "q_norm empty", lambda t: t.__setitem__("blocks.0.attn.q_norm.weight", torch.zeros(0))),
    ("c2i", "block 1000000", lambda t: t.__setitem__("blocks.999999.attn.q_norm.weight", torch.ones(4))),
    ("umt5", "token_embedding 1-D", lambda t: t.__setitem__("token_embedding.weight", torch.zeros(10))),
    ("umt5", "no blocks", lambda t: [t.pop(k) for k in [k for k in t if k.startswith("blocks.")]]),
    ("umt5", "odd buckets", lambda t: t.__setitem__("blocks.0.pos_embedding.embedding.weight", torch.zeros(3, 2))),
]


@pytest.mark.parametrize("kind, what, edit", ODD_TENSORS, ids=[f"{k}-{w}" for k, w, _ in ODD_TENSORS])
@pytest.mark.parametrize("how", ENTRY_POINTS)
def test_inferred_config_from_odd_tensors(tmp_path, kind, what, edit, how):
    path = write(tmp_path / f"{kind}.safetensors", _odd_tensors(kind, edit))
    expect_error(lambda: enter(how, kind, path, tmp_path), path)


@pytest.mark.parametrize("override", [{"in_context_start": 10**6}, {"in_context_start": -1}])
def test_out_of_range_arguments_are_named(tmp_path, override):
    path = write(tmp_path / "c2i.safetensors", weights("c2i"))
    expect_error(lambda: load_c2i(path, **override), path, field="in_context_start")


# ================================================================================================================
# 2. NaN / Inf weights are refused at load and by convert
# ================================================================================================================


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("where", [0, 17, -1])
def test_is_finite_tensor_finds_any_bad_value(bad, dtype, where):
    for n in (1, 7, 100_003, 1_100_001):  # vector tails, serial pieces, one parallel reduction
        t = torch.randn(n, dtype=torch.float32).to(dtype)
        assert is_finite_tensor(t)
        t.view(-1)[where % n] = bad
        assert not is_finite_tensor(t)
        assert not is_finite_tensor(t.view(1, n).t())  # non-contiguous view


FP8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                   "float8_e8m0fnu") if hasattr(torch, n)]


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_is_finite_tensor_reads_fp8_bytes(dtype):
    """Every one of the 256 byte patterns, alone and inside small and large (parallel) tensors, is judged as
    ``torch.isfinite`` judges its float32 value."""
    fill = 0x7F if dtype == getattr(torch, "float8_e8m0fnu", None) else 0x38  # 1.0-ish
    edges = [0x00, 0x01, 0x38, 0x7B, 0x7C, 0x7D, 0x7E, 0x7F, 0x80, 0x81, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF]
    for n, patterns in ((1, range(256)), (40_000, range(256)), (1_100_000, edges)):  # serial and parallel paths
        base = torch.full((n,), fill, dtype=torch.uint8)
        for byte in patterns:
            u = base.clone()
            u[n // 2] = byte
            x = u.view(dtype)
            assert is_finite_tensor(x) == bool(torch.isfinite(x.float()).all()), (n, hex(byte))
    assert is_finite_tensor(torch.zeros(0)) and is_finite_tensor(torch.arange(5))


@pytest.mark.parametrize("kind", list(BASE))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_or_inf_weights_are_refused_at_load(tmp_path, kind, bad, dtype):
    tensors = {k: v.to(dtype) for k, v in weights(kind).items()}
    name = SAMPLE_WEIGHT[kind]
    tensors[name].view(-1)[-1] = bad
    path = write(tmp_path / f"{kind}.safetensors", tensors)
    error = expect_error(lambda: load(kind, path), path, key=name)
    assert error.value == 1 and "NaN/Inf" in str(error)


@pytest.mark.parametrize("kind", list(BASE))
def test_convert_refuses_nan_weights(tmp_path, kind):
    tensors = weights(kind)
    tensors[SAMPLE_WEIGHT[kind]][0] = float("nan")
    path = tmp_path / f"{kind}.pth"
    torch.save(tensors, path)
    dst = tmp_path / "out.safetensors"
    expect_error(lambda: convert(path, dst, in_context_start=1 if kind == "c2i" else None), path,
                 key=SAMPLE_WEIGHT[kind])
    assert not dst.exists()


def test_nan_in_an_fp8_file_is_refused(tmp_path):
    good = convert(_pth(tmp_path, "refiner"), tmp_path / "fp8.safetensors", dtype="fp8_e4m3fn", layout="joint")
    name = SAMPLE_WEIGHT["refiner"]
    with safe_open(str(good), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = handle.metadata()
    assert tensors[name].dtype == torch.float8_e4m3fn
    tensors[name].view(torch.uint8)[0, 0] = 0x7F
    bad = write(tmp_path / "fp8_nan.safetensors", tensors, meta)
    expect_error(lambda: load_refiner(bad), bad, key=name)
    expect_error(lambda: load_refiner(bad, dtype="fp8_e4m3fn"), bad, key=name)


def test_values_beyond_the_storage_dtype_are_refused(tmp_path):
    tensors = weights("refiner")
    name = SAMPLE_WEIGHT["refiner"]
    tensors[name][0, 0] = 1e6  # finite in float32, Inf in float16, beyond fp8
    path = write(tmp_path / "big.safetensors", tensors)
    for dtype in ("fp16", "fp8_e4m3fn"):
        expect_error(lambda: convert(path, tmp_path / f"o_{dtype}.safetensors", dtype=dtype, layout="joint"), path,
                     key=name)
    expect_error(lambda: load_refiner(path, layout="joint", dtype="fp16"), path, key=name)
    assert load_refiner(path, layout="joint", dtype="bf16") is not None  # the range fits bf16


# ================================================================================================================
# 3. Damaged files keep the "CheckpointError naming the file" promise
# ================================================================================================================


@pytest.mark.parametrize("kind", list(BASE))
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.int8, torch.complex64])
@pytest.mark.parametrize("how", ["load", "convert"])
def test_weights_of_a_non_float_dtype(tmp_path, kind, dtype, how):
    tensors = weights(kind)
    name = SAMPLE_WEIGHT[kind]
    tensors[name] = tensors[name].to(dtype)
    path = tmp_path / f"{kind}.pth"  # pickles, as safetensors cannot store complex numbers
    torch.save(tensors, path)
    error = expect_error(lambda: enter(how, kind, path, tmp_path), path, key=name)
    assert error.value == str(dtype).replace("torch.", "") and "floating-point" in str(error)


def test_sparse_weight_is_refused(tmp_path):
    tensors = weights("umt5")
    name = SAMPLE_WEIGHT["umt5"]
    tensors[name] = tensors[name].to_sparse()
    path = tmp_path / "sparse.pth"
    torch.save(tensors, path)
    expect_error(lambda: load_umt5(path), path, key=name)


BAD_METADATA = [
    ("grn.kind", "bogus"),
    ("grn.kind", "Refiner"),
    ("grn.kind", "tokenizer"),  # a refiner file whose metadata claims another kind
    ("grn.tasks", "t9x"),
    ("grn.tasks", "t2v,c2i"),
    ("grn.tasks", ",,,"),
    ("grn.tasks", "t2v;t2i"),
    ("grn.layout", "diagonal"),
    ("grn.format", "2"),
    ("grn.format", "banana"),
]


@pytest.mark.parametrize("key, value", BAD_METADATA, ids=[f"{k}={v}" for k, v in BAD_METADATA])
@pytest.mark.parametrize("how", ["load", "inspect", "convert", "load_model"])
def test_bad_kind_tasks_layout_format_metadata(tmp_path, key, value, how):
    path = described(tmp_path, "refiner", **{key: value})
    if how == "load_model":
        from grn_core.pipeline import load_model

        tokenizer = write(tmp_path / "tok.safetensors", weights("tokenizer"))
        call = lambda: load_model(path, tokenizer)  # noqa: E731
    else:
        call = lambda: enter(how, "refiner", path, tmp_path)  # noqa: E731
    error = expect_error(call, path, key=key)
    if key == "grn.kind" and value == "bogus":
        assert all(kind in str(error) for kind in BASE)  # the valid kinds are listed
    if key == "grn.tasks":
        assert "t2i" in str(error) and "t2v" in str(error)


def test_good_metadata_still_loads(tmp_path):
    path = described(tmp_path, "refiner")
    info = inspect_checkpoint(path)
    assert (info.kind, info.layout, info.tasks) == ("refiner", "joint", ("t2v", "t2i"))
    assert load_refiner(path).config.depth == base_config("refiner")["depth"]
    c2i = described(tmp_path, "c2i")
    assert load_c2i(c2i).config.in_context_start == 1


def _tiny_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    shutil.copytree(TINY_DIR, folder)
    return folder


def _edit_metadata(path: Path, edit: Callable[[dict], None]) -> None:
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = dict(handle.metadata())
    edit(meta)
    save_file(tensors, str(path), metadata=meta)


TINY_EDITS = [
    ("grn.text_encoder", None),
    ("grn.text_encoder", "{not json"),
    ("grn.text_encoder", "[64]"),
    ("grn.text_encoder", '{"type": "bpe", "dim": 64}'),
    ("grn.text_encoder", '{"type": "hashed", "version": 1}'),
    ("grn.text_encoder", '{"type": "hashed", "version": 1, "dim": "64"}'),
    ("grn.text_encoder", '{"type": "hashed", "version": 1, "dim": 32}'),
    ("grn.text_encoder", '{"type": "hashed", "version": 1, "dim": 64, "max_tokens": 1000000000}'),
    ("grn.text_encoder", '{"type": "hashed", "version": 99, "dim": 64}'),
    ("grn.preview", "nope"),
    ("grn.preview", "[]"),
    ("grn.preview", "{}"),
    ("grn.preview", '{"weight": [[1, 2]], "bias": [0, 0, 0]}'),
    ("grn.preview", '{"weight": "abc", "bias": [0, 0, 0]}'),
    ("grn.preview", '{"weight": [[1, 2, 3], [4, 5]], "bias": [0, 0, 0]}'),
    ("grn.preview", "NAN-WEIGHT"),
    ("grn.defaults", "{"),
    ("grn.defaults", "[32, 32, 9]"),
    ("grn.defaults", '{"width": "big", "height": 32, "frames": 9}'),
    ("grn.defaults", '{"width": -32, "height": 32, "frames": 9}'),
    ("grn.defaults", '{"width": 32, "height": 32, "frames": 1e9}'),
    ("grn.defaults", '{"width": 32, "height": 32, "frames": 9, "negative": 5}'),
    ("grn.adaptive", "1"),
    ("grn.adaptive", '{"warmup": 5}'),
    ("grn.adaptive", '{"b": 15.0, "calibrated": true, "k": 0.0, "min_steps": 10, "warmup": "5"}'),
    ("grn.adaptive", '{"b": NaN, "calibrated": true, "k": 0.0, "min_steps": 10, "warmup": 5}'),
    ("grn.adaptive", '{"b": 15.0, "calibrated": true, "k": 0.0, "min_steps": 3, "warmup": 5}'),
    ("grn.adaptive", '{"b": 15.0, "calibrated": true, "k": 0.0, "min_steps": 10, "warmup": 5, "x": 1}'),
]


@pytest.mark.skipif(not tiny_available(), reason="the tiny model is not in this checkout")
@pytest.mark.parametrize("key, value", TINY_EDITS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(TINY_EDITS)])
def test_damaged_tiny_model_metadata(tmp_path, key, value):
    folder = _tiny_copy(tmp_path)
    path = folder / "refiner.safetensors"

    def edit(meta: dict) -> None:
        if value is None:
            meta.pop(key)
        elif value == "NAN-WEIGHT":
            preview = json.loads(meta[key])
            preview["weight"][0][0] = float("nan")
            meta[key] = json.dumps(preview)
        else:
            meta[key] = value

    _edit_metadata(path, edit)
    expect_error(lambda: load_tiny(folder=folder), path, key=key)


@pytest.mark.skipif(not tiny_available(), reason="the tiny model is not in this checkout")
def test_intact_tiny_copy_loads_from_another_folder(tmp_path):
    model = load_tiny(folder=_tiny_copy(tmp_path))
    assert model.name == "tiny" and model.text_encoder.dim == model.text_channels
    assert model.preview is not None and model.adaptive is not None and model.defaults["frames"] >= 1


# ================================================================================================================
# 4. What a file really is, in words; pickles never run code
# ================================================================================================================


def _pth(tmp_path: Path, kind: str, name: str = "") -> Path:
    path = tmp_path / (name or f"{kind}.pth")
    torch.save(weights(kind), path)
    return path


_NOISE = random.Random(0).randbytes(4096)  # the same bytes every run: b'\xcd\x07,\xd8\xbeo'...

NOT_WEIGHTS = [
    ("random.pth", _NOISE, "starts with bytes"),
    ("random.safetensors", b"\x00\x01" + _NOISE, "starts with bytes"),
    ("binary_lt.pth", b"<\x00\x01\x02" + _NOISE, "starts with bytes"),
    ("empty.pth", b"", "empty"),
    ("empty.safetensors", b"", "empty"),
    ("page.safetensors", b"<!DOCTYPE html><html><body>Sign in</body></html>", "HTML"),
    ("page.pth", b"\n  <html>rate limited</html>", "HTML"),
    ("lfs.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "Git LFS"),
    ("index.safetensors", b'{"weight_map": {"a": "model-00001.safetensors"}}', "JSON"),
    ("packed.pth", gzip.compress(b"x" * 100), "gzip"),
    ("text.ckpt", b"hello, these are not weights\n", "starts with bytes"),
    ("huge_header.safetensors", struct.pack("<Q", 2**62) + b'{"a": 1}', "header-length"),
]


@pytest.mark.parametrize("name, content, words", NOT_WEIGHTS, ids=[n for n, _, _ in NOT_WEIGHTS])
def test_files_that_are_not_weights_are_named_for_what_they_are(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    error = expect_error(lambda: read_checkpoint(path), path)
    assert words in str(error)
    assert "Python objects" not in str(error)
    expect_error(lambda: load_refiner(path), path)


def test_safetensors_named_pth_and_pickle_named_safetensors_load_by_content(tmp_path):
    io = load_golden("umt5_io.safetensors")
    as_pth = tmp_path / "umt5.pth"
    shutil.copy(GOLDEN / "umt5_weights.safetensors", as_pth)
    as_sft = tmp_path / "umt5.safetensors"
    torch.save(weights("umt5"), as_sft)
    for path in (as_pth, as_sft):
        enc = load_umt5(path, dtype=torch.float64)
        assert rel_err(enc(io["ids"], io["mask"]), io["hidden"]) < 1e-5


@pytest.mark.parametrize("fraction", [0.0001, 0.01, 0.5, 0.999])
@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy"])
def test_truncated_files_say_truncated(tmp_path, fraction, fmt):
    if fmt == "safetensors":
        good = GOLDEN / "refiner_joint_weights.safetensors"
        path = tmp_path / "cut.safetensors"
    else:
        good = tmp_path / "good.pth"
        torch.save(weights("refiner"), good, _use_new_zipfile_serialization=fmt == "zip")
        path = tmp_path / "cut.pth"
    data = good.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    error = expect_error(lambda: load_refiner(path, layout="joint"), path)
    assert "truncated" in str(error) or "empty" in str(error) or "damaged" in str(error)
    assert "Python objects" not in str(error)


class _System:
    """Runs a shell command when unpickled by anything but a weights-only reader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_System, _Eval])
@pytest.mark.parametrize("container", ["torch-zip", "torch-legacy", "raw-pickle-2", "raw-pickle-4", "raw-pickle-5",
                                       "named-safetensors"])
def test_crafted_pickle_never_runs_code(tmp_path, payload, container):
    marker = tmp_path / "pwned"
    obj = {"trainer": {"gpt_fsdp": weights("refiner")}, "hook": payload(marker)}
    path = tmp_path / ("evil.safetensors" if container == "named-safetensors" else "evil.pth")
    if container == "torch-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif container.startswith("raw-pickle"):
        path.write_bytes(pickle.dumps({"hook": payload(marker)}, protocol=int(container[-1])))
    else:
        torch.save(obj, path)
    for call in (lambda: load_refiner(path), lambda: inspect_checkpoint(path), lambda: read_checkpoint(path),
                 lambda: convert(path, tmp_path / "out.safetensors")):
        error = expect_error(call, path)
        assert "weights_only" in str(error)
        assert ("system" if payload is _System else "eval") in str(error)  # the refused global is named
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


# ================================================================================================================
# 5. Nothing half-written, nothing on disk damaged
# ================================================================================================================


def _bad_sources(tmp_path: Path) -> dict[str, Path]:
    nan = weights("refiner")
    nan[SAMPLE_WEIGHT["refiner"]][0] = float("nan")
    ints = weights("refiner")
    ints[SAMPLE_WEIGHT["refiner"]] = ints[SAMPLE_WEIGHT["refiner"]].to(torch.int32)
    deep = base_config("refiner")
    deep["depth"] = 1_000_000
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((GOLDEN / "refiner_joint_weights.safetensors").read_bytes()[:50_000])
    return {
        "nan": write(tmp_path / "nan.safetensors", nan),
        "int32": write(tmp_path / "int32.safetensors", ints),
        "depth": described(tmp_path, "refiner", deep, name="deep.safetensors"),
        "kind": described(tmp_path, "refiner", name="kind.safetensors", **{"grn.kind": "bogus"}),
        "cut": cut,
        "missing": tmp_path / "missing.pth",
    }


@pytest.mark.parametrize("bad", ["nan", "int32", "depth", "kind", "cut", "missing"])
def test_failed_convert_leaves_the_existing_destination_untouched(tmp_path, bad):
    dst = tmp_path / "out" / "model.safetensors"
    good = convert(_pth(tmp_path, "refiner", "GRN_T2V_2B.pth"), dst)
    before = dst.read_bytes()
    source = _bad_sources(tmp_path)[bad]
    expect_error(lambda: convert(source, dst, layout="joint"), source)
    assert dst.read_bytes() == before
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.safetensors"]  # no partial file left
    assert load_refiner(good).config.layout == "prefix"


def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    dst = tmp_path / "model.safetensors"
    convert(_pth(tmp_path, "umt5"), dst)
    before = dst.read_bytes()

    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    error = expect_error(lambda: convert(_pth(tmp_path, "umt5"), dst), dst)
    assert "No space left" in str(error)
    assert dst.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_convert_output_places_that_cannot_be_written(tmp_path):
    src = _pth(tmp_path, "umt5")
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    expect_error(lambda: convert(src, folder), folder)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    under_file = blocker / "out.safetensors"
    expect_error(lambda: convert(src, under_file), under_file)
    wrong_suffix = tmp_path / "out.pth"
    expect_error(lambda: convert(src, wrong_suffix), wrong_suffix)
    assert not wrong_suffix.exists()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            expect_error(lambda: convert(src, locked / "out.safetensors"), locked / "out.safetensors")
        finally:
            locked.chmod(0o700)


def test_convert_cli_reports_a_folder_without_traceback(tmp_path, capsys):
    src = _pth(tmp_path, "umt5")
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    assert cli_main(["convert", str(src), str(folder)]) == 2
    err = capsys.readouterr().err
    assert "folder" in err and "Traceback" not in err


def test_converted_file_keeps_permissions_and_loads(tmp_path):
    dst = tmp_path / "model.safetensors"
    convert(_pth(tmp_path, "umt5"), dst)
    umask = os.umask(0)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o666 & ~umask
    dst.chmod(0o640)
    convert(_pth(tmp_path, "umt5"), dst)
    assert dst.stat().st_mode & 0o777 == 0o640
    assert checkpoint_metadata is not None and load_umt5(dst) is not None


def test_check_finite_names_the_first_bad_tensor():
    tensors = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan"), float("inf")]), "c": torch.ones(2)}
    with pytest.raises(CheckpointError) as info:
        check_finite("x.safetensors", tensors)
    assert (info.value.key, info.value.value, info.value.path) == ("b", 2, Path("x.safetensors"))


# ================================================================================================================
# Fuzz: random bytes behind every magic number, and single-byte damage anywhere in the structure of real files
# ================================================================================================================

_PREFIXES = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", struct.pack("<Q", 40) + b'{"a": {"dtype": "F32", ']


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("prefix", _PREFIXES, ids=["none", "zip", "pickle2", "pickle4", "safetensors"])
def test_random_bytes_behind_any_magic_number(tmp_path, suffix, prefix):
    rng = random.Random(f"{suffix}{prefix!r}")
    for i in range(25):
        path = tmp_path / f"blob{i}{suffix}"
        path.write_bytes(prefix + rng.randbytes(rng.choice([0, 1, 7, 100, 5000])))
        expect_error(lambda: load_umt5(path), path)


def _damaged_copies(tmp_path: Path, good: Path, count: int, span: int, seed: int):
    data = good.read_bytes()
    rng = random.Random(seed)
    for i in range(count):
        damaged = bytearray(data)
        at = rng.randrange(min(span, len(data))) if i % 2 else len(data) - 1 - rng.randrange(min(span, len(data)))
        damaged[at] ^= 1 << rng.randrange(8)
        path = tmp_path / f"damaged{i}{good.suffix}"
        path.write_bytes(bytes(damaged))
        yield path


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy"])
def test_single_bit_damage_is_loaded_or_refused_never_crashes(tmp_path, fmt):
    """A flipped bit in a header, a pickle or a zip directory either still loads (it hit unchecked weight data or
    padding) or is a CheckpointError naming the file — never another exception."""
    if fmt == "safetensors":
        good = tmp_path / "good.safetensors"
        shutil.copy(GOLDEN / "umt5_weights.safetensors", good)
    else:
        good = tmp_path / "good.pth"
        torch.save(weights("umt5"), good, _use_new_zipfile_serialization=fmt == "zip")
    outcomes = {"loaded": 0, "refused": 0}
    for path in _damaged_copies(tmp_path, good, 60, 4096, seed=["safetensors", "zip", "legacy"].index(fmt)):
        try:
            load_umt5(path)
            outcomes["loaded"] += 1
        except CheckpointError as error:
            assert error.path == path and str(path) in str(error)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0, outcomes
