"""The release catalogue: every file ByteDance published for GRN, once, and what its name alone tells.

A leaf module (no import from the rest of ``grn_core``), so checkpoint IO, the pipeline, the command line and the
ComfyUI loader all read the same table:

* ``RELEASED_FILES`` — name, kind, attention layout, tasks, latent channels, the tokenizer it was trained with;
* ``SHORT_NAMES`` — the command line's short model names (``t2v-2b`` …) → refiner file and task;
* ``tokenizer_for_channels`` / ``does_i2v`` — the pairing rules.

The files live in the Hugging Face repository ``HF_REPO``; the umt5-xxl tokenizer is the folder ``umt5-xxl/``
there. The spec (shared/docs/GRN_SPEC.md §2, §3, §5) lists the same names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

HF_REPO = "bytedance-research/GRN"

TOKENIZER_64 = "HBQ_image_video_tokenizer_64dim_M4_20260626.ckpt"  # the current T2I/T2V/I2V tokenizer
TOKENIZER_16 = "HBQ_image_tokenizer_16dim_M4.ckpt"  # class-to-image (ImageNet 256)
UMT5_WEIGHTS = "models_t5_umt5-xxl-enc-bf16.pth"
UMT5_TOKENIZER = "umt5-xxl/tokenizer.json"


@dataclass(frozen=True)
class ReleasedFile:
    """One published file.

    kind: ``refiner`` (T2I/T2V/I2V bit model), ``c2i``, ``tokenizer`` or ``umt5``.
    layout: the refiner's attention layout (``joint``: bytedance/GRN; ``prefix``: the first MGenAI files).
    tasks: what the file was released for; a joint refiner without ``i2v`` can still be asked for it (the official
        code allows it) but was not trained for it.
    latent_channels: refiners: channels of the tokenizer they need; tokenizers: their own.
    tokenizer: the tokenizer file the refiner was trained with.
    overrides: config values the tensors cannot tell (C2I: where the in-context class tokens start).
    note: a few words for menus and messages.
    """

    name: str
    kind: str
    layout: Optional[str] = None
    tasks: tuple[str, ...] = ()
    latent_channels: int = 0
    tokenizer: Optional[str] = None
    overrides: tuple[tuple[str, object], ...] = ()
    note: str = ""


RELEASED_FILES: tuple[ReleasedFile, ...] = (
    ReleasedFile("GRN_T2I_2B_FSA_251600.pth", "refiner", "joint", ("t2i",), 64, TOKENIZER_64,
                 note="2B text-to-image"),
    ReleasedFile("GRN_T2V_2B_FSA_sft147400_ema.pth", "refiner", "joint", ("t2v",), 64, TOKENIZER_64,
                 note="2B text-to-video"),
    ReleasedFile("GRN_T2V_TITAN_FSA_sft10600_ema.pth", "refiner", "joint", ("t2v", "i2v"), 64, TOKENIZER_64,
                 note="8B text/image-to-video"),
    ReleasedFile("GRN_T2I_titan_FSA_256x256.pth", "refiner", "joint", ("t2i",), 64, TOKENIZER_64,
                 note="8B text-to-image"),
    ReleasedFile("GRN_T2I_2B.pth", "refiner", "prefix", ("t2i",), 64, TOKENIZER_64,
                 note="first 2B text-to-image release (prefix layout)"),
    ReleasedFile("GRN_T2V_2B.pth", "refiner", "prefix", ("t2v",), 64, TOKENIZER_64,
                 note="first 2B text-to-video release (prefix layout)"),
    ReleasedFile("GRN_ind_B_ep599.pth", "c2i", None, ("c2i",), 16, TOKENIZER_16,
                 overrides=(("in_context_start", 4),), note="class-to-image (ImageNet 256)"),
    ReleasedFile(TOKENIZER_64, "tokenizer", latent_channels=64, note="T2I/T2V/I2V tokenizer"),
    ReleasedFile("HBQ_image_video_tokenizer_64dim_M4_20260618.ckpt", "tokenizer", latent_channels=64,
                 note="earlier T2I/T2V/I2V tokenizer"),
    ReleasedFile("HBQ_tokenizer_64dim_M4.ckpt", "tokenizer", latent_channels=64, note="first 64-channel tokenizer"),
    ReleasedFile(TOKENIZER_16, "tokenizer", latent_channels=16, note="class-to-image tokenizer"),
    ReleasedFile(UMT5_WEIGHTS, "umt5", note="umt5-xxl text encoder (same file as Wan 2.1/2.2)"),
)
BY_NAME: dict[str, ReleasedFile] = {f.name: f for f in RELEASED_FILES}

# Files offered in menus before they are downloaded (the newest of each kind; older tokenizers are still recognised).
OFFERED = tuple(f.name for f in RELEASED_FILES
                if f.name not in ("HBQ_image_video_tokenizer_64dim_M4_20260618.ckpt", "HBQ_tokenizer_64dim_M4.ckpt"))


@dataclass(frozen=True)
class ShortName:
    """A command-line model name: the refiner file and the task it runs by default."""

    refiner: str
    task: str

    @property
    def file(self) -> ReleasedFile:
        return BY_NAME[self.refiner]


SHORT_NAMES: dict[str, ShortName] = {
    "t2i-2b": ShortName("GRN_T2I_2B_FSA_251600.pth", "t2i"),
    "t2i-8b": ShortName("GRN_T2I_titan_FSA_256x256.pth", "t2i"),
    "t2v-2b": ShortName("GRN_T2V_2B_FSA_sft147400_ema.pth", "t2v"),
    "t2v-8b": ShortName("GRN_T2V_TITAN_FSA_sft10600_ema.pth", "t2v"),
    "i2v-8b": ShortName("GRN_T2V_TITAN_FSA_sft10600_ema.pth", "i2v"),
    "c2i-b": ShortName("GRN_ind_B_ep599.pth", "c2i"),
}
I2V_FILE = "GRN_T2V_TITAN_FSA_sft10600_ema.pth"  # the one file released for image-to-video


def released(name: str) -> Optional[ReleasedFile]:
    """The catalogue entry of a file name (a path's last part), or None for a file we did not publish."""
    return BY_NAME.get(name.replace("\\", "/").rsplit("/", 1)[-1])


def tokenizer_for_channels(latent_channels: int) -> Optional[str]:
    """The current released tokenizer for refiners on ``latent_channels``-channel latents (64 or 16)."""
    return {64: TOKENIZER_64, 16: TOKENIZER_16}.get(int(latent_channels))


def does_i2v(name: str) -> bool:
    """Whether a released refiner was trained for image-to-video (unknown files: not known to be)."""
    entry = released(name)
    return entry is not None and "i2v" in entry.tasks


__all__ = ["HF_REPO", "TOKENIZER_64", "TOKENIZER_16", "UMT5_WEIGHTS", "UMT5_TOKENIZER", "ReleasedFile",
           "RELEASED_FILES", "BY_NAME", "OFFERED", "ShortName", "SHORT_NAMES", "I2V_FILE", "released",
           "tokenizer_for_channels", "does_i2v"]
