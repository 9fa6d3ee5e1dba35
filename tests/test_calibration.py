"""Calibrating adaptive steps: the fit follows its stated rule, ladders share their warm-up, the CLI writes a rule
that ``generate --adaptive-rule`` obeys, and bad input is refused plainly."""

import json
import math

import pytest
import torch

from grn_core.__main__ import main
from grn_core.calibration import (CalibrationRun, Scorer, calibrate, fit_rule, judge_scorer, likelihood_scorer,
                                  read_rule, rule_score, run_ladder)
from grn_core.models import load_tiny, tiny_available
from grn_core.sampler import AdaptiveSteps, SamplerSettings

needs_tiny = pytest.mark.skipif(not tiny_available(), reason="the built-in tiny model is not in this checkout")


def test_fit_takes_each_groups_need_and_covers_them():
    # Four samples per group; group entropies 0.2 and 0.8. Low-entropy group: rung 5 already as good as the best;
    # high-entropy group: needs 25 (15 is 0.25 below the best, 25 within 0.05).
    entropy = [0.2] * 4 + [0.8] * 4
    scores = {5: [1, 1, 1, 0] + [0, 0, 0, 1], 15: [1, 1, 0, 1] + [0, 1, 0, 1], 25: [1, 1, 1, 0] + [1, 1, 1, 0],
              45: [1, 0, 1, 1] + [1, 1, 1, 0]}
    k, b, stats = fit_rule(entropy, scores, bins=2, tolerance=0.05)
    assert [g["needs"] for g in stats["groups"]] == [5, 25]
    assert math.isclose(k, 20 / 0.6) and math.isclose(k * 0.2 + b, 5) and math.isclose(k * 0.8 + b, 25)


def test_fit_never_decreases_with_entropy_and_is_an_upper_envelope():
    entropy = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    scores = {5: [1, 1, 0, 0, 0, 0], 10: [1, 1, 1, 1, 0, 0], 45: [1, 1, 1, 1, 1, 1]}  # needs 5, 10, 45 by bin
    k, b, stats = fit_rule(entropy, scores, bins=3, tolerance=0.0)
    needs = [g["needs"] for g in stats["groups"]]
    centres = [g["entropy_mean"] for g in stats["groups"]]
    assert needs == [5, 10, 45] and k > 0
    assert all(k * c + b >= n - 1e-9 for c, n in zip(centres, needs))
    inverted = {5: [0, 0, 1, 1, 1, 1], 45: [1, 1, 1, 1, 1, 1]}  # the low-entropy bin needs 45, the others 5
    k_flat, b_flat, _ = fit_rule(entropy, inverted, bins=3, tolerance=0.0)
    assert k_flat == 0.0 and b_flat == 45  # fewer steps for harder content is noise, not a rule; 45 covers all


def test_relative_tolerance_is_a_fraction_of_the_gain():
    entropy = [0.5, 0.5]
    scores = {5: [-0.10, -0.10], 10: [-0.06, -0.06], 25: [-0.051, -0.051], 45: [-0.05, -0.05]}
    _, b, stats = fit_rule(entropy, scores, bins=1, tolerance=0.1, relative=True)
    assert stats["groups"][0]["needs"] == 25  # 10 keeps 80 % of the gain, 25 keeps 98 %
    assert math.isclose(b, 25)


def test_noise_allowance_accepts_shortfalls_within_a_standard_error_only():
    # One group of 20 samples. Rung 45 is best (0.8); rung 15 is 0.1 below it, with paired differences
    # (4 x -1, 2 x +1) whose standard error is 0.124: within tolerance 0.05 + 1 SE. Rung 5 is 0.6 below (SE 0.11):
    # a real loss, never accepted.
    best = [1] * 16 + [0] * 4
    fifteen = [0] * 4 + [1] * 12 + [1, 1, 0, 0]
    five = [0] * 12 + [1] * 4 + [0] * 4
    entropy = [0.5] * 20
    scores = {5: five, 15: fifteen, 45: best}
    assert sum(fifteen) == 14 and sum(five) == 4
    _, b_strict, strict = fit_rule(entropy, scores, bins=1, tolerance=0.05)
    _, b_noisy, noisy = fit_rule(entropy, scores, bins=1, tolerance=0.05, noise_z=1.0)
    assert strict["groups"][0]["needs"] == 45 and b_strict == 45
    assert noisy["groups"][0]["needs"] == 15 and b_noisy == 15
    with pytest.raises(ValueError, match="noise_z=-1"):
        fit_rule(entropy, scores, noise_z=-1)


def test_overall_guard_raises_b_until_the_prompt_set_keeps_its_score():
    # 10 samples at one entropy. A lenient per-group fit (huge noise allowance) accepts rung 5, which costs the
    # prompt set 0.3 against rung 15/45; the guard (0.02) raises b to 15, the first value whose rung keeps it.
    entropy = [0.5] * 10
    scores = {5: [1] * 5 + [0] * 5, 15: [1] * 8 + [0] * 2, 45: [1] * 8 + [0] * 2}
    run = CalibrationRun(entropy, scores, ["p"] * 10, [0], 0.0)
    lenient = Scorer("test", lambda *a: [], tolerance=0.05, relative=False, noise_z=100.0)
    guarded = Scorer("test", lambda *a: [], tolerance=0.05, relative=False, noise_z=100.0, overall_tolerance=0.02)
    loose = calibrate(run, lenient, warmup=5, min_steps=6, bins=1)
    tight = calibrate(run, guarded, warmup=5, min_steps=6, bins=1)
    assert loose["rule"]["b"] == 5 and loose["fit"]["rule_score"] == 0.5
    assert tight["rule"]["b"] == 15 and tight["fit"]["b_from_groups"] == 5 and tight["fit"]["rule_score"] == 0.8
    assert tight["mean_total_steps"] == 20
    # Between rungs a sample counts at the rung below its D: D = 14 is scored as rung 5.
    assert rule_score(AdaptiveSteps(warmup=5, k=0.0, b=14.0, min_steps=6), entropy, scores) == 0.5


