"""Where a run's readout goes: the log (one line, plus notes and, verbose, per-step lines), the
browser ("sparge.readout" event, PromptServer.instance.send_sync), and the HTTP routes
GET /sparge/last_readout[?node_id=ID], GET /sparge/readouts[?prompt_id=ID] and GET /sparge/presets.
The only module-level state of the pack: the last readouts, for those routes (no effect on rendering).
"""
from __future__ import annotations

import collections
import logging

from .config import presets_for_ui
from .readout import format_line

log = logging.getLogger("sparge_attention")

HISTORY_SIZE = 64
_LAST: dict = {}  # node id -> last readout
_HISTORY: collections.deque = collections.deque(maxlen=HISTORY_SIZE)
_ROUTES = {"done": False}
EVENT = "sparge.readout"


def publish(readout: dict) -> None:
    log.info(format_line(readout))
    tag = f" [node {readout['node_id']}]" if readout.get("node_id") is not None else ""
    for note in readout["notes"]:
        log.info("Sparge Attention%s: %s", tag, note)
    if readout["settings"].get("verbose"):
        for s in readout["per_step"]:
            log.info("Sparge Attention step %s (sigma %.4g): sparse %d, kept %d/%d, dense %s",
                     s["step"], s["sigma"] if s["sigma"] is not None else float("nan"), s["sparse_calls"],
                     s["kept_blocks"], s["total_blocks"], s["dense_calls"])
    key = readout.get("node_id") or "?"
    _LAST[key] = readout
    _HISTORY.append(readout)
    try:
        from server import PromptServer

        inst = getattr(PromptServer, "instance", None)
        if inst is not None:
            inst.send_sync(EVENT, readout)
    except Exception:  # not inside ComfyUI, or no client: logging is enough
        pass


def last_readouts() -> dict:
    return dict(_LAST)


def history() -> list:
    return list(_HISTORY)


def register_routes() -> bool:
    """GET /sparge/last_readout[?node_id=ID], GET /sparge/readouts (newest last) and GET /sparge/presets
    (the preset table for the browser extension, web/sparge.js)."""
    if _ROUTES["done"]:
        return True
    try:
        from aiohttp import web
        from server import PromptServer

        routes = PromptServer.instance.routes
    except Exception:
        return False

    @routes.get("/sparge/last_readout")
    async def _last(request):
        node = request.query.get("node_id")
        if node is not None:
            if node not in _LAST:
                return web.json_response({"error": f"no readout for node {node}"}, status=404)
            return web.json_response(_LAST[node])
        return web.json_response(dict(_LAST))

    @routes.get("/sparge/presets")
    async def _presets(request):
        return web.json_response(presets_for_ui())

    @routes.get("/sparge/readouts")
    async def _all(request):
        pid = request.query.get("prompt_id")
        items = [r for r in _HISTORY if pid is None or r.get("prompt_id") == pid]
        return web.json_response({"readouts": items})

    _ROUTES["done"] = True
    return True
