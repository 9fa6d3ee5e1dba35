"""The refinement widget in ComfyUI's real frontend, driven by headless Chromium (selenium + chromedriver).

Runs only when ``COMFYUI_DIR`` points at a ComfyUI checkout (0.3.64 / frontend 1.27.10 tested) and selenium, a
Chromium and its chromedriver are installed (``CHROMIUM`` / ``CHROMEDRIVER`` override where they are; selenium's
own driver download is never used). Starts ComfyUI like ``test_comfyui_integration.py`` (``tests/_comfyui.py``),
opens the page, loads ``workflows/grn_tiny_t2v.json`` with ``app.loadGraphData`` and runs it with the built-in
``tiny`` model and its built-in text encoder, as shipped but for the step count: ``STEPS`` (the sampler's largest)
instead of the shipped 50, because the tiny model refines a 32x32 clip in about 20 ms a step on a CPU and the page
must still be running when it is screenshotted. It queues the workflow with ``app.queuePrompt`` and screenshots the
page three fifths in, while the widget shows "step i / N" with 0 < i < N (under pytest's tmp dir; also copied to
``$GRN_SCREENSHOT`` when set: ``GRN_SCREENSHOT=docs/widget_screenshot.png`` refreshes the README's). After the run:
the step slider scrubs, the frame slider picks latent frames, nothing of the widget is in ``widgets_values`` or the
API prompt, events for other nodes / a missing node / a stale prompt change nothing, and the browser saw no error
from our script.

The widget draws on a canvas; the text it draws in its header ("step 7 / 200   32×32, 9 frames ...") is also its
``aria-label``, which is what this test reads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import time

import pytest

from tests._comfyui import COMFYUI_DIR, comfyui_server
from tests._workflows import load

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
SAMPLER = "GRNRefineSampler"
STEPS = 200  # the sampler's largest: a run long enough to screenshot mid-way
WINDOW = (1280, 1300)
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--window-size={WINDOW[0]},{WINDOW[1]}"]
# First-run template dialog and minimap would cover the graph.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


def _skip_reason() -> str | None:
    if not COMFYUI_DIR:
        return "set COMFYUI_DIR to a ComfyUI checkout to run the browser test (see tests/test_browser_widget.py)"
    if importlib.util.find_spec("selenium") is None:
        return "the browser test needs selenium (pip install selenium) in the test interpreter"
    if not CHROMIUM or not CHROMEDRIVER:
        return "the browser test needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)"
    return None


SKIP_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

# Installed before any page script: keep every uncaught error, rejection and console.error with its stack, so the
# test can tell errors raised by our script from the frontend's own.
ERROR_HOOKS = """
window.__grnErrors = [];
addEventListener('error', e => window.__grnErrors.push(`${e.message} @ ${e.filename}\\n${e.error?.stack ?? ''}`));
addEventListener('unhandledrejection', e => window.__grnErrors.push(`rejection: ${e.reason?.stack ?? e.reason}`));
const consoleError = console.error.bind(console);
console.error = (...args) => { window.__grnErrors.push(`console.error: ${args.map(String).join(' ')}\\n${new Error().stack}`);
                               consoleError(...args); };
