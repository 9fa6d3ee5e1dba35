"""The T2I/T2V/I2V loop with a small fake refiner: passes, seeds, batching, adaptive steps, states, stopping."""

from types import SimpleNamespace

import pytest
import torch

from grn_core.sampler import (AdaptiveSteps, LatentRGBProjection, SamplerSettings, SamplingInterrupted, StepInfo,
                              bits_preview, decide_remaining_steps, sample_bits)
from grn_core.sampler.schedule import bit_keep_fraction

D_LAT, ROUNDS, TEXT_C = 2, 2, 8
N_BITS = D_LAT * ROUNDS


class FakeRefiner:
    """Deterministic per-row logits from (bits, step value, text, first frame); records every call.

    The text's mean value scales the logits, so different prompts give different confidence (entropy).
    """

    def __init__(self, layout="joint"):
        self.config = SimpleNamespace(layout=layout, latent_channels=D_LAT, rounds=ROUNDS, text_channels=TEXT_C)
        self.calls = []

    @staticmethod
    def _text_scale(text, rows):
        if isinstance(text, (list, tuple)):
            return torch.stack([t.mean() for t in text]).view(rows, 1, 1, 1, 1)
        return text.mean().expand(rows).reshape(rows, 1, 1, 1, 1)

    def step_logits(self, bits, step_value, text_cond, text_uncond, aspect_ratio=1.0, first_frame_bits=None):
        rows, c, t, h, w = bits.shape
        step_value = torch.as_tensor(step_value, dtype=torch.float32).reshape(-1).expand(rows)
        self.calls.append(dict(rows=rows, uncond=text_uncond is not None, step_value=step_value.tolist(),
                               first=None if first_frame_bits is None else first_frame_bits.shape[0]))
        b = bits.permute(0, 2, 3, 4, 1).float() * 2 - 1                       # [R, t, h, w, C]
        pos = torch.arange(t * h * w * c, dtype=torch.float32).reshape(1, t, h, w, c)
        sv = step_value.view(rows, 1, 1, 1, 1)
        extra = 0.0 if first_frame_bits is None else first_frame_bits.float().mean((1, 2, 3, 4)).view(rows, 1, 1, 1, 1)
        diff_c = self._text_scale(text_cond, rows) * (b + torch.sin(pos * 0.37 + 3 * sv)) + extra
        cond = torch.stack([torch.zeros_like(diff_c), diff_c], dim=-1)
        uncond = None
        if text_uncond is not None:
            diff_u = self._text_scale(text_uncond, rows) * torch.cos(pos * 0.11 + sv)
            uncond = torch.stack([torch.zeros_like(diff_u), diff_u], dim=-1)
        return cond, uncond


def text(value, length=3):
    return torch.full((length, TEXT_C), float(value))


def run(ref=None, **kw):
    ref = ref or FakeRefiner()
    kw.setdefault("grid", (2, 3, 4))
    kw.setdefault("settings", SamplerSettings(steps=6))
    args = (kw.pop("text_cond", text(1.0)), kw.pop("text_uncond", text(0.5)))
    return ref, sample_bits(ref, *args, **kw)


def test_shapes_and_fixed_step_count():
    ref, res = run(batch_size=2)
    assert res.bits.shape == (2, N_BITS, 2, 3, 4) and res.bits.dtype == torch.uint8
    assert res.steps == [6, 6] and res.nfe == [12, 12] and res.model_calls == 6
    assert all(len(curve) == 6 for curve in res.entropy)
    assert not res.interrupted


def test_realised_fraction_feeds_next_step_token():
    ref, res = run(settings=SamplerSettings(steps=6))
    fed = [c["step_value"][0] for c in ref.calls]
    assert fed[0] == 0.0
    assert fed[1:] == pytest.approx(res.kept_fraction[0][:-1], abs=1e-6)
    # realised fractions track the schedule r_{i+1} (only 96 bits: loose)
    expected = [bit_keep_fraction(i, 6, 0.95) for i in range(6)]
    assert res.kept_fraction[0][-1] == pytest.approx(expected[-1], abs=0.15)


