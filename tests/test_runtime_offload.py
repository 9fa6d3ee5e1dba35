"""Block offload gives the same logits as a resident model while holding at most 1 + prefetch streamed blocks on
the compute device; the offload policy parses, decides and stages models as documented.

The CPU stands in for the GPU: ``simulate=True`` makes the offloader copy blocks even though source and target are
both the CPU, so "on the device" is observable as "the block's tensors are not its CPU copies".
"""

import pytest
import torch

from grn_core.checkpoints import load_refiner
from grn_core.runtime.offload import OffloadPolicy, auto_policy, module_bytes, on_device
from tests._golden import GOLDEN, load_golden

GiB = 1024 ** 3


def golden_args(layout):
    io = load_golden(f"refiner_{layout}_io.safetensors")
    return (io["t2v.step0.labels"].long(), float(io["t2v.pt_values"][0]), io["text_cond"], io["text_uncond"])


def load(layout, dtype="fp32"):
    return load_refiner(GOLDEN / f"refiner_{layout}_weights.safetensors", layout=layout, dtype=dtype)


def watch_blocks(model, offload, seen):
    """Wrap ``_block`` (one call per block of a step) to record which streamed blocks are on the device."""
    original = model._block
    blocks = model.blocks

    def block(blk, *args, **kwargs):
        index = next(i for i, b in enumerate(blocks) if b is blk)
        loaded = [i for i in offload.streamed if offload.is_on_device(i)]
        seen.append((index, loaded))
        return original(blk, *args, **kwargs)

    model._block = block


@pytest.mark.parametrize("layout", ["joint", "prefix"])
@pytest.mark.parametrize("streamed, prefetch", [(4, 1), (3, 1), (4, 0), (2, 2)])
def test_streamed_logits_are_identical_and_bounded(layout, streamed, prefetch):
    args = golden_args(layout)
    model = load(layout)
    expected = model.step_logits(*args, aspect_ratio=0.562)
    offload = model.enable_block_offload(streamed, device="cpu", prefetch=prefetch, simulate=True)
    assert offload.streamed == list(range(4 - streamed, 4))  # the last blocks stream
    seen = []
    watch_blocks(model, offload, seen)
    got = model.step_logits(*args, aspect_ratio=0.562)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    for index, loaded in seen:
        assert len(loaded) <= 1 + prefetch, (index, loaded)
        if index in offload.streamed:
            assert index in loaded  # computing with the device copy, not the CPU one
    assert offload.peak_streamed_on_device <= 1 + prefetch
    assert not any(offload.is_on_device(i) for i in offload.streamed)  # all dropped after the pass


def test_prefix_text_pass_releases_blocks_after_its_early_exit():
    model = load("prefix")
    offload = model.enable_block_offload("all", device="cpu", prefetch=1, simulate=True)
    context = model.prepare_text(golden_args("prefix")[2])
    assert len(context.keys) == 4
    assert not any(offload.is_on_device(i) for i in offload.streamed)


def test_an_error_mid_pass_releases_streamed_blocks():
    model = load("joint")
    offload = model.enable_block_offload("all", device="cpu", simulate=True)
    original = model._block

    def failing(block, *args, **kwargs):
        if block is model.blocks[2]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(block, *args, **kwargs)

    model._block = failing
    with pytest.raises(torch.OutOfMemoryError):
        model.step_logits(*golden_args("joint"), aspect_ratio=0.562)
    assert not any(offload.is_on_device(i) for i in offload.streamed)


def test_casts_reach_streamed_blocks_and_moves_do_not():
    args = golden_args("joint")
    expected = load("joint", "fp64").step_logits(*args, aspect_ratio=0.562)[0]
    model = load("joint")
    offload = model.enable_block_offload(2, device="cpu", simulate=True)
    host_before = offload._slots[3][0].host
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert offload._slots[3][0].host is not host_before and offload._slots[3][0].host.device.type == "cpu"
    assert torch.equal(model.step_logits(*args, aspect_ratio=0.562)[0], expected)
    model.disable_block_offload()
    assert model.block_offload is None
    assert torch.equal(model.step_logits(*args, aspect_ratio=0.562)[0], expected)


