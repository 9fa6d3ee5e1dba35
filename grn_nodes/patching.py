"""GRN's refiner and tokenizer as models of ComfyUI's memory manager (``comfy.model_management``).

Inside ComfyUI, Load GRN loads the weights on the CPU, cast for ComfyUI's device, and the library never places them
(``model.compute_device`` is None). Each of the two models gets a ``comfy.model_patcher.ModelPatcher`` (the small
subclass :func:`patcher_class` makes), created on first use and kept on the ``LoadedGRN``; its ``model`` is the very
``nn.Module`` the ``GRNModel`` runs, with its true size (:func:`grn_core.runtime.offload.module_bytes`), ComfyUI's
torch device as load device and ``unet_offload_device()`` as offload device. Before a stage the node calls
:func:`stage`, which calls ``load_models_gpu([patcher], memory_required=<the stage's activations>,
force_full_load=True)``: ComfyUI unloads other models until ours plus the activations fit (it adds its own reserve),
moves ours with ``nn.Module.to`` (each layer, then the whole model, whose ``_apply`` drops device caches) — the
modules stay the same objects, so the ``GRNModel`` runs on whatever device ComfyUI left them — keeps them resident
between runs when there is room (the next ``load_models_gpu`` finds the same patcher and moves nothing), evicts them
when another model needs the memory, and "Unload models" / ``POST /free {"unload_models": true}`` move them back to
the offload device. ``memory_required``: for the sampler :func:`grn_core.pipeline.refiner_stage_bytes` minus the
refiner's weights (one step's activations; an I2V first-frame image also brings the tokenizer), for the decoder
:func:`grn_core.tokenizer.tiled.estimate_decode_memory` of one latent frame of one sample (the decode runs sample by
sample, frame by frame), for Encode Image the clip's pixels plus that per-frame estimate (no encode estimate yet).

Partial (lowvram) loading is not supported yet. ComfyUI's partial load (``ModelPatcher.load`` with a
``lowvram_model_memory`` budget) leaves the layers that do not fit on the CPU and relies on ``comfy.ops`` layers
(``comfy_cast_weights``) to bring each weight to the device inside ``forward``; GRN's layers (``nn.Linear``,
``Fp8Linear``, attention and convolutions that read their weights directly) have no such path, so a partly loaded GRN
model would fail with a device mismatch. The patcher is therefore all or nothing: it always loads fully (also under
``--lowvram`` / ``--novram``), and when ComfyUI asks for part of its memory back (``partially_unload``) it gives none,
so ComfyUI unloads it whole. The Load GRN ``offload`` widget (the library's own policy, for the command line) does not
apply inside ComfyUI; a value other than ``auto`` is logged as such.

Each load and unload is logged at INFO ("GRN: refiner (tiny) loaded by ComfyUI's memory manager (4 MB on cuda:0)",
"... unloaded by ComfyUI's memory manager (4 MB back to cpu)", "... released" for a patcher dropped while loaded,
with its Load GRN output), which is also how the real-ComfyUI tests observe the manager from outside.

Load GRN's ``devices`` (``grn_nodes.pool``): the pool of worker processes gets a patcher of its own
(:func:`pool_patcher`): its ``model`` is a weightless stand-in (``GRNDevicePool``), its size the weights the workers
hold on ComfyUI's device (when it is one of the pool's, else one byte). ComfyUI loading it starts the workers (Load GRN
loads it, and the sampler again before each run: the workers start again after an unload); unloading it ("Unload
models" / ``POST /free``, or eviction when ComfyUI needs memory on its device) stops and joins them. It logs "GRN:
device pool (...) loaded by / unloaded by ComfyUI's memory manager" like the two models.

No ComfyUI module is imported at import time: ``comfy.*`` is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Iterator, Sequence

import torch

from grn_core.runtime.memory import format_bytes
from grn_core.runtime.offload import module_bytes

from .loading import LoadedGRN

log = logging.getLogger(__name__)

MODELS = ("refiner", "tokenizer")
POOL = "pool"  # the key of the device pool's patcher in LoadedGRN.patchers
_CLASSES: dict[type, type] = {}  # ComfyUI's ModelPatcher class -> our subclass (tests swap ComfyUI for fakes)
_POOL_CLASSES: dict[type, type] = {}


def patcher_class() -> type:
    """``comfy.model_patcher.ModelPatcher`` made all-or-nothing and talkative (see the module docstring)."""
    from comfy.model_patcher import ModelPatcher

    cls = _CLASSES.get(ModelPatcher)
    if cls is not None:
        return cls

    class GRNModelPatcher(ModelPatcher):
        """A GRN refiner or tokenizer under ComfyUI's memory manager: loads fully or not at all."""

        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False,
                     label: str = "model"):
            super().__init__(model, load_device, offload_device, size=size,
                             weight_inplace_update=weight_inplace_update)
            self.grn_label = label

        def clone(self):
            n = super().clone()
            n.grn_label = self.grn_label
            return n

        # The overrides pass on any argument a later ComfyUI adds.
        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False,
                 **kwargs):
            # Always the whole model: our layers cannot be cast on the fly (comfy.ops), see the module docstring.
            before = self.loaded_size()
            if not full_load:
                log.debug("GRN: %s: ComfyUI offered %s for a partial (lowvram) load; GRN models load whole",
                          self.grn_label, format_bytes(lowvram_model_memory))
            super().load(device_to, lowvram_model_memory=lowvram_model_memory,
                         force_patch_weights=force_patch_weights, full_load=True, **kwargs)
            if device_to is not None and before < self.model_size():
                log.info("GRN: %s loaded by ComfyUI's memory manager (%s on %s)", self.grn_label,
                         format_bytes(self.model_size()), device_to)

        def partially_unload(self, device_to, memory_to_free=0, *args, **kwargs):
            # Free nothing part-way: LoadedModel.model_unload then unloads the whole model (detach).
            return 0

        def detach(self, unpatch_all=True):
            # unpatch_all=False is no unload: load_models_gpu also detaches that way a model it is about to
            # re-insert at the front of current_loaded_models (is_clone is true for the model itself).
            before = self.loaded_size()
            out = super().detach(unpatch_all)
            if unpatch_all and before > 0:
                log.info("GRN: %s unloaded by ComfyUI's memory manager (%s back to %s)", self.grn_label,
                         format_bytes(before), self.offload_device)
            return out

        def __del__(self):
            # Still loaded while its Load GRN output is dropped: the weights go with it, ComfyUI forgets it. Not at
            # interpreter exit or once logging is shut down (its streams may be closed by then).
            try:
                if not sys.is_finalizing() and logging.getLogger().handlers is not None and self.loaded_size() > 0:
                    logging.raiseExceptions, saved = False, logging.raiseExceptions  # never print "Logging error"
                    try:
                        log.info("GRN: %s released (no node uses it any more)", self.grn_label)
                    finally:
                        logging.raiseExceptions = saved
            except Exception:  # noqa: BLE001 - a half-made patcher
                pass
            super().__del__()

    _CLASSES[ModelPatcher] = GRNModelPatcher
    return GRNModelPatcher


