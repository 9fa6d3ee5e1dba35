"""Fakes of the ComfyUI modules the GRN nodes use, so every node's ``execute()`` runs in the default test suite.

They mimic only what ``grn_nodes/comfy_nodes.py`` touches, with the names and behaviour of ComfyUI 0.3.64:

* ``comfy_api.latest`` — ``io`` (``ComfyNode``, ``Schema``, the input kinds, ``Custom``, ``Hidden``,
  ``NodeOutput(*values, ui=...)``) and ``ComfyExtension``: enough to read the schemas and carry results;
* ``folder_paths`` — ``models_dir``, ``folder_names_and_paths``, ``get_folder_paths``, ``get_filename_list``,
  ``get_full_path``, ``get_full_path_or_raise``, over a models folder the test fills;
* ``comfy.model_management`` — devices (all the CPU), ``soft_empty_cache`` and ``free_memory`` (recorded),
  ``interrupt_current_processing`` / ``throw_exception_if_processing_interrupted`` raising
  ``InterruptProcessingException``;
* ``comfy.utils.ProgressBar`` — ``update_absolute`` calls the global hook as ComfyUI's ``main.hijack_progress`` sets
  it: the interruption check first, then the progress message (recorded here);
* ``server.PromptServer.instance`` — ``send_sync`` (recorded) and ``client_id``;
* ``comfy_execution.utils.get_executing_context`` — the running node's ``ExecutionContext`` (``prompt_id``).

``fake_comfy(models_dir)`` puts them into ``sys.modules``, imports ``grn_nodes.comfy_nodes`` fresh against them and
restores whatever was there afterwards. ``FakeComfy.run(node_class, **inputs)`` runs a node as ComfyUI's executor
does: widget values the test leaves out take the schema's defaults (as a new node in the editor has them), and the
class is cloned with ``hidden`` set (``_ComfyNodeInternal.PREPARE_CLASS_CLONE``) before ``execute`` is called.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch

# folder_paths.supported_pt_extensions
SUPPORTED_PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
# The folders of ComfyUI's own table the nodes look into (folder_paths.folder_names_and_paths); "grn" is the pack's.
COMFY_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae")
_MISSING = object()


# ---- comfy_api.latest ---------------------------------------------------------------------------------------------

class NodeOutput:
    """``io.NodeOutput``: the output values (``args``, one per output socket) and the node's ``ui`` dict."""

    def __init__(self, *args: Any, ui: Any = None, expand: Any = None, block_execution: Any = None):
        self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    @property
    def result(self) -> Optional[tuple]:
        return self.args if len(self.args) > 0 else None


class HiddenHolder(types.SimpleNamespace):
    """``io.HiddenHolder``: what ``cls.hidden`` holds while a V3 node runs (only ``unique_id`` is used by GRN)."""

    def __init__(self, unique_id: Optional[str] = None, prompt: Any = None, extra_pnginfo: Any = None):
        super().__init__(unique_id=unique_id, prompt=prompt, extra_pnginfo=extra_pnginfo, dynprompt=None,
                         auth_token_comfy_org=None, api_key_comfy_org=None)


def fake_comfy_api() -> types.ModuleType:
    """``comfy_api.latest`` with just what ``grn_nodes/comfy_nodes.py`` touches.

    Inputs keep their id, ``optional`` and every keyword (``kwargs``; a Combo's positional options go to
    ``kwargs["options"]``), so the tests can read widget order, defaults and ranges from the real schemas.
    """

    class Input:
        def __init__(self, id, *args, optional=False, **kwargs):
            self.id, self.optional, self.kwargs = id, optional, kwargs
            if args:  # Combo.Input(id, options)
                self.kwargs["options"] = args[0]

    def kind(io_type):
        output = type("Output", (), {"io_type": io_type, "__init__": lambda self, id=None, **kw: None})
        return type(f"Kind_{io_type}", (), {"io_type": io_type, "Output": output,
                                             "Input": type("Input", (Input,), {"io_type": io_type})})

    io = types.SimpleNamespace(
        ComfyNode=type("ComfyNode", (), {"hidden": None}),
        Schema=lambda **kw: types.SimpleNamespace(**{"hidden": None, **kw}),
        NodeOutput=NodeOutput,
        Hidden=types.SimpleNamespace(unique_id="UNIQUE_ID", prompt="PROMPT", extra_pnginfo="EXTRA_PNGINFO"),
        HiddenHolder=HiddenHolder,
        Custom=kind,
        **{name: kind(t) for name, t in [("Combo", "COMBO"), ("Boolean", "BOOLEAN"), ("Int", "INT"),
                                         ("Float", "FLOAT"), ("String", "STRING"), ("Clip", "CLIP"),
                                         ("Image", "IMAGE")]},
    )
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    latest.ComfyExtension = type("ComfyExtension", (), {})
    return latest


