"""Running a real ComfyUI for the integration and browser tests (both skip unless ``COMFYUI_DIR`` is set).

``comfyui_server(work)`` starts ``main.py --cpu`` with this repository linked into ``custom_nodes/ComfyUI-GRN``
(Python: ``COMFYUI_PYTHON``, default this interpreter), everything it writes kept under ``work``: models, output,
temp and the user directory (settings), so the ComfyUI checkout stays untouched.

The workflows run with the built-in ``tiny`` model (``grn_core/assets/tiny``) and its built-in text encoder, as
shipped. A copy of the golden refiner is placed in ``work/models/grn`` and registered through
``--extra-model-paths-config``, only so that the tests can check that the pack's ``models/grn`` registration keeps a
user's own paths (the file is listed beside ``tiny``; it is never run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest

from grn_core.runtime.distributed import free_local_port
from tests._golden import GOLDEN

ROOT = Path(__file__).resolve().parent.parent
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


USER_REFINER = "user_refiner.safetensors"  # listed from the user's extra model path, never loaded


def write_user_model_folder(folder: Path) -> None:
    """A user's own ``grn`` folder (registered through ``extra_model_paths.yaml``) holding one refiner file."""
    grn = folder / "grn"
    grn.mkdir(parents=True)
    shutil.copy(GOLDEN / "refiner_joint_weights.safetensors", grn / USER_REFINER)


def server_env() -> dict:
    """The server's environment: one OpenMP thread unless ``OMP_NUM_THREADS`` says otherwise. The tiny model's ops
    are too small to split, and on a busy machine a second thread waiting for a core makes every step much slower
    (50 steps: 1.4 s idle, 22 s with the other cores busy, measured with two threads)."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


@contextmanager
def comfyui_server(work: Path, settings: Optional[dict] = None) -> Iterator[dict]:
    """Start ComfyUI (``COMFYUI_DIR``) on a free port; yields ``{"base", "port", "log", "pid"}``; stops it afterwards.

    ``settings`` pre-seeds the frontend's user settings (``comfy.settings.json``) in the private user directory.
    """
    comfy = Path(COMFYUI_DIR)
    assert (comfy / "main.py").is_file(), f"COMFYUI_DIR={COMFYUI_DIR} has no main.py"
    link = comfy / "custom_nodes" / "ComfyUI-GRN"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    assert link.resolve() == ROOT, f"{link} points elsewhere; remove it or point it at {ROOT}"
    write_user_model_folder(work / "models")
    extra = work / "extra_model_paths.yaml"
    extra.write_text(f"grn_test:\n    base_path: {work / 'models'}\n    grn: grn\n")
    user = work / "user"
    (user / "default").mkdir(parents=True)
    if settings:
        (user / "default" / "comfy.settings.json").write_text(json.dumps(settings))
    port = free_local_port()
    log = open(work / "server.log", "w")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--extra-model-paths-config",
         str(extra), "--output-directory", str(work / "output"), "--temp-directory", str(work / "temp"),
         "--user-directory", str(user)],
        cwd=comfy, stdout=log, stderr=subprocess.STDOUT, env=server_env())
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
        yield {"base": base, "port": port, "log": work / "server.log", "pid": proc.pid}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