def test_no_uncond_pass_at_guidance_one():
    ref, res = run(settings=SamplerSettings(steps=5, guidance=1.0))
    assert [c["uncond"] for c in ref.calls] == [False] * 5
    assert res.nfe == [5]
    ref, res = run(text_uncond=None, settings=SamplerSettings(steps=3, guidance=1.0))
    assert res.nfe == [3]


def test_uncond_only_inside_guidance_interval():
    ref, res = run(settings=SamplerSettings(steps=8, guidance=3.0, cfg_interval=0.5))
    fed = [c["step_value"][0] for c in ref.calls]
    assert [c["uncond"] for c in ref.calls] == [r >= 0.5 for r in fed]
    assert 0 < sum(r >= 0.5 for r in fed) < 8
    assert res.nfe == [8 + sum(r >= 0.5 for r in fed)]


def test_same_seed_same_bits_other_seed_differs():
    _, a = run(seed=7)
    _, b = run(seed=7)
    _, c = run(seed=8)
    assert torch.equal(a.bits, b.bits)
    assert not torch.equal(a.bits, c.bits)


ADAPTIVE = SamplerSettings(steps=12, adaptive=AdaptiveSteps(warmup=2, k=10.0, b=0.0, min_steps=4))
TEXTS = [text(0.05), text(4.0), text(1.0)]  # low scale -> high entropy -> many steps


def test_batch_item_equals_single_run_with_seed_plus_k():
    _, batch = run(batch_size=3, seed=100, text_cond=TEXTS, text_uncond=text(0.5), settings=ADAPTIVE)
    for k in range(3):
        _, single = run(batch_size=1, seed=100 + k, text_cond=[TEXTS[k]], text_uncond=text(0.5), settings=ADAPTIVE)
        assert torch.equal(batch.bits[k], single.bits[0])
        assert batch.steps[k] == single.steps[0]
        assert batch.entropy[k] == pytest.approx(single.entropy[0], abs=1e-6)


def test_adaptive_steps_follow_formula_and_finished_samples_leave():
    ref, res = run(batch_size=3, seed=3, text_cond=TEXTS, settings=ADAPTIVE)
    a = ADAPTIVE.adaptive
    for k in range(3):
        h = res.decision_entropy[k]
        assert h == pytest.approx(res.entropy[k][a.warmup], abs=1e-6)  # the entropy of step `warmup`
        expected = decide_remaining_steps(h, a.k, a.b, a.warmup, a.min_steps, ADAPTIVE.steps)
        assert expected == round(min(max(a.k * h + a.b, a.min_steps - a.warmup), ADAPTIVE.steps - a.warmup))
        assert res.remaining_steps[k] == expected
        assert res.steps[k] == a.warmup + expected
    assert len(set(res.steps)) > 1, res.steps            # the fake prompts give different step counts
    rows = res.rows_per_call
    assert rows == sorted(rows, reverse=True) and rows[0] == 3 and rows[-1] == 1
    assert rows == [sum(s > i for s in res.steps) for i in range(max(res.steps))]
    assert sum(rows) * 2 == res.nfe_total               # guided every step: 2 branches per row


def test_adaptive_temperature_option_changes_result():
    s = SamplerSettings(steps=12, adaptive=AdaptiveSteps(warmup=2, k=0.0, b=3.0, min_steps=4), adaptive_temperature=True)
    _, a = run(seed=5, settings=s)
    _, b = run(seed=5, settings=s.replace(adaptive_temperature=False))
    assert a.steps == b.steps == [5]
    assert not torch.equal(a.bits, b.bits)


