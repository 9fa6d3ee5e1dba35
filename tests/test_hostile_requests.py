"""Bad input never crashes, hangs, lies or destroys: hostile requests through the command line, the Python API and the
node logic.

Each case must end as one clear error (the CLI: exit code 2, one ``error:`` line, no traceback; the API: a ValueError;
the nodes: a GRNNodeError naming the node), and the cases the flags alone decide must be refused within seconds,
before any model is loaded (``load_from_args`` is replaced by a function that fails the test). Classes:

1. sizes/frames beyond the trained buckets, memory, Ctrl-C (the refiner's hook between blocks, exit code 130);
2. outputs written atomically, a user's ``NAME.json`` never overwritten by the sidecar;
3. NaN / infinite logits named with their step, strict-JSON sidecars;
4. output path, format and fps checked before the model is loaded;
5. no silent substitutions (0 sizes, out-of-range seeds, ignored flags, truncated class indices);
6. one error path for ordinary mistakes (devices, threads, files, images, rules, calibrate numbers);
7. messages that say what is wrong (an unknown --model name).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from grn_core import media
from grn_core.calibration import read_rule
from grn_core.cli import calibrate as cli_calibrate
from grn_core.cli import common as cli_common
from grn_core.cli import generate as cli_generate
from grn_core.cli import main
from grn_core.media import StagedFile, check_fps, read_video, write_frames
from grn_core.models import tiny_available
from grn_core.request import SizeSpec, check_seed, plan_size, prepare_clip, prepare_first_frame
from grn_core.sampler import C2ISettings, SamplerSettings, sample_bits, sample_c2i
from grn_core.sampler.loop import NonFiniteLogitsError
from tests._golden import GOLDEN

needs_tiny = pytest.mark.skipif(not tiny_available(), reason="the built-in tiny model is not in this checkout")
REFUSE_SECONDS = 5.0  # a refused request answers within this (no model load, no generation)
TINY = SizeSpec(8, 4, {"width": 32, "height": 32, "frames": 9}, ("t2v", "t2i"))
PROMPT = "a red circle moving right"


# ---- helpers -----------------------------------------------------------------------------------------------------


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a command loads a model."""
    def forbidden(args):
        raise AssertionError(f"the model was loaded for a request the flags alone refuse: {args}")

    monkeypatch.setattr(cli_generate, "load_from_args", forbidden)
    monkeypatch.setattr(cli_calibrate, "load_from_args", forbidden)


def cli(capsys, argv: list[str]) -> tuple[int, str, str, float]:
    started = time.perf_counter()
    code = main([str(a) for a in argv])
    elapsed = time.perf_counter() - started
    out, err = capsys.readouterr()
    return code, out, err, elapsed


def assert_refused(result, *needles: str, seconds: float = REFUSE_SECONDS) -> str:
    code, _, err, elapsed = result
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert elapsed < seconds, f"took {elapsed:.1f} s: {err}"
    return err


def generate_args(tmp_path: Path, *extra, out: str = "x.gif") -> list:
    return ["generate", "--prompt", PROMPT, "--steps", "3", "--out", tmp_path / out, *extra]


