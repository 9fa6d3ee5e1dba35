"""The ComfyUI side of the GRN nodes (V3 schema): sockets, widgets, progress, devices — nothing else.

The work happens in the library (``grn_core``) through the small adapters beside this file (``loading``,
``prompting``, ``sampling``, ``frames``, ``stats``); this module is only imported inside ComfyUI
(``comfy_api.latest`` must exist). Widget defaults come from the official presets (``grn_core.presets``).
ComfyUI's own modules (``folder_paths``, ``comfy.*``, ``server``) are imported where they are used, so the schemas
can be read with a minimal stand-in for ``comfy_api.latest`` alone.

Memory: Load GRN loads the weights on the CPU (cast for ComfyUI's device) and every stage loads what it needs through
ComfyUI's memory manager (``patching``: one ``ModelPatcher`` per model, ``load_models_gpu`` with the stage's
activation estimate), so ComfyUI keeps them resident, evicts them and unloads them like its own models.

Load GRN ``devices`` (e.g. ``cuda:0,cuda:1``): the Refine Sampler's runs go to a pool of worker processes, one per
device, each holding its own copy of the model (``pool``); ComfyUI's memory manager holds the pool as one more model
(``patching.pool_patcher``): loading it starts the workers, "Unload models" stops them.
"""

from __future__ import annotations

import contextlib

import logging
from typing import Any, Optional

from comfy_api.latest import ComfyExtension, io

from grn_core.pipeline import ensure_preview
from grn_core.presets import ADAPTIVE_RULES as RULES
from grn_core.presets import FPS, MAX_FRAMES, preset
from grn_core.refiner.model import RefinerInterrupted

from . import model_files, patching
from .errors import ENCODE_PROMPT
from .frames import decode_to_images, encode_images
from .loading import LAYOUTS, OFFLOAD_POLICIES, WEIGHT_DTYPES, LoadedGRN, load_grn, tokenizer_for
from .pool import DevicePool, PoolModel, parse_devices
from .prompting import TASK_CHOICES, ClipPromptEncoder, GRNConditioning, encode_prompt_for, umt5_file_encoder
from .sampling import (ADAPTIVE_RULES, ASPECTS, RESOLUTIONS, StepRecorder, build_settings, choose_task,
                       describe_edit, describe_settings, extend_bits, first_frame_from_image, plan_edit, plan_size,
                       preview_image, refiner_memory_bytes, run_sampler)
from .stats import render_stats
from .widget_events import EVENT_NAME

CATEGORY = "GRN"
GRN_MODEL = io.Custom("GRN_MODEL")
GRN_CONDITIONING = io.Custom("GRN_CONDITIONING")
GRN_TOKENS = io.Custom("GRN_TOKENS")
MASK = io.Mask  # ComfyUI's MASK
T2V = preset("t2v")  # a new Refine Sampler starts with the official text-to-video demo's settings
RULE = RULES["t2v"]  # the numbers the custom adaptive rule starts from


def _official(field: str) -> str:
    """A tooltip listing the official value of ``field`` per task, read from the presets."""
    values = (f"{getattr(preset(task), field):g} for {task.upper()}" for task in ("t2i", "t2v", "i2v", "c2i"))
    return "Official: " + ", ".join(values) + "."


def _folder_paths():
    import folder_paths

    model_files.register_model_folder(folder_paths)
    return folder_paths


def _list(fn) -> list[str]:
    try:
        return fn(_folder_paths())
    except ImportError:  # schema read outside ComfyUI (tests): only the built-in choices
        return fn(_EmptyFolders())


class _EmptyFolders:
    models_dir = "models"
    folder_names_and_paths: dict = {}

    @staticmethod
    def get_filename_list(folder: str) -> list[str]:
        return []

    @staticmethod
    def get_full_path(folder: str, name: str) -> None:
        return None

    @staticmethod
    def get_folder_paths(folder: str) -> list[str]:
        return []


class GRNLoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GRNLoadModel",
            display_name="Load GRN",
            category=CATEGORY,
            description="Load a GRN refiner (T2I / T2V / I2V / C2I, or the built-in tiny model) and its HBQ tokenizer.",
            inputs=[
                io.Combo.Input("refiner", options=_list(model_files.refiner_choices), default=model_files.TINY,
                               tooltip="Refiner file from models/grn or models/diffusion_models; 'tiny' is built in."),
                io.Combo.Input("tokenizer", options=_list(model_files.tokenizer_choices), default=model_files.AUTO,
                               tooltip="HBQ tokenizer file; 'auto' picks the one that matches the refiner."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Refiner weight storage; 'default' is bf16 on GPUs. fp8 halves the weight "
                                       "memory (matmuls still run in bf16)."),
                io.Combo.Input("layout", options=list(LAYOUTS), default="auto",
                               tooltip="Attention layout: 'prefix' only for the first MGenAI T2I/T2V files."),
                io.Combo.Input("offload", options=list(OFFLOAD_POLICIES), default="auto",
                               tooltip="Inside ComfyUI its memory manager decides: it loads the refiner and the "
                                       "tokenizer whole for their stage, keeps them while there is room, unloads "
                                       "them when another model needs the memory or on 'Unload models'. Partial "
                                       "(lowvram) loading of GRN models is not supported yet, so 'blocks' does not "
                                       "stream inside ComfyUI. This value is the command line's policy, kept for "
                                       "saved workflows: 'none', 'model', 'blocks' / 'blocks:N' (stream all / the "
                                       "last N refiner blocks from the CPU); 'offload after run' = 'model', 'keep "
                                       "on device' = 'none'. With 'devices' set, each pool worker places its copy "
                                       "of the model by this policy."),
                io.Boolean.Input("download_missing", default=False,
                                 tooltip=f"Fetch a missing released file from {model_files.HF_REPO} into models/grn."),
                # appended last so saved workflows keep their widget order
                io.String.Input("devices", default="", optional=True,
                                tooltip="Empty: the sampler runs in this ComfyUI process on its device. Two or more "
                                        "devices, e.g. 'cuda:0,cuda:1': a pool of worker processes, one per device, "
                                        "each with its own copy of the model (loaded once, kept warm, stopped by "
                                        "'Unload models'); with 2 devices and guidance each computes one guidance "
                                        "branch (same images, up to twice as fast); otherwise every step's "
                                        "sequence is split over the devices where the model's attention heads "
                                        "allow it (sp, cfg+sp), else the first device samples alone. Workers place "
                                        "the weights per 'offload'. 'cpu,cpu' tries the pool without a GPU."),
            ],
            outputs=[GRN_MODEL.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, refiner: str, tokenizer: str, weight_dtype: str, layout: str, offload: str,
                download_missing: bool, devices: str = "") -> io.NodeOutput:
        import comfy.model_management as mm

        pool_devices = parse_devices(devices)  # a bad value fails before anything is loaded
        folder_paths = _folder_paths()
        device = mm.get_torch_device()  # cast for it; ComfyUI's memory manager places the models (patching)
        refiner_path = tokenizer_path = None
        if refiner == model_files.TINY:
            loaded = load_grn(None, None, weight_dtype, layout, offload, fit_preview=False, cast_for=device)
        else:
            refiner_path = model_files.resolve_file(
                folder_paths, refiner, (model_files.GRN_FOLDER,) + model_files.SHARED_FOLDERS, download_missing)
            if tokenizer == model_files.AUTO:
                tokenizer_path = tokenizer_for(refiner_path, tokenizer, folder_paths)
            else:
                tokenizer_path = model_files.resolve_file(folder_paths, tokenizer, (model_files.GRN_FOLDER,),
                                                          download_missing)
            loaded = load_grn(refiner_path, tokenizer_path, weight_dtype, layout, offload, fit_preview=False,
                              cast_for=device)
        if loaded.offload != "auto" and not pool_devices:
            logging.getLogger(patching.__name__).info(
                "GRN: offload '%s' is the command line's policy; inside ComfyUI its memory manager places GRN's "
                "models (whole: partial/lowvram loading is not supported yet)", offload)
        if loaded.model.preview is None:  # fit the live preview with the tokenizer where ComfyUI puts it
            with patching.stage(loaded, ("tokenizer",), 0, mm):
                ensure_preview(loaded.model)
        if pool_devices:
            # The workers load the same files with the same settings on their own devices; ComfyUI's memory manager
            # starts them (the pool's patcher) and stops them on "Unload models"; dropping this output stops them too.
            spec = PoolModel(None if refiner_path is None else str(refiner_path),
                             None if tokenizer_path is None else str(tokenizer_path), weight_dtype, layout,
                             loaded.offload, loaded.refiner_name, _heads(loaded.model))
            loaded.pool = DevicePool(pool_devices, spec, should_stop=mm.processing_interrupted)
            loaded.pool.bind(loaded)
            # This process never runs the refiner now (the workers do): keep its shapes and dtypes, drop its weights
            # (an 8B refiner would otherwise hold 16 GB of host memory here for nothing).
            loaded.model.refiner.to("meta")
            with _cancel_between_blocks(loaded.model.refiner, mm):
                patching.load_pool(loaded, mm)
        return io.NodeOutput(loaded)