# ---- the other modules, sharing one recorded state ------------------------------------------------------------------

class InterruptProcessingException(Exception):
    """``comfy.model_management.InterruptProcessingException``: what a press of Cancel raises in a running node."""


class ExecutionContext(NamedTuple):
    """``comfy_execution.utils.ExecutionContext``."""

    prompt_id: str
    node_id: str
    list_index: Optional[int] = None


class ProgressUpdate(NamedTuple):
    node_id: Optional[str]
    value: int
    total: int
    preview: Any


@dataclass
class FakeComfy:
    """The installed fakes and what the nodes did with them."""

    models_dir: Path
    nodes: Any = None  # grn_nodes.comfy_nodes, imported against the fakes
    modules: dict = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    client_id: str = "client-1"
    prompt_id: str = "prompt-1"
    progress: list[ProgressUpdate] = field(default_factory=list)
    events: list[tuple[str, dict, Optional[str]]] = field(default_factory=list)
    freed: list[tuple[float, Any]] = field(default_factory=list)
    cache_emptied: int = 0
    interrupted: bool = False
    context: Optional[ExecutionContext] = None
    on_send: Optional[Callable[[str, dict], None]] = None  # runs after an event is recorded (e.g. press Cancel)

    def reset(self) -> None:
        self.progress.clear()
        self.events.clear()
        self.freed.clear()
        self.cache_emptied = 0
        self.interrupted = False
        self.on_send = None

    def interrupt(self) -> None:
        """``comfy.model_management.interrupt_current_processing()``: what the Cancel button (``/interrupt``) does."""
        self.interrupted = True

    @property
    def mm(self) -> types.ModuleType:
        return self.modules["comfy.model_management"]

    def defaults(self, node_class: Any) -> dict:
        """The schema's widget defaults, as a node freshly added in the editor sends them."""
        return {i.id: i.kwargs["default"] for i in node_class.define_schema().inputs if "default" in i.kwargs}

    def run(self, node_class: Any, unique_id: str = "12", **inputs: Any) -> NodeOutput:
        """Run ``node_class.execute`` as ComfyUI's executor does (a class clone with ``hidden``, an executing
        context); inputs not given take the schema's defaults."""
        values = {**self.defaults(node_class), **inputs}
        clone = type(node_class.__name__, (node_class,), {"hidden": HiddenHolder(unique_id=unique_id)})
        self.context = ExecutionContext(self.prompt_id, unique_id)
        try:
            return clone.execute(**values)
        finally:
            self.context = None


def _folder_paths(state: FakeComfy) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(state.models_dir)
    fp.supported_pt_extensions = set(SUPPORTED_PT_EXTENSIONS)
    fp.folder_names_and_paths = {name: ([str(state.models_dir / name)], set(SUPPORTED_PT_EXTENSIONS))
                                 for name in COMFY_FOLDERS}

    def get_folder_paths(folder_name: str) -> list[str]:
        return fp.folder_names_and_paths[folder_name][0][:]  # KeyError for an unknown folder, as ComfyUI

    def get_filename_list(folder_name: str) -> list[str]:
        paths, extensions = fp.folder_names_and_paths[folder_name]
        found = set()
        for base in paths:
            for root, _, files in os.walk(base, followlinks=True):
                for name in files:
                    if not extensions or os.path.splitext(name)[-1].lower() in extensions:
                        found.add(os.path.relpath(os.path.join(root, name), base).replace(os.sep, "/"))
        return sorted(found)

    def get_full_path(folder_name: str, filename: str) -> Optional[str]:
        if folder_name not in fp.folder_names_and_paths:
            return None
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for base in fp.folder_names_and_paths[folder_name][0]:
            full = os.path.join(base, filename)
            if os.path.isfile(full):
                return full
        return None

    def get_full_path_or_raise(folder_name: str, filename: str) -> str:
        full = get_full_path(folder_name, filename)
        if full is None:
            raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
        return full

    fp.get_folder_paths, fp.get_filename_list = get_folder_paths, get_filename_list
    fp.get_full_path, fp.get_full_path_or_raise = get_full_path, get_full_path_or_raise
    return fp


def _model_management(state: FakeComfy) -> types.ModuleType:
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.get_torch_device = lambda: state.device
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.text_encoder_device = lambda: torch.device("cpu")

    def soft_empty_cache(force: bool = False) -> None:
        state.cache_emptied += 1

    def free_memory(memory_required: float, device: Any, keep_loaded: Any = ()) -> list:
        state.freed.append((memory_required, device))
        return []

    def interrupt_current_processing(value: bool = True) -> None:
        state.interrupted = value

    def throw_exception_if_processing_interrupted() -> None:
        if state.interrupted:
            state.interrupted = False  # ComfyUI clears the flag as it raises
            raise InterruptProcessingException()

    mm.soft_empty_cache, mm.free_memory = soft_empty_cache, free_memory
    mm.interrupt_current_processing = interrupt_current_processing
    mm.processing_interrupted = lambda: state.interrupted
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    return mm


