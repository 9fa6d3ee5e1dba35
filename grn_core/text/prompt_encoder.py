"""Prompt -> umt5 features, the way the official GRN / Wan pipeline produces them.

    text   = clean_prompt(prompt)
    ids    = tokenizer(text)[:max_length - 1] + [EOS]          (HF: truncation=True, max_length=512, EOS appended)
    hidden = encoder(ids)                                       [n_real, C], n_real = len(ids)

The official pipeline pads to 512 and trims the output to the real length afterwards; padded keys are masked, so
running the real tokens alone gives the same rows (up to summation order) for a fraction of the compute.
An empty negative prompt is legal officially: "" tokenizes to EOS alone and yields one feature row.
"""

from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING, Union

import torch

from grn_core.text.cleaning import clean_prompt
from grn_core.text.umt5 import UMT5Encoder

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["UMT5PromptEncoder"]


class UMT5PromptEncoder:
    """Wraps a ``UMT5Encoder`` and a ``tokenizers.Tokenizer`` (e.g. google/umt5-xxl ``tokenizer.json``).

    ``encode(prompt) -> [n_real, C]`` in the encoder's dtype, on the encoder's device.
    """

    def __init__(
        self,
        encoder: UMT5Encoder,
        tokenizer: Union[str, PathLike, Tokenizer],
        max_length: int = 512,
        eos_token: str = "</s>",
    ):
        # Imported here, not at module level: the tiny model's command line never needs it (0.1 s of start-up).
        from tokenizers import Tokenizer

        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (room for EOS), got {max_length}")
        if isinstance(tokenizer, Tokenizer):
            # Work on a private copy: we switch off any padding/truncation stored in tokenizer.json.
            tokenizer = Tokenizer.from_str(tokenizer.to_str())
        else:
            tokenizer = Tokenizer.from_file(str(tokenizer))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"the tokenizer has no {eos_token!r} token; pass eos_token= the umt5 EOS token")
        if eos_id >= encoder.config.vocab_size:
            raise ValueError(f"EOS id {eos_id} is outside the encoder vocabulary ({encoder.config.vocab_size})")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eos_id = eos_id

    def tokenize(self, prompt: str, allow_empty: bool = False) -> list[int]:
        """Cleaned, truncated token ids ending in EOS (at most ``max_length``)."""
        text = clean_prompt(prompt)
        if not text and not allow_empty:
            raise ValueError(
                f"prompt {prompt!r} is empty after cleaning; write a prompt "
                "(for a negative prompt pass allow_empty=True: '' encodes to EOS alone, as officially)"
            )
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids if text else []
        return ids[: self.max_length - 1] + [self.eos_id]

    @torch.no_grad()
    def encode(self, prompt: str, allow_empty: bool = False) -> torch.Tensor:
        """prompt -> features [n_real, C] (tokens + EOS)."""
        ids = self.tokenize(prompt, allow_empty=allow_empty)
        device = self.encoder.token_embedding.weight.device
        ids_t = torch.tensor([ids], dtype=torch.long, device=device)
        return self.encoder(ids_t)[0]

    __call__ = encode
