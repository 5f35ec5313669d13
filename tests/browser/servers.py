"""What the browser tests share: the Sparge node's slider names, and what their servers hold: the harness's tiny models, and empty stand-in files with
the names of the text encoders, VAEs and images that the example workflows use (enough for POST
/prompt's validation, which only checks that the names exist; see test_graph_editor.py)."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from devkit.comfy_harness import ComfyServer

REPO = Path(__file__).resolve().parents[2]

TINY = REPO / "devkit" / "workflows" / "tiny_wan_demo.json"  # the demo's graph (test-only nodes: not a template)
WORKFLOWS = sorted((REPO / "workflows").glob("*.json")) + [TINY]
SETTINGS = {"Comfy.Workflow.ShowMissingModelsWarning": False, "Comfy.Validation.Workflows": True}
ARTIFACTS = REPO / "test-artifacts"  # screenshots of the node after a run
# the Sparge node's widgets that presets set
SLIDERS = ["mode", "simthreshd1", "cdfthreshd", "topk", "pvthreshd", "minshare", "fill_skipped", "target_rel_l1"]
# the slider each mode reads (sparge_core.params.THRESHOLD_FIELD; test_graph_editor.py checks they agree)
THRESHOLD_FIELD = {"cdf": "cdfthreshd", "topk": "topk", "share": "minshare"}


def _png(path: Path, w: int = 16, h: int = 16) -> None:
    """A small valid RGB PNG (the I2V workflow's start image), written without pillow."""
    raw = b"".join(b"\x00" + bytes(c for x in range(w) for c in (x * 16 % 256, y * 16 % 256, 128)) for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def serve(extra_args=()) -> ComfyServer:
    """A prepared (not yet started) server; `with` it to run it."""
    srv = ComfyServer(install_tiny_models=True, extra_args=extra_args, settings=SETTINGS)
    srv.prepare()
    for wf_path in WORKFLOWS:
        for node in json.loads(wf_path.read_text())["nodes"]:
            for model in (node.get("properties") or {}).get("models", []):
                if model["directory"] != "diffusion_models":
                    d = srv.models_dir / model["directory"]
                    d.mkdir(parents=True, exist_ok=True)
                    (d / model["name"]).touch()
    (srv.base_dir / "input").mkdir(parents=True, exist_ok=True)
    _png(srv.base_dir / "input" / "example.png")
    return srv
