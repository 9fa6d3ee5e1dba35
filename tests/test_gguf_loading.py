"""GGUF refiners through the normal doors: ``convert`` to ``.gguf``, ``load_refiner`` / ``load_c2i`` /
``load_model`` / ``inspect_checkpoint`` / ``python -m grn_core`` / the Load GRN node, and bad GGUF files refused
everywhere with the file named (foreign architecture, unsupported type, truncation, NaN scales), nothing half-loaded.

The GGUF block formats themselves (bit-exact against the ``gguf`` package, the writer, ``GGUFLinear``) are tested in
``tests/test_gguf.py``.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import grn_core
from grn_core import checkpoints
from grn_core.checkpoint_files import META_CONFIG, META_FORMAT, META_KIND, META_LAYOUT, META_TASKS, CheckpointError
from grn_core.checkpoints import inspect_checkpoint, load_c2i, load_refiner, load_tokenizer, load_umt5, read_weights
from grn_core.convert import convert
from grn_core.formats import SUPPORTED, GGUFLinear, GGUFWeight, dequantize, gguf_file, read_gguf, write_gguf
from grn_core.pipeline import load_model
from grn_core.runtime.offload import module_bytes
from grn_core.runtime.precision import Precision, cast_network
from tests._golden import GOLDEN, load_golden

TINY_DIR = Path(grn_core.__file__).parent / "assets" / "tiny"
TINY = TINY_DIR / "refiner.safetensors"
TINY_TOKENIZER = TINY_DIR / "tokenizer.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny refiner as GGUF of each type, and float32 files holding exactly the decoded Q8_0 / Q4_K weights."""
    folder = tmp_path_factory.mktemp("gguf")
    out = {}
    for qtype in ("q8_0", "q5_k", "q4_k", "bf16", "f16"):
        out[qtype] = convert(TINY, folder / f"tiny.{qtype.upper()}.gguf", qtype)
    for qtype in ("q8_0", "q4_k"):
        out[f"{qtype}-decoded"] = convert(out[qtype], folder / f"tiny.{qtype}-decoded.safetensors")
    return out


def tiny_inputs(config):
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2, (1, config.bits, 2, 3, 2), dtype=torch.uint8, generator=gen)
    text = torch.randn(5, config.text_channels, generator=gen)
    return bits, 0.4, text, text[:1]


def gguf_layers(model: nn.Module) -> dict[str, GGUFLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, GGUFLinear)}


