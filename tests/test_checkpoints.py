"""Checkpoint IO: official containers load through the public loaders; bad files fail clearly and load nothing."""

import argparse
import os
from pathlib import Path

import pytest
import torch

from grn_core import hbq
from grn_core.checkpoints import (
    CheckpointError,
    inspect_checkpoint,
    load_c2i,
    load_refiner,
    load_tokenizer,
    load_umt5,
)
from grn_core.cli import main as cli_main
from grn_core.convert import convert
from tests._golden import load_golden, rel_err


def _official_refiner_file(tmp_path: Path, layout: str, name: str) -> Path:
    """The golden weights in the container of the released T2I/T2V files: ``{'trainer': {'gpt_fsdp': sd}}``."""
    path = tmp_path / name
    torch.save({"trainer": {"gpt_fsdp": load_golden(f"refiner_{layout}_weights.safetensors")}, "step": 1}, path)
    return path


def _official_tokenizer_file(tmp_path: Path) -> Path:
    """Like the released HBQ *.ckpt: EMA and raw weights plus training arguments (a harmless Namespace)."""
    sd = load_golden("tokenizer_weights.safetensors")
    noisy = {k: v + 1.0 for k, v in sd.items()}  # 'vae' must NOT be picked when 'ema' exists
    path = tmp_path / "HBQ_image_video_tokenizer_64dim_M4_20260626.ckpt"
    torch.save({"ema": sd, "vae": noisy, "args": argparse.Namespace(latent_channels=8, lr=1e-4)}, path)
    return path


def _official_c2i_file(tmp_path: Path, name: str = "GRN_ind_B_ep599.pth") -> Path:
    sd = load_golden("c2i_weights.safetensors")
    noisy = {k: v * 0.5 for k, v in sd.items()}
    path = tmp_path / name
    torch.save({"model": noisy, "model_ema1": sd, "model_ema2": noisy, "epoch": 599}, path)
    return path


def _joint_logits(ref, io, record="t2v", step=0):
    bits = io[f"{record}.step{step}.labels"].long()
    cond, uncond = ref.step_logits(bits, float(io[f"{record}.pt_values"][step]), io["text_cond"].double(),
                                   io["text_uncond"].double(), aspect_ratio=0.562)
    return cond, uncond


def test_official_refiner_container_reproduces_golden(tmp_path):
    io = load_golden("refiner_joint_io.safetensors")
    path = _official_refiner_file(tmp_path, "joint", "GRN_T2V_2B_FSA_sft147400_ema.pth")
    ref = load_refiner(path, dtype=torch.float64)
    assert ref.config.layout == "joint"
    cond, _ = _joint_logits(ref, io)
    n_visual = cond[0].numel() // 64
    expected = io["t2v.step0.logits"][:n_visual]
    assert rel_err(cond[0].reshape(n_visual, 64), expected) < 1e-5


def test_known_prefix_file_name_selects_prefix_layout(tmp_path):
    path = _official_refiner_file(tmp_path, "prefix", "GRN_T2V_2B.pth")
    assert inspect_checkpoint(path).layout == "prefix"
    assert load_refiner(path).config.layout == "prefix"
    assert load_refiner(path, layout="joint").config.layout == "joint"  # explicit override wins


def test_tokenizer_prefers_ema_and_accepts_training_args(tmp_path):
    io = load_golden("tokenizer_io.safetensors")
    tok = load_tokenizer(_official_tokenizer_file(tmp_path), dtype=torch.float64)
    z = tok.encode(io["x_video"].double())
    assert rel_err(z, io["z_video"]) < 1e-5
    assert torch.equal(hbq.features_to_bits(z, rounds=4), io["bits_video"])


def test_c2i_uses_model_ema1(tmp_path):
    io = load_golden("c2i_io.safetensors")
    net = load_c2i(_official_c2i_file(tmp_path, "my_c2i.pth"), in_context_start=1, dtype=torch.float64)
    out = net(io["z"].long(), io["t"].double(), io["y"])
    assert rel_err(out, io["out"]) < 1e-5