def test_callback_states_and_token_map():
    infos = []
    _, res = run(grid=(1, 80, 70), seed=1, settings=SamplerSettings(steps=4), callback=infos.append)
    assert [i.step for i in infos] == [0, 1, 2, 3] and all(i.total_steps == 4 for i in infos)
    n_tokens = 80 * 70
    for i in infos:
        assert isinstance(i, StepInfo)
        (bc,), (tc,) = i.bit_counts, i.token_counts
        assert bc.total == n_tokens * N_BITS and tc.total == n_tokens
        assert i.kept_fraction[0] == pytest.approx((bc.fill + bc.keep) / (n_tokens * N_BITS), abs=1e-12)
        assert i.token_states.shape == (1, 1, 64, 64) and i.token_states.dtype == torch.uint8
        assert int(i.token_states.max()) <= 3
    first = infos[0].bit_counts[0]
    assert first.keep == 0 and first.erase == 0          # nothing was kept before step 0
    assert infos[2].bit_counts[0].erase > 0               # kept bits do go back to Z


def test_callback_stop_by_false_and_by_exception():
    ref, res = run(batch_size=2, settings=SamplerSettings(steps=10), callback=lambda info: info.step < 2)
    assert res.interrupted and res.steps == [3, 3] and len(ref.calls) == 3
    assert res.bits.shape == (2, N_BITS, 2, 3, 4)

    def stop(info):
        raise SamplingInterrupted()
    ref, res = run(settings=SamplerSettings(steps=10), callback=stop)
    assert res.interrupted and res.steps == [1] and len(ref.calls) == 1


def test_preview_fn_receives_current_sample():
    proj = LatentRGBProjection(torch.ones(D_LAT, 3), torch.zeros(3))
    seen = []
    _, res = run(settings=SamplerSettings(steps=3, preview_every=2), preview_fn=bits_preview(proj, ROUNDS),
                 callback=lambda info: seen.append(info.preview))
    assert seen[1] is None and seen[0].shape == (1, 2, 3, 3, 4) and seen[2].shape == (1, 2, 3, 3, 4)