def test_block_offload_with_fp8_storage():
    args = golden_args("joint")
    model = load("joint", "fp8_e4m3fn")
    expected = model.step_logits(*args, aspect_ratio=0.562)[0]
    offload = model.enable_block_offload("all", device="cpu", simulate=True)
    # fp8 weights cross the bus as one byte each (plus the per-row scales).
    assert offload.streamed_bytes < 0.6 * sum(module_bytes(load("joint", "bf16").blocks[i]) for i in range(4))
    assert torch.equal(model.step_logits(*args, aspect_ratio=0.562)[0], expected)


def test_block_counts_are_checked():
    model = load("joint")
    for bad in (0, 5, -1, "some", True):
        with pytest.raises(ValueError, match="stream 1..4 blocks"):
            model.enable_block_offload(bad)


def test_loader_sets_up_offload_and_attention():
    model = load_refiner(GOLDEN / "refiner_joint_weights.safetensors", layout="joint", offload_blocks=3,
                         attention="sdpa")
    assert model.block_offload is not None and model.block_offload.streamed == [1, 2, 3]
    assert model.attention == "sdpa"


# ---- policy ---------------------------------------------------------------------------------------------------------

def test_policy_parsing():
    assert OffloadPolicy.parse(None).mode == "auto"
    assert OffloadPolicy.parse("blocks:12") == OffloadPolicy("blocks", 12)
    assert OffloadPolicy.parse(8) == OffloadPolicy("blocks", 8)
    assert OffloadPolicy.parse(0) == OffloadPolicy("model")
    assert OffloadPolicy.parse("Model").moves_models and not OffloadPolicy.parse("none").moves_models
    for bad in ("blocks:0", "blocks:x", "everything", True):
        with pytest.raises(ValueError, match="offload="):
            OffloadPolicy.parse(bad)


def test_auto_policy_picks_the_least_offload_that_fits():
    # GRN8b-like sizes: 36 blocks of 0.2 GB (fp8), 0.1 GB other; tokenizer 1.4 GB; 4 GB of activations.
    block, depth = int(0.2 * GiB), 36
    refiner = block * depth + int(0.1 * GiB)
    kwargs = dict(refiner_bytes=refiner, block_bytes=block, depth=depth, other_bytes=int(1.4 * GiB),
                  activation_bytes=4 * GiB)
    assert auto_policy("cuda", free_bytes=80 * GiB, **kwargs) == OffloadPolicy("none")
    assert auto_policy("cuda", free_bytes=13.4 * GiB, **kwargs) == OffloadPolicy("model")
    fit = auto_policy("cuda", free_bytes=10 * GiB, **kwargs)
    assert fit.mode == "blocks" and 0 < fit.blocks < depth
    on_device = refiner - fit.blocks * block + 2 * block + 4 * GiB
    assert on_device <= 9 * GiB < on_device + block  # the smallest N that fits 90 % of 10 GB
    assert auto_policy("cuda", free_bytes=2 * GiB, **kwargs) == OffloadPolicy("blocks", depth, 1)
    assert auto_policy("cpu", free_bytes=1, **kwargs) == OffloadPolicy("none")


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.moves = []

    def to(self, device):
        self.moves.append(str(device))
        return self


def test_stage_moves_back_even_on_errors():
    module = Recorder()
    with pytest.raises(RuntimeError):
        with on_device(module, "cuda", offload_after=True):
            raise RuntimeError("boom")
    assert module.moves == ["cuda", "cpu"]
    module = Recorder()
    with on_device(module, "cuda", offload_after=False):
        pass
    assert module.moves == ["cuda"]
