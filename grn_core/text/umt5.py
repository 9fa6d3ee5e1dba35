"""The umt5-xxl text encoder (T5 v1.1-style encoder, one relative position bias per layer), as Wan ships it.

Reads the official ``models_t5_umt5-xxl-enc-bf16.pth`` key layout (Wan's ``T5Encoder``):
``token_embedding.weight``, ``blocks.{i}.{norm1,attn.{q,k,v,o},norm2,ffn.{gate.0,fc1,fc2},pos_embedding.embedding}``,
``norm.weight`` (or one top-level ``pos_embedding.embedding.weight`` for the shared-bias variant).

Per block (pre-norm residual, no biases, T5 attention is unscaled):

    x += o( softmax(q k^T + bias_rel(i - j) + mask) v )      on norm1(x)
    x += fc2( fc1(h) * gelu_tanh(gate(h)) ),  h = norm2(x)
    hidden = norm(x)

Rows past the mask are still computed (they attend to the real tokens only), exactly like the official module.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from grn_core.nn import RMSNorm

__all__ = ["UMT5Config", "UMT5Encoder", "UMT5_PRESETS", "infer_umt5_config", "relative_position_buckets"]


@dataclass
class UMT5Config:
    """Sizes of a T5/umt5 encoder. ``shared_pos=False`` (umt5) gives every layer its own relative bias table."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    max_distance: int = 128
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"num_buckets must be an even number >= 4 (bidirectional buckets), got {self.num_buckets}")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UMT5Config":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UMT5Config keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def preset(cls, name: str = "umt5-xxl", **overrides: Any) -> "UMT5Config":
        if name not in UMT5_PRESETS:
            raise ValueError(f"unknown umt5 preset {name!r}; choose one of {sorted(UMT5_PRESETS)}")
        return replace(UMT5_PRESETS[name], **overrides)


UMT5_PRESETS: dict[str, UMT5Config] = {"umt5-xxl": UMT5Config()}


def relative_position_buckets(
    length: int, num_buckets: int = 32, max_distance: int = 128, device: torch.device | None = None
) -> torch.LongTensor:
    """Bidirectional T5 buckets [L, L] of ``key - query``.

    Half the buckets for each sign; inside a half, distances below ``half/2`` get their own bucket and larger ones
    share log-spaced buckets up to ``max_distance`` (clipped to the last). The log is taken in float32, as in the
    official module, so bucket edges match it exactly.
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # key - query
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    dist = rel.abs()
    max_exact = half // 2
    # dist 0 gives log(0) = -inf here; those entries are replaced by the exact branch below.
    log_ratio = torch.log(dist.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(dist < max_exact, dist, large)


class T5RelativeEmbedding(nn.Module):
    """Bucket ids [L, L] -> additive attention bias [1, heads, L, L]."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    """Unscaled multi-head self-attention (T5 folds the 1/sqrt(d) into its initialisation)."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], bias [1 or B, heads, L, L] (relative positions plus key padding) -> [B, L, C]."""
        b, n = x.shape[:2]
        q, k, v = (proj(x).view(b, n, self.num_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(x.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class T5FeedForward(nn.Module):
    """Gated GELU (tanh approximation): fc2(fc1(x) * gelu(gate(x)))."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        # gate.0 is the official key (a Sequential of Linear + GELU).
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # T5 activations overflow fp16 in some layers; the official encoder pulls infinities back to finite values.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5SelfAttentionBlock(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, eps=cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, eps=cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        if not cfg.shared_pos:
            self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads)

    def forward(
        self, x: torch.Tensor, buckets: torch.Tensor, key_pad: torch.Tensor | None, shared_bias: torch.Tensor | None
    ) -> torch.Tensor:
        bias = shared_bias if shared_bias is not None else self.pos_embedding(buckets)
        if key_pad is not None:
            # Padded keys are excluded by replacing their bias with the dtype's lowest value (as the official code).
            bias = bias.masked_fill(key_pad, torch.finfo(x.dtype).min)
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        x = _fp16_clamp(x + self.ffn(self.norm2(x)))
        return x


class UMT5Encoder(nn.Module):
    """``hidden = enc(ids [B, L], mask [B, L] or None) -> [B, L, dim]`` (final RMS norm output)."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.config = cfg = config
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.shared_pos:
            self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads)
        self.blocks = nn.ModuleList(T5SelfAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, eps=cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, L] token ids; mask [B, L] (1 = real token, 0 = padding) or None for all-real rows."""
        cfg = self.config
        if ids.ndim != 2:
            raise ValueError(f"ids must be [B, L], got shape {tuple(ids.shape)}")
        if ids.is_floating_point():
            raise ValueError(f"ids must be integer token ids, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
            raise ValueError(
                f"token ids must lie in 0..{cfg.vocab_size - 1}, got range {int(ids.min())}..{int(ids.max())}; "
                "is the tokenizer the one this encoder was trained with?"
            )
        key_pad = None
        if mask is not None:
            if mask.shape != ids.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} must equal ids shape {tuple(ids.shape)}")
            if not bool(mask.ne(0).all()):
                key_pad = mask.eq(0)[:, None, None, :]  # [B, 1, 1, L]: broadcast over heads and queries

        x = self.token_embedding(ids)
        buckets = relative_position_buckets(ids.shape[1], cfg.num_buckets, cfg.max_distance, device=ids.device)
        shared_bias = self.pos_embedding(buckets) if cfg.shared_pos else None
        for block in self.blocks:
            x = block(x, buckets, key_pad, shared_bias)
        return self.norm(x)


def infer_umt5_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> UMT5Config:
    """Read a UMT5Config from tensor shapes (heads from the relative-bias table, shared or per layer)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ValueError(f"not a umt5/T5 encoder state dict (official Wan layout): key {key!r} is missing")
        return tuple(state_dict[key].shape)

    vocab, dim = shape("token_embedding.weight")
    block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not block_ids:
        raise ValueError("not a umt5/T5 encoder state dict: no 'blocks.N.' keys")
    num_layers = max(block_ids) + 1
    if block_ids != set(range(num_layers)):
        raise ValueError(f"block indices are not contiguous: {sorted(block_ids)}")
    dim_attn = shape("blocks.0.attn.q.weight")[0]
    dim_ffn = shape("blocks.0.ffn.fc1.weight")[0]
    shared_pos = "pos_embedding.embedding.weight" in state_dict
    bias_key = "pos_embedding.embedding.weight" if shared_pos else "blocks.0.pos_embedding.embedding.weight"
    num_buckets, num_heads = shape(bias_key)
    config = dict(
        vocab_size=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=num_heads,
        num_layers=num_layers, num_buckets=num_buckets, shared_pos=shared_pos,
    )
    known = {f.name for f in fields(UMT5Config)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown UMT5Config overrides {sorted(unknown)}")
    config.update(overrides)
    return UMT5Config(**config)
