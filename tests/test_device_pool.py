"""Load GRN's ``devices``: the pool of worker processes (``grn_nodes/pool.py``) with ``cpu,cpu`` (gloo), through the
nodes as ComfyUI runs them (the fakes of ``tests/_fake_comfy.py``).

A pooled run gives the single-process run's bits, widget events and progress exactly (two workers with guidance:
one guidance branch each; guidance 1 or three workers: the first samples alone); ComfyUI's Cancel stops the workers
mid-run and the next run matches; "Unload models" and dropping the Load GRN output stop and join the workers (no
process left), and the next run starts them again; a worker that dies mid-run, or a request the library refuses,
comes back as a clear error at once, never a hang; bad ``devices`` values are user errors naming the fix.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import re
import signal
import time

import pytest
import torch

from grn_nodes.errors import GRNNodeError
from grn_nodes.pool import DevicePool, DevicePoolError, PoolModel, parallel_mode, parse_devices
from tests._fake_comfy import InterruptProcessingException
from tests.test_nodes_execute import comfy, fresh, nodes  # noqa: F401  (the node tests' fixtures: fake ComfyUI, models)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

# guidance 3 from step 2 on (interval 0.3): unguided steps (rank 0 computes, rank 1 waits) and guided ones (a branch
# each); seed 5 as the other node tests
REQUEST = {"width": 32, "height": 32, "frames": 9, "steps": 6, "seed": 5, "guidance": 3.0, "guidance_interval": 0.3}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread here and in each worker (the pool gives its CPU workers this process's count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single(comfy, nodes):
    return comfy.run(nodes.GRNLoadModel, refiner="tiny").args[0]


@pytest.fixture(scope="module")
def pooled(comfy, nodes):
    loaded = comfy.run(nodes.GRNLoadModel, refiner="tiny", devices=" cpu, cpu ").args[0]
    yield loaded
    loaded.pool.close()


@pytest.fixture(scope="module")
def cond(comfy, nodes, single):
    return comfy.run(nodes.GRNEncodePrompt, model=single, prompt="a red circle moving right").args[0]


def _sample(comfy, nodes, model, cond, **overrides):
    out = comfy.run(nodes.GRNRefineSampler, unique_id="7", model=model, conditioning=cond, **{**REQUEST, **overrides})
    return out.args[0], out.ui, list(comfy.events), [(p.value, p.total) for p in comfy.progress]


def _gone(pid: int) -> bool:
    """The process ended and was reaped (no /proc entry), or at least is no longer running."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


# ---- runs ------------------------------------------------------------------------------------------------------------

def test_pooled_runs_give_the_single_process_bits_events_and_progress(comfy, nodes, single, pooled, cond):
    pool = pooled.pool
    assert pool.devices == ("cpu", "cpu") and pool.running and len(pool.pids) == 2
    assert set(pool.pids) <= _children()
    assert pooled.patchers["pool"] in comfy.loaded  # Load GRN handed it to ComfyUI's memory manager
    assert "sampled by a pool of workers on cpu, cpu" in pooled.describe()
    assert all(p.is_meta for p in pooled.model.refiner.parameters())  # no refiner weights in this process
    pids = pool.pids
    for guidance, mode in ((3.0, "cfg"), (1.0, "sp")):  # a branch per worker; the sequence split
        assert pool.mode_for("t2v", guidance) == mode
        comfy.reset()
        alone = _sample(comfy, nodes, single, cond, guidance=guidance)
        comfy.reset()
        shared = _sample(comfy, nodes, pooled, cond, guidance=guidance)
        assert torch.equal(shared[0].bits, alone[0].bits), guidance
        assert shared[0].sampling.nfe == alone[0].sampling.nfe and shared[0].sampling.steps == [6]
        assert shared[1] == alone[1]  # the node's text
        assert shared[2] == alone[2] and len(shared[2]) == 6  # the widget events, exactly
        assert shared[3] == alone[3] == [(s, 6) for s in range(1, 7)]  # the progress bar
        assert shared[0].extras["steps"] == alone[0].extras["steps"]  # Refine Stats' records
        assert "refiner" not in pooled.patchers  # the workers sample: this process's refiner is never loaded
        assert comfy.loads[-1].models == [pooled.patchers["pool"]] and comfy.loads[-1].memory_required > 0
    assert pool.pids == pids and pool.starts == 1  # the same warm workers every run


