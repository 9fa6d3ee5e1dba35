"""GGUF weights: block quantisation against the ``gguf`` package's numpy reference, the file round trip, the fallback
rule, GGUFLinear, loading a refiner, and bad files (foreign architecture, unsupported type, truncation, half writes).

The numpy reference (``gguf.quants``, the llama.cpp project's Python package) is a test requirement; the library
itself reads and writes GGUF without it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grn_core
from grn_core.checkpoint_files import META_CONFIG, META_KIND, META_LAYOUT, META_TASKS, CheckpointError
from grn_core.formats import (
    FALLBACKS,
    QTYPES,
    SUPPORTED,
    GGUFLinear,
    GGUFWeight,
    apply_gguf_weights,
    checkpoint_to_gguf,
    dequantize,
    pick_qtype,
    plan_gguf,
    quantize,
    read_gguf,
    read_gguf_checkpoint,
    write_gguf,
)
from grn_core.formats import gguf_file, gguf_quants, nonfinite_blocks
from grn_core.refiner import GRNRefiner, RefinerConfig

try:
    import gguf  # the numpy reference and an independent reader/writer
except ImportError:  # pragma: no cover - a test requirement
    gguf = None

needs_gguf = pytest.mark.skipif(gguf is None, reason="the gguf package (requirements-test.txt) is the reference")

WRITTEN = ("Q8_0", "Q5_0", "Q5_K", "Q4_0", "Q4_K")  # what write_gguf produces (requested or as a fallback)
READ_ONLY = ("Q4_1", "Q5_1", "Q6_K")  # other files' types we decode too
TINY = Path(grn_core.__file__).parent / "assets" / "tiny" / "refiner.safetensors"


def numpy_reference(weight: GGUFWeight) -> np.ndarray:
    return gguf.quants.dequantize(weight.data.numpy(), gguf.GGMLQuantizationType[weight.qtype])


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * 0.05
    x[0, :32] = 0.0  # an all-zero block
    x[1, 7] = 1.5  # an outlier
    x[2, :64] = -0.25  # a constant block
    return x


def small_state() -> dict[str, torch.Tensor]:
    """Names as a refiner's: block matrices with rows of 512 (K-quants fit), 96 (only 32-blocks fit) and 40 (no
    block fits), a norm, a bias, and a head that stays F32."""
    gen = torch.Generator().manual_seed(1)
    return {
        "block_chunks.0.module.0.attn.q_proj.weight": torch.randn(64, 512, generator=gen) * 0.02,
        "block_chunks.0.module.0.mlp.down_proj.weight": torch.randn(64, 96, generator=gen) * 0.02,
        "block_chunks.0.module.0.mlp.odd_proj.weight": torch.randn(8, 40, generator=gen) * 0.02,
        "block_chunks.0.module.0.input_layernorm.weight": torch.rand(64, generator=gen) + 0.5,
        "head.proj.weight": torch.randn(16, 64, generator=gen),
        "head.proj.bias": torch.randn(16, generator=gen),
    }


def policy_quantised(shapes) -> set[str]:
    """The names the default policy (``gguf_file.default_select``) quantises, restated from its rule: every 2-D
    ``.weight`` matrix except norms and the modules kept in float (``KEEP_PREFIXES``: head, bit embedding, ...)."""
    return {name for name, shape in shapes.items()
            if len(shape) == 2 and name.endswith(".weight") and not name.startswith(gguf_file.KEEP_PREFIXES)
            and "norm" not in name.rsplit(".", 2)[-2]}


def tiny_shapes() -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(TINY), "pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


# ---------------------------------------------------------------------------------------------------------------------
# Block layouts against the numpy reference


@needs_gguf
@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_0", "BF16", "F16"])
def test_quantize_matches_reference_bit_for_bit(qtype):
    x = gaussian(48, 512)
    ours = quantize(x, qtype).data.numpy().reshape(-1)
    ref = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[qtype]).view(np.uint8).reshape(-1)
    assert np.array_equal(ours, ref)


@needs_gguf
@pytest.mark.parametrize("qtype", WRITTEN + ("BF16", "F16", "F32"))
def test_dequantize_matches_reference_bit_for_bit(qtype):
    weight = quantize(gaussian(48, 512), qtype)
    ours = dequantize(weight).numpy()
    assert ours.dtype == np.float32 and ours.shape == (48, 512)
    assert np.array_equal(ours, numpy_reference(weight))


@needs_gguf
@pytest.mark.parametrize("qtype", WRITTEN + READ_ONLY)
def test_dequantize_arbitrary_blocks_matches_reference(qtype):
    """Random bytes reach every code, scale and bit pattern of the layout (non-finite f16 scales included)."""
    kind = QTYPES[qtype]
    gen = torch.Generator().manual_seed(7)
    raw = torch.randint(0, 256, (24, 512 // kind.block * kind.nbytes), dtype=torch.uint8, generator=gen)
    weight = GGUFWeight(raw, qtype, (24, 512))
    ours = dequantize(weight).numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        ref = numpy_reference(weight)
    assert np.array_equal(ours, ref, equal_nan=True)


def test_dequantize_dtype_device_and_plain_tensors():
    weight = quantize(gaussian(16, 256), "Q4_K")
    half = dequantize(weight, torch.bfloat16, "cpu")
    assert half.dtype == torch.bfloat16 and half.shape == (16, 256)
    assert torch.equal(half, dequantize(weight).to(torch.bfloat16))
    plain = torch.randn(3, 4)
    assert torch.equal(dequantize(plain, torch.float64), plain.double())
    assert weight.to("cpu") is weight and not weight.is_floating_point() and weight.numel() == 16 * 256


@pytest.mark.parametrize("qtype", WRITTEN + READ_ONLY)
def test_large_matrices_decode_in_pieces_to_the_same_values(monkeypatch, qtype):
    """Above ``_DECODE_WEIGHTS`` a matrix is decoded piece by piece into its output (bounded temporaries)."""
    kind = QTYPES[qtype]
    gen = torch.Generator().manual_seed(11)
    raw = torch.randint(0, 256, (12, 512 // kind.block * kind.nbytes), dtype=torch.uint8, generator=gen)
    weight = GGUFWeight(raw, qtype, (12, 512))
    whole = {dtype: dequantize(weight, dtype) for dtype in (torch.float32, torch.bfloat16)}
    monkeypatch.setattr(gguf_quants, "_DECODE_WEIGHTS", 3 * kind.block * 7)  # 3 * 7 blocks a piece: the last one shorter
    for dtype, expected in whole.items():
        pieces = dequantize(weight, dtype)
        assert pieces.dtype == dtype and pieces.shape == (12, 512)
        assert torch.equal(pieces.isnan(), expected.isnan())
        assert torch.equal(pieces.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("qtype", WRITTEN + READ_ONLY)
def test_nonfinite_blocks_reads_the_scales_alone(qtype):
    kind = QTYPES[qtype]
    gen = torch.Generator().manual_seed(5)
    raw = torch.randint(0, 256, (6, 512 // kind.block * kind.nbytes), dtype=torch.uint8, generator=gen)
    fields = gguf_quants._HALF_FIELDS[qtype]
    blocks = raw.view(-1, kind.nbytes)
    for offset in fields:  # every scale / min finite (0x3C00 = 1.0) ...
        blocks[:, offset:offset + 2] = torch.tensor([0x00, 0x3C], dtype=torch.uint8)
    weight = GGUFWeight(raw, qtype, (6, 512))
    assert nonfinite_blocks(weight) == 0 and bool(torch.isfinite(dequantize(weight)).all())
    blocks[2, fields[-1]:fields[-1] + 2] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # ... but one Inf
    blocks[5, fields[0]:fields[0] + 2] = torch.tensor([0x01, 0x7E], dtype=torch.uint8)  # and one NaN
    assert nonfinite_blocks(weight) == 2
    decoded = dequantize(weight).reshape(-1, kind.block)
    assert (~torch.isfinite(decoded)).any(dim=1).nonzero().flatten().tolist() == [2, 5]


def test_quantisation_error_ranks_as_expected():
    """Relative RMS error on Gaussian weights: K-quants beat the 32-block types of the same width."""
    x = torch.randn(128, 512, generator=torch.Generator().manual_seed(3))
    err = {q: float((dequantize(quantize(x, q)) - x).norm() / x.norm()) for q in WRITTEN}
    assert err["Q8_0"] < 0.01
    assert err["Q5_K"] < err["Q5_0"] < 0.05
    assert err["Q4_K"] < err["Q4_0"] < 0.1
    assert err["Q5_K"] < err["Q4_K"]


def test_quantize_refuses_bad_rows_and_values():
    with pytest.raises(ValueError, match="whole number of Q4_K blocks"):
        quantize(torch.randn(4, 384), "Q4_K")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(torch.tensor([[float("nan")] + [0.0] * 31]), "Q8_0")
    with pytest.raises(ValueError, match="can be read but not written"):
        quantize(torch.randn(1, 256), "Q6_K")


# ---------------------------------------------------------------------------------------------------------------------
# Files


@needs_gguf
@pytest.mark.parametrize("qtype", ["q8_0", "q5_k", "q4_k", "bf16", "f16", "f32"])
def test_round_trip_each_type(tmp_path, qtype):
    state = small_state()
    summary = write_gguf(state, tmp_path / "m.gguf", qtype, {META_KIND: "refiner"})
    tensors, _ = read_gguf(tmp_path / "m.gguf")
    assert list(tensors) == list(state)
    for name, original in state.items():
        got = summary.types[name]
        stored = tensors[name]
        assert tuple(stored.shape) == tuple(original.shape)
        if QTYPES[got].quantized:
            assert isinstance(stored, GGUFWeight) and stored.qtype == got
            expected = quantize(original, got)
            assert torch.equal(stored.data, expected.data)  # the file holds exactly the in-memory quantisation
            assert np.array_equal(dequantize(stored).numpy(), numpy_reference(stored))
        else:
            assert isinstance(stored, torch.Tensor) and stored.dtype == QTYPES[got].torch_dtype
            assert torch.equal(stored, original.to(stored.dtype))
    # What is never quantised: 1-D tensors and the head.
    for name in ("block_chunks.0.module.0.input_layernorm.weight", "head.proj.weight", "head.proj.bias"):
        assert summary.types[name] == "F32"


def test_fallback_rule():
    assert FALLBACKS["Q5_K"] == ("Q5_K", "Q5_0", "Q8_0", "F16")
    assert FALLBACKS["Q4_K"] == ("Q4_K", "Q4_0", "Q8_0", "F16")
    assert [pick_qtype("q4_k", (8, n)) for n in (256, 768, 384, 96, 40)] == ["Q4_K", "Q4_K", "Q4_0", "Q4_0", "F16"]
    assert [pick_qtype("q5_k", (8, n)) for n in (512, 128, 33)] == ["Q5_K", "Q5_0", "F16"]
    assert [pick_qtype("q8_0", (8, n)) for n in (64, 100)] == ["Q8_0", "F16"]
    assert pick_qtype("q8_0", (8, 100), absmax=1e5) == "F32"  # beyond the F16 range


@needs_gguf
def test_fallbacks_are_recorded_in_the_file(tmp_path):
    summary = write_gguf(small_state(), tmp_path / "m.gguf", "q4_k")
    assert summary.fallbacks == {"block_chunks.0.module.0.mlp.down_proj.weight": ("Q4_K", "Q4_0"),
                                 "block_chunks.0.module.0.mlp.odd_proj.weight": ("Q4_K", "F16")}
    _, metadata = read_gguf(tmp_path / "m.gguf")
    recorded = json.loads(metadata["grn.quantization"])
    assert recorded == {"requested": "Q4_K", "counts": {"F16": 1, "F32": 3, "Q4_0": 1, "Q4_K": 1},
                        "fallbacks": {"block_chunks.0.module.0.mlp.down_proj.weight": "Q4_0",
                                      "block_chunks.0.module.0.mlp.odd_proj.weight": "F16"}}
    # The per-tensor types, as an independent reader sees them.
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    seen = {t.name: t.tensor_type.name for t in reader.tensors}
    assert seen == summary.types
    assert seen["block_chunks.0.module.0.attn.q_proj.weight"] == "Q4_K"


@needs_gguf
def test_file_is_standard_gguf(tmp_path):
    """llama.cpp's own Python reader sees the same architecture, shapes (innermost first) and bytes."""
    state = small_state()
    write_gguf(state, tmp_path / "m.gguf", "q5_k", {META_KIND: "refiner"})
    ours, _ = read_gguf(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["general.architecture"].contents() == "grn"
    assert reader.fields["grn.kind"].contents() == "refiner"
    for tensor in reader.tensors:
        assert [int(d) for d in tensor.shape] == list(reversed(state[tensor.name].shape))
        mine = ours[tensor.name]
        mine_bytes = mine.data if isinstance(mine, GGUFWeight) else mine.contiguous().view(torch.uint8)
        assert np.array_equal(np.asarray(tensor.data).view(np.uint8).reshape(-1), mine_bytes.numpy().reshape(-1))


@needs_gguf
def test_reads_files_of_other_writers(tmp_path):
    """A file written by the gguf package (Q8_0 via its numpy quantiser, an F16 matrix, an F32 vector)."""
    x = gaussian(8, 64)
    writer = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "grn")
    writer.add_string("grn.kind", "refiner")
    writer.add_tensor("a.weight", gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("b.weight", x.numpy().astype(np.float16))
    writer.add_tensor("c.bias", x[0].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors, metadata = read_gguf(tmp_path / "other.gguf")
    assert metadata["grn.kind"] == "refiner"
    assert tensors["a.weight"].qtype == "Q8_0" and tuple(tensors["a.weight"].shape) == (8, 64)
    assert torch.equal(tensors["a.weight"].dequantize(), dequantize(quantize(x, "Q8_0")))
    assert tensors["b.weight"].dtype == torch.float16 and torch.equal(tensors["b.weight"], x.half())
    assert torch.equal(tensors["c.bias"], x[0])


def test_metadata_round_trip(tmp_path):
    config = {"width": 128, "depth": 4, "layout": "joint"}
    metadata = {META_KIND: "refiner", META_CONFIG: json.dumps(config), META_LAYOUT: "joint", META_TASKS: "t2v,t2i",
                "grn.source": "test — ünïcode ✓", "grn.empty": ""}
    write_gguf(small_state(), tmp_path / "m.gguf", "q8_0", metadata)
    _, read = read_gguf(tmp_path / "m.gguf")
    assert {k: read[k] for k in metadata} == metadata
    assert read["general.architecture"] == "grn"
    raw = read_gguf_checkpoint(tmp_path / "m.gguf")
    assert raw.config_dict == config and raw.metadata[META_TASKS] == "t2v,t2i"
    with pytest.raises(TypeError, match="strings to strings"):
        write_gguf(small_state(), tmp_path / "x.gguf", "q8_0", {"grn.depth": 4})
    with pytest.raises(ValueError, match="'grn', not 'flux'"):
        write_gguf(small_state(), tmp_path / "x.gguf", "q8_0", {"general.architecture": "flux"})
    with pytest.raises(ValueError, match="cannot be written"):
        write_gguf(small_state(), tmp_path / "x.gguf", "q6_k")
    assert not (tmp_path / "x.gguf").exists()


def test_tiny_refiner_file_carries_its_metadata(tmp_path):
    summary = checkpoint_to_gguf(TINY, tmp_path / "tiny.gguf", "q4_k")
    raw = read_gguf_checkpoint(tmp_path / "tiny.gguf")
    assert raw.metadata[META_KIND] == "refiner" and raw.config_dict["width"] == 128
    shapes = tiny_shapes()
    quantised = policy_quantised(shapes)
    # The block matrices and the small projections (text_proj 64 wide, the step-token MLP) are quantised; the head,
    # the bit embedding and the norms are not.
    assert {n for n in quantised if ".module." not in n} == {"text_proj.weight", "pt_embedder.mlp.0.weight",
                                                             "pt_embedder.mlp.2.weight"}
    assert {n for n, t in summary.types.items() if t != "F32"} == quantised
    # Width 128 and SwiGLU 384: rows that are no multiple of 256 (every block matrix, text_proj) fall back to Q4_0;
    # the step-token MLP's first layer (rows of 256) keeps Q4_K.
    expected = {n: ("Q4_K", "Q4_0") for n in quantised if shapes[n][1] % 256}
    assert summary.fallbacks == expected and len(expected) == len(quantised) - 1
    assert summary.types["pt_embedder.mlp.0.weight"] == "Q4_K" and summary.types["head.proj.weight"] == "F32"
    assert summary.bytes < 0.25 * TINY.stat().st_size


# ---------------------------------------------------------------------------------------------------------------------
# GGUFLinear and loading


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_gguf_linear_forward_equals_linear_with_decoded_weight(qtype):
    torch.manual_seed(0)
    plain = nn.Linear(256, 48)
    layer = GGUFLinear.from_linear(plain, qtype, torch.float32)
    decoded = dequantize(layer.quantized_weight)
    x = torch.randn(5, 7, 256)
    assert torch.equal(layer(x), F.linear(x, decoded, plain.bias.detach()))
    assert torch.equal(layer.weight, decoded) and layer.weight.dtype == torch.float32
    # The call's dtype wins; the blocks never change.
    blocks = layer.weight_blocks.clone()
    out16 = layer(x.bfloat16())
    assert out16.dtype == torch.bfloat16
    assert torch.equal(out16, F.linear(x.bfloat16(), decoded.bfloat16(), plain.bias.detach().bfloat16()))
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.weight_blocks, blocks)
    assert f"storage={qtype}" in repr(layer) and "compute=torch.bfloat16" in repr(layer)
    # The state dict speaks the plain Linear's language.
    state = layer.state_dict()
    assert set(state) == {"weight", "bias"} and state["weight"].dtype == torch.bfloat16
    again = GGUFLinear(256, 48, True, qtype, torch.float32)
    again.load_state_dict({"weight": layer.quantized_weight, "bias": plain.bias.detach()})
    assert torch.equal(again.weight_blocks, blocks)


def test_block_offload_streams_the_quantised_bytes():
    """Streamed blocks move their GGUF blocks, not float weights; the results do not change."""
    from grn_core.runtime.offload import BlockOffload, module_bytes

    torch.manual_seed(0)
    blocks = [nn.Sequential(GGUFLinear.from_linear(nn.Linear(256, 256, bias=False), "q8_0", torch.float32))
              for _ in range(3)]
    x = torch.randn(4, 256)
    expected = x
    for block in blocks:
        expected = block(expected)
    offload = BlockOffload(blocks, [1, 2], simulate=True)
    out = x
    for block in offload.blocks_on("cpu"):
        out = block(out)
    assert torch.equal(out, expected) and offload.peak_streamed_on_device >= 1
    assert offload.streamed_bytes == 2 * 256 * 272 == 2 * module_bytes(blocks[0])  # 8.5 bits per weight


def test_gguf_linear_refuses_rows_that_fit_no_block():
    with pytest.raises(ValueError, match="keep this layer as a plain Linear"):
        GGUFLinear.from_linear(nn.Linear(40, 8), "q4_k")


def tiny_inputs(config: RefinerConfig):
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2, (1, config.bits, 2, 2, 2), dtype=torch.uint8, generator=gen)
    text = torch.randn(5, config.text_channels, generator=gen)
    return bits, 0.4, text, text[:1]


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k"])
def test_refiner_with_gguf_weights_equals_plain_refiner_with_decoded_weights(tmp_path, qtype):
    checkpoint_to_gguf(TINY, tmp_path / "tiny.gguf", qtype)
    raw = read_gguf_checkpoint(tmp_path / "tiny.gguf")
    config = RefinerConfig.from_dict(raw.config_dict)
    with torch.device("meta"):
        model = GRNRefiner(config)
    replaced = apply_gguf_weights(model, raw.tensors, path=tmp_path / "tiny.gguf")
    # Every quantised matrix (the blocks' and the small projections') became a GGUFLinear, nothing else did.
    assert {f"{name}.weight" for name in replaced} == policy_quantised(tiny_shapes())
    assert isinstance(model.text_proj, GGUFLinear) and isinstance(model.pt_embedder.mlp[0], GGUFLinear)
    assert isinstance(model.block_chunks[0].module[0].mlp.down_proj, GGUFLinear)
    assert type(model.word_embed) is nn.Linear and type(model.head.proj) is nn.Linear
    fresh = GRNRefiner(config)
    for name, buf in fresh.named_buffers():  # tables computed in __init__ are in no file
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = buf
    plain = GRNRefiner(config)
    plain.load_state_dict({k: dequantize(v) for k, v in raw.tensors.items()})
    args = tiny_inputs(config)
    ours = model.eval().step_logits(*args)
    ref = plain.eval().step_logits(*args)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


