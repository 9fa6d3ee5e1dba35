"""Every node's ``execute()`` as ComfyUI runs it, without ComfyUI: the fakes of ``tests/_fake_comfy.py`` stand in for
``comfy_api``, ``folder_paths``, ``comfy.model_management``, ``comfy.utils``, ``server`` and ``comfy_execution``.

Models: the built-in tiny model, and in a temporary ``models/grn`` folder the golden refiner / tokenizer / umt5
(random weights: d = 8, 32-wide text) under released and local names, the golden class-to-image network with a
4-channel tokenizer, and a small refiner for 4096-wide (umt5-xxl) text, for the CLIP input.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import types

import pytest
import torch

from grn_core.c2i import infer_c2i_config
from grn_core.checkpoints import checkpoint_metadata, save_checkpoint
from grn_core.pipeline import TokenResult
from grn_core.refiner.config import RefinerConfig
from grn_core.refiner.model import GRNRefiner
from grn_core.releases import HF_REPO
from grn_core.runtime.offload import OffloadPolicy
from grn_core.tokenizer import HBQTokenizer, TokenizerConfig
from grn_nodes.errors import GRNNodeError
from grn_nodes.loading import LoadedGRN
from grn_nodes.prompting import GRNConditioning
from grn_nodes.widget_events import EVENT_NAME, MAX_EVENT_BYTES, event_size
from tests._fake_comfy import InterruptProcessingException, fake_comfy
from tests._golden import GOLDEN, load_golden

I2V_REFINER = "GRN_T2V_TITAN_FSA_sft10600_ema.pth"  # a released name: 'auto' knows its tokenizer (64 channels)
TOKENIZER_64 = "HBQ_image_video_tokenizer_64dim_M4_20260626.ckpt"  # holds the golden tokenizer
TOKENIZER_16 = "HBQ_image_tokenizer_16dim_M4.safetensors"  # a 4-channel tokenizer: 'auto' must not take it for I2V
MISSING_REFINER = "GRN_T2V_2B_FSA_sft147400_ema.pth"  # released, not on disk


def _umt5_tokenizer_json(path) -> None:
    """A word-level tokenizer.json with umt5's special ids (pad 0, EOS 1, unk 2), as tests/test_umt5.py builds."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["a", "red", "circle", "moving", "right", "cat", "<T2I>", "<T2V>", "<I2V>"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))


def fill_models(root) -> None:
    grn, encoders = root / "grn", root / "text_encoders"
    grn.mkdir(parents=True)
    torch.save(load_golden("refiner_joint_weights.safetensors"), grn / I2V_REFINER)
    torch.save({"ema": load_golden("tokenizer_weights.safetensors")}, grn / TOKENIZER_64)
    shutil.copy(GOLDEN / "refiner_joint_weights.safetensors", grn / "my_refiner.safetensors")
    shutil.copy(GOLDEN / "tokenizer_weights.safetensors", grn / "my_tokenizer.safetensors")
    torch.manual_seed(0)
    config4 = TokenizerConfig(dim=8, dec_dim=8, z_dim=4)
    save_checkpoint(HBQTokenizer(config4).state_dict(), grn / TOKENIZER_16, checkpoint_metadata("tokenizer", config4))
    c2i = load_golden("c2i_weights.safetensors")
    save_checkpoint(c2i, grn / "my_c2i.safetensors",
                    checkpoint_metadata("c2i", infer_c2i_config(c2i, in_context_start=1), tasks=("c2i",)))
    wide = RefinerConfig(width=32, depth=2, heads=2, kv_heads=1, mlp_hidden=64, block_chunks=1, text_channels=4096,
                         latent_channels=8)
    save_checkpoint(GRNRefiner(wide).state_dict(), grn / "my_umt5xxl_refiner.safetensors",
                    checkpoint_metadata("refiner", wide, layout="joint", tasks=("t2v",)))
    # GRN's own umt5 file: one with its tokenizer.json (text_encoders/umt5-xxl/), one without (models/grn).
    encoders.mkdir()
    shutil.copy(GOLDEN / "umt5_weights.safetensors", encoders / "umt5_small.safetensors")
    _umt5_tokenizer_json(encoders / "umt5-xxl" / "tokenizer.json")
    shutil.copy(GOLDEN / "umt5_weights.safetensors", grn / "umt5_lonely.safetensors")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread, as the CLI uses for the tiny model: these models' matrices are too small to split, and on a
    busy machine a second thread waiting for a core makes every step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    fill_models(root)
    with fake_comfy(root) as fake:
        yield fake


@pytest.fixture(autouse=True)
def fresh(comfy):
    comfy.reset()
    yield


@pytest.fixture(scope="module")
def nodes(comfy):
    return comfy.nodes


@pytest.fixture(scope="module")
def tiny(comfy, nodes) -> LoadedGRN:
    return comfy.run(nodes.GRNLoadModel, refiner="tiny").args[0]


@pytest.fixture(scope="module")
def tiny_cond(comfy, nodes, tiny) -> GRNConditioning:
    return comfy.run(nodes.GRNEncodePrompt, model=tiny, prompt="a red circle moving right").args[0]


@pytest.fixture(scope="module")
def golden(comfy, nodes) -> LoadedGRN:
    """The golden joint refiner under the 8B I2V release name, its tokenizer picked by 'auto'."""
    return comfy.run(nodes.GRNLoadModel, refiner=I2V_REFINER, tokenizer="auto").args[0]


@pytest.fixture(scope="module")
def golden_cond(comfy, nodes, golden) -> GRNConditioning:
    return comfy.run(nodes.GRNEncodePrompt, model=golden, prompt="a red circle", umt5_file="umt5_small.safetensors",
                     task="i2v").args[0]


def sampler_inputs(**overrides):
    """Small, quick Refine Sampler widgets (the rest: the schema's defaults)."""
    return {"width": 32, "height": 32, "frames": 9, "steps": 4, "seed": 5, **overrides}


# ---- the pack --------------------------------------------------------------------------------------------------------

def test_extension_lists_the_six_nodes_and_registers_models_grn(comfy, nodes):
    listed = asyncio.run(asyncio.run(nodes.comfy_entrypoint()).get_node_list())
    assert listed == nodes.NODES and len(listed) == 6
    folder_paths = comfy.modules["folder_paths"]
    paths, extensions = folder_paths.folder_names_and_paths["grn"]
    assert paths == [str(comfy.models_dir / "grn")] and ".safetensors" in extensions