def test_cancel_mid_run_stops_the_workers_and_the_next_run_matches(comfy, nodes, single, pooled, cond):
    pool, pids = pooled.pool, pooled.pool.pids
    comfy.on_send = lambda event, data: comfy.interrupt() if data["step"] == 2 else None  # Cancel during step 3
    began = time.monotonic()
    with pytest.raises(InterruptProcessingException):
        comfy.run(nodes.GRNRefineSampler, model=pooled, conditioning=cond, **{**REQUEST, "steps": 200, "seed": 9})
    assert time.monotonic() - began < 30
    assert 3 <= len(comfy.events) < 200 and comfy.interrupted is False  # stopped; ComfyUI's flag consumed
    assert [p.value for p in comfy.progress] == [1, 2]  # the third update raised
    assert pool.pids == pids and not pool._stop.is_set()  # the same workers, ready again
    comfy.reset()
    again = _sample(comfy, nodes, pooled, cond)[0]
    comfy.reset()
    assert torch.equal(again.bits, _sample(comfy, nodes, single, cond)[0].bits)
    assert pool.pids == pids


def test_cancel_seen_while_waiting_stops_between_steps_and_the_pool_goes_on(pooled, cond):
    """ComfyUI's flag polled by the pool (no step callback to raise): the workers agree to stop, the caller gets
    RefinerInterrupted (the node turns it into ComfyUI's interrupt), and the next run is whole."""
    from grn_core.pipeline import GenerationRequest
    from grn_core.refiner.model import RefinerInterrupted
    from grn_core.sampler import SamplerSettings

    pool, pids = pooled.pool, pooled.pool.pids
    feats = cond.for_task("t2v")
    polls = []

    def cancel_after_a_while() -> bool:
        polls.append(1)
        return len(polls) > 4

    long = GenerationRequest(32, 32, 9, seed=3, settings=SamplerSettings(steps=2000, guidance=3.0))
    steps = []
    with pytest.raises(RefinerInterrupted):
        pool.generate_tokens(feats, long, callback=steps.append, should_stop=cancel_after_a_while)
    assert len(steps) < 2000
    short = GenerationRequest(32, 32, 9, seed=3, settings=SamplerSettings(steps=3, guidance=3.0))
    assert pool.generate_tokens(feats, short).sampling.steps == [3] and pool.pids == pids


def test_a_request_the_library_refuses_comes_back_as_its_error_and_the_pool_stays(pooled, cond):
    from grn_core.pipeline import GenerationRequest
    from grn_core.sampler import SamplerSettings

    pool, pids = pooled.pool, pooled.pool.pids
    feats = cond.for_task("t2v")
    narrow = type(feats)(feats.cond[:, :8], feats.uncond[:, :8], feats.task, feats.text)  # 8-wide, the refiner: 64
    with pytest.raises(ValueError, match="8 feature channels but the refiner expects text_channels=64"):
        pool.generate_tokens(narrow, GenerationRequest(32, 32, 9, seed=1,
                                                       settings=SamplerSettings(steps=2, guidance=3.0)))
    assert pool.pids == pids  # both workers refused it the same way before any exchange: nothing to restart


def test_edits_on_the_pool_give_the_single_process_bits(comfy, nodes, single, pooled, cond):
    """extend_from (its last frame encoded here, with this process's tokenizer) and an inpainting mask (the kept cells
    travel with the request): the workers give the single-process bits and the same widget events."""
    source = comfy.run(nodes.GRNRefineSampler, model=single, conditioning=cond, **REQUEST).args[0]
    clip = comfy.run(nodes.GRNDecodeVideo, model=single, tokens=source, tile=0).args[0]
    mask = torch.zeros(1, 32, 32)
    mask[:, :, 16:] = 1.0
    for edit in ({"extend_from": clip}, {"source_tokens": source, "mask": mask, "strength": 0.8}):
        comfy.reset()
        alone = _sample(comfy, nodes, single, cond, seed=12, **edit)
        comfy.reset()
        shared = _sample(comfy, nodes, pooled, cond, seed=12, **edit)
        assert torch.equal(shared[0].bits, alone[0].bits) and shared[1] == alone[1] and shared[2] == alone[2]
        assert shared[2][0][1]["fixed"]  # the kept cells reach the widget (events: (name, data, client))
        expected = [pooled.patchers["tokenizer"], pooled.patchers["pool"]] if "extend_from" in edit else \
            [pooled.patchers["pool"]]
        assert comfy.loads[-1].models == expected


