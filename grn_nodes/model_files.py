"""Where GRN model files live in a ComfyUI install, how the loader lists them, and what to do when one is missing.

ComfyUI's ``folder_paths`` module is passed in as an argument (never imported here), so this module runs in tests
without ComfyUI. Files of the released models are always offered in the loader's lists, present or not: a shared
workflow then loads without a "value not in list" error, and picking a missing file says exactly what to download
and where to put it (or downloads it, when the user allows that).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

from grn_core.models import TINY_DIR, tiny_available
from grn_core.releases import BY_NAME, HF_REPO, OFFERED, released

GRN_FOLDER = "grn"  # ComfyUI/models/grn
SHARED_FOLDERS = ("diffusion_models",)  # also searched for refiner files
TEXT_ENCODER_FOLDERS = (GRN_FOLDER, "text_encoders")
MODEL_EXTENSIONS = frozenset({".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin", ".gguf"})
GGUF_EXTENSION = ".gguf"  # quantised refiners (`python -m grn_core convert SRC OUT.gguf --dtype q8_0`): refiners only
TINY = "tiny"
AUTO = "auto"
NONE = "none"
# The files offered in the loader's lists before they are downloaded: the release catalogue's (grn_core.releases).
RELEASED_FILES = tuple(BY_NAME[name] for name in OFFERED)


# Tokenizer file names by latent channels, best first (glob-like patterns on the file name).
TOKENIZER_PATTERNS = {
    64: (r"HBQ_image_video_tokenizer_64dim_M4_\d+\.(ckpt|safetensors)$", r"HBQ_tokenizer_64dim_M4\.(ckpt|safetensors)$",
         r"(?i).*tokenizer.*64.*\.safetensors$"),
    16: (r"HBQ_image_tokenizer_16dim_M4\.(ckpt|safetensors)$", r"(?i).*tokenizer.*16.*\.safetensors$"),
}


def register_model_folder(folder_paths: Any) -> list[str]:
    """Add ``models/grn`` to ComfyUI's folder table, keeping paths and extensions a user configured already
    (``extra_model_paths.yaml`` may have registered ``grn`` before this pack loads). Returns the folder's paths."""
    default = os.path.join(folder_paths.models_dir, GRN_FOLDER)
    paths, extensions = folder_paths.folder_names_and_paths.get(GRN_FOLDER, ([], set()))
    paths = list(paths)
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[GRN_FOLDER] = (paths, set(extensions) | set(MODEL_EXTENSIONS))
    return paths


def _listed(folder_paths: Any, folder: str) -> list[str]:
    try:
        names = folder_paths.get_filename_list(folder)
    except KeyError:  # a folder name this ComfyUI does not know
        return []
    return [n for n in names if Path(n).suffix.lower() in MODEL_EXTENSIONS]