def test_loader_lists_the_files_of_the_models_folder(comfy, nodes):
    inputs = {i.id: i for i in nodes.GRNLoadModel.define_schema().inputs}
    refiners, tokenizers = inputs["refiner"].kwargs["options"], inputs["tokenizer"].kwargs["options"]
    assert refiners[0] == "tiny" and {I2V_REFINER, "my_refiner.safetensors", "my_c2i.safetensors"} <= set(refiners)
    assert MISSING_REFINER in refiners  # released names are offered before they are downloaded
    assert tokenizers[0] == "auto" and {TOKENIZER_64, TOKENIZER_16, "my_tokenizer.safetensors"} <= set(tokenizers)
    umt5 = next(i for i in nodes.GRNEncodePrompt.define_schema().inputs if i.id == "umt5_file").kwargs["options"]
    assert umt5[0] == "none" and {"umt5_small.safetensors", "umt5_lonely.safetensors"} <= set(umt5)


# ---- Load GRN --------------------------------------------------------------------------------------------------------

def test_load_tiny_on_the_cpu_for_comfys_memory_manager(tiny):
    assert tiny.refiner_name == "tiny" and tiny.model.name == "tiny"
    assert tiny.model.compute_device is None  # the pipeline never places them: ComfyUI's memory manager does
    assert tiny.offload == "auto" and tiny.model.offload == OffloadPolicy("none")
    assert tiny.model.text_encoder is not None and tiny.model.preview is not None
    assert all(p.device.type == "cpu" for m in (tiny.model.refiner, tiny.model.tokenizer) for p in m.parameters())


def test_load_auto_tokenizer_picks_the_file_for_the_refiners_channels(golden):
    # released name -> 64-channel latents -> the 64-channel tokenizer file, not the 16-channel one beside it
    assert golden.refiner_name == I2V_REFINER and golden.tokenizer_name == TOKENIZER_64
    assert golden.tasks == ("t2v", "i2v") and golden.model.layout == "joint" and golden.model.latent_channels == 8


@pytest.fixture(scope="module")
def wide(comfy, nodes) -> LoadedGRN:
    """A small refiner for umt5-xxl's 4096-wide text, with an explicitly chosen tokenizer."""
    return comfy.run(nodes.GRNLoadModel, refiner="my_umt5xxl_refiner.safetensors", tokenizer="my_tokenizer.safetensors",
                     offload="model").args[0]


def test_load_explicit_tokenizer(wide):
    assert (wide.refiner_name, wide.tokenizer_name) == ("my_umt5xxl_refiner.safetensors", "my_tokenizer.safetensors")
    assert wide.model.text_channels == 4096 and wide.tasks == ("t2v",) and wide.model.weight_dtype == "fp32"
    # the widget's policy is kept (saved workflows); inside ComfyUI the memory manager places the models
    assert wide.offload == "model" and wide.model.offload.mode == "none" and wide.model.compute_device is None


def test_load_auto_without_a_matching_tokenizer_says_what_to_get(comfy, nodes):
    with pytest.raises(GRNNodeError) as error:
        comfy.run(nodes.GRNLoadModel, refiner="my_refiner.safetensors", tokenizer="auto")
    message = str(error.value)
    assert message.startswith("Load GRN: tokenizer 'auto' found no tokenizer for my_refiner.safetensors")
    assert "8-channel latents" in message


def test_load_missing_released_refiner_names_the_file_and_where_to_get_it(comfy, nodes):
    with pytest.raises(FileNotFoundError) as error:
        comfy.run(nodes.GRNLoadModel, refiner=MISSING_REFINER, tokenizer="auto")
    message = str(error.value)
    assert message.startswith(f"Load GRN: the file '{MISSING_REFINER}' is not in models/grn")
    assert HF_REPO in message and "download_missing" in message


def test_load_missing_local_file_says_where_to_put_it(comfy, nodes):
    """A workflow naming a file of someone else's models folder (not a released name): where it goes, no download."""
    with pytest.raises(FileNotFoundError) as error:
        comfy.run(nodes.GRNLoadModel, refiner="their_refiner.safetensors", download_missing=True)
    message = str(error.value)
    assert message.startswith("Load GRN: the file 'their_refiner.safetensors' is not in")
    assert "Put the file into models/grn/" in message and "download_missing" not in message


def test_load_tiny_without_its_assets_is_a_clear_error(comfy, nodes, monkeypatch):
    from grn_nodes import model_files

    monkeypatch.setattr(model_files, "tiny_available", lambda: False)
    with pytest.raises(GRNNodeError, match=r"^Load GRN: the built-in 'tiny' model is not part of this install"):
        comfy.run(nodes.GRNLoadModel, refiner="tiny")


def test_load_missing_explicit_tokenizer_names_the_file(comfy, nodes):
    with pytest.raises(FileNotFoundError, match=r"^Load GRN: the file 'gone_tokenizer.safetensors' is not in"):
        comfy.run(nodes.GRNLoadModel, refiner="my_refiner.safetensors", tokenizer="gone_tokenizer.safetensors")


def test_download_missing_without_huggingface_hub_is_a_clear_error(comfy, nodes, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ValueError, match=r"^Load GRN: 'download_missing' needs the huggingface_hub package") as error:
        comfy.run(nodes.GRNLoadModel, refiner=MISSING_REFINER, download_missing=True)
    assert MISSING_REFINER in str(error.value) and str(comfy.models_dir / "grn") in str(error.value)
    assert not (comfy.models_dir / "grn" / MISSING_REFINER).exists()


def test_download_missing_fetches_the_released_file_into_models_grn(comfy, nodes, monkeypatch, tmp_path):
    calls = []

    def hf_hub_download(repo_id, filename, local_dir):
        calls.append((repo_id, filename, local_dir))
        target = tmp_path / filename  # a stand-in for the file: the golden refiner under the released name
        torch.save(load_golden("refiner_joint_weights.safetensors"), target)
        return str(shutil.copy(target, f"{local_dir}/{filename}"))

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    try:
        loaded = comfy.run(nodes.GRNLoadModel, refiner=MISSING_REFINER, tokenizer=TOKENIZER_64,
                           download_missing=True).args[0]
    finally:
        (comfy.models_dir / "grn" / MISSING_REFINER).unlink(missing_ok=True)
    assert calls == [(HF_REPO, MISSING_REFINER, str(comfy.models_dir / "grn"))]
    assert loaded.refiner_name == MISSING_REFINER and loaded.tasks == ("t2v",)


# ---- Encode Prompt ---------------------------------------------------------------------------------------------------

def test_encode_prompt_with_the_tiny_models_own_encoder(tiny, tiny_cond):
    assert tiny_cond.source == "built-in" and tiny_cond.default_task == "t2v"
    assert set(tiny_cond.features) == {"t2v", "t2i"}
    t2v = tiny_cond.features["t2v"]
    assert t2v.text == "<T2V>a red circle moving right high aesthetic and high quality video."
    assert t2v.negative == ""  # the tiny model was trained with the empty negative prompt
    assert t2v.cond.shape[-1] == tiny.model.text_channels == 64 and t2v.uncond.shape[-1] == 64