def policy_quantised(path: Path) -> set[str]:
    """The weights of a float file the default GGUF policy quantises, restated from its rule: every 2-D ``.weight``
    matrix except norms and the modules kept in float (``KEEP_PREFIXES``: head, bit embedding, ...)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    return {name for name, shape in shapes.items()
            if len(shape) == 2 and name.endswith(".weight") and not name.startswith(gguf_file.KEEP_PREFIXES)
            and "norm" not in name.rsplit(".", 2)[-2]}


# The tiny refiner's quantised matrices: the four blocks' and the text / step-token projections (as GGUFLinear names).
TINY_QUANTISED = {name.removesuffix(".weight") for name in policy_quantised(TINY)}


# ---------------------------------------------------------------------------------------------------------------------
# convert


@pytest.mark.parametrize("qtype, stored", [("q8_0", "Q8_0"), ("q5_k", "Q5_0"), ("q4_k", "Q4_0"), ("bf16", "BF16"),
                                           ("f16", "F16")])
def test_convert_writes_a_self_describing_gguf(files, qtype, stored):
    tensors, metadata = read_gguf(files[qtype])
    assert metadata["general.architecture"] == "grn" and metadata[META_KIND] == "refiner"
    assert metadata[META_LAYOUT] == "joint" and metadata[META_TASKS] == "t2v,t2i" and metadata[META_FORMAT] == "1"
    assert json.loads(metadata[META_CONFIG])["width"] == 128
    quantization = json.loads(metadata["grn.quantization"])
    # Every matrix the policy picks is stored as `stored`, the rest (head, bit embedding, norms, biases) as F32 ...
    quantised = {name for name, t in tensors.items() if not (isinstance(t, torch.Tensor) and t.dtype == torch.float32)}
    assert quantised == {f"{name}.weight" for name in TINY_QUANTISED} and "text_proj.weight" in quantised
    counts = {stored: len(quantised), "F32": len(tensors) - len(quantised)}
    # ... except that a K-quant keeps its type where the rows allow it: the step-token MLP's first layer (rows of 256).
    # The other rows (128, 384, text_proj's 64) are no multiple of 256: K-quants fall back to the 32-block types.
    if qtype in ("q5_k", "q4_k"):
        counts = {stored: len(quantised) - 1, qtype.upper(): 1, "F32": counts["F32"]}
        assert tensors["pt_embedder.mlp.0.weight"].qtype == qtype.upper()
    assert quantization["requested"] == qtype.upper() and quantization["counts"] == dict(sorted(counts.items()))
    block = tensors["block_chunks.0.module.0.mlp.down_proj.weight"]
    if stored.startswith("Q"):
        assert isinstance(block, GGUFWeight) and block.qtype == stored
    else:
        assert block.dtype == getattr(torch, {"BF16": "bfloat16", "F16": "float16"}[stored])
    assert tensors["head.proj.weight"].dtype == torch.float32  # the head, norms and embeddings stay F32
    assert files[qtype].stat().st_size < TINY.stat().st_size


def test_convert_cli_and_its_errors(tmp_path, capsys):
    from grn_core.__main__ import main

    out = tmp_path / "tiny.Q8_0.gguf"
    assert main(["convert", str(TINY), str(out), "--dtype", "q8_0"]) == 0
    assert read_gguf(out)[1][META_KIND] == "refiner"
    # a GGUF type with a .safetensors name: the error names the .gguf fix
    assert main(["convert", str(TINY), str(tmp_path / "x.safetensors"), "--dtype", "q8_0"]) == 2
    err = capsys.readouterr().err
    assert "GGUF quantisation" in err and str(tmp_path / "x.gguf") in err
    for dtype, says in ((None, "needs --dtype"), ("fp8_e4m3fn", "GGUF has no fp8"), ("q6_k", "not a type")):
        with pytest.raises(CheckpointError, match=says):
            convert(TINY, tmp_path / "y.gguf", dtype)
    with pytest.raises(CheckpointError, match="GGUF files of refiners only"):
        convert(TINY_TOKENIZER, tmp_path / "tok.gguf", "q8_0")
    with pytest.raises(CheckpointError, match="must be a .safetensors file .* or, for a quantised refiner, a .gguf"):
        convert(TINY, tmp_path / "y.bin", "bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.Q8_0.gguf"]


def test_convert_refuses_nan_and_leaves_an_existing_file(tmp_path):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "out.gguf"
    convert(TINY, target, "q4_k")
    before = target.read_bytes()
    tensors = load_file(str(TINY))
    tensors["block_chunks.0.module.0.mlp.up_proj.weight"][3, 5] = float("nan")
    bad = tmp_path / "bad.safetensors"
    from safetensors import safe_open

    with safe_open(str(TINY), "pt") as handle:
        save_file(tensors, str(bad), metadata=handle.metadata())
    with pytest.raises(CheckpointError, match="up_proj.weight.* NaN/Inf"):
        convert(bad, target, "q8_0")
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors",
                                                                                            "out.gguf"]


# ---------------------------------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k"])
def test_load_refiner_equals_the_float_refiner_of_the_decoded_weights(files, qtype):
    model = load_refiner(files[qtype])
    layers = gguf_layers(model)
    assert set(layers) == TINY_QUANTISED and "text_proj" in layers
    assert all(m.weight_blocks.dtype == torch.uint8 and m.compute_dtype == torch.float32 for m in layers.values())
    plain = load_refiner(files[f"{qtype}-decoded"])
    assert not gguf_layers(plain)
    args = tiny_inputs(model.config)
    with torch.no_grad():
        ours, ref = model.step_logits(*args), plain.step_logits(*args)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert module_bytes(model) < 0.45 * module_bytes(plain)


def test_bf16_means_the_compute_dtype_and_the_blocks_stay_quantised(files):
    model = load_refiner(files["q8_0"], dtype="bf16")
    layers = gguf_layers(model)
    blocks = {name: m.weight_blocks.clone() for name, m in layers.items()}
    assert all(m.compute_dtype == torch.bfloat16 and m.weight.dtype == torch.bfloat16 for m in layers.values())
    assert model.word_embed.weight.dtype == torch.bfloat16 and model.head.proj.weight.dtype == torch.float32
    with torch.no_grad():
        cond, _ = model.step_logits(*tiny_inputs(model.config))
    assert torch.isfinite(cond).all()
    # cast_network never upcasts a GGUF layer: its blocks stay bytes, only the compute dtype follows
    cast_network(model, Precision(torch.float32, torch.float32))
    for name, layer in gguf_layers(model).items():
        assert layer.weight_blocks.dtype == torch.uint8 and torch.equal(layer.weight_blocks, blocks[name])
        assert "weight" not in layer._parameters
    # compute_dtype alone names the same thing; both must agree
    assert all(m.compute_dtype == torch.float16 for m in gguf_layers(load_refiner(files["q8_0"],
                                                                                   compute_dtype="fp16")).values())
    with pytest.raises(ValueError, match="disagree"):
        load_refiner(files["q8_0"], dtype="bf16", compute_dtype="fp16")


@pytest.mark.parametrize("dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_is_refused_for_a_quantised_file(files, dtype):
    n_q4_0 = len(TINY_QUANTISED) - 1  # all but the step-token MLP's first layer fall back from Q4_K
    for load in (lambda: load_refiner(files["q4_k"], dtype=dtype),
                 lambda: load_model(files["q4_k"], TINY_TOKENIZER, dtype=dtype)):
        with pytest.raises(CheckpointError, match=rf"quantised already \(Q4_0 ×{n_q4_0}, Q4_K ×1\).*dtype default, bf16") as error:
            load()
        assert error.value.path == files["q4_k"] and str(files["q4_k"]) in str(error.value)
    # an unquantised GGUF (bf16 blocks) is a float file like any other
    model = load_refiner(files["bf16"], dtype=dtype)
    assert not gguf_layers(model)


def test_fp16_overflow_of_decoded_weights_is_refused(tmp_path, files):
    tensors, metadata = read_gguf(files["f16"])
    big = {k: (dequantize(v) if isinstance(v, GGUFWeight) else v.float()) for k, v in tensors.items()}
    big["block_chunks.0.module.0.mlp.up_proj.weight"][0, :32] = 1e5  # beyond float16, fine for Q8_0's f16 scale
    write_gguf(big, tmp_path / "big.gguf", "q8_0", {k: v for k, v in metadata.items() if k.startswith("grn.")})
    assert load_refiner(tmp_path / "big.gguf", dtype="bf16") is not None
    with pytest.raises(CheckpointError, match=r"up_proj.weight' holds values beyond the range of float16 .*: 1\d{5}\)"):
        load_refiner(tmp_path / "big.gguf", dtype="fp16")


def test_block_offload_streams_gguf_blocks(files):
    resident = load_refiner(files["q4_k"])
    streamed = load_refiner(files["q4_k"])
    offload = streamed.enable_block_offload(2, device="cpu", simulate=True)
    assert offload.streamed_bytes == sum(module_bytes(streamed.blocks[i]) for i in (2, 3))
    args = tiny_inputs(resident.config)
    with torch.no_grad():
        assert torch.equal(streamed.step_logits(*args)[0], resident.step_logits(*args)[0])


def test_inspect_reads_the_header_alone(files):
    info = inspect_checkpoint(files["q5_k"])
    float_info = inspect_checkpoint(TINY)
    assert (info.kind, info.layout, info.tasks, info.config) == ("refiner", "joint", ("t2v", "t2i"),
                                                                 float_info.config)
    header = read_weights(files["q5_k"], load_data=False)
    assert all(t.device.type == "meta" for t in header.tensors.values())


def test_inspect_cli(files, capsys):
    from grn_core.__main__ import main

    assert main(["inspect", str(files["q4_k"])]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "refiner" and shown["config"]["width"] == 128 and shown["tasks"] == ["t2v", "t2i"]


def test_load_model_names_the_storage(files):
    model = load_model(files["q8_0"], TINY_TOKENIZER)
    assert model.weight_dtype == "gguf:q8_0" and model.tasks == ("t2v", "t2i")
    assert load_model(files["q5_k"], TINY_TOKENIZER).weight_dtype == "gguf:q5_0"  # the fallback the rows allow
    assert next(model.tokenizer.parameters()).dtype == torch.float32  # the tokenizer stays as it is


def test_a_gguf_file_is_judged_by_its_content(tmp_path, files, caplog):
    renamed = tmp_path / "refiner.safetensors"
    shutil.copy(files["q8_0"], renamed)
    with caplog.at_level("WARNING"):
        model = load_refiner(renamed)
    assert set(gguf_layers(model)) == TINY_QUANTISED and "Rename it to .gguf" in caplog.text
    fake = tmp_path / "fake.gguf"
    shutil.copy(TINY, fake)
    for load in (load_refiner, inspect_checkpoint):
        with pytest.raises(CheckpointError, match="not a GGUF file .*: it is a safetensors file. Rename it to "
                                                  "fake.safetensors"):
            load(fake)


def test_c2i_refiner_as_gguf(tmp_path):
    src = tmp_path / "c2i.safetensors"
    shutil.copy(GOLDEN / "c2i_weights.safetensors", src)
    gguf = convert(src, tmp_path / "c2i.Q8_0.gguf", "q8_0", in_context_start=1)
    decoded = convert(gguf, tmp_path / "c2i-decoded.safetensors")
    assert inspect_checkpoint(gguf).kind == "c2i"
    model, plain = load_c2i(gguf), load_c2i(decoded)
    layers = gguf_layers(model)
    # The blocks' matrices and the timestep MLP are quantised; final_layer (kept in float) and the patch embedding
    # (x_embedder, no 2-D weight of a Linear) are not.
    tensors, _ = read_gguf(gguf)
    assert {name for name, t in tensors.items()  # the policy's picks, quantised or (rows of no block) F16
            if isinstance(t, GGUFWeight) or t.dtype != torch.float32} == policy_quantised(src)
    blocks = {name.removesuffix(".weight") for name, t in tensors.items() if isinstance(t, GGUFWeight)}
    expected = {name for name in blocks if isinstance(plain.get_submodule(name), nn.Linear)}
    assert set(layers) == expected and "t_embedder.mlp.0" in layers and "blocks.0.attn.qkv" in layers
    assert not any(name.startswith(("final_layer.", "x_embedder.")) for name in layers)
    from grn_core.sampler.c2i_loop import sample_c2i
    from grn_core.sampler.settings import C2ISettings

    settings = C2ISettings(steps=3)
    with torch.no_grad():
        ours = sample_c2i(model, [3], seed=1, settings=settings)
        ref = sample_c2i(plain, [3], seed=1, settings=settings)
    assert torch.equal(ours.bits, ref.bits)


def test_generate_cli_with_a_gguf_refiner(tmp_path):
    """``python -m grn_core generate --model x.gguf --tokenizer ...`` with the golden refiner as Q8_0."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from grn_core.__main__ import main
    from grn_core.media import read_video

    src = tmp_path / "t2v.safetensors"
    shutil.copy(GOLDEN / "refiner_joint_weights.safetensors", src)
    gguf = convert(src, tmp_path / "t2v.Q8_0.gguf", "q8_0", layout="joint")
    assert gguf_layers(load_refiner(gguf))
    torch.save({"ema": load_golden("tokenizer_weights.safetensors")}, tmp_path / "tok.ckpt")
    shutil.copy(GOLDEN / "umt5_weights.safetensors", tmp_path / "umt5.safetensors")
    words = ["<T2V>a", "red", "circle", "moving", "right", "high", "aesthetic", "and", "quality", "video."]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "clip.gif"
    assert main(["generate", "--model", str(gguf), "--tokenizer", str(tmp_path / "tok.ckpt"),
                 "--text-encoder", str(tmp_path / "umt5.safetensors"), "--text-tokenizer",
                 str(tmp_path / "tokenizer.json"), "--prompt", "a red circle moving right", "--task", "t2v",
                 "--width", "48", "--height", "32", "--frames", "5", "--steps", "3", "--seed", "3",
                 "--out", str(out)]) == 0
    assert read_video(out).shape == (5, 32, 48, 3)


