"""The pack inside a real ComfyUI: runs only when ``COMFYUI_DIR`` points at a ComfyUI checkout (0.3.64 tested).

Starts ``main.py --cpu`` with this repository linked into ``custom_nodes/ComfyUI-GRN`` (``tests/_comfyui.py``; Python:
``COMFYUI_PYTHON``, default this interpreter; ComfyUI's requirements and ours must be installed there), then:
``/object_info`` lists every node, and the loader lists ``tiny`` first with a user's file from an
``--extra-model-paths-config`` folder beside it (the pack's ``models/grn`` registration keeps user paths);
``workflows/grn_tiny_t2v.json`` converted to an API prompt runs as shipped — the built-in ``tiny`` model, its
built-in text encoder, 32x32, 9 frames, the library's t2v defaults — with one ``grn.refine`` widget event per step
over the websocket; the history names an mp4 that ``/view`` serves, 9 frames of 32x32 showing what the prompt asks
for; a run with more steps is interrupted midway and the next one completes.

ComfyUI's memory manager holds the pack's refiner and tokenizer (``grn_nodes/patching.py``): after a run both are in
``current_loaded_models`` and the next run loads nothing, ``POST /free`` unloads them, the run after loads them again
and gives the same picture, and an interrupted run and its rerun leave one of each loaded — read from the pack's
load/unload log lines and ComfyUI's own "Requested to load" lines in the server log.

Same request, same bits, every door: text-to-image (1 frame) and text-to-video (1 and 9 frames) at 32x32, with fixed
and with adaptive steps (the model's own rule), run through the server (``SaveImage`` writes one PNG per frame) and
through the command line in the test process (``grn_core.cli.main(["generate", ...])``) give the same uint8 pixels.

Load GRN ``devices="cpu,cpu"`` (``grn_nodes/pool.py``): the tiny workflow sampled by two worker processes gives the
single-process pixels, survives an interrupt and a rerun with the same workers, and ``POST /free`` leaves none of them
among the server's child processes (read from /proc).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import socket
import struct
import time
import urllib.parse
import urllib.request
import uuid

import pytest

from tests._comfyui import COMFYUI_DIR, ROOT, USER_REFINER, comfyui_server
from tests._workflows import load, to_api_prompt, widget_names_from_object_info

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the "
                                                        "integration test (see tests/test_comfyui_integration.py)")
NODES = ["GRNLoadModel", "GRNEncodePrompt", "GRNRefineSampler", "GRNDecodeVideo", "GRNEncodeImage", "GRNRefineStats"]


class WebSocket:
    """Just enough of RFC 6455 for ComfyUI's /ws: read text/binary frames, answer pings."""

    def __init__(self, host: str, port: int, path: str):
        self.sock = socket.create_connection((host, port), timeout=120)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("websocket closed")
            data += chunk
        return data

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def receive(self) -> tuple[int, bytes]:
        message, first_opcode = b"", None
        while True:
            b0, b1 = self._read(2)
            opcode, length = b0 & 0x0F, b1 & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(length)
            if opcode == 9:
                self._send(10, payload)
                continue
            if opcode == 8:
                raise ConnectionError("websocket closed by the server")
            if opcode in (1, 2):
                first_opcode = opcode
            message += payload
            if b0 & 0x80:
                return first_opcode, message

    def json_messages(self):
        while True:
            opcode, data = self.receive()
            if opcode == 1:
                yield json.loads(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with comfyui_server(tmp_path_factory.mktemp("comfyui")) as running:
        yield running


def _get(server, path: str):
    with urllib.request.urlopen(server["base"] + path, timeout=60) as r:
        return json.loads(r.read())


def _post(server, path: str, body: dict | None = None):
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(server["base"] + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            text = r.read()
    except urllib.error.HTTPError as error:
        raise AssertionError(f"POST {path}: {error.code} {error.read()[:2000]!r}") from error
    return json.loads(text) if text else {}


@pytest.fixture(scope="module")
def object_info(server):
    return _get(server, "/object_info")


def _saved_widgets(workflow: dict, object_info: dict):
    """Widget names per node type for ``workflow``: the server's, less trailing ones the file is older than. The
    frontend gives a widget added at the end of a node (Load GRN's ``devices``) its default in a workflow saved
    before it existed; the API prompt then simply leaves that optional input out."""
    saved = {n["type"]: len(n.get("widgets_values", [])) for n in workflow["nodes"]}

    def names(kind: str) -> list:
        full = widget_names_from_object_info(object_info[kind])
        return full[:saved[kind]] if saved.get(kind, len(full)) < len(full) else full

    return names


def _tiny_prompt(object_info: dict, **sampler) -> dict:
    """``grn_tiny_t2v.json`` as an API prompt; ``sampler`` overrides Refine Sampler inputs (none: as shipped)."""
    workflow = load("grn_tiny_t2v.json")
    prompt = to_api_prompt(workflow, _saved_widgets(workflow, object_info))
    for node in prompt.values():
        if node["class_type"] == "GRNRefineSampler":
            node["inputs"].update(sampler)
    return prompt


def _inputs(prompt: dict, class_type: str) -> dict:
    return next(n["inputs"] for n in prompt.values() if n["class_type"] == class_type)


def _run(server, prompt: dict, interrupt_after: int | None = None) -> tuple[str, list, str]:
    client_id = str(uuid.uuid4())
    ws = WebSocket("127.0.0.1", server["port"], f"/ws?clientId={client_id}")
    try:
        prompt_id = _post(server, "/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]
        events, outcome = [], None
        for message in ws.json_messages():
            kind, data = message.get("type"), message.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "grn.refine":
                events.append(data)
                if interrupt_after is not None and len(events) == interrupt_after:
                    _post(server, "/interrupt")
            elif kind in ("execution_success", "execution_interrupted", "execution_error"):
                outcome = kind
                if kind == "execution_error":
                    outcome += ": " + data.get("exception_message", "")
                break
        return prompt_id, events, outcome
    finally:
        ws.close()


def test_object_info_lists_every_node(object_info, server):
    missing = [n for n in NODES if n not in object_info]
    assert not missing, f"missing {missing}; log: {server['log'].read_text()[-3000:]}"
    assert "IMPORT FAILED" not in [l for l in server["log"].read_text().splitlines() if "ComfyUI-GRN" in l]
    refiners = object_info["GRNLoadModel"]["input"]["required"]["refiner"][1]["options"]
    assert refiners[0] == "tiny" and USER_REFINER in refiners  # user's extra path kept


def test_widget_script_is_served(server):
    extensions = _get(server, "/extensions")
    assert any(e.endswith("ComfyUI-GRN/grn_refine_widget.js") for e in extensions), extensions


def _history(server, prompt_id: str) -> dict:
    for _ in range(60):  # the history entry is written just after execution_success is sent
        history = _get(server, f"/history/{prompt_id}").get(prompt_id)
        if history:
            return history
        time.sleep(0.5)
    raise AssertionError(f"no history for {prompt_id}")


def _frames(data: bytes):
    """Decode a video file's frames to uint8 ``[T, H, W, 3]`` (PyAV, a requirement of the pack)."""
    import io

    import av
    import numpy as np

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_tiny_workflow_runs_as_shipped_with_one_event_per_step_and_makes_the_video(server, object_info):
    prompt = _tiny_prompt(object_info)  # nothing swapped: the built-in model and text encoder, shipped settings
    loader, encoder, sampler = (_inputs(prompt, k) for k in ("GRNLoadModel", "GRNEncodePrompt", "GRNRefineSampler"))
    assert loader["refiner"] == "tiny" and encoder["umt5_file"] == "none" and "clip" not in encoder
    steps = sampler["steps"]
    assert (sampler["width"], sampler["height"], sampler["frames"], sampler["adaptive_steps"]) == (32, 32, 9, False)

    prompt_id, events, outcome = _run(server, prompt)
    assert outcome == "execution_success", f"{outcome}; log: {server['log'].read_text()[-3000:]}"
    assert [e["step"] for e in events] == list(range(steps))
    assert all(e["total"] == e["planned"] == steps for e in events)
    assert all(e["prompt_id"] == prompt_id and e["node"] for e in events)
    assert all(len(json.dumps(e)) <= 64 * 1024 for e in events)
    assert all(e["size"] == [32, 32, 9] and e["map"] and e["preview"] for e in events)
    assert events[-1]["counts"]["blank"] < events[0]["counts"]["blank"]

    history = _history(server, prompt_id)
    files = [f for out in history["outputs"].values() for f in out.get("images", []) + out.get("videos", [])
             if str(f.get("filename", "")).endswith((".mp4", ".webm", ".webp"))]
    assert files, history["outputs"]
    query = urllib.parse.urlencode({k: files[0][k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{server['base']}/view?{query}", timeout=60) as r:
        assert r.status == 200
        video = r.read()
    frames = _frames(video)
    assert frames.shape == (9, 32, 32, 3), frames.shape
    from grn_core.data.judge import judge

    verdict = judge(frames)
    hits = verdict.matches(encoder["prompt"])
    assert hits["color"] and hits["direction"], (encoder["prompt"], verdict.caption)


def test_interrupt_midway_then_a_full_run(server, object_info):
    _, events, outcome = _run(server, _tiny_prompt(object_info, seed=2, steps=200), interrupt_after=3)
    assert outcome == "execution_interrupted", outcome
    assert 3 <= len(events) < 200
    _, events, outcome = _run(server, _tiny_prompt(object_info, seed=3, steps=5))
    assert outcome == "execution_success", outcome
    assert [e["step"] for e in events] == list(range(5))


# ==== ComfyUI's memory manager ========================================================================================
# The pack logs one INFO line whenever ComfyUI's memory manager loads or unloads its refiner or tokenizer
# (grn_nodes/patching.py); ComfyUI itself logs "Requested to load <class>" whenever load_models_gpu does not find a
# model in comfy.model_management.current_loaded_models. Both are read from the server log.

GRN_MEMORY_LINE = re.compile(r"GRN: (refiner|tokenizer) \((.+?)\) (loaded by|unloaded by|released)")
COMFY_CLASS = {"refiner": "GRNRefiner", "tokenizer": "HBQTokenizer"}


def _log(server) -> str:
    return server["log"].read_text(errors="replace")


def _resident(text: str) -> tuple[dict, dict]:
    """From the pack's lines: how many of each model the manager holds at the end of ``text``, and the most ever."""
    now, most = {"refiner": 0, "tokenizer": 0}, {"refiner": 0, "tokenizer": 0}
    for kind, _, what in GRN_MEMORY_LINE.findall(text):
        now[kind] += 1 if what == "loaded by" else -1
        most[kind] = max(most[kind], now[kind])
    return now, most


def _loads(text: str, kind: str) -> tuple[int, int]:
    """(the pack's "loaded by" lines, ComfyUI's "Requested to load <class>" lines) for ``kind`` in ``text``."""
    ours = sum(1 for k, _, what in GRN_MEMORY_LINE.findall(text) if k == kind and what == "loaded by")
    return ours, text.count(f"Requested to load {COMFY_CLASS[kind]}")


def _saved_pixels(server, prompt_id: str, save_id: str):
    from grn_core.media import read_video

    saved = _history(server, prompt_id)["outputs"][save_id]["images"]
    assert len(saved) == 1, saved
    return read_video(server["log"].parent / "output" / saved[0]["subfolder"] / saved[0]["filename"])[0]


def test_refiner_and_tokenizer_live_in_comfyuis_memory_manager(server, object_info):
    """After a run both models are in ``current_loaded_models`` and stay there (the next run loads nothing);
    ``POST /free {"unload_models": true, "free_memory": true}`` (the menu's "Unload models" and "Free model and node
    cache") unloads them, the next run loads them again and makes the same picture; an interrupted run and its rerun
    leave one of each loaded."""
    import numpy as np

    prompt, save_id = _save_image_prompt(object_info, "t2i", 1, "a blue square", False, "grn/memory")
    _inputs(prompt, "GRNRefineSampler")["steps"] = 8
    other = json.loads(json.dumps(prompt))
    _inputs(other, "GRNRefineSampler")["seed"] += 1

    def run(request: dict) -> tuple[str, str]:
        mark = len(_log(server))
        prompt_id, _, outcome = _run(server, request)
        assert outcome == "execution_success", f"{outcome}; log: {_log(server)[-3000:]}"
        return prompt_id, _log(server)[mark:]

    first_id, _ = run(prompt)
    first = _saved_pixels(server, first_id, save_id)
    assert _resident(_log(server)) == ({"refiner": 1, "tokenizer": 1}, {"refiner": 1, "tokenizer": 1}), \
        _log(server)[-3000:]

    _, text = run(other)  # both found in current_loaded_models: nothing is loaded again
    assert _loads(text, "refiner") == (0, 0) and _loads(text, "tokenizer") == (0, 0), text[-3000:]

    mark = len(_log(server))
    _post(server, "/free", {"unload_models": True, "free_memory": True})
    for _ in range(120):
        if _resident(_log(server))[0] == {"refiner": 0, "tokenizer": 0}:
            break
        time.sleep(0.25)
    unloaded = [k for k, _, what in GRN_MEMORY_LINE.findall(_log(server)[mark:]) if what == "unloaded by"]
    assert sorted(unloaded) == ["refiner", "tokenizer"], _log(server)[mark:]

    second_id, text = run(prompt)  # loaded again by the manager, the same picture
    assert _loads(text, "refiner") == (1, 1) and _loads(text, "tokenizer") == (1, 1), text[-3000:]
    assert np.array_equal(_saved_pixels(server, second_id, save_id), first)

    interrupted = json.loads(json.dumps(prompt))
    _inputs(interrupted, "GRNRefineSampler").update(steps=200, seed=7)
    _, events, outcome = _run(server, interrupted, interrupt_after=3)
    assert outcome == "execution_interrupted" and 3 <= len(events) < 200, outcome
    third_id, text = run(prompt)
    assert _loads(text, "refiner") == (0, 0) and _loads(text, "tokenizer") == (0, 0), text[-3000:]
    assert np.array_equal(_saved_pixels(server, third_id, save_id), first)
    whole = _log(server)
    assert _resident(whole) == ({"refiner": 1, "tokenizer": 1}, {"refiner": 1, "tokenizer": 1}), whole[-3000:]
    for kind in ("refiner", "tokenizer"):  # every load ComfyUI asked for is one the pack saw, and no other
        ours, comfy = _loads(whole, kind)
        assert ours == comfy >= 1, (kind, ours, comfy)


# ==== same request, same bits, every door =============================================================================

DOORS = [  # (task, frames, prompt): the tiny model's image and video captions
    ("t2i", 1, "a blue square"),
    ("t2v", 1, "a red circle moving right"),
    ("t2v", 9, "a red circle moving right"),
]


def _sampler_preset(task: str) -> dict:
    """The Refine Sampler's widget values the shipped workflows are written with (``tools/make_workflows.py``)."""
    spec = importlib.util.spec_from_file_location("make_workflows", ROOT / "tools" / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sampler_preset(task)


def _save_image_prompt(object_info: dict, task: str, frames: int, text: str, adaptive: bool,
                       prefix: str) -> tuple[dict, str]:
    """``grn_tiny_t2v.json`` as an API prompt, its video tail (CreateVideo, SaveVideo) and stats replaced by one
    ``SaveImage`` on Decode Video's frames; the sampler's widgets are ``sampler_preset(task)`` at 32x32, ``frames``,
    the shipped seed, and ``adaptive_steps`` with the model's own rule. Returns the prompt and SaveImage's id."""
    prompt = _tiny_prompt(object_info)
    decode_id = next(i for i, n in prompt.items() if n["class_type"] == "GRNDecodeVideo")
    for node_id in [i for i, n in prompt.items()
                    if n["class_type"] in ("CreateVideo", "SaveVideo", "GRNRefineStats", "PreviewImage")]:
        del prompt[node_id]
    save_id = str(max(int(i) for i in prompt) + 1)
    prompt[save_id] = {"class_type": "SaveImage", "inputs": {"images": [decode_id, 0], "filename_prefix": prefix}}
    _inputs(prompt, "GRNEncodePrompt").update(prompt=text, task=task)
    sampler = _inputs(prompt, "GRNRefineSampler")
    shipped_seed = sampler["seed"]
    values = {k: v for k, v in _sampler_preset(task).items() if k != "control_after_generate"}
    sampler.update(values)
    sampler.update(width=32, height=32, frames=frames, seed=shipped_seed, adaptive_steps=adaptive,
                   adaptive_rule="model")
    return prompt, save_id


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("task,frames,text", DOORS, ids=[f"{t}-{f}f" for t, f, _ in DOORS])
def test_same_request_same_pixels_through_comfyui_and_the_cli(server, object_info, tmp_path, task, frames,
                                                              text, adaptive):
    """One request through two doors, compared pixel for pixel (uint8, decoded with PIL).

    ComfyUI: the shipped tiny workflow's nodes with ``SaveImage`` at the end, which writes one PNG per frame into the
    server's output directory (``--output-directory``, beside the server log). The command line, in this process:
    ``generate --model tiny --task T --prompt P --seed S --width 32 --height 32 --frames F [--adaptive]`` with the
    seed widget's value as ``--seed``; one frame to ``.png``, nine to ``.webp``, which ``grn_core.media`` writes
    lossless (``.gif`` quantises colours, ``.mp4`` is lossy H.264), so all nine frames are compared too. Both run on
    one CPU thread: the server with ``OMP_NUM_THREADS=1`` (``tests/_comfyui.py``), the command line by its own default
    for the tiny model on the CPU (restored afterwards). The number of ``grn.refine`` events must equal the command
    line's step count (its JSON sidecar): 50 fixed, fewer adaptive.
    """
    import numpy as np
    import torch

    from grn_core.cli import main as cli
    from grn_core.media import read_video

    mode = "adaptive" if adaptive else "fixed"
    prefix = f"grn/doors_{task}_{frames}f_{mode}"
    prompt, save_id = _save_image_prompt(object_info, task, frames, text, adaptive, prefix)
    sampler = _inputs(prompt, "GRNRefineSampler")
    seed = sampler["seed"]
    assert seed == _inputs(_tiny_prompt(object_info), "GRNRefineSampler")["seed"]  # the shipped seed widget
    prompt_id, events, outcome = _run(server, prompt)
    assert outcome == "execution_success", f"{outcome}; log: {server['log'].read_text()[-3000:]}"
    saved = _history(server, prompt_id)["outputs"][save_id]["images"]
    assert len(saved) == frames and all(f["type"] == "output" for f in saved), saved
    output_dir = server["log"].parent / "output"  # tests/_comfyui.py: --output-directory work/output
    comfy = np.stack([read_video(output_dir / f["subfolder"] / f["filename"])[0] for f in saved])

    out = tmp_path / ("cli.png" if frames == 1 else "cli.webp")
    argv = ["generate", "--model", "tiny", "--task", task, "--prompt", text, "--seed", str(seed), "--width", "32",
            "--height", "32", "--frames", str(frames), "--out", str(out)] + (["--adaptive"] if adaptive else [])
    threads = torch.get_num_threads()
    try:
        assert cli(argv) == 0
    finally:
        torch.set_num_threads(threads)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    line = read_video(out)

    assert comfy.shape == line.shape == (frames, 32, 32, 3), (comfy.shape, line.shape)
    assert len(np.unique(line.reshape(-1, 3), axis=0)) > 1  # a picture, not a blank that any door would match
    assert len(events) == sidecar["steps"], (len(events), sidecar["steps"])
    assert (sidecar["steps"] < sampler["steps"]) if adaptive else (sidecar["steps"] == sampler["steps"]), sidecar
    differ = np.any(comfy != line, axis=-1)
    assert not differ.any(), (
        f"{int(differ.sum())} of {differ.size} pixels differ (frames {sorted(set(np.nonzero(differ)[0].tolist()))}, "
        f"largest difference {int(np.abs(comfy.astype(int) - line.astype(int)).max())}); ComfyUI {sampler}, "
        f"CLI {argv}, sidecar {sidecar}")


def _shipped(object_info: dict, name: str) -> dict:
    workflow = load(name)
    return to_api_prompt(workflow, _saved_widgets(workflow, object_info))


def _videos(server, prompt_id: str) -> dict:
    """Node id -> frames of the video each save node wrote."""
    history = _history(server, prompt_id)
    saved = {}
    for node, out in history["outputs"].items():
        for f in out.get("images", []) + out.get("videos", []):
            if str(f.get("filename", "")).endswith((".mp4", ".webm", ".webp")):
                query = urllib.parse.urlencode({k: f[k] for k in ("filename", "subfolder", "type")})
                with urllib.request.urlopen(f"{server['base']}/view?{query}", timeout=60) as r:
                    saved[node] = _frames(r.read())
    return saved


def test_tiny_inpaint_workflow_runs_as_shipped_and_keeps_the_masked_out_cells(server, object_info):
    prompt = _shipped(object_info, "grn_tiny_inpaint.json")
    samplers = {k: n for k, n in prompt.items() if n["class_type"] == "GRNRefineSampler"}
    edit_id = next(k for k, n in samplers.items() if "source_tokens" in n["inputs"])
    assert "mask" in samplers[edit_id]["inputs"] and samplers[edit_id]["inputs"]["strength"] == 0.8
    prompt_id, events, outcome = _run(server, prompt)
    assert outcome == "execution_success", f"{outcome}; log: {server['log'].read_text()[-3000:]}"
    edit_events = [e for e in events if e["node"] == edit_id]
    assert edit_events and edit_events[0]["fixed"] and edit_events[0]["fixed_colour"]
    assert all(len(json.dumps(e)) <= 64 * 1024 for e in events)
    from grn_nodes.widget_events import unpack_bit_map

    fixed = edit_events[0]["fixed"]
    cells = unpack_bit_map(fixed["data"], (fixed["t"], fixed["h"], fixed["w"]))
    assert cells[..., :2].all() and not cells[..., 2:].any()  # the mask's black left half is kept
    text = _history(server, prompt_id)["outputs"][edit_id]["text"][0]
    assert "kept 24 of 48 latent cells (fixed)" in text and "strength 0.8: starts at step" in text
    videos = _videos(server, prompt_id)
    assert videos and all(v.shape == (9, 32, 32, 3) for v in videos.values()), {k: v.shape for k, v in videos.items()}


def test_tiny_extend_workflow_runs_as_shipped_and_makes_both_clips(server, object_info):
    prompt = _shipped(object_info, "grn_tiny_extend.json")
    extend_id = next(k for k, n in prompt.items() if "extend_from" in n["inputs"])
    prompt_id, events, outcome = _run(server, prompt)
    assert outcome == "execution_success", f"{outcome}; log: {server['log'].read_text()[-3000:]}"
    # clip 1 may come from ComfyUI's cache (the inpainting workflow's first run is the same request)
    extend_events = [e for e in events if e["node"] == extend_id]
    assert extend_events and extend_events[0]["fixed"], [e["node"] for e in events]
    fixed = extend_events[0]["fixed"]
    from grn_nodes.widget_events import unpack_bit_map

    cells = unpack_bit_map(fixed["data"], (fixed["t"], fixed["h"], fixed["w"]))
    assert cells[0].all() and not cells[1:].any()  # the first latent frame (clip 1's last frame) is kept
    videos = _videos(server, prompt_id)
    assert len(videos) == 2 and all(v.shape == (9, 32, 32, 3) for v in videos.values())


# ==== Load GRN devices: a pool of worker processes ====================================================================

POOL_STARTED = re.compile(r"GRN: device pool \(tiny on cpu, cpu\) started in [\d.]+ s: workers pid (\d+), (\d+)")


def _children(pid: int) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the live processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append((int(entry), command))
    return found


def _workers(server) -> set[int]:
    """The server's children started by multiprocessing's spawn (the pool's workers)."""
    return {pid for pid, command in _children(server["pid"]) if "spawn_main" in command}


def _saved_frames(server, prompt_id: str, save_id: str):
    """Every PNG the SaveImage node ``save_id`` wrote, as uint8 ``[frames, H, W, 3]``."""
    import numpy as np

    from grn_core.media import read_video

    saved = _history(server, prompt_id)["outputs"][save_id]["images"]
    output = server["log"].parent / "output"
    return np.stack([read_video(output / f["subfolder"] / f["filename"])[0] for f in saved])


def _no_workers_left(server, pids: set[int], seconds: float = 60) -> None:
    for _ in range(int(seconds / 0.25)):
        if not _workers(server) and not any(os.path.exists(f"/proc/{pid}") for pid in pids):
            break
        time.sleep(0.25)
    assert not _workers(server), _children(server["pid"])
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids), pids
    # multiprocessing's resource tracker (started with the first spawned process, ends with ComfyUI) may stay
    others = [c for c in _children(server["pid"]) if "resource_tracker" not in c[1]]
    assert not others, others


def test_device_pool_cpu_cpu_runs_the_tiny_workflow_survives_an_interrupt_and_unload_leaves_no_worker(
        server, object_info):
    """Load GRN ``devices="cpu,cpu"``: two worker processes (gloo) sample the tiny T2V workflow with one guidance
    branch each and give the single-process run's pixels; an interrupted run leaves the same warm workers, whose next
    run gives those pixels again; ``POST /free`` ("Unload models") stops and joins them: no worker is left among the
    server's children; the next run starts them again, and freeing everything stops them once more."""
    import numpy as np

    text = "a red circle moving right"
    single, save_id = _save_image_prompt(object_info, "t2v", 9, text, False, "grn/pool_single")
    pooled, _ = _save_image_prompt(object_info, "t2v", 9, text, False, "grn/pool_cpu_cpu")
    _inputs(pooled, "GRNLoadModel")["devices"] = "cpu,cpu"
    steps = _inputs(pooled, "GRNRefineSampler")["steps"]
    assert _inputs(pooled, "GRNRefineSampler")["guidance"] > 1  # the cfg mode: a branch per worker

    def run(request: dict, interrupt_after: int | None = None) -> tuple[str, list, str, str]:
        mark = len(_log(server))
        prompt_id, events, outcome = _run(server, request, interrupt_after=interrupt_after)
        return prompt_id, events, outcome, _log(server)[mark:]

    single_id, _, outcome, _ = run(single)
    assert outcome == "execution_success", f"{outcome}; log: {_log(server)[-3000:]}"
    expected = _saved_frames(server, single_id, save_id)
    assert expected.shape == (9, 32, 32, 3) and len(np.unique(expected.reshape(-1, 3), axis=0)) > 1

    pooled_id, events, outcome, text_log = run(pooled)
    assert outcome == "execution_success", f"{outcome}; log: {_log(server)[-3000:]}"
    assert [e["step"] for e in events] == list(range(steps))  # the live widget gets every step, as in-process
    assert np.array_equal(_saved_frames(server, pooled_id, save_id), expected)
    started = POOL_STARTED.findall(text_log)
    assert len(started) == 1, text_log[-3000:]
    pids = {int(p) for p in started[0]}
    assert _workers(server) == pids

    interrupted = json.loads(json.dumps(pooled))
    _inputs(interrupted, "GRNRefineSampler").update(steps=200, seed=_inputs(pooled, "GRNRefineSampler")["seed"] + 1)
    _, events, outcome, _ = run(interrupted, interrupt_after=3)
    assert outcome == "execution_interrupted" and 3 <= len(events) < 200, (outcome, len(events))
    assert _workers(server) == pids  # the same warm workers

    again_id, events, outcome, text_log = run(pooled)  # runs again (the interrupted prompt replaced its cache)
    assert outcome == "execution_success", f"{outcome}; log: {_log(server)[-3000:]}"
    assert len(events) == steps and not POOL_STARTED.search(text_log)
    assert np.array_equal(_saved_frames(server, again_id, save_id), expected)

    mark = len(_log(server))
    _post(server, "/free", {"unload_models": True})
    _no_workers_left(server, pids)
    assert "GRN: device pool (tiny on cpu, cpu) unloaded by ComfyUI's memory manager" in _log(server)[mark:]

    restarted = json.loads(json.dumps(pooled))
    _inputs(restarted, "GRNRefineSampler")["seed"] += 2  # a new request: the cached output is not reused
    _, events, outcome, text_log = run(restarted)
    assert outcome == "execution_success" and len(events) == steps, outcome
    started = POOL_STARTED.findall(text_log)
    assert len(started) == 1 and not {int(p) for p in started[0]} & pids, text_log[-3000:]
    _post(server, "/free", {"unload_models": True, "free_memory": True})
    _no_workers_left(server, {int(p) for p in started[0]})