def test_encode_prompt_with_grns_umt5_file(golden_cond):
    assert golden_cond.source == "umt5 file" and list(golden_cond.features) == ["i2v"]
    i2v = golden_cond.features["i2v"]
    assert i2v.text == "<I2V>a red circle high aesthetic and high quality video."
    assert i2v.cond.shape == (10, 32)  # 9 words + EOS, 32-wide as the golden umt5
    assert i2v.uncond is not None and i2v.uncond.shape[-1] == 32


def test_umt5_file_without_its_tokenizer_json_says_where_it_goes(comfy, nodes, golden):
    with pytest.raises(GRNNodeError) as error:
        comfy.run(nodes.GRNEncodePrompt, model=golden, prompt="a cat", umt5_file="umt5_lonely.safetensors")
    message = str(error.value)
    assert message.startswith("GRN Encode Prompt: umt5_lonely.safetensors needs the umt5-xxl tokenizer")
    assert str(comfy.models_dir / "grn" / "umt5-xxl" / "tokenizer.json") in message


def test_missing_umt5_file_names_the_node_and_file(comfy, nodes, golden):
    with pytest.raises(FileNotFoundError, match=r"^GRN Encode Prompt: the file 'models_t5_umt5-xxl-enc-bf16.pth'"):
        comfy.run(nodes.GRNEncodePrompt, model=golden, prompt="a cat", umt5_file="models_t5_umt5-xxl-enc-bf16.pth")


def test_missing_umt5_file_advice_fits_encode_prompt(comfy, nodes, golden):
    with pytest.raises(FileNotFoundError) as error:
        comfy.run(nodes.GRNEncodePrompt, model=golden, prompt="a cat", umt5_file="models_t5_umt5-xxl-enc-bf16.pth")
    assert "download_missing" not in str(error.value)


class Umt5Clip:
    """ComfyUI's ``CLIP`` as ``CLIPLoader(type="wan")`` returns it (``comfy.sd.CLIP``): ``tokenize`` gives
    ``{"umt5xxl": [[(id, weight), ...]]}`` padded with 0 and ending with EOS 1; ``encode_from_tokens(...,
    return_dict=True)["cond"]`` is ``[1, n, 4096]``."""

    def __init__(self, key: str = "umt5xxl"):
        self.key, self.calls = key, []

    def tokenize(self, text, disable_weights=False, tokenizer_options=None):
        self.calls.append(("tokenize", text, disable_weights, tokenizer_options))
        ids = [(10 + sum(map(ord, word)) % 1000, 1.0) for word in text.split()]
        return {self.key: [ids + [(1, 1.0), (0, 1.0), (0, 1.0)]]}  # EOS, then padding

    def encode_from_tokens(self, tokens, return_dict=False):
        self.calls.append(("encode", tokens))
        ids = torch.tensor([float(i) for i, _ in tokens[self.key][0]])
        cond = ids[:, None].repeat(1, 4096) / 1000  # row i is token i's id: the order of the rows is checked
        return {"cond": cond.unsqueeze(0), "pooled_output": None}


def test_clip_input_gives_umt5_width_features(comfy, nodes, wide):
    clip = Umt5Clip()
    cond = comfy.run(nodes.GRNEncodePrompt, model=wide, prompt="a  red &amp; circle", negative_prompt="blurry",
                     clip=clip, umt5_file="umt5_lonely.safetensors").args[0]  # the CLIP wins over the file
    t2v = cond.features["t2v"]
    text = "<T2V>a red & circle high aesthetic and high quality video."  # cleaned as Wan cleans
    assert clip.calls[0] == ("tokenize", text, True, {"umt5xxl_min_length": 1})
    ids = [int(i) for i, _ in clip.calls[1][1]["umt5xxl"][0]]
    assert len(ids) == 11 and ids[-1] == 1 and 0 not in ids  # 10 words + EOS: the padding is dropped
    assert cond.source == "clip" and t2v.cond.shape == (11, 4096) and t2v.uncond.shape == (2, 4096)
    assert torch.equal(t2v.cond[:, 0], torch.tensor(ids, dtype=torch.float32) / 1000)  # rows in token order
    assert t2v.negative == "blurry"
    tokens = comfy.run(nodes.GRNRefineSampler, model=wide, conditioning=cond,
                       **sampler_inputs(frames=1, steps=2)).args[0]
    assert tokens.bits.shape == (1, 32, 1, 2, 2) and tokens.task == "t2v"


def test_encode_prompt_for_a_task_the_model_does_not_do(comfy, nodes, wide):
    with pytest.raises(GRNNodeError, match=r"^GRN Encode Prompt: my_umt5xxl_refiner.safetensors does not do T2I "
                                           r"\(it does T2V\); set task to 'auto'"):
        comfy.run(nodes.GRNEncodePrompt, model=wide, prompt="a cat", task="t2i", clip=Umt5Clip())


def test_clip_that_is_not_umt5_is_refused(comfy, nodes, tiny):
    with pytest.raises(GRNNodeError, match=r"^GRN Encode Prompt: the CLIP input is not umt5-xxl \(it tokenizes for "
                                           r"t5xxl\)"):
        comfy.run(nodes.GRNEncodePrompt, model=tiny, prompt="a cat", clip=Umt5Clip(key="t5xxl"))


def test_clip_features_of_the_wrong_width_for_the_model_are_refused(comfy, nodes, tiny):
    with pytest.raises(GRNNodeError, match=r"^GRN Encode Prompt: the text features are 4096-wide but tiny expects 64"):
        comfy.run(nodes.GRNEncodePrompt, model=tiny, prompt="a cat", clip=Umt5Clip())


# ---- Refine Sampler --------------------------------------------------------------------------------------------------

