// ComfyUI-GRN: live view of the refinement on the "Refine Sampler" node (GRNRefineSampler).
//
// The server sends one "grn.refine" event per sampler step (grn_nodes/widget_events.py documents the payload):
// the token-state map (fill / keep / erase / blank, 2 bits per token), an RGB preview sheet, entropy, kept fraction
// and "step i / N"; in an edit (inpainting, extending a clip) also the map of "fixed" cells clamped to the source
// (1 bit per cell) and their colour, painted over their state (the sampler reports them as "keep"). This widget draws the current step, offers a frame selector for videos and, once the run is
// over, a step slider to scrub back through it. Nothing here is saved into the workflow (serialize: false).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_CLASS = "GRNRefineSampler";
const EVENT = "grn.refine";
// The paper's colours of the four token states (code order 0..3) come with every event ("colours"), from the one
// place that holds them: grn_core/sampler/states.py.
const STATE_NAMES = ["fill", "keep", "erase", "blank"];
const WIDGET_HEIGHT = 300;
const MAX_HISTORY = 400; // steps kept for scrubbing (each one is at most 64 KB)

const IDLE_TEXT = "GRN: the refinement shows here while the sampler runs";
let currentPromptId = null; // the prompt the server is running now; events of other prompts are stale

function decodeFixed(map) {
  // one bit per latent cell, eight to a byte, first cell in the lowest bit (widget_events.pack_bit_map)
  const bytes = Uint8Array.from(atob(map.data), (c) => c.charCodeAt(0));
  const n = map.t * map.h * map.w;
  const bits = new Uint8Array(n);
  for (let i = 0; i < n; i++) bits[i] = (bytes[i >> 3] >> (i & 7)) & 1;
  return bits;
}

function decodeStates(map) {
  const bytes = Uint8Array.from(atob(map.data), (c) => c.charCodeAt(0));
  const n = map.t * map.h * map.w;
  const codes = new Uint8Array(n);
  for (let i = 0; i < n; i++) codes[i] = (bytes[i >> 2] >> ((i & 3) * 2)) & 3;
  return codes;
}

class RefineView {
  constructor(node) {
    this.node = node;
    this.history = []; // [{event, codes, image}]
    this.promptId = null;
    this.index = -1; // shown step (index into history)
    this.frame = 0;
    this.running = false;

    this.root = document.createElement("div");
    this.root.style.cssText =
      "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;padding:0 4px;box-sizing:border-box;" +
      "font:11px sans-serif;color:#ddd";
    this.canvas = document.createElement("canvas");
    this.canvas.style.cssText = "width:100%;flex:1 1 auto;min-height:120px;background:#1c1e22;border-radius:4px";
    this.canvas.setAttribute("role", "img"); // the header text doubles as its label (screen readers, tests)
    this.canvas.setAttribute("aria-label", IDLE_TEXT);
    this.root.appendChild(this.canvas);

    const controls = document.createElement("div");
    controls.style.cssText = "display:flex;gap:6px;align-items:center";
    this.stepSlider = this._slider("step", controls, (v) => { this.index = v; this.draw(); });
    this.frameSlider = this._slider("latent frame", controls, (v) => { this.frame = v; this.draw(); });
    this.root.appendChild(controls);
    this._syncControls();
  }

  _slider(label, parent, onInput) {
    const wrap = document.createElement("label");
    wrap.style.cssText = "display:flex;gap:4px;align-items:center;flex:1;white-space:nowrap";
    wrap.textContent = label;
    const input = document.createElement("input");
    input.type = "range";
    input.min = "0";
    input.max = "0";
    input.value = "0";
    input.style.flex = "1";
    input.addEventListener("input", () => onInput(Number(input.value)));
    // keep the graph canvas from panning while the slider is dragged
    input.addEventListener("pointerdown", (e) => e.stopPropagation());
    wrap.appendChild(input);
    parent.appendChild(wrap);
    return input;
  }

  reset(promptId) {
    this.history = [];
    this.promptId = promptId;
    this.fixed = null; // the run's fixed-cell map (events of an edit carry it first, then while it is small)
    this.index = -1;
    this.frame = 0;
  }

  push(event) {
    if (event.prompt_id && event.prompt_id !== this.promptId) this.reset(event.prompt_id);
    const following = this.index === this.history.length - 1;
    const f = event.fixed, known = this.fixed && this.fixed.map;
    const same = f && known && f.data === known.data && f.t === known.t && f.h === known.h && f.w === known.w;
    if (f && f.data && !same) { // small maps come with every event: decode a new one only
      const bits = decodeFixed(event.fixed);
      let count = 0;
      for (const b of bits) count += b;
      this.fixed = { map: event.fixed, bits, count }; // counted once here, not on every draw
    }
    const entry = { event, codes: event.map ? decodeStates(event.map) : null, image: null, fixed: this.fixed };
    if (event.preview && event.preview.data) {
      const img = new Image();
      img.onload = () => this.draw();
      img.src = `data:${event.preview.mime || "image/jpeg"};base64,${event.preview.data}`;
      entry.image = img;
    }
    this.history.push(entry);
    if (this.history.length > MAX_HISTORY) this.history.shift();
    if (following || this.index < 0) this.index = this.history.length - 1;
    this.running = event.step + 1 < event.total;
    this._syncControls();
    this.draw();
  }

