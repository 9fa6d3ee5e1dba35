"""The recipe's stages as one call each: files in, files out, a JSON summary merged into ``OUT/training.json``.

    tokenizer   train the tokenizer, fit the latent -> RGB preview      -> OUT/tokenizer.safetensors
    refiner     encode the data set (cached), train the refiner,
                calibrate the adaptive step rule                          -> OUT/refiner.safetensors
    calibrate   re-run only the calibration of an existing OUT            -> OUT/refiner.safetensors (metadata)
    all         tokenizer, then refiner
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint_files import read_checkpoint
from ..checkpoints import load_refiner
from ..data.shapes import video_captions
from ..pipeline import GRNModel
from ..sampler import LatentRGBProjection
from ..text.hashed import HashedTextEncoder
from .calibrate import calibrate_adaptive
from .recipe import TinyRecipe
from .refiner import (REFINER_FILE, cached_encoded_dataset, refiner_metadata, save_refiner, train_refiner,
                      weights_fingerprint)
from .tokenizer import (TOKENIZER_FILE, fit_preview, load_trained_tokenizer, preview_metadata, save_tokenizer,
                        train_tokenizer)

log = logging.getLogger("grn_core.train")

SUMMARY_FILE = "training.json"
CALIBRATION_SEEDS = (1000, 1001, 1002)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "grn_core" / "tiny"


def _environment() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def _update_summary(out_dir: Path, stage: str, payload: dict) -> None:
    path = Path(out_dir) / SUMMARY_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[stage] = payload
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def run_tokenizer(recipe: TinyRecipe, out_dir: Path, seed: int) -> dict:
    """Stage 1: train and save the tokenizer (the preview projection goes into its metadata)."""
    started = time.perf_counter()
    tok, summary = train_tokenizer(recipe, seed)
    projection, preview_stats = fit_preview(tok, recipe, seed)
    save_tokenizer(tok, out_dir, seed, extra={"grn.preview": preview_metadata(projection)})
    log.info("tokenizer: %.0f s, final %s; preview fit rmse %.4f on %d cells -> %s", time.perf_counter() - started,
             summary["final"], preview_stats["rmse"], preview_stats["cells"], Path(out_dir) / TOKENIZER_FILE)
    payload = {"seed": seed, "seconds": round(time.perf_counter() - started, 1), "train": summary,
               "preview": preview_stats, "config": recipe.tokenizer.to_dict(), "environment": _environment()}
    _update_summary(out_dir, "tokenizer", payload)
    return payload


def _calibration_prompts() -> list[str]:
    # Every caption of the grammar once, with seeds the benchmark does not use.
    return video_captions()


def _model(refiner, tokenizer, encoder, preview) -> GRNModel:
    model = GRNModel(refiner, tokenizer, ("t2v",), name="tiny", text_encoder=encoder, preview=preview)
    return model


def run_refiner(recipe: TinyRecipe, out_dir: Path, seed: int, cache_dir: Optional[Path],
                calibrate: bool = True) -> dict:
    """Stage 2: train the refiner on the saved tokenizer's bits, calibrate adaptive steps, save the refiner."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    tok = load_trained_tokenizer(out_dir)
    if tok.config.to_dict() != recipe.tokenizer.to_dict():
        raise ValueError(f"{out_dir / TOKENIZER_FILE} has config {tok.config.to_dict()} but the recipe expects "
                         f"{recipe.tokenizer.to_dict()}; retrain the tokenizer or pass the matching recipe.")
    tok_meta = read_checkpoint(out_dir / TOKENIZER_FILE).metadata
    tok_fingerprint = weights_fingerprint(out_dir / TOKENIZER_FILE)
    preview_json = tok_meta.get("grn.preview")
    encoder = HashedTextEncoder(dim=recipe.text_dim)
    t0 = time.perf_counter()
    data = cached_encoded_dataset(tok, tok_fingerprint, recipe, seed, cache_dir)
    encode_seconds = round(time.perf_counter() - t0, 1)
    refiner, summary = train_refiner(recipe, seed, data, encoder)
    payload: dict = {"seed": seed, "encode_seconds": encode_seconds, "train": summary,
                     "config": recipe.refiner.to_dict(), "environment": _environment()}
    adaptive = None
    if calibrate:
        preview = LatentRGBProjection.from_dict(json.loads(preview_json)) if preview_json else None
        calibration = calibrate_adaptive(_model(refiner, tok, encoder, preview), _calibration_prompts(),
                                         CALIBRATION_SEEDS, recipe.frames, recipe.height, recipe.width)
        adaptive = calibration["rule"]
        payload["calibration"] = calibration
        log.info("calibration: rule %s, mean %.1f steps; accuracy by remaining steps %s; groups %s (%.0f s)",
                 adaptive, calibration["mean_total_steps"], calibration["score_by_remaining"],
                 calibration["fit"]["groups"], calibration["seconds"])
    _check_partner(out_dir, tok_fingerprint)
    meta = refiner_metadata(refiner, seed, encoder, recipe, preview_json, adaptive, tok_fingerprint)
    save_refiner(refiner, out_dir, meta)
    payload["seconds"] = round(time.perf_counter() - started, 1)
    log.info("refiner: %.0f s, final %s -> %s", payload["seconds"], summary["final"], out_dir / REFINER_FILE)
    _update_summary(out_dir, "refiner", payload)
    return payload