def test_t2v_sends_an_event_and_a_progress_update_per_step(comfy, nodes, tiny, tiny_cond):
    out = comfy.run(nodes.GRNRefineSampler, unique_id="31", model=tiny, conditioning=tiny_cond, **sampler_inputs())
    tokens = out.args[0]
    assert isinstance(tokens, TokenResult) and tokens.task == "t2v"
    assert tokens.bits.shape == (1, 64, 3, 4, 4) and tokens.bits.device.type == "cpu"  # intermediate_device
    assert [e[0] for e in comfy.events] == [EVENT_NAME] * 4 and {e[2] for e in comfy.events} == {comfy.client_id}
    for step, (_, event, _) in enumerate(comfy.events):
        assert (event["node"], event["prompt_id"], event["step"], event["total"]) == ("31", comfy.prompt_id, step, 4)
        assert event["size"] == [32, 32, 9] and event_size(event) <= MAX_EVENT_BYTES
    assert [(p.node_id, p.value, p.total) for p in comfy.progress] == [("31", s, 4) for s in (1, 2, 3, 4)]
    kind, image, size = comfy.progress[0].preview  # ("JPEG", PIL image, max side) as ComfyUI's preview format
    assert kind == "JPEG" and size == 512 and min(image.size) >= 256
    assert len(comfy.loads) == 1 and comfy.loads[0].models == [tiny.patchers["refiner"]]  # see the memory tests
    assert comfy.cache_emptied == 1  # soft_empty_cache after the run
    assert out.ui == {"text": ["32x32, 9 frames; 4 steps, guidance 3, temperature 1"]}
    assert tokens.extras["settings_note"] == out.ui["text"][0] and len(tokens.extras["steps"]) == 4


def test_sampler_runs_without_server_or_executing_context(tmp_path):
    with fake_comfy(tmp_path, with_server=False) as fake:
        n = fake.nodes
        loaded = fake.run(n.GRNLoadModel, refiner="tiny").args[0]
        cond = fake.run(n.GRNEncodePrompt, model=loaded, prompt="a cat", task="t2i").args[0]
        tokens = fake.run(n.GRNRefineSampler, model=loaded, conditioning=cond,
                          **sampler_inputs(frames=1, steps=2)).args[0]
    assert tokens.task == "t2i" and fake.events == [] and [p.value for p in fake.progress] == [1, 2]
    assert "server" not in sys.modules or sys.modules["server"] is not None  # restored


@pytest.mark.parametrize("adaptive, rule, expected_steps, note", [
    (False, "model", 12, "12 steps, guidance 3, temperature 1"),
    # the tiny file's calibrated rule: D = 0*H + 15 after a 5-step warm-up
    (True, "model", 20, "30 steps, guidance 3, temperature 1; adaptive: D = 0*H +15, warm-up 5, at least 10 steps "
                        "(calibrated)"),
    (True, "custom", 5, "12 steps, guidance 3, temperature 1; adaptive: D = 0*H +3, warm-up 2, at least 4 steps"),
])
def test_fixed_and_adaptive_steps_and_the_note_saying_which(comfy, nodes, tiny, tiny_cond, adaptive, rule,
                                                           expected_steps, note):
    steps = 30 if rule == "model" and adaptive else 12
    out = comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond,
                    **sampler_inputs(frames=1, steps=steps, adaptive_steps=adaptive, adaptive_rule=rule, min_steps=4,
                                     warmup=2, adaptive_k=0.0, adaptive_b=3.0))
    tokens = out.args[0]
    assert tokens.sampling.steps == [expected_steps] and len(comfy.events) == expected_steps
    assert comfy.events[0][1]["total"] == steps and comfy.events[-1][1]["total"] == expected_steps
    assert comfy.events[-1][1]["decided"] == (expected_steps if adaptive else None)
    assert out.ui["text"] == [f"32x32; {note}"]
    assert [p.total for p in comfy.progress][-1] == expected_steps


def test_size_widgets_snap_and_the_note_says_so(comfy, nodes, tiny, tiny_cond):
    out = comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond,
                    **sampler_inputs(width=38, height=30, frames=7, steps=2))
    assert (out.args[0].width, out.args[0].height, out.args[0].frames) == (40, 32, 5)
    assert out.ui["text"][0].startswith("40x32, 5 frames (asked 38x30, 7 frames); 2 steps")


def test_sampler_without_conditioning_for_a_text_model_says_what_to_connect(comfy, nodes, tiny):
    with pytest.raises(GRNNodeError, match=r"^GRN Refine Sampler: connect a conditioning from GRN Encode Prompt"):
        comfy.run(nodes.GRNRefineSampler, model=tiny, **sampler_inputs())
    assert comfy.events == [] and comfy.loads == []


@pytest.fixture(scope="module")
def first_frame_image():
    g = torch.Generator().manual_seed(4)
    return torch.rand(1, 3, 4, 3, generator=g).repeat_interleave(16, 1).repeat_interleave(16, 2)  # [1, 48, 64, 3]


def test_i2v_from_an_image_and_from_encode_image_tokens_give_the_same_run(comfy, nodes, golden, golden_cond,
                                                                         first_frame_image):
    size = dict(width=64, height=48, frames=5, steps=3, seed=2)
    encoded = comfy.run(nodes.GRNEncodeImage, model=golden, image=first_frame_image, width=0, height=0).args[0]
    assert encoded.bits.shape == (1, 32, 1, 3, 4) and (encoded.width, encoded.height, encoded.frames) == (64, 48, 1)
    from_image = comfy.run(nodes.GRNRefineSampler, model=golden, conditioning=golden_cond,
                           first_frame=first_frame_image, **size).args[0]
    # the image is encoded inside the sampler's stage: ComfyUI loads the tokenizer with the refiner
    assert comfy.loads[-1].models == [golden.patchers["refiner"], golden.patchers["tokenizer"]]
    from_tokens = comfy.run(nodes.GRNRefineSampler, model=golden, conditioning=golden_cond,
                            first_frame_tokens=encoded, **size).args[0]
    assert comfy.loads[-1].models == [golden.patchers["refiner"]]
    assert from_image.task == from_tokens.task == "i2v" and from_image.bits.shape == (1, 32, 2, 3, 4)
    assert torch.equal(from_tokens.bits[:, :, :1], encoded.bits)  # the given frame's tokens are kept as they are
    assert torch.equal(from_image.bits[:, :, :1], encoded.bits)  # the image is prepared and encoded the same way
    assert torch.equal(from_image.bits, from_tokens.bits)


def test_i2v_conditioning_needs_a_first_frame(comfy, nodes, golden, golden_cond):
    with pytest.raises(GRNNodeError, match=r"^GRN Refine Sampler: the conditioning is for I2V; connect a first_frame"):
        comfy.run(nodes.GRNRefineSampler, model=golden, conditioning=golden_cond,
                  **sampler_inputs(width=64, height=48, frames=5))


def test_i2v_needs_conditioning_encoded_for_it(comfy, nodes, tiny, tiny_cond, first_frame_image):
    with pytest.raises(GRNNodeError, match=r"^GRN Refine Sampler: the conditioning was encoded for T2V, T2I only"):
        comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, first_frame=first_frame_image,
                  **sampler_inputs(steps=1))