  _syncControls() {
    const n = this.history.length;
    this.stepSlider.max = String(Math.max(0, n - 1));
    this.stepSlider.value = String(Math.max(0, this.index));
    this.stepSlider.disabled = this.running || n < 2; // scrubbing once the run is over
    const shown = this.history[this.index];
    const frames = shown && shown.event.map ? shown.event.map.t : 1;
    this.frameSlider.max = String(Math.max(0, frames - 1));
    if (this.frame > frames - 1) this.frame = 0;
    this.frameSlider.value = String(this.frame);
    this.frameSlider.disabled = frames < 2;
    this.frameSlider.parentElement.style.display = frames < 2 ? "none" : "flex";
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const cw = Math.max(100, canvas.clientWidth), ch = Math.max(100, canvas.clientHeight);
    if (canvas.width !== Math.round(cw * ratio) || canvas.height !== Math.round(ch * ratio)) {
      canvas.width = Math.round(cw * ratio);
      canvas.height = Math.round(ch * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, cw, ch);
    ctx.fillStyle = "#1c1e22";
    ctx.fillRect(0, 0, cw, ch);
    ctx.font = "11px sans-serif"; // a canvas ignores the page's CSS font
    const entry = this.history[this.index];
    if (!entry) {
      ctx.fillStyle = "#999";
      ctx.fillText(IDLE_TEXT, 8, 18);
      this.canvas.setAttribute("aria-label", IDLE_TEXT);
      return;
    }
    this._syncControls();
    const ev = entry.event;
    const rgb = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;
    const [fillColour, keepColour] = ev.colours.map(rgb); // kept fraction in "keep" blue, step marker in "fill" pink
    const top = 34, spark = 40, stats = 14, legend = 16;
    const areaH = ch - top - stats - spark - legend - 8;
    const half = (cw - 12) / 2;

    // header: step i / N, size, decision
    ctx.fillStyle = "#eee";
    ctx.font = "bold 12px sans-serif";
    let header = `step ${ev.step + 1} / ${ev.total}`;
    if (ev.decided) header += `  (adaptive: ${ev.planned} \u2192 ${ev.decided})`;
    if (ev.size) header += `   ${ev.size[0]}\u00d7${ev.size[1]}` + (ev.size[2] > 1 ? `, ${ev.size[2]} frames` : "");
    if (ev.map && ev.map.t > 1) header += `   latent frame ${this.frame + 1} / ${ev.map.t}`;
    ctx.fillText(header, 6, 14);
    ctx.font = "11px sans-serif";
    this.canvas.setAttribute("aria-label", header);
    ctx.fillStyle = "#999"; // panel captions, so the two squares need no guessing
    ctx.fillText("token states", 4, top - 5);
    ctx.fillText("preview", 8 + half, top - 5);

    // token-state map of the selected latent frame
    if (entry.codes) {
      const { t, h, w } = ev.map;
      const f = Math.min(this.frame, t - 1);
      const scale = Math.min(half / w, areaH / h);
      const img = ctx.createImageData(w, h);
      const offset = f * h * w;
      const fx = entry.fixed, fixedColour = ev.fixed_colour || [150, 110, 210];
      const fixedOn = fx && fx.map.t === t && fx.map.h === h && fx.map.w === w ? fx.bits : null;
      for (let i = 0; i < h * w; i++) {
        const c = fixedOn && fixedOn[offset + i] ? fixedColour : ev.colours[entry.codes[offset + i]];
        img.data[i * 4] = c[0];
        img.data[i * 4 + 1] = c[1];
        img.data[i * 4 + 2] = c[2];
        img.data[i * 4 + 3] = 255;
      }
      const tmp = document.createElement("canvas");
      tmp.width = w;
      tmp.height = h;
      tmp.getContext("2d").putImageData(img, 0, 0);
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(tmp, 4, top, w * scale, h * scale);
    }

    // RGB preview: the selected frame's tile of the sheet
    if (entry.image && entry.image.complete && ev.preview) {
      const [tw, th] = ev.preview.tile;
      const f = Math.min(this.frame, ev.preview.t - 1);
      const col = f % ev.preview.cols, row = Math.floor(f / ev.preview.cols);
      const scale = Math.min(half / tw, areaH / th);
      // a few latent cells blown up: crisp cells like the token map beside it; a real-size preview: smooth
      ctx.imageSmoothingEnabled = scale < 4;
      ctx.drawImage(entry.image, col * tw, row * th, tw, th, 8 + half, top, tw * scale, th * scale);
      // a frame, so a dark preview (black backgrounds are common) still reads as an image on the dark node
      ctx.strokeStyle = "#555";
      ctx.strokeRect(8 + half - 0.5, top - 0.5, tw * scale + 1, th * scale + 1);
    }

    // entropy sparkline (white) and kept fraction (blue) over the steps so far, marker at the shown step;
    // their values sit on a line above the box, coloured like the lines, so the plot stays clear
    const ys = top + areaH + 4 + 10;
    let sx = 6;
    for (const [text, colour] of [[`entropy ${ev.entropy.toFixed(3)}`, "#fff"], [`kept ${(100 * ev.kept).toFixed(1)}% of bits`, keepColour]]) {
      ctx.fillStyle = colour;
      ctx.fillText(text, sx, ys);
      sx += ctx.measureText(text).width + 12;
    }
    const y0 = ys + 4;
    ctx.strokeStyle = "#444";
    ctx.strokeRect(4, y0, cw - 8, spark);
    const steps = this.history.map((e) => e.event);
    const total = Math.max(ev.total, steps.length);
    const plot = (key, colour) => {
      ctx.strokeStyle = colour;
      ctx.beginPath();
      steps.forEach((s, i) => {
        const x = 4 + ((i + 0.5) / total) * (cw - 8);
        const y = y0 + spark - Math.max(0, Math.min(1, s[key])) * (spark - 2) - 1;
        if (i === 0) ctx.moveTo(x, y);
        else ctx.lineTo(x, y);
      });
      ctx.stroke();
    };
    plot("kept", keepColour);
    plot("entropy", "#fff");
    const mx = 4 + ((this.index + 0.5) / total) * (cw - 8);
    ctx.strokeStyle = fillColour;
    ctx.beginPath();
    ctx.moveTo(mx, y0);
    ctx.lineTo(mx, y0 + spark);
    ctx.stroke();

    // legend with token counts (a token shows the state most of its bits are in, hence few "keep" tokens while
    // under half of the bits are kept)
    const ly = y0 + spark + 12;
    ctx.fillStyle = "#999";
    ctx.fillText("tokens:", 6, ly);
    let x = 12 + ctx.measureText("tokens:").width;
    STATE_NAMES.forEach((name, i) => {
      const c = ev.colours[i];
      ctx.fillStyle = rgb(c);
      ctx.fillRect(x, ly - 8, 9, 9);
      ctx.fillStyle = "#ccc";
      const label = `${name} ${ev.counts ? ev.counts[name] : ""}`;
      ctx.fillText(label, x + 12, ly);
      x += 18 + ctx.measureText(label).width;
    });
    // an edit: cells clamped to the source (mask black, an extended clip's first frame), in their own colour
    if (entry.fixed) {
      ctx.fillStyle = rgb(ev.fixed_colour || [150, 110, 210]);
      ctx.fillRect(x, ly - 8, 9, 9);
      ctx.fillStyle = "#ccc";
      ctx.fillText(`fixed ${entry.fixed.count} cells`, x + 12, ly);
    }
  }
}

function viewFor(detail) {
  if (!detail || detail.v !== 1 || detail.node === undefined || detail.node === null) return null;
  if (currentPromptId && detail.prompt_id && detail.prompt_id !== currentPromptId) return null; // stale prompt
  const graph = app.graph;
  if (!graph) return null;
  const node = graph.getNodeById(detail.node) ?? graph.getNodeById(Number(detail.node));
  if (!node || String(node.id) !== String(detail.node) || node.comfyClass !== NODE_CLASS) return null;
  return node.__grnRefineView ?? null;
}

app.registerExtension({
  name: "comfyui-grn.refine-widget",

  setup() {
    api.addEventListener("execution_start", (e) => {
      currentPromptId = e.detail?.prompt_id ?? null;
    });
    api.addEventListener(EVENT, (e) => {
      const view = viewFor(e.detail);
      if (view) view.push(e.detail);
    });
    const finish = () => {
      for (const node of app.graph?._nodes ?? []) {
        const view = node.__grnRefineView;
        if (view && view.running) {
          view.running = false;
          view.draw();
        }
      }
    };
    api.addEventListener("execution_error", finish);
    api.addEventListener("execution_interrupted", finish);
    api.addEventListener("execution_success", finish);
  },

  nodeCreated(node) {
    if (node.comfyClass !== NODE_CLASS) return;
    const view = new RefineView(node);
    const widget = node.addDOMWidget("grn_refine_view", "grn_refine_view", view.root, {
      serialize: false,
      getMinHeight: () => WIDGET_HEIGHT,
      getHeight: () => WIDGET_HEIGHT,
    });
    widget.serialize = false; // never part of widgets_values
    node.__grnRefineView = view;
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], 420), Math.max(node.size[1], size[1])]);
    const onResize = node.onResize;
    node.onResize = function (...args) {
      const r = onResize?.apply(this, args);
      view.draw();
      return r;
    };
    requestAnimationFrame(() => view.draw());
  },
});