# ---------------------------------------------------------------------------------------------------------------------
# bad files


def handmade_gguf(architecture: str, tensors: list[tuple[str, tuple[int, ...], int, bytes]],
                  metadata: dict[str, str] | None = None) -> bytes:
    """A GGUF v3 file written without grn_core: string metadata + (name, torch shape, type id, bytes)."""
    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    entries = {"general.architecture": architecture, **(metadata or {})}
    kv = b"".join(string(k) + struct.pack("<I", 8) + string(v) for k, v in entries.items())
    infos, data = b"", b""
    for name, shape, type_id, payload in tensors:
        dims = list(reversed(shape))
        infos += string(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims) + struct.pack("<IQ", type_id,
                                                                                                  len(data))
        data += payload + b"\0" * (-len(payload) % 32)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(entries)) + kv + infos
    return head + b"\0" * (-len(head) % 32) + data


def _all_doors(path: Path):
    """Every way a user hands a refiner file to GRN."""
    return {"load_refiner": lambda: load_refiner(path), "load_model": lambda: load_model(path, TINY_TOKENIZER),
            "inspect": lambda: inspect_checkpoint(path), "load_c2i": lambda: load_c2i(path)}


@pytest.fixture
def tokenizer_spy(monkeypatch):
    """Records tokenizer loads: a refused refiner must stop load_model before anything else is loaded."""
    calls = []
    real = checkpoints.load_tokenizer

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    import grn_core.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_tokenizer", spy)
    return calls