def test_bad_first_frame_is_refused_before_the_run(comfy, nodes, golden, golden_cond):
    with pytest.raises(GRNNodeError, match=r"^GRN Refine Sampler: first_frame must be an IMAGE \[B, H, W, 3\]"):
        comfy.run(nodes.GRNRefineSampler, model=golden, conditioning=golden_cond, first_frame=torch.rand(48, 64, 3),
                  **sampler_inputs(width=64, height=48, frames=5))
    assert comfy.loads == []


def _record_moves(module, log, name):
    original = module.to

    def to(*args, **kwargs):
        log.append((name, str(args[0] if args else kwargs.get("device"))))
        return original(*args, **kwargs)

    module.to = to


def _entries(comfy, module) -> int:
    """How many entries of ComfyUI's ``current_loaded_models`` hold ``module`` (through any patcher)."""
    return sum(1 for m in comfy.mm.current_loaded_models if m.model is not None and m.model.model is module)


def test_interrupt_from_the_progress_hook_stops_the_run_and_the_rerun_loads_nothing_twice(comfy, nodes, tiny,
                                                                                        tiny_cond):
    from grn_nodes.loading import load_grn

    loaded = load_grn(None, None)  # caller-placed, built outside Load GRN: the nodes hand it to ComfyUI's manager
    moves = []
    _record_moves(loaded.model.refiner, moves, "refiner")
    _record_moves(loaded.model.tokenizer, moves, "tokenizer")
    comfy.on_send = lambda event, data: comfy.interrupt() if data["step"] == 1 else None  # Cancel during step 2
    with pytest.raises(InterruptProcessingException):
        comfy.run(nodes.GRNRefineSampler, model=loaded, conditioning=tiny_cond, **sampler_inputs(steps=6))
    assert [p.value for p in comfy.progress] == [1] and len(comfy.events) == 2  # stopped at the second update
    assert comfy.cache_emptied == 1 and comfy.interrupted is False  # cleaned up; the flag is consumed
    refiner = loaded.patchers["refiner"]
    # ModelPatcher.load moved the whole refiner (model.to) to the load device; the interrupt leaves it loaded, as
    # ComfyUI leaves its own models
    assert moves == [("refiner", "cpu")] and refiner.loaded_size() == refiner.model_size()
    assert _entries(comfy, loaded.model.refiner) == 1 and "tokenizer" not in loaded.patchers

    comfy.reset()
    again = comfy.run(nodes.GRNRefineSampler, model=loaded, conditioning=tiny_cond, **sampler_inputs(steps=6)).args[0]
    assert loaded.patchers["refiner"] is refiner and _entries(comfy, loaded.model.refiner) == 1
    assert moves == [("refiner", "cpu")]  # found resident: not loaded again
    reference = comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond,
                          **sampler_inputs(steps=6)).args[0]  # the same weights, never interrupted
    assert torch.equal(again.bits, reference.bits)


def test_interrupt_before_the_run_asks_for_no_memory(comfy, nodes, tiny, tiny_cond):
    comfy.interrupt()
    with pytest.raises(InterruptProcessingException):
        comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, **sampler_inputs())
    assert comfy.loads == [] and comfy.freed == [] and comfy.events == []


# ---- class to image --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def c2i(comfy, nodes) -> LoadedGRN:
    return comfy.run(nodes.GRNLoadModel, refiner="my_c2i.safetensors", tokenizer=TOKENIZER_16).args[0]


def test_c2i_samples_a_class_and_decodes(comfy, nodes, c2i):
    assert c2i.tasks == ("c2i",) and c2i.model.latent_channels == 4
    out = comfy.run(nodes.GRNRefineSampler, model=c2i, steps=3, guidance=2.35, temperature=1.31, class_index=3,
                    seed=1)
    tokens = out.args[0]
    assert tokens.task == "c2i" and tokens.bits.shape == (1, 16, 1, 8, 8)
    assert (tokens.width, tokens.height) == (128, 128) and len(comfy.events) == 3
    assert out.ui["text"][0].endswith("; 3 steps, guidance 2.35, temperature 1.31")
    again = comfy.run(nodes.GRNRefineSampler, model=c2i, steps=3, guidance=2.35, temperature=1.31, class_index=3,
                      seed=1).args[0]
    assert torch.equal(again.bits, tokens.bits)
    images, fps = comfy.run(nodes.GRNDecodeVideo, model=c2i, tokens=tokens, tile=0).args
    assert images.shape == (1, 128, 128, 3) and fps == 16.0


def test_c2i_note_and_events_give_the_size_the_model_makes(comfy, nodes, c2i):
    out = comfy.run(nodes.GRNRefineSampler, model=c2i, steps=2, guidance=2.35, temperature=1.31, class_index=3)
    assert (out.args[0].width, out.args[0].height) == (128, 128)
    assert comfy.events[-1][1]["size"] == [128, 128, 1]  # not the T2V widget defaults [848, 480, 1]
    assert out.ui["text"][0].startswith("128x128 (class-to-image makes one size")  # the widgets' size is not used


def test_c2i_refuses_a_prompt_and_a_first_frame(comfy, nodes, c2i, first_frame_image):
    with pytest.raises(GRNNodeError, match=r"^GRN Encode Prompt: my_c2i.safetensors is a class-to-image model"):
        comfy.run(nodes.GRNEncodePrompt, model=c2i, prompt="a cat")
    with pytest.raises(GRNNodeError, match=r"^GRN Refine Sampler: my_c2i.safetensors is class-to-image; disconnect"):
        comfy.run(nodes.GRNRefineSampler, model=c2i, first_frame=first_frame_image, steps=2)


# ---- Decode Video / Encode Image / Refine Stats ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokens(comfy, nodes, tiny, tiny_cond) -> TokenResult:
    return comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, **sampler_inputs(steps=3)).args[0]


def test_decode_video_gives_image_frames_and_fps(comfy, nodes, tiny, tiny_tokens):
    images, fps = comfy.run(nodes.GRNDecodeVideo, model=tiny, tokens=tiny_tokens).args
    assert images.shape == (9, 32, 32, 3) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert 0 <= float(images.min()) and float(images.max()) <= 1 and fps == 16.0
    tiled = comfy.run(nodes.GRNDecodeVideo, model=tiny, tokens=tiny_tokens, tile=2).args[0]
    assert tiled.shape == images.shape and (tiled - images).abs().mean() < 0.1
    assert comfy.cache_emptied == 2


def test_decode_refuses_tokens_of_another_model(comfy, nodes, golden, tiny_tokens):
    with pytest.raises(GRNNodeError, match=r"^GRN Decode Video: the tokens have 64 bit channels but "
                                           rf"{TOKENIZER_64} decodes 32"):
        comfy.run(nodes.GRNDecodeVideo, model=golden, tokens=tiny_tokens)