def test_i2v_with_model_files_on_the_pool_gives_the_single_process_bits(comfy, nodes):
    """The workers load the files Load GRN resolved (the golden joint refiner under the 8B I2V name, 'auto'
    tokenizer); a first-frame image is encoded by rank 0's tokenizer, first-frame tokens travel as they are."""
    from tests.test_nodes_execute import I2V_REFINER

    one = comfy.run(nodes.GRNLoadModel, refiner=I2V_REFINER, tokenizer="auto").args[0]
    two = comfy.run(nodes.GRNLoadModel, refiner=I2V_REFINER, tokenizer="auto", devices="cpu,cpu").args[0]
    try:
        assert two.pool.model.refiner_path.endswith(I2V_REFINER) and two.pool.model.tokenizer_path
        golden_cond = comfy.run(nodes.GRNEncodePrompt, model=one, prompt="a red circle",
                                umt5_file="umt5_small.safetensors", task="i2v").args[0]
        g = torch.Generator().manual_seed(4)
        image = torch.rand(1, 3, 4, 3, generator=g).repeat_interleave(16, 1).repeat_interleave(16, 2)  # [1, 48, 64, 3]
        tokens = comfy.run(nodes.GRNEncodeImage, model=one, image=image, width=0, height=0).args[0]
        size = dict(width=64, height=48, frames=5, steps=3, seed=2, guidance=3.0, guidance_interval=0.0)
        for first in ({"first_frame": image}, {"first_frame_tokens": tokens}):
            comfy.reset()
            alone = _sample(comfy, nodes, one, golden_cond, **size, **first)
            comfy.reset()
            shared = _sample(comfy, nodes, two, golden_cond, **size, **first)
            assert alone[0].task == shared[0].task == "i2v"
            assert torch.equal(shared[0].bits, alone[0].bits) and shared[2] == alone[2]
            assert torch.equal(shared[0].bits[:, :, :1], tokens.bits)
    finally:
        two.pool.close()


def test_class_to_image_on_the_pool_runs_on_the_first_worker(comfy, nodes):
    from tests.test_nodes_execute import TOKENIZER_16

    one = comfy.run(nodes.GRNLoadModel, refiner="my_c2i.safetensors", tokenizer=TOKENIZER_16).args[0]
    two = comfy.run(nodes.GRNLoadModel, refiner="my_c2i.safetensors", tokenizer=TOKENIZER_16, devices="cpu,cpu").args[0]
    try:
        assert two.pool.mode_for("c2i", 2.35) is None
        inputs = dict(steps=3, guidance=2.35, temperature=1.31, class_index=3, seed=1)
        comfy.reset()
        alone = comfy.run(nodes.GRNRefineSampler, model=one, **inputs)
        events = list(comfy.events)
        comfy.reset()
        shared = comfy.run(nodes.GRNRefineSampler, model=two, **inputs)
        assert shared.args[0].task == "c2i" and torch.equal(shared.args[0].bits, alone.args[0].bits)
        assert comfy.events == events and len(events) == 3 and shared.ui == alone.ui
    finally:
        two.pool.close()


# ---- stopping --------------------------------------------------------------------------------------------------------

def test_unload_models_stops_the_workers_and_the_next_run_starts_them(comfy, nodes, single, pooled, cond, caplog):
    caplog.set_level("INFO")
    pool = pooled.pool
    comfy.run(nodes.GRNRefineSampler, model=pooled, conditioning=cond, **REQUEST)
    pids = pool.pids
    comfy.mm.unload_all_models()  # "Unload models" / POST /free {"unload_models": true}
    assert not pool.running and pooled.patchers["pool"] not in comfy.loaded
    assert all(_gone(pid) for pid in pids) and not (set(pids) & _children())
    logs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("GRN: device pool (tiny on cpu, cpu) unloaded by ComfyUI's memory manager") for m in logs)
    assert any(m.startswith("GRN: device pool (tiny on cpu, cpu) stopped: workers pid") for m in logs)
    comfy.reset()
    again = _sample(comfy, nodes, pooled, cond)[0]  # ComfyUI loads the pool again: new workers
    assert pool.running and set(pool.pids).isdisjoint(pids) and pooled.patchers["pool"] in comfy.loaded
    comfy.reset()
    assert torch.equal(again.bits, _sample(comfy, nodes, single, cond)[0].bits)


