"""Write the example workflows in ``workflows/`` (ComfyUI UI format, version 0.4).

    python tools/make_workflows.py

Widget values follow each node's widget order; ``tests/test_nodes_workflows.py`` checks them against the node
schemas, so a changed node fails the tests until this script is re-run.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the library importable
    sys.path.insert(0, str(ROOT))

from grn_core.models import load_tiny  # noqa: E402
from grn_core.presets import ADAPTIVE_RULES, preset  # noqa: E402
from grn_core.request import default_size  # noqa: E402

OUT = ROOT / "workflows"

# Widget names of our nodes, in schema order (required inputs first, then optional ones).
GRN_WIDGETS = {
    "GRNLoadModel": ["refiner", "tokenizer", "weight_dtype", "layout", "offload", "download_missing", "devices"],
    "GRNEncodePrompt": ["prompt", "negative_prompt", "task", "add_task_tag", "umt5_file", "default_negative"],
    "GRNRefineSampler": ["width", "height", "resolution", "aspect", "frames", "duration", "seed",
                         "control_after_generate", "steps", "adaptive_steps", "min_steps", "warmup", "adaptive_k",
                         "adaptive_b", "guidance", "guidance_interval", "temperature", "shift", "class_index",
                         "adaptive_rule", "strength"],
    "GRNDecodeVideo": ["tile"],
    "GRNEncodeImage": ["width", "height"],
    "GRNRefineStats": [],
}


def sampler_preset(task: str) -> dict:
    """The Refine Sampler's widget values for ``task``: the official preset (grn_core.presets), fixed steps, and
    the family's adaptive numbers in the custom-rule widgets (used only with adaptive_rule 'custom')."""
    p, rule = preset(task), ADAPTIVE_RULES[task]
    return dict(width=p.width, height=p.height, resolution="custom", aspect="from width/height", frames=p.frames,
                duration=0.0, seed=42, control_after_generate="fixed", steps=p.steps, adaptive_steps=p.adaptive,
                min_steps=rule["min_steps"], warmup=rule["warmup"], adaptive_k=rule["k"], adaptive_b=rule["b"],
                guidance=p.guidance, guidance_interval=p.cfg_interval, temperature=p.temperature, shift=p.shift,
                class_index=0, adaptive_rule="model", strength=1.0)


@functools.lru_cache(maxsize=None)
def _tiny_default_size() -> tuple[int, int, int]:
    return tuple(default_size(load_tiny(), "t2v"))  # load the tiny model once, not for every workflow


def tiny_size() -> dict:
    """The tiny model's native size, as its file says (``grn.defaults``)."""
    width, height, frames = _tiny_default_size()
    return dict(width=width, height=height, frames=frames)


