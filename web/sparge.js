// Sparge Attention: graph-editor behaviour of the "Sparge Attention" node.
//
// * Presets move the sliders: choosing Quality / Balanced / Fast / Turbo sets mode, simthreshd1,
//   cdfthreshd, topk, pvthreshd, minshare, fill_skipped and target_rel_l1 to that preset's values; moving any of them by hand switches
//   the preset to "Custom". The values come from the server (GET /sparge/presets, built from
//   sparge_core/presets.py), never from a copy in this file.
// * The thresholds that do not apply to the current mode are greyed out (cdfthreshd outside cdf
//   mode, topk outside topk mode, minshare outside share mode); their values are kept.
// * After a run, the node shows a compact readout (the "sparge.readout" websocket event of that
//   node: sparsity, skipped P.V, estimated attention speed-up, dense fallbacks and why, attention
//   time when measured, per-step sparsity bars). It stays until the next readout of the node.
// * Loading a workflow made with another version (fewer, more or odd widget values) resets only
//   the values that cannot be right, then re-applies the preset.
// * Works in classic mode and in Nodes 2.0 (the Vue node renderer, setting Comfy.VueNodes.Enabled)
//   of the frontend ComfyUI 0.3.75 pins (1.32.9) and of newer ones (tested: 1.58.1). Nodes 2.0 of
//   1.32.9 cannot show a widget as disabled, so there the unused thresholds are not greyed.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { drawReadout, readoutHeight, readoutLines } from "./sparge_readout.js";

const NODE_TYPE = "SpargeAttention";
const EVENT = "sparge.readout";
const SLIDERS = ["mode", "simthreshd1", "cdfthreshd", "topk", "pvthreshd", "minshare", "fill_skipped", "target_rel_l1"];
const THRESHOLD_OF_MODE = { cdf: "cdfthreshd", topk: "topk", share: "minshare" };
const READOUT_WIDGET = "sparge_readout";
const MIN_WIDTH = 340;

let presetTable = null; // {names, custom, default, presets: {name: {mode, ...}}}
let presetPromise = null;

