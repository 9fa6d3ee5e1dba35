"""Class-to-image GRN ("GRN_ind"): a JiT-style DiT that refines HBQ index-label maps.

The network sees a map of index labels ``l in 0..K-1`` (``K = 2**rounds``, one label per latent channel and
position, spec §1/§5), a kept fraction ``t`` and an ImageNet class ``y``, and predicts K logits for every label:

    x   = one_hot(l)                                  [B, K*d, h, w]   (class-major: channel k*d + c)
    tok = proj2(proj1(x)) + pos_embed                 [B, N, W]        (bottleneck patch embed, fixed 2-D sin-cos)
    c   = t_embed(t) + y_embed(y)                     [B, W]
    from block `in_context_start` on: tok = [y_embed(y) + in_context_posemb (32 copies) ; tok]
    block: tok += g1 * Attn(RoPE, QK-norm)(mod(norm1(tok), s1, a1));  tok += g2 * SwiGLU(mod(norm2(tok), s2, a2))
           with (s1, a1, g1, s2, a2, g2) = Linear(SiLU(c))                                        (adaLN-Zero)
    out = Linear(mod(norm(tok), s, a))                [B, N, p*p*K*d]  -> [B, K, d, h, w]

Class ``y == num_classes`` is the unconditional label. State-dict keys equal the official ``GRN`` module of
``grn/models/grn_c2i.py`` (``Denoiser.net``), so an official ``model_ema1`` dict loads with ``strict=True`` once its
``net.`` prefix is removed.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from grn_core import hbq
from grn_core.nn import RMSNorm, compute_dtype

__all__ = ["C2IConfig", "C2IRefiner", "C2I_PRESETS", "infer_c2i_config"]


@dataclass
class C2IConfig:
    """Sizes of a GRN_ind network.

    ``input_size`` is the latent side (h = w; 256 px / 16 = 16 for the released model), ``latent_channels`` the HBQ
    latent channels d, ``rounds`` the HBQ rounds M (labels take ``2**rounds`` values). ``mlp_hidden`` is the SwiGLU
    inner width, ``int(int(width * 4) * 2 / 3)`` in every official model.
    """

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    bottleneck: int = 128
    patch_size: int = 1
    input_size: int = 16
    latent_channels: int = 16
    rounds: int = 4
    num_classes: int = 1000
    in_context_len: int = 32
    in_context_start: int = 4
    mlp_hidden: int = 2048

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        head_dim = self.width // self.num_heads
        if head_dim % 4:
            # 2-D RoPE splits head_dim into an h half and a w half of (cos, sin) pairs.
            raise ValueError(f"head_dim {head_dim} must be a multiple of 4 for the 2-D RoPE; change num_heads")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.in_context_len < 0:
            raise ValueError(f"in_context_len must be >= 0, got {self.in_context_len}")
        if self.in_context_len > 0 and not 0 <= self.in_context_start < self.depth:
            raise ValueError(
                f"in_context_start {self.in_context_start} must lie in [0, depth={self.depth}) "
                "so that the in-context tokens are inserted before some block"
            )

    @property
    def num_label_classes(self) -> int:
        """K = 2**rounds: the values an index label can take (and the logits per label)."""
        return 2**self.rounds

    @property
    def in_channels(self) -> int:
        """One-hot input channels K*d (also the per-pixel output channels)."""
        return self.num_label_classes * self.latent_channels

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid_size(self) -> int:
        """Tokens per side."""
        return self.input_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "C2IConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown C2IConfig keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "C2IConfig":
        """One of the released sizes "B", "L", "H", "G" (ImageNet 256, d = 16, 16x16 latent)."""
        key = name.upper().removeprefix("GRN_IND_").removeprefix("GRN_")
        if key not in C2I_PRESETS:
            raise ValueError(f"unknown C2I preset {name!r}; choose one of {sorted(C2I_PRESETS)}")
        return replace(C2I_PRESETS[key], **overrides)


def _swiglu_hidden(width: int, mlp_ratio: float = 4.0) -> int:
    # The official SwiGLUFFN receives int(width * ratio) and keeps two thirds of it (LLaMA-style parameter match).
    return int(int(width * mlp_ratio) * 2 / 3)


def _preset(width: int, depth: int, heads: int, bottleneck: int, start: int) -> C2IConfig:
    return C2IConfig(
        width=width, depth=depth, num_heads=heads, bottleneck=bottleneck, in_context_start=start,
        mlp_hidden=_swiglu_hidden(width),
    )


C2I_PRESETS: dict[str, C2IConfig] = {
    "B": _preset(768, 12, 12, 128, 4),
    "L": _preset(1024, 24, 16, 128, 8),
    "H": _preset(1280, 32, 16, 256, 10),
    "G": _preset(1664, 40, 16, 256, 10),
}


# ----------------------------------------------------------------------------------------------------------------
# Fixed embeddings
# ----------------------------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim] = [sin(pos * w_k) | cos(pos * w_k)], w_k = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(width: int, grid: int) -> torch.Tensor:
    """The fixed position table ``pos_embed`` [grid*grid, width] (row-major tokens).

    The first width/2 channels encode the column (w) index and the last width/2 the row (h) index — the order the
    official meshgrid(w, h) produces.
    """
    if width % 4:
        raise ValueError(f"width {width} must be a multiple of 4 for the 2-D sin-cos table")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([_sincos_1d(width // 2, cols.flatten()), _sincos_1d(width // 2, rows.flatten())], dim=1)


def rope_2d_tables(head_dim: int, grid: int, num_prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [num_prefix + grid*grid, head_dim] (float64) of the 2-D vision RoPE.

    The first head_dim/2 channels rotate with the token's row h, the last head_dim/2 with its column w; inside each
    half, pair (2i, 2i+1) turns by ``pos * 10000^(-2i / (head_dim/2))``. In-context prefix tokens get cos 1 / sin 0
    (no rotation).
    """
    half = head_dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, half, 2, dtype=torch.float64) / half)  # [half/2]
    pos = torch.arange(grid, dtype=torch.float64)
    per_axis = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # [grid, half], pairs share an angle
    angles = torch.cat(
        [per_axis[:, None, :].expand(grid, grid, half), per_axis[None, :, :].expand(grid, grid, half)], dim=-1
    ).reshape(grid * grid, head_dim)
    cos, sin = angles.cos(), angles.sin()
    if num_prefix:
        cos = torch.cat([torch.ones(num_prefix, head_dim, dtype=cos.dtype), cos])
        sin = torch.cat([torch.zeros(num_prefix, head_dim, dtype=sin.dtype), sin])
    return cos, sin


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., N, D] rotated pairwise: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) on interleaved pairs."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[B] scalars -> [B, dim] = [cos(t * f_k) | sin(t * f_k)], f_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------
# Modules (attribute names = official state-dict keys)
# ----------------------------------------------------------------------------------------------------------------


