"""Named models: the built-in ``tiny`` model and short names for the released files (``t2v-2b``, ``c2i-b`` …).

A short name resolves to files inside a model folder (``--model-dir``, env ``GRN_MODEL_DIR``, default ``models/grn``);
missing files are fetched from the Hugging Face repo only when the caller allows it, otherwise the error lists every
file and where it goes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

from .releases import HF_REPO, SHORT_NAMES, UMT5_TOKENIZER, UMT5_WEIGHTS

TINY_DIR = Path(__file__).parent / "assets" / "tiny"
MODEL_CHOICES = ("tiny", *SHORT_NAMES)


def default_model_dir() -> Path:
    return Path(os.environ.get("GRN_MODEL_DIR", "models/grn"))


def tiny_available(folder: Path | str | None = None) -> bool:
    folder = Path(folder) if folder is not None else TINY_DIR
    return (folder / "refiner.safetensors").is_file() and (folder / "tokenizer.safetensors").is_file()


def load_tiny(device: Any = "cpu", dtype: Any = None, offload: Any = "auto", attention: str = "auto",
              folder: Path | str | None = None):
    """The built-in tiny text-to-video model: refiner, tokenizer and its download-free text encoder, with what its
    file says about it (live-preview projection, native size, calibrated adaptive-step rule). ``device``, ``dtype``,
    ``offload`` and ``attention`` as for :func:`grn_core.pipeline.load_model`; ``folder``: where its two files are
    (default: the copy shipped in the package). Damaged metadata is a CheckpointError naming the file and key."""
    from .pipeline import load_model

    folder = Path(folder) if folder is not None else TINY_DIR
    if not tiny_available(folder):
        raise ValueError(
            f"the built-in tiny model is not in this copy of the library (expected {folder}/refiner.safetensors "
            "and tokenizer.safetensors). It is produced by `python -m grn_core.train`; until then use --model PATH "
            "with released files."
        )
    model = load_model(folder / "refiner.safetensors", folder / "tokenizer.safetensors", dtype=dtype, device=device,
                       offload=offload, attention=attention)
    _apply_tiny_metadata(model, folder / "refiner.safetensors")
    model.name = "tiny"
    return model


_TINY_DEFAULT_LIMITS = {"width": 16384, "height": 16384, "frames": 4096}


def _apply_tiny_metadata(model: Any, path: Path) -> None:
    """Text encoder, preview, default size and adaptive-step rule from the tiny refiner's metadata, each checked."""
    from .checkpoint_files import CheckpointError, metadata_json, read_checkpoint
    from .sampler import AdaptiveSteps, LatentRGBProjection
    from .text.hashed import HashedTextEncoder

    meta = read_checkpoint(path).metadata

    def bad(key: str, why: str, value: Any) -> CheckpointError:
        return CheckpointError(
            f"{path}: its '{key}' metadata is unusable: {why}. The file is damaged or its metadata was edited by "
            "hand: use an intact copy (reinstall ComfyUI-GRN, or re-create it with `python -m grn_core.train`).",
            path=path, key=key, value=value)

    text = metadata_json(path, meta, "grn.text_encoder", dict, required=True)
    try:
        encoder = HashedTextEncoder.from_config(text)
    except (ValueError, TypeError, KeyError) as error:
        raise bad("grn.text_encoder", str(error), text) from error
    if encoder.max_tokens > 65536:
        raise bad("grn.text_encoder", f"max_tokens={encoder.max_tokens} is beyond 65536", text)
    if model.text_channels is not None and encoder.dim != model.text_channels:
        raise bad("grn.text_encoder", f"dim={encoder.dim} but the refiner takes {model.text_channels}-wide text "
                                      "features", text)
    model.text_encoder = encoder

    preview = metadata_json(path, meta, "grn.preview", dict)
    if preview is not None:
        try:
            projection = LatentRGBProjection.from_dict(preview)
        except (ValueError, TypeError, KeyError, RuntimeError) as error:
            raise bad("grn.preview", f"it needs 'weight' [{model.latent_channels}, 3] and 'bias' [3] lists of "
                                     f"numbers ({error})", preview) from error
        shapes = (tuple(projection.weight.shape), tuple(projection.bias.shape))
        if shapes != ((model.latent_channels, 3), (3,)):
            raise bad("grn.preview", f"'weight' and 'bias' have shapes {shapes[0]} and {shapes[1]}, expected "
                                     f"({model.latent_channels}, 3) and (3,)", preview)
        if not (_all_finite(projection.weight) and _all_finite(projection.bias)):
            raise bad("grn.preview", "it holds NaN or Inf numbers", preview)
        model.preview = projection

    defaults = metadata_json(path, meta, "grn.defaults", dict)
    if defaults is not None:
        for key, limit in _TINY_DEFAULT_LIMITS.items():
            value = defaults.get(key)
            if key in defaults and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit):
                raise bad("grn.defaults", f"{key}={value!r} must be an integer in 1..{limit}", defaults)
        if "negative" in defaults and not isinstance(defaults["negative"], str):
            raise bad("grn.defaults", f"negative={defaults['negative']!r} must be a string", defaults)
        model.defaults = dict(defaults)
    # Trained with the empty prompt as the unconditional branch (cond dropout), never with the demos' negative list.
    model.defaults.setdefault("negative", "")

    adaptive = metadata_json(path, meta, "grn.adaptive", dict)
    if adaptive is not None:
        try:
            rule = AdaptiveSteps(**adaptive)
        except TypeError as error:
            raise bad("grn.adaptive", f"it needs exactly warmup, k, b, min_steps and calibrated ({error})",
                      adaptive) from error
        ints_ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (rule.warmup, rule.min_steps))
        nums_ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      for v in (rule.k, rule.b))
        if not (ints_ok and nums_ok and 0 <= rule.warmup < rule.min_steps <= 100000
                and isinstance(rule.calibrated, bool)):
            raise bad("grn.adaptive", "it needs integers 0 <= warmup < min_steps, finite numbers k and b, and a "
                                      f"true/false calibrated; got {adaptive}", adaptive)
        model.adaptive = rule


