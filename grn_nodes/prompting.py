"""Encode Prompt: prompt and negative prompt → ``GRN_CONDITIONING`` (features for every task of the model).

Text features come from a ComfyUI ``CLIP`` (CLIPLoader type ``wan``: umt5-xxl, tokenized as the official pipeline
does), from GRN's own umt5 file, or the model's built-in encoder (the tiny model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grn_core.pipeline import PromptFeatures, encode_prompt
from grn_core.request import negative_prompt
from grn_core.text.cleaning import clean_prompt

from .errors import ENCODE_PROMPT, SAMPLER, GRNNodeError, errors_from
from .loading import LoadedGRN

TASK_CHOICES = ("auto", "t2i", "t2v", "i2v")
UMT5_WIDTH = 4096
UMT5_MAX_TOKENS = 512  # 511 tokens + EOS, as the official pipeline truncates
UMT5_EOS = 1


@dataclass
class GRNConditioning:
    """What travels on a ``GRN_CONDITIONING`` socket: features per task (the sampler picks I2V when given a frame)."""

    features: dict[str, PromptFeatures]
    default_task: str
    source: str = ""

    def for_task(self, task: str) -> PromptFeatures:
        if task not in self.features:
            raise GRNNodeError(
                f"{SAMPLER}: the conditioning was encoded for {', '.join(t.upper() for t in self.features)} only, "
                f"not {task.upper()}; set Encode Prompt's task to 'auto' or '{task}'.")
        return self.features[task]


class ClipPromptEncoder:
    """GRN text features from a ComfyUI ``CLIP`` loaded by CLIPLoader (type ``wan``, umt5-xxl).

    Same cleaning and tokenization as the official pipeline: no weight syntax, no padding, 511 tokens + EOS.
    """

    def __init__(self, clip: Any):
        self.clip = clip

    def tokenize(self, text: str) -> dict:
        tokens = self.clip.tokenize(text, disable_weights=True, tokenizer_options={"umt5xxl_min_length": 1})
        if not isinstance(tokens, dict) or "umt5xxl" not in tokens:
            kinds = ", ".join(sorted(tokens)) if isinstance(tokens, dict) else type(tokens).__name__
            raise GRNNodeError(
                f"{ENCODE_PROMPT}: the CLIP input is not umt5-xxl (it tokenizes for {kinds}). Load "
                "umt5_xxl_fp16.safetensors or umt5_xxl_fp8_e4m3fn_scaled.safetensors with CLIPLoader, type 'wan'.")
        batches = tokens["umt5xxl"]
        flat = [pair for batch in batches for pair in batch]
        ids = [pair for pair in flat if int(pair[0]) != UMT5_EOS and int(pair[0]) != 0]
        ids = ids[: UMT5_MAX_TOKENS - 1] + [(UMT5_EOS, 1.0)]
        return {"umt5xxl": [ids]}

    def encode(self, prompt: str, allow_empty: bool = False) -> torch.Tensor:
        text = clean_prompt(prompt)
        if not text and not allow_empty:
            raise GRNNodeError(f"{ENCODE_PROMPT}: the prompt is empty after cleaning; write a prompt.")
        out = self.clip.encode_from_tokens(self.tokenize(text), return_dict=True)
        cond = out["cond"][0]
        if cond.shape[-1] != UMT5_WIDTH:
            raise GRNNodeError(f"{ENCODE_PROMPT}: the CLIP input gives {cond.shape[-1]}-wide features, umt5-xxl gives "
                               f"{UMT5_WIDTH}; load a umt5-xxl file with CLIPLoader type 'wan'.")
        return cond.float()


_UMT5_CACHE: dict[tuple, Any] = {}  # one umt5 file kept loaded between runs


def umt5_tokenizer_json(umt5_path: Path) -> Path:
    """Where the umt5 ``tokenizer.json`` for GRN's own umt5 file must be (next to it, as its stem or in umt5-xxl/)."""
    folder = umt5_path.parent
    for candidate in (folder / f"{umt5_path.stem}.tokenizer.json", folder / "umt5-xxl" / "tokenizer.json",
                      folder / "google" / "umt5-xxl" / "tokenizer.json", folder / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    raise GRNNodeError(
        f"{ENCODE_PROMPT}: {umt5_path.name} needs the umt5-xxl tokenizer: put google/umt5-xxl's tokenizer.json at "
        f"{folder / 'umt5-xxl' / 'tokenizer.json'}, or connect a CLIP input from CLIPLoader (type 'wan') instead.")


def umt5_file_encoder(umt5_path: Path, dtype: Any = None, device: Any = "cpu") -> Any:
    """GRN's own umt5 file + tokenizer.json -> a prompt encoder (one kept in memory at a time)."""
    from grn_core.checkpoints import load_umt5
    from grn_core.text import UMT5PromptEncoder

    key = (str(umt5_path), umt5_path.stat().st_mtime, str(dtype), str(device))
    if key not in _UMT5_CACHE:
        _UMT5_CACHE.clear()
        with errors_from(ENCODE_PROMPT):
            encoder = load_umt5(umt5_path, dtype=dtype, device=device)
            _UMT5_CACHE[key] = UMT5PromptEncoder(encoder, umt5_tokenizer_json(umt5_path))
    return _UMT5_CACHE[key]


def encode_prompt_for(loaded: LoadedGRN, encoder: Any, prompt: str, negative: str = "", task: str = "auto",
                      add_task_tag: bool = True, source: str = "", default_negative: bool = True) -> GRNConditioning:
    """Features for every task of the model (``auto``) or for one task; the task tag is added unless switched off.

    An empty ``negative`` with ``default_negative`` takes the library's default for each task and model
    (:func:`grn_core.request.negative_prompt`: the official demo's list for T2V/I2V, none for T2I), as the CLI does
    without ``--negative``; otherwise ``negative`` is used as written (empty: none).
    """
    model = loaded.model
    if model.is_c2i:
        raise GRNNodeError(f"{ENCODE_PROMPT}: {loaded.refiner_name} is a class-to-image model and takes no prompt; "
                           "set the class index on GRN Refine Sampler and leave its conditioning unconnected.")
    if task not in TASK_CHOICES:
        raise GRNNodeError(f"{ENCODE_PROMPT}: task '{task}' is not one of {', '.join(TASK_CHOICES)}.")
    if encoder is None and model.text_encoder is None:
        raise GRNNodeError(
            f"{ENCODE_PROMPT}: {loaded.refiner_name} needs a umt5-xxl text encoder: connect a CLIP from CLIPLoader "
            "(type 'wan', umt5_xxl_fp16.safetensors) or pick models_t5_umt5-xxl-enc-bf16.pth in umt5_file.")
    if task == "auto":
        tasks = [t for t in model.tasks if t != "c2i"]
    else:
        if task not in model.tasks and not (task == "i2v" and model.layout == "joint"):
            raise GRNNodeError(f"{ENCODE_PROMPT}: {loaded.refiner_name} does not do {task.upper()} (it does "
                               f"{', '.join(t.upper() for t in model.tasks)}); set task to 'auto'.")
        tasks = [task]
    features = {}
    with errors_from(ENCODE_PROMPT):
        for t in tasks:
            chosen = negative_prompt(model, t, None if (default_negative and not negative.strip()) else negative)
            features[t] = encode_prompt(model, encoder, prompt, chosen, task=t, add_task_tag=add_task_tag)
    return GRNConditioning(features, tasks[0], source)
