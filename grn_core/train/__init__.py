"""Training recipe of the built-in tiny GRN (procedural shape clips, download-free text encoder).

    python -m grn_core.train all --out grn_core/assets/tiny --seed 0

Stages: :func:`run_tokenizer` (HBQ tokenizer with straight-through quantization), :func:`run_refiner` (official
GRN objective on cached tokenizer bits, then adaptive-step calibration). Sizes live in :class:`TinyRecipe`.
"""

from .recipe import TinyRecipe
from .refiner import bit_loss, corrupt_bits, train_refiner, training_logits
from .stages import run_all, run_calibration, run_refiner, run_tokenizer
from .tokenizer import quantize_straight_through, reconstruction_loss, train_tokenizer

__all__ = [
    "TinyRecipe", "bit_loss", "corrupt_bits", "quantize_straight_through", "reconstruction_loss", "run_all",
    "run_calibration", "run_refiner", "run_tokenizer", "train_refiner", "train_tokenizer", "training_logits",
]
