"""One fused refinement step: guidance, tempered per-bit sampling, keep mask, mix with Z, statistics.

Shapes ("flattened": one row per batch sample, spatial positions flattened into T tokens of D bits):

    cond, uncond   [R, T, D, 2] logits (any float dtype; math runs in float32)
    w, tau, keep_prob  [R] float (per-sample guidance, temperature, keep probability r_{i+1})
    u_sample, u_keep   [R, T, D] float32 uniforms in [0, 1)
    z, prev_bits       [R, T, D] uint8 (random map Z, and the map x_i the model just saw)
    prev_kept          [R, T, D] bool

Per bit, after guidance ``g = u + w (c - u)`` (``g = c`` where ``w == 1`` or without ``uncond``; only the
class difference matters, so it is formed first: ``g1 - g0 = du + w (dc - du)``, ``dc = c1 - c0``):

    p1     = sigmoid((g1 - g0) / tau)        # softmax over the 2 classes, class 1
    sample = u_sample < p1                   # strict: an exact tie gives 0
    kept   = u_keep < keep_prob
    mixed  = where(kept, sample, z)          # x_{i+1}
    H      = binary entropy of softmax(c) / log 2   (conditional logits, untempered)

plus the state of every bit and the plurality state of every token (``states``).

Torch and Triton compute ``p1`` with different ``exp`` implementations (and the GPU may fuse multiply-adds),
so the two can differ in the last float32 place. Their bits are therefore identical whenever ``u_sample``
is not within ~1e-6 of ``p1``; at such near-ties (about one bit in a million) either answer is a valid
sample. Each device always uses one implementation, so a seed reproduces exactly on the same device kind.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .states import classify_states, plurality_states

LN2 = 0.6931471805599453


class StepOutput(NamedTuple):
    sample: torch.Tensor        # uint8 [R, T, D] full sample
    mixed: torch.Tensor         # uint8 [R, T, D] next input map x_{i+1}
    kept: torch.Tensor          # bool  [R, T, D]
    entropy_sum: torch.Tensor   # float64 [R] sum of per-bit entropies (divide by T*D for the mean)
    state_counts: torch.Tensor  # int64 [R, 4] bit counts of FILL, KEEP, ERASE, BLANK
    token_states: torch.Tensor  # uint8 [R, T] plurality state per token
    probs: Optional[torch.Tensor] = None  # float32 [R, T, D] p1, when asked for


def entropy_of_difference(dc: torch.Tensor) -> torch.Tensor:
    """Binary entropy in bits of softmax([l0, l1]) from dc = l1 - l0; float32, no NaN at saturation.

    With a = |dc| and e = exp(-a): H_nat = log(1 + e) + a e / (1 + e).
    """
    a = dc.float().abs()
    e = torch.exp(-a)
    return (torch.log(1.0 + e) + a * e / (1.0 + e)) / LN2


def binary_entropy_from_logits(cond: torch.Tensor) -> torch.Tensor:
    """Entropy (in bits, i.e. / log 2) of softmax over the last dim of size 2."""
    c = cond.float()
    return entropy_of_difference(c[..., 1] - c[..., 0])


def mean_bit_entropy(cond: torch.Tensor) -> torch.Tensor:
    """[R] mean binary entropy per row of [R, ..., 2] logits (float64)."""
    return binary_entropy_from_logits(cond).reshape(cond.shape[0], -1).double().mean(1)


def guided_difference(cond: torch.Tensor, uncond: Optional[torch.Tensor],
                      w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dc, g1 - g0): conditional and guided class differences, float32 [R, ...]; g = c where w == 1."""
    c = cond.float()
    dc = c[..., 1] - c[..., 0]
    if uncond is None:
        return dc, dc
    u = uncond.float()
    du = u[..., 1] - u[..., 0]
    wv = w.float().view((-1,) + (1,) * (dc.dim() - 1))
    return dc, torch.where(wv == 1.0, dc, du + wv * (dc - du))


def fused_step_reference(cond: torch.Tensor, uncond: Optional[torch.Tensor], w: torch.Tensor, tau: torch.Tensor,
                         u_sample: torch.Tensor, u_keep: torch.Tensor, z: torch.Tensor, keep_prob: torch.Tensor,
                         prev_kept: torch.Tensor, prev_bits: torch.Tensor, return_probs: bool = False) -> StepOutput:
    """Torch reference of the fused step (see module docstring); also the CPU path of the sampler."""
    rows = cond.shape[0]
    dc, diff = guided_difference(cond, uncond, w)
    p1 = torch.sigmoid(diff / tau.float().view(-1, 1, 1))
    sample = (u_sample < p1).to(torch.uint8)
    kept = u_keep < keep_prob.float().view(-1, 1, 1)
    mixed = torch.where(kept, sample, z)
    entropy_sum = entropy_of_difference(dc).reshape(rows, -1).double().sum(1)
    states = classify_states(prev_kept.bool(), kept, mixed != prev_bits)
    token_states, per_token = plurality_states(states, dim=-1)
    return StepOutput(sample, mixed, kept, entropy_sum, per_token.sum(1), token_states, p1 if return_probs else None)
