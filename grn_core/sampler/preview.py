"""Cheap RGB previews of a latent without the tokenizer's decoder.

``LatentRGBProjection`` is an affine map ``rgb = features @ weight + bias`` fitted by least squares on
(latent feature, pixel colour) pairs, e.g. tokenizer features and the image downsampled to the latent
grid. The sampler never calls it by itself: pass ``preview_fn`` (any callable) to the loop, for instance
``bits_preview(projection, rounds)``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


class LatentRGBProjection:
    """Affine latent -> RGB map. weight [d, 3], bias [3]."""

    def __init__(self, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
        self.weight = weight
        self.bias = bias

    def fit(self, features: torch.Tensor, rgb: torch.Tensor) -> "LatentRGBProjection":
        """Least squares on features [N, d] -> rgb [N, 3] (with a bias); returns self."""
        if features.dim() != 2 or rgb.dim() != 2 or rgb.shape[1] != 3 or features.shape[0] != rgb.shape[0]:
            raise ValueError(f"fit needs features [N, d] and rgb [N, 3], got {tuple(features.shape)} and "
                             f"{tuple(rgb.shape)}; flatten the spatial positions into N first")
        x = torch.cat([features.double(), torch.ones(features.shape[0], 1, dtype=torch.float64,
                                                     device=features.device)], dim=1)
        solution = torch.linalg.lstsq(x.cpu(), rgb.double().cpu()).solution  # [d+1, 3]
        self.weight = solution[:-1].float()
        self.bias = solution[-1].float()
        return self

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., d, h, w] (e.g. [B, d, t, h, w] -> use [..., d, h, w] per frame) -> rgb [..., 3, h, w]."""
        if self.weight is None:
            raise ValueError("LatentRGBProjection is not fitted; call fit(features, rgb) or pass weight and bias")
        d = self.weight.shape[0]
        if features.dim() < 3 or features.shape[-3] != d:
            raise ValueError(f"expected features [..., {d}, h, w], got {tuple(features.shape)}")
        w = self.weight.to(features.device, torch.float32)
        b = self.bias.to(features.device, torch.float32)
        return torch.einsum("...dhw,dc->...chw", features.float(), w) + b.view(3, 1, 1)

    def to_dict(self) -> dict:
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "LatentRGBProjection":
        return cls(torch.tensor(data["weight"], dtype=torch.float32), torch.tensor(data["bias"], dtype=torch.float32))


def bits_preview(projection: LatentRGBProjection, rounds: int = 4) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``preview_fn`` for the bit loop: bits [n, rounds*d, t, h, w] -> RGB [n, t, 3, h, w] in about [-1, 1].

    For C2I index labels use ``hbq.indices_to_features`` and the projection directly.
    """
    def preview(bits: torch.Tensor) -> torch.Tensor:
        from grn_core import hbq

        features = hbq.bits_to_features(bits, rounds).transpose(1, 2)  # [n, t, d, h, w]
        return projection(features)
    return preview
