"""Load GRN: a refiner file (or the built-in tiny model) and its tokenizer → the ``GRN_MODEL`` socket."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from grn_core.checkpoints import inspect_checkpoint
from grn_core.models import load_tiny
from grn_core.pipeline import GRNModel, ensure_preview, load_model
from grn_core.releases import released, tokenizer_for_channels
from grn_core.runtime.offload import OffloadPolicy

from . import model_files
from .errors import LOAD, GRNNodeError, errors_from, node_error

WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2")
LAYOUTS = ("auto", "joint", "prefix")
# Offload choices as the library names them (grn_core.runtime.offload.OffloadPolicy): "auto" picks the least offload
# that fits the free memory; "model" brings each model to the GPU only for its stage; "blocks" / "blocks:N" also
# streams all / the last N refiner blocks from the CPU. The two older names stay accepted (saved workflows).
OFFLOAD_CHOICES = ("auto", "none", "model", "blocks", "blocks:4", "blocks:8", "blocks:16")
LEGACY_OFFLOAD = {"offload after run": "model", "keep on device": "none"}
OFFLOAD_POLICIES = OFFLOAD_CHOICES + tuple(LEGACY_OFFLOAD)


@dataclass
class LoadedGRN:
    """What travels on a ``GRN_MODEL`` socket: the model and how the nodes should treat it.

    ``offload``: the policy asked for, as the library names it (``auto``, ``none``, ``model``, ``blocks:N`` …); the
    resolved one is ``model.offload`` when the pipeline places the models (``model.compute_device`` set).
    ``keep_on_device``: whether :func:`on_device` leaves the models on the device after a run when the caller places
    them (``compute_device`` None) outside ComfyUI.
    ``patchers``: inside ComfyUI, the ``ModelPatcher`` of the refiner and of the tokenizer (``grn_nodes.patching``),
    made on first use: ComfyUI's memory manager places the models whose ``compute_device`` is None (and the one of
    the device pool, which stands for its workers).
    ``pool``: Load GRN's ``devices``: the :class:`grn_nodes.pool.DevicePool` whose workers run the sampler (each with
    its own copy of the model on its device); None: the sampler runs in this process. The model here still serves
    the planning, the prompt encoding and the tokenizer (decode, encode).
    """

    model: GRNModel
    refiner_name: str
    tokenizer_name: str
    weight_dtype: str = "default"
    keep_on_device: bool = False
    offload: str = "auto"
    patchers: dict = field(default_factory=dict, repr=False, compare=False)
    pool: Any = field(default=None, repr=False, compare=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.model.tasks

    def describe(self) -> str:
        m = self.model
        text = (f"{self.refiner_name} + {self.tokenizer_name}: tasks {','.join(m.tasks)}, layout {m.layout}, "
                f"{m.latent_channels}-channel latents, {m.spatial_factor}x spatial / {m.temporal_factor}x temporal")
        if m.compute_device is not None:
            text += f"; {m.weight_dtype} weights, offload {m.offload.describe()} on {m.compute_device}"
        if self.pool is not None:
            text += f"; sampled by a pool of workers on {', '.join(self.pool.devices)}"
        return text


def offload_policy(choice: str) -> str:
    """The offload widget's value as the library's policy string (older saved names mapped), or a node error."""
    policy = LEGACY_OFFLOAD.get(choice, choice)
    try:
        OffloadPolicy.parse(policy)
    except ValueError as error:
        if str(choice).startswith("blocks:"):
            raise node_error(LOAD, error) from error
        raise node_error(LOAD, f"offload '{choice}' is not one of {', '.join(OFFLOAD_POLICIES)}.") from error
    return policy


def load_grn(
    refiner_path: Optional[Path],
    tokenizer_path: Optional[Path],
    weight_dtype: str = "default",
    layout: str = "auto",
    offload: str = "auto",
    fit_preview: bool = True,
    device: Any = None,
    cast_for: Any = None,
) -> LoadedGRN:
    """Load a refiner file (``None`` = the built-in tiny model) and its tokenizer; see ``model_files`` for paths.

    ``device``: where the stages run; the pipeline then casts the weights for it and places the models per
    ``offload`` (the command line's way). ``None`` loads on the CPU and never moves anything: the caller places the
    models (inside ComfyUI its memory manager, see ``patching``; elsewhere :func:`on_device`). ``cast_for`` (with
    ``device`` None): the device the weights are cast for (ComfyUI's torch device: bf16 on GPUs for ``default``),
    still loaded on the CPU and never placed by the pipeline.
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise node_error(LOAD, f"weight_dtype '{weight_dtype}' is not one of {', '.join(WEIGHT_DTYPES)}.")
    if layout not in LAYOUTS:
        raise node_error(LOAD, f"layout '{layout}' is not one of {', '.join(LAYOUTS)}.")
    policy = offload_policy(offload)
    dtype = None if weight_dtype == "default" else weight_dtype
    caller_places = device is None and cast_for is not None
    if caller_places:
        # The library casts for the device it is given; offload 'model' keeps the weights on the CPU (see
        # grn_core.pipeline.load_model), and compute_device None below makes every stage leave them where they are.
        device, load_policy = cast_for, "model"
    else:
        load_policy = policy
    with errors_from(LOAD):
        if refiner_path is None:
            if not model_files.tiny_available():
                raise GRNNodeError(model_files.tiny_missing_message(LOAD))
            model = load_tiny(device=device, dtype=dtype, offload=load_policy)
            refiner_name = tokenizer_name = model_files.TINY
        else:
            if tokenizer_path is None:
                raise node_error(LOAD, "no tokenizer file: pick one, or 'auto' with the matching HBQ tokenizer in "
                                       "models/grn.")
            model = load_model(refiner_path, tokenizer_path, dtype=dtype, device=device,
                               layout=None if layout == "auto" else layout, offload=load_policy, attention="auto")
            refiner_name, tokenizer_name = Path(refiner_path).name, Path(tokenizer_path).name
            model.name = refiner_name
    if caller_places:
        model.compute_device = None  # GRNModel.stage is a no-op: nothing is moved by the pipeline
        model.offload = OffloadPolicy("none")
    if fit_preview:
        ensure_preview(model)
    keep = OffloadPolicy.parse(policy).mode == "none"
    return LoadedGRN(model, refiner_name, tokenizer_name, weight_dtype, keep, policy)


def tokenizer_for(refiner_path: Path, choice: str, folder_paths: Any) -> Path:
    """Resolve the tokenizer widget (a file name or ``auto``) for ``refiner_path``."""
    if choice != model_files.AUTO:
        return model_files.resolve_file(folder_paths, choice, (model_files.GRN_FOLDER,), node=LOAD)
    entry = released(refiner_path.name)
    if entry is not None:
        channels = entry.latent_channels
    else:
        with errors_from(LOAD):
            info = inspect_checkpoint(refiner_path)
        channels = int(info.config.latent_channels)
    local = [n for n in model_files.tokenizer_choices(folder_paths) if n != model_files.AUTO]
    present = [n for n in local if _exists(folder_paths, n)]
    name = model_files.pick_tokenizer(channels, present)
    if name is None:
        wanted = tokenizer_for_channels(channels) or f"an HBQ tokenizer with {channels} latent channels"
        raise GRNNodeError(
            f"{LOAD}: tokenizer 'auto' found no tokenizer for {refiner_path.name} ({channels}-channel latents) in "
            f"models/grn. Download {wanted} from {model_files.HF_REPO} into ComfyUI/models/grn/, or pick the file.")
    return model_files.resolve_file(folder_paths, name, (model_files.GRN_FOLDER,), node=LOAD)


def _exists(folder_paths: Any, name: str) -> bool:
    try:
        full = folder_paths.get_full_path(model_files.GRN_FOLDER, name)
    except KeyError:
        return False
    return bool(full) and Path(full).is_file()


@contextlib.contextmanager
def on_device(loaded: LoadedGRN, device: Any, offload_device: Any = "cpu",
              after: Optional[Callable[[], None]] = None) -> Iterator[GRNModel]:
    """Around a node's run: call ``after`` (ComfyUI's cache cleanup) in ``finally``.

    When the pipeline places the models (``model.compute_device`` set by ``load_grn(device=...)``) each stage moves
    what it needs per the offload policy, so nothing is moved here. Otherwise refiner + tokenizer go to ``device`` for
    the run and back to ``offload_device`` afterwards unless ``keep_on_device``.
    """
    model = loaded.model
    if model.compute_device is not None:
        try:
            yield model
        finally:
            if after is not None:
                after()
        return
    try:
        model.refiner.to(device)
        model.tokenizer.to(device)
        yield model
    finally:
        if not loaded.keep_on_device:
            model.refiner.to(offload_device)
            model.tokenizer.to(offload_device)
        if after is not None:
            after()