def png_header(width: int, height: int) -> bytes:
    """The first bytes of a PNG that claims ``width`` x ``height`` pixels (no pixel data: a bomb by its header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# ---- 1, 4, 5, 6, 7: the command line refuses before loading --------------------------------------------------------

GENERATE_REFUSED = [
    # 1. sizes and frames: the one validator (plan_size), before any model
    (["--width", "4096", "--height", "4096", "--frames", "1"], "largest trained bucket"),
    (["--width", "100000", "--height", "8"], "largest trained bucket"),
    (["--frames", "100001"], "at most 81"),
    (["--width", "100000", "--height", "100000"], "largest trained bucket"),
    (["--width", str(10 ** 30)], "longer than any trained bucket"),
    (["--width", "1500", "--height", "8"], "longer than any trained bucket"),
    (["--frames", "82"], "at most 81"),
    (["--duration", "nan"], "duration nan"),
    (["--duration", "-1"], "duration -1"),
    (["--aspect", "0"], "aspect 0"),
    (["--aspect", "nan"], "aspect nan"),
    (["--resolution", "3M"], "3M"),
    # 4. output path, format, fps
    (["--out", "{tmp}/x.avi"], "unsupported output type '.avi'"),
    (["--out", "{tmp}/x"], "unsupported output type"),
    (["--frames", "9", "--out", "{tmp}/x.png"], "holds one frame"),
    (["--fps", "-5"], "--fps -5"),
    (["--fps", "nan"], "--fps nan"),
    (["--fps", "0"], "--fps 0"),
    (["--fps", "inf"], "--fps inf"),
    (["--fps", "1e9"], "--fps"),
    (["--out", "{tmp}/a_file/x.gif"], "is a file, not a folder"),
    (["--out", "{tmp}"], "is a folder"),
    # 5. no silent substitutions
    (["--width", "0"], "width 0"),
    (["--height", "0"], "height 0"),
    (["--frames", "0"], "frames 0"),
    (["--frames", "-7"], "frames -7"),
    (["--seed", str(2 ** 64)], "0..18446744073709551615"),
    (["--seed", "-1"], "0..18446744073709551615"),
    (["--class-index", "3"], "--class-index is for class-to-image"),
    (["--tokenizer", "{tmp}/tok.ckpt"], "--tokenizer is for --model PATH"),
    (["--text-encoder", "{tmp}/umt5.pth"], "--text-encoder is for --model PATH"),
    (["--text-tokenizer", "{tmp}/tokenizer.json"], "--text-tokenizer is for --model PATH"),
    (["--image", "{tmp}/a_file"], "--image is the first frame of image-to-video"),
    (["--task", "c2i"], "this model does t2v, t2i"),
    # 6. one error path for ordinary mistakes
    (["--device", "bogus"], "--device 'bogus'"),
    (["--device", "meta"], "not on 'meta'"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--threads", "0"], "--threads 0"),
    (["--threads", "-1"], "--threads -1"),
    (["--dtype", "fp7"], "--dtype 'fp7'"),
    (["--preview-dir", "{tmp}/a_file"], "is a file, not a folder"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--temperature", "0"], "temperature must be a finite number > 0"),
    (["--shift", "-1"], "shift must be a finite number > 0"),
    (["--guidance-interval", "nan"], "cfg_interval"),
    (["--adaptive", "--steps", "5"], "adaptive steps need"),
    (["--warmup", "3"], "adaptive steps off"),
    (["--adaptive-rule", "{tmp}/missing.json"], "--adaptive-rule"),
    (["--adaptive-rule", "{tmp}/strings.json"], "warmup is '5', not a whole number"),
    (["--adaptive-rule", "{tmp}/string_k.json"], "k is 90, not a finite number"),
    (["--adaptive-rule", "{tmp}/nan_rule.json"], "not a finite number"),
    (["--adaptive-rule", "{tmp}/a_file"], "not a readable JSON file"),
    (["--adaptive-rule", "{tmp}/binary.bin"], "not a readable JSON file"),
    (["--adaptive-rule", "{tmp}/strings.json", "--no-adaptive"], "--no-adaptive"),
    (["--task", "i2v", "--image", "{tmp}/text.png"], "not a readable picture"),
    (["--task", "i2v", "--image", "{tmp}/truncated.png"], "not a readable picture"),
    (["--task", "i2v", "--image", "{tmp}/bomb.png"], "smaller picture"),
    (["--task", "i2v", "--image", "{tmp}/missing.png"], "no such file"),
    (["--task", "i2v"], "needs --image"),
    # 7. an unknown model name says so, and lists the known ones
    (["--model", "t9x-1b"], "neither an existing file nor a known model name"),
    (["--model", "{tmp}"], "is a folder"),
]


@pytest.fixture
def hostile_files(tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("not a folder, not JSON, not a picture\n")
    (tmp_path / "strings.json").write_text(json.dumps({"warmup": "5", "k": "90", "b": 0, "min_steps": 20}))
    (tmp_path / "string_k.json").write_text(json.dumps({"warmup": 5, "k": "90", "b": 0, "min_steps": 20}))
    (tmp_path / "nan_rule.json").write_text('{"warmup": 5, "k": NaN, "b": 0, "min_steps": 20}')
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "text.png").write_text("hello, I am text with a .png name\n")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "bomb.png").write_bytes(png_header(20000, 20000))  # 400 megapixels by its header
    return tmp_path


@needs_tiny
@pytest.mark.parametrize("extra, needle", GENERATE_REFUSED, ids=[" ".join(c[0])[:60] for c in GENERATE_REFUSED])
def test_generate_refuses_before_loading(hostile_files, no_load, capsys, extra, needle):
    extra = [str(a).replace("{tmp}", str(hostile_files)) for a in extra]
    if extra[:2] == ["--device", "cuda:99"] and torch.cuda.is_available() and torch.cuda.device_count() > 99:
        pytest.skip("this machine has 100 GPUs")
    assert_refused(cli(capsys, generate_args(hostile_files, *extra)), needle)
    assert not (hostile_files / "x.gif").exists() and not (hostile_files / "x.json").exists()


@needs_tiny
def test_device_cuda_without_cuda(hostile_files, no_load, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert_refused(cli(capsys, generate_args(hostile_files, "--device", "cuda")), "--device cuda", "--device cpu")


@needs_tiny
@pytest.mark.parametrize("extra", [["--seed", "x"], ["--class-index", "3.7"], ["--width", "1e3"], ["--fps", "fast"]])
def test_argparse_types_are_errors_not_exits(hostile_files, capsys, extra):
    code, _, err, elapsed = cli(capsys, generate_args(hostile_files, *extra))
    assert code == 2 and "error:" in err and "Traceback" not in err and elapsed < REFUSE_SECONDS


def test_unknown_model_lists_known_names(tmp_path, capsys, no_load):
    err = assert_refused(cli(capsys, ["generate", "--model", "t9x-1b", "--prompt", PROMPT,
                                      "--out", tmp_path / "x.gif"]))
    assert "needs --tokenizer" not in err
    assert "tiny" in err and "t2v-2b" in err and "c2i-b" in err


def test_model_path_checks_its_companion_files(tmp_path, capsys, no_load):
    refiner = GOLDEN / "refiner_joint_weights.safetensors"
    tokenizer = GOLDEN / "tokenizer_weights.safetensors"
    base = ["generate", "--model", refiner, "--prompt", PROMPT, "--out", tmp_path / "x.gif"]
    assert_refused(cli(capsys, base), "needs --tokenizer")
    assert_refused(cli(capsys, base + ["--tokenizer", tmp_path / "nope.ckpt"]), "--tokenizer", "no such file")
    assert_refused(cli(capsys, base + ["--tokenizer", tokenizer, "--text-encoder", tmp_path / "nope.pth",
                                       "--text-tokenizer", tmp_path / "nope.json"]), "--text-encoder", "no such file")
    (tmp_path / "umt5.pth").write_bytes(b"\0" * 16)
    assert_refused(cli(capsys, base + ["--tokenizer", tokenizer, "--text-encoder", tmp_path / "umt5.pth",
                                       "--text-tokenizer", tmp_path / "missing_tokenizer.json"]),
                   "--text-tokenizer", "no such file")
    (tmp_path / "bad_tokenizer.json").write_text("{not json")
    assert_refused(cli(capsys, base + ["--tokenizer", tokenizer, "--text-encoder", tmp_path / "umt5.pth",
                                       "--text-tokenizer", tmp_path / "bad_tokenizer.json"]),
                   "--text-tokenizer", "not a tokenizer.json")
    assert_refused(cli(capsys, base + ["--tokenizer", tokenizer, "--text-tokenizer", tmp_path / "x.json"]),
                   "--text-tokenizer is for --text-encoder")
    # factors unknown before loading (no metadata): only what no released tokenizer allows is refused early
    assert_refused(cli(capsys, base + ["--tokenizer", tokenizer, "--width", "100000", "--height", "100000"]),
                   "largest trained bucket")
    assert_refused(cli(capsys, base + ["--tokenizer", tokenizer, "--frames", "100001"]), "at most 81")


def test_named_model_refuses_file_flags(tmp_path, capsys, no_load):
    err = assert_refused(cli(capsys, ["generate", "--model", "t2v-2b", "--tokenizer", tmp_path / "t.ckpt",
                                      "--prompt", PROMPT, "--out", tmp_path / "x.gif"]))
    assert "--tokenizer is for --model PATH" in err


def test_released_model_sizes_are_checked_before_the_files(tmp_path, capsys, no_load):
    """A named model's grid is known from the catalogue: the size is refused before the missing files are listed."""
    assert_refused(cli(capsys, ["generate", "--model", "t2v-2b", "--model-dir", tmp_path, "--prompt", PROMPT,
                                "--width", "4096", "--height", "4096", "--out", tmp_path / "x.mp4"]),
                   "largest trained bucket")
    assert_refused(cli(capsys, ["generate", "--model", "c2i-b", "--model-dir", tmp_path, "--class-index", "3",
                                "--width", "512", "--out", tmp_path / "x.png"]), "class-to-image takes a class")
    assert_refused(cli(capsys, ["generate", "--model", "c2i-b", "--model-dir", tmp_path, "--out",
                                tmp_path / "x.png"]), "needs --class-index")


