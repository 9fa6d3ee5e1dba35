"""The refiner reproduces the official GRN code's logits (golden records, see golden/README.md).

Every step of the joint-layout ``t2v`` and ``i2v`` records and of the prefix-layout ``t2v`` record is run through the
public API (``step_logits``) and compared on the visual rows of both guidance branches; in float64
``sequence_logits`` also checks the rows of the first frame, text and step token (last step of each record).
float64 must agree to 1e-5, float32 to 1e-3 (relative to the largest golden logit, ``rel_err``).
"""

import pytest
import torch

from grn_core.refiner import GRNRefiner, infer_refiner_config
from tests._golden import golden_meta, load_golden, rel_err

TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-3}
RECORDS = [("joint", "t2v"), ("joint", "i2v"), ("prefix", "t2v")]


@pytest.fixture(scope="module")
def golden():
    return {layout: (load_golden(f"refiner_{layout}_weights.safetensors"),
                     load_golden(f"refiner_{layout}_io.safetensors"))
            for layout in ("joint", "prefix")}


_models = {}


def model_for(golden, layout, dtype):
    if (layout, dtype) not in _models:
        weights, _ = golden[layout]
        model = GRNRefiner(infer_refiner_config(weights, layout=layout))
        model.load_state_dict(weights, strict=True)
        _models[layout, dtype] = model.to(dtype).eval()
    return _models[layout, dtype]


def branch_rows(layout, visual, first, len_cond):
    """Row ranges of the cond / uncond visual tokens in the golden packed sequence: per branch
    ``[visual | first frame | text | step]`` (joint) or ``[visual | step]`` (prefix), cond branch first."""
    if layout == "prefix":
        cond_len = visual + 1
    else:
        cond_len = visual + first + len_cond + 1
    return slice(0, visual), slice(cond_len, cond_len + visual)


def test_meta_matches_records(golden):
    for layout in ("joint", "prefix"):
        meta = golden_meta(layout)[f"refiner_{layout}"]
        config = infer_refiner_config(golden[layout][0], layout=layout)
        assert (config.width, config.depth, config.heads, config.kv_heads) == (
            meta["embed_dim"], meta["depth"], meta["num_heads"], meta["num_key_value_heads"])
        assert (config.block_chunks, config.text_channels, config.latent_channels, config.rounds) == (
            meta["block_chunks"], meta["text_channels"], meta["latent_channels"], meta["hbq_rounds"])
        assert tuple(golden[layout][1]["t2v.step0.labels"].shape[2:]) == tuple(meta["grid"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout,task", RECORDS, ids=[f"{a}-{b}" for a, b in RECORDS])
def test_step_logits_match_golden(golden, layout, task, dtype):
    model = model_for(golden, layout, dtype)
    _, io = golden[layout]
    meta = golden_meta(layout)[f"refiner_{layout}"]
    aspect = meta["aspect_template"]
    first = io["i2v.first_frame_labels"] if task == "i2v" else None
    # Prepare the text once per record and reuse it on every step, as the sampler does.
    cond_ctx, uncond_ctx = model.prepare_text(io["text_cond"]), model.prepare_text(io["text_uncond"])
    steps = io[f"{task}.pt_values"].numel()
    assert steps == 3
    worst = 0.0
    for k in range(steps):
        bits = io[f"{task}.step{k}.labels"]
        step_value = float(io[f"{task}.pt_values"][k])
        expected = io[f"{task}.step{k}.logits"]
        _, _, t, h, w = bits.shape
        visual = t * h * w
        first_rows = 0 if first is None else h * w
        rows_cond, rows_uncond = branch_rows(layout, visual, first_rows, io["text_cond"].shape[0])

        cond, uncond = model.step_logits(bits, step_value, cond_ctx, uncond_ctx, aspect_ratio=aspect,
                                         first_frame_bits=first)
        assert cond.shape == (1, t, h, w, bits.shape[1], 2) and uncond.shape == cond.shape
        assert cond.dtype == dtype
        exp_cond = expected[rows_cond].reshape(1, t, h, w, bits.shape[1], 2)
        exp_uncond = expected[rows_uncond].reshape(1, t, h, w, bits.shape[1], 2)
        err = max(rel_err(cond, exp_cond), rel_err(uncond, exp_uncond))
        assert err <= TOLERANCE[dtype], f"{layout}/{task} step {k}: visual rows rel err {err:.3g}"

        worst = max(worst, err)
        if dtype != torch.float64 or k != steps - 1:
            continue
        # Every row of the packed sequence (first-frame, text and step-token rows too), raw text this time.
        full = model.sequence_logits(bits, step_value, io["text_cond"], io["text_uncond"], aspect_ratio=aspect,
                                     first_frame_bits=first)
        assert full.shape == expected.shape
        err_full = rel_err(full, expected)
        assert err_full <= TOLERANCE[dtype], f"{layout}/{task} step {k}: all rows rel err {err_full:.3g}"
        worst = max(worst, err_full)
    print(f"{layout}/{task} {dtype}: max rel err {worst:.3g}")
