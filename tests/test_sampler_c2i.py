"""The class-to-image loop with a small fake GRN_ind network."""

from types import SimpleNamespace

import pytest
import torch

from grn_core.sampler import AdaptiveSteps, C2ISettings, decide_remaining_steps, sample_c2i
from grn_core.sampler.c2i_loop import in_guidance_interval, sample_categorical
from grn_core.sampler.schedule import adaptive_temperature_factor

D, SIDE, ROUNDS, NUM_CLASSES = 3, 4, 2, 10
K = 2 ** ROUNDS


class FakeC2I:
    """Deterministic per-row logits from (labels, t, y); the class label sets the confidence."""

    def __init__(self):
        self.config = SimpleNamespace(latent_channels=D, input_size=SIDE, rounds=ROUNDS, num_classes=NUM_CLASSES)
        self.calls = []

    def __call__(self, x, t, y):
        rows = x.shape[0]
        self.calls.append(dict(rows=rows, t=t.tolist(), y=y.tolist()))
        onehot = torch.nn.functional.one_hot(x, K).permute(0, 4, 1, 2, 3).float()     # [R, K, d, h, w]
        pos = torch.arange(K * D * SIDE * SIDE, dtype=torch.float32).reshape(1, K, D, SIDE, SIDE)
        scale = (y.float() * 0.4 + 0.1).view(rows, 1, 1, 1, 1)
        return scale * (torch.sin(pos * 0.71 + 2 * t.view(rows, 1, 1, 1, 1)) + onehot)


def run(net=None, **kw):
    net = net or FakeC2I()
    kw.setdefault("settings", C2ISettings(steps=6))
    return net, sample_c2i(net, kw.pop("labels", [3]), **kw)


def test_shapes_linear_schedule_and_interval():
    net, res = run(labels=[1, 2])
    assert res.bits.shape == (2, D, SIDE, SIDE) and res.bits.dtype == torch.long
    assert int(res.bits.max()) < K
    cond_calls = [c for c in net.calls if c["y"][0] != NUM_CLASSES]
    assert [c["t"][0] for c in cond_calls] == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    # default interval (0.44, 1.0): guided at t = 3/6, 4/6, 5/6 only -> separate uncond passes there
    uncond_calls = [c for c in net.calls if c["y"][0] == NUM_CLASSES]
    assert [c["t"][0] for c in uncond_calls] == pytest.approx([3 / 6, 4 / 6, 5 / 6])
    assert res.nfe == [9, 9]


def test_interval_rule_matches_official():
    assert in_guidance_interval(0.0, (0.0, 1.0)) and not in_guidance_interval(1.0, (0.0, 1.0))
    assert not in_guidance_interval(0.44, (0.44, 1.0)) and in_guidance_interval(0.45, (0.44, 1.0))


def test_guidance_one_skips_uncond():
    net, res = run(settings=C2ISettings(steps=5, guidance=1.0))
    assert all(c["y"][0] != NUM_CLASSES for c in net.calls) and res.nfe == [5]


def test_batch_equals_single_and_seeds():
    adaptive = C2ISettings(steps=10, interval=(0.0, 1.0),
                           adaptive=AdaptiveSteps(warmup=2, k=12.0, b=-2.0, min_steps=4))
    _, batch = run(labels=[0, 9, 4], seed=50, settings=adaptive)
    for k, label in enumerate([0, 9, 4]):
        _, single = run(labels=[label], seed=50 + k, settings=adaptive)
        assert torch.equal(batch.bits[k], single.bits[0])
        assert batch.steps[k] == single.steps[0]
    _, again = run(labels=[0, 9, 4], seed=50, settings=adaptive)
    assert torch.equal(batch.bits, again.bits)
    for k in range(3):
        h = batch.decision_entropy[k]
        assert batch.remaining_steps[k] == decide_remaining_steps(h, 12.0, -2.0, 2, 4, 10)
        assert batch.steps[k] == 2 + batch.remaining_steps[k]
    assert len(set(batch.steps)) > 1, batch.steps
    cond_rows = batch.rows_per_call[::2]  # guided every step: cond call, uncond call
    assert cond_rows == [sum(s > i for s in batch.steps) for i in range(max(batch.steps))]


def test_official_adaptive_temperature_is_applied():
    s = C2ISettings(steps=10, adaptive=AdaptiveSteps(warmup=2, k=0.0, b=4.0, min_steps=4))
    assert adaptive_temperature_factor(4) == 0.5
    _, a = run(seed=1, settings=s)
    _, b = run(seed=1, settings=C2ISettings(steps=10, adaptive=s.adaptive, adaptive_temperature=False))
    assert a.steps == b.steps == [6] and not torch.equal(a.bits, b.bits)


def test_callback_counts_and_stop():
    infos = []

    def cb(info):
        infos.append(info)
        return info.step < 3
    _, res = run(labels=[2, 5], settings=C2ISettings(steps=8), callback=cb)
    assert res.interrupted and res.steps == [4, 4]
    for info in infos:
        for bc, tc in zip(info.bit_counts, info.token_counts):
            assert bc.total == D * SIDE * SIDE and tc.total == SIDE * SIDE
        assert info.token_states.shape == (2, 1, SIDE, SIDE)


def test_sample_categorical_inverse_cdf():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1)
    u = torch.tensor([0.05, 0.1, 0.29, 0.31, 0.6, 0.99999]).view(1, 1, 6).expand(1, 1, 6)
    got = sample_categorical(probs.expand(1, 4, 6), u.reshape(1, 6))
    assert got.tolist() == [[0, 1, 1, 2, 3, 3]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(settings=C2ISettings(steps=0)), "steps"),
    (dict(settings=C2ISettings(guidance=-2.0)), "guidance"),
    (dict(settings=C2ISettings(temperature=-1.0)), "temperature"),
    (dict(labels=[11]), "class labels"),
    (dict(labels=[]), "empty"),
    (dict(latent_shape=(3, 0, 4)), "latent_shape"),
])
def test_bad_input_rejected_before_any_work(kwargs, match):
    net = FakeC2I()
    with pytest.raises(ValueError, match=match):
        run(net=net, **kwargs)
    assert net.calls == []


def test_runs_with_the_real_c2i_network_on_golden_weights():
    from grn_core import c2i
    from tests._golden import golden_meta, load_golden

    weights = load_golden("c2i_weights.safetensors")
    config = c2i.infer_c2i_config(weights, in_context_start=golden_meta("joint")["c2i"]["ictx_start"])
    net = c2i.C2IRefiner(config)
    net.load_state_dict(weights, strict=True)
    net.eval()
    settings = C2ISettings(steps=4, interval=(0.0, 1.0))
    with torch.no_grad():
        a = sample_c2i(net, [1, 7], seed=3, settings=settings)
        b = sample_c2i(net, [1, 7], seed=3, settings=settings)
    assert a.bits.shape == (2, config.latent_channels, config.input_size, config.input_size)
    assert torch.equal(a.bits, b.bits) and a.nfe == [8, 8]
