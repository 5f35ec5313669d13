"""A real headless Chromium (Debian /usr/bin/chromium, driven by the python `playwright` package)
on a real ComfyUI server's graph editor. Never `playwright install`: the browser is the system one
that scripts/setup.sh installs; if it is missing, tests that need it fail (they do not skip).
"""
from __future__ import annotations

import json
import os
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


class EditorPage:
    """One Chromium with a fresh profile and one page on the server's graph editor."""

    def __init__(self, url: str):
        self.url = url
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
        """Centre the canvas on a node at `scale` and save a PNG of just that node."""
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
        path.parent.mkdir(parents=True, exist_ok=True)
        clip = {"x": max(0, box["x"] - margin), "y": max(0, box["y"] - margin),
                "width": box["w"] + 2 * margin, "height": box["h"] + 2 * margin}
        self.page.screenshot(path=str(path), clip=clip)
        return path


def dump(obj) -> str:
    return json.dumps(obj, indent=1)[:3000]