def _heads(model) -> tuple | None:
    """The refiner's ``(heads, kv_heads)`` (which worker counts sequence parallel allows); None when unknown."""
    config = getattr(model.refiner, "config", None)
    return (config.heads, config.kv_heads) if hasattr(config, "kv_heads") else None


class GRNEncodePrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GRNEncodePrompt",
            display_name="Encode Prompt",
            category=CATEGORY,
            description="Prompt and negative prompt -> GRN text features (umt5-xxl from a CLIP input or GRN's own "
                        "file, or the tiny model's built-in encoder). The task tag is added automatically.",
            inputs=[
                GRN_MODEL.Input("model"),
                io.String.Input("prompt", multiline=True, default="a red circle moving right"),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Empty: the default below decides. Anything else is used as written."),
                io.Combo.Input("task", options=list(TASK_CHOICES), default="auto",
                               tooltip="'auto' encodes for every task of the model; the sampler picks I2V when it "
                                       "gets a first frame."),
                io.Boolean.Input("add_task_tag", default=True, tooltip="Prefix <T2I>/<T2V>/<I2V> as the model was "
                                                                       "trained; switch off to write your own."),
                io.Combo.Input("umt5_file", options=_list(model_files.umt5_choices), default=model_files.NONE,
                               tooltip="GRN's umt5-xxl file (needs umt5-xxl/tokenizer.json beside it); used when no "
                                       "CLIP is connected."),
                io.Clip.Input("clip", optional=True, tooltip="umt5-xxl from CLIPLoader, type 'wan' (Wan's file)."),
                io.Boolean.Input("default_negative", default=True, optional=True,
                                 tooltip="With an empty negative prompt: use the official demos' negative prompt "
                                         "(their quality list for T2V/I2V, none for T2I; models that say what they "
                                         "were trained with, like tiny, use theirs). Off: an empty negative is "
                                         "empty."),
            ],
            outputs=[GRN_CONDITIONING.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, model: LoadedGRN, prompt: str, negative_prompt: str, task: str, add_task_tag: bool,
                umt5_file: str, clip: Any = None, default_negative: bool = True) -> io.NodeOutput:
        if clip is not None:
            encoder, source = ClipPromptEncoder(clip), "clip"
        elif umt5_file != model_files.NONE:
            path = model_files.resolve_file(_folder_paths(), umt5_file, model_files.TEXT_ENCODER_FOLDERS,
                                            node=ENCODE_PROMPT)
            import comfy.model_management as mm

            encoder, source = umt5_file_encoder(path, device=mm.text_encoder_device()), "umt5 file"
        else:
            encoder, source = None, "built-in"
        return io.NodeOutput(encode_prompt_for(model, encoder, prompt, negative_prompt, task, add_task_tag, source,
                                               default_negative))


class GRNRefineSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GRNRefineSampler",
            display_name="Refine Sampler",
            category=CATEGORY,
            description="GRN's entropy-guided refinement: fills, keeps and erases tokens step by step. Sizes snap "
                        "to the model's grid; frames to 1 + 4k (16 fps).",
            inputs=[
                GRN_MODEL.Input("model"),
                GRN_CONDITIONING.Input("conditioning", optional=True),
                io.Int.Input("width", default=T2V.width, min=16, max=4096, step=16),
                io.Int.Input("height", default=T2V.height, min=16, max=4096, step=16),
                io.Combo.Input("resolution", options=list(RESOLUTIONS), default="custom",
                               tooltip="'custom' uses width/height; a bucket uses its trained size at the aspect."),
                io.Combo.Input("aspect", options=list(ASPECTS), default="from width/height"),
                io.Int.Input("frames", default=T2V.frames, min=1, max=MAX_FRAMES, step=1,
                             tooltip="1 makes an image; videos use 1 + 4k frames (floored, as the official code)."),
                io.Float.Input("duration", default=0.0, min=0.0, max=MAX_FRAMES / FPS, step=0.25,
                               tooltip=f"Seconds at {FPS} fps; overrides frames when > 0."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=T2V.steps, min=1, max=200),
                io.Boolean.Input("adaptive_steps", default=T2V.adaptive,
                                 tooltip="Entropy-guided step count: after warm-up, D = k*H + b more steps, with the "
                                         "model's own rule (see adaptive_rule)."),
                io.Int.Input("min_steps", default=RULE["min_steps"], min=2, max=200,
                             tooltip="Custom rule only: the fewest steps."),
                io.Int.Input("warmup", default=RULE["warmup"], min=0, max=50,
                             tooltip="Custom rule only: steps before the decision."),
                io.Float.Input("adaptive_k", default=RULE["k"], min=-10000.0, max=10000.0, step=1.0,
                               tooltip="Custom rule only: steps per unit of entropy. Fit k and b for your model "
                                       "and prompts with `python -m grn_core calibrate`."),
                io.Float.Input("adaptive_b", default=RULE["b"], min=-10000.0, max=10000.0, step=1.0,
                               tooltip="Custom rule only: offset of D = k*H + b."),
                io.Float.Input("guidance", default=T2V.guidance, min=0.0, max=20.0, step=0.05,
                               tooltip=_official("guidance")),
                io.Float.Input("guidance_interval", default=T2V.cfg_interval, min=0.0, max=1.0, step=0.01,
                               tooltip="Guide only once the kept fraction reaches this value (0 = every step)."),
                io.Float.Input("temperature", default=T2V.temperature, min=0.05, max=5.0, step=0.01,
                               tooltip=_official("temperature")),
                io.Float.Input("shift", default=T2V.shift, min=0.05, max=10.0, step=0.05),
                io.Int.Input("class_index", default=0, min=0, max=999, tooltip="ImageNet class for C2I models."),
                io.Image.Input("first_frame", optional=True, tooltip="I2V: the video's first frame."),
                GRN_TOKENS.Input("first_frame_tokens", optional=True, tooltip="I2V: first frame from Encode Image."),
                io.Combo.Input("adaptive_rule", options=list(ADAPTIVE_RULES), default="model", optional=True,
                               tooltip="'model': the model's own rule (a calibrated one from its file, else the "
                                       "documented default); 'custom': min_steps, warmup, adaptive_k, adaptive_b."),
                # editing (grn_core.editing): appended last so saved workflows keep their widget order
                GRN_TOKENS.Input("source_tokens", optional=True,
                                 tooltip="Edit an image or clip: its tokens from Encode Image (a clip's frames "
                                         "encode as one clip). They must be on this output's grid: the same width, "
                                         "height and frames."),
                MASK.Input("mask", optional=True,
                           tooltip="With source_tokens: white (1) = regenerate, black (0) = keep, as ComfyUI's "
                                   "inpainting masks (LoadImage's mask is 1 where the picture is transparent, so "
                                   "erased areas are regenerated). A latent cell is kept only when every pixel of "
                                   "its block is black; kept cells are clamped to the source and show as 'fixed' "
                                   "in the widget. [B, H, W]: one mask for every frame (B = 1) or one per frame; "
                                   "another size is resized with a warning."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="With source_tokens: 1 regenerates the unmasked cells fully, 0 returns the "
                                       "source unchanged; in between the run starts at step round((1 - strength) "
                                       "* steps) from the source's bits."),
                io.Image.Input("extend_from", optional=True,
                               tooltip="Continue a clip: the previous clip's frames (Decode Video); its last frame "
                                       "becomes this clip's first, kept (fixed), and the rest is generated."),
            ],
            outputs=[GRN_TOKENS.Output(display_name="tokens")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model: LoadedGRN, width: int, height: int, resolution: str, aspect: str, frames: int,
                duration: float, seed: int, steps: int, adaptive_steps: bool, min_steps: int, warmup: int,
                adaptive_k: float, adaptive_b: float, guidance: float, guidance_interval: float, temperature: float,
                shift: float, class_index: int, conditioning: Optional[GRNConditioning] = None,
                first_frame: Any = None, first_frame_tokens: Any = None, adaptive_rule: str = "model",
                source_tokens: Any = None, mask: Any = None, strength: float = 1.0,
                extend_from: Any = None) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        task = choose_task(model, conditioning, first_frame is not None or first_frame_tokens is not None)
        plan = plan_size(model, width, height, frames, resolution, aspect, duration, task)
        settings = build_settings(model, task, steps, guidance, temperature, shift, guidance_interval,
                                  adaptive_steps, min_steps, warmup, adaptive_k, adaptive_b, adaptive_rule)
        edit = plan_edit(model, plan, task, source_tokens, mask, strength, extend_from)
        node_id = str(cls.hidden.unique_id) if cls.hidden is not None else ""
        bar = comfy.utils.ProgressBar(steps, node_id=node_id or None)

        def progress(step: int, total: int, rgb: Any) -> None:
            preview = ("JPEG", preview_image(rgb), 512) if rgb is not None else None
            bar.update_absolute(step, total, preview)  # also ComfyUI's interruption check

        recorder = StepRecorder(node=node_id, prompt_id=_prompt_id(), size=(plan.width, plan.height, plan.frames),
                                send=_sender(), progress=progress)
        frame = first_frame_from_image(first_frame, plan.width, plan.height) if first_frame is not None else None
        frame_bits = first_frame_tokens.bits if first_frame_tokens is not None and frame is None else None
        mm.throw_exception_if_processing_interrupted()
        # ComfyUI's memory manager brings the refiner (and the tokenizer, to encode a first-frame image) to its device,
        # unloading other models until they and one step's activations fit.
        activations = patching.refiner_activation_bytes(
            model, refiner_memory_bytes(model, plan, task, settings, conditioning))
        if model.pool is not None:
            # Load GRN devices: the pool's workers sample (a first-frame image is encoded there); this process
            # encodes an extend_from frame, so only then it needs the tokenizer. ComfyUI's interrupt reaches the
            # workers through the pool (should_stop), and their stop comes back as RefinerInterrupted.
            stage = patching.pool_stage(model, ("tokenizer",) if extend_from is not None else (), activations, mm)
        else:
            encodes = frame is not None or extend_from is not None
            stage = patching.stage(model, ("refiner", "tokenizer") if encodes else ("refiner",), activations, mm)
        with stage, _cancel_between_blocks(model.model.refiner, mm):
            if extend_from is not None:  # the last frame is encoded where ComfyUI loaded the tokenizer
                edit.init_bits, edit.fixed = extend_bits(model, plan, extend_from)
            if edit is not None:
                recorder.fixed = edit.fixed
            result = run_sampler(model, conditioning, plan, seed, settings, task, first_frame=frame,
                                 first_frame_bits=frame_bits, class_index=class_index, recorder=recorder, edit=edit,
                                 pool=model.pool, should_stop=mm.processing_interrupted)
        result.bits = result.bits.to(mm.intermediate_device())
        note = f"{plan.note}; {describe_settings(settings)}"
        if edit is not None:
            result.extras["edit_note"] = describe_edit(edit, settings)
            note += f"; {result.extras['edit_note']}"
        result.extras["size_note"] = plan.note
        result.extras["settings_note"] = note
        return io.NodeOutput(result, ui={"text": [note]})