# Sockets: (inputs [(name, type, is_widget_input)], outputs [(name, type)])
SOCKETS = {
    "GRNLoadModel": ([], [("model", "GRN_MODEL")]),
    "GRNEncodePrompt": ([("model", "GRN_MODEL"), ("clip", "CLIP")], [("conditioning", "GRN_CONDITIONING")]),
    "GRNRefineSampler": ([("model", "GRN_MODEL"), ("conditioning", "GRN_CONDITIONING"), ("first_frame", "IMAGE"),
                          ("first_frame_tokens", "GRN_TOKENS"), ("source_tokens", "GRN_TOKENS"), ("mask", "MASK"),
                          ("extend_from", "IMAGE")], [("tokens", "GRN_TOKENS")]),
    "GRNDecodeVideo": ([("model", "GRN_MODEL"), ("tokens", "GRN_TOKENS")], [("images", "IMAGE"), ("fps", "FLOAT")]),
    "GRNEncodeImage": ([("model", "GRN_MODEL"), ("image", "IMAGE")], [("tokens", "GRN_TOKENS")]),
    "GRNRefineStats": ([("tokens", "GRN_TOKENS")], [("chart", "IMAGE")]),
    "CLIPLoader": ([], [("CLIP", "CLIP")]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "CreateVideo": ([("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")], [("VIDEO", "VIDEO")]),
    "SaveVideo": ([("video", "VIDEO")], []),
    "SaveImage": ([("images", "IMAGE")], []),
    "PreviewImage": ([("images", "IMAGE")], []),
    "SaveAnimatedWEBP": ([("images", "IMAGE")], []),
    "SolidMask": ([], [("MASK", "MASK")]),
    "MaskComposite": ([("destination", "MASK"), ("source", "MASK")], [("MASK", "MASK")]),
    "Note": ([], []),
}
WIDGET_INPUTS = {("CreateVideo", "fps")}  # sockets that are also widgets (their value stays in widgets_values)
SIZES = {"GRNRefineSampler": [420, 900], "Note": [420, 260], "GRNEncodePrompt": [400, 300]}


class Graph:
    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, type_: str, pos: tuple[int, int], widgets: list, title: str | None = None) -> int:
        node_id = len(self.nodes) + 1
        inputs = []
        for name, kind in SOCKETS[type_][0]:
            entry = {"name": name, "type": kind, "link": None}
            if (type_, name) in WIDGET_INPUTS:
                entry["widget"] = {"name": name}
            inputs.append(entry)
        outputs = [{"name": n, "type": k, "links": [], "slot_index": i} for i, (n, k) in enumerate(SOCKETS[type_][1])]
        node = {"id": node_id, "type": type_, "pos": list(pos), "size": SIZES.get(type_, [320, 160]), "flags": {},
                "order": node_id - 1, "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": type_}, "widgets_values": widgets}
        if type_ == "Note":
            node["properties"] = {}
            node["color"], node["bgcolor"] = "#432", "#653"
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node_id

    def link(self, src: int, src_slot: int, dst: int, dst_input: str) -> None:
        link_id = len(self.links) + 1
        source, target = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, s in enumerate(target["inputs"]) if s["name"] == dst_input)
        kind = source["outputs"][src_slot]["type"]
        target["inputs"][slot]["link"] = link_id
        source["outputs"][src_slot]["links"].append(link_id)
        self.links.append([link_id, src, src_slot, dst, slot, kind])

    def to_json(self) -> dict:
        return {"id": "00000000-0000-4000-8000-000000000000", "revision": 0, "last_node_id": len(self.nodes),
                "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links, "groups": [],
                "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def grn(type_: str, preset_task: str = "t2v", **values) -> list:
    base = sampler_preset(preset_task) if type_ == "GRNRefineSampler" else {}
    base.update(values)
    return [base[name] for name in GRN_WIDGETS[type_]]


def loader(refiner: str) -> list:
    return grn("GRNLoadModel", refiner=refiner, tokenizer="auto", weight_dtype="default", layout="auto",
               offload="auto", download_missing=False, devices="")


def prompt_node(text: str, task: str = "auto") -> list:
    return grn("GRNEncodePrompt", prompt=text, negative_prompt="", task=task, add_task_tag=True, umt5_file="none",
               default_negative=True)


FILES_NOTE = ("Files: put the GRN refiner and the HBQ tokenizer into ComfyUI/models/grn/ (refiners may also go in "
              "models/diffusion_models/); the text encoder umt5_xxl_fp16.safetensors (the one Wan 2.1/2.2 use) into "
              "ComfyUI/models/text_encoders/. All GRN files: Hugging Face bytedance-research/GRN. Or switch on "
              "'download_missing' in Load GRN.")


def decoder(g: Graph, load: int, tokens: int, pos: tuple[int, int]) -> int:
    """A Decode Video of ``tokens`` with the loaded model."""
    decode = g.add("GRNDecodeVideo", pos, [0])
    g.link(load, 0, decode, "model")
    g.link(tokens, 0, decode, "tokens")
    return decode


def save_video(g: Graph, decode: int, pos: tuple[int, int], prefix: str) -> None:
    video = g.add("CreateVideo", pos, [16.0])
    g.link(decode, 0, video, "images")
    g.link(decode, 1, video, "fps")
    save = g.add("SaveVideo", (pos[0] + 360, pos[1]), [prefix, "auto", "auto"])
    g.link(video, 0, save, "video")


def video_tail(g: Graph, load: int, sampler: int, x: int, prefix: str) -> None:
    decode = decoder(g, load, sampler, (x, 60))
    save_video(g, decode, (x + 360, 60), prefix)
    stats = g.add("GRNRefineStats", (x, 420), [])
    g.link(sampler, 0, stats, "tokens")
    preview = g.add("PreviewImage", (x + 360, 420), [])
    g.link(stats, 0, preview, "images")


def image_tail(g: Graph, load: int, sampler: int, x: int, prefix: str) -> None:
    decode = decoder(g, load, sampler, (x, 60))
    save = g.add("SaveImage", (x + 360, 60), [prefix])
    g.link(decode, 0, save, "images")
    stats = g.add("GRNRefineStats", (x, 420), [])
    g.link(sampler, 0, stats, "tokens")
    preview = g.add("PreviewImage", (x + 360, 420), [])
    g.link(stats, 0, preview, "images")


def tiny_t2v() -> Graph:
    g = Graph()
    g.add("Note", (40, 520), ["GRN tiny text-to-video: runs as shipped, no downloads. The 'tiny' model and its "
                              "built-in text encoder come with ComfyUI-GRN (grn_core/assets/tiny/); it knows "
                              "captions like 'a red circle moving right' on small clips. Watch the refinement on "
                              "the Refine Sampler node: fill = pink, keep = blue, erase = yellow, blank = gray."])
    load = g.add("GRNLoadModel", (40, 60), loader("tiny"))
    enc = g.add("GRNEncodePrompt", (40, 240), prompt_node("a red circle moving right", "t2v"))
    g.link(load, 0, enc, "model")
    sampler = g.add("GRNRefineSampler", (480, 60), grn("GRNRefineSampler", "t2v", **tiny_size()))
    g.link(load, 0, sampler, "model")
    g.link(enc, 0, sampler, "conditioning")
    video_tail(g, load, sampler, 940, "grn/tiny_t2v")
    return g


def text_model(refiner: str, note: str, *, video: bool, task: str, prompt: str, sampler: dict,
               first_frame: bool = False) -> Graph:
    g = Graph()
    g.add("Note", (40, 600), [note + " " + FILES_NOTE])
    load = g.add("GRNLoadModel", (40, 60), loader(refiner))
    clip = g.add("CLIPLoader", (40, 240), ["umt5_xxl_fp16.safetensors", "wan", "default"])
    enc = g.add("GRNEncodePrompt", (40, 380), prompt_node(prompt, task))
    g.link(load, 0, enc, "model")
    g.link(clip, 0, enc, "clip")
    s = g.add("GRNRefineSampler", (480, 60), grn("GRNRefineSampler", task, **sampler))
    g.link(load, 0, s, "model")
    g.link(enc, 0, s, "conditioning")
    if first_frame:
        image = g.add("LoadImage", (40, 820), ["example.png", "image"])
        g.link(image, 0, s, "first_frame")
    (video_tail if video else image_tail)(g, load, s, 940, f"grn/{task}")
    return g


def right_half_mask(g: Graph, width: int, height: int, pos: tuple[int, int]) -> int:
    """A MASK from core nodes: black (keep) everywhere, white (regenerate) on the right half."""
    black = g.add("SolidMask", pos, [0.0, width, height], title="keep (black)")
    white = g.add("SolidMask", (pos[0], pos[1] + 160), [1.0, width - width // 2, height], title="regenerate (white)")
    mask = g.add("MaskComposite", (pos[0] + 340, pos[1]), [width // 2, 0, "add"], title="mask: right half white")
    g.link(black, 0, mask, "destination")
    g.link(white, 0, mask, "source")
    return mask


def inpaint(refiner: str, note: str, *, task: str, prompt: str, sampler: dict, edit_prompt: str,
            width: int, height: int, strength: float, video: bool, tiny: bool = False) -> Graph:
    """A first run (or LoadImage for the released models) -> Encode Image -> source_tokens, a mask -> a second
    Refine Sampler that regenerates the mask's white part -> Decode -> saved."""
    g = Graph()
    g.add("Note", (40, 900), [note + ("" if tiny else " " + FILES_NOTE)])
    load = g.add("GRNLoadModel", (40, 60), loader(refiner))
    if tiny:
        enc = g.add("GRNEncodePrompt", (40, 240), prompt_node(prompt, task))
        g.link(load, 0, enc, "model")
        first = g.add("GRNRefineSampler", (480, 60), grn("GRNRefineSampler", task, **sampler), title="source run")
        g.link(load, 0, first, "model")
        g.link(enc, 0, first, "conditioning")
        source = decoder(g, load, first, (940, 60))
        edit_enc = g.add("GRNEncodePrompt", (40, 560), prompt_node(edit_prompt, task), title="edit prompt")
    else:
        clip = g.add("CLIPLoader", (40, 240), ["umt5_xxl_fp16.safetensors", "wan", "default"])
        edit_enc = g.add("GRNEncodePrompt", (40, 380), prompt_node(edit_prompt, task), title="edit prompt")
        g.link(clip, 0, edit_enc, "clip")
        source = g.add("LoadImage", (40, 700), ["example.png", "image"])
    g.link(load, 0, edit_enc, "model")
    encode = g.add("GRNEncodeImage", (940, 300), [width, height], title="source tokens")
    g.link(load, 0, encode, "model")
    g.link(source, 0, encode, "image")
    mask = right_half_mask(g, width, height, (940, 480))
    edit = g.add("GRNRefineSampler", (1400, 60), grn("GRNRefineSampler", task, **sampler, strength=strength),
                 title="Refine Sampler (inpaint)")
    g.link(load, 0, edit, "model")
    g.link(edit_enc, 0, edit, "conditioning")
    g.link(encode, 0, edit, "source_tokens")
    g.link(mask, 0, edit, "mask")
    out = decoder(g, load, edit, (1860, 60))
    prefix = f"grn/{'tiny' if tiny else task}_inpaint"
    if video:
        save_video(g, out, (1860, 300), prefix)
    else:
        save = g.add("SaveImage", (1860, 300), [prefix])
        g.link(out, 0, save, "images")
    return g


def extend(refiner: str, note: str, *, prompt: str, next_prompt: str, sampler: dict, tiny: bool = False) -> Graph:
    """Clip 1 -> Decode -> extend_from of a second Refine Sampler (its first frame is clip 1's last) -> both saved."""
    g = Graph()
    g.add("Note", (40, 700), [note + ("" if tiny else " " + FILES_NOTE)])
    load = g.add("GRNLoadModel", (40, 60), loader(refiner))
    encs = []
    for i, text in enumerate((prompt, next_prompt)):
        enc = g.add("GRNEncodePrompt", (40, 240 + 320 * i), prompt_node(text, "t2v"),
                    title=("clip 1 prompt", "clip 2 prompt")[i])
        g.link(load, 0, enc, "model")
        encs.append(enc)
    if not tiny:
        clip = g.add("CLIPLoader", (40, 900), ["umt5_xxl_fp16.safetensors", "wan", "default"])
        for enc in encs:
            g.link(clip, 0, enc, "clip")
    first = g.add("GRNRefineSampler", (480, 60), grn("GRNRefineSampler", "t2v", **sampler), title="clip 1")
    g.link(load, 0, first, "model")
    g.link(encs[0], 0, first, "conditioning")
    decode1 = decoder(g, load, first, (940, 60))
    save_video(g, decode1, (1400, 60), f"grn/{'tiny' if tiny else 't2v'}_extend_clip1")
    second = g.add("GRNRefineSampler", (940, 300), grn("GRNRefineSampler", "t2v", **{**sampler, "seed": 43}),
                   title="clip 2 (extends clip 1)")
    g.link(load, 0, second, "model")
    g.link(encs[1], 0, second, "conditioning")
    g.link(decode1, 0, second, "extend_from")
    decode2 = decoder(g, load, second, (1400, 300))
    save_video(g, decode2, (1400, 540), f"grn/{'tiny' if tiny else 't2v'}_extend_clip2")
    return g


def c2i() -> Graph:
    g = Graph()
    g.add("Note", (40, 420), ["GRN class-to-image (ImageNet 256x256, GRN_ind_B). Files: GRN_ind_B_ep599.pth and "
                              "HBQ_image_tokenizer_16dim_M4.ckpt into ComfyUI/models/grn/ (Hugging Face "
                              "bytedance-research/GRN, or switch on 'download_missing'). No text encoder: set the "
                              "ImageNet class index on the sampler (207 = golden retriever). Settings are the "
                              "released complexity-aware evaluation: guidance 2.35, temperature 1.31, guided while "
                              "0.44 < t < 1, adaptive steps with the family rule (k 700, b -620, 20..50 steps)."])
    load = g.add("GRNLoadModel", (40, 60), loader("GRN_ind_B_ep599.pth"))
    s = g.add("GRNRefineSampler", (480, 60), grn("GRNRefineSampler", "c2i", adaptive_steps=True, class_index=207))
    g.link(load, 0, s, "model")
    image_tail(g, load, s, 940, "grn/c2i")
    return g


def workflows() -> dict[str, Graph]:
    return {
        "grn_tiny_t2v.json": tiny_t2v(),
        "grn_t2i_2b.json": text_model(
            "GRN_T2I_2B_FSA_251600.pth", "GRN 2B text-to-image (1024x1024 bucket '1M').", video=False, task="t2i",
            prompt="a red fox in fresh snow, morning light, detailed fur",
            sampler=dict(resolution="1M", aspect="1:1")),
        "grn_t2v_2b.json": text_model(
            "GRN_T2V_2B_FSA_sft147400_ema.pth", "GRN 2B text-to-video (848x480, 33 frames at 16 fps).", video=True,
            task="t2v", prompt="a red fox running through fresh snow, tracking shot",
            sampler=dict(resolution="0.41M", aspect="16:9", frames=33)),
        "grn_i2v_8b.json": text_model(
            "GRN_T2V_TITAN_FSA_sft10600_ema.pth",
            "GRN 8B image-to-video: the LoadImage picture becomes the first frame (cropped to the video size). "
            "The 8B model needs a large GPU; try weight_dtype fp8_e4m3fn on smaller ones.", video=True, task="i2v",
            prompt="the camera slowly pushes in, leaves move in the wind",
            sampler=dict(resolution="0.41M", aspect="16:9", frames=33), first_frame=True),
        "grn_c2i.json": c2i(),
        "grn_tiny_inpaint.json": inpaint(
            "tiny", "GRN tiny inpainting: runs as shipped. A first run makes a clip; Encode Image turns its frames "
            "into source_tokens; the mask (SolidMask + MaskComposite) is black (keep) on the left half and white "
            "(regenerate) on the right. Mask rule: white (1) = regenerate, black (0) = keep; a latent cell is kept "
            "only when all its pixels are black. Kept cells show as 'fixed' on the inpainting sampler's widget. "
            "strength < 1 starts from the source's bits (0 returns the source).", task="t2v",
            prompt="a red circle moving right", edit_prompt="a blue square moving left",
            sampler=tiny_size(), width=tiny_size()["width"], height=tiny_size()["height"], strength=0.8, video=True,
            tiny=True),
        "grn_tiny_extend.json": extend(
            "tiny", "GRN tiny clip extension: runs as shipped. Clip 2 starts from clip 1's last frame (extend_from: "
            "encoded and kept, 'fixed' on the widget) and generates what follows.",
            prompt="a red circle moving right", next_prompt="a red circle moving right", sampler=tiny_size(),
            tiny=True),
        "grn_t2i_2b_img2img.json": inpaint(
            "GRN_T2I_2B_FSA_251600.pth", "GRN 2B image-to-image / inpainting: LoadImage's picture is encoded at "
            "1024x1024 (cover-resized, centre-cropped) as source_tokens; the mask's white right half is "
            "regenerated at strength 0.75, the black left half is kept. Disconnect the mask to refine the whole "
            "image (strength sets how far from the source). LoadImage's own MASK output (1 = transparent) also "
            "works: erase what to regenerate.", task="t2i", prompt="",
            edit_prompt="a red fox in fresh snow, morning light, detailed fur",
            sampler=dict(width=1024, height=1024, frames=1), width=1024, height=1024, strength=0.75, video=False),
        "grn_t2v_2b_extend.json": extend(
            "GRN_T2V_2B_FSA_sft147400_ema.pth", "GRN 2B text-to-video, extended: clip 2 (848x480, 33 frames) "
            "starts from clip 1's last frame (kept) and continues it.",
            prompt="a red fox running through fresh snow, tracking shot",
            next_prompt="the red fox stops and looks back at the camera, snow falling",
            sampler=dict(width=848, height=480, frames=33)),
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, graph in workflows().items():
        (OUT / name).write_text(json.dumps(graph.to_json(), indent=2) + "\n")


if __name__ == "__main__":
    main()