"""
VIEW = f"app.graph._nodes.find((n) => n.comfyClass === '{SAMPLER}').__grnRefineView"
STATE = f"""const v = {VIEW};
return {{label: v.canvas.getAttribute('aria-label'), running: v.running, steps: v.history.length, index: v.index,
        promptId: v.promptId, stepSlider: {{disabled: v.stepSlider.disabled, max: Number(v.stepSlider.max)}},
        frameSlider: {{disabled: v.frameSlider.disabled, max: Number(v.frameSlider.max)}}}};"""


def _step(label: str | None) -> tuple[int, int] | None:
    match = re.match(r"step (\d+) / (\d+)", label or "")
    return (int(match[1]), int(match[2])) if match else None


def _wait(driver, script: str, done, timeout: float, what: str, poll: float = 0.15):
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if done(value):
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout} s waiting for {what}; last: {value!r}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with comfyui_server(tmp_path_factory.mktemp("comfyui"), settings=SETTINGS) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # a driver path: no Selenium Manager
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_HOOKS})
    driver.console = []  # browser log entries; get_log() drains, so every read is kept here
    try:
        yield driver
    finally:
        driver.quit()


def _console(driver) -> list[dict]:
    driver.console += driver.get_log("browser")
    return driver.console


@pytest.fixture(scope="module")
def page(server, browser):
    """The frontend with the tiny workflow loaded as shipped (``STEPS`` steps) and the sampler node in view."""
    browser.get(server["base"])
    _wait(browser, "return !!(window.app?.graph && window.app.extensionManager && window.comfyAPI?.api?.api)",
          bool, 120, "the frontend to start")
    assert browser.execute_script("return app.extensions.some((e) => e.name === 'comfyui-grn.refine-widget')"), \
        "our extension was not registered; console: " + json.dumps(_console(browser)[-20:])
    browser.execute_script("return app.loadGraphData(arguments[0])", load("grn_tiny_t2v.json"))
    browser.execute_script("""
        const [sampler, steps] = arguments;
        const node = app.graph._nodes.find((n) => n.comfyClass === sampler);
        node.widgets.find((w) => w.name === 'steps').value = steps;
        // zoom 100 %, the sampler node just below the tab bar, so its widget is readable in the screenshot
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [-node.pos[0] + 40, -node.pos[1] + 110];
        app.canvas.setDirty(true, true);
    """, SAMPLER, STEPS)
    return browser


def _serialized_sampler(driver) -> dict:
    return driver.execute_script(f"return app.graph.serialize().nodes.find((n) => n.type === '{SAMPLER}')")


def test_widget_sits_on_the_sampler_and_is_not_serialized(page):
    widgets = page.execute_script(f"""const node = {VIEW}.node;
        return node.widgets.map((w) => [w.name, w.serialize ?? null, w.options?.serialize ?? null]);""")
    ours = [w for w in widgets if w[0] == "grn_refine_view"]
    assert ours == [["grn_refine_view", False, False]], widgets
    values = _serialized_sampler(page)["widgets_values"]
    shipped = next(n for n in load("grn_tiny_t2v.json")["nodes"] if n["type"] == SAMPLER)["widgets_values"]
    assert len(values) == len(widgets) - 1 == len(shipped)
    state = page.execute_script(STATE)
    assert state["label"].startswith("GRN: the refinement shows here") and state["steps"] == 0
    assert state["stepSlider"]["disabled"]


@pytest.fixture(scope="module")
def run(page, server, tmp_path_factory):
    """Queue the workflow, screenshot mid-run, wait for the end; returns what was seen."""
    before = _serialized_sampler(page)["widgets_values"]
    prompt = page.execute_script("return app.graphToPrompt().then((p) => p.output)")
    page.execute_script("return app.queuePrompt(0, 1)")
    # Three fifths in: for the tiny model at 200 steps, seed 42, all four token states (fill, keep, erase, blank)
    # show from about step 125 to 145. A step takes 10-20 ms and a screenshot several times that, so the server is
    # paused (SIGSTOP) for the screenshot: the run is then really mid-way before, during and after it.
    mid = _wait(page, STATE, lambda s: (_step(s["label"]) or (0, 0))[0] >= 3 * STEPS // 5 or not s["running"] and
                s["steps"], 180, "the widget to reach three fifths of the run", poll=0.03)
    assert mid["running"], f"the run ended before the screenshot could be taken: {mid}"
    shots = tmp_path_factory.mktemp("screenshots")
    screenshot = shots / "widget_mid_run.png"
    os.kill(server["pid"], signal.SIGSTOP)
    try:
        time.sleep(0.2)  # let the events already on the socket land and be drawn
        mid = page.execute_script(STATE)
        page.save_screenshot(str(screenshot))
        after_shot = page.execute_script(STATE)
    finally:
        os.kill(server["pid"], signal.SIGCONT)
    box = page.execute_script(f"const r = {VIEW}.root.getBoundingClientRect(); "
                              "return [r.left, r.top, r.right, r.bottom].map((v) => Math.round(v * devicePixelRatio));")
    from PIL import Image

    with Image.open(screenshot) as image:
        image.crop(tuple(box)).save(shots / "widget_mid_run_crop.png")
    if os.environ.get("GRN_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["GRN_SCREENSHOT"])
    end = _wait(page, STATE, lambda s: _step(s["label"]) == (STEPS, STEPS) and not s["running"], 180,
                "the run to end")
    return {"mid": mid, "after_shot": after_shot, "end": end, "screenshot": screenshot, "before": before,
            "prompt": prompt}


def test_mid_run_screenshot_shows_step_i_of_n(run):
    for state in (run["mid"], run["after_shot"]):  # the screenshot was taken between these two readings
        i, n = _step(state["label"])
        assert 0 < i < n == STEPS and state["running"], state
        assert state["stepSlider"]["disabled"], "scrubbing is for after the run"
    assert run["screenshot"].stat().st_size > 10_000


def test_after_the_run_the_steps_scrub_and_the_frames_select(page, run):
    end = run["end"]
    assert end["steps"] == STEPS and not end["stepSlider"]["disabled"] and end["stepSlider"]["max"] == STEPS - 1
    assert not end["frameSlider"]["disabled"] and end["frameSlider"]["max"] >= 1  # 9 frames: several latent frames
    last = page.execute_script(f"return {VIEW}.canvas.toDataURL()")
    scrubbed = page.execute_script(f"""const v = {VIEW};
        v.stepSlider.value = '5'; v.stepSlider.dispatchEvent(new Event('input'));
        v.frameSlider.value = String(v.frameSlider.max); v.frameSlider.dispatchEvent(new Event('input'));
        return [v.canvas.getAttribute('aria-label'), v.canvas.toDataURL()];""")
    frames = end["frameSlider"]["max"] + 1
    assert scrubbed[0].startswith(f"step 6 / {STEPS}") and f"latent frame {frames} / {frames}" in scrubbed[0]
    assert scrubbed[1] != last, "the canvas did not change when scrubbing"


def test_nothing_of_the_widget_is_saved(page, run):
    after = _serialized_sampler(page)["widgets_values"]
    assert after == run["before"], "running changed the sampler's widgets_values"
    assert all(not isinstance(v, (dict, list)) for v in after), after
    sampler_inputs = next(n["inputs"] for n in run["prompt"].values() if n["class_type"] == SAMPLER)
    assert "grn_refine_view" not in sampler_inputs and sampler_inputs["steps"] == STEPS


def test_events_for_other_nodes_missing_nodes_and_stale_prompts_are_ignored(page, run):
    before = page.execute_script(STATE)
    outcome = page.execute_script(f"""const v = {VIEW};
        const real = v.history[v.history.length - 1].event;
        const other = app.graph._nodes.find((n) => n.comfyClass !== '{SAMPLER}' && n.type !== 'Note');
        const api = window.comfyAPI.api.api;
        const events = [{{...real, node: '9999'}}, {{...real, node: String(other.id)}},
                        {{...real, prompt_id: 'stale-prompt', step: 0}}, {{...real, v: 2, step: 0}}, null];
        for (const detail of events) api.dispatchCustomEvent('grn.refine', detail);
        return events.length;""")
    assert outcome == 5
    assert page.execute_script(STATE) == before


def test_browser_saw_no_error_from_our_script(page, run):
    errors = [e for e in page.execute_script("return window.__grnErrors") if re.search(r"grn", e, re.I)]
    assert not errors, "\n\n".join(errors)
    ours = [e for e in _console(page) if re.search(r"grn_refine_widget|ComfyUI-GRN|grn\.refine", e["message"])]
    assert not ours, ours  # includes the frontend's "Unknown message type grn.refine" if our listener were missing


def test_the_run_used_the_shipped_tiny_workflow(run):
    inputs = {n["class_type"]: n["inputs"] for n in run["prompt"].values()}
    assert inputs["GRNLoadModel"]["refiner"] == "tiny" and inputs["GRNEncodePrompt"]["umt5_file"] == "none"
    shipped = next(n for n in load("grn_tiny_t2v.json")["nodes"] if n["type"] == SAMPLER)["widgets_values"]
    sampler = inputs[SAMPLER]
    size = (sampler["width"], sampler["height"], sampler["frames"])
    assert size == tuple(shipped[i] for i in (0, 1, 4)) == (32, 32, 9)
    assert run["end"]["label"].startswith(f"step {STEPS} / {STEPS}   32×32, 9 frames"), run["end"]["label"]


def test_the_rgb_preview_arrives_and_is_painted(page, run):
    """Every step event carries the preview sheet; the shown step's image loads and lands in the preview panel."""
    seen = page.execute_script(f"""const v = {VIEW};
        const entry = v.history[v.history.length - 1];
        return {{with_preview: v.history.filter((e) => e.event.preview && e.image).length,
                 loaded: Boolean(entry.image && entry.image.complete && entry.image.naturalWidth > 0),
                 tile: entry.event.preview ? entry.event.preview.tile : null}};""")
    assert seen["with_preview"] == STEPS and seen["loaded"] and seen["tile"], seen
    # After scrubbing to the last step, each latent cell of the shown frame sits in the preview panel in the sheet's
    # own colour (a few cells blown up: drawn without smoothing). Compare every cell's centre with the sheet.
    cells = page.execute_script(f"""const v = {VIEW};
        v.stepSlider.value = String(v.stepSlider.max); v.stepSlider.dispatchEvent(new Event('input'));
        v.frameSlider.value = '0'; v.frameSlider.dispatchEvent(new Event('input'));
        const entry = v.history[v.index], p = entry.event.preview, [tw, th] = p.tile;
        const sheet = document.createElement('canvas');
        sheet.width = entry.image.naturalWidth; sheet.height = entry.image.naturalHeight;
        const sctx = sheet.getContext('2d');
        sctx.drawImage(entry.image, 0, 0);
        const c = v.canvas, r = window.devicePixelRatio || 1, ctx = c.getContext('2d');
        const cw = Math.max(100, c.clientWidth), ch = Math.max(100, c.clientHeight);
        const half = (cw - 12) / 2, top = 34, areaH = ch - top - 14 - 40 - 16 - 8;
        const scale = Math.min(half / tw, areaH / th);
        const out = [];
        for (let y = 0; y < th; y++) for (let x = 0; x < tw; x++) {{
          const want = Array.from(sctx.getImageData(x, y, 1, 1).data.slice(0, 3));
          const px = Math.round((8 + half + (x + 0.5) * scale) * r), py = Math.round((top + (y + 0.5) * scale) * r);
          out.push([want, Array.from(ctx.getImageData(px, py, 1, 1).data.slice(0, 3))]);
        }}
        return out;""")
    assert cells and all(max(abs(a - b) for a, b in zip(want, got)) <= 2 for want, got in cells), cells


