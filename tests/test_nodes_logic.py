"""The logic behind the ComfyUI nodes, run without ComfyUI on the golden refiner + tokenizer (random weights, d = 8,
32-wide text): sizes, task tags, CLIP tokenization, errors that name the node and the fix, widget events, decode."""

import hashlib
import json

import pytest
import torch

from grn_core.checkpoints import checkpoint_metadata, save_checkpoint
from grn_core.pipeline import GRNModel, decode_tokens, load_model
from grn_core.presets import OFFICIAL_NEGATIVE_PROMPT
from grn_core.request import prepare_first_frame
from grn_core.sampler import AdaptiveSteps
from grn_core.tokenizer import tiled as tiled_decode
from grn_core.runtime.fp8 import Fp8Linear
from grn_core.runtime.memory import GRNOutOfMemoryError
from grn_core.runtime.offload import module_bytes
from grn_core.tokenizer import HBQTokenizer, TokenizerConfig
from grn_nodes import errors, frames, loading, model_files, prompting, sampling, stats
from grn_nodes.widget_events import MAX_EVENT_BYTES, event_size, unpack_state_map
from tests._golden import GOLDEN

REFINER = GOLDEN / "refiner_joint_weights.safetensors"
TOKENIZER = GOLDEN / "tokenizer_weights.safetensors"


class WordHashEncoder:
    """Deterministic stand-in text encoder (32-wide rows, one per word plus an end row)."""

    def __init__(self, dim: int = 32):
        self.dim = dim
        self.calls: list[str] = []

    def encode(self, prompt: str, allow_empty: bool = False) -> torch.Tensor:
        self.calls.append(prompt)
        rows = []
        for word in prompt.split() + ["</s>"]:
            seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            rows.append(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows)


def prefix_refiner():
    """The golden prefix-layout refiner (the first MGenAI files' layout, which has no image-to-video path)."""
    from grn_core.checkpoints import load_refiner

    return load_refiner(GOLDEN / "refiner_prefix_weights.safetensors", layout="prefix")


@pytest.fixture(scope="module")
def loaded() -> loading.LoadedGRN:
    return loading.load_grn(REFINER, TOKENIZER)


@pytest.fixture(scope="module")
def conditioning(loaded) -> prompting.GRNConditioning:
    return prompting.encode_prompt_for(loaded, WordHashEncoder(), "a red circle", "blurry")


# ---- Load GRN -----------------------------------------------------------------------------------------------------

def test_load_reads_tasks_and_fits_a_preview(loaded):
    assert loaded.tasks == ("t2i", "t2v", "i2v")
    assert loaded.model.preview is not None
    assert loaded.keep_on_device is False
    assert "refiner_joint_weights.safetensors" in loaded.describe()


def test_tokenizer_refiner_mismatch_names_node_and_fix(tmp_path):
    config = TokenizerConfig(dim=8, dec_dim=8, z_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
                             temporal_downsample=(False, True, True))
    path = save_checkpoint(HBQTokenizer(config).state_dict(), tmp_path / "other_tokenizer.safetensors",
                           checkpoint_metadata("tokenizer", config))
    with pytest.raises(errors.GRNNodeError, match=r"^Load GRN: .*4 channels.*Pick the matching tokenizer"):
        loading.load_grn(REFINER, path, fit_preview=False)


def test_wrong_file_kind_names_node(tmp_path):
    with pytest.raises(errors.GRNNodeError, match=r"^Load GRN: .*tokenizer.*refiner"):
        loading.load_grn(TOKENIZER, TOKENIZER, fit_preview=False)


def test_tiny_choice_carries_what_its_file_says():
    if not model_files.tiny_available():
        pytest.skip("the tiny model is not in this checkout")
    from grn_core.models import load_tiny

    loaded = loading.load_grn(None, None)
    reference = load_tiny()
    assert loaded.refiner_name == "tiny" and loaded.model.name == "tiny"
    assert loaded.model.defaults == reference.defaults and loaded.model.adaptive == reference.adaptive
    assert torch.equal(loaded.model.preview.weight, reference.preview.weight)  # the shipped projection, not a refit
    assert loaded.model.text_encoder.config == reference.text_encoder.config


def test_tiny_choice_without_assets_is_a_clear_error():
    if model_files.tiny_available():
        pytest.skip("the tiny model ships in this checkout")
    with pytest.raises(errors.GRNNodeError, match=r"^Load GRN: the built-in 'tiny' model is not part of this install"):
        loading.load_grn(None, None)