def test_a_dropped_load_grn_output_stops_its_workers_and_three_workers_sample_on_the_first(comfy, nodes, single,
                                                                                            cond):
    loaded = comfy.run(nodes.GRNLoadModel, refiner="tiny", devices="cpu,cpu,cpu").args[0]
    pool = loaded.pool
    assert pool.mode_for("t2v", 3.0) is None  # 3 does not divide the 4 heads, cfg needs two: the first worker alone
    shared = _sample(comfy, nodes, loaded, cond)
    comfy.reset()
    assert torch.equal(shared[0].bits, _sample(comfy, nodes, single, cond)[0].bits)
    pids = pool.pids
    assert len(pids) == 3 and set(pids) <= _children()
    del loaded, shared  # ComfyUI replaced the output (another config) or dropped its cache
    gc.collect()
    assert not pool.running and all(_gone(pid) for pid in pids) and not (set(pids) & _children())


def test_close_leaves_no_process_and_is_idempotent(cond):
    pool = DevicePool(("cpu", "cpu"), PoolModel())
    pool.start()
    pids = pool.pids
    assert set(pids) <= _children()
    pool.close()
    pool.close()
    assert not pool.running and all(_gone(pid) for pid in pids) and not (set(pids) & _children())


EXITING = """
import sys, time, torch
torch.set_num_threads(1)
from grn_nodes.pool import DevicePool, PoolModel
pool = DevicePool(("cpu", "cpu"), PoolModel())
pool.start()
print(" ".join(map(str, pool.pids)), flush=True)
if sys.argv[1] == "killed":
    time.sleep(600)
"""