def patcher(loaded: LoadedGRN, which: str, mm: Any) -> Any:
    """The patcher of ``loaded.model.refiner`` or ``.tokenizer`` (``which``), made on first use and then reused, so
    ComfyUI's ``current_loaded_models`` holds at most one entry per model whatever runs or is interrupted."""
    if which not in MODELS:
        raise ValueError(f"which={which!r}: one of {MODELS}")
    module = getattr(loaded.model, which)
    found = loaded.patchers.get(which)
    if found is not None and found.model is module:
        return found
    name = loaded.refiner_name if which == "refiner" else loaded.tokenizer_name
    made = patcher_class()(module, mm.get_torch_device(), mm.unet_offload_device(), size=module_bytes(module),
                           label=f"{which} ({name})")
    loaded.patchers[which] = made
    return made


def load(loaded: LoadedGRN, which: Sequence[str], memory_required: int, mm: Any) -> list:
    """``load_models_gpu`` for the given models with ``memory_required`` bytes for the stage's activations; whole
    models only (``force_full_load``). Returns the patchers."""
    patchers = [patcher(loaded, w, mm) for w in which]
    mm.load_models_gpu(patchers, memory_required=int(max(0, memory_required)), force_full_load=True)
    return patchers


@contextlib.contextmanager
def stage(loaded: LoadedGRN, which: Sequence[str], memory_required: int, mm: Any) -> Iterator[Any]:
    """Around a node's stage: the models in ``which`` on ComfyUI's device, ``soft_empty_cache`` afterwards.

    Models the caller places (``compute_device`` None: every model Load GRN makes in ComfyUI) go through ComfyUI's
    memory manager (:func:`load`). A model the library places itself (``load_grn(device=...)``, the command line's
    way) moves per its offload policy inside the stage; ComfyUI is then only asked to make room for it.
    """
    model = loaded.model
    try:
        if model.compute_device is None:
            load(loaded, which, memory_required, mm)
        else:
            brought = sum(module_bytes(getattr(model, w)) for w in which) if model.offload.moves_models else 0
            mm.free_memory(int(max(0, memory_required)) + brought, model.compute_device)
        yield model
    finally:
        mm.soft_empty_cache()