@contextlib.contextmanager
def _cancel_between_blocks(refiner: Any, mm: Any):
    """ComfyUI's Cancel also ends a long step between two refiner blocks (``GRNRefiner.should_stop``), not only
    between steps; the stop surfaces as ComfyUI's own interruption, as a press of Cancel anywhere else does."""
    hooked = hasattr(type(refiner), "should_stop")
    if hooked:
        refiner.should_stop = mm.processing_interrupted
    try:
        yield
    except RefinerInterrupted:
        mm.throw_exception_if_processing_interrupted()
        raise
    finally:
        if hooked:
            refiner.should_stop = None


def _prompt_id() -> Optional[str]:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return getattr(context, "prompt_id", None)


def _sender():
    try:
        from server import PromptServer
    except ImportError:
        return None
    server = PromptServer.instance

    def send(event: dict) -> None:
        server.send_sync(EVENT_NAME, event, server.client_id)

    return send


class GRNDecodeVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GRNDecodeVideo",
            display_name="Decode Video",
            category=CATEGORY,
            description="GRN tokens -> IMAGE frames + fps, for CreateVideo / SaveVideo / SaveAnimatedWEBP.",
            inputs=[
                GRN_MODEL.Input("model"),
                GRN_TOKENS.Input("tokens"),
                io.Int.Input("tile", default=0, min=0, max=256, step=8,
                             tooltip="Decode in spatial tiles of this many latent cells, 4 cells blended at each seam. "
                                     "0 = automatic: whole frames when the free GPU memory allows, else the "
                                     "largest tile that fits. 16-32 fits small GPUs."),
            ],
            outputs=[io.Image.Output(display_name="images"), io.Float.Output(display_name="fps")],
        )

    @classmethod
    def execute(cls, model: LoadedGRN, tokens: Any, tile: int) -> io.NodeOutput:
        import comfy.model_management as mm

        bits = getattr(tokens, "bits", tokens)
        with patching.stage(model, ("tokenizer",), patching.decode_bytes(model, bits, tile), mm):
            images = decode_to_images(model, tokens, tile=tile)
        return io.NodeOutput(images.to(mm.intermediate_device()), float(FPS))


class GRNEncodeImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GRNEncodeImage",
            display_name="Encode Image",
            category=CATEGORY,
            description="IMAGE -> GRN tokens with the model's tokenizer (I2V first frames; decode to inspect).",
            inputs=[
                GRN_MODEL.Input("model"),
                io.Image.Input("image"),
                io.Int.Input("width", default=0, min=0, max=4096, step=16, tooltip="0 = the image's, snapped down."),
                io.Int.Input("height", default=0, min=0, max=4096, step=16),
            ],
            outputs=[GRN_TOKENS.Output(display_name="tokens")],
        )

    @classmethod
    def execute(cls, model: LoadedGRN, image: Any, width: int, height: int) -> io.NodeOutput:
        import comfy.model_management as mm

        with patching.stage(model, ("tokenizer",), patching.encode_bytes(model, image, width, height), mm):
            tokens = encode_images(model, image, width, height)
        return io.NodeOutput(tokens)


class GRNRefineStats(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GRNRefineStats",
            display_name="Refine Stats",
            category=CATEGORY,
            description="A chart of the run: token states per step, entropy, kept fraction, adaptive decision.",
            inputs=[GRN_TOKENS.Input("tokens")],
            outputs=[io.Image.Output(display_name="chart")],
        )

    @classmethod
    def execute(cls, tokens: Any) -> io.NodeOutput:
        return io.NodeOutput(render_stats(tokens))


NODES = [GRNLoadModel, GRNEncodePrompt, GRNRefineSampler, GRNDecodeVideo, GRNEncodeImage, GRNRefineStats]


class GRNExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        _folder_paths()
        return list(NODES)


async def comfy_entrypoint() -> GRNExtension:
    return GRNExtension()
