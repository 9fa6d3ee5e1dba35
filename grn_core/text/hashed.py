"""A download-free, deterministic text encoder for the tiny offline GRN.

It stands in for the umt5-xxl prompt encoder with the same shape contract: ``encode(prompt) -> [L, dim]``
with one row per word plus a closing EOS row (so an empty negative prompt gives a single row, as umt5's
trimmed features do), truncated to ``max_tokens`` rows in all.

Row i = word_vector(word_i) + POSITION_WEIGHT * position_code(i), EOS row = word_vector(EOS_KEY) +
POSITION_WEIGHT * position_code(n).

- Words: NFKC-normalised, lower-cased, runs of letters/digits (apostrophes inside a word are kept; all other
  punctuation separates words and is dropped). "A red, CIRCLE!" -> ["a", "red", "circle"].
- word_vector: a fixed unit vector per word. Its entries come from SHAKE-256 of the UTF-8 word (integer
  hashing, never Python's per-process salted ``hash``), mapped to uniforms in (-1, 1) and scaled to unit length
  with correctly rounded float64 operations (``math.fsum``), so the vectors are bit-identical in every
  process, on every machine and numpy/torch version. Unknown words need no vocabulary: any word has a vector.
- position_code: the fixed sinusoidal code (sin on even, cos on odd channels, periods up to 10000) scaled to
  unit length, computed with ``math.sin``/``math.cos``.

Changing any of this changes the features a trained model saw: bump ``VERSION`` then, and keep the old
behaviour reachable through ``from_config`` if a released checkpoint depends on it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import unicodedata

import numpy as np
import torch

VERSION = 1
EOS_KEY = "<eos>"  # contains '<', so no tokenised word can collide with it
POSITION_WEIGHT = 0.5
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(prompt: str) -> list[str]:
    """Lower-case words of a prompt, punctuation stripped."""
    return _WORD.findall(unicodedata.normalize("NFKC", prompt).lower())


class HashedTextEncoder:
    """Deterministic bag-of-hashed-words encoder with position codes; see the module docstring.

    dim: feature width (the refiner's ``text_proj`` input size). max_tokens: most rows returned, EOS included
    (umt5 uses 512). allow_empty: the default for ``encode`` calls that do not say: whether a prompt with no
    words is accepted (it encodes to the EOS row alone, the usual empty negative prompt) or a ValueError.
    ``encode(prompt, allow_empty=...)`` matches the umt5 prompt encoder's call, so the pipeline can use either.
    """

    def __init__(self, dim: int = 64, max_tokens: int = 512, allow_empty: bool = True):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim={dim!r}; use a positive int (the refiner's text channel count)")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r}; use a positive int (rows returned, EOS included)")
        self.dim = dim
        self.max_tokens = max_tokens
        self.allow_empty = bool(allow_empty)

    @property
    def config(self) -> dict:
        """JSON-serialisable description, stored in checkpoint metadata next to the model trained with it."""
        return {"type": "hashed", "version": VERSION, "dim": self.dim, "max_tokens": self.max_tokens,
                "allow_empty": self.allow_empty}

    @classmethod
    def from_config(cls, config: dict) -> "HashedTextEncoder":
        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict like HashedTextEncoder().config, got {type(config).__name__}")
        if config.get("type", "hashed") != "hashed":
            raise ValueError(f"config type {config.get('type')!r} is not a hashed text encoder config")
        version = config.get("version", VERSION)
        if version != VERSION:
            raise ValueError(f"hashed text encoder version {version!r} is not supported by this code "
                             f"(it implements version {VERSION}); update ComfyUI-GRN")
        if "dim" not in config:
            raise ValueError("config lacks 'dim'; it needs at least {'dim': ...}")
        return cls(dim=config["dim"], max_tokens=config.get("max_tokens", 512),
                   allow_empty=config.get("allow_empty", True))

    def tokenize(self, prompt: str, allow_empty: bool | None = None) -> list[str]:
        """The words that get rows (truncated to max_tokens - 1, leaving room for EOS).

        allow_empty: as in ``encode``.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
        words = tokenize(prompt)
        if not words and not (self.allow_empty if allow_empty is None else allow_empty):
            raise ValueError(f"prompt {prompt!r} has no words; write a prompt (for a negative prompt pass "
                             f"allow_empty=True: it then encodes to the EOS row alone)")
        return words[: self.max_tokens - 1]

    def encode(self, prompt: str, allow_empty: bool | None = None, *, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Prompt -> features [min(words, max_tokens - 1) + 1, dim] (the last row is EOS).

        allow_empty: whether a prompt without words is accepted (-> the EOS row alone) or a ValueError, as in
        ``UMT5PromptEncoder.encode(prompt, allow_empty)``; None uses the encoder's ``allow_empty`` setting.
        """
        keys = self.tokenize(prompt, allow_empty) + [EOS_KEY]
        rows = np.stack([_word_vector(k, self.dim) for k in keys])
        rows = rows + POSITION_WEIGHT * _position_codes(len(keys), self.dim)
        return torch.from_numpy(rows).to(device=device, dtype=dtype)

    __call__ = encode

    def __repr__(self) -> str:
        return f"HashedTextEncoder(dim={self.dim}, max_tokens={self.max_tokens}, allow_empty={self.allow_empty})"


@functools.lru_cache(maxsize=4096)
def _word_vector(word: str, dim: int) -> np.ndarray:
    """Fixed unit vector, float64 [dim], from SHAKE-256 of the word (4 bytes per channel)."""
    digest = hashlib.shake_256(f"grn-hashed-text-v{VERSION}\x00{word}".encode("utf-8")).digest(4 * dim)
    ints = np.frombuffer(digest, dtype="<u4").astype(np.float64)
    v = (ints + 0.5) / 2.0**31 - 1.0  # uniform in (-1, 1); exact in float64
    v = v / math.sqrt(math.fsum(v * v))  # elementwise IEEE ops and an exactly rounded sum: same bits everywhere
    v.setflags(write=False)
    return v


def _position_codes(length: int, dim: int) -> np.ndarray:
    """Sinusoidal position code, float64 [length, dim], each row of unit length."""
    table_len = 16
    while table_len < length:
        table_len *= 2
    return _position_table(table_len, dim)[:length]


@functools.lru_cache(maxsize=16)
def _position_table(length: int, dim: int) -> np.ndarray:
    # math.sin / math.cos on scalars rather than numpy's vectorised kernels, whose last bits may differ
    # between CPUs; the table is cached, so the Python loop runs once per (length, dim).
    codes = np.empty((length, dim), dtype=np.float64)
    for j in range(dim):
        rate = 10000.0 ** (-(j - j % 2) / dim)
        trig = math.sin if j % 2 == 0 else math.cos
        codes[:, j] = [trig(pos * rate) for pos in range(length)]
    for pos in range(length):
        norm = math.sqrt(math.fsum(codes[pos] * codes[pos]))
        if norm > 0:  # only dim == 1 at position 0 has norm 0
            codes[pos] /= norm
    codes.setflags(write=False)
    return codes
