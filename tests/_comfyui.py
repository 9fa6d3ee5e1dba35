"""Running a real ComfyUI for the integration and browser tests (both skip unless ``COMFYUI_DIR`` is set).

``comfyui_server(work)`` starts ``main.py --cpu`` with this repository linked into ``custom_nodes/ComfyUI-GRN``
(Python: ``COMFYUI_PYTHON``, default this interpreter), everything it writes kept under ``work``: models, output,
temp and the user directory (settings), so the ComfyUI checkout stays untouched.

Until the built-in tiny model ships, the golden refiner/tokenizer and the golden umt5 encoder (with a small
word-level tokenizer.json written here) stand in for it, placed in ``work/models`` and registered through
``--extra-model-paths-config`` — which also checks that the pack's ``models/grn`` registration keeps user paths.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest

from tests._golden import GOLDEN

ROOT = Path(__file__).resolve().parent.parent
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_stand_in_models(folder: Path) -> None:
    """Golden refiner + tokenizer + umt5 (32-wide text) and a word-level tokenizer.json for the umt5 file."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    grn = folder / "grn"
    grn.mkdir(parents=True)
    shutil.copy(GOLDEN / "refiner_joint_weights.safetensors", grn / "golden_refiner.safetensors")
    shutil.copy(GOLDEN / "tokenizer_weights.safetensors", grn / "golden_tokenizer.safetensors")
    shutil.copy(GOLDEN / "umt5_weights.safetensors", grn / "golden_umt5.safetensors")
    words = "a red green blue circle square moving right left up down high aesthetic and quality video".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(grn / "golden_umt5.tokenizer.json"))


def tiny_ships() -> bool:
    from nodes.model_files import tiny_available

    return tiny_available()


def stand_in_inputs(object_info: dict) -> dict[str, dict]:
    """Widget values to swap in, per node class, while the built-in tiny model is not there ({} once it ships)."""
    refiners = object_info["GRNLoadModel"]["input"]["required"]["refiner"][1]["options"]
    if "tiny" in refiners and tiny_ships():
        return {}
    return {"GRNLoadModel": {"refiner": "golden_refiner.safetensors", "tokenizer": "golden_tokenizer.safetensors"},
            "GRNEncodePrompt": {"umt5_file": "golden_umt5.safetensors"}}


@contextmanager
def comfyui_server(work: Path, settings: Optional[dict] = None) -> Iterator[dict]:
    """Start ComfyUI (``COMFYUI_DIR``) on a free port; yields ``{"base", "port", "log"}``; stops it afterwards.

    ``settings`` pre-seeds the frontend's user settings (``comfy.settings.json``) in the private user directory.
    """
    comfy = Path(COMFYUI_DIR)
    assert (comfy / "main.py").is_file(), f"COMFYUI_DIR={COMFYUI_DIR} has no main.py"
    link = comfy / "custom_nodes" / "ComfyUI-GRN"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    assert link.resolve() == ROOT, f"{link} points elsewhere; remove it or point it at {ROOT}"
    write_stand_in_models(work / "models")
    extra = work / "extra_model_paths.yaml"
    extra.write_text(f"grn_test:\n    base_path: {work / 'models'}\n    grn: grn\n")
    user = work / "user"
    (user / "default").mkdir(parents=True)
    if settings:
        (user / "default" / "comfy.settings.json").write_text(json.dumps(settings))
    port = free_port()
    log = open(work / "server.log", "w")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--extra-model-paths-config",
         str(extra), "--output-directory", str(work / "output"), "--temp-directory", str(work / "temp"),
         "--user-directory", str(user)],
        cwd=comfy, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited: {(work / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(base + "/system_stats", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("ComfyUI did not start within 240 s")
        yield {"base": base, "port": port, "log": work / "server.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
