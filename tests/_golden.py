"""Helpers for the golden-equivalence tests (tensors produced by the official GRN code, see golden/README.md)."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "golden"


def load_golden(name: str) -> dict[str, torch.Tensor]:
    """Load one golden safetensors file as a dict of tensors."""
    return load_file(str(GOLDEN / name))


def golden_meta(layout: str) -> dict:
    return json.loads((GOLDEN / f"meta_{layout}.json").read_text())


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| — the relative error the golden checks are stated in."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))