class BottleneckPatchEmbed(nn.Module):
    """[B, K*d, H, W] -> [B, N, width]: a p x p patch conv into a narrow bottleneck, then a 1x1 conv to the width."""

    def __init__(self, in_channels: int, bottleneck: int, width: int, patch_size: int):
        super().__init__()
        self.proj1 = nn.Conv2d(in_channels, bottleneck, patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck, width, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Kept fraction t [B] -> [B, width]: 256-d sinusoid -> Linear -> SiLU -> Linear."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        weight = self.mlp[0].weight
        freq = timestep_embedding(t.to(compute_dtype(weight.dtype)), self.frequency_dim)
        return self.mlp(freq.to(weight.dtype))


class LabelEmbedder(nn.Module):
    """Class id [B] -> [B, width]; row ``num_classes`` is the unconditional (dropped-label) embedding."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with QK RMS norm (over head_dim) and 2-D RoPE; qkv and proj carry biases."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = RMSNorm(head_dim, eps=1e-6)
        self.k_norm = RMSNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        # Rotations run in (at least) float32, like the official float32 cos/sin tables.
        cos, sin = rope
        q = _apply_rope(self.q_norm(q).to(cos.dtype), cos, sin).to(x.dtype)
        k = _apply_rope(self.k_norm(k).to(cos.dtype), cos, sin).to(x.dtype)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SwiGLUFFN(nn.Module):
    """w3(silu(a) * b) with (a, b) = w12(x) split in halves."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class GRNBlock(nn.Module):
    """Pre-norm DiT block with adaLN-Zero modulation from the conditioning vector c."""

    def __init__(self, width: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = RMSNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads)
        self.norm2 = RMSNorm(width, eps=1e-6)
        self.mlp = SwiGLUFFN(width, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift1, scale1), rope)
        x = x + gate2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """RMS norm, adaLN shift/scale, Linear to p*p*K*d logits — run in compute_dtype (float32 for half weights)."""

    def __init__(self, width: int, out_features: int):
        super().__init__()
        self.norm_final = RMSNorm(width, eps=1e-6)
        self.linear = nn.Linear(width, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        work = compute_dtype(x.dtype)
        mod = self.adaLN_modulation[1]
        shift, scale = F.linear(F.silu(c.to(work)), mod.weight.to(work), mod.bias.to(work)).chunk(2, dim=-1)
        h = _modulate(self.norm_final(x).to(work), shift, scale)
        return F.linear(h, self.linear.weight.to(work), self.linear.bias.to(work))


class C2IRefiner(nn.Module):
    """GRN_ind network: ``net(index_labels [B,d,h,w], t [B], y [B]) -> logits [B, 2**rounds, d, h, w]``."""

    def __init__(self, config: C2IConfig):
        super().__init__()
        self.config = cfg = config
        self.t_embedder = TimestepEmbedder(cfg.width)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.width)
        self.x_embedder = BottleneckPatchEmbed(cfg.in_channels, cfg.bottleneck, cfg.width, cfg.patch_size)
        # Fixed (not trained) but stored in the official state dict, hence a frozen Parameter.
        self.pos_embed = nn.Parameter(
            sincos_pos_embed_2d(cfg.width, cfg.grid_size).float().unsqueeze(0), requires_grad=False
        )
        if cfg.in_context_len > 0:
            self.in_context_posemb = nn.Parameter(torch.randn(1, cfg.in_context_len, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(
            GRNBlock(cfg.width, cfg.num_heads, cfg.mlp_hidden) for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(cfg.width, cfg.patch_size**2 * cfg.in_channels)

    # -- input checks ---------------------------------------------------------------------------------------------

    def _check_inputs(
        self, labels: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if labels.ndim != 4:
            raise ValueError(f"index_labels must be [B, d, h, w], got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"index_labels must be an integer tensor, got {labels.dtype}; pass labels.long()")
        b, d, h, w = labels.shape
        if d != cfg.latent_channels or h != cfg.input_size or w != cfg.input_size:
            raise ValueError(
                f"index_labels shape {tuple(labels.shape)} does not fit this model: expected "
                f"[B, {cfg.latent_channels}, {cfg.input_size}, {cfg.input_size}] (the position table is fixed)"
            )
        # The label range is checked by hbq.indices_one_hot.
        t = torch.as_tensor(t, device=labels.device)
        if not t.is_floating_point():
            t = t.to(torch.float64)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a float or a [B={b}] tensor, got shape {tuple(t.shape)}")
        y = torch.as_tensor(y, device=labels.device)
        if y.ndim == 0:
            y = y.expand(b)
        if y.shape != (b,) or y.is_floating_point():
            raise ValueError(f"y must be a [B={b}] integer tensor of class ids, got {y.dtype} {tuple(y.shape)}")
        if int(y.min()) < 0 or int(y.max()) > cfg.num_classes:
            raise ValueError(
                f"class ids must lie in 0..{cfg.num_classes} ({cfg.num_classes} = unconditional), "
                f"got range {int(y.min())}..{int(y.max())}"
            )
        return t, y.long()

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(self, index_labels: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
        """index_labels [B, d, h, w] ints in 0..K-1, t [B] kept fraction, y [B] class ids -> logits [B, K, d, h, w].

        Logits are float32 for half-precision weights, else the weight dtype.
        """
        cfg = self.config
        t, y = self._check_inputs(index_labels, t, y)
        dtype = self.pos_embed.dtype
        work = compute_dtype(dtype)

        x = hbq.indices_one_hot(index_labels, cfg.rounds, dtype)  # class-major: channel k*d + c
        x = self.x_embedder(x) + self.pos_embed  # [B, N, W]
        y_emb = self.y_embedder(y)
        c = self.t_embedder(t) + y_emb

        cos, sin = rope_2d_tables(cfg.head_dim, cfg.grid_size)
        rope_image = (cos.to(x.device, work), sin.to(x.device, work))
        if cfg.in_context_len > 0:
            cos, sin = rope_2d_tables(cfg.head_dim, cfg.grid_size, num_prefix=cfg.in_context_len)
            rope_prefixed = (cos.to(x.device, work), sin.to(x.device, work))

        for i, block in enumerate(self.blocks):
            if cfg.in_context_len > 0 and i == cfg.in_context_start:
                # The class embedding re-enters as a token sequence from this depth on (no RoPE rotation for it).
                prefix = y_emb.unsqueeze(1) + self.in_context_posemb
                x = torch.cat([prefix, x], dim=1)
            in_context = cfg.in_context_len > 0 and i >= cfg.in_context_start
            x = block(x, c, rope_prefixed if in_context else rope_image)
        if cfg.in_context_len > 0:
            x = x[:, cfg.in_context_len :]

        out = self.final_layer(x, c)  # [B, N, p*p*K*d]
        return self._to_label_logits(out)

    def _to_label_logits(self, out: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*K*d] -> [B, K, d, h, w], reading each pixel's K*d channels class-major (k*d + c)."""
        cfg = self.config
        b, g, p = out.shape[0], cfg.grid_size, cfg.patch_size
        k, d = cfg.num_label_classes, cfg.latent_channels
        # Official models all use p = 1; for p > 1 each token holds a p x p patch laid out (p_row, p_col, K*d).
        out = out.view(b, g, g, p, p, k, d)
        return out.permute(0, 5, 6, 1, 3, 2, 4).reshape(b, k, d, g * p, g * p)


# ----------------------------------------------------------------------------------------------------------------
# Config inference
# ----------------------------------------------------------------------------------------------------------------


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"not a GRN_ind (C2I) state dict: key {key!r} is missing")
    return tuple(sd[key].shape)


def infer_c2i_config(
    state_dict: Mapping[str, torch.Tensor], in_context_start: int | None = None, **overrides: Any
) -> C2IConfig:
    """Read a C2IConfig from tensor shapes.

    Everything except ``in_context_start`` (and ``rounds``, which only splits K*d; default 4) is in the shapes.
    ``in_context_start`` is taken from the argument, else from the preset (B/L/H/G) with the same width and depth;
    otherwise a ValueError asks for it.
    """
    if any(k.startswith("net.") for k in state_dict) and "pos_embed" not in state_dict:
        raise ValueError(
            "this looks like the official Denoiser state dict (keys start with 'net.'); "
            "strip the 'net.' prefix (and pick 'model_ema1') before loading"
        )
    _, n_tokens, width = _shape(state_dict, "pos_embed")
    grid = math.isqrt(n_tokens)
    if grid * grid != n_tokens:
        raise ValueError(f"pos_embed holds {n_tokens} tokens, not a square grid")
    bottleneck, in_channels, patch, patch_w = _shape(state_dict, "x_embedder.proj1.weight")
    if patch != patch_w:
        raise ValueError(f"x_embedder.proj1.weight has a non-square {patch}x{patch_w} patch")
    head_dim = _shape(state_dict, "blocks.0.attn.q_norm.weight")[0]
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of the QK-norm size {head_dim}")
    block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(block_ids) + 1
    if block_ids != set(range(depth)):
        raise ValueError(f"block indices are not contiguous: {sorted(block_ids)}")
    mlp_hidden = _shape(state_dict, "blocks.0.mlp.w12.weight")[0] // 2
    num_classes = _shape(state_dict, "y_embedder.embedding_table.weight")[0] - 1
    in_context_len = _shape(state_dict, "in_context_posemb")[1] if "in_context_posemb" in state_dict else 0
    out_features = _shape(state_dict, "final_layer.linear.weight")[0]
    if out_features != patch * patch * in_channels:
        raise ValueError(
            f"final_layer.linear.weight has {out_features} outputs, expected patch^2 * in_channels = "
            f"{patch * patch * in_channels}"
        )

    rounds = int(overrides.pop("rounds", 4))
    k = 2**rounds
    if in_channels % k:
        raise ValueError(f"in_channels {in_channels} is not a multiple of 2**rounds = {k}; pass rounds=")

    if in_context_start is None and in_context_len > 0:
        match = [p for p in C2I_PRESETS.values() if p.width == width and p.depth == depth]
        if not match:
            raise ValueError(
                f"in_context_start cannot be read from tensors and no preset has width {width} / depth {depth}; "
                "pass infer_c2i_config(sd, in_context_start=...)"
            )
        in_context_start = match[0].in_context_start
    config = dict(
        width=width, depth=depth, num_heads=width // head_dim, bottleneck=bottleneck, patch_size=patch,
        input_size=grid * patch, latent_channels=in_channels // k, rounds=rounds, num_classes=num_classes,
        in_context_len=in_context_len, in_context_start=in_context_start if in_context_start is not None else 0,
        mlp_hidden=mlp_hidden,
    )
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown C2IConfig overrides {sorted(unknown)}")
    config.update(overrides)
    return C2IConfig(**config)
