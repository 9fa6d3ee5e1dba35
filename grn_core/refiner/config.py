"""Configuration of the T2I/T2V/I2V refiner ("GRN_bit"), its released presets, and config inference from weights."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..presets import LAYOUT_CAPS

__all__ = [
    "KEEP_CAP",
    "LAYOUTS",
    "PRESETS",
    "GRN2b",
    "GRN8b",
    "RefinerConfig",
    "infer_refiner_config",
    "swiglu_hidden",
]

LAYOUTS = ("joint", "prefix")

KEEP_CAP = LAYOUT_CAPS  # the official loop's largest kept fraction per layout (grn_core.presets)


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
    """SwiGLU inner width as the official blocks size it: ``round(width * ratio / 256) * 256``."""
    return int(round(width * mlp_ratio / 256)) * 256


@dataclass
class RefinerConfig:
    """Sizes of a GRN_bit refiner; every field but ``layout`` / ``rounds`` can be read from the weights.

    ``layout`` picks the attention pattern of the checkpoint generation: ``"joint"`` (bytedance/GRN, all current
    files: per guidance branch ``[visual | first frame | text | step token]`` attend to each other) or ``"prefix"``
    (first MGenAI files: text runs once, its per-layer K/V are cached, each step runs ``[visual | step token]``).
    """

    width: int = 2304
    depth: int = 28
    heads: int = 18
    kv_heads: int = 18
    mlp_hidden: int = 8192
    block_chunks: int = 7
    text_channels: int = 4096
    latent_channels: int = 64
    rounds: int = 4
    layout: str = "joint"
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    step_freq_dim: int = 256

    def __post_init__(self) -> None:
        for name in ("width", "depth", "heads", "kv_heads", "mlp_hidden", "block_chunks", "text_channels",
                     "latent_channels", "rounds", "step_freq_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"RefinerConfig.{name}={value!r}: must be a positive integer.")
        if self.layout not in LAYOUTS:
            raise ValueError(f"RefinerConfig.layout={self.layout!r}: use one of {LAYOUTS}.")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}.")
        if (self.width // self.heads) % 2:
            raise ValueError(f"head_dim={self.width // self.heads} is odd; RoPE rotates pairs of channels.")
        if (self.width // self.heads) // 2 < 3:
            raise ValueError(f"head_dim={self.width // self.heads} is too small for 3-D RoPE (needs >= 6).")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads} (grouped-query).")
        if self.depth % self.block_chunks:
            raise ValueError(f"depth={self.depth} is not divisible by block_chunks={self.block_chunks}.")
        if self.step_freq_dim % 2:
            raise ValueError(f"step_freq_dim={self.step_freq_dim} must be even ([cos | sin] halves).")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def bits(self) -> int:
        """Bit-label channels per token: ``rounds * latent_channels``."""
        return self.rounds * self.latent_channels

    @property
    def in_channels(self) -> int:
        """One-hot input width of ``word_embed`` (= logits per token of ``head.proj``): ``bits * 2``."""
        return self.bits * 2

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    @property
    def keep_cap(self) -> float:
        """Kept-fraction cap of this layout's sampling schedule (joint 0.95, prefix 0.999)."""
        return KEEP_CAP[self.layout]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RefinerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"RefinerConfig has no field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**dict(data))


def GRN2b(**overrides: Any) -> RefinerConfig:
    """The 2B refiner (released T2I / T2V 2B files): depth 28, width 2304, 18 heads of 128, SwiGLU 8192."""
    base = dict(width=2304, depth=28, heads=18, kv_heads=18, mlp_hidden=swiglu_hidden(2304, 3.55), block_chunks=7,
                text_channels=4096, latent_channels=64)
    return RefinerConfig(**{**base, **overrides})


def GRN8b(**overrides: Any) -> RefinerConfig:
    """The 8B "TITAN" refiner (T2V/I2V 8B file): depth 36, width 4096, 32 heads of 128, SwiGLU 12288."""
    base = dict(width=4096, depth=36, heads=32, kv_heads=32, mlp_hidden=swiglu_hidden(4096, 3.0), block_chunks=6,
                text_channels=4096, latent_channels=64)
    return RefinerConfig(**{**base, **overrides})


PRESETS = {"GRN2b": GRN2b, "GRN8b": GRN8b}