def test_fit_refuses_ragged_scores():
    with pytest.raises(ValueError, match="one score per sample on every rung"):
        fit_rule([0.1, 0.2], {5: [1.0], 10: [1.0, 0.0]})


def test_read_rule_accepts_reports_and_refuses_garbage(tmp_path):
    report = tmp_path / "rule.json"
    report.write_text(json.dumps({"rule": {"warmup": 5, "k": 10.0, "b": 3.0, "min_steps": 10, "calibrated": True},
                                  "fit": {}}))
    rule = read_rule(report)
    assert (rule.warmup, rule.k, rule.b, rule.min_steps, rule.calibrated) == (5, 10.0, 3.0, 10, True)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json: not a readable JSON file"):
        read_rule(bad)
    bad.write_text(json.dumps({"k": 1}))
    with pytest.raises(ValueError, match=r"expected a JSON object with warmup, k, b and min_steps"):
        read_rule(bad)


@needs_tiny
def test_ladder_shares_the_warm_up_and_scores_every_rung():
    torch.set_num_threads(1)
    model = load_tiny()
    prompts = ["a red circle moving right", "a blue square moving up", "a green triangle moving left"]
    base = SamplerSettings.for_task("t2v", steps=20)
    run = run_ladder(model, prompts, [0], width=32, height=32, frames=9, scorer=likelihood_scorer, base=base,
                     ladder=(2, 6, 14), batch_size=2)
    assert len(run.entropy) == 3 and all(0.0 < h <= 1.0 for h in run.entropy)
    assert sorted(run.scores) == [2, 6, 14] and all(len(v) == 3 for v in run.scores.values())
    assert all(s <= 0.0 for v in run.scores.values() for s in v)  # mean log-probabilities
    again = run_ladder(model, prompts, [0], width=32, height=32, frames=9, scorer=likelihood_scorer, base=base,
                       ladder=(2, 6, 14), batch_size=3)  # other batching, same per-prompt seed streams
    assert again.entropy == pytest.approx(run.entropy, abs=1e-5)
    report = calibrate(run, likelihood_scorer, max_steps=20)
    assert report["samples"] == 3 and report["rule"]["calibrated"] and report["rule"]["k"] >= 0
    with pytest.raises(ValueError, match="ladder reaches 5 \\+ 45 steps but steps=20"):
        run_ladder(model, prompts, [0], width=32, height=32, frames=9, base=base)


@needs_tiny
def test_judge_scorer_reads_shapes_captions():
    model = load_tiny()
    run = run_ladder(model, ["a red circle moving right"], [0], width=32, height=32, frames=9, scorer=judge_scorer,
                     base=SamplerSettings.for_task("t2v", steps=12), ladder=(3, 6))
    assert all(v[0] in (0.0, 1.0) for v in run.scores.values())


@needs_tiny
def test_cli_writes_a_rule_that_generate_follows(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na red circle moving right\n\na blue square moving down\n")
    out = tmp_path / "rule.json"
    assert main(["calibrate", "--model", "tiny", "--prompts", str(prompts), "--seeds", "0", "--bins", "2",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["scorer"] == "judge" and report["samples"] == 2 and report["size"] == [32, 32, 9]
    assert json.loads(capsys.readouterr().out) == report
    # A rule that always wants 7 more steps after a warm-up of 3: generate must take exactly 10.
    out.write_text(json.dumps({"warmup": 3, "k": 0.0, "b": 7.0, "min_steps": 4}))
    clip = tmp_path / "clip.gif"
    assert main(["generate", "--prompt", "a red circle moving right", "--adaptive-rule", str(out),
                 "--out", str(clip)]) == 0
    sidecar = json.loads(clip.with_suffix(".json").read_text())
    assert sidecar["steps"] == 10 and sidecar["adaptive_decision"] == 7


@needs_tiny
def test_cli_errors_name_the_fix(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    assert main(["calibrate", "--model", "tiny", "--prompts", str(empty)]) == 2
    assert "holds no prompts; write one prompt per line" in capsys.readouterr().err
    assert main(["calibrate", "--model", "tiny", "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: cannot read it" in capsys.readouterr().err


def test_run_summary_counts_steps():
    run = CalibrationRun([0.1, 0.9], {5: [1.0, 0.0], 45: [1.0, 1.0]}, ["a", "b"], [0], 1.0)
    report = calibrate(run, judge_scorer, bins=2)
    rule = report["rule"]
    steps = [rule["warmup"] + round(min(max(rule["k"] * h + rule["b"], 5), 45)) for h in (0.1, 0.9)]
    assert report["mean_total_steps"] == pytest.approx(sum(steps) / 2)
    assert steps == [10, 50]
