"""Named models: the built-in ``tiny`` model and short names for the released files (``t2v-2b``, ``c2i-b`` …).

A short name resolves to files inside a model folder (``--model-dir``, env ``GRN_MODEL_DIR``, default ``models/grn``);
missing files are fetched from the Hugging Face repo only when the caller allows it, otherwise the error lists every
file and where it goes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from .releases import HF_REPO, SHORT_NAMES, UMT5_TOKENIZER, UMT5_WEIGHTS

TINY_DIR = Path(__file__).parent / "assets" / "tiny"
MODEL_CHOICES = ("tiny", *SHORT_NAMES)


def default_model_dir() -> Path:
    return Path(os.environ.get("GRN_MODEL_DIR", "models/grn"))


def tiny_available() -> bool:
    return (TINY_DIR / "refiner.safetensors").is_file() and (TINY_DIR / "tokenizer.safetensors").is_file()


def load_tiny(device: Any = "cpu", dtype: Any = None, offload: Any = "auto", attention: str = "auto"):
    """The built-in tiny text-to-video model: refiner, tokenizer and its download-free text encoder, with what its
    file says about it (live-preview projection, native size, calibrated adaptive-step rule). ``device``, ``dtype``,
    ``offload`` and ``attention`` as for :func:`grn_core.pipeline.load_model`."""
    from .checkpoint_files import read_checkpoint
    from .pipeline import load_model
    from .sampler import AdaptiveSteps, LatentRGBProjection
    from .text.hashed import HashedTextEncoder

    if not tiny_available():
        raise ValueError(
            f"the built-in tiny model is not in this copy of the library (expected {TINY_DIR}/refiner.safetensors "
            "and tokenizer.safetensors). It is produced by `python -m grn_core.train`; until then use --model PATH "
            "with released files."
        )
    model = load_model(TINY_DIR / "refiner.safetensors", TINY_DIR / "tokenizer.safetensors", dtype=dtype, device=device,
                       offload=offload, attention=attention)
    meta = read_checkpoint(TINY_DIR / "refiner.safetensors").metadata
    model.text_encoder = HashedTextEncoder.from_config(json.loads(meta["grn.text_encoder"]))
    if "grn.preview" in meta:
        model.preview = LatentRGBProjection.from_dict(json.loads(meta["grn.preview"]))
    if "grn.defaults" in meta:
        model.defaults = json.loads(meta["grn.defaults"])
    # Trained with the empty prompt as the unconditional branch (cond dropout), never with the demos' negative list.
    model.defaults.setdefault("negative", "")
    if "grn.adaptive" in meta:
        model.adaptive = AdaptiveSteps(**json.loads(meta["grn.adaptive"]))
    model.name = "tiny"
    return model


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
               dtype: Any = None):
    """Load a model by short name → (GRNModel, text encoder or None, default task)."""
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
    if "text_encoder" in files:
        umt5 = load_umt5(files["text_encoder"], dtype=dtype, device=device)
        encoder = UMT5PromptEncoder(umt5, str(files["text_tokenizer"]))
    return model, encoder, SHORT_NAMES[name].task