def test_bad_dtype_is_rejected():
    with pytest.raises(errors.GRNNodeError, match="weight_dtype 'fp4'"):
        loading.load_grn(REFINER, TOKENIZER, weight_dtype="fp4")


def test_fp8_storage_keeps_outputs_close(loaded):
    plain = load_model(REFINER, TOKENIZER, dtype="fp32")
    fp8 = load_model(REFINER, TOKENIZER, dtype="fp8_e4m3fn")
    assert fp8.compute_device is None  # device=None: loaded on the CPU, placed by the caller
    name, layer = next((n, m) for n, m in fp8.refiner.named_modules() if isinstance(m, Fp8Linear))
    reference = plain.refiner.get_submodule(name)
    assert layer.weight.dtype == torch.float8_e4m3fn and fp8.weight_dtype == "fp8_e4m3fn"
    x = torch.randn(2, layer.in_features)
    before = reference(x)
    after = layer(x.to(layer.compute_dtype)).float()
    assert (after - before).abs().max() <= 0.1 * before.abs().max()


def test_weight_dtype_passes_through_to_the_loader():
    loaded = loading.load_grn(REFINER, TOKENIZER, weight_dtype="fp8_e5m2", fit_preview=False)
    assert loaded.model.weight_dtype == "fp8_e5m2" and loaded.weight_dtype == "fp8_e5m2"
    assert any(isinstance(m, Fp8Linear) for m in loaded.model.refiner.modules())
    assert loading.load_grn(REFINER, TOKENIZER, weight_dtype="bf16", fit_preview=False).model.weight_dtype == "bf16"


@pytest.mark.parametrize("choice, policy, keep", [("auto", "auto", False), ("none", "none", True),
                                                  ("model", "model", False), ("blocks:8", "blocks:8", False),
                                                  ("offload after run", "model", False),
                                                  ("keep on device", "none", True)])
def test_offload_choices_and_older_saved_values(choice, policy, keep):
    assert choice in loading.OFFLOAD_POLICIES
    loaded = loading.load_grn(REFINER, TOKENIZER, offload=choice, fit_preview=False)
    assert loaded.offload == policy and loaded.keep_on_device is keep
    assert loaded.model.compute_device is None  # no device given: the nodes' on_device places the models


def test_bad_offload_names_node_and_choices():
    with pytest.raises(errors.GRNNodeError, match=r"^Load GRN: offload 'sometimes' is not one of auto, none, model"):
        loading.load_grn(REFINER, TOKENIZER, offload="sometimes", fit_preview=False)
    with pytest.raises(errors.GRNNodeError, match=r"^Load GRN: offload='blocks:0': N in 'blocks:N' must be a positive"):
        loading.load_grn(REFINER, TOKENIZER, offload="blocks:0", fit_preview=False)


def test_pipeline_placed_model_is_not_moved_by_on_device():
    loaded = loading.load_grn(REFINER, TOKENIZER, offload="offload after run", device="cpu", fit_preview=False)
    model = loaded.model
    assert model.compute_device == torch.device("cpu") and model.offload.mode == "none"  # nothing to offload to
    assert "offload none on cpu" in loaded.describe()
    moved, cleaned = [], []
    model.refiner.to = lambda *a, **k: moved.append(a)  # any move by on_device would show here
    try:
        with loading.on_device(loaded, "meta", "cpu", after=lambda: cleaned.append(True)) as inside:
            assert inside is model
    finally:
        del model.refiner.to
    assert moved == [] and cleaned == [True]


def test_caller_placed_model_moves_and_offloads_around_the_run():
    loaded = loading.load_grn(REFINER, TOKENIZER, fit_preview=False)
    calls, cleaned = [], []
    modules = {"refiner": loaded.model.refiner, "tokenizer": loaded.model.tokenizer}
    for name, module in modules.items():
        module.to = lambda device, *a, name=name, **k: calls.append((name, str(device)))
    try:
        with loading.on_device(loaded, "cuda:7", "cpu", after=lambda: cleaned.append(True)):
            pass
    finally:
        for module in modules.values():
            del module.to
    assert calls == [("refiner", "cuda:7"), ("tokenizer", "cuda:7"), ("refiner", "cpu"), ("tokenizer", "cpu")]
    assert cleaned == [True]


# ---- Encode Prompt ------------------------------------------------------------------------------------------------