def test_encode_image_and_decode_round_trip(comfy, nodes, tiny, tiny_tokens):
    frames = comfy.run(nodes.GRNDecodeVideo, model=tiny, tokens=tiny_tokens).args[0]
    encoded = comfy.run(nodes.GRNEncodeImage, model=tiny, image=frames, width=0, height=0).args[0]
    assert encoded.bits.shape == tiny_tokens.bits.shape and encoded.frames == 9 and encoded.task == "encoded"
    again = comfy.run(nodes.GRNDecodeVideo, model=tiny, tokens=encoded).args[0]
    assert again.shape == frames.shape
    resized = comfy.run(nodes.GRNEncodeImage, model=tiny, image=frames[:1], width=16, height=24).args[0]
    assert resized.bits.shape == (1, 64, 1, 3, 2) and (resized.width, resized.height) == (16, 24)
    with pytest.raises(GRNNodeError, match=r"^GRN Encode Image: expected an IMAGE \[N, H, W, 3\], got shape "
                                           r"\(32, 32\)"):
        comfy.run(nodes.GRNEncodeImage, model=tiny, image=torch.rand(32, 32), width=0, height=0)


def test_refine_stats_charts_a_run_and_an_encoded_image(comfy, nodes, tiny, tiny_tokens):
    chart = comfy.run(nodes.GRNRefineStats, tokens=tiny_tokens).args[0]
    assert chart.shape == (1, 512, 768, 3) and chart.dtype == torch.float32
    assert 0 <= float(chart.min()) and float(chart.max()) <= 1 and float(chart.std()) > 0
    image = comfy.run(nodes.GRNEncodeImage, model=tiny, image=torch.rand(1, 32, 32, 3), width=0, height=0).args[0]
    empty = comfy.run(nodes.GRNRefineStats, tokens=image).args[0]
    assert empty.shape == chart.shape and not torch.equal(empty, chart)


# ---- ComfyUI's memory manager ----------------------------------------------------------------------------------------
# The refiner and the tokenizer each live in a ModelPatcher (grn_nodes/patching.py) that the nodes load through
# load_models_gpu before each stage; the fakes run ComfyUI's own bookkeeping (tests/_fake_comfy.py).

def _patcher_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "grn_nodes.patching"]


def test_sampler_loads_the_refiner_with_one_steps_activations(comfy, nodes, tiny, tiny_cond):
    from grn_core.pipeline import refiner_stage_bytes
    from grn_core.runtime.offload import module_bytes

    comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, **sampler_inputs())
    refiner = tiny.patchers["refiner"]
    guidance = comfy.defaults(nodes.GRNRefineSampler)["guidance"]
    text_tokens = tiny_cond.features["t2v"].cond.shape[0]
    weights = module_bytes(tiny.model.refiner)
    activations = refiner_stage_bytes(tiny.model, 32, 32, 9, "t2v", guidance, text_tokens) - weights
    assert [tuple(c) for c in comfy.loads] == [([refiner], activations, True)] and activations > 0
    # the patcher wraps the very module the GRNModel runs, with its true size and ComfyUI's devices
    assert refiner.model is tiny.model.refiner and refiner.size == weights
    assert refiner.load_device == comfy.device and refiner.offload_device == torch.device("cpu")
    assert refiner in comfy.loaded and refiner.loaded_size() == weights and _entries(comfy, tiny.model.refiner) == 1


def test_decode_and_encode_load_the_tokenizer_with_their_estimates(comfy, nodes, tiny, tiny_tokens):
    from grn_core.tokenizer.tiled import estimate_decode_memory

    config, dtype = tiny.model.tokenizer.config, next(tiny.model.tokenizer.parameters()).dtype
    comfy.run(nodes.GRNDecodeVideo, model=tiny, tokens=tiny_tokens, tile=0)
    comfy.run(nodes.GRNDecodeVideo, model=tiny, tokens=tiny_tokens, tile=2)
    tokenizer = tiny.patchers["tokenizer"]
    assert tokenizer.model is tiny.model.tokenizer and tokenizer in comfy.loaded
    whole = estimate_decode_memory(config, (4, 4), None, 4, dtype).total  # one latent frame of 4x4 cells
    tiled = estimate_decode_memory(config, (4, 4), 2, 1, dtype).total  # 2-cell tiles, overlap at most half a tile
    assert [tuple(c) for c in comfy.loads] == [([tokenizer], whole, True), ([tokenizer], tiled, True)]
    assert 0 < tiled < whole
    comfy.run(nodes.GRNEncodeImage, model=tiny, image=torch.rand(5, 32, 32, 3), width=0, height=0)
    call = comfy.loads[-1]
    assert call.models == [tokenizer] and call.memory_required >= 3 * 5 * 32 * 32 * 4 + whole
    assert _entries(comfy, tiny.model.tokenizer) == 1


def test_unload_models_then_rerun_gives_the_same_bits(comfy, nodes, tiny, tiny_cond, caplog):
    from grn_core.runtime.memory import format_bytes

    caplog.set_level("INFO", logger="grn_nodes.patching")
    first = comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, **sampler_inputs()).args[0]
    images = comfy.run(nodes.GRNDecodeVideo, model=tiny, tokens=first, tile=0).args[0]
    refiner, tokenizer = tiny.patchers["refiner"], tiny.patchers["tokenizer"]
    assert refiner in comfy.loaded and tokenizer in comfy.loaded
    caplog.clear()
    comfy.mm.unload_all_models()  # "Unload models" / POST /free {"unload_models": true}
    assert refiner not in comfy.loaded and tokenizer not in comfy.loaded
    assert refiner.loaded_size() == 0 == tokenizer.loaded_size()
    logs = _patcher_logs(caplog)  # every GRN model of this module's tests is unloaded; look for ours
    for p in (refiner, tokenizer):
        assert f"GRN: {p.grn_label} unloaded by ComfyUI's memory manager ({format_bytes(p.model_size())} back to " \
               f"cpu)" in logs
    caplog.clear()
    again = comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, **sampler_inputs()).args[0]
    images_again = comfy.run(nodes.GRNDecodeVideo, model=tiny, tokens=again, tile=0).args[0]
    assert torch.equal(again.bits, first.bits) and torch.equal(images_again, images)
    assert [m.split(" loaded by")[0] for m in _patcher_logs(caplog)] == ["GRN: refiner (tiny)", "GRN: tokenizer (tiny)"]
    assert _entries(comfy, tiny.model.refiner) == 1 and _entries(comfy, tiny.model.tokenizer) == 1