def _unique(names: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for name in names:
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def refiner_choices(folder_paths: Any) -> list[str]:
    """``tiny``, the local files of ``models/grn`` and ``models/diffusion_models``, then the released names."""
    local = _listed(folder_paths, GRN_FOLDER) + [n for f in SHARED_FOLDERS for n in _listed(folder_paths, f)]
    local = [n for n in local if _guess_kind(n) in ("refiner", "c2i", None)]
    released = [f.name for f in RELEASED_FILES if f.kind in ("refiner", "c2i")]
    return _unique([TINY] + sorted(local) + released)


def tokenizer_choices(folder_paths: Any) -> list[str]:
    local = [n for n in _listed(folder_paths, GRN_FOLDER) if _guess_kind(n) in ("tokenizer", None)]
    released = [f.name for f in RELEASED_FILES if f.kind == "tokenizer"]
    return _unique([AUTO] + sorted(local) + released)


def umt5_choices(folder_paths: Any) -> list[str]:
    local = [n for f in TEXT_ENCODER_FOLDERS for n in _listed(folder_paths, f) if _guess_kind(n) in ("umt5", None)]
    return _unique([NONE] + sorted(local) + [f.name for f in RELEASED_FILES if f.kind == "umt5"])


def _guess_kind(name: str) -> Optional[str]:
    """Kind of a file from its name alone (None: cannot tell, so it is offered everywhere it may fit)."""
    base = Path(name).name
    entry = released(base)
    if entry is not None:
        return entry.kind
    low = base.lower()
    if low.endswith(GGUF_EXTENSION):  # GRN writes GGUF files of refiners only: never offered as tokenizer or umt5
        return "c2i" if low.startswith("grn_ind") else "refiner"
    if low.startswith("hbq_") or "tokenizer" in low:
        return "tokenizer"
    if "umt5" in low or low.startswith("models_t5"):
        return "umt5"
    if low.startswith("grn_ind"):
        return "c2i"
    if low.startswith("grn_"):
        return "refiner"
    return None


def missing_file_message(name: str, folder_paths: Any = None, node: str = "Load GRN",
                         folders: Iterable[str] = (GRN_FOLDER,)) -> str:
    """What to download and where to put it, for a file that is in none of ``folders``."""
    where = _grn_dirs(folder_paths)
    home = where[0] if where else "ComfyUI/models/grn"
    searched = ", ".join(f"models/{f}" for f in folders)
    lines = [f"{node}: the file '{name}' is not in {searched}."]
    if released(name) is not None:
        lines.append(f"Download it from the Hugging Face repository {HF_REPO} and put it in {home}/"
                     + (", or switch on 'download_missing' (needs the huggingface_hub package)." if node == "Load GRN"
                        else "."))
    else:
        lines.append(f"Put the file into {searched.split(', ')[0]}/ and press R to refresh the lists.")
    lines.append("GRN files: " + "; ".join(f"{f.name} ({f.note or f.kind}) -> models/grn/" for f in RELEASED_FILES))
    return " ".join(lines)


def _grn_dirs(folder_paths: Any) -> list[str]:
    if folder_paths is None:
        return []
    try:
        return list(folder_paths.get_folder_paths(GRN_FOLDER))
    except KeyError:
        return []


def resolve_file(folder_paths: Any, name: str, folders: Iterable[str], download: bool = False,
                 node: str = "Load GRN") -> Path:
    """Full path of ``name`` in the first of ``folders`` that holds it; downloads released files when allowed."""
    for folder in folders:
        try:
            full = folder_paths.get_full_path(folder, name)
        except KeyError:
            full = None
        if full and os.path.isfile(full):
            return Path(full)
    if download and released(name) is not None:
        dirs = _grn_dirs(folder_paths)
        if not dirs:
            raise ValueError(f"{node}: no models/grn folder is registered; cannot download '{name}'.")
        return download_released(name, Path(dirs[0]), node=node)
    raise FileNotFoundError(missing_file_message(name, folder_paths, node, tuple(folders)))


def download_released(name: str, target_dir: Path, node: str = "Load GRN") -> Path:
    """Fetch one released file from the GRN Hugging Face repository into ``target_dir`` (opt-in only)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as error:
        raise ValueError(f"{node}: 'download_missing' needs the huggingface_hub package (pip install huggingface_hub), "
                         f"or download {name} from {HF_REPO} into {target_dir}/ by hand.") from error
    target_dir.mkdir(parents=True, exist_ok=True)
    path = hf_hub_download(repo_id=HF_REPO, filename=name, local_dir=str(target_dir))
    return Path(path)


def pick_tokenizer(latent_channels: int, candidates: Iterable[str]) -> Optional[str]:
    """The best tokenizer file name for a refiner working on ``latent_channels``-channel latents, or None."""
    names = sorted(set(candidates), reverse=True)  # newest dated release first
    for pattern in TOKENIZER_PATTERNS.get(int(latent_channels), ()):
        for name in names:
            if re.match(pattern, Path(name).name):
                return name
    return None


# ---- the built-in tiny model ----------------------------------------------------------------------------------------

def tiny_missing_message(node: str = "Load GRN") -> str:
    return (f"{node}: the built-in 'tiny' model is not part of this install yet ({TINY_DIR} has no "
            "refiner.safetensors / tokenizer.safetensors). Update ComfyUI-GRN, or pick a released refiner file "
            "from models/grn.")