def test_auto_task_encodes_every_task_with_its_tag(loaded):
    encoder = WordHashEncoder()
    cond = prompting.encode_prompt_for(loaded, encoder, "a red circle", "", task="auto")
    assert set(cond.features) == {"t2i", "t2v", "i2v"} and cond.default_task == "t2i"
    assert cond.features["t2i"].text == "<T2I>a red circle"
    assert cond.features["t2v"].text.startswith("<T2V>a red circle")
    assert cond.features["i2v"].text.startswith("<I2V>a red circle")
    assert cond.features["t2v"].uncond is not None


def test_task_tag_can_be_switched_off(loaded):
    encoder = WordHashEncoder()
    cond = prompting.encode_prompt_for(loaded, encoder, "<T2V>my own tag", task="t2v", add_task_tag=False)
    assert list(cond.features) == ["t2v"] and encoder.calls[0] == "<T2V>my own tag"


def test_prompt_errors_name_the_node(loaded):
    with pytest.raises(errors.GRNNodeError, match=r"^GRN Encode Prompt: .*needs a umt5-xxl text encoder"):
        prompting.encode_prompt_for(loaded, None, "a red circle")
    with pytest.raises(errors.GRNNodeError, match=r"^GRN Encode Prompt: .*features are 16-wide"):
        prompting.encode_prompt_for(loaded, WordHashEncoder(16), "a red circle")
    with pytest.raises(errors.GRNNodeError, match=r"^GRN Encode Prompt: the prompt is empty"):
        prompting.encode_prompt_for(loaded, WordHashEncoder(), "   ")


class FakeClip:
    """ComfyUI's CLIP object as CLIPLoader(type='wan') returns it: tokenize -> {'umt5xxl': [[(id, w), ...]]}."""

    def __init__(self, key: str = "umt5xxl", width: int = 4096):
        self.key, self.width, self.tokens = key, width, None

    def tokenize(self, text, disable_weights=False, tokenizer_options=None):
        assert disable_weights and tokenizer_options == {"umt5xxl_min_length": 1}
        ids = [(100 + (ord(c) % 50), 1.0) for c in text.replace(" ", "")]
        return {self.key: [ids + [(1, 1.0)]]}

    def encode_from_tokens(self, tokens, return_dict=False):
        self.tokens = tokens
        n = len(tokens[self.key][0])
        return {"cond": torch.ones(1, n, self.width), "pooled_output": None}


def test_clip_input_uses_wan_tokenization_cut_to_511_plus_eos():
    clip = FakeClip()
    features = prompting.ClipPromptEncoder(clip).encode("x" * 600)
    ids = clip.tokens["umt5xxl"][0]
    assert len(ids) == 512 and ids[-1][0] == 1 and features.shape == (512, 4096)
    short = prompting.ClipPromptEncoder(clip).encode("  a &amp; b  ")  # cleaned like Wan: unescaped, trimmed
    assert short.shape == (3 + 1, 4096)


def test_clip_that_is_not_umt5_is_refused():
    with pytest.raises(errors.GRNNodeError, match=r"^GRN Encode Prompt: the CLIP input is not umt5-xxl.*type 'wan'"):
        prompting.ClipPromptEncoder(FakeClip(key="t5xxl")).encode("a cat")


# ---- Refine Sampler: sizes, tasks, settings ------------------------------------------------------------------------

def test_custom_size_snaps_to_the_grid(loaded):
    plan = sampling.plan_size(loaded, 850, 470, 36)
    assert (plan.width, plan.height, plan.frames) == (848, 464, 33)  # frames floor to 1 + 4k, as official
    assert plan.snapped and "asked 850x470, 36 frames" in plan.note
    assert sampling.plan_size(loaded, 848, 480, 33).snapped is False
    assert sampling.plan_size(loaded, 848, 480, 33, task="t2i").frames == 1
    assert sampling.plan_size(loaded, 64, 64, 1, duration=2.0).frames == 33
    assert sampling.plan_size(loaded, 5, 5, 1).width == 16


def test_bucket_and_aspect_give_the_trained_size(loaded):
    plan = sampling.plan_size(loaded, 100, 100, 1, resolution="0.41M", aspect="16:9", task="t2i")
    assert (plan.width, plan.height) == (848, 480)


