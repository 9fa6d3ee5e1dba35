"""The same request gives the same bits through every door: the command line, the Python API and the ComfyUI nodes.

One prompt and seed on the built-in tiny model (its native 32x32), as a 9-frame video (T2V) and a 1-frame image
(T2I), with fixed steps and with adaptive steps by the model's own (calibrated) rule:

* CLI: ``python -m grn_core generate`` with no size or sampler flags (lossless .webp / .png, read back with PIL);
* API: ``grn_core.request`` + ``grn_core.pipeline`` + ``grn_core.media.to_uint8``;
* nodes: Load GRN -> Encode Prompt -> Refine Sampler -> Decode Video through ``execute()`` with the fakes of
  ``tests/_fake_comfy.py``, the widgets left at their defaults except the request itself; the IMAGE becomes bytes as
  ComfyUI's SaveImage makes them (``np.clip(255. * image, 0, 255).astype(np.uint8)``: truncation).

Token bits (API vs nodes) and uint8 pixels (all three) must be identical, and the CLI's sidecar must record the
settings the nodes ran with. The frames have values where rounding would give another byte than truncation, so a
door that rounds fails here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from grn_core.cli import main
from grn_core.media import to_uint8
from grn_core.models import load_tiny
from grn_core.pipeline import GenerationRequest, TokenResult, decode_tokens, encode_prompt, generate_tokens
from grn_core.presets import preset
from grn_core.request import model_rule, negative_prompt, plan_size, resolve_settings
from tests._fake_comfy import fake_comfy, to_uint8_like_save_image

PROMPT = "a red circle moving right"
SEED = 7
CASES = {  # name: (task, frames, adaptive)
    "video-fixed": ("t2v", 9, False),
    "video-adaptive": ("t2v", 9, True),
    "image-fixed": ("t2i", 1, False),
    "image-adaptive": ("t2i", 1, True),
}


@dataclass
class Door:
    pixels: np.ndarray  # uint8 [T, H, W, 3]
    tokens: Any = None  # TokenResult (API and nodes)
    settings: Any = None  # the sampler settings the door ran with
    floats: Any = None  # the frames before they became bytes (nodes: the IMAGE)
    sidecar: Any = None  # CLI
    extra: Any = None


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread in every door, as the CLI sets for the tiny model (``grn_core.cli.common.set_threads``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_door(out_dir: Path, task: str, frames: int, adaptive: bool) -> Door:
    from PIL import Image, ImageSequence

    out = out_dir / ("image.png" if frames == 1 else "video.webp")  # both lossless
    argv = ["generate", "--model", "tiny", "--device", "cpu", "--threads", "1", "--task", task, "--prompt", PROMPT,
            "--seed", str(SEED), "--out", str(out)] + (["--adaptive"] if adaptive else [])
    assert main(argv) == 0
    with Image.open(out) as image:
        pixels = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(image)])
    return Door(pixels, sidecar=json.loads(out.with_suffix(".json").read_text()))


def api_door(task: str, frames: int, adaptive: bool) -> Door:
    model = load_tiny()
    plan = plan_size(model, task, 32, 32, frames)
    settings = resolve_settings(model, task, adaptive=adaptive)
    features = encode_prompt(model, None, PROMPT, negative_prompt(model, task), task=task)
    request = GenerationRequest(width=plan.width, height=plan.height, frames=plan.frames, seed=SEED,
                                settings=settings)
    tokens = generate_tokens(model, features, request)
    video = decode_tokens(model, tokens)[0]
    return Door(to_uint8(video), tokens, settings, video)


def node_door(models_dir: Path, task: str, frames: int, adaptive: bool) -> Door:
    used = []
    with fake_comfy(models_dir) as comfy:
        nodes = comfy.nodes
        build_settings = nodes.build_settings

        def spy(*args, **kwargs):
            used.append(build_settings(*args, **kwargs))
            return used[-1]

        nodes.build_settings = spy  # a fresh module for this door: nothing to restore
        loaded = comfy.run(nodes.GRNLoadModel, refiner="tiny").args[0]
        cond = comfy.run(nodes.GRNEncodePrompt, model=loaded, prompt=PROMPT, negative_prompt="",
                         task="auto" if task == "t2v" else task, default_negative=True).args[0]
        # Everything else stays at the node's defaults (the official T2V preset); T2I's temperature is its own.
        widgets = {} if task == "t2v" else {"temperature": preset(task).temperature}
        out = comfy.run(nodes.GRNRefineSampler, model=loaded, conditioning=cond, width=32, height=32, frames=frames,
                        seed=SEED, adaptive_steps=adaptive, adaptive_rule="model", **widgets)
        tokens: TokenResult = out.args[0]
        images, fps = comfy.run(nodes.GRNDecodeVideo, model=loaded, tokens=tokens, tile=0).args
    return Door(to_uint8_like_save_image(images), tokens, used[0], images,
                extra={"ui": out.ui, "cond": cond, "fps": fps})


@pytest.fixture(scope="module")
def doors(tmp_path_factory):
    results = {}

    def run(case: str) -> dict[str, Door]:
        if case not in results:
            task, frames, adaptive = CASES[case]
            work = tmp_path_factory.mktemp(case)
            results[case] = {"cli": cli_door(work, task, frames, adaptive), "api": api_door(task, frames, adaptive),
                             "nodes": node_door(work / "models", task, frames, adaptive)}
        return results[case]

    return run


@pytest.mark.parametrize("case", list(CASES))
def test_same_tokens_and_pixels_through_every_door(doors, case):
    task, frames, adaptive = CASES[case]
    cli, api, nodes = doors(case)["cli"], doors(case)["api"], doors(case)["nodes"]
    assert api.tokens.task == nodes.tokens.task == task
    assert nodes.settings == api.settings
    assert api.tokens.bits.dtype == nodes.tokens.bits.dtype == torch.uint8
    assert torch.equal(api.tokens.bits, nodes.tokens.bits)
    assert api.tokens.sampling.steps == nodes.tokens.sampling.steps
    assert cli.pixels.shape == (frames, 32, 32, 3) and cli.pixels.dtype == np.uint8
    assert api.pixels.shape == nodes.pixels.shape == cli.pixels.shape
    assert np.array_equal(api.pixels, nodes.pixels)
    assert np.array_equal(cli.pixels, nodes.pixels)


@pytest.mark.parametrize("case", list(CASES))
def test_cli_sidecar_records_what_the_nodes_ran(doors, case):
    task, frames, adaptive = CASES[case]
    sidecar, nodes = doors(case)["cli"].sidecar, doors(case)["nodes"]
    settings = json.loads(json.dumps(nodes.settings.to_dict(), default=list))
    assert sidecar["settings"] == settings
    assert (sidecar["task"], sidecar["seed"], sidecar["width"], sidecar["height"], sidecar["frames"]) == \
        (task, SEED, 32, 32, frames)
    assert sidecar["negative"] == nodes.extra["cond"].features[task].negative == ""  # the tiny model's default
    sampling = nodes.tokens.sampling
    assert sidecar["steps"] == sampling.steps[0] and sidecar["nfe"] == sampling.nfe[0]
    if adaptive:  # the model's own calibrated rule, applied the same way
        rule = model_rule(load_tiny(), task)
        assert rule.calibrated and sidecar["settings"]["adaptive"] == json.loads(json.dumps(rule.__dict__))
        assert sidecar["adaptive_decision"] == sampling.remaining_steps[0] is not None
        assert sidecar["steps"] == rule.warmup + sampling.remaining_steps[0] < settings["steps"]
        assert "(calibrated)" in nodes.extra["ui"]["text"][0]
    else:
        assert sidecar["settings"]["adaptive"] is None and sidecar["steps"] == settings["steps"] == 50
        assert "adaptive" not in nodes.extra["ui"]["text"][0]
    assert nodes.extra["ui"]["text"][0].split("; ")[1].startswith(f"{settings['steps']} steps, guidance 3, ")


@pytest.mark.parametrize("case", list(CASES))
def test_rounding_instead_of_truncating_would_change_these_frames(doors, case):
    """The comparison above can fail: rounding ``x * 255 + 0.5`` gives other bytes than truncation here."""
    nodes = doors(case)["nodes"]
    scaled = 255.0 * nodes.floats.numpy().astype(np.float64)
    rounded = np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)
    differ = rounded != nodes.pixels
    assert differ.any() and int(differ.sum()) > 0.1 * differ.size
    assert not np.array_equal(rounded, doors(case)["cli"].pixels)