def test_i2v_first_frame_passed_and_prepended():
    first = torch.randint(0, 2, (1, N_BITS, 1, 3, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ref, res = run(grid=(3, 3, 4), batch_size=2, first_frame_bits=first)
    assert res.bits.shape == (2, N_BITS, 3, 3, 4)
    assert torch.equal(res.bits[:, :, :1], first.expand(2, -1, -1, -1, -1))
    assert all(c["first"] == 2 for c in ref.calls)


def test_prefix_layout_uses_its_cap():
    _, res = run(ref=FakeRefiner("prefix"), grid=(1, 20, 20), settings=SamplerSettings(steps=4))
    assert res.kept_fraction[0][-1] == pytest.approx(0.999, abs=0.01)


@pytest.mark.parametrize("kwargs, match", [
    (dict(settings=SamplerSettings(steps=0)), "steps"),
    (dict(settings=SamplerSettings(guidance=-1.0)), "guidance"),
    (dict(settings=SamplerSettings(temperature=0.0)), "temperature"),
    (dict(grid=(3, 3, 4), first_frame_bits=torch.zeros(1, N_BITS, 1, 4, 4, dtype=torch.uint8)), "first_frame_bits"),
    (dict(grid=(3, 3, 4), first_frame_bits=torch.full((1, N_BITS, 1, 3, 4), 3, dtype=torch.uint8)), "first_frame_bits"),
    (dict(text_cond=torch.zeros(3, TEXT_C + 1)), "text_channels"),
    (dict(text_uncond=[text(1.0)] * 2, batch_size=3), "batch_size"),
    (dict(text_uncond=None), "text_uncond"),
    (dict(grid=(0, 3, 4)), "grid"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_input_rejected_before_any_work(kwargs, match):
    ref = FakeRefiner()
    with pytest.raises(ValueError, match=match):
        run(ref=ref, **kwargs)
    assert ref.calls == []


def test_latent_rgb_projection_least_squares():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(5, 3, generator=g), torch.tensor([0.1, -0.2, 0.3])
    feats = torch.randn(200, 5, generator=g)
    proj = LatentRGBProjection().fit(feats, feats @ weight + bias)
    assert torch.allclose(proj.weight, weight, atol=1e-5) and torch.allclose(proj.bias, bias, atol=1e-5)
    grid = torch.randn(2, 5, 4, 6, generator=g)                       # [..., d, h, w]
    expected = torch.einsum("bdhw,dc->bchw", grid, weight) + bias.view(3, 1, 1)
    assert torch.allclose(proj(grid), expected, atol=1e-5)
    again = LatentRGBProjection.from_dict(proj.to_dict())
    assert torch.allclose(again(grid), proj(grid))
    with pytest.raises(ValueError, match="rgb"):
        proj.fit(feats, torch.zeros(200, 4))


class PreparedText:
    def __init__(self, text):
        self.text, self.num_items = text, (len(text) if isinstance(text, list) else 1)


class PreparingRefiner(FakeRefiner):
    """Offers prepare_text, like GRNRefiner: step_logits accepts the prepared object in place of the text."""

    def __init__(self):
        super().__init__()
        self.prepared = []

    def prepare_text(self, text):
        self.prepared.append(len(text) if isinstance(text, list) else 1)
        return PreparedText(text)

    def step_logits(self, bits, step_value, text_cond, text_uncond, **kw):
        assert isinstance(text_cond, PreparedText) and (text_uncond is None or isinstance(text_uncond, PreparedText))
        return super().step_logits(bits, step_value, text_cond.text,
                                   None if text_uncond is None else text_uncond.text, **kw)


def test_text_prepared_once_and_again_only_when_rows_leave():
    ref = PreparingRefiner()
    _, res = run(ref=ref, batch_size=3, seed=100, text_cond=TEXTS, text_uncond=text(0.5), settings=ADAPTIVE)
    _, plain = run(batch_size=3, seed=100, text_cond=TEXTS, text_uncond=text(0.5), settings=ADAPTIVE)
    assert torch.equal(res.bits, plain.bits)
    # cond list of 3 and shared uncond at the start; the cond list again for 2 rows, then for 1 row
    assert ref.prepared == [3, 1, 2, 1]


def test_prepared_per_sample_context_rejected_when_batch_can_shrink():
    ref = PreparingRefiner()
    ctx = ref.prepare_text(TEXTS)
    with pytest.raises(ValueError, match="raw features"):
        sample_bits(ref, ctx, text(0.5), grid=(2, 3, 4), batch_size=3, settings=ADAPTIVE)
    res = sample_bits(ref, ctx, text(0.5), grid=(2, 3, 4), batch_size=3, settings=SamplerSettings(steps=2))
    assert res.steps == [2, 2, 2]


def test_runs_with_the_real_refiner_on_golden_weights():
    from grn_core import refiner as refiner_mod
    from tests._golden import golden_meta, load_golden

    weights, io = load_golden("refiner_joint_weights.safetensors"), load_golden("refiner_joint_io.safetensors")
    model = refiner_mod.GRNRefiner(refiner_mod.infer_refiner_config(weights, layout="joint"))
    model.load_state_dict(weights, strict=True)
    model = model.double().eval()
    aspect = golden_meta("joint")["refiner_joint"]["aspect_template"]
    first = io["i2v.first_frame_labels"].to(torch.uint8)                 # [1, 32, 1, 12, 21]
    grid = (3, first.shape[3], first.shape[4])
    texts = [io["text_cond"].double(), io["text_cond"][:4].double()]
    settings = SamplerSettings(steps=4, adaptive=AdaptiveSteps(warmup=1, k=0.0, b=1.0, min_steps=2))
    kw = dict(grid=grid, settings=settings, aspect_ratio=aspect, first_frame_bits=first)
    batch = sample_bits(model, texts, io["text_uncond"].double(), batch_size=2, seed=21, **kw)
    assert batch.bits.shape == (2, 32, 3, 12, 21) and batch.steps == [2, 2]
    assert torch.equal(batch.bits[:, :, :1], first.expand(2, -1, -1, -1, -1))
    single = sample_bits(model, [texts[1]], io["text_uncond"].double(), batch_size=1, seed=22, **kw)
    assert torch.equal(batch.bits[1], single.bits[0])