def _utils(state: FakeComfy, mm: types.ModuleType) -> types.ModuleType:
    utils = types.ModuleType("comfy.utils")

    def hook(value: int, total: int, preview: Any, prompt_id: Any = None, node_id: Any = None) -> None:
        mm.throw_exception_if_processing_interrupted()  # main.hijack_progress's hook checks first
        state.progress.append(ProgressUpdate(node_id, value, total, preview))

    class ProgressBar:
        def __init__(self, total: int, node_id: Any = None):
            self.total, self.current, self.node_id, self.hook = total, 0, node_id, utils.PROGRESS_BAR_HOOK

        def update_absolute(self, value: int, total: Optional[int] = None, preview: Any = None) -> None:
            if total is not None:
                self.total = total
            if value > self.total:
                value = self.total
            self.current = value
            if self.hook is not None:
                self.hook(self.current, self.total, preview, node_id=self.node_id)

        def update(self, value: int) -> None:
            self.update_absolute(self.current + value)

    utils.PROGRESS_BAR_HOOK = hook
    utils.ProgressBar = ProgressBar
    return utils


def _server(state: FakeComfy) -> types.ModuleType:
    server = types.ModuleType("server")

    class PromptServer:
        instance: "PromptServer"

        def __init__(self) -> None:
            self.client_id = state.client_id

        def send_sync(self, event: str, data: dict, sid: Optional[str] = None) -> None:
            state.events.append((event, data, sid))
            if state.on_send is not None:
                state.on_send(event, data)

    PromptServer.instance = PromptServer()
    server.PromptServer = PromptServer
    return server


def _execution_utils(state: FakeComfy) -> types.ModuleType:
    module = types.ModuleType("comfy_execution.utils")
    module.ExecutionContext = ExecutionContext
    module.get_executing_context = lambda: state.context
    return module


def _package(name: str, **children: types.ModuleType) -> types.ModuleType:
    package = types.ModuleType(name)
    package.__path__ = []
    for key, child in children.items():
        setattr(package, key, child)
    return package


@contextlib.contextmanager
def fake_comfy(models_dir: Path, with_server: bool = True) -> Iterator[FakeComfy]:
    """Install the fakes over ``models_dir`` (``models_dir/grn``, ``models_dir/diffusion_models`` …), import
    ``grn_nodes.comfy_nodes`` against them, and restore ``sys.modules`` afterwards.

    ``with_server=False``: ``server`` and ``comfy_execution`` cannot be imported (an older ComfyUI, or a node run
    outside the server)."""
    state = FakeComfy(Path(models_dir))
    mm = _model_management(state)
    utils = _utils(state, mm)
    state.modules = {
        "comfy_api": _package("comfy_api"),
        "comfy_api.latest": fake_comfy_api(),
        "folder_paths": _folder_paths(state),
        "comfy": _package("comfy", model_management=mm, utils=utils),
        "comfy.model_management": mm,
        "comfy.utils": utils,
    }
    state.modules["comfy_api"].latest = state.modules["comfy_api.latest"]
    if with_server:
        execution_utils = _execution_utils(state)
        state.modules.update({"server": _server(state), "comfy_execution": _package("comfy_execution",
                                                                                  utils=execution_utils),
                              "comfy_execution.utils": execution_utils})
    else:  # None in sys.modules makes the import fail with ImportError
        state.modules.update({"server": None, "comfy_execution": None, "comfy_execution.utils": None})
    keys = list(state.modules) + ["grn_nodes.comfy_nodes"]
    saved = {key: sys.modules.get(key, _MISSING) for key in keys}
    import grn_nodes

    saved_attribute = getattr(grn_nodes, "comfy_nodes", _MISSING)
    try:
        sys.modules.update(state.modules)
        sys.modules.pop("grn_nodes.comfy_nodes", None)
        state.nodes = importlib.import_module("grn_nodes.comfy_nodes")
        yield state
    finally:
        for key, value in saved.items():
            if value is _MISSING:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
        if saved_attribute is _MISSING:
            if hasattr(grn_nodes, "comfy_nodes"):
                delattr(grn_nodes, "comfy_nodes")
        else:
            grn_nodes.comfy_nodes = saved_attribute


def to_uint8_like_save_image(image: torch.Tensor) -> Any:
    """IMAGE ``[B, H, W, 3]`` → uint8 as ComfyUI's ``SaveImage.save_images`` makes each frame's bytes."""
    import numpy as np

    return np.clip(255. * image.cpu().numpy(), 0, 255).astype(np.uint8)
