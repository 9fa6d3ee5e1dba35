"""Attention backends: every one equals the SDPA reference; selection is automatic, explicit choices are checked.

On a machine without CUDA / FlashAttention / SageAttention the real-kernel comparisons skip (with the reason);
the dispatch code (layout, grouped-query heads, selection rules, the refiner's use of it) is still tested through
stand-in modules that compute exact attention in the packages' calling conventions.
"""

import sys
import types

import pytest
import torch

from grn_core.checkpoints import load_refiner
from grn_core.runtime import attention as attn
from tests._golden import GOLDEN, load_golden, rel_err


def reference(q, k, v):
    """Explicit float64 softmax attention, [n, L, H, D] layout, kv heads repeated."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2).double(), v.repeat_interleave(rep, 2).double()
    scores = torch.einsum("nlhd,nshd->nhls", q.double(), k) / q.shape[-1] ** 0.5
    return torch.einsum("nhls,nshd->nlhd", scores.softmax(-1), v)


def qkv(n=2, length=37, keys=45, heads=4, kv_heads=2, dim=16, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return make(n, length, heads, dim), make(n, keys, kv_heads, dim), make(n, keys, kv_heads, dim)


@pytest.fixture
def fake_kernels(monkeypatch):
    """Stand-ins for flash_attn / sageattention with their real signatures and layouts (NHD)."""
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert not causal and q.dim() == 4 and k.shape[2] <= q.shape[2]  # NHD, native grouped-query heads
        calls.append(("flash", k.shape[2]))
        return reference(q, k, v).to(q.dtype)

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None):
        assert tensor_layout == "NHD" and not is_causal and k.shape[2] == q.shape[2]
        calls.append(("sage", k.shape[2]))
        return reference(q, k, v).to(q.dtype)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=sageattn))
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # FlashAttention-3 absent
    attn.refresh_backends()
    yield calls
    attn.refresh_backends()


def test_sdpa_equals_explicit_softmax_with_grouped_heads():
    q, k, v = qkv(dtype=torch.float64)
    out = attn.attend(q, k, v, "sdpa")
    assert out.shape == q.shape
    assert rel_err(out, reference(q, k, v)) < 1e-12


@pytest.mark.parametrize("backend", ["flash", "sage"])
def test_dispatch_layout_equals_sdpa(fake_kernels, backend):
    q, k, v = qkv()
    out = attn.attend(q, k, v, backend)
    assert out.shape == q.shape
    assert rel_err(out, attn.attend(q, k, v, "sdpa")) < 1e-5
    # FlashAttention gets the 2 kv heads as they are; SageAttention gets them repeated to 4.
    assert fake_kernels == [(backend, 2 if backend == "flash" else 4)]


def test_auto_picks_sdpa_off_cuda_and_explicit_choices_are_checked():
    assert attn.resolve_backend("auto", "cpu", torch.bfloat16, 128) == "sdpa"
    assert attn.resolve_backend("SDPA", "cpu", torch.float32, 128) == "sdpa"
    with pytest.raises(ValueError, match="not one of auto, sdpa, flash, sage"):
        attn.check_backend("xformers")
    status = attn.backend_status()
    for name in ("flash", "sage"):
        if status[name] != "available":
            with pytest.raises(ValueError, match="not installed .*pip install"):
                attn.check_backend(name)


def test_selection_rules_on_a_simulated_gpu(fake_kernels, monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(attn, "_capability", lambda device: (8, 9))
    assert attn.resolve_backend("auto", cuda, torch.bfloat16, 128) == "flash"
    assert attn.resolve_backend("auto", cuda, torch.float32, 128) == "sdpa"  # FlashAttention has no fp32
    assert attn.resolve_backend("auto", cuda, torch.float16, 320) == "sdpa"  # head_dim > 256
    assert attn.resolve_backend("sage", cuda, torch.bfloat16, 128) == "sage"  # only by name: approximate
    with pytest.raises(ValueError, match="fp16/bf16.*Use attention='auto' or 'sdpa'"):
        attn.resolve_backend("flash", cuda, torch.float32, 128)
    with pytest.raises(ValueError, match="CUDA GPUs only"):
        attn.resolve_backend("flash", "cpu", torch.bfloat16, 128)
    monkeypatch.setattr(attn, "_capability", lambda device: (7, 5))
    assert attn.resolve_backend("auto", cuda, torch.float16, 128) == "sdpa"  # Turing: no FlashAttention-2


def test_refiner_runs_its_attention_through_the_chosen_backend(fake_kernels, monkeypatch):
    io = load_golden("refiner_joint_io.safetensors")
    args = (io["t2v.step0.labels"].long(), float(io["t2v.pt_values"][0]), io["text_cond"], io["text_uncond"])
    ref = load_refiner(GOLDEN / "refiner_joint_weights.safetensors", layout="joint", attention="sdpa")
    expected = ref.step_logits(*args, aspect_ratio=0.562)[0]
    ref.set_attention("flash")  # importable (stand-in), so accepted; on the CPU it cannot run:
    with pytest.raises(ValueError, match="cannot run here: it runs on CUDA GPUs only"):
        ref.step_logits(*args, aspect_ratio=0.562)
    # Pretend the device can: the refiner's packed q/k/v views go through the FlashAttention calling convention.
    monkeypatch.setattr("grn_core.refiner.model.resolve_backend", lambda *a: "flash")
    ref.set_attention("flash")
    got = ref.step_logits(*args, aspect_ratio=0.562)[0]
    assert fake_kernels and all(name == "flash" for name, _ in fake_kernels)
    assert rel_err(got, expected) < 1e-5


# ---- real kernels (need a GPU and the packages) ---------------------------------------------------------------------

def _skip_unless(backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: real FlashAttention / SageAttention kernels cannot run")
    status = attn.backend_status()[backend]
    if status != "available":
        pytest.skip(f"{backend}: {status}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend, tolerance", [("flash", 2e-2), ("sage", 6e-2)])
def test_real_kernels_equal_sdpa(backend, tolerance, dtype):
    _skip_unless(backend)
    q, k, v = qkv(n=2, length=300, keys=333, heads=8, kv_heads=8, dim=128, dtype=dtype, device="cuda")
    name = attn.resolve_backend(backend, q.device, dtype, 128)
    expected = reference(q, k, v)
    assert rel_err(attn.attend(q, k, v, "sdpa"), expected) < 2e-2
    assert rel_err(attn.attend(q, k, v, name), expected) < tolerance