def test_size_beyond_buckets_names_node_and_fix(loaded):
    with pytest.raises(errors.GRNNodeError, match=r"^GRN Refine Sampler: 4096x4096 .*largest trained bucket"):
        sampling.plan_size(loaded, 4096, 4096, 1)


def test_duration_floors_frames_as_official(loaded):
    """2.2 s: int(2.2 * 16 + 1) = 36 frames -> 33 (official floor), not 37 (nearest)."""
    assert sampling.plan_size(loaded, 64, 64, 1, duration=2.2).frames == 33


def test_first_frame_needs_an_i2v_model(loaded, conditioning):
    prefix = loading.LoadedGRN(GRNModel(prefix_refiner(), loaded.model.tokenizer, ("t2v",)), "GRN_T2V_2B.pth", "tok")
    with pytest.raises(errors.GRNNodeError, match=r"^GRN Refine Sampler: .*no image-to-video.*GRN_T2V_TITAN"):
        sampling.choose_task(prefix, conditioning, has_first_frame=True)
    # a joint model not trained for I2V runs it, as the official code allows (the library warns)
    joint_t2v = loading.LoadedGRN(GRNModel(loaded.model.refiner, loaded.model.tokenizer, ("t2v",)), "t2v.pth", "tok")
    assert sampling.choose_task(joint_t2v, conditioning, has_first_frame=True) == "i2v"
    assert sampling.choose_task(loaded, conditioning, has_first_frame=True) == "i2v"
    assert sampling.choose_task(loaded, conditioning, has_first_frame=False) == "t2i"
    with pytest.raises(errors.GRNNodeError, match="connect a conditioning"):
        sampling.choose_task(loaded, None, has_first_frame=False)


def test_settings_from_widgets(loaded):
    s = sampling.build_settings(loaded, "t2v", 30, 3.0, 1.0, 1.0, 0.1, adaptive=True, min_steps=10, warmup=3, k=50.0,
                                b=1.0, adaptive_rule="custom")
    assert s.steps == 30 and s.cfg_interval == 0.1 and s.adaptive.k == 50.0 and s.adaptive.min_steps == 10
    with pytest.raises(errors.GRNNodeError, match=r"^GRN Refine Sampler: adaptive steps need"):
        sampling.build_settings(loaded, "t2v", 10, 3.0, 1.0, adaptive=True, min_steps=20, warmup=5,
                                adaptive_rule="custom")
    with pytest.raises(errors.GRNNodeError):
        sampling.build_settings(loaded, "t2v", 10, 3.0, 1.0, adaptive=True, adaptive_rule="mine")


def test_adaptive_defaults_to_the_models_own_rule(loaded):
    """The k/b widgets only count with adaptive_rule 'custom'; 'model' takes the model's rule (issue: one behaviour)."""
    own = AdaptiveSteps(warmup=3, k=0.0, b=7.0, min_steps=6, calibrated=True)
    model = GRNModel(loaded.model.refiner, loaded.model.tokenizer, loaded.model.tasks, adaptive=own)
    mine = loading.LoadedGRN(model, "r", "t")
    s = sampling.build_settings(mine, "t2v", 50, 3.0, 1.0, adaptive=True, min_steps=20, warmup=5, k=90.0, b=0.0)
    assert s.adaptive == own
    assert sampling.build_settings(loaded, "t2v", 50, 3.0, 1.0, adaptive=True).adaptive.calibrated is False


def test_c2i_settings_from_widgets(loaded):
    c = sampling.build_settings(loaded, "c2i", 50, 2.35, 1.31)
    assert type(c).__name__ == "C2ISettings" and c.interval == (0.44, 1.0)


def test_first_frame_is_prepared_as_the_library_does():
    image = torch.rand(2, 100, 60, 3)
    frame = sampling.first_frame_from_image(image, 48, 64)
    assert frame.shape == (3, 64, 48) and frame.min() >= -1 and frame.max() <= 1
    assert torch.equal(frame, prepare_first_frame(image[0], 48, 64))
    with pytest.raises(errors.GRNNodeError):
        sampling.first_frame_from_image(torch.rand(100, 60, 3), 48, 64)


# ---- Refine Sampler: the run ---------------------------------------------------------------------------------------

