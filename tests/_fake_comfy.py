"""Fakes of the ComfyUI modules the GRN nodes use, so every node's ``execute()`` runs in the default test suite.

They mimic only what ``grn_nodes/comfy_nodes.py`` touches, with the names and behaviour of ComfyUI 0.3.64:

* ``comfy_api.latest`` — ``io`` (``ComfyNode``, ``Schema``, the input kinds, ``Custom``, ``Hidden``,
  ``NodeOutput(*values, ui=...)``) and ``ComfyExtension``: enough to read the schemas and carry results;
* ``folder_paths`` — ``models_dir``, ``folder_names_and_paths``, ``get_folder_paths``, ``get_filename_list``,
  ``get_full_path``, ``get_full_path_or_raise``, over a models folder the test fills;
* ``comfy.model_management`` — devices (all the CPU), ``soft_empty_cache`` (counted),
  ``interrupt_current_processing`` / ``throw_exception_if_processing_interrupted`` raising
  ``InterruptProcessingException``, and the memory manager: ``LoadedModel``, ``current_loaded_models``,
  ``load_models_gpu`` (calls recorded), ``free_memory`` (calls recorded), ``unload_all_models``, ``loaded_models``,
  ``get_free_memory``, ``module_size``, ``minimum_inference_memory``, ``extra_reserved_memory`` — trimmed copies of
  ComfyUI's code (no weight patches, hooks or other devices). ``FakeComfy.vram`` (bytes; None: unlimited) gives the
  device a budget so that eviction can be tested without a GPU: ComfyUI budgets only non-CPU devices, the fake
  budgets the one device it has whenever ``vram`` is set; ``FakeComfy.vram_state`` ``"NORMAL_VRAM"`` / ``"LOW_VRAM"``
  / ``"NO_VRAM"`` then selects ComfyUI's partial-load budget as ``load_models_gpu`` computes it;
* ``comfy.model_patcher.ModelPatcher`` — ``__init__`` (the attributes it sets on the model), ``model_size``,
  ``loaded_size``, ``load`` (partial unless ``full_load``: only layers with ``comfy_cast_weights`` may stay behind, any
  other layer is moved only while it fits), ``patch_model``, ``unpatch_model``, ``partially_load``,
  ``partially_unload``, ``detach``, ``is_clone``, ``clone``, ``__del__``: ComfyUI's logic without weight patches;
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
import uuid
import weakref
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
                                         ("Image", "IMAGE"), ("Mask", "MASK")]},
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


class LoadCall(NamedTuple):
    """One ``load_models_gpu`` call."""

    models: list
    memory_required: float
    force_full_load: bool


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
    loads: list["LoadCall"] = field(default_factory=list)  # load_models_gpu calls
    vram: Optional[int] = None  # the device's memory for the manager's accounting; None: unlimited
    vram_state: str = "NORMAL_VRAM"

    def reset(self) -> None:
        """Forget what was recorded (the loaded models stay loaded, as in a running ComfyUI)."""
        self.progress.clear()
        self.events.clear()
        self.freed.clear()
        self.loads.clear()
        self.cache_emptied = 0
        self.interrupted = False
        self.on_send = None
        self.vram = None
        self.vram_state = "NORMAL_VRAM"

    def interrupt(self) -> None:
        """``comfy.model_management.interrupt_current_processing()``: what the Cancel button (``/interrupt``) does."""
        self.interrupted = True

    @property
    def mm(self) -> types.ModuleType:
        return self.modules["comfy.model_management"]

    @property
    def loaded(self) -> list:
        """The patchers in ``current_loaded_models``, most recently loaded first."""
        return [m.model for m in self.mm.current_loaded_models]

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


# ---- comfy.model_patcher.ModelPatcher ------------------------------------------------------------------------------

def _model_patcher(mm: types.ModuleType) -> types.ModuleType:
    """``comfy.model_patcher`` with ``ModelPatcher`` as ComfyUI 0.3.64 has it, less weight patches, hooks, injections,
    callbacks and wrappers (none of which GRN uses)."""
    module = types.ModuleType("comfy.model_patcher")

    def wipe_lowvram_weight(m):  # model_patcher.wipe_lowvram_weight
        if hasattr(m, "prev_comfy_cast_weights"):
            m.comfy_cast_weights = m.prev_comfy_cast_weights
            del m.prev_comfy_cast_weights

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.size = size
            self.model = model
            if not hasattr(self.model, "device") or self.model.device is None:
                self.model.device = offload_device
            self.patches, self.backup, self.object_patches = {}, {}, {}
            self.model_options = {"transformer_options": {}}
            self.model_size()
            self.load_device = load_device
            self.offload_device = offload_device
            self.weight_inplace_update = weight_inplace_update
            self.force_cast_weights = False
            self.patches_uuid = uuid.uuid4()
            self.parent = None
            for name, value in (("model_loaded_weight_memory", 0), ("lowvram_patch_counter", 0),
                                ("model_lowvram", False), ("current_weight_patches_uuid", None)):
                if not hasattr(self.model, name):
                    setattr(self.model, name, value)

        def model_size(self):
            if self.size > 0:
                return self.size
            self.size = mm.module_size(self.model)
            return self.size

        def loaded_size(self):
            return self.model.model_loaded_weight_memory

        def lowvram_patch_counter(self):
            return self.model.lowvram_patch_counter

        def clone(self):
            n = self.__class__(self.model, self.load_device, self.offload_device, self.size,
                               weight_inplace_update=self.weight_inplace_update)
            n.patches_uuid, n.parent = self.patches_uuid, self
            return n

        def is_clone(self, other):
            return hasattr(other, "model") and self.model is other.model

        def model_patches_to(self, device):
            pass

        def model_patches_models(self):
            return []

        def model_dtype(self):
            if hasattr(self.model, "get_dtype"):
                return self.model.get_dtype()

        def current_loaded_device(self):
            return self.model.device

        def _load_list(self):
            loading = []
            for n, m in self.model.named_modules():
                params = [name for name, _ in m.named_parameters(recurse=False)]
                skip = any(name not in params for name, _ in m.named_parameters(recurse=True))
                if not skip and (hasattr(m, "comfy_cast_weights") or len(params) > 0):
                    loading.append((mm.module_size(m), n, m, params))
            return loading

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            mem_counter, lowvram_counter, load_completely = 0, 0, []
            loading = self._load_list()
            loading.sort(key=lambda x: (x[0], x[1]), reverse=True)
            for module_mem, n, m, params in loading:
                lowvram_weight = False
                if not full_load and hasattr(m, "comfy_cast_weights"):
                    if mem_counter + module_mem >= lowvram_model_memory:
                        lowvram_weight = True
                        lowvram_counter += 1
                        if hasattr(m, "prev_comfy_cast_weights"):
                            continue
                if lowvram_weight:  # stays where it is; comfy.ops casts it to the device in forward
                    m.prev_comfy_cast_weights = m.comfy_cast_weights
                    m.comfy_cast_weights = True
                else:
                    if hasattr(m, "comfy_cast_weights"):
                        wipe_lowvram_weight(m)
                    if full_load or mem_counter + module_mem < lowvram_model_memory:
                        mem_counter += module_mem
                        load_completely.append(m)
            for m in load_completely:
                m.comfy_patched_weights = True
                m.to(device_to)
            if lowvram_counter > 0:
                self.model.model_lowvram = True
            else:
                self.model.model_lowvram = False
                if full_load:
                    self.model.to(device_to)
                    mem_counter = self.model_size()
            self.model.device = device_to
            self.model.model_loaded_weight_memory = mem_counter
            self.model.current_weight_patches_uuid = self.patches_uuid

        def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
            if load_weights:
                self.load(device_to, lowvram_model_memory=lowvram_model_memory,
                          force_patch_weights=force_patch_weights, full_load=lowvram_model_memory == 0)
            return self.model

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                if self.model.model_lowvram:
                    for m in self.model.modules():
                        wipe_lowvram_weight(m)
                    self.model.model_lowvram = False
                    self.model.lowvram_patch_counter = 0
                self.model.current_weight_patches_uuid = None
                if device_to is not None:
                    self.model.to(device_to)
                    self.model.device = device_to
                self.model.model_loaded_weight_memory = 0
                for m in self.model.modules():
                    if hasattr(m, "comfy_patched_weights"):
                        del m.comfy_patched_weights

        def partially_unload(self, device_to, memory_to_free=0):
            memory_freed = 0
            unload_list = self._load_list()
            unload_list.sort(key=lambda x: (x[0], x[1]))
            for module_mem, n, m, params in unload_list:
                if memory_to_free < memory_freed:
                    break
                if getattr(m, "comfy_patched_weights", False) is True:
                    m.to(device_to)
                    if hasattr(m, "comfy_cast_weights"):
                        m.prev_comfy_cast_weights = m.comfy_cast_weights
                        m.comfy_cast_weights = True
                    m.comfy_patched_weights = False
                    memory_freed += module_mem
            self.model.model_lowvram = True
            self.model.model_loaded_weight_memory -= memory_freed
            return memory_freed

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            unpatch_weights = self.model.current_weight_patches_uuid is not None and (
                self.model.current_weight_patches_uuid != self.patches_uuid or force_patch_weights)
            used = self.model.model_loaded_weight_memory
            self.unpatch_model(self.offload_device, unpatch_weights=unpatch_weights)
            if unpatch_weights:
                extra_memory += used - self.model.model_loaded_weight_memory
            self.patch_model(load_weights=False)
            if self.model.model_lowvram is False and self.model.model_loaded_weight_memory > 0:
                return 0
            full_load = self.model.model_loaded_weight_memory + extra_memory > self.model_size()
            current_used = self.model.model_loaded_weight_memory
            try:
                self.load(device_to, lowvram_model_memory=current_used + extra_memory,
                          force_patch_weights=force_patch_weights, full_load=full_load)
            except Exception:
                self.detach()
                raise
            return self.model.model_loaded_weight_memory - current_used

        def detach(self, unpatch_all=True):
            self.model_patches_to(self.offload_device)
            if unpatch_all:
                self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
            return self.model

        def __del__(self):
            self.detach(unpatch_all=False)

    module.ModelPatcher = ModelPatcher
    return module


# ---- comfy.model_management -----------------------------------------------------------------------------------------

GiB, MiB = 1024 ** 3, 1024 ** 2
EXTRA_RESERVED_VRAM = 400 * MiB  # model_management.EXTRA_RESERVED_VRAM (not Windows)
MIN_WEIGHT_MEMORY_RATIO = 0.4


def _memory_manager(state: FakeComfy, mm: types.ModuleType) -> None:
    """``LoadedModel``, ``free_memory``, ``load_models_gpu`` … of ComfyUI 0.3.64's ``comfy/model_management.py``."""
    current_loaded_models: list = []
    mm.current_loaded_models = current_loaded_models

    def module_size(module):
        return sum(t.nelement() * t.element_size() for t in module.state_dict().values())

    def budgeted(device) -> bool:  # ComfyUI: device != cpu; the fake: whenever the test gives the device a budget
        return state.vram is not None and torch.device(device) == torch.device(state.device)

    def get_free_memory(dev=None, torch_free_too=False):
        dev = state.device if dev is None else dev
        if budgeted(dev):
            free = state.vram - sum(m.model_loaded_memory() for m in current_loaded_models
                                    if m.model is not None and m.device == dev)
        else:
            free = 1 << 50
        return (free, 0) if torch_free_too else free

    def extra_reserved_memory():
        return EXTRA_RESERVED_VRAM

    def minimum_inference_memory():
        return GiB * 0.8 + extra_reserved_memory()

    class LoadedModel:
        def __init__(self, model):
            self._model = weakref.ref(model)
            self.device = model.load_device
            self.real_model = None
            self.currently_used = True
            self.model_finalizer = None

        @property
        def model(self):
            return self._model()

        def model_memory(self):
            return self.model.model_size()

        def model_loaded_memory(self):
            return self.model.loaded_size()

        def model_offloaded_memory(self):
            return self.model.model_size() - self.model.loaded_size()

        def model_memory_required(self, device):
            if device == self.model.current_loaded_device():
                return self.model_offloaded_memory()
            return self.model_memory()

        def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
            use_more_vram = lowvram_model_memory if lowvram_model_memory != 0 else 1e32
            self.model.partially_load(self.device, use_more_vram, force_patch_weights=force_patch_weights)
            real_model = self.model.model
            self.real_model = weakref.ref(real_model)
            self.model_finalizer = weakref.finalize(real_model, cleanup_models)
            return real_model

        def model_unload(self, memory_to_free=None, unpatch_weights=True):
            if memory_to_free is not None and memory_to_free < self.model.loaded_size():
                freed = self.model.partially_unload(self.model.offload_device, memory_to_free)
                if freed >= memory_to_free:
                    return False
            self.model.detach(unpatch_weights)
            self.model_finalizer.detach()
            self.model_finalizer = None
            self.real_model = None
            return True

        def __eq__(self, other):
            return self.model is other.model

        def is_dead(self):
            return self.real_model() is not None and self.model is None

    def cleanup_models():
        for i in [i for i, m in enumerate(current_loaded_models) if m.real_model() is None][::-1]:
            current_loaded_models.pop(i)

    def free_memory(memory_required, device, keep_loaded=()):
        state.freed.append((memory_required, device))
        can_unload, unloaded_model, unloaded_models = [], [], []
        for i in range(len(current_loaded_models) - 1, -1, -1):
            shift_model = current_loaded_models[i]
            if shift_model.device == device and shift_model not in keep_loaded and not shift_model.is_dead():
                can_unload.append((-shift_model.model_offloaded_memory(), sys.getrefcount(shift_model.model),
                                   shift_model.model_memory(), i))
                shift_model.currently_used = False
        for x in sorted(can_unload):
            i = x[-1]
            free_mem = get_free_memory(device)
            if free_mem > memory_required:
                break
            if current_loaded_models[i].model_unload(memory_required - free_mem):
                unloaded_model.append(i)
        for i in sorted(unloaded_model, reverse=True):
            unloaded_models.append(current_loaded_models.pop(i))
        if unloaded_model:
            soft_empty_cache()
        return unloaded_models

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        state.loads.append(LoadCall(list(models), memory_required, force_full_load))
        inference_memory = minimum_inference_memory()
        extra_mem = max(inference_memory, memory_required + extra_reserved_memory())
        if minimum_memory_required is None:
            minimum_memory_required = extra_mem
        else:
            minimum_memory_required = max(inference_memory, minimum_memory_required + extra_reserved_memory())
        models_to_load = []
        for x in dict.fromkeys(models):
            loaded_model = LoadedModel(x)
            try:
                index = current_loaded_models.index(loaded_model)
            except ValueError:
                index = None
            if index is not None:
                loaded = current_loaded_models[index]
                loaded.currently_used = True
                models_to_load.append(loaded)
            else:
                models_to_load.append(loaded_model)
        for loaded_model in models_to_load:
            to_unload = [i for i in range(len(current_loaded_models))
                         if loaded_model.model.is_clone(current_loaded_models[i].model)][::-1]
            for i in to_unload:
                model_to_unload = current_loaded_models.pop(i)
                model_to_unload.model.detach(unpatch_all=False)
                model_to_unload.model_finalizer.detach()
        total_memory_required: dict = {}
        for loaded_model in models_to_load:
            total_memory_required[loaded_model.device] = total_memory_required.get(loaded_model.device, 0) + \
                loaded_model.model_memory_required(loaded_model.device)
        for device in total_memory_required:
            if budgeted(device):
                free_memory(total_memory_required[device] * 1.1 + extra_mem, device)
        for device in total_memory_required:
            if budgeted(device) and get_free_memory(device) < minimum_memory_required:
                free_memory(minimum_memory_required, device)
        for loaded_model in models_to_load:
            lowvram_model_memory = 0
            if budgeted(loaded_model.model.load_device):
                if state.vram_state in ("LOW_VRAM", "NORMAL_VRAM") and not force_full_load:
                    loaded_memory = loaded_model.model_loaded_memory()
                    current_free_mem = get_free_memory(loaded_model.model.load_device) + loaded_memory
                    lowvram_model_memory = max(128 * MiB, current_free_mem - minimum_memory_required,
                                               min(current_free_mem * MIN_WEIGHT_MEMORY_RATIO,
                                                   current_free_mem - minimum_inference_memory()))
                    lowvram_model_memory = max(0.1, lowvram_model_memory - loaded_memory)
                if state.vram_state == "NO_VRAM":
                    lowvram_model_memory = 0.1
            loaded_model.model_load(lowvram_model_memory, force_patch_weights=force_patch_weights)
            current_loaded_models.insert(0, loaded_model)

    def loaded_models(only_currently_used=False):
        return [m.model for m in current_loaded_models if m.currently_used or not only_currently_used]

    def unload_all_models():
        free_memory(1e30, mm.get_torch_device())

    def soft_empty_cache(force: bool = False) -> None:
        state.cache_emptied += 1

    mm.LoadedModel, mm.module_size, mm.get_free_memory = LoadedModel, module_size, get_free_memory
    mm.extra_reserved_memory, mm.minimum_inference_memory = extra_reserved_memory, minimum_inference_memory
    mm.free_memory, mm.load_models_gpu, mm.load_model_gpu = free_memory, load_models_gpu, \
        lambda model: load_models_gpu([model])
    mm.loaded_models, mm.unload_all_models, mm.cleanup_models = loaded_models, unload_all_models, cleanup_models
    mm.soft_empty_cache = soft_empty_cache


def _model_management(state: FakeComfy) -> types.ModuleType:
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.get_torch_device = lambda: state.device
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.text_encoder_device = lambda: torch.device("cpu")
    _memory_manager(state, mm)

    def interrupt_current_processing(value: bool = True) -> None:
        state.interrupted = value

    def throw_exception_if_processing_interrupted() -> None:
        if state.interrupted:
            state.interrupted = False  # ComfyUI clears the flag as it raises
            raise InterruptProcessingException()

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
    patcher = _model_patcher(mm)
    state.modules = {
        "comfy_api": _package("comfy_api"),
        "comfy_api.latest": fake_comfy_api(),
        "folder_paths": _folder_paths(state),
        "comfy": _package("comfy", model_management=mm, utils=utils, model_patcher=patcher),
        "comfy.model_management": mm,
        "comfy.model_patcher": patcher,
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