_BLOCK_KEY = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.")
_REQUIRED = (
    "word_embed.weight",
    "text_proj.weight",
    "head.norm.weight",
    "head.proj.weight",
    "pt_embedder.mlp.0.weight",
    "block_chunks.0.module.0.attn.q_norm.weight",
    "block_chunks.0.module.0.attn.q_proj.weight",
    "block_chunks.0.module.0.attn.k_proj.weight",
    "block_chunks.0.module.0.mlp.gate_proj.weight",
)


def infer_refiner_config(state_dict: Mapping[str, Any], layout: str | None = None, **overrides: Any) -> RefinerConfig:
    """Read a refiner's sizes from tensor shapes alone (no tensor data is touched).

    ``rounds`` (HBQ rounds, 4 in every release) cannot be told apart from ``latent_channels`` by shape — the input
    width is ``rounds * d * 2`` — so it is 4 unless overridden; ``layout`` defaults to ``"joint"`` (keys are identical
    in both generations). Raises ``ValueError`` naming the missing or inconsistent key when the dict is no refiner.
    """
    for key in _REQUIRED:
        if key not in state_dict:
            hint = ""
            if any(k in state_dict for k in ("trainer", "gpt_fsdp", "model", "state_dict", "ema")):
                hint = " It looks like a nested checkpoint: pass the inner state dict (e.g. sd['trainer']['gpt_fsdp'])."
            raise ValueError(f"not a GRN_bit refiner state dict: key '{key}' is missing.{hint}")

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ValueError(f"not a complete GRN_bit refiner state dict: key '{key}' is missing.")
        return tuple(state_dict[key].shape)

    chunks: dict[int, set[int]] = {}
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if match:
            chunks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    n_chunks = len(chunks)
    if sorted(chunks) != list(range(n_chunks)):
        raise ValueError(f"block_chunks indices {sorted(chunks)} are not 0..{n_chunks - 1}.")
    per_chunk = {c: len(blocks) for c, blocks in chunks.items()}
    if len(set(per_chunk.values())) != 1 or any(chunks[c] != set(range(per_chunk[c])) for c in chunks):
        layout = {c: sorted(b) for c, b in chunks.items()}
        raise ValueError(f"block_chunks hold uneven or gapped block indices: {layout}.")
    depth = n_chunks * per_chunk[0]

    width, in_channels = shape("word_embed.weight")
    head_dim = shape("block_chunks.0.module.0.attn.q_norm.weight")[0]
    q_out = shape("block_chunks.0.module.0.attn.q_proj.weight")[0]
    k_out = shape("block_chunks.0.module.0.attn.k_proj.weight")[0]
    if q_out % head_dim or k_out % head_dim:
        raise ValueError(f"attn.q_proj/k_proj widths {q_out}/{k_out} are not multiples of q_norm size {head_dim}.")
    if q_out != width:
        raise ValueError(f"attn.q_proj has {q_out} outputs but the model width (word_embed) is {width}.")
    text_channels = shape("text_proj.weight")[1]
    mlp_hidden = shape("block_chunks.0.module.0.mlp.gate_proj.weight")[0]
    head_out = shape("head.proj.weight")[0]
    if head_out != in_channels:
        raise ValueError(f"head.proj has {head_out} outputs but word_embed takes {in_channels} inputs; a GRN_bit "
                         f"refiner predicts 2 logits for every input bit.")
    rounds = overrides.pop("rounds", 4)
    if in_channels % (2 * rounds):
        raise ValueError(f"word_embed input width {in_channels} is not 2 * rounds * d for rounds={rounds}.")
    values = dict(
        width=width,
        depth=depth,
        heads=q_out // head_dim,
        kv_heads=k_out // head_dim,
        mlp_hidden=mlp_hidden,
        block_chunks=n_chunks,
        text_channels=text_channels,
        latent_channels=in_channels // (2 * rounds),
        rounds=rounds,
        layout=layout or "joint",
        step_freq_dim=shape("pt_embedder.mlp.0.weight")[1],
    )
    known = {f.name for f in dataclasses.fields(RefinerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown RefinerConfig override(s) {unknown}; known fields: {sorted(known)}.")
    values.update(overrides)
    return RefinerConfig(**values)
