"""The node schemas and the shipped workflows agree, read without ComfyUI.

A minimal stand-in for ``comfy_api.latest`` (``tests/_fake_comfy.py``: only what ``grn_nodes/comfy_nodes.py``
touches) is put into ``sys.modules`` for the import, so the real schema definitions are read and their widget order
compared with every workflow's ``widgets_values``. The pack's ``__init__`` must stay harmless without ComfyUI.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests._fake_comfy import fake_comfy_api as _fake_comfy_api
from tests._workflows import CORE_WIDGETS, FRONTEND_ONLY, WORKFLOWS, load, to_api_prompt

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW_FILES = ["grn_tiny_t2v.json", "grn_t2i_2b.json", "grn_t2v_2b.json", "grn_i2v_8b.json", "grn_c2i.json",
                  "grn_tiny_inpaint.json", "grn_tiny_extend.json", "grn_t2i_2b_img2img.json",
                  "grn_t2v_2b_extend.json"]
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@pytest.fixture(scope="module")
def comfy_nodes():
    saved = {k: sys.modules.get(k) for k in ("comfy_api", "comfy_api.latest", "grn_nodes.comfy_nodes")}
    sys.modules["comfy_api"] = types.ModuleType("comfy_api")
    sys.modules["comfy_api.latest"] = _fake_comfy_api()
    sys.modules.pop("grn_nodes.comfy_nodes", None)
    try:
        yield importlib.import_module("grn_nodes.comfy_nodes")
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


@pytest.fixture(scope="module")
def schemas(comfy_nodes) -> dict:
    return {cls.define_schema().node_id: cls.define_schema() for cls in comfy_nodes.NODES}


def widget_names(schema) -> list[str]:
    inputs = [i for i in schema.inputs if not i.optional] + [i for i in schema.inputs if i.optional]
    names = []
    for item in inputs:
        if item.io_type in WIDGET_KINDS:
            names.append(item.id)
            if item.kwargs.get("control_after_generate"):
                names.append("control_after_generate")
    return names


def test_six_nodes_with_grn_ids_and_types(schemas):
    assert set(schemas) == {"GRNLoadModel", "GRNEncodePrompt", "GRNRefineSampler", "GRNDecodeVideo",
                            "GRNEncodeImage", "GRNRefineStats"}
    names = {s.display_name for s in schemas.values()}
    assert names == {"Load GRN", "Encode Prompt", "Refine Sampler", "Decode Video", "Encode Image", "Refine Stats"}
    custom = {i.io_type for s in schemas.values() for i in s.inputs if i.io_type not in WIDGET_KINDS}
    assert custom - {"CLIP", "IMAGE", "MASK"} == {"GRN_MODEL", "GRN_CONDITIONING", "GRN_TOKENS"}
    sampler = schemas["GRNRefineSampler"].inputs  # editing inputs are appended last: saved widget orders hold
    assert [i.id for i in sampler[-4:]] == ["source_tokens", "mask", "strength", "extend_from"]
    assert all(i.optional for i in sampler[-4:])


def test_loader_offers_tiny_and_released_files_without_comfyui(schemas):
    refiner = next(i for i in schemas["GRNLoadModel"].inputs if i.id == "refiner")
    assert refiner.kwargs["options"][0] == "tiny" and "GRN_T2V_2B_FSA_sft147400_ema.pth" in refiner.kwargs["options"]


def test_loader_offload_defaults_to_auto_and_keeps_older_saved_values(schemas):
    offload = next(i for i in schemas["GRNLoadModel"].inputs if i.id == "offload")
    options = offload.kwargs["options"]
    assert offload.kwargs["default"] == "auto" and options[0] == "auto"
    assert {"none", "model", "blocks"} <= set(options) and any(o.startswith("blocks:") for o in options)
    # Workflows saved before the library owned offloading still validate (ComfyUI rejects values not in a combo).
    assert {"offload after run", "keep on device"} <= set(options)
    position = widget_names(schemas["GRNLoadModel"]).index("offload")
    for name in WORKFLOW_FILES:
        loader = next(n for n in load(name)["nodes"] if n["type"] == "GRNLoadModel")
        assert loader["widgets_values"][position] in options


@pytest.mark.parametrize("name", WORKFLOW_FILES)
def test_workflow_is_ui_format_with_known_nodes(name, schemas):
    wf = load(name)
    assert wf["version"] == 0.4
    types_ = {n["type"] for n in wf["nodes"]}
    assert types_ <= set(schemas) | set(CORE_WIDGETS) | FRONTEND_ONLY, types_
    notes = [n for n in wf["nodes"] if n["type"] in FRONTEND_ONLY]
    assert notes and all("models/grn" in n["widgets_values"][0] or "tiny" in n["widgets_values"][0] for n in notes)
    ids = {n["id"] for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert src in ids and dst in ids
        target = next(n for n in wf["nodes"] if n["id"] == dst)
        source = next(n for n in wf["nodes"] if n["id"] == src)
        assert target["inputs"][dst_slot]["link"] == link_id and target["inputs"][dst_slot]["type"] == kind
        assert link_id in source["outputs"][src_slot]["links"] and source["outputs"][src_slot]["type"] == kind


@pytest.mark.parametrize("name", WORKFLOW_FILES)
def test_widget_values_match_the_schemas(name, schemas):
    wf = load(name)
    for node in wf["nodes"]:
        if node["type"] in schemas:
            schema = schemas[node["type"]]
            names = widget_names(schema)
            assert len(node["widgets_values"]) == len(names), (node["type"], names, node["widgets_values"])
            for item, value in zip([i for i in names], node["widgets_values"]):
                spec = next((i for i in schema.inputs if i.id == item), None)
                if spec is not None and spec.io_type == "COMBO":
                    assert value in spec.kwargs["options"], (node["type"], item, value)
                if spec is not None and spec.io_type in ("INT", "FLOAT"):
                    lo, hi = spec.kwargs.get("min"), spec.kwargs.get("max")
                    assert (lo is None or value >= lo) and (hi is None or value <= hi), (node["type"], item, value)
            for slot in node["inputs"]:
                assert any(i.id == slot["name"] for i in schema.inputs), (node["type"], slot["name"])
        elif node["type"] in CORE_WIDGETS:
            assert len(node["widgets_values"]) == len(CORE_WIDGETS[node["type"]]), node["type"]


def test_tiny_workflow_converts_to_an_api_prompt(schemas):
    def names(kind):
        return widget_names(schemas[kind]) if kind in schemas else CORE_WIDGETS[kind]

    prompt = to_api_prompt(load("grn_tiny_t2v.json"), names)
    classes = sorted(v["class_type"] for v in prompt.values())
    assert "Note" not in classes and "GRNRefineSampler" in classes and "SaveVideo" in classes
    sampler = next(v for v in prompt.values() if v["class_type"] == "GRNRefineSampler")
    assert "control_after_generate" not in sampler["inputs"]
    assert sampler["inputs"]["model"][1] == 0 and isinstance(sampler["inputs"]["model"][0], str)
    video = next(v for v in prompt.values() if v["class_type"] == "CreateVideo")
    assert isinstance(video["inputs"]["fps"], list)  # the fps comes from Decode Video
    json.dumps(prompt)


def test_workflows_are_up_to_date_with_the_generator(tmp_path):
    spec = importlib.util.spec_from_file_location("make_workflows", ROOT / "tools" / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, graph in module.workflows().items():
        assert json.loads((WORKFLOWS / name).read_text()) == json.loads(json.dumps(graph.to_json())), name


def test_pack_init_is_harmless_without_comfyui():
    """Run in a fresh interpreter: the stub above must not leak into this check."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('grn_pack_probe', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(m.WEB_DIRECTORY, hasattr(m, 'comfy_entrypoint'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "__init__.py")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["./web", "False", "False"]  # no nodes registered, and not even torch imported
    assert (ROOT / "web" / "grn_refine_widget.js").is_file()
