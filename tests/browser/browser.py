"""A real headless Chromium (Debian /usr/bin/chromium, driven by the python `playwright` package)
on a real ComfyUI server's graph editor. Never `playwright install`: the browser is the system one
that scripts/setup.sh installs; if it is missing, tests that need it fail (they do not skip).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1600, "height": 1200}
OUR_FILES = ("/sparge.js", "/sparge_readout.js")  # console messages from these are "ours"

# What the page needs before a test may drive it: the app, the node types, our extension.
READY = """() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph
    && LiteGraph.registered_node_types && LiteGraph.registered_node_types['SpargeAttention']
    && (app.extensions || []).some(e => e.name === 'Sparge.Attention'))"""


def require_chromium() -> str:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        raise RuntimeError(f"{CHROMIUM} is missing: run `bash scripts/setup.sh` (it installs Debian chromium)")
    return CHROMIUM


# Nodes 2.0 (the Vue node renderer) is this user setting; both frontends (1.32.9 and 1.58.1) switch
# it at run time, as their settings dialog and menu toggle do: no reload needed.
NODES2_SETTING = "Comfy.VueNodes.Enabled"


class EditorPage:
    """One Chromium with a fresh profile and one page on the server's graph editor.

    ``nodes2``: True / False switches Nodes 2.0 on / off once the page is ready (the setting is
    saved on the server, so every page says which mode it wants); None leaves it as it is."""

    def __init__(self, url: str, nodes2: bool | None = None):
        self.url = url
        self.nodes2 = nodes2
        self.console: list[dict] = []  # {"type", "text", "url"}
        self.page_errors: list[str] = []
        self._pw = None
        self._ctx = None
        self._profile = None
        self.page = None

    def start(self) -> "EditorPage":
        from playwright.sync_api import sync_playwright

        require_chromium()
        self._profile = tempfile.mkdtemp(prefix="sparge-chromium-")
        self._pw = sync_playwright().start()
        self._ctx = self._pw.chromium.launch_persistent_context(
            self._profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport=VIEWPORT)
        self.page = self._ctx.pages[0] if self._ctx.pages else self._ctx.new_page()
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=90_000)
        self.page.wait_for_function(READY, timeout=90_000, polling=200)
        if self.nodes2 is not None:
            self.js("""async ([key, on]) => {
                await app.extensionManager.setting.set(key, on);
                for (let i = 0; i < 100 && !!LiteGraph.vueNodesMode !== on; i++) await new Promise(r => setTimeout(r, 100));
                if (!!LiteGraph.vueNodesMode !== on) throw new Error(`Nodes 2.0 did not turn ${on ? 'on' : 'off'}`);
            }""", [NODES2_SETTING, self.nodes2])
        return self

    def _on_console(self, msg) -> None:
        loc = msg.location or {}
        self.console.append({"type": msg.type, "text": msg.text, "url": loc.get("url", "")})

    def stop(self) -> None:
        for closer in (lambda: self._ctx and self._ctx.close(), lambda: self._pw and self._pw.stop()):
            try:
                closer()
            except Exception:
                pass
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ helpers
    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg)

    def ours(self, types=("error",)) -> list[dict]:
        """Console messages of the given types that come from this pack's JS: logged from our files,
        with our files in their stack, or with our "[Sparge Attention]" prefix. (The editor's own
        errors, e.g. its blocked look-ups of every node type on api.comfy.org, are not ours.)"""
        def mine(text, url):
            return (any(url.endswith(f) for f in OUR_FILES) or any(f in text for f in OUR_FILES)
                    or text.startswith("[Sparge"))
        out = [m for m in self.console if m["type"] in types and mine(m["text"], m["url"])]
        return out + [{"type": "pageerror", "text": e, "url": ""} for e in self.page_errors if mine(e, "")]

    def errors(self) -> list[dict]:
        """Every console error and uncaught page error so far, ours or not."""
        return ([m for m in self.console if m["type"] == "error"]
                + [{"type": "pageerror", "text": e, "url": ""} for e in self.page_errors])

    def frontend(self) -> dict:
        return self.js("() => ({version: window.__COMFYUI_FRONTEND_VERSION__, nodes2: !!LiteGraph.vueNodesMode})")

    def load_workflow(self, workflow: dict) -> dict:
        """app.loadGraphData without the missing-model dialog; returns what the load reported."""
        return self.js("""async (wf) => {
            const missing = [];
            const before = LiteGraph.registered_node_types;
            await app.loadGraphData(wf, true, true, null, {showMissingModelsDialog: false});
            for (const n of app.graph.nodes) {
                if (!before[n.type]) missing.push(n.type);
            }
            return {missing, nodes: app.graph.nodes.length, links: Object.keys(app.graph.links || {}).length};
        }""", workflow)

    def screenshot_node(self, node_id, path: Path, scale: float = 1.4, margin: int = 24) -> Path:
        """Centre the canvas on a node at `scale` and save a PNG of just that node (in Nodes 2.0 the
        node is an element over the canvas that follows its zoom: its box is taken)."""
        box = self.js("""([id, scale]) => {
            const n = app.graph.getNodeById(id);
            const ds = app.canvas.ds;
            ds.scale = scale;
            const cw = app.canvas.canvas.clientWidth, ch = app.canvas.canvas.clientHeight;
            const title = LiteGraph.NODE_TITLE_HEIGHT;
            ds.offset[0] = cw / (2 * scale) - (n.pos[0] + n.size[0] / 2);
            ds.offset[1] = ch / (2 * scale) - (n.pos[1] + n.size[1] / 2);
            app.canvas.setDirty(true, true);
            app.canvas.draw(true, true);
            const r = app.canvas.canvas.getBoundingClientRect();
            return {x: r.left + (n.pos[0] + ds.offset[0]) * scale,
                    y: r.top + (n.pos[1] - title + ds.offset[1]) * scale,
                    w: n.size[0] * scale, h: (n.size[1] + title) * scale};
        }""", [node_id, scale])
        self.page.wait_for_timeout(300)
        el = self.page.locator(f'[data-node-id="{node_id}"]')
        if self.js("() => !!LiteGraph.vueNodesMode") and el.count():
            b = el.first.bounding_box()
            box = {"x": b["x"], "y": b["y"], "w": b["width"], "h": b["height"]}
        path.parent.mkdir(parents=True, exist_ok=True)
        clip = {"x": max(0, box["x"] - margin), "y": max(0, box["y"] - margin),
                "width": box["w"] + 2 * margin, "height": box["h"] + 2 * margin}
        # no toast (e.g. 1.32.9's "Prefer the legacy design?") over the node
        self.page.screenshot(path=str(path), clip=clip, style=".p-toast { visibility: hidden !important; }")
        return path


def dump(obj) -> str:
    return json.dumps(obj, indent=1)[:3000]


# --------------------------------------------------------------------------- Nodes 2.0 (DOM) helpers
# The widgets of a Vue node are DOM rows: 1.58.1 marks them [data-widget-name]; 1.32.9 has
# .lg-node-widget rows whose first <p> is the name. Values are read from what the row shows.
DOM_WIDGETS = """(nid) => { const el = document.querySelector(`[data-node-id="${nid}"]`);
    if (!el) return null;
    let rows = Array.from(el.querySelectorAll('[data-widget-name]')).map(r => [r.dataset.widgetName, r]);
    if (!rows.length)
        rows = Array.from(el.querySelectorAll('.lg-node-widget')).map(r => [r.querySelector('p')?.innerText?.trim(), r]);
    return Object.fromEntries(rows.map(([name, r]) => [name, {
        text: r.innerText.replace(/\\s+/g, ' ').trim(),
        inputs: Array.from(r.querySelectorAll('input:not([type=checkbox])')).map(i => i.value),
        inputsDisabled: Array.from(r.querySelectorAll('input:not([type=checkbox])')).map(i => i.disabled)}]));
}"""


def dom_widgets(ed: EditorPage, node_id) -> dict:
    """{widget name: {text, inputs: [shown values], inputsDisabled: [bool]}} of a Vue node."""
    return ed.js(DOM_WIDGETS, node_id)


def _row(ed: EditorPage, node_id, name):
    node = ed.page.locator(f'[data-node-id="{node_id}"]')
    row = node.locator(f'[data-widget-name="{name}"]')
    if row.count():
        return row.first
    return node.locator(".lg-node-widget").filter(
        has=ed.page.locator("p", has_text=re.compile(rf"^{re.escape(name)}$"))).first


def dom_pick(ed: EditorPage, node_id, name: str, option: str) -> None:
    """Choose `option` in a Vue node's combo widget with real clicks (open the list, click the item)."""
    row = _row(ed, node_id, name)
    trigger = row.locator("button[role=combobox]")  # 1.58.1 (reka-ui); 1.32.9 is a PrimeVue select
    (trigger if trigger.count() else row.locator(".p-select")).first.click()
    ed.page.locator(f'[role=option][textvalue="{option}"], [role=option][aria-label="{option}"]').first.click()
    ed.page.wait_for_timeout(300)