def test_another_model_evicts_ours_whole_and_they_come_back(comfy, nodes, tiny, tiny_cond):
    from tests._fake_comfy import GiB

    comfy.vram = 3 * GiB  # the device now has a budget: ComfyUI's accounting decides who stays
    first = comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, **sampler_inputs()).args[0]
    refiner = tiny.patchers["refiner"]
    assert refiner in comfy.loaded
    ModelPatcher = comfy.modules["comfy.model_patcher"].ModelPatcher
    # a ComfyUI model that needs nearly all of it (whole: its declared size is not its layers')
    other = ModelPatcher(torch.nn.Linear(4, 4), comfy.device, torch.device("cpu"), size=int(2.2 * GiB))
    comfy.mm.load_models_gpu([other], force_full_load=True)
    assert other in comfy.loaded and refiner not in comfy.loaded
    assert refiner.loaded_size() == 0 and not tiny.model.refiner.model_lowvram  # evicted whole, not in part
    again = comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, **sampler_inputs()).args[0]
    assert refiner in comfy.loaded and other not in comfy.loaded  # ours back; ComfyUI made room for it
    assert torch.equal(again.bits, first.bits)


def test_patcher_is_all_or_nothing(comfy, nodes, tiny, tiny_cond):
    """ComfyUI's partial load moves only the layers that fit and expects comfy.ops layers to cast the rest in
    forward; GRN's layers cannot, so GRN's patcher loads whole and, asked to give back part, gives back none."""
    ModelPatcher = comfy.modules["comfy.model_patcher"].ModelPatcher
    plain = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    half = ModelPatcher(plain, comfy.device, torch.device("cpu"))
    half.load(comfy.device, lowvram_model_memory=half.model_size() * 0.6)
    assert 0 < half.loaded_size() < half.model_size() and not plain.model_lowvram  # ComfyUI: one layer behind
    half.detach()

    comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, **sampler_inputs(frames=1, steps=2))
    refiner = tiny.patchers["refiner"]
    entry = next(m for m in comfy.mm.current_loaded_models if m.model is refiner)
    assert refiner.partially_unload(torch.device("cpu"), memory_to_free=1) == 0
    assert refiner.loaded_size() == refiner.model_size()
    assert entry.model_unload(memory_to_free=1) is True  # so ComfyUI unloads it whole
    comfy.mm.current_loaded_models.remove(entry)
    assert refiner.loaded_size() == 0 and refiner not in comfy.loaded
    assert refiner.partially_load(comfy.device, extra_memory=1) == refiner.model_size()  # a lowvram offer: whole
    assert not tiny.model.refiner.model_lowvram
    refiner.detach()


@pytest.mark.parametrize("vram_state", ["LOW_VRAM", "NO_VRAM"])
def test_lowvram_states_still_load_grn_models_whole(comfy, nodes, tiny, tiny_cond, vram_state):
    from tests._fake_comfy import GiB

    reference = comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond,
                          **sampler_inputs(frames=1, steps=2)).args[0]
    comfy.mm.unload_all_models()
    comfy.vram, comfy.vram_state = 2 * GiB, vram_state  # --lowvram / --novram: ComfyUI offers a partial load
    tokens = comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond,
                       **sampler_inputs(frames=1, steps=2)).args[0]
    refiner = tiny.patchers["refiner"]
    assert comfy.loads[-1].force_full_load and refiner.loaded_size() == refiner.model_size()
    assert not tiny.model.refiner.model_lowvram and torch.equal(tokens.bits, reference.bits)


def test_offload_widget_other_than_auto_says_the_manager_decides(comfy, nodes, caplog):
    caplog.set_level("INFO", logger="grn_nodes.patching")
    loaded = comfy.run(nodes.GRNLoadModel, refiner="tiny", offload="blocks").args[0]
    assert loaded.offload == "blocks" and loaded.model.compute_device is None  # kept for saved workflows
    assert not hasattr(loaded.model.refiner, "block_offload") or loaded.model.refiner.block_offload is None
    assert any("offload 'blocks' is the command line's policy" in m and "not supported yet" in m
               for m in _patcher_logs(caplog))


def test_preview_of_a_model_without_one_is_fitted_with_the_tokenizer_comfy_loaded(golden):
    assert golden.model.preview is not None and "tokenizer" in golden.patchers


def test_library_placed_model_only_asks_comfy_for_room(comfy, nodes, tiny_cond):
    from grn_nodes.loading import load_grn

    placed = load_grn(None, None, device="cpu")  # the command line's way: the pipeline places the models
    comfy.run(nodes.GRNRefineSampler, model=placed, conditioning=tiny_cond, **sampler_inputs(frames=1, steps=2))
    assert placed.patchers == {} and comfy.loads == [] and len(comfy.freed) == 1 and comfy.freed[0][0] > 0


def test_cancel_inside_a_step_ends_it_between_refiner_blocks(comfy, nodes, tiny, tiny_cond):
    """ComfyUI's Cancel is also read between the refiner's blocks (GRNRefiner.should_stop), so a long step ends
    within one block; it surfaces as ComfyUI's own InterruptProcessingException, and the hook is removed after."""
    refiner = tiny.model.refiner
    first_block = refiner.blocks[0]
    calls = []

    def cancel_in_block(module, args):  # Cancel pressed while the first block of the first step runs
        calls.append(1)
        if len(calls) == 1:
            comfy.interrupt()

    handle = first_block.mlp.register_forward_pre_hook(cancel_in_block)  # the MLP runs as a module call
    try:
        with pytest.raises(InterruptProcessingException):
            comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, **sampler_inputs(steps=4))
    finally:
        handle.remove()
    assert comfy.events == [] and comfy.progress == []  # stopped inside step 1, before its end
    assert refiner.should_stop is None


# ---- editing: source tokens, mask, strength, extend ------------------------------------------------------------------

