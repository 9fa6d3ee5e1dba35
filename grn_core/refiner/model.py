"""The GRN_bit refiner: a pre-norm transformer that predicts every bit of the HBQ bit map from a partly-random one.

One refinement step, per guidance branch (cond / uncond), for a bit map ``x`` ``[B, M*d, t, h, w]``:

    tokens   = [ word_embed(one_hot(x)) | word_embed(one_hot(x_first)) (I2V) | text_proj(text) | step_emb(r) ]
    tokens   = Block_L( ... Block_1(tokens) )          Block: x += Attn(RMS(x)); x += SwiGLU(RMS(x))
    logits   = head.proj(RMS(tokens[visual]))          -> [B, t, h, w, M*d, 2]

Attention is GQA with QK-norm (RMS over head_dim) and 3-D RoPE (see ``rope.py``). Two checkpoint generations share the
weights but not the attention pattern (``RefinerConfig.layout``):

- ``joint``: the whole branch sequence above attends to itself (the text is re-run every step);
- ``prefix``: the text runs alone once (``prepare_text``) and its per-layer K/V are cached; each step runs only
  ``[visual | step token]``, attending to ``[text K/V ; own K/V]``.

Execution is pad-free: all tokens of all samples and branches are packed into one ``[N, width]`` matrix so every
Linear is a single large matmul, and attention runs per branch sequence — runs of consecutive sequences of equal
length (the usual case: one prompt for the whole batch) go in one batched call, as zero-copy views of the packed
tensors; per-sample prompts of different lengths fall back to one call per sequence.

Runtime (see :mod:`grn_core.runtime`):

- precision: the residual stream, norms, RoPE, softmax inputs and the head run in ``compute_dtype`` (float32 for
  half and fp8 weights); matmuls run in the weight dtype (fp8 block weights are upcast per call to the model's
  compute dtype, ``word_embed``'s dtype). Loaders keep the norms and the ``head`` in float32 under half / fp8
  storage (``FLOAT32_MODULES``), as the official code runs them;
- attention: :meth:`GRNRefiner.set_attention` — ``auto`` (FlashAttention when installed and usable, else SDPA),
  ``sdpa``, ``flash``, ``sage``;
- block offload: :meth:`GRNRefiner.enable_block_offload` streams the last N blocks from the CPU for every pass;
- sequence parallel (Ulysses): :meth:`GRNRefiner.step_logits` given ``split=`` (a :class:`SequenceSplit`, e.g.
  ``grn_core.runtime.distributed.UlyssesSplit``) runs on this rank's share of the packed rows only. Every row-wise
  op (norms, projections, RoPE, MLP) needs nothing from other rows; attention does, so before it an all-to-all turns
  "my rows, all heads" into "all rows, my heads" (each head attends over the whole sequence, exactly as one process
  does), and after it the inverse turns the output back. The head's logits are gathered so every rank returns the
  whole ``[B, t, h, w, bits, 2]``;
- autograd: one pass serves sampling and training. With autograd off (``step_logits``) it overwrites intermediates
  in place; with autograd on (``forward`` in training) the same ops run out of place, so it is differentiable and
  gives the same values.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import RMSNorm, compute_dtype
from ..runtime.attention import attend, check_backend, resolve_backend
from ..runtime.fp8 import matmul_weight
from ..runtime.offload import BlockOffload
from .buckets import aspect_template
from .config import RefinerConfig
from .rope import TEXT_MAX_TOKENS, apply_rope, rope_table, step_positions, text_positions, visual_positions

__all__ = ["GRNRefiner", "RefinerInterrupted", "SequenceSplit", "TextContext"]

TextInput = Union[torch.Tensor, Sequence[torch.Tensor], "TextContext"]


# ----------------------------------------------------------------------------------------------------------------------
# Layers (attribute names are the official state-dict keys)


def _linear(x: torch.Tensor, layer: nn.Linear, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``layer(x)`` (+ ``residual``) on 2-D ``x``; the matmul runs in the weight dtype (fp8 weights: upcast).

    When the residual has the weight dtype (float32 / float64 models) the add is folded into the matmul
    (``addmm``: one BLAS call, no extra pass over the activations).
    """
    weight = matmul_weight(layer)
    inp = x if x.dtype == weight.dtype else x.to(weight.dtype)
    if residual is not None and residual.dtype == weight.dtype and layer.bias is None:
        return torch.addmm(residual, inp, weight.t())
    out = F.linear(inp, weight, layer.bias)
    if residual is not None:
        return residual + out.to(residual.dtype)
    return out


def _recording() -> bool:
    """True when autograd records this pass, i.e. the pass must stay differentiable.

    The inference kernels overwrite fresh intermediates in place (the norm factor, the SiLU gate, the RoPE product)
    and let matmuls write into column slices of one buffer (``mm(out=...)``). Autograd refuses ``out=`` and needs
    some of the overwritten values for the backward pass, so while it records, the same maths runs out of place:
    same kernels in the same order, hence the same values (bit for bit in the CPU tests). With autograd off
    (``torch.no_grad``, as in :meth:`GRNRefiner.step_logits`, or ``torch.inference_mode``) nothing is recorded and
    the in-place path is safe.
    """
    return torch.is_grad_enabled()