def test_umt5_loads_flat_pth(tmp_path):
    io = load_golden("umt5_io.safetensors")
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(load_golden("umt5_weights.safetensors"), path)
    enc = load_umt5(path, dtype=torch.float64)
    assert rel_err(enc(io["ids"], io["mask"]), io["hidden"]) < 1e-5


@pytest.mark.parametrize(
    "make, loader, words",
    [
        (lambda p: _official_tokenizer_file(p), load_refiner, ["tokenizer", "refiner"]),
        (lambda p: _official_c2i_file(p), load_refiner, ["class-to-image", "text-to-image/video"]),
        (lambda p: _official_refiner_file(p, "joint", "GRN_T2V_2B_FSA_sft147400_ema.pth"), load_tokenizer,
         ["refiner", "tokenizer"]),
        (lambda p: _official_refiner_file(p, "joint", "GRN_T2V_2B_FSA_sft147400_ema.pth"), load_c2i,
         ["text-to-image/video", "class-to-image"]),
    ],
)
def test_wrong_kind_names_file_and_expectation(tmp_path, make, loader, words):
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as info:
        loader(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_truncated_files_are_reported(tmp_path):
    good = _official_refiner_file(tmp_path, "joint", "GRN_T2V_2B_FSA_sft147400_ema.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt") as info:
        load_refiner(cut)
    assert str(cut) in str(info.value)

    sft = tmp_path / "cut.safetensors"
    src = Path(__file__).parent / "golden" / "refiner_joint_weights.safetensors"
    sft.write_bytes(src.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_refiner(sft)
    assert str(sft) in str(info.value)


class _Payload:
    """A pickle that would run a command when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    sd = load_golden("refiner_joint_weights.safetensors")
    torch.save({"trainer": {"gpt_fsdp": sd}, "hook": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only") as info:
        load_refiner(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_not_a_grn_file(tmp_path):
    path = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="not a GRN checkpoint"):
        load_tokenizer(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_tokenizer(tmp_path / "missing.ckpt")
    bad_suffix = tmp_path / "weights.npz"
    bad_suffix.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported file type"):
        load_tokenizer(bad_suffix)


def test_mismatched_tensor_shapes_load_nothing(tmp_path):
    sd = load_golden("refiner_joint_weights.safetensors")
    sd["block_chunks.1.module.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    path = tmp_path / "damaged.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="other shapes|config"):
        load_refiner(path, layout="joint")


@pytest.mark.parametrize("dtype, tol", [("bf16", 2e-2), ("fp32", 1e-3)])
def test_convert_round_trip_loads_without_flags(tmp_path, dtype, tol):
    src = _official_refiner_file(tmp_path, "prefix", "GRN_T2V_2B.pth")
    dst = convert(src, tmp_path / f"grn_t2v_prefix_{dtype}.safetensors", dtype=dtype)
    info = inspect_checkpoint(dst)
    assert (info.kind, info.layout, info.tasks) == ("refiner", "prefix", ("t2v",))
    ref = load_refiner(dst, dtype=torch.float64)  # no layout flag: it comes from the metadata
    io = load_golden("refiner_prefix_io.safetensors")
    bits = io["t2v.step0.labels"].long()
    cond, _ = ref.step_logits(bits, float(io["t2v.pt_values"][0]), io["text_cond"].double(), None,
                              aspect_ratio=0.562)
    n_visual = cond[0].numel() // 64
    assert rel_err(cond[0].reshape(n_visual, 64), io["t2v.step0.logits"][:n_visual]) < tol


def test_convert_fp8_keeps_norms_in_16_bits(tmp_path):
    src = _official_tokenizer_file(tmp_path)
    dst = convert(src, tmp_path / "tok_fp8.safetensors", dtype="fp8_e4m3fn")
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as handle:
        dtypes = {k: handle.get_slice(k).get_dtype() for k in handle.keys()}
    assert dtypes["encoder.conv1.weight"] == "F8_E4M3"
    assert dtypes["encoder.conv1.bias"] == "BF16"
    tok = load_tokenizer(dst)
    assert next(tok.parameters()).dtype == torch.bfloat16


def test_convert_cli_reports_errors(tmp_path, capsys):
    assert cli_main(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "out.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