def _all_finite(t: Any) -> bool:
    import torch

    return bool(torch.isfinite(t).all())


def released_files(name: str, model_dir: Path) -> dict[str, Path]:
    """The files a short model name needs, by role, inside ``model_dir``."""
    entry = SHORT_NAMES[name].file
    files = {"refiner": model_dir / entry.name, "tokenizer": model_dir / entry.tokenizer}
    if entry.kind == "refiner":  # text-conditioned: umt5-xxl and its tokenizer
        files["text_encoder"] = model_dir / UMT5_WEIGHTS
        files["text_tokenizer"] = model_dir / UMT5_TOKENIZER
    return files


def ensure_files(files: dict[str, Path], model_dir: Path, download: bool) -> None:
    """Check that every file exists; fetch the missing ones from Hugging Face when ``download`` is set."""
    missing = {role: path for role, path in files.items() if not path.is_file()}
    if not missing:
        return
    if not download:
        listing = "\n".join(f"  {path.relative_to(model_dir) if path.is_relative_to(model_dir) else path}  ({role})"
                            for role, path in missing.items())
        raise ValueError(
            f"missing model files in {model_dir}:\n{listing}\nDownload them from https://huggingface.co/{HF_REPO} "
            f"into {model_dir}, or pass --download to fetch them."
        )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as error:
        raise ValueError("--download needs the huggingface_hub package: pip install huggingface_hub") from error
    for path in missing.values():
        hf_hub_download(HF_REPO, str(path.relative_to(model_dir)), local_dir=str(model_dir))


def load_named(name: str, model_dir: Optional[Path] = None, download: bool = False, device: Any = "cpu",
               dtype: Any = None, text_encoder: bool = True):
    """Load a model by short name → (GRNModel, text encoder or None, default task). ``text_encoder=False`` leaves a
    separate umt5-xxl unloaded (a rank that receives its prompt features from another)."""
    from .checkpoints import load_umt5
    from .pipeline import load_model
    from .text import UMT5PromptEncoder

    if name == "tiny":
        model = load_tiny(device=device, dtype=dtype)
        return model, model.text_encoder, model.default_task()
    if name not in SHORT_NAMES:
        raise ValueError(f"unknown model '{name}'; use a file path or one of: {', '.join(MODEL_CHOICES)}.")
    model_dir = Path(model_dir or default_model_dir())
    files = released_files(name, model_dir)
    ensure_files(files, model_dir, download)
    model = load_model(files["refiner"], files["tokenizer"], dtype=dtype, device=device)
    encoder = None
    if "text_encoder" in files and text_encoder:
        umt5 = load_umt5(files["text_encoder"], dtype=dtype, device=device)
        encoder = UMT5PromptEncoder(umt5, str(files["text_tokenizer"]))
    return model, encoder, SHORT_NAMES[name].task