function loadPresets() {
  if (presetTable) return Promise.resolve(presetTable);
  if (!presetPromise) {
    presetPromise = api
      .fetchApi("/sparge/presets")
      .then((res) => {
        if (!res.ok) throw new Error(`GET /sparge/presets -> ${res.status}`);
        return res.json();
      })
      .then((table) => {
        presetTable = table;
        return table;
      })
      .catch((err) => {
        console.warn("[Sparge Attention] could not load the preset table; presets will not move the sliders", err);
        presetPromise = null;
        return null;
      });
  }
  return presetPromise;
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function customName() {
  return presetTable?.custom ?? "Custom";
}

function state(node) {
  if (!node.__sparge) node.__sparge = { applying: 0, readout: null, runs: 0 };
  return node.__sparge;
}

function redraw(node) {
  node.setDirtyCanvas?.(true, true);
  node.graph?.setDirtyCanvas?.(true, true);
  // Nodes 2.0 draws a canvas widget on a small canvas of its own, and again only when asked:
  // triggerDraw is set by that renderer (absent in classic mode, where the dirty canvas is enough).
  // It sizes that canvas by computedHeight, which only classic's arrange() keeps up to date.
  const w = widget(node, READOUT_WIDGET);
  if (w?.triggerDraw) {
    if (w.computedHeight !== undefined) w.computedHeight = w.computeSize(node.size[0])[1] + 4;
    w.triggerDraw();
  }
}

/** Set a widget's value from code. Nodes 2.0 of frontend 1.32 shows a widget's value as copied
 *  when the node was added and updates that copy only through the widget's callback, so in Nodes
 *  2.0 the callback runs too (st.applying keeps our own callbacks from reacting). Classic mode and
 *  newer frontends read the value itself. */
function setWidgetValue(node, w, value) {
  if (!w || w.value === value) return;
  const st = state(node);
  st.applying++;
  try {
    w.value = value;
    if (globalThis.LiteGraph?.vueNodesMode) w.callback?.(value, app.canvas, node);
  } finally {
    st.applying--;
  }
}

/** Grey out the threshold sliders that the current mode does not use. */
function updateApplicable(node) {
  const mode = widget(node, "mode")?.value;
  for (const [m, name] of Object.entries(THRESHOLD_OF_MODE)) {
    const w = widget(node, name);
    if (w) w.disabled = mode !== m;
  }
  redraw(node);
}

/** Move the sliders to a preset's values (no-op for Custom or an unknown name). */
function applyPreset(node, name) {
  const values = presetTable?.presets?.[name];
  if (!values) return false;
  for (const key of SLIDERS) {
    if (values[key] !== undefined) setWidgetValue(node, widget(node, key), values[key]);
  }
  updateApplicable(node);
  return true;
}

function syncPreset(node) {
  const name = widget(node, "preset")?.value;
  if (name === undefined || name === customName()) {
    updateApplicable(node);
    return;
  }
  if (presetTable) applyPreset(node, name);
  else
    loadPresets().then(() => {
      // read the preset again: it may have changed while the table was loading
      const now = widget(node, "preset")?.value;
      if (now !== customName()) applyPreset(node, now);
    });
}

function switchToCustom(node) {
  const preset = widget(node, "preset");
  setWidgetValue(node, preset, customName());
  updateApplicable(node);
}

function chainCallback(w, after) {
  const orig = w.callback;
  w.callback = function (...args) {
    const r = orig?.apply(this, args);
    after(...args);
    return r;
  };
}

/** Reset widget values that cannot be right (a workflow from another version of the node). */
function sanitize(node, specs) {
  for (const w of node.widgets || []) {
    const spec = specs[w.name];
    if (!spec) continue;
    const [type, opts] = spec;
    const def = opts?.default;
    if (Array.isArray(type) || type === "COMBO") {
      const values = Array.isArray(type) ? type : opts?.options;
      if (Array.isArray(values) && values.length && !values.includes(w.value)) w.value = def ?? values[0];
    } else if (type === "FLOAT" || type === "INT") {
      let v = w.value;
      if (typeof v === "string" && v.trim() !== "" && Number.isFinite(Number(v))) v = Number(v);
      if (typeof v !== "number" || !Number.isFinite(v)) v = def;
      if (typeof v === "number") {
        if (typeof opts?.min === "number") v = Math.max(opts.min, v);
        if (typeof opts?.max === "number") v = Math.min(opts.max, v);
        if (type === "INT") v = Math.round(v);
      }
      if (v !== undefined && v !== w.value) w.value = v;
    } else if (type === "BOOLEAN") {
      if (typeof w.value !== "boolean") w.value = def ?? false;
    } else if (type === "STRING") {
      if (typeof w.value !== "string") w.value = def ?? "";
    }
  }
}

function inputSpecs(nodeData) {
  const specs = {};
  for (const section of ["required", "optional"]) {
    Object.assign(specs, nodeData?.input?.[section] || {});
  }
  return specs;
}

function fitSize(node) {
  const need = node.computeSize();
  const w = Math.max(node.size[0], MIN_WIDTH, need[0]);
  const h = Math.max(need[1], 0);
  if (w !== node.size[0] || h > node.size[1]) node.setSize([w, Math.max(node.size[1], h)]);
}

/** Nodes 2.0 draws the readout on a canvas of its own inside the node. Frontend 1.32 gives that
 *  canvas's box no height (the canvas is absolutely placed), so the readout hung out below the
 *  node: give the box the height the renderer drew at (newer frontends set the same value). */
function reserveHeight(ctx, height) {
  const el = ctx?.canvas;
  if (!el || el === app.canvas?.canvas || !(height > 0)) return;
  const box = el.parentElement;
  if (box && box.closest?.("[data-node-id]") && box.style.minHeight !== `${height}px`) box.style.minHeight = `${height}px`;
}

function addReadoutWidget(node) {
  if (widget(node, READOUT_WIDGET)) return;
  node.addCustomWidget({
    name: READOUT_WIDGET,
    type: READOUT_WIDGET,
    value: "",
    serialize: false, // not in widgets_values (saved workflows keep the node's own values only)
    options: { serialize: false }, // not in the prompt
    draw(ctx, n, widgetWidth, y, H, lowQuality) {
      const st = state(n);
      drawReadout(ctx, widgetWidth ?? n.size[0], y, st.readout, st.runs, lowQuality === true);
      reserveHeight(ctx, H);
    },
    computeSize(width) {
      const st = state(node);
      return [width ?? node.size[0], readoutHeight(st.readout, st.runs)];
    },
  });
}

function setupNode(node, specs) {
  const st = state(node);
  if (st.ready) return;
  st.ready = true;
  for (const key of SLIDERS) {
    const w = widget(node, key);
    if (!w) continue;
    chainCallback(w, () => {
      if (st.applying) return;
      switchToCustom(node);
    });
  }
  const preset = widget(node, "preset");
  if (preset) {
    chainCallback(preset, () => {
      if (preset.value === customName()) updateApplicable(node);
      else if (presetTable) applyPreset(node, preset.value);
      else syncPreset(node);
    });
  }
  addReadoutWidget(node);
  syncPreset(node);
  fitSize(node);
  node.__spargeSpecs = specs;
}

/** The node for an execution id ("12", or "5:12" inside a subgraph). */
function nodeForExecutionId(id) {
  if (id === null || id === undefined) return null;
  const parts = String(id).split(":");
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (let i = 0; i < parts.length; i++) {
    node = graph?.getNodeById?.(parts[i]) ?? graph?.getNodeById?.(Number(parts[i])) ?? null;
    if (!node) return null;
    if (i < parts.length - 1) graph = node.subgraph;
  }
  return node;
}

function onReadout(event) {
  const r = event?.detail;
  if (!r || r.node_id === undefined || r.node_id === null) return;
  const node = nodeForExecutionId(r.node_id);
  if (!node || (node.comfyClass ?? node.type) !== NODE_TYPE) return;
  const st = state(node);
  st.runs = st.readout && r.prompt_id && st.readout.prompt_id === r.prompt_id ? st.runs + 1 : 1;
  st.readout = r;
  addReadoutWidget(node);
  fitSize(node);
  redraw(node);
}

app.registerExtension({
  name: "Sparge.Attention",

  async setup() {
    api.addEventListener(EVENT, onReadout);
    loadPresets();
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    loadPresets();
    const specs = inputSpecs(nodeData);

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      try {
        setupNode(this, specs);
      } catch (err) {
        console.warn("[Sparge Attention] node set-up failed", err);
      }
      return r;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const r = onConfigure?.apply(this, arguments);
      try {
        setupNode(this, specs);
        sanitize(this, specs);
        const st = state(this);
        st.readout = null; // a loaded or pasted node has not run yet
        st.runs = 0;
        syncPreset(this);
        fitSize(this);
      } catch (err) {
        console.warn("[Sparge Attention] could not restore the node's settings", err);
      }
      return r;
    };

    /** For tests and other extensions: the readout lines as shown, and the readout itself. */
    nodeType.prototype.getSpargeReadout = function () {
      const st = state(this);
      return { readout: st.readout, runs: st.runs, lines: readoutLines(st.readout, st.runs).map((l) => l.text) };
    };
  },
});