def test_apply_refuses_a_mismatch_and_leaves_the_model_untouched():
    state = small_state()
    model = nn.Module()
    model.q = nn.Linear(512, 64, bias=False)
    tensors = {"q.weight": quantize(state["block_chunks.0.module.0.attn.q_proj.weight"][:, :256], "Q8_0")}
    with pytest.raises(CheckpointError, match=r"q.weight \(64, 256\) vs \(64, 512\)"):
        apply_gguf_weights(model, tensors, path="bad.gguf")
    assert type(model.q) is nn.Linear
    tensors = {"q.weight": quantize(state["block_chunks.0.module.0.attn.q_proj.weight"], "Q8_0"),
               "extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="1 unexpected"):
        apply_gguf_weights(model, tensors)
    assert type(model.q) is nn.Linear


# ---------------------------------------------------------------------------------------------------------------------
# Bad files


def handmade_gguf(architecture: str | None, tensors: list[tuple[str, tuple[int, ...], int, bytes]]) -> bytes:
    """A minimal GGUF v3 file written independently of grn_core: metadata + (name, torch shape, type id, bytes)."""
    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    kv = b"" if architecture is None else string("general.architecture") + struct.pack("<I", 8) + string(architecture)
    infos, data = b"", b""
    for name, shape, type_id, payload in tensors:
        dims = list(reversed(shape))
        infos += string(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
        infos += struct.pack("<IQ", type_id, len(data))
        data += payload + b"\0" * (-len(payload) % 32)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1 if architecture else 0) + kv + infos
    return head + b"\0" * (-len(head) % 32) + data


def test_bad_files_are_refused_with_the_file_named(tmp_path):
    vector = torch.arange(8, dtype=torch.float32)
    good = tmp_path / "good.gguf"
    good.write_bytes(handmade_gguf("grn", [("v", (8,), 0, vector.numpy().tobytes())]))
    tensors, metadata = read_gguf(good)
    assert torch.equal(tensors["v"], vector) and metadata["general.architecture"] == "grn"

    foreign = tmp_path / "flux-Q4_K.gguf"
    foreign.write_bytes(handmade_gguf("flux", [("v", (8,), 0, vector.numpy().tobytes())]))
    with pytest.raises(CheckpointError, match="not a GRN model: its architecture .* is 'flux'") as error:
        read_gguf(foreign)
    assert error.value.path == foreign and str(foreign) in str(error.value)

    anonymous = tmp_path / "anonymous.gguf"
    anonymous.write_bytes(handmade_gguf(None, [("v", (8,), 0, vector.numpy().tobytes())]))
    with pytest.raises(CheckpointError, match="architecture .* is not recorded"):
        read_gguf(anonymous)

    q2k = tmp_path / "q2k.gguf"
    q2k.write_bytes(handmade_gguf("grn", [("w", (1, 256), 10, bytes(84))]))
    with pytest.raises(CheckpointError, match="GGML type Q2_K") as error:
        read_gguf(q2k)
    message = str(error.value)
    assert str(q2k) in message and all(name in message for name in SUPPORTED)

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(not_gguf)


def test_truncated_file_is_refused_at_every_cut(tmp_path):
    full = tmp_path / "full.gguf"
    write_gguf(small_state(), full, "q4_k", {META_KIND: "refiner"})
    data = full.read_bytes()
    header_end = data.index(b"head.proj.bias") + 40  # somewhere in the tensor infos
    for cut in (3, 20, header_end - 30, len(data) - 4000, len(data) - 1):
        cut_file = tmp_path / f"cut{cut}.gguf"
        cut_file.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|not a GGUF") as error:
            read_gguf(cut_file)
        assert error.value.path == cut_file


class Interrupted(RuntimeError):
    pass


def test_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "model.gguf"
    calls = []
    real = gguf_file._write_tensor

    def failing(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise Interrupted("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_file, "_write_tensor", failing)
    with pytest.raises(Interrupted):
        write_gguf(small_state(), target, "q8_0")
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []  # no file, no temporary left
    monkeypatch.setattr(gguf_file, "_write_tensor", real)

    write_gguf(small_state(), target, "q8_0")
    before = target.read_bytes()
    broken = dict(small_state())
    broken["head.proj.bias"] = torch.tensor([float("inf")] * 16)  # the last tensor: found only while writing
    with pytest.raises(ValueError, match="'head.proj.bias'.*NaN or Inf"):
        write_gguf(broken, target, "q4_k")
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_plan_needs_no_weights():
    with torch.device("meta"):
        state = GRNRefiner(RefinerConfig(width=256, depth=2, heads=2, kv_heads=2, mlp_hidden=768, block_chunks=1,
                                         text_channels=64, latent_channels=8)).state_dict()
    plan = plan_gguf(state, "q4_k")
    quantised = policy_quantised({name: tuple(t.shape) for name, t in state.items()})
    # Width 256: every block matrix and the step-token MLP hold K-quant rows; text_proj (64 wide) falls back.
    assert plan.fallbacks == {"text_proj.weight": ("Q4_K", "Q4_0")}
    assert plan.counts == {"Q4_K": len(quantised) - 1, "Q4_0": 1, "F32": len(state) - len(quantised)}
    assert plan.data_bytes > 0