def _check_partner(out_dir: Path, expected_sha: str) -> None:
    if weights_fingerprint(out_dir / TOKENIZER_FILE) != expected_sha:
        raise ValueError(f"{out_dir / TOKENIZER_FILE} is not the tokenizer the refiner was trained with (the file "
                         f"changed while the stage ran); retrain the refiner, or restore that tokenizer.")


def run_calibration(out_dir: Path) -> dict:
    """Re-calibrate an existing model directory and rewrite the refiner's metadata."""
    out_dir = Path(out_dir)
    raw = read_checkpoint(out_dir / REFINER_FILE)
    meta = dict(raw.metadata)
    tok_fingerprint = weights_fingerprint(out_dir / TOKENIZER_FILE)
    if meta.get("grn.tokenizer_fingerprint", tok_fingerprint) != tok_fingerprint:
        raise ValueError(f"{out_dir / TOKENIZER_FILE} is not the tokenizer {out_dir / REFINER_FILE} was trained "
                         f"with (its weights differ from the refiner's grn.tokenizer_fingerprint).")
    recipe_data = json.loads(meta["grn.recipe"])
    seed = int(recipe_data.pop("seed"))
    recipe = TinyRecipe.from_dict(recipe_data)
    refiner = load_refiner(out_dir / REFINER_FILE, dtype=torch.float32)
    tok = load_trained_tokenizer(out_dir)
    encoder = HashedTextEncoder.from_config(json.loads(meta["grn.text_encoder"]))
    preview = LatentRGBProjection.from_dict(json.loads(meta["grn.preview"])) if "grn.preview" in meta else None
    calibration = calibrate_adaptive(_model(refiner, tok, encoder, preview), _calibration_prompts(),
                                     CALIBRATION_SEEDS, recipe.frames, recipe.height, recipe.width)
    save_refiner(refiner, out_dir, refiner_metadata(refiner, seed, encoder, recipe, meta.get("grn.preview"),
                                                    calibration["rule"], tok_fingerprint))
    log.info("calibration: rule %s fit %s", calibration["rule"], calibration["fit"])
    summary_path = out_dir / SUMMARY_FILE
    data = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    data.setdefault("refiner", {})["calibration"] = calibration
    summary_path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return calibration


def run_all(recipe: TinyRecipe, out_dir: Path, seed: int, cache_dir: Optional[Path]) -> dict:
    started = time.perf_counter()
    tokenizer = run_tokenizer(recipe, out_dir, seed)
    refiner = run_refiner(recipe, out_dir, seed, cache_dir)
    total = round(time.perf_counter() - started, 1)
    _update_summary(out_dir, "total_seconds", total)
    log.info("all stages: %.0f s", total)
    return {"tokenizer": tokenizer, "refiner": refiner, "total_seconds": total}