@pytest.mark.parametrize("how", ["exits", "killed"])
def test_workers_end_with_the_process_that_started_them(tmp_path, how):
    """The ComfyUI process ending normally closes the pool (atexit); killed outright (no atexit), each worker's
    watchdog sees its parent gone and ends the worker."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as errors:
        owner = subprocess.Popen([sys.executable, "-c", EXITING, how], cwd=root, env=env, stdout=subprocess.PIPE,
                                 stderr=errors, text=True)
        try:
            line = owner.stdout.readline()
            assert line.strip(), (tmp_path / "stderr.txt").read_text()
            pids = [int(p) for p in line.split()]
            assert len(pids) == 2 and not any(_gone(pid) for pid in pids)
            if how == "killed":
                owner.send_signal(signal.SIGKILL)
            assert owner.wait(timeout=60) == (0 if how == "exits" else -signal.SIGKILL)
        finally:
            if owner.poll() is None:
                owner.kill()
            owner.stdout.close()
    for _ in range(120):
        if all(_gone(pid) for pid in pids):
            break
        time.sleep(0.25)
    assert all(_gone(pid) for pid in pids), (how, pids, (tmp_path / "stderr.txt").read_text())


def test_a_worker_that_dies_mid_run_is_a_clear_error_and_the_next_run_restarts(comfy, nodes, single, pooled, cond):
    pool = pooled.pool
    pool.start()
    pids = pool.pids
    comfy.on_send = lambda event, data: os.kill(pids[1], signal.SIGKILL) if data["step"] == 1 else None
    began = time.monotonic()
    with pytest.raises(DevicePoolError, match=r"the worker on cpu \(rank 1, pid \d+\) stopped with exit code -9 "
                                              r"during a run.*the next run starts it again"):
        comfy.run(nodes.GRNRefineSampler, model=pooled, conditioning=cond, **{**REQUEST, "steps": 200})
    assert time.monotonic() - began < 30  # seen at once, not after a collective's timeout
    assert not pool.running and all(_gone(pid) for pid in pids)
    comfy.reset()
    again = _sample(comfy, nodes, pooled, cond)[0]
    assert pool.running and set(pool.pids).isdisjoint(pids)
    comfy.reset()
    assert torch.equal(again.bits, _sample(comfy, nodes, single, cond)[0].bits)


# ---- the devices setting ---------------------------------------------------------------------------------------------

def test_devices_is_the_last_optional_input_of_load_grn_and_empty_means_no_pool(comfy, nodes, single):
    last = nodes.GRNLoadModel.define_schema().inputs[-1]
    assert (last.id, last.io_type, last.optional, last.kwargs["default"]) == ("devices", "STRING", True, "")
    assert single.pool is None and "pool" not in single.patchers


@pytest.mark.parametrize("text, devices", [
    ("", ()), ("  ", ()), (None, ()), ("cpu,cpu", ("cpu", "cpu")), (" CPU , cpu ,cpu", ("cpu", "cpu", "cpu")),
])
def test_devices_parse(text, devices):
    assert parse_devices(text) == devices


@pytest.mark.parametrize("text, words", [
    ("cpu", r"names one device; a pool needs two or more, e\.g\. 'cuda:0,cuda:1'.*Leave devices empty"),
    ("cuda:0", r"names one device"),
    ("cpu,mps", r"'mps' is not a device the pool can use; write 'cpu' or 'cuda:N'"),
    ("cpu,cuda:0", r"mixes the CPU and CUDA devices; a pool uses one kind"),
    ("cuda,cuda", r"'cuda' needs the GPU's index; write each GPU as cuda:N"),
    ("cpu,,cpu", r"has an empty entry; separate the devices with single commas"),
    ("cuda:x,cuda:1", r"'cuda:x' is not a device the pool can use"),
])
def test_bad_devices_are_user_errors_naming_the_fix(text, words):
    with pytest.raises(GRNNodeError, match=r"^Load GRN: devices '" + re.escape(text) + r"'.*" + words):
        parse_devices(text)


def test_cuda_devices_are_checked_against_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_devices("cuda:1, cuda:0") == ("cuda:1", "cuda:0")
    with pytest.raises(GRNNodeError, match=r"^Load GRN: devices 'cuda:0,cuda:2': cuda:2 does not exist; this "
                                           r"machine has 2 CUDA devices \(cuda:0, cuda:1\)"):
        parse_devices("cuda:0,cuda:2")
    with pytest.raises(GRNNodeError, match=r"names cuda:0 more than once; NCCL runs one worker per GPU"):
        parse_devices("cuda:0,cuda:00")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GRNNodeError, match=r"no CUDA device is visible to this ComfyUI.*'cpu,cpu'"):
        parse_devices("cuda:0,cuda:1")


def test_load_grn_refuses_a_bad_value_before_loading_anything(comfy, nodes):
    with pytest.raises(GRNNodeError, match=r"^Load GRN: devices 'cuda:0' names one device"):
        comfy.run(nodes.GRNLoadModel, refiner="tiny", devices="cuda:0")
    assert comfy.loads == []


def test_the_mode_per_request():
    assert parallel_mode(2, "t2v", 3.0) == "cfg" and parallel_mode(2, "t2i", 1.5) == "cfg"
    assert parallel_mode(2, "t2v", 1.0) is None  # heads unknown: rank 0 alone
    assert parallel_mode(2, "c2i", 4.0) is None
    # Sequence parallel where the heads allow it (tiny: 4 heads; GRN2b: 18; GRN8b: 32).
    assert parallel_mode(2, "t2v", 1.0, (4, 4)) == "sp" and parallel_mode(4, "t2v", 3.0, (4, 4)) == "sp"
    assert parallel_mode(3, "t2v", 3.0, (4, 4)) is None and parallel_mode(3, "t2v", 3.0, (18, 18)) == "sp"
    assert parallel_mode(4, "t2v", 3.0, (18, 18)) == "cfg+sp" and parallel_mode(4, "t2v", 1.0, (18, 18)) is None
    assert parallel_mode(8, "t2v", 3.0, (32, 32)) == "sp" and parallel_mode(2, "c2i", 1.0, (4, 4)) is None


def test_a_worker_failing_alone_ends_the_run_without_waiting_for_the_timeout(cond):
    """Rank 0 fails (its preview raises) while rank 1 waits for it in a collective: the error comes back after the
    short grace, not after the pool's timeout (here 120 s; 30 min by default), and the pool is shut down."""
    from grn_core.pipeline import GenerationRequest
    from grn_core.sampler import SamplerSettings
    from grn_nodes.pool import ERROR_GRACE_S
    from tests._failing_preview import FailingPreview

    pool = DevicePool(("cpu", "cpu"), PoolModel(heads=(4, 4)), threads=1, timeout_s=120)
    try:
        request = GenerationRequest(32, 32, 9, seed=5, settings=SamplerSettings(steps=4, guidance=1.0))
        assert pool.mode_for("t2v", 1.0) == "sp"  # both ranks run every step
        pool.start()
        started = time.monotonic()
        with pytest.raises(DevicePoolError, match="preview failed on rank 0 only"):
            pool.generate_tokens(cond.features["t2v"], request, preview=FailingPreview(), callback=lambda info: None)
        assert time.monotonic() - started < ERROR_GRACE_S + 20
        assert not pool.running
    finally:
        pool.close()