def _rms_norm(x: torch.Tensor, norm: RMSNorm, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim, returned in the compute dtype.

    Same maths as :class:`grn_core.nn.RMSNorm`, with the mean square taken by one reduction
    (``mean(x^2) = ||x||^2 / n``, ``vector_norm``) and, without autograd, the scaling done in place: 3 passes over
    ``x`` instead of 5, which matters on CPU where these run once per norm per layer on every token. ``weight``
    overrides ``norm.weight`` (a joint q/k weight, see ``_qkv``).
    """
    work = compute_dtype(x.dtype)
    h = x.to(work)
    scale = (norm.weight if weight is None else weight).to(work)
    length = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    if _recording():
        # rsqrt's and vector_norm's backward read their outputs: they must not be overwritten.
        inv = length.square().div(h.shape[-1]).add(norm.eps).rsqrt()
        return torch.mul(h, inv).mul(scale)
    inv = length.square_().div_(h.shape[-1]).add_(norm.eps).rsqrt_()
    return torch.mul(h, inv).mul_(scale)


class SelfAttention(nn.Module):
    """Projections and QK-norms of one block (the attention pattern itself lives in :class:`GRNRefiner`)."""

    def __init__(self, config: RefinerConfig):
        super().__init__()
        c, hd = config.width, config.head_dim
        self.q_proj = nn.Linear(c, config.heads * hd, bias=False)
        self.k_proj = nn.Linear(c, config.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(c, config.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.heads * hd, c, bias=False)
        self.q_norm = RMSNorm(hd, eps=config.norm_eps)
        self.k_norm = RMSNorm(hd, eps=config.norm_eps)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + down(silu(gate(h)) * up(h))`` for 2-D ``h``."""
        if _recording():
            # silu's backward reads its input and the product's backward reads both factors: keep them all.
            act = F.silu(_linear(h, self.gate_proj)) * _linear(h, self.up_proj)
        else:
            act = F.silu(_linear(h, self.gate_proj), inplace=True).mul_(_linear(h, self.up_proj))
        return _linear(act, self.down_proj, residual=residual)


class Block(nn.Module):
    """Pre-norm block: ``x += Attn(RMS(x)); x += SwiGLU(RMS(x))`` (no biases)."""

    def __init__(self, config: RefinerConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.width, eps=config.norm_eps)
        self.attn = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.width, eps=config.norm_eps)
        self.mlp = SwiGLU(config.width, config.mlp_hidden)


class BlockChunk(nn.Module):
    """A group of consecutive blocks; exists only so state-dict keys read ``block_chunks.{c}.module.{i}``."""

    def __init__(self, config: RefinerConfig):
        super().__init__()
        self.module = nn.ModuleList(Block(config) for _ in range(config.blocks_per_chunk))


class StepEmbedder(nn.Module):
    """Step token: kept fraction r -> 256-d sinusoid ``[cos | sin]`` (max period 10000) -> Linear -> SiLU -> Linear."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """``r [B]`` -> ``[B, width]`` in the compute dtype."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=r.device) / half)
        angles = r.to(torch.float64)[:, None] * freqs
        work = compute_dtype(self.mlp[0].weight.dtype)
        sinusoid = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).to(work)
        first, last = self.mlp[0], self.mlp[2]
        hidden = F.silu(F.linear(sinusoid, first.weight.to(work), first.bias.to(work)))
        return F.linear(hidden, last.weight.to(work), last.bias.to(work))