def test_run_sends_one_small_event_per_step_and_records_stats(loaded, conditioning):
    events, progress = [], []
    recorder = sampling.StepRecorder(node="7", prompt_id="p1", size=(64, 48, 5), send=events.append,
                                  progress=lambda s, t, rgb: progress.append((s, t, rgb is not None)))
    plan = sampling.plan_size(loaded, 64, 48, 5, task="t2v")
    settings = sampling.build_settings(loaded, "t2v", 4, 3.0, 1.0)
    result = sampling.run_sampler(loaded, conditioning, plan, 11, settings, "t2v", recorder=recorder)
    assert result.bits.shape == (1, 32, 2, 3, 4)
    assert [e["step"] for e in events] == [0, 1, 2, 3] and all(e["total"] == 4 for e in events)
    assert progress == [(1, 4, True), (2, 4, True), (3, 4, True), (4, 4, True)]
    for event in events:
        assert event_size(event) <= MAX_EVENT_BYTES
        assert json.loads(json.dumps(event)) == event
        assert event["node"] == "7" and event["prompt_id"] == "p1" and event["size"] == [64, 48, 5]
        assert sum(event["counts"].values()) == 2 * 3 * 4
        m = event["map"]
        states = unpack_state_map(m["data"], (m["t"], m["h"], m["w"]))
        assert states.shape == (2, 3, 4) and int(states.max()) <= 3
        assert event["preview"]["mime"] == "image/png"  # 2 frames of 3x4 cells: small enough to go lossless
    assert len(result.extras["steps"]) == 4
    assert [r["kept"] for r in result.extras["steps"]] == pytest.approx([e["kept"] for e in events], abs=1e-5)


def test_interrupt_from_the_progress_hook_propagates(loaded, conditioning):
    class Stop(Exception):
        pass

    def progress(step, total, rgb):
        if step == 2:
            raise Stop()

    recorder = sampling.StepRecorder(progress=progress)
    plan = sampling.plan_size(loaded, 64, 48, 1, task="t2i")
    with pytest.raises(Stop):
        sampling.run_sampler(loaded, conditioning, plan, 0, sampling.build_settings(loaded, "t2i", 5, 3.0, 1.0), "t2i",
                          recorder=recorder)
    assert len(recorder.records) == 2


def test_adaptive_decision_changes_the_total(loaded, conditioning):
    events = []
    recorder = sampling.StepRecorder(node="1", send=events.append)
    plan = sampling.plan_size(loaded, 32, 32, 1, task="t2i")
    settings = sampling.build_settings(loaded, "t2i", 12, 1.0, 1.0, adaptive=True, min_steps=4, warmup=2, k=0.0, b=3.0,
                                       adaptive_rule="custom")
    result = sampling.run_sampler(loaded, conditioning, plan, 0, settings, "t2i", recorder=recorder)
    assert events[0]["total"] == 12 and events[-1]["total"] == 5 and len(events) == 5
    assert events[-1]["decided"] == 5 and events[-1]["planned"] == 12
    chart = stats.render_stats(result)
    assert chart.shape == (1, 512, 768, 3) and 0 <= float(chart.min()) and float(chart.max()) <= 1


def test_i2v_with_a_first_frame(loaded, conditioning):
    plan = sampling.plan_size(loaded, 64, 48, 5, task="i2v")
    frame = sampling.first_frame_from_image(torch.rand(1, 48, 64, 3), plan.width, plan.height)
    result = sampling.run_sampler(loaded, conditioning, plan, 0, sampling.build_settings(loaded, "i2v", 2, 3.0, 1.0), "i2v",
                               first_frame=frame)
    assert result.bits.shape == (1, 32, 2, 3, 4)


# ---- Decode Video / Encode Image / Stats ---------------------------------------------------------------------------

def test_decode_gives_comfy_images(loaded, conditioning):
    plan = sampling.plan_size(loaded, 64, 48, 5, task="t2v")
    tokens = sampling.run_sampler(loaded, conditioning, plan, 3, sampling.build_settings(loaded, "t2v", 2, 3.0, 1.0), "t2v")
    images = frames.decode_to_images(loaded, tokens)
    assert images.shape == (5, 48, 64, 3) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    reference = decode_tokens(loaded.model, tokens)  # the pipeline's whole-frame decode
    assert torch.equal(images, reference.reshape(-1, *reference.shape[2:]))
    assert torch.equal(frames.decode_to_images(loaded, tokens, tile=4), images)  # a tile covering the grid
    tiled = frames.decode_to_images(loaded, tokens, tile=2, overlap=1)
    assert tiled.shape == images.shape and 0 <= float(tiled.min()) and float(tiled.max()) <= 1
    assert not torch.equal(tiled, images)
    assert (tiled - images).abs().mean() < 0.1  # seams only: the tiles share the whole-frame stem
    assert frames.decode_to_images(loaded, tokens, tile=3).shape == images.shape  # overlap clamped to half a tile