def _tiny_gguf_bytes(files) -> tuple[bytes, dict[str, str]]:
    return files["q8_0"].read_bytes(), read_gguf(files["q8_0"])[1]


@pytest.mark.parametrize("case", ["foreign architecture", "unsupported type", "truncated", "nan scale",
                                  "other network", "no architecture"])
def test_bad_gguf_is_refused_at_every_door(tmp_path, files, tokenizer_spy, case):
    data, metadata = _tiny_gguf_bytes(files)
    grn_meta = {k: v for k, v in metadata.items() if k.startswith("grn.")}
    path = tmp_path / f"{case.replace(' ', '_')}.gguf"
    if case == "foreign architecture":
        path.write_bytes(handmade_gguf("flux", [("img_in.weight", (4, 32), 8, bytes(4 * 34))]))
        says = r"not a GRN model: its architecture \(general.architecture\) is 'flux'.*convert ORIGINAL OUT.gguf"
    elif case == "no architecture":
        path.write_bytes(data.replace(b"general.architecture", b"general.architecturX", 1))
        says = "architecture .* is not recorded"
    elif case == "unsupported type":
        tensors, _ = read_gguf(files["q8_0"])
        entries = []
        for name, value in tensors.items():
            if name == "block_chunks.0.module.0.attn.q_proj.weight":  # as IQ4_XS (id 23): not ours
                entries.append((name, tuple(value.shape), 23, bytes(value.shape[0] * 4 * 136)))
            elif isinstance(value, GGUFWeight):
                entries.append((name, tuple(value.shape), 8, value.data.numpy().tobytes()))
            else:
                entries.append((name, tuple(value.shape), 0, value.numpy().tobytes()))
        path.write_bytes(handmade_gguf("grn", entries, grn_meta))
        says = "GGML type IQ4_XS .*Supported types: " + ", ".join(SUPPORTED)
    elif case == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
        says = "the GGUF file is truncated: its header describes"
    elif case == "nan scale":
        tensors, _ = read_gguf(files["q8_0"])
        weight = tensors["block_chunks.0.module.0.mlp.gate_proj.weight"]
        blocks = weight.data.reshape(-1, 34)
        blocks[7, :2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # f16 NaN as the block's scale
        state = {k: v for k, v in tensors.items()}
        entries = [(k, tuple(v.shape), 8 if isinstance(v, GGUFWeight) else 0,
                    (v.data if isinstance(v, GGUFWeight) else v).numpy().tobytes()) for k, v in state.items()]
        path.write_bytes(handmade_gguf("grn", entries, grn_meta))
        says = "gate_proj.weight' \\(Q8_0, shape \\(384, 128\\)\\) has 1 block\\(s\\) of 1536 whose scale is NaN/Inf"
    else:  # a GRN GGUF whose tensors are not those of the network its metadata names
        tensors, _ = read_gguf(files["q8_0"])
        del tensors["block_chunks.0.module.0.mlp.down_proj.weight"]
        entries = [(k, tuple(v.shape), 8 if isinstance(v, GGUFWeight) else 0,
                    (v.data if isinstance(v, GGUFWeight) else v).numpy().tobytes()) for k, v in tensors.items()]
        path.write_bytes(handmade_gguf("grn", entries, grn_meta))
        says = "missing.*down_proj"
    for door, load in _all_doors(path).items():
        if case in ("nan scale", "other network") and door in ("inspect", "load_c2i"):
            continue  # inspect reads no weights; load_c2i refuses the kind first (below)
        with pytest.raises(CheckpointError, match=says) as error:
            load()
        assert error.value.path == path and str(path) in str(error.value), door
    with pytest.raises(CheckpointError):
        load_c2i(path)
    assert tokenizer_spy == []  # load_model stopped at the refiner: nothing else was loaded


def test_gguf_where_a_tokenizer_or_text_encoder_is_expected(files):
    for load, what in ((load_tokenizer, "an HBQ tokenizer"), (load_umt5, "a umt5-xxl text encoder")):
        with pytest.raises(CheckpointError, match=f"a GGUF file, but {what} .* GGUF files of refiners only"):
            load(files["q8_0"])
    with pytest.raises(CheckpointError, match="a GGUF file, but an HBQ tokenizer"):
        load_model(TINY, files["q8_0"])


def test_a_gguf_of_a_text_encoder_is_refused(tmp_path):
    """GRN never writes one (convert refuses), but a hand-made GGUF of umt5 weights is refused by every loader."""
    src = tmp_path / "umt5.safetensors"
    shutil.copy(GOLDEN / "umt5_weights.safetensors", src)
    raw = read_weights(convert(src, tmp_path / "umt5-grn.safetensors"))
    path = tmp_path / "umt5.gguf"
    write_gguf(raw.tensors, path, "q8_0", raw.metadata)
    with pytest.raises(CheckpointError, match="this GGUF file holds a umt5-xxl text encoder; GRN reads GGUF files of "
                                              "refiners only .*fp8_e4m3fn"):
        inspect_checkpoint(path)
    with pytest.raises(CheckpointError, match="a GGUF file, but a umt5-xxl text encoder was expected"):
        load_umt5(path)
    with pytest.raises(CheckpointError, match="this file is a umt5-xxl text encoder, but a text-to-image/video"):
        load_refiner(path)


# ---------------------------------------------------------------------------------------------------------------------
# ComfyUI: Load GRN lists and loads GGUF refiners


def test_model_files_list_gguf_refiners_only_as_refiners():
    from grn_nodes import model_files

    assert ".gguf" in model_files.MODEL_EXTENSIONS
    assert model_files._guess_kind("tiny.Q4_K.gguf") == "refiner"
    assert model_files._guess_kind("GRN_ind_B.Q8_0.gguf") == "c2i"


def test_load_grn_node_lists_and_loads_a_gguf_refiner(tmp_path, files):
    from tests._fake_comfy import fake_comfy

    grn = tmp_path / "grn"
    grn.mkdir()
    shutil.copy(files["q8_0"], grn / "tiny.Q8_0.gguf")
    shutil.copy(TINY_TOKENIZER, grn / "tiny_tokenizer.safetensors")
    with fake_comfy(tmp_path) as comfy:
        nodes = comfy.nodes
        folder_paths = comfy.modules["folder_paths"]
        from grn_nodes import model_files

        model_files.register_model_folder(folder_paths)
        assert "tiny.Q8_0.gguf" in model_files.refiner_choices(folder_paths)
        assert "tiny.Q8_0.gguf" not in model_files.tokenizer_choices(folder_paths)
        assert "tiny.Q8_0.gguf" not in model_files.umt5_choices(folder_paths)
        loaded = comfy.run(nodes.GRNLoadModel, refiner="tiny.Q8_0.gguf",
                           tokenizer="tiny_tokenizer.safetensors").args[0]
        assert loaded.model.weight_dtype == "gguf:q8_0" and set(gguf_layers(loaded.model.refiner)) == TINY_QUANTISED
        from grn_nodes.errors import GRNNodeError

        with pytest.raises(GRNNodeError, match="quantised already"):
            comfy.run(nodes.GRNLoadModel, refiner="tiny.Q8_0.gguf", tokenizer="tiny_tokenizer.safetensors",
                      weight_dtype="fp8_e4m3fn")