class BitHead(nn.Module):
    """``proj(RMS(x))`` -> ``rounds*d*2`` logits per visual token, laid out ``[bits, 2 classes]`` (compute dtype)."""

    def __init__(self, width: int, out_channels: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(width, eps=eps)
        self.proj = nn.Linear(width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = compute_dtype(self.proj.weight.dtype)
        h = _rms_norm(x.to(work), self.norm)
        return F.linear(h, self.proj.weight.to(work), self.proj.bias.to(work))


def _my_rows(t: torch.Tensor, split: "SequenceSplit") -> torch.Tensor:
    """Rows ``r*n .. (r+1)*n - 1`` of ``t`` padded with zero rows to ``world * n``, ``n = ceil(len(t) / world)``."""
    n = -(-t.shape[0] // split.world)
    lo, hi = split.rank * n, (split.rank + 1) * n
    mine = t[lo:min(hi, t.shape[0])]
    if mine.shape[0] < n:
        mine = torch.cat([mine, mine.new_zeros((n - mine.shape[0],) + tuple(t.shape[1:]))])
    return mine


def _resident(blocks: Sequence[Block]):
    """Generator over blocks already on the device (closable, like ``BlockOffload.blocks_on``)."""
    yield from blocks


# ----------------------------------------------------------------------------------------------------------------------
# Text conditioning and sequence packing


@dataclass(frozen=True, eq=False)
class TextContext:
    """Text conditioning of one guidance branch, prepared once (``GRNRefiner.prepare_text``) and reused every step.

    Holds 1 item (shared by the whole batch) or B items (one per sample). ``joint`` layout: the projected text tokens
    ``[L_i, width]`` (compute dtype). ``prefix`` layout: per layer the roped keys and the values of the text run,
    packed over items: ``keys[l]`` / ``values[l]`` ``[sum L_i, kv_heads, head_dim]`` in the model dtype.
    """

    layout: str
    lengths: tuple[int, ...]
    tokens: tuple[torch.Tensor, ...] = ()
    keys: tuple[torch.Tensor, ...] = ()
    values: tuple[torch.Tensor, ...] = ()

    @property
    def num_items(self) -> int:
        return len(self.lengths)

    def offset(self, item: int) -> int:
        return sum(self.lengths[:item])


@dataclass(frozen=True)
class _Run:
    """Consecutive packed sequences of equal length, attended in one batched SDPA call."""

    start: int  # first packed row
    count: int  # sequences in the run
    length: int  # rows per sequence
    branch: int
    items: tuple[int, ...]  # prefix layout: text item of each sequence (its K/V prefix)
    text_length: int  # prefix layout: length of that text prefix


@dataclass(frozen=True, eq=False)
class _Plan:
    """Where every sequence sits in the packed token matrix, and what is fixed for a given shape."""

    rows: int
    runs: tuple[_Run, ...]
    rope: torch.Tensor  # [rows, 1, head_dim/2] complex
    visual_index: torch.Tensor  # [branches * B * t*h*w] rows of the visual tokens, branch-major then sample


class SequenceSplit:
    """What the refiner needs from a sequence-parallel group (Ulysses) of ``world`` ranks; this is rank ``rank``.

    The packed ``[N, width]`` rows are padded to ``world * n`` (``n = ceil(N / world)``) and rank ``r`` keeps rows
    ``r*n .. (r+1)*n - 1``. Heads are split in ``world`` equal groups; rank ``r`` attends with group ``r``.

    - ``scatter_heads(t [n, H, D]) -> [world*n, H/world, D]``: every rank's rows (in rank order), my heads;
    - ``gather_heads(t [world*n, H/world, D]) -> [n, H, D]``: the inverse;
    - ``gather_rows(t [n, C]) -> [world*n, C]``: every rank's rows, in rank order.
    ``grn_core.runtime.distributed.UlyssesSplit`` implements them with ``torch.distributed`` collectives.
    """

    rank: int = 0
    world: int = 1

    def scatter_heads(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gather_heads(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def check_split_heads(config: RefinerConfig, world: int) -> None:
    """Ulysses needs the query and the key/value heads divisible by the degree: ValueError listing the choices."""
    if world < 1 or config.heads % world or config.kv_heads % world:
        valid = [p for p in range(1, config.kv_heads + 1) if config.heads % p == 0 and config.kv_heads % p == 0]
        raise ValueError(f"sequence parallel over {world} ranks: this refiner has {config.heads} attention heads "
                         f"({config.kv_heads} key/value heads), which {world} does not divide. Valid degrees: "
                         f"{', '.join(map(str, valid))}.")


# ----------------------------------------------------------------------------------------------------------------------
# The model


class RefinerInterrupted(KeyboardInterrupt):
    """A pass stopped between two blocks because :attr:`GRNRefiner.should_stop` said so (e.g. Ctrl-C on the command
    line). A ``KeyboardInterrupt``, so ``except Exception`` does not swallow it."""


def _check_stop(refiner: "GRNRefiner", layer: int) -> None:
    """Between blocks: end the pass when the refiner's ``should_stop`` hook asks for it."""
    hook = refiner.should_stop
    if hook is not None and hook():
        raise RefinerInterrupted(f"stopped before block {layer + 1} of {refiner.config.depth}")


class GRNRefiner(nn.Module):
    """GRN_bit refiner for T2I / T2V / I2V; ``load_state_dict(official_sd, strict=True)`` works as is.

    Main entry point::

        cond, uncond = ref.step_logits(bits, step_value, text_cond, text_uncond, aspect_ratio=h / w)

    See :meth:`step_logits`. Text that does not change between steps can be prepared once with :meth:`prepare_text`.
    Training calls the same pass through :meth:`forward` (``logits = ref(bits, step_value, text)``) with autograd on.
    """

    _PLAN_CACHE_SIZE = 4
    # Interruption hook: a callable checked between blocks (every pass, text preparation included); when it returns
    # True the pass raises RefinerInterrupted, so a long step ends within one block. Set it on an instance
    # (``refiner.should_stop = flag.is_set``); None (default) checks nothing.
    should_stop = None
    # Kept in float32 by the loaders under half / fp8 storage (with every RMSNorm): the official head runs in float32.
    FLOAT32_MODULES = ("head",)

    def __init__(self, config: RefinerConfig):
        super().__init__()
        self.config = config
        self.word_embed = nn.Linear(config.in_channels, config.width)
        self.text_proj = nn.Linear(config.text_channels, config.width)
        self.pt_embedder = StepEmbedder(config.width, config.step_freq_dim)
        self.block_chunks = nn.ModuleList(BlockChunk(config) for _ in range(config.block_chunks))
        self.head = BitHead(config.width, config.in_channels, config.norm_eps)
        self._plans: OrderedDict = OrderedDict()
        self._attention = "auto"
        self._attention_resolved: dict = {}
        self._offload: BlockOffload | None = None

    # -- runtime settings ----------------------------------------------------------------------------------------------

    @property
    def attention(self) -> str:
        """The attention backend setting (``auto``, ``sdpa``, ``flash`` or ``sage``)."""
        return self._attention

    def set_attention(self, backend: str = "auto") -> "GRNRefiner":
        """Choose the attention kernel: ``auto`` (FlashAttention when installed and usable, else SDPA), ``sdpa``,
        ``flash`` or ``sage`` (approximate, opt-in). An uninstalled explicit choice raises ``ValueError``."""
        self._attention = check_backend(backend)
        self._attention_resolved = {}
        return self

    @property
    def block_offload(self) -> BlockOffload | None:
        """The active :class:`~grn_core.runtime.offload.BlockOffload`, or None."""
        return self._offload

    def enable_block_offload(self, blocks: int | str = "all", device: Any = None, prefetch: int = 1,
                             simulate: bool = False) -> BlockOffload:
        """Keep the last ``blocks`` transformer blocks on the CPU and stream them in for every pass.

        Args:
            blocks: how many blocks to stream (1..depth, or ``"all"``); the rest stay on the device.
            device: the compute device (default: where the model is now); the resident part moves there.
            prefetch: blocks copied ahead on a side CUDA stream; at most ``1 + prefetch`` streamed blocks are on the
                device at once.
            simulate: stream even when the device is the CPU (tests).
        Moving the model later (``.to(device)``) moves the resident part only; casts apply to all.
        """
        depth = self.config.depth
        count = depth if blocks == "all" else blocks
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= depth:
            raise ValueError(f"offload blocks={blocks!r}: stream 1..{depth} blocks of this {depth}-block refiner "
                             f"(or 'all'); 0 means no block offload (call disable_block_offload()).")
        target = torch.device(device) if device is not None else self._device
        self.disable_block_offload()
        self._offload = BlockOffload(self.blocks, range(depth - count, depth), prefetch=prefetch, simulate=simulate)
        self.to(target)
        return self._offload

    def disable_block_offload(self) -> None:
        """Bring streamed blocks to the model's device for good."""
        if self._offload is not None:
            self._offload.to_device(self._device)
            self._offload = None

    # -- helpers -------------------------------------------------------------------------------------------------------

    @property
    def blocks(self) -> list[Block]:
        """All blocks in execution order (block ``c * depth/block_chunks + i`` is ``block_chunks[c].module[i]``)."""
        return [block for chunk in self.block_chunks for block in chunk.module]

    @property
    def _dtype(self) -> torch.dtype:
        return self.word_embed.weight.dtype

    @property
    def _device(self) -> torch.device:
        return self.word_embed.weight.device

    def _embed_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """``word_embed(one_hot(bits))`` for bit tokens ``[M, rounds*d]`` (0/1) -> ``[M, width]`` (compute dtype).

        The one-hot input is label-major (channel ``2j + bit_j``), so the product collapses to
        ``b + sum_j W[:, 2j] + bits @ (W[:, 2j+1] - W[:, 2j])^T``: half the multiply-adds, no one-hot tensor.
        """
        work = compute_dtype(self._dtype)
        weight = self.word_embed.weight.to(work)
        w_zero, w_one = weight[:, 0::2], weight[:, 1::2]
        base = self.word_embed.bias.to(work) + w_zero.sum(dim=1)
        return torch.addmm(base, bits.to(work), (w_one - w_zero).t())

    def _grid_tokens(self, bits: torch.Tensor) -> torch.Tensor:
        """``[B, bits, t, h, w]`` -> embedded tokens ``[B, t*h*w, width]`` (frame-major, row-major)."""
        b, c = bits.shape[:2]
        flat = bits.reshape(b, c, -1).transpose(1, 2).reshape(-1, c)
        return self._embed_bits(flat).view(b, -1, self.config.width)

    def _project_text(self, items: list[torch.Tensor]) -> torch.Tensor:
        """``text_proj`` of all items at once -> ``[sum L_i, width]`` (compute dtype)."""
        packed = torch.cat(items) if len(items) > 1 else items[0]
        out = _linear(packed.to(device=self._device), self.text_proj)
        return out.to(compute_dtype(self._dtype))

    def _qkv(self, block: Block, h: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Roped, QK-normed ``q [N, H, D]``, ``k [N, Hkv, D]`` and ``v [N, Hkv, D]`` (model dtype) of ``RMS(x) = h``.

        q, k and v are written side by side into one buffer (``mm(out=...)`` on column slices, so the official
        separate weights are used as they are), which lets q and k share a single norm and a single in-place RoPE
        product over ``[N, H + Hkv, D]``. q, k, v are strided views of that buffer. While autograd records, the
        buffer is the concatenation of the three products and RoPE runs out of place (see ``_recording``).
        """
        cfg, attn = self.config, block.attn
        n, hd, nq, nkv = h.shape[0], cfg.head_dim, cfg.heads, cfg.kv_heads
        weights = [matmul_weight(proj) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
        weight_dtype = weights[0].dtype
        inp = h if h.dtype == weight_dtype else h.to(weight_dtype)
        bounds = (0, nq * hd, (nq + nkv) * hd, (nq + 2 * nkv) * hd)
        recording = _recording()
        if recording:
            qkv = torch.cat([torch.mm(inp, weight.t()) for weight in weights], dim=1)
        else:
            qkv = torch.empty(n, bounds[3], dtype=weight_dtype, device=inp.device)
            for weight, lo, hi in zip(weights, bounds[:-1], bounds[1:]):
                torch.mm(inp, weight.t(), out=qkv[:, lo:hi])
        qk_weight = torch.cat([attn.q_norm.weight.expand(nq, hd), attn.k_norm.weight.expand(nkv, hd)])
        qk = _rms_norm(qkv[:, :bounds[2]].view(n, nq + nkv, hd), attn.q_norm, qk_weight)
        qk = apply_rope(qk, rope, inplace=not recording).to(weight_dtype)
        return qk[:, :nq], qk[:, nq:], qkv[:, bounds[2]:].view(n, nkv, hd)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [n, L, H, D]``, ``k/v [n, S, Hkv, D]`` -> ``[n, L, H, D]`` (may be a strided view); softmax scale
        ``head_dim ** -0.5``.

        Runs on the attention backend chosen by :meth:`set_attention` (resolved once per device and dtype).
        """
        cfg = self.config
        key = (q.device, q.dtype)
        backend = self._attention_resolved.get(key)
        if backend is None:
            backend = resolve_backend(self._attention, q.device, q.dtype, cfg.head_dim)
            self._attention_resolved[key] = backend
        return attend(q, k, v, backend)

    def _block(
        self,
        block: Block,
        x: torch.Tensor,
        rope: torch.Tensor,
        runs: Sequence[_Run],
        layer: int,
        contexts: Sequence[TextContext] = (),
        split: SequenceSplit | None = None,
    ) -> torch.Tensor:
        """One block on the packed tokens ``x [N, width]`` (with ``split``: this rank's rows); attention within each
        run's sequences."""
        q, k, v = self._qkv(block, _rms_norm(x, block.input_layernorm), rope)
        if split is not None:  # my rows, all heads -> all rows, my heads (and back after attention)
            q, k, v = (split.scatter_heads(t) for t in (q, k, v))
            attn = self._attend(q, k, v, runs, layer, contexts, split)
            attn = split.gather_heads(attn.view(attn.shape[0], q.shape[1], -1)).flatten(1)
        else:
            attn = self._attend(q, k, v, runs, layer, contexts)
        # Release attention's tensors before the MLP, whose hidden activations are the block's largest: the q/k/v
        # buffer and the attention output alive beside them would add ~5 widths per row to the step's peak
        # (runtime.memory.refiner_step_bytes counts the MLP phase without them).
        del q, k, v
        x = _linear(attn, block.attn.o_proj, residual=x)
        del attn
        return block.mlp(_rms_norm(x, block.post_attention_layernorm), residual=x)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: Sequence[_Run], layer: int,
                contexts: Sequence[TextContext], split: SequenceSplit | None = None) -> torch.Tensor:
        """Attention of the packed ``q [N, H, D]``, ``k, v [N, Hkv, D]`` within each run's sequences -> ``[N, H*D]``.

        Under ``split`` the heads are this rank's group and ``N`` may hold padding rows past the last run (their
        output is zero)."""
        hd = self.config.head_dim
        heads, kv_heads = q.shape[1], k.shape[1]
        # Each run's output is copied once, straight into its rows (the backend's [n, L, H, D] view is strided, so
        # one copy is needed anyway; a per-run reshape and a concatenation would make two). Autograd records copies
        # into slices of a buffer (CopySlices hands each run's rows their share of the gradient), so training runs
        # this same code.
        out = torch.empty(q.shape[0], heads * hd, dtype=q.dtype, device=q.device)
        covered = runs[-1].start + runs[-1].count * runs[-1].length if runs else 0
        if covered < q.shape[0]:
            out[covered:].zero_()
        for run in runs:
            rows = slice(run.start, run.start + run.count * run.length)
            q_r = q[rows].view(run.count, run.length, heads, hd)
            k_r = k[rows].view(run.count, run.length, kv_heads, hd)
            v_r = v[rows].view(run.count, run.length, kv_heads, hd)
            if run.text_length:  # prefix layout: prepend the cached text K/V of each sequence's branch
                ctx = contexts[run.branch]
                k_t, v_t = self._text_kv(ctx, layer, run)
                if split is not None:  # the cache holds every head: take this rank's group
                    k_t = k_t[:, :, split.rank * kv_heads:(split.rank + 1) * kv_heads]
                    v_t = v_t[:, :, split.rank * kv_heads:(split.rank + 1) * kv_heads]
                k_r, v_r = torch.cat([k_t, k_r], dim=1), torch.cat([v_t, v_r], dim=1)
            out[rows].view(run.count, run.length, heads, hd).copy_(self._sdpa(q_r, k_r, v_r))
        return out

    @staticmethod
    def _text_kv(ctx: TextContext, layer: int, run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached text ``K, V`` for the sequences of a run: ``[count, L_text, Hkv, D]`` each (expanded if shared)."""
        keys, values = ctx.keys[layer], ctx.values[layer]
        length = run.text_length
        if len(set(run.items)) == 1:
            start = ctx.offset(run.items[0])
            k_t = keys[start:start + length].unsqueeze(0).expand(run.count, -1, -1, -1)
            v_t = values[start:start + length].unsqueeze(0).expand(run.count, -1, -1, -1)
            return k_t, v_t
        starts = [ctx.offset(i) for i in run.items]
        return (torch.stack([keys[s:s + length] for s in starts]), torch.stack([values[s:s + length] for s in starts]))

    # -- input checks --------------------------------------------------------------------------------------------------

    def _text_items(self, text: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
        if isinstance(text, torch.Tensor):
            if text.dim() == 2:
                items = [text]
            elif text.dim() == 3:
                items = list(text.unbind(0))
            else:
                raise ValueError(f"{name} has shape {tuple(text.shape)}; pass encoder features [L, C_text], "
                                 f"[B, L, C_text] or a list of B [L_i, C_text] tensors.")
        elif isinstance(text, (list, tuple)) and text and all(isinstance(t, torch.Tensor) for t in text):
            items = list(text)
        else:
            raise ValueError(f"{name} is {type(text).__name__}; pass a tensor [L, C_text], a list of them, or a "
                             f"TextContext from prepare_text().")
        for i, item in enumerate(items):
            if item.dim() != 2 or item.shape[1] != self.config.text_channels:
                raise ValueError(f"{name}[{i}] has shape {tuple(item.shape)}; expected "
                                 f"[L, {self.config.text_channels}] (text_channels of this refiner; umt5-xxl "
                                 f"features are 4096 wide).")
            if item.shape[0] < 1:
                raise ValueError(f"{name}[{i}] has no tokens; even an empty prompt has its EOS token.")
            if not item.is_floating_point():
                raise ValueError(f"{name}[{i}] has dtype {item.dtype}; pass float encoder features, not token ids.")
        return items

    def _context(self, text: TextInput, name: str) -> TextContext:
        if isinstance(text, TextContext):
            if text.layout != self.config.layout:
                raise ValueError(f"{name} was prepared for the {text.layout!r} layout but this refiner is "
                                 f"{self.config.layout!r}; call prepare_text() on this model.")
            ref = text.tokens[0] if text.tokens else text.keys[0]
            expected = self._dtype if text.keys else compute_dtype(self._dtype)
            if ref.device != self._device or ref.dtype != expected:
                raise ValueError(f"{name} was prepared on {ref.device}/{ref.dtype}, the model is on "
                                 f"{self._device}/{self._dtype}; call prepare_text() again after moving the model.")
            return text
        return self._prepare_text(text, name)

    def _check_bits(self, bits: torch.Tensor, name: str) -> None:
        cfg = self.config
        if not isinstance(bits, torch.Tensor) or bits.dim() != 5:
            shape = tuple(bits.shape) if isinstance(bits, torch.Tensor) else type(bits).__name__
            raise ValueError(f"{name} has shape {shape}; expected [B, rounds*d={cfg.bits}, t, h, w] bit labels "
                             f"(an image is t=1).")
        if bits.shape[1] != cfg.bits:
            raise ValueError(f"{name} has {bits.shape[1]} channels; this refiner reads rounds*d = {cfg.rounds}*"
                             f"{cfg.latent_channels} = {cfg.bits} bit channels (round-major, as "
                             f"hbq.features_to_bits makes them).")
        if bits.is_floating_point() or bits.is_complex():
            raise ValueError(f"{name} has dtype {bits.dtype}; pass 0/1 integer or bool bit labels.")
        if bits.numel() and bits.dtype != torch.bool:
            lo, hi = torch.aminmax(bits)
            if int(lo) < 0 or int(hi) > 1:
                raise ValueError(f"{name} holds values {int(lo)}..{int(hi)}; bit labels must be 0 or 1.")

    def _step_values(self, step_value: float | torch.Tensor, batch: int) -> torch.Tensor:
        r = torch.as_tensor(step_value, dtype=torch.float64).flatten().to(self._device)
        if r.numel() == 1:
            r = r.expand(batch)
        if r.numel() != batch:
            raise ValueError(f"step_value has {r.numel()} entries for a batch of {batch}; pass a float or a [B] "
                             f"tensor.")
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"step_value {step_value!r} is not finite; it is the kept fraction in [0, 1].")
        return r

    # -- packing -------------------------------------------------------------------------------------------------------

    def _plan(
        self, grid: tuple[int, int, int], template: float, first_frame: bool, batch: int,
        contexts: Sequence[TextContext],
    ) -> _Plan:
        """Layout of the packed sequence for this shape (cached: every step of a generation reuses it)."""
        cfg = self.config
        item_of = [[b if ctx.num_items > 1 else 0 for b in range(batch)] for ctx in contexts]
        text_lens = tuple(tuple(ctx.lengths[i] for i in items) for ctx, items in zip(contexts, item_of))
        key = (cfg.layout, grid, template, first_frame, batch, text_lens, self._device, self._dtype)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan

        t, h, w = grid
        visual = t * h * w
        vis_pos = visual_positions(t, h, w, template, frame_offset=1 if first_frame else 0)
        first_pos = visual_positions(1, h, w, template) if first_frame else vis_pos[:0]
        step_pos = step_positions()
        joint = cfg.layout == "joint"
        positions, runs, visual_rows = [], [], []
        row = 0
        for branch, (ctx, items) in enumerate(zip(contexts, item_of)):
            for b in range(batch):
                length_text = ctx.lengths[items[b]]
                if joint:
                    seq = [vis_pos, first_pos, text_positions(length_text), step_pos]
                    text_prefix = 0
                else:
                    seq = [vis_pos, step_pos]
                    text_prefix = length_text
                length = sum(p.shape[0] for p in seq)
                positions.extend(seq)
                visual_rows.append(torch.arange(row, row + visual))
                last = runs[-1] if runs else None
                if (last is not None and last.length == length and last.text_length == text_prefix
                        and (joint or last.branch == branch)):
                    runs[-1] = _Run(last.start, last.count + 1, length, last.branch, last.items + (items[b],),
                                    text_prefix)
                else:
                    runs.append(_Run(row, 1, length, branch, (items[b],), text_prefix))
                row += length
        rope = rope_table(torch.cat(positions), cfg.head_dim, cfg.rope_base, compute_dtype(self._dtype), self._device)
        plan = _Plan(row, tuple(runs), rope, torch.cat(visual_rows).to(self._device))
        self._plans[key] = plan
        while len(self._plans) > self._PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def _apply(self, fn, *args, **kwargs):
        # Moving / casting the model invalidates the cached RoPE tables and row indices.
        self._plans.clear()
        offload = self.__dict__.get("_offload")
        if offload is None:
            return super()._apply(fn, *args, **kwargs)
        # Streamed blocks stay on the CPU whatever the move: skip them, then give them only the cast, on the CPU.
        streamed = [offload.blocks[i] for i in offload.streamed]
        for block in streamed:
            object.__setattr__(block, "_apply", lambda *a, _block=block, **k: _block)
        try:
            result = super()._apply(fn, *args, **kwargs)
        finally:
            for block in streamed:
                object.__delattr__(block, "_apply")

        def cast_only(t: torch.Tensor) -> torch.Tensor:
            dtype = fn(torch.empty(0, dtype=t.dtype, device=t.device)).dtype
            return t if dtype == t.dtype else t.to(dtype)

        for block in streamed:
            block._apply(cast_only)
        offload.refresh()
        return result

    def _block_pass(self) -> contextlib.closing:
        """All blocks in order with their weights on the model's device (streams offloaded blocks); use as
        ``with self._block_pass() as blocks:`` so an early exit or an error releases streamed blocks at once."""
        if self._offload is None:
            return contextlib.closing(_resident(self.blocks))
        return contextlib.closing(self._offload.blocks_on(self._device))

    # -- public API ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prepare_text(self, text: torch.Tensor | Sequence[torch.Tensor], name: str = "text") -> TextContext:
        """Everything about a branch's text that does not change between steps.

        Args:
            text: encoder features ``[L, C_text]`` (shared by the batch), ``[B, L, C_text]``, or a list of B
                ``[L_i, C_text]`` tensors (lengths may differ).
        Returns:
            a :class:`TextContext` to pass to :meth:`step_logits` in place of the raw features. ``joint``: holds the
            ``text_proj`` output. ``prefix``: runs the text through all layers once and holds each layer's K/V.
            Prepared without autograd (a cache for sampling); :meth:`forward` given raw features prepares them with
            autograd, so ``text_proj`` (and, prefix, every layer's text path) is trained.
        """
        return self._prepare_text(text, name)

    def _prepare_text(self, text: torch.Tensor | Sequence[torch.Tensor], name: str) -> TextContext:
        """:meth:`prepare_text` in the caller's autograd mode."""
        items = self._text_items(text, name)
        lengths = tuple(int(t.shape[0]) for t in items)
        for i, n in enumerate(lengths):
            if n > TEXT_MAX_TOKENS:
                raise ValueError(f"{name}[{i}] has {n} tokens; at most {TEXT_MAX_TOKENS} fit (positions 0..511, the "
                                 f"step token sits at 512): truncate the features as the official encoder does.")
        tokens = self._project_text(items)
        if self.config.layout == "joint":
            return TextContext("joint", lengths, tokens=tuple(tokens.split(list(lengths))))

        # prefix: the text attends only to itself; keep every layer's roped K and V.
        positions, runs, row = [], [], 0
        for i, n in enumerate(lengths):
            positions.append(text_positions(n))
            last = runs[-1] if runs else None
            if last is not None and last.length == n:
                runs[-1] = _Run(last.start, last.count + 1, n, 0, (), 0)
            else:
                runs.append(_Run(row, 1, n, 0, (), 0))
            row += n
        cfg = self.config
        rope = rope_table(torch.cat(positions), cfg.head_dim, cfg.rope_base, compute_dtype(self._dtype), self._device)
        keys, values = [], []
        x = tokens
        with self._block_pass() as blocks:
            for layer, block in enumerate(blocks):
                _check_stop(self, layer)
                q, k, v = self._qkv(block, _rms_norm(x, block.input_layernorm), rope)
                keys.append(k.contiguous())  # own copies: the views would keep the whole q/k/v buffer alive
                values.append(v.contiguous())
                if layer == cfg.depth - 1:
                    break  # the last layer's output is never read: only its K/V are needed
                attn = self._attend(q, k, v, runs, layer, ())
                x = _linear(attn, block.attn.o_proj, residual=x)
                x = block.mlp(_rms_norm(x, block.post_attention_layernorm), residual=x)
        return TextContext("prefix", lengths, keys=tuple(keys), values=tuple(values))

    def _forward_packed(
        self,
        bits: torch.Tensor,
        step_value: float | torch.Tensor,
        text_cond: TextInput,
        text_uncond: TextInput | None,
        aspect_ratio: float | None,
        first_frame_bits: torch.Tensor | None,
        split: SequenceSplit | None = None,
    ) -> tuple[torch.Tensor, _Plan, tuple[int, int, int], int]:
        """Run all blocks on the packed sequence; returns the final hidden states ``[N, width]`` and the plan
        (with ``split``: this rank's ``ceil(N / world)`` rows of the padded sequence)."""
        cfg = self.config
        self._check_bits(bits, "bits")
        batch, _, t, h, w = bits.shape
        if first_frame_bits is not None:
            if cfg.layout == "prefix":
                raise ValueError("first_frame_bits given, but prefix-layout refiners (first MGenAI files) have no "
                                 "image-to-video path; use a joint-layout I2V checkpoint.")
            self._check_bits(first_frame_bits, "first_frame_bits")
            if first_frame_bits.shape[0] not in (1, batch) or tuple(first_frame_bits.shape[2:]) != (1, h, w):
                raise ValueError(f"first_frame_bits has shape {tuple(first_frame_bits.shape)}; expected "
                                 f"[{batch} or 1, {cfg.bits}, 1, {h}, {w}] (one clean latent frame on the grid of "
                                 f"bits).")
        if aspect_ratio is None:
            aspect_ratio = h / w
        template = aspect_template(aspect_ratio)
        contexts = [self._context(text_cond, "text_cond")]
        if text_uncond is not None:
            contexts.append(self._context(text_uncond, "text_uncond"))
        for ctx, name in zip(contexts, ("text_cond", "text_uncond")):
            if ctx.num_items not in (1, batch):
                raise ValueError(f"{name} holds {ctx.num_items} prompts for a batch of {batch}; pass 1 or {batch}.")
        r = self._step_values(step_value, batch)

        plan = self._plan((t, h, w), template, first_frame_bits is not None, batch, contexts)
        visual = self._grid_tokens(bits.to(self._device))
        first = None
        if first_frame_bits is not None:
            first = self._grid_tokens(first_frame_bits.to(self._device)).expand(batch, -1, -1)
        step = self.pt_embedder(r)
        pieces = []
        for ctx in contexts:
            for b in range(batch):
                pieces.append(visual[b])
                if cfg.layout == "joint":
                    if first is not None:
                        pieces.append(first[b])
                    pieces.append(ctx.tokens[b if ctx.num_items > 1 else 0])
                pieces.append(step[b:b + 1])
        x = torch.cat(pieces)
        rope = plan.rope
        if split is not None:
            check_split_heads(cfg, split.world)
            x, rope = _my_rows(x, split), _my_rows(rope, split)
        with self._block_pass() as blocks:
            for layer, block in enumerate(blocks):
                _check_stop(self, layer)
                x = self._block(block, x, rope, plan.runs, layer, contexts, split)
        return x, plan, (t, h, w), len(contexts)

    @torch.no_grad()
    def step_logits(
        self,
        bits: torch.Tensor,
        step_value: float | torch.Tensor,
        text_cond: TextInput,
        text_uncond: TextInput | None = None,
        aspect_ratio: float | None = None,
        first_frame_bits: torch.Tensor | None = None,
        split: SequenceSplit | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bit logits of one refinement step for the conditional and (optionally) the unconditional branch.

        Args:
            bits: ``[B, rounds*d, t, h, w]`` 0/1 bit labels (round-major); for I2V the generated frames only.
            step_value: kept fraction fed to the step token: a float or a ``[B]`` tensor.
            text_cond: encoder features ``[L, C_text]`` / ``[B, L, C_text]`` / list of B ``[L_i, C_text]``, or a
                :class:`TextContext` from :meth:`prepare_text` (reuse it across steps).
            text_uncond: the same for the unconditional branch, or ``None`` to skip that branch entirely
                (guidance 1): ``uncond`` is then ``None`` and nothing of it is computed.
            aspect_ratio: ``h / w`` of the request; mapped to the nearest of the 15 templates (truncated to 3
                decimals) for the RoPE positions. ``None`` uses the grid's own ``h / w``.
            first_frame_bits: I2V only, ``[B or 1, rounds*d, 1, h, w]`` clean bits of the given first frame.
            split: sequence parallel (module docstring): every rank of the group calls with the same arguments and
                its own split, and all get the whole logits.
        Returns:
            ``(cond, uncond)`` logits, each ``[B, t, h, w, rounds*d, 2]`` in the compute dtype (float32 for half
            models), or ``uncond = None``.
        """
        # No autograd here: the pass takes its in-place kernels (see _recording), and samplers get no graph.
        return self._logits(bits, step_value, text_cond, text_uncond, aspect_ratio, first_frame_bits, split)

    def forward(
        self,
        bits: torch.Tensor,
        step_value: float | torch.Tensor,
        text: TextInput,
        aspect_ratio: float | None = None,
        first_frame_bits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bit logits of one guidance branch, ``[B, t, h, w, rounds*d, 2]``: the training entry point.

        The pass of :meth:`step_logits` for the conditional branch alone (same arguments, ``text`` for
        ``text_cond``), run in the caller's autograd mode: with autograd on it is differentiable in every
        parameter, and ``CE(ref(x_s, r, c), x)`` is the training loss; on or off, its values are
        ``step_logits(...)[0]`` (bit for bit on the CPU, ``tests/test_refiner_model.py``). Raw ``text`` is projected
        (joint) or run through the layers (prefix) inside the pass, so its path is trained too; per-sample lists of
        different lengths are fine.
        """
        cond, _ = self._logits(bits, step_value, text, None, aspect_ratio, first_frame_bits)
        return cond

    def _logits(
        self,
        bits: torch.Tensor,
        step_value: float | torch.Tensor,
        text_cond: TextInput,
        text_uncond: TextInput | None,
        aspect_ratio: float | None,
        first_frame_bits: torch.Tensor | None,
        split: SequenceSplit | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(cond, uncond or None)`` = ``head(RMS(x_L[visual]))`` per branch, in the caller's autograd mode."""
        x, plan, (t, h, w), branches = self._forward_packed(
            bits, step_value, text_cond, text_uncond, aspect_ratio, first_frame_bits, split)
        batch = bits.shape[0]
        if split is not None:  # the head on my rows, then every rank's (logits are narrower than the width)
            logits = split.gather_rows(self.head(x))[:plan.rows].index_select(0, plan.visual_index)
        else:
            logits = self.head(x.index_select(0, plan.visual_index))
        logits = logits.view(branches, batch, t, h, w, self.config.bits, 2)
        return logits[0], (logits[1] if branches > 1 else None)

    @torch.no_grad()
    def sequence_logits(
        self,
        bits: torch.Tensor,
        step_value: float | torch.Tensor,
        text_cond: TextInput,
        text_uncond: TextInput | None = None,
        aspect_ratio: float | None = None,
        first_frame_bits: torch.Tensor | None = None,
        split: SequenceSplit | None = None,
    ) -> torch.Tensor:
        """Head output for *every* row of the packed sequence, ``[N, rounds*d*2]`` (for golden tests / debugging).

        Row order is the official one: cond branch, then uncond; per branch and sample ``[visual | first frame |
        text | step token]`` (joint) or ``[visual | step token]`` (prefix). Only the visual rows are meaningful.
        """
        x, plan, _, _ = self._forward_packed(bits, step_value, text_cond, text_uncond, aspect_ratio,
                                             first_frame_bits, split)
        return self.head(x) if split is None else split.gather_rows(self.head(x))[:plan.rows]