def _left_half_kept_mask(height: int = 32, width: int = 32) -> torch.Tensor:
    """ComfyUI MASK [1, H, W]: black (0, keep) on the left half, white (1, regenerate) on the right."""
    mask = torch.zeros(1, height, width)
    mask[:, :, width // 2:] = 1.0
    return mask


def test_inpaint_keeps_the_masked_out_cells_bits_exactly(comfy, nodes, tiny, tiny_cond, tiny_tokens):
    from grn_nodes.widget_events import FIXED_COLOUR, unpack_bit_map

    out = comfy.run(nodes.GRNRefineSampler, unique_id="31", model=tiny, conditioning=tiny_cond,
                    source_tokens=tiny_tokens, mask=_left_half_kept_mask(), strength=1.0,
                    **sampler_inputs(steps=3, seed=9))
    tokens = out.args[0]
    assert tokens.bits.shape == tiny_tokens.bits.shape
    assert torch.equal(tokens.bits[..., :2], tiny_tokens.bits[..., :2])  # left 2 of 4 latent columns: kept
    assert not torch.equal(tokens.bits[..., 2:], tiny_tokens.bits[..., 2:])  # the right half is regenerated
    assert "kept 24 of 48 latent cells (fixed)" in out.ui["text"][0]
    assert "strength 1: starts at step 0 of 3" in out.ui["text"][0]
    events = [e for _, e, _ in comfy.events]
    assert events and all(e["fixed_colour"] == list(FIXED_COLOUR) for e in events)
    first = events[0]["fixed"]
    cells = unpack_bit_map(first["data"], (first["t"], first["h"], first["w"]))
    expected = torch.zeros(3, 4, 4, dtype=torch.bool)
    expected[..., :2] = True
    assert torch.equal(cells, expected)
    assert all(event_size(e) <= MAX_EVENT_BYTES for e in events)


def test_strength_zero_returns_the_source_tokens(comfy, nodes, tiny, tiny_cond, tiny_tokens):
    out = comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, source_tokens=tiny_tokens,
                    strength=0.0, **sampler_inputs(steps=3, seed=11))
    assert torch.equal(out.args[0].bits, tiny_tokens.bits)
    assert "strength 0: starts at step 3 of 3" in out.ui["text"][0]


def test_strength_in_between_starts_later(comfy, nodes, tiny, tiny_cond, tiny_tokens):
    out = comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, source_tokens=tiny_tokens,
                    strength=0.5, **sampler_inputs(steps=4, seed=11))
    assert out.args[0].bits.shape == tiny_tokens.bits.shape
    assert "strength 0.5: starts at step 2 of 4" in out.ui["text"][0]


def test_extend_keeps_the_encoded_last_frame_as_the_first_latent_frame(comfy, nodes, tiny, tiny_cond, tiny_tokens):
    clip = comfy.run(nodes.GRNDecodeVideo, model=tiny, tokens=tiny_tokens).args[0]  # [9, 32, 32, 3]
    out = comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, extend_from=clip,
                    **sampler_inputs(steps=3, seed=12))
    # the tokenizer is loaded with the refiner to encode the last frame
    assert comfy.loads[-1].models == [tiny.patchers["refiner"], tiny.patchers["tokenizer"]]
    last = comfy.run(nodes.GRNEncodeImage, model=tiny, image=clip[-1:], width=32, height=32).args[0]
    assert last.bits.shape == (1, 64, 1, 4, 4)
    assert torch.equal(out.args[0].bits[:, :, :1], last.bits)
    assert "kept 16 of 48 latent cells (fixed)" in out.ui["text"][0]


def test_mask_of_another_size_is_resized_with_a_warning(comfy, nodes, tiny, tiny_cond, tiny_tokens, caplog):
    mask = _left_half_kept_mask(16, 16)  # half the output's size: the same regions once resized
    with caplog.at_level("WARNING"):
        out = comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, source_tokens=tiny_tokens,
                        mask=mask, **sampler_inputs(steps=2, seed=9))
    assert any("resizing it" in r.getMessage() for r in caplog.records)
    assert "warning: the mask is 16x16" in out.ui["text"][0]
    assert torch.equal(out.args[0].bits[..., :2], tiny_tokens.bits[..., :2])


def test_all_black_mask_with_strength_names_the_fix(comfy, nodes, tiny, tiny_cond, tiny_tokens):
    with pytest.raises(GRNNodeError, match=r"^GRN Refine Sampler: the mask is all black .*paint the region"):
        comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, source_tokens=tiny_tokens,
                  mask=torch.zeros(1, 32, 32), strength=0.7, **sampler_inputs(steps=2))
    assert comfy.loads == []  # refused before anything is loaded


def test_source_tokens_of_another_grid_are_refused_with_the_fix(comfy, nodes, tiny, tiny_cond, tiny_tokens):
    with pytest.raises(GRNNodeError, match=r"^GRN Refine Sampler: source_tokens \(32x32, 9 frames\) have shape "
                                           r"\(1, 64, 3, 4, 4\) but this 48x32, 9-frame output .*set width/height/"
                                           r"frames to the source's, or encode it with Encode Image at width 48"):
        comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, source_tokens=tiny_tokens,
                  **sampler_inputs(width=48, steps=2))


def test_mask_or_low_strength_without_source_tokens_says_what_to_connect(comfy, nodes, tiny, tiny_cond):
    for extra in (dict(mask=_left_half_kept_mask()), dict(strength=0.5)):
        with pytest.raises(GRNNodeError, match=r"^GRN Refine Sampler: .* needs source_tokens: connect Encode Image"):
            comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, **extra, **sampler_inputs(steps=2))


def test_extend_refuses_a_source_and_an_image_output(comfy, nodes, tiny, tiny_cond, tiny_tokens):
    clip = torch.rand(9, 32, 32, 3)
    with pytest.raises(GRNNodeError, match=r"^GRN Refine Sampler: extend_from continues a clip"):
        comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, extend_from=clip,
                  source_tokens=tiny_tokens, **sampler_inputs(steps=2))
    with pytest.raises(GRNNodeError, match=r"^GRN Refine Sampler: extending a clip makes a video; set frames"):
        comfy.run(nodes.GRNRefineSampler, model=tiny, conditioning=tiny_cond, extend_from=clip,
                  **sampler_inputs(frames=1, steps=2))


def test_fixed_map_packs_one_bit_per_cell_and_respects_the_cap():
    from grn_nodes.widget_events import build_step_event, pack_bit_map, unpack_bit_map

    cells = torch.rand(3, 5, 7) > 0.5
    assert torch.equal(unpack_bit_map(pack_bit_map(cells), (3, 5, 7)), cells)
    big = torch.rand(32, 64, 64) > 0.5
    states = torch.randint(0, 4, (32, 64, 64), dtype=torch.uint8)
    event = build_step_event(node="1", prompt_id=None, step=0, total=4, planned=4, entropy=0.1, kept=0.0,
                             guided=True, counts=(1, 2, 3, 4), token_states=states, fixed_cells=big)
    assert event_size(event) <= MAX_EVENT_BYTES and event["map"] is not None
    small = build_step_event(node="1", prompt_id=None, step=0, total=4, planned=4, entropy=0.1, kept=0.0,
                             guided=True, counts=(1, 2, 3, 4), token_states=states[:2, :8, :8],
                             fixed_cells=big[:2, :8, :8])
    assert torch.equal(unpack_bit_map(small["fixed"]["data"], (2, 8, 8)), big[:2, :8, :8])
