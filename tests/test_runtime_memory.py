"""Out of memory in a step or a decode becomes an error that names the settings to change; the pipeline places
models by the offload policy; the activation estimate behaves as the refiner allocates."""

import pytest
import torch

from grn_core.checkpoints import load_refiner, load_tokenizer
from grn_core.pipeline import GenerationRequest, GRNModel, decode_tokens, encode_prompt, generate_tokens, load_model
from grn_core.refiner import GRN2b, GRN8b
from grn_core.runtime.memory import GRNOutOfMemoryError, is_out_of_memory, oom_guard, refiner_step_bytes
from grn_core.runtime.offload import OffloadPolicy
from grn_core.sampler import SamplerSettings
from tests._golden import GOLDEN
from tests.test_pipeline import WordHashEncoder

GiB = 1024 ** 3
REFINER = GOLDEN / "refiner_joint_weights.safetensors"
TOKENIZER = GOLDEN / "tokenizer_weights.safetensors"


def test_guard_translates_out_of_memory_and_drops_the_original():
    with pytest.raises(GRNOutOfMemoryError) as info:
        with oom_guard("the refiner step", lambda: ["offload: 'blocks'", "weight dtype: fp8_e4m3fn"]):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    error = info.value
    assert error.stage == "the refiner step" and error.advice == ("offload: 'blocks'", "weight dtype: fp8_e4m3fn")
    text = str(error)
    assert text.startswith("Out of memory during the refiner step") and "Tried to allocate 2.00 GiB" in text
    assert "  - offload: 'blocks'\n  - weight dtype: fp8_e4m3fn" in text
    # the original stays reachable for debugging, but without the traceback that would keep the failed frames'
    # tensors alive
    assert error.__suppress_context__ and isinstance(error.__context__, torch.OutOfMemoryError)
    assert error.__context__.__traceback__ is None


def test_guard_passes_other_errors_and_recognises_backend_texts():
    with pytest.raises(ValueError, match="bad size"):
        with oom_guard("x"):
            raise ValueError("bad size")
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 17 GB)"))
    assert is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.fixture(scope="module")
def model():
    return GRNModel(load_refiner(REFINER, layout="joint"), load_tokenizer(TOKENIZER), ("t2v", "i2v", "t2i"),
                    name="golden")


def test_step_out_of_memory_names_the_settings(model, monkeypatch):
    feats = encode_prompt(model, WordHashEncoder(), "a red circle", task="t2v")

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(model.refiner, "step_logits", oom)
    request = GenerationRequest(width=48, height=64, frames=9, seed=1, batch_size=2,
                                settings=SamplerSettings(steps=2, guidance=3.0))
    with pytest.raises(GRNOutOfMemoryError) as info:
        generate_tokens(model, feats, request)
    text = str(info.value)
    for expected in ("refiner step", "offload: 'blocks'", "fp8_e4m3fn", "now fp32", "48x64x9 frames",
                     "batch size 1 (now 2)", "guidance 1.0"):
        assert expected in text, expected


def test_decode_out_of_memory_names_tiling(model, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
        yield  # pragma: no cover - a generator, like decode_iter

    monkeypatch.setattr(model.tokenizer, "decode_iter", oom)
    with pytest.raises(GRNOutOfMemoryError, match="(?s)tokenizer decode.*decode tile"):
        decode_tokens(model, torch.zeros(1, 32, 1, 4, 3, dtype=torch.uint8))


def test_pipeline_places_models_by_policy():
    caller_placed = load_model(REFINER, TOKENIZER, layout="joint")
    assert caller_placed.compute_device is None and caller_placed.offload == OffloadPolicy("none")
    cpu = load_model(REFINER, TOKENIZER, layout="joint", device="cpu", offload="blocks", attention="sdpa")
    assert cpu.offload == OffloadPolicy("none")  # nothing to offload to on the CPU
    assert cpu.refiner.attention == "sdpa" and cpu.weight_dtype == "fp32"
    fp8 = load_model(REFINER, TOKENIZER, layout="joint", dtype="fp8_e4m3fn")
    assert fp8.weight_dtype == "fp8_e4m3fn"
    assert next(fp8.tokenizer.parameters()).dtype == torch.bfloat16  # convolutions: no fp8 path


def test_staged_text_encoder_comes_and_goes(monkeypatch):
    model = load_model(REFINER, TOKENIZER, layout="joint", device="cpu")
    model.compute_device, model.offload = torch.device("cuda"), OffloadPolicy("model")  # the stand-in never moves
    moves = []

    class Encoder(torch.nn.Module, WordHashEncoder):
        def __init__(self):
            torch.nn.Module.__init__(self)
            WordHashEncoder.__init__(self)

        def to(self, device):
            moves.append(str(device))
            return self

    encode_prompt(model, Encoder(), "a red circle", task="t2v")
    assert moves == ["cuda", "cpu"]  # to the compute device for the stage, then back home


def test_activation_estimate_scales_with_the_request():
    grid = (9, 30, 53)  # 480x848x33 frames
    two = refiner_step_bytes(GRN8b(), grid, text_tokens=120, branches=2)
    one = refiner_step_bytes(GRN8b(), grid, text_tokens=120, branches=1)
    assert 1.8 < two / one < 2.1
    assert refiner_step_bytes(GRN8b(), (17, 30, 53)) > 1.8 * refiner_step_bytes(GRN8b(), grid) * 0.95
    # GRN2b T2V default: a few GB of activations next to 4.4 GB of bf16 weights, well inside 24 GB
    assert 1 * GiB < refiner_step_bytes(GRN2b(), grid) < 8 * GiB