@needs_tiny
def test_unwritable_output_folder_is_refused_before_loading(tmp_path, capsys, no_load, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
    else:  # root writes anywhere: make creating a file there fail as it would without the permission
        real = media.tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own argument name
            if dir is not None and Path(dir) == folder:
                raise PermissionError(13, "Permission denied", str(folder / ".probe"))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(media.tempfile, "mkstemp", mkstemp)
    try:
        assert_refused(cli(capsys, generate_args(folder, out="x.gif")), "cannot write in", "Permission denied")
    finally:
        folder.chmod(0o700)


@needs_tiny
def test_missing_output_folders_are_created(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "x.png"
    assert main(["generate", "--prompt", PROMPT, "--steps", "2", "--frames", "1", "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()


# ---- calibrate ------------------------------------------------------------------------------------------------------

CALIBRATE_REFUSED = [
    (["--bins", "0"], "--bins 0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--tolerance", "nan"], "--tolerance nan"),
    (["--tolerance", "-0.1"], "--tolerance"),
    (["--noise-z", "inf"], "--noise-z inf"),
    (["--min-steps", "80"], "--min-steps 80"),
    (["--min-steps", "3"], "--min-steps 3"),
    (["--warmup", "-1"], "--warmup -1"),
    (["--steps", "10"], "--steps 10"),
    (["--seeds", "-1"], "--seeds -1"),
    (["--seeds", str(2 ** 64)], "--seeds"),
    (["--prompts", "{tmp}/binary.bin"], "not UTF-8 text"),
    (["--prompts", "{tmp}/nul.txt"], "not UTF-8 text"),
    (["--prompts", "{tmp}/missing.txt"], "cannot read it"),
    (["--prompts", "{tmp}"], "cannot read it"),
    (["--width", "4096", "--height", "4096"], "largest trained bucket"),
    (["--frames", "0"], "frames 0"),
    (["--guidance", "nan"], "--guidance nan"),
    (["--guidance", "1e30"], "--guidance 1e+30"),
    (["--steps", str(10 ** 30)], "at most 1000"),
    (["--temperature", "0"], "--temperature 0"),
    (["--device", "bogus"], "--device"),
    (["--threads", "0"], "--threads 0"),
    (["--task", "i2v"], "calibrate fits text-to-image/video"),
    (["--out", "{tmp}/a_file/rule.json"], "is a file, not a folder"),
]


@needs_tiny
@pytest.mark.parametrize("extra, needle", CALIBRATE_REFUSED, ids=[" ".join(c[0])[:60] for c in CALIBRATE_REFUSED])
def test_calibrate_refuses_before_loading(hostile_files, no_load, capsys, extra, needle):
    (hostile_files / "nul.txt").write_bytes(b"a red circle\x00moving right\n")
    extra = [str(a).replace("{tmp}", str(hostile_files)) for a in extra]
    assert_refused(cli(capsys, ["calibrate", "--model", "tiny", *extra]), needle)


# ---- 1. memory, Ctrl-C, progress ----------------------------------------------------------------------------------


@needs_tiny
def test_request_beyond_free_memory_names_what_fits(tmp_path, capsys, monkeypatch):
    from grn_core import pipeline
    from grn_core.models import load_tiny

    model = load_tiny()
    need = pipeline.memory_need(model, 256, 256, 9, "t2v", 3.0)
    with pytest.raises(ValueError, match="the largest request that fits") as error:
        pipeline.check_memory(model, 256, 256, 9, "t2v", 3.0, free=(None, need.host // 3))
    message = str(error.value)
    fits = message.split("fits: ")[1].split(" fits")[0].split(" at ")[0]
    width, height = (int(v) for v in fits.split("x"))
    assert width < 256 and width == height
    pipeline.check_memory(model, width, height, 9, "t2v", 3.0, free=(None, need.host // 3))  # really fits
    pipeline.check_memory(model, 256, 256, 9, "t2v", 3.0, free=(None, None))  # unknown free memory: not checked

    monkeypatch.setattr(pipeline, "available_memory", lambda device: 50_000)
    err = assert_refused(cli(capsys, generate_args(tmp_path, "--width", "64", "--height", "64")),
                         "needs about", seconds=30)
    assert "available on the host" in err
    assert not (tmp_path / "x.gif").exists()


@needs_tiny
def test_available_memory_reads_meminfo_or_says_unknown(monkeypatch):
    from grn_core import pipeline

    free = pipeline.available_memory("cpu")
    if Path("/proc/meminfo").exists():
        assert free is not None and free > 0
    real_open = open

    def no_meminfo(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise FileNotFoundError(2, "No such file", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_meminfo)
    assert pipeline.available_memory("cpu") is None


def _tiny_refiner():
    from grn_core.models import load_tiny

    return load_tiny().refiner


@needs_tiny
def test_refiner_stops_between_blocks_when_asked():
    from grn_core.refiner.model import RefinerInterrupted

    refiner = _tiny_refiner()
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) >= 3  # checked before blocks 1, 2, 3: stop before block 3

    bits = torch.randint(0, 2, (1, refiner.config.bits, 1, 4, 4), dtype=torch.uint8)
    text = torch.randn(5, refiner.config.text_channels)
    refiner.should_stop = should_stop
    with pytest.raises(RefinerInterrupted, match="before block 3"):
        refiner.step_logits(bits, 0.5, text)
    assert len(calls) == 3
    refiner.should_stop = None
    cond, _ = refiner.step_logits(bits, 0.5, text)
    assert torch.isfinite(cond).all()


@needs_tiny
def test_ctrl_c_ends_a_long_step_within_one_block(tmp_path, capsys, monkeypatch):
    """SIGINT in the middle of step 2: the refiner stops before the next block; exit 130, no traceback, no file."""
    from grn_core.refiner.model import GRNRefiner

    real_block = GRNRefiner._block
    blocks = []

    def block(self, *args, **kwargs):
        blocks.append(1)
        if len(blocks) == 6:  # step 2 (4 blocks a pass), block 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_block(self, *args, **kwargs)

    monkeypatch.setattr(GRNRefiner, "_block", block)
    previous = signal.getsignal(signal.SIGINT)
    code, _, err, _ = cli(capsys, generate_args(tmp_path, "--steps", "20"))
    assert code == 130 and "interrupted" in err and "Traceback" not in err and "error:" not in err
    assert len(blocks) == 6  # the block running when Ctrl-C came finished; no other block started
    assert not list(tmp_path.iterdir())  # no video, no sidecar, no temporary file
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is the caller's again


@needs_tiny
def test_ctrl_c_while_loading_is_interrupted_not_a_traceback(tmp_path, capsys, monkeypatch):
    def load(args, text_encoder=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_generate, "load_from_args", load)
    code, _, err, _ = cli(capsys, generate_args(tmp_path))
    assert code == 130 and "interrupted" in err and "Traceback" not in err


@needs_tiny
def test_progress_lines_on_every_long_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli_common, "progress_enabled", lambda: True)
    code, _, err, _ = cli(capsys, generate_args(tmp_path))
    assert code == 0, err
    for label in ("loading the model", "encoding the prompt", "step 3/3", "decoding", "writing"):
        assert label in err, (label, err)
    monkeypatch.setattr(cli_common, "progress_enabled", lambda: False)
    code, _, err, _ = cli(capsys, generate_args(tmp_path))
    assert code == 0 and err == ""  # nothing when stderr is not a terminal


# ---- 2. atomic outputs, the sidecar never overwrites a user's file --------------------------------------------------


@pytest.mark.parametrize("suffix", [".gif", ".mp4", ".webp", ".png"])
def test_failed_write_leaves_the_previous_file(tmp_path, monkeypatch, suffix):
    frames = 1 if suffix == ".png" else 5
    path = write_frames(torch.rand(frames, 16, 16, 3), tmp_path / f"clip{suffix}")
    before = path.read_bytes()

    def full_disk(pixels, target, suffix, fps):
        Path(target).write_bytes(b"\0" * 2048)  # midway: some bytes are out, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(media, "encode_frames", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_frames(torch.rand(frames, 16, 16, 3), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_interrupted_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "x.gif"
    target.write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt):
        with StagedFile(target) as staged:
            staged.temp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["x.gif"]


def test_two_writers_of_one_gif_leave_one_whole_file(tmp_path):
    path = tmp_path / "same.gif"
    ramp = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1) / 10
    clips = [ramp.expand(5, 32, 32, 3).clone(), (1 - ramp).expand(5, 32, 32, 3).clone()]
    expected = [read_video(write_frames(clip, tmp_path / f"ref{i}.gif")) for i, clip in enumerate(clips)]
    errors = []

    def writer(clip):
        try:
            for _ in range(5):
                write_frames(clip, path)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(clip,)) for clip in clips]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    frames = read_video(path)
    assert any(frames.shape == e.shape and (frames == e).all() for e in expected)  # one run's file, not a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref0.gif", "ref1.gif", "same.gif"]


@needs_tiny
def test_cli_failing_write_keeps_previous_video_and_sidecar(tmp_path, capsys, monkeypatch):
    assert cli(capsys, generate_args(tmp_path))[0] == 0
    video, sidecar = tmp_path / "x.gif", tmp_path / "x.json"
    before = video.read_bytes(), sidecar.read_bytes()

    def full_disk(pixels, target, suffix, fps):
        Path(target).write_bytes(b"\0" * 2048)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli_generate, "encode_frames", full_disk)
    err = assert_refused(cli(capsys, generate_args(tmp_path, "--seed", "5")), "writing failed",
                         "No space left on device", seconds=60)
    assert "nothing was replaced" in err
    assert (video.read_bytes(), sidecar.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gif", "x.json"]


@needs_tiny
def test_sidecar_never_overwrites_a_users_json(tmp_path, capsys, no_load):
    users = tmp_path / "x.json"
    users.write_text('{"my": "notes"}\n')
    err = assert_refused(cli(capsys, generate_args(tmp_path)), "x.json", "not written by this tool")
    assert "--out" in err
    assert users.read_text() == '{"my": "notes"}\n'
    users.write_bytes(b"\x89 not even text")
    assert_refused(cli(capsys, generate_args(tmp_path)), "not written by this tool")
    users.unlink()
    users.mkdir()
    assert_refused(cli(capsys, generate_args(tmp_path)), "not written by this tool")


@needs_tiny
def test_our_own_sidecar_is_replaced(tmp_path, capsys):
    assert cli(capsys, generate_args(tmp_path))[0] == 0
    first = json.loads((tmp_path / "x.json").read_text())
    assert first["grn_sidecar"] == 1
    assert cli(capsys, generate_args(tmp_path, "--seed", "7"))[0] == 0
    assert json.loads((tmp_path / "x.json").read_text())["seed"] == 7
    legacy = {k: first[k] for k in ("model", "task", "seed", "settings", "output", "nfe")}
    (tmp_path / "x.json").write_text(json.dumps(legacy))  # a sidecar from before the mark: ours too
    assert cli(capsys, generate_args(tmp_path))[0] == 0


# ---- 3. NaN / infinite logits ---------------------------------------------------------------------------------------


class NaNRefiner:
    """A refiner stand-in whose logits turn non-finite from step ``bad_step`` (cond, or uncond only)."""

    def __init__(self, bad_step: int = 0, branch: str = "cond", value: float = float("nan")):
        self.config = SimpleNamespace(layout="joint", latent_channels=2, rounds=2, text_channels=4)
        self.calls, self.bad_step, self.branch, self.value = 0, bad_step, branch, value

    def step_logits(self, bits, step_value, text_cond, text_uncond, aspect_ratio=1.0, first_frame_bits=None):
        rows, c, t, h, w = bits.shape
        cond = torch.zeros(rows, t, h, w, c, 2)
        uncond = torch.zeros_like(cond) if text_uncond is not None else None
        if self.calls >= self.bad_step:
            target = cond if self.branch == "cond" else uncond
            target[0, 0, 0, 0, 0, 1] = self.value
        self.calls += 1
        return cond, uncond


@pytest.mark.parametrize("bad_step, branch, value, guidance, step_name", [
    (0, "cond", float("nan"), 1.0, "step 1 of 4"),
    (0, "cond", float("inf"), 1.0, "step 1 of 4"),
    (2, "cond", float("-inf"), 3.0, "step 3 of 4"),
    (0, "uncond", float("nan"), 3.0, "unconditional logits at step 1"),
])
def test_non_finite_logits_name_the_step(bad_step, branch, value, guidance, step_name):
    text = torch.ones(3, 4)
    with pytest.raises(NonFiniteLogitsError, match=step_name) as error:
        sample_bits(NaNRefiner(bad_step, branch, value), text, text, grid=(1, 2, 2),
                    settings=SamplerSettings(steps=4, guidance=guidance))
    assert "the weights or the inputs are damaged" in str(error.value)


def test_non_finite_logits_at_the_adaptive_decision():
    from grn_core.sampler import AdaptiveSteps

    rule = AdaptiveSteps(warmup=0, k=10.0, b=1.0, min_steps=2)
    with pytest.raises(NonFiniteLogitsError, match="step 1"):
        sample_bits(NaNRefiner(0), torch.ones(3, 4), None, grid=(1, 2, 2),
                    settings=SamplerSettings(steps=4, guidance=1.0, adaptive=rule))


def test_non_finite_class_to_image_logits_name_the_step():
    class NaNC2I:
        config = SimpleNamespace(latent_channels=2, input_size=2, rounds=1, num_classes=10)

        def __call__(self, x, t, y):
            out = torch.zeros(x.shape[0], 2, 2, 2, 2)
            out[0, 0, 0, 0, 0] = float("nan")
            return out

    with pytest.raises(NonFiniteLogitsError, match="step 1"):
        sample_c2i(NaNC2I(), [3], settings=C2ISettings(steps=3, guidance=1.0))


@needs_tiny
def test_cli_nan_weights_are_an_error_without_output(tmp_path, capsys, monkeypatch):
    from grn_core.refiner.model import GRNRefiner

    real = GRNRefiner.step_logits

    def damaged(self, *args, **kwargs):
        cond, uncond = real(self, *args, **kwargs)
        return cond.fill_(float("nan")), uncond

    monkeypatch.setattr(GRNRefiner, "step_logits", damaged)
    assert_refused(cli(capsys, generate_args(tmp_path)), "NaN or infinite logits at step 1", "damaged", seconds=60)
    assert not list(tmp_path.iterdir())


def test_sidecar_writer_refuses_nan():
    result = SimpleNamespace(steps=[2], nfe=[2], entropy=[[0.5, float("nan")]], kept_fraction=[[0.1, 0.2]],
                             remaining_steps=[], seconds=0.1)
    args = SimpleNamespace(model="tiny", prompt=PROMPT, seed=0, class_index=None, image=None)
    plan = SimpleNamespace(width=32, height=32, note="32x32")
    with pytest.raises(ValueError, match="NaN or infinite values \\(entropy\\)"):
        cli_generate.sidecar_text(Path("x.gif"), args, "t2v", "", plan, SamplerSettings(), SimpleNamespace(
            sampling=result), 1, time.perf_counter())


# ---- 5. the Python API: ValueErrors, no substitution ----------------------------------------------------------------

API_SIZES = [
    dict(width=0), dict(height=0), dict(frames=0), dict(frames=-7), dict(width=float("nan")),
    dict(width=float("inf")), dict(width=10 ** 400), dict(width=4096, height=4096), dict(width=100000, height=8),
    dict(frames=100001), dict(width=100000, height=100000), dict(width="64"), dict(width=True),
    dict(duration=float("nan")), dict(duration=-0.5), dict(duration="2"), dict(h_over_w=0.0),
    dict(h_over_w=float("inf")), dict(resolution="3M"), dict(resolution=2), dict(width=1e300, h_over_w=1e300),
]


@pytest.mark.parametrize("spec", [TINY, SizeSpec()], ids=["tiny", "released"])
@pytest.mark.parametrize("kwargs", API_SIZES, ids=[str(k)[:40] for k in API_SIZES])
def test_plan_size_refuses_fast(spec, kwargs):
    started = time.perf_counter()
    with pytest.raises(ValueError):
        plan_size(spec, "t2v", **kwargs)
    assert time.perf_counter() - started < 0.5


def test_every_trained_bucket_is_accepted():
    """The cap is for custom sizes: every bucket at every trained aspect is a trained size (2M at 16:9 is 8160
    cells, above 90 x 90)."""
    from grn_core.refiner.buckets import ASPECT_RATIOS, BUCKET_SIDES

    for bucket in BUCKET_SIDES:
        for ratio in ASPECT_RATIOS:
            plan_size(SizeSpec(), "t2i", resolution=bucket, h_over_w=ratio)


def test_long_duration_is_capped_and_said():
    plan = plan_size(TINY, "t2v", duration=60.0)
    assert plan.frames == 81 and plan.snapped and "asked 60 s" in plan.note


@pytest.mark.parametrize("seed", [-1, 2 ** 64, 2 ** 70, 1.5, "3", True, None])
def test_seeds_out_of_range_are_refused(seed):
    with pytest.raises(ValueError, match="seed"):
        check_seed(seed)
    if seed is not None:
        with pytest.raises(ValueError, match="seed"):
            sample_bits(NaNRefiner(10 ** 9), torch.ones(3, 4), None, grid=(1, 2, 2), seed=seed,
                        settings=SamplerSettings(steps=2, guidance=1.0))


def test_seed_range_ends_are_accepted():
    for seed in (0, 2 ** 64 - 1):
        assert check_seed(seed) == seed
        sample_bits(NaNRefiner(10 ** 9), torch.ones(3, 4), None, grid=(1, 2, 2), seed=seed,
                    settings=SamplerSettings(steps=2, guidance=1.0))


@pytest.mark.parametrize("class_ids", [[3.7], [True], ["3"], [], [-1], [1001], 3])
def test_class_indices_are_whole_numbers_in_range(class_ids):
    from grn_core.pipeline import generate_class_tokens

    model = SimpleNamespace(is_c2i=True, name="c2i", refiner=SimpleNamespace(config=SimpleNamespace(num_classes=1000)))
    with pytest.raises(ValueError, match="class"):
        generate_class_tokens(model, class_ids)


@pytest.mark.parametrize("labels", [[3.7], torch.tensor([3.7]), [True]])
def test_sampler_class_labels_are_not_truncated(labels):
    class Net:
        config = SimpleNamespace(latent_channels=2, input_size=2, rounds=1, num_classes=10)

    with pytest.raises(ValueError, match="whole numbers|dtype"):
        sample_c2i(Net(), labels)


def test_generate_tokens_refuses_out_of_range_seed():
    from grn_core.pipeline import GenerationRequest, PromptFeatures, generate_tokens

    model = SimpleNamespace(is_c2i=False)
    feats = PromptFeatures(torch.ones(2, 4), None, "t2v", PROMPT)
    with pytest.raises(ValueError, match="seed"):
        generate_tokens(model, feats, GenerationRequest(32, 32, 1, seed=2 ** 64))


@pytest.mark.parametrize("fps", [0, -5, float("nan"), float("inf"), 1e9, "16", True])
def test_write_frames_refuses_bad_fps_before_writing(tmp_path, fps):
    with pytest.raises(ValueError, match="fps"):
        write_frames(torch.rand(5, 16, 16, 3), tmp_path / "x.gif", fps=fps)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError):
        check_fps(fps)


@pytest.mark.parametrize("name, frames", [("x.avi", 5), ("x", 5), ("x.png", 9), ("x.json", 1)])
def test_write_frames_refuses_bad_outputs(tmp_path, name, frames):
    with pytest.raises(ValueError):
        write_frames(torch.rand(frames, 16, 16, 3), tmp_path / name)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("rule, needle", [
    ({"warmup": "5", "k": 90, "b": 0, "min_steps": 20}, "warmup is '5'"),
    ({"warmup": 5, "k": "90", "b": 0, "min_steps": 20}, "k is 90"),
    ({"warmup": 5, "k": 90, "b": None, "min_steps": 20}, "b is None"),
    ({"warmup": 5, "k": 90, "b": 0, "min_steps": 20.5}, "min_steps is 20.5"),
    ({"warmup": 5, "k": 10 ** 400, "b": 0, "min_steps": 20}, "not a finite number"),
    ({"warmup": 5, "k": 90, "b": 0, "min_steps": 20, "calibrated": "yes"}, "calibrated"),
    ({"warmup": 20, "k": 90, "b": 0, "min_steps": 20}, "warmup < min_steps"),
    ({"warmup": -1, "k": 90, "b": 0, "min_steps": 20}, "warmup < min_steps"),
    ({"warmup": True, "k": 90, "b": 0, "min_steps": 20}, "warmup is True"),
])
def test_read_rule_checks_types(tmp_path, rule, needle):
    path = tmp_path / "rule.json"
    path.write_text(json.dumps(rule) if not isinstance(rule.get("k"), int) or rule["k"] < 10 ** 300 else
                    json.dumps({**rule, "k": 0}).replace('"k": 0', f'"k": {rule["k"]}'))
    with pytest.raises(ValueError, match=needle.replace("(", "\\(")):
        read_rule(path)


@pytest.mark.parametrize("image", [np.zeros((0, 16, 3), np.uint8), np.zeros((16, 0, 3), np.uint8),
                                   np.full((8, 8, 3), np.nan), np.zeros((8, 8), np.uint8),
                                   np.full((8, 8, 3), 300, np.int32)])
def test_first_frame_refuses_empty_or_broken_pictures(image):
    with pytest.raises(ValueError):
        prepare_first_frame(image, 32, 32)


@pytest.mark.parametrize("kwargs", [dict(width=float("nan")), dict(width=-16), dict(width=100000, height=64),
                                    dict(width=2.5)])
def test_prepare_clip_refuses_bad_sizes(kwargs):
    with pytest.raises(ValueError):
        prepare_clip(torch.rand(1, 48, 48, 3), **kwargs)


# ---- the nodes: GRNNodeError naming the node ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded():
    from grn_nodes import loading

    return loading.load_grn(GOLDEN / "refiner_joint_weights.safetensors", GOLDEN / "tokenizer_weights.safetensors",
                            fit_preview=False)


NODE_CASES = [
    ("sampler", "plan", dict(width=64, height=64, frames=0)),
    ("sampler", "plan", dict(width=64, height=64, frames=-7)),
    ("sampler", "plan", dict(width=float("nan"), height=64, frames=1)),
    ("sampler", "plan", dict(width=0, height=64, frames=1)),
    ("sampler", "plan", dict(width=64, height=64, frames=1, duration=float("nan"))),
    ("sampler", "plan", dict(width=4096, height=4096, frames=1)),
    ("sampler", "plan", dict(width=100000, height=16, frames=1)),
    ("sampler", "plan", dict(width=64, height=64, frames=100001)),
    ("sampler", "first_frame", dict(image=torch.rand(1, 48, 0, 3))),
    ("sampler", "first_frame", dict(image=torch.rand(0, 48, 48, 3))),
    ("sampler", "first_frame", dict(image=torch.full((1, 48, 48, 3), float("nan")))),
    ("sampler", "settings", dict(steps=3.7)),
    ("sampler", "settings", dict(steps=0)),
    ("sampler", "settings", dict(guidance=float("nan"))),
    ("sampler", "settings", dict(adaptive=True, adaptive_rule="custom", warmup=float("nan"))),
    ("sampler", "settings", dict(adaptive=True, adaptive_rule="custom", min_steps=20.7)),
    ("sampler", "settings", dict(adaptive=True, adaptive_rule="custom", k=float("inf"))),
    ("encode", "encode", dict(images=torch.rand(1, 48, 0, 3))),
    ("encode", "encode", dict(images=torch.rand(0, 48, 48, 3))),
    ("encode", "encode", dict(images=torch.rand(1, 48, 48, 3), width=float("nan"))),
    ("encode", "encode", dict(images=torch.rand(1, 48, 48, 3), width=100000, height=64)),
    ("encode", "encode", dict(images=torch.rand(1, 48, 48, 3), width=-16)),
    ("decode", "decode", dict(tile=float("nan"))),
    ("decode", "decode", dict(tile=-1)),
]


@pytest.mark.parametrize("node, what, kwargs", NODE_CASES, ids=[f"{c[1]}-{str(c[2])[:40]}" for c in NODE_CASES])
def test_nodes_refuse_naming_the_node(loaded, node, what, kwargs):
    from grn_nodes import errors, frames, sampling

    names = {"sampler": errors.SAMPLER, "encode": errors.ENCODE_IMAGE, "decode": errors.DECODE}
    started = time.perf_counter()
    with pytest.raises(errors.GRNNodeError) as error:
        if what == "plan":
            sampling.plan_size(loaded, **kwargs)
        elif what == "first_frame":
            sampling.first_frame_from_image(kwargs["image"], 64, 48)
        elif what == "settings":
            base = dict(steps=20, guidance=3.0, temperature=1.0)
            sampling.build_settings(loaded, "t2v", **{**base, **kwargs})
        elif what == "encode":
            frames.encode_images(loaded, **kwargs)
        else:
            frames.decode_to_images(loaded, torch.zeros(1, 32, 1, 2, 2, dtype=torch.uint8), **kwargs)
    assert str(error.value).startswith(names[node] + ": ")
    assert time.perf_counter() - started < REFUSE_SECONDS


@pytest.mark.parametrize("size", [(float("nan"), 32, 1), (32, 32, float("nan")), (10 ** 40, 32, 1), (32, 32, 85),
                                  (4096, 4096, 1), (2512, 16, 1), (True, 32, 1), (32, 32, 0)])
def test_pipeline_refuses_unplanned_sizes(size):
    """A caller who skips plan_size meets the same limits in the pipeline (no 30 GB allocation, no raw error)."""
    from grn_core.pipeline import latent_grid_for

    with pytest.raises(ValueError, match="multiple of|frames|beyond every trained bucket"):
        latent_grid_for(SimpleNamespace(spatial_factor=16, temporal_factor=4), *size)


@pytest.mark.parametrize("kwargs, needle", [(dict(steps=10 ** 30), "at most 1000"), (dict(steps=1001), "at most 1000"),
                                            (dict(guidance=1e30), "guidance"), (dict(steps=0), "steps")])
def test_settings_that_would_never_finish_or_overflow_are_refused(kwargs, needle):
    from grn_core.request import resolve_settings

    with pytest.raises(ValueError, match=needle):
        resolve_settings(TINY, "t2v", **kwargs)


@needs_tiny
@pytest.mark.parametrize("extra", [["--steps", str(10 ** 30)], ["--guidance", "1e30"]])
def test_cli_refuses_endless_or_overflowing_settings(hostile_files, no_load, capsys, extra):
    assert_refused(cli(capsys, ["generate", "--prompt", PROMPT, "--out", hostile_files / "x.gif", *extra]))