def test_decode_out_of_memory_names_node_and_settings(loaded, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(tiled_decode, "decode_tiled", exhausted)  # what pipeline.decode_tokens calls
    bits = torch.zeros(1, 32, 1, 3, 4, dtype=torch.uint8)
    with pytest.raises(GRNOutOfMemoryError, match=r"^GRN Decode Video: Out of memory during the tokenizer decode") as e:
        frames.decode_to_images(loaded, bits, tile=16)
    assert "a smaller decode tile (now 16" in str(e.value) and "Tried to allocate 20.00 GiB" in str(e.value)
    with pytest.raises(GRNOutOfMemoryError, match="tiled decoding: set a decode tile") as e:
        frames.decode_to_images(loaded, bits)
    assert e.value.advice and e.value.stage == "the tokenizer decode"


def test_sampler_out_of_memory_gets_the_node_prefix():
    with pytest.raises(GRNOutOfMemoryError, match=r"^GRN Refine Sampler: Out of memory during the refiner step"):
        with errors.errors_from(errors.SAMPLER):
            raise GRNOutOfMemoryError("Out of memory during the refiner step (CUDA out of memory).",
                                      "the refiner step", ["offload: 'blocks'"])


def test_refiner_memory_request_counts_weights_and_one_step(loaded, conditioning):
    small = sampling.plan_size(loaded, 64, 48, 1, task="t2i")
    large = sampling.plan_size(loaded, 512, 512, 33, task="t2v")
    settings = sampling.build_settings(loaded, "t2v", 4, 3.0, 1.0)
    weights = module_bytes(loaded.model.refiner)
    need_small = sampling.refiner_memory_bytes(loaded, small, "t2i", settings, conditioning)
    need_large = sampling.refiner_memory_bytes(loaded, large, "t2v", settings, conditioning)
    unguided = sampling.refiner_memory_bytes(loaded, large, "t2v", sampling.build_settings(loaded, "t2v", 4, 1.0, 1.0), conditioning)
    assert weights < need_small < need_large and weights < unguided < need_large


def test_decode_refuses_tokens_of_another_model(loaded):
    bits = torch.zeros(1, 16, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(errors.GRNNodeError, match=r"^GRN Decode Video: the tokens have 16 bit channels"):
        frames.decode_to_images(loaded, bits)


def test_encode_image_snaps_and_roundtrips_shape(loaded):
    tokens = frames.encode_images(loaded, torch.rand(6, 70, 50, 3))
    assert tokens.bits.shape == (1, 32, 2, 4, 3) and tokens.frames == 5
    assert (tokens.width, tokens.height) == (48, 64)
    assert frames.decode_to_images(loaded, tokens).shape == (5, 64, 48, 3)
    chart = stats.render_stats(tokens)  # no steps: still a chart, saying so
    assert chart.shape[0] == 1


def test_empty_negative_takes_the_official_default_per_task(loaded):
    """As the CLI without --negative: T2V/I2V get the demos' negative list, T2I none; off means empty."""
    encoder = WordHashEncoder()
    cond = prompting.encode_prompt_for(loaded, encoder, "a red circle", "")
    assert cond.features["t2v"].negative == OFFICIAL_NEGATIVE_PROMPT
    assert cond.features["i2v"].negative == OFFICIAL_NEGATIVE_PROMPT and cond.features["t2i"].negative == ""
    plain = prompting.encode_prompt_for(loaded, encoder, "a red circle", "", default_negative=False)
    assert all(f.negative == "" for f in plain.features.values())
    mine = prompting.encode_prompt_for(loaded, encoder, "a red circle", "blurry")
    assert all(f.negative == "blurry" for f in mine.features.values())


def test_hashed_encoder_fits_the_pipeline_protocol(loaded):
    from grn_core.text.hashed import HashedTextEncoder

    encoder = HashedTextEncoder(dim=32)  # takes the pipeline's encode(prompt, allow_empty=...) as it is
    cond = prompting.encode_prompt_for(loaded, encoder, "a red circle", "", task="t2v", default_negative=False)
    assert cond.features["t2v"].cond.shape[-1] == 32 and cond.features["t2v"].uncond.shape == (1, 32)
