"""Helpers for the workflow tests: widget order of a node, and UI-format workflow -> API prompt conversion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Core nodes our workflows may use, with their widget names in order (ComfyUI 0.3.64).
CORE_WIDGETS: dict[str, list[str]] = {
    "CreateVideo": ["fps"],
    "SaveVideo": ["filename_prefix", "format", "codec"],
    "SaveAnimatedWEBP": ["filename_prefix", "fps", "lossless", "quality", "method"],
    "SaveImage": ["filename_prefix"],
    "PreviewImage": [],
    "CLIPLoader": ["clip_name", "type", "device"],
    "LoadImage": ["image", "upload"],
    "SolidMask": ["value", "width", "height"],
    "MaskComposite": ["x", "y", "operation"],
}
FRONTEND_ONLY = {"Note", "MarkdownNote"}
EXTRA_WIDGETS = {"control_after_generate", "upload"}  # frontend widgets that are not node inputs


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def widget_names_from_object_info(info: dict) -> list[str]:
    """Widget names of one node as the frontend creates them, from its /object_info entry."""
    names = []
    order = info.get("input_order", {})
    for section in ("required", "optional"):
        for name in order.get(section, list(info["input"].get(section, {}))):
            spec = info["input"][section][name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                names.append(name)
                if options.get("control_after_generate"):
                    names.append("control_after_generate")
                if options.get("image_upload"):
                    names.append("upload")
    return names


def to_api_prompt(workflow: dict, widget_names: Callable[[str], list[str]]) -> dict:
    """UI-format workflow -> API prompt ``{id: {"class_type", "inputs"}}`` (links as ``[source_id, slot]``)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) != 0:
            continue
        inputs = {}
        names = widget_names(node["type"])
        values = node.get("widgets_values", [])
        if len(names) != len(values):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values for widgets {names}")
        for name, value in zip(names, values):
            if name not in EXTRA_WIDGETS:
                inputs[name] = value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