EDIT_VIEW = (f"app.graph._nodes.find((n) => n.comfyClass === '{SAMPLER}' && "
             "n.inputs.some((i) => i.name === 'source_tokens' && i.link != null)).__grnRefineView")


def test_inpaint_run_paints_the_fixed_cells_in_their_own_colour(page, run):
    """``workflows/grn_tiny_inpaint.json`` as shipped: the mask keeps the left half (2 of 4 latent columns); on the
    inpainting sampler's widget those cells are painted in the event's ``fixed_colour``, the others in a state
    colour, and the legend names "fixed"."""
    page.execute_script("return app.loadGraphData(arguments[0])", load("grn_tiny_inpaint.json"))
    page.execute_script("return app.queuePrompt(0, 1)")
    end = _wait(page, f"const v = {EDIT_VIEW}; return {{label: v.canvas.getAttribute('aria-label'), "
                      "running: v.running, steps: v.history.length};",
                lambda s: (_step(s["label"]) or (0, 1))[0] == (_step(s["label"]) or (0, 1))[1] and not s["running"],
                180, "the inpainting run to end")
    assert end["steps"] > 0, end
    cells = page.execute_script(f"""const v = {EDIT_VIEW};
        const entry = v.history[v.index], ev = entry.event, {{t, h, w}} = ev.map;
        const c = v.canvas, r = window.devicePixelRatio || 1, ctx = c.getContext('2d');
        const cw = Math.max(100, c.clientWidth), ch = Math.max(100, c.clientHeight);
        const half = (cw - 12) / 2, top = 34, areaH = ch - top - 14 - 40 - 16 - 8;
        const scale = Math.min(half / w, areaH / h);
        const out = [];
        for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {{
          const px = Math.round((4 + (x + 0.5) * scale) * r), py = Math.round((top + (y + 0.5) * scale) * r);
          out.push([x, Array.from(ctx.getImageData(px, py, 1, 1).data.slice(0, 3))]);
        }}
        return {{cells: out, fixed: ev.fixed_colour, colours: ev.colours, hasFixed: Boolean(entry.fixed), w}};""")
    fixed = cells["fixed"]
    assert cells["hasFixed"] and fixed and fixed not in cells["colours"], cells
    close = lambda a, b: max(abs(p - q) for p, q in zip(a, b)) <= 2  # noqa: E731
    assert all(close(got, fixed) for x, got in cells["cells"] if x < cells["w"] // 2), cells
    assert not any(close(got, fixed) for x, got in cells["cells"] if x >= cells["w"] // 2), cells
    errors = [e for e in page.execute_script("return window.__grnErrors") if re.search(r"grn", e, re.I)]
    assert not errors, "\n\n".join(errors)
