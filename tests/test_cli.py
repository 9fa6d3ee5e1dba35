"""``python -m grn_core``: generate writes a file and a sidecar; inspect and errors speak plainly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from grn_core.__main__ import main
from grn_core.media import read_video
from grn_core.models import tiny_available
from tests._golden import GOLDEN, load_golden


@pytest.fixture(scope="module")
def released_like(tmp_path_factory) -> dict[str, Path]:
    """Golden weights laid out like user files: refiner .pth, tokenizer .ckpt, umt5 .pth + tokenizer.json."""
    folder = tmp_path_factory.mktemp("models")
    torch.save({"trainer": {"gpt_fsdp": load_golden("refiner_joint_weights.safetensors")}},
               folder / "my_t2v.pth")
    torch.save({"ema": load_golden("tokenizer_weights.safetensors")}, folder / "tok.ckpt")
    torch.save(load_golden("umt5_weights.safetensors"), folder / "umt5.pth")
    words = ["<T2V>a", "red", "circle", "moving", "right", "high", "aesthetic", "and", "quality", "video."]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    return {"refiner": folder / "my_t2v.pth", "tokenizer": folder / "tok.ckpt", "umt5": folder / "umt5.pth",
            "text_tokenizer": folder / "tokenizer.json"}


def _generate(files, out: Path, *extra: str) -> int:
    return main([
        "generate", "--model", str(files["refiner"]), "--tokenizer", str(files["tokenizer"]),
        "--text-encoder", str(files["umt5"]), "--text-tokenizer", str(files["text_tokenizer"]),
        "--prompt", "a red circle moving right", "--task", "t2v", "--width", "48", "--height", "32",
        "--frames", "5", "--steps", "3", "--seed", "3", "--out", str(out), *extra,
    ])


def test_generate_writes_video_and_sidecar(released_like, tmp_path):
    out = tmp_path / "clip.gif"
    assert _generate(released_like, out, "--preview-dir", str(tmp_path / "steps")) == 0
    frames = read_video(out)
    assert frames.shape == (5, 32, 48, 3)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["nfe"] == 6 and sidecar["steps"] == 3 and sidecar["seed"] == 3
    assert len(sidecar["entropy"]) == 3 and all(0.0 <= e <= 1.0 for e in sidecar["entropy"])
    assert sidecar["seconds"] > 0 and sidecar["model"].endswith("my_t2v.pth")
    # every step's token-state map, and an RGB preview from the projection fitted for this tokenizer
    expected = sorted(f"step{i:03d}_{kind}.png" for i in range(3) for kind in ("states", "rgb"))
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == expected


def test_generate_mp4_is_reproducible(released_like, tmp_path):
    import av  # noqa: F401  (a dependency: requirements.txt)
    first, second = tmp_path / "a.mp4", tmp_path / "b.mp4"
    assert _generate(released_like, first) == 0
    assert _generate(released_like, second) == 0
    a, b = read_video(first), read_video(second)
    assert a.shape == (5, 32, 48, 3)
    assert (a == b).all()


def test_frames_floor_to_1_plus_4k_with_a_warning(released_like, tmp_path, capsys):
    """As the nodes do (grn_core.request.plan_size): 6 frames become 5, said on stderr and in the sidecar."""
    out = tmp_path / "x.gif"
    assert _generate(released_like, out, "--frames", "8") == 0
    assert "warning: making 48x32, 5 frames" in capsys.readouterr().err
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["frames"] == 5 and "asked" in sidecar["size_note"]


def test_generate_errors_are_one_line(released_like, tmp_path, capsys):
    assert _generate(released_like, tmp_path / "x.gif", "--frames", "0") == 2
    assert "frames 0" in capsys.readouterr().err
    assert main(["generate", "--model", str(released_like["refiner"]), "--prompt", "a dot",
                 "--out", str(tmp_path / "x.gif")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["generate", "--model", "t2v-2b", "--model-dir", str(tmp_path), "--prompt", "a dot"]) == 2
    err = capsys.readouterr().err
    assert "GRN_T2V_2B_FSA_sft147400_ema.pth" in err and "--download" in err


@pytest.mark.skipif(tiny_available(), reason="the tiny model is shipped; its own tests cover it")
def test_tiny_missing_is_explained(tmp_path, capsys):
    assert main(["generate", "--prompt", "a red circle moving right", "--out", str(tmp_path / "t.mp4")]) == 2
    assert "tiny model" in capsys.readouterr().err


def test_inspect_prints_kind_and_layout(capsys):
    assert main(["inspect", str(GOLDEN / "refiner_prefix_weights.safetensors"), "--layout", "prefix"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "refiner" and info["layout"] == "prefix" and info["config"]["depth"] == 4


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "grn_core", "inspect", str(GOLDEN / "c2i_weights.safetensors")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2  # C2I in-context start cannot be read from tensors
    assert "in_context_start" in result.stderr


@pytest.mark.skipif(not tiny_available(), reason="the built-in tiny model is not in this checkout")
def test_tiny_generate_does_not_import_the_umt5_tokenizer_library(tmp_path):
    # The tiny model never tokenizes with umt5; importing `tokenizers` would add ~0.1 s to every command-line run.
    code = ("import sys; from grn_core.__main__ import main; "
            f"rc = main(['generate', '--model', 'tiny', '--prompt', 'a red circle', '--frames', '1', '--steps', '2', "
            f"'--out', {str(tmp_path / 'x.png')!r}]); print(rc, 'tokenizers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0 False"