# ---- the device pool (Load GRN devices) ------------------------------------------------------------------------------

class GRNDevicePool(torch.nn.Module):
    """The device pool's stand-in in ComfyUI's memory manager: no weights in this process (the workers hold them)."""


def pool_patcher_class() -> type:
    """:func:`patcher_class` for the device pool: loading starts the workers, unloading stops them."""
    base = patcher_class()
    cls = _POOL_CLASSES.get(base)
    if cls is not None:
        return cls

    class GRNPoolPatcher(base):
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False,
                     label: str = "device pool", pool: Any = None):
            super().__init__(model, load_device, offload_device, size=size,
                             weight_inplace_update=weight_inplace_update, label=label)
            self.grn_pool = pool

        def clone(self):
            n = super().clone()
            n.grn_pool = self.grn_pool
            return n

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False,
                 **kwargs):
            if self.grn_pool is not None:
                self.grn_pool.start()  # nothing when the workers run
            super().load(device_to, lowvram_model_memory=lowvram_model_memory,
                         force_patch_weights=force_patch_weights, full_load=full_load, **kwargs)
            self.model.model_loaded_weight_memory = self.model_size()  # loaded = the workers run

        def detach(self, unpatch_all=True):
            out = super().detach(unpatch_all)
            if unpatch_all and self.grn_pool is not None:
                self.grn_pool.close()
            return out

    _POOL_CLASSES[base] = GRNPoolPatcher
    return GRNPoolPatcher


def _same_device(name: str, device: Any) -> bool:
    device = torch.device(device)
    wanted = torch.device(name)
    if device.type != wanted.type:
        return False
    return device.type == "cpu" or (device.index or 0) == (wanted.index or 0)


def pool_patcher(loaded: LoadedGRN, mm: Any) -> Any:
    """The patcher of ``loaded.pool``, made on first use and then reused."""
    pool = loaded.pool
    if pool is None:
        raise ValueError("this Load GRN output has no device pool (devices is empty)")
    found = loaded.patchers.get(POOL)
    if found is not None and found.grn_pool is pool:
        return found
    device = mm.get_torch_device()
    shared = any(_same_device(d, device) for d in pool.devices)
    size = module_bytes(loaded.model.refiner) + module_bytes(loaded.model.tokenizer) if shared else 0
    made = pool_patcher_class()(GRNDevicePool(), device, mm.unet_offload_device(), size=max(1, size),
                                label=f"device pool ({loaded.refiner_name} on {', '.join(pool.devices)})", pool=pool)
    made.grn_shares_device = shared
    loaded.patchers[POOL] = made
    return made


def load_pool(loaded: LoadedGRN, mm: Any) -> Any:
    """Hand the pool to ComfyUI's memory manager, which starts its workers (Load GRN)."""
    made = pool_patcher(loaded, mm)
    mm.load_models_gpu([made], memory_required=0, force_full_load=True)
    return made