def dom_step_up(ed: EditorPage, node_id, name: str) -> None:
    """Click the '+' of a Vue node's number widget."""
    _row(ed, node_id, name).locator(
        '[data-testid="increment"], [data-pc-section="incrementbutton"]').first.click()  # 1.58.1, 1.32.9
    ed.page.wait_for_timeout(300)


# --------------------------------------------------------------------------- the readout's pixels
# What the node shows, compared pixel by pixel with the readout drawn by web/sparge_readout.js's own
# drawReadout from the expected readout, and from two wrong ones (none yet; other numbers): a
# readout that is not drawn, stale or drawn with other numbers fails. Classic: the node's rows on
# the main canvas at zoom 1 (the reference gets the node's body colour as background). Nodes 2.0:
# the small canvas that the renderer gives the widget inside the node element (it draws at y=1 with
# the canvas scaled by its width over its CSS width).
READOUT_PIXELS = """async ([nid, expected, runs, wrong]) => {
    const R = await import('/extensions/sparge_attention/sparge_readout.js');
    const n = app.graph.getNodeById(nid);
    const w = n.widgets.find((w) => w.name === 'sparge_readout');
    const differ = (a, b) => { let d = 0;
        for (let i = 0; i < a.length; i += 4)
            if (Math.abs(a[i] - b[i]) + Math.abs(a[i + 1] - b[i + 1]) + Math.abs(a[i + 2] - b[i + 2])
                + Math.abs(a[i + 3] - b[i + 3]) > 32) d++;
        return d; };
    let real, render, where;
    if (LiteGraph.vueNodesMode) {
        const el = document.querySelector(`[data-node-id="${nid}"]`);
        const canvases = el ? el.querySelectorAll('canvas') : [];
        if (canvases.length !== 1) return {error: `one widget canvas expected in the node, found ${canvases.length}`};
        const c = canvases[0];
        if (!c.width || !c.height || !c.clientWidth) return {error: `empty widget canvas ${c.width}x${c.height}`};
        const scale = Math.round(c.width / c.clientWidth);
        real = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        // the canvas holds the whole readout (it is drawn at y=1), not just its top
        where = {mode: 'nodes2', width: c.width, height: c.height, scale,
                 whole: c.height / scale >= 1 + R.readoutHeight(expected, runs)};
        render = (r, k) => { const o = document.createElement('canvas'); o.width = c.width; o.height = c.height;
            const x = o.getContext('2d'); x.scale(scale, scale); R.drawReadout(x, c.width / scale, 1, r, k, false);
            return x.getImageData(0, 0, o.width, o.height).data; };
    } else {
        const ds = app.canvas.ds;
        ds.scale = 1; ds.offset[0] = 60 - n.pos[0]; ds.offset[1] = 60 - n.pos[1];
        app.canvas.deselectAll?.();
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        const width = Math.round(w.width || n.renderingSize?.[0] || n.size[0]);  // as LGraphNode.drawWidgets
        const h = R.readoutHeight(expected, runs);
        const ctx = app.canvas.canvas.getContext('2d');
        const x0 = 60, y0 = Math.round(60 + w.y);
        real = ctx.getImageData(x0, y0, width, h).data;
        const bg = ctx.getImageData(x0 + 4, y0 + (h >> 1), 1, 1).data;  // the node body, left of the panel
        where = {mode: 'classic', width, height: h, y: w.y, background: Array.from(bg),
                 whole: w.y + h <= n.size[1]};
        render = (r, k) => { const o = document.createElement('canvas'); o.width = width; o.height = h;
            const x = o.getContext('2d'); x.fillStyle = `rgba(${bg[0]},${bg[1]},${bg[2]},${bg[3] / 255})`;
            x.fillRect(0, 0, width, h); R.drawReadout(x, width, 0, r, k, false);
            return x.getImageData(0, 0, width, h).data; };
    }
    return {where, pixels: real.length / 4, vsExpected: differ(real, render(expected, runs)),
            vsNone: differ(real, render(null, 0)), vsWrong: differ(real, render(wrong, runs))};
}"""


def readout_pixels(ed: EditorPage, node_id, expected: dict, runs: int, wrong: dict) -> dict:
    """{where: {mode, whole, ...}, pixels, vsExpected, vsNone, vsWrong}: how many pixels of the drawn
    readout differ from each reference; `whole`: the node has room for all of it."""
    return ed.js(READOUT_PIXELS, [node_id, expected, runs, wrong])