@contextlib.contextmanager
def pool_stage(loaded: LoadedGRN, which: Sequence[str], memory_required: int, mm: Any) -> Iterator[Any]:
    """Around a sampler run on the pool: the pool loaded (its workers started again if ComfyUI unloaded them) with the
    models of ``which`` this process needs (the tokenizer to encode an ``extend_from`` frame); ``memory_required``
    (one step's activations) is asked for only when a worker runs on ComfyUI's device. ``soft_empty_cache``
    afterwards."""
    try:
        models = [patcher(loaded, w, mm) for w in which] if loaded.model.compute_device is None else []
        made = pool_patcher(loaded, mm)
        needed = int(max(0, memory_required)) if made.grn_shares_device else 0
        mm.load_models_gpu(models + [made], memory_required=needed, force_full_load=True)
        yield loaded.pool
    finally:
        mm.soft_empty_cache()


# ---- memory_required of each stage ----------------------------------------------------------------------------------

def refiner_activation_bytes(loaded: LoadedGRN, stage_bytes: int) -> int:
    """One refiner step's activations: :func:`grn_core.pipeline.refiner_stage_bytes` (``stage_bytes``) minus the
    refiner weights it counts (it counts them unless the library keeps them resident on a GPU)."""
    model = loaded.model
    resident = model.compute_device is not None and not model.offload.moves_models and \
        model.compute_device.type != "cpu"
    return max(0, int(stage_bytes) - (0 if resident else module_bytes(model.refiner)))


def _tokenizer_dtype(loaded: LoadedGRN) -> torch.dtype:
    return next(loaded.model.tokenizer.parameters()).dtype


def decode_bytes(loaded: LoadedGRN, bits: Any, tile: int = 0, overlap: int = 4) -> int:
    """What decoding ``bits`` ``[B, rounds*d, t, h, w]`` needs beyond the tokenizer's weights: the library's estimate
    for one latent frame of one sample (``decode_tokens`` goes sample by sample, frame by frame, frames assembled on
    the CPU). ``tile`` 0 (automatic) asks for whole frames: ComfyUI frees what it can, then the decode picks the
    largest tile that fits what is free. 0 when the shape is not a bit map (the decode says what is wrong)."""
    from grn_core.tokenizer.tiled import estimate_decode_memory

    if not isinstance(bits, torch.Tensor) or bits.dim() != 5:
        return 0
    grid = (int(bits.shape[3]), int(bits.shape[4]))
    size = int(tile) if tile and tile > 0 else None
    overlap = min(overlap, size // 2) if size else overlap
    try:
        estimate = estimate_decode_memory(loaded.model.tokenizer.config, grid, size, overlap, _tokenizer_dtype(loaded))
    except ValueError:
        return 0
    return int(estimate.total)


def encode_bytes(loaded: LoadedGRN, images: Any, width: int = 0, height: int = 0) -> int:
    """What encoding IMAGE ``[N, H, W, 3]`` needs beyond the weights: the clip's pixels on the device plus, as the
    encoder's per-chunk activations, the decode estimate of one latent frame of that size (the library has no encode
    estimate; the encoder mirrors the decoder and is narrower). 0 when the shape is not an IMAGE."""
    from grn_core.tokenizer.tiled import estimate_decode_memory

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        return 0
    model = loaded.model
    sf, tf = model.spatial_factor, model.temporal_factor
    w = (int(width) or int(images.shape[2])) // sf * sf
    h = (int(height) or int(images.shape[1])) // sf * sf
    frames = 1 + tf * ((int(images.shape[0]) - 1) // tf) if images.shape[0] else 0
    if w <= 0 or h <= 0 or frames <= 0:
        return 0
    dtype = _tokenizer_dtype(loaded)
    pixels = 3 * frames * h * w * torch.empty((), dtype=dtype).element_size()
    try:
        per_frame = estimate_decode_memory(model.tokenizer.config, (h // sf, w // sf), None, 4, dtype).total
    except ValueError:
        per_frame = 0
    return int(pixels + per_frame)
