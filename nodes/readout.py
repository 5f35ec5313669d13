"""The end-of-run readout: what the sparse attention did in one sampling run.

`build_readout` turns a RunStats (device counts, read here once per run) into a JSON-ready
dict; `publish` logs one compact line, keeps it for GET /sparge/last_readout and sends it to
the browser as the "sparge.readout" event (PromptServer.instance.send_sync).

Readout keys (all JSON types; None where not applicable):
  node_id, prompt_id, completed, settings{preset, mode, simthreshd1, cdfthreshd, topk, minshare, pvthreshd
  (None = off), scoring, start_percent, end_percent, dense_blocks[...], hilbert, min_tokens, verbose},
  backend ("reference", "triton" or "none"), n_steps, steps_run, forwards,
  per_step[{step, sigma, sparse_calls, dense_calls{reason: n}, kept_blocks, total_blocks,
            sparsity, pv_skipped, attention_flops, attention_flops_computed}],
  per_step_sparsity[...], sparse_calls, dense_calls{reason: n}, dense_calls_total,
  kept_blocks, total_blocks, sparsity, pv_skipped, pv_skipped_fraction,
  attention_flops, attention_flops_computed, flops_saved_fraction, est_attention_speedup,
  hilbert{requested, used_calls, not_used{reason: n}, grid, text_tokens_in_place}, hilbert_used,
  layers_seen, attention_time_ms, sampling_time_s, notes[...],
  layer_step_sparsity[step][block] (sparsity of each transformer block's sparse calls per step, in
  per_step order; None where the block ran no sparse call), map_layer (the block whose block masks
  were captured for the Sparge Sparsity Map node; None when none was),
  error_check{mode, calls, rel_l1, cosine, worst_layer, worst_rel_l1, per_layer{"<block>": {rel_l1, cosine,
  calls}}} (None when off), profile{name, layers, heads, calibrated_layers, layers_used, params{...},
  notes[...]} (None without one), calibration{...} (Sparge Calibrate node only): nodes/error_check.py
Dense-call reasons: "cross attention", "short", "schedule", "dense block", "mask", "dtype",
"head dim", "unsupported call", "kernel error" (nodes/override.py). Steps count within the
sampler's own run (a KSamplerAdvanced that runs steps 10-20 reports steps 0-9, with their sigmas).
"""
from __future__ import annotations

import collections
import logging
import time

import torch

from .config import format_dense_blocks

log = logging.getLogger("sparge_attention")

HISTORY_SIZE = 64
_LAST: dict = {}  # node id -> last readout (for GET /sparge/last_readout; no effect on rendering)
_HISTORY: collections.deque = collections.deque(maxlen=HISTORY_SIZE)
_ROUTES = {"done": False}
EVENT = "sparge.readout"


def _num(x):
    if isinstance(x, torch.Tensor):
        return x.item()
    return x


def _prompt_id():
    try:
        from server import PromptServer

        return getattr(PromptServer.instance, "last_prompt_id", None)
    except Exception:
        return None


def build_readout(ov, run, completed: bool = True) -> dict:
    cfg = ov.config
    events = list(run.events)
    if events:
        torch.cuda.synchronize()
    per_step, sparsities = [], []
    tot_kept, tot_total, tot_skipped, tot_sparse = 0, 0, 0, 0
    fl_total, fl_computed = 0.0, 0.0
    dense_all: dict = {}
    for key in sorted(run.steps):
        st = run.steps[key]
        kept = int(_num(st.kept))
        skipped = int(_num(st.pv_skipped))
        computed = st.flops_dense + float(_num(st.flops_sparse_computed))
        sp = (1.0 - kept / st.total) if st.total else None
        per_step.append({
            "step": None if st.step < 0 else st.step,
            "sigma": st.sigma,
            "sparse_calls": st.sparse_calls,
            "dense_calls": dict(st.dense),
            "kept_blocks": kept,
            "total_blocks": st.total,
            "sparsity": sp,
            "pv_skipped": skipped,
            "attention_flops": st.flops_total,
            "attention_flops_computed": computed,
        })
        sparsities.append(sp)
        tot_kept += kept
        tot_total += st.total
        tot_skipped += skipped
        tot_sparse += st.sparse_calls
        fl_total += st.flops_total
        fl_computed += computed
        for r, n in st.dense.items():
            dense_all[r] = dense_all.get(r, 0) + n

    layer_step = _layer_step(run)
    backends = sorted(run.backends)
    attn_ms = None
    if events:
        attn_ms = float(sum(s.elapsed_time(e) for s, e in events))
    notes = []
    if cfg.dense_blocks and run.max_layer >= 0:
        missing = [b for b in cfg.dense_blocks if b > run.max_layer]
        if missing:
            notes.append(f"dense_blocks {format_dense_blocks(missing)} not in this model "
                         f"(saw blocks 0-{run.max_layer})")
    if cfg.start_percent >= cfg.end_percent:
        notes.append("start_percent >= end_percent: no step is sparse")
    if tot_sparse == 0 and dense_all.get("short"):
        notes.append(f"every self-attention call was shorter than min_tokens={cfg.min_tokens}")
    if cfg.hilbert and run.hilbert_not:
        notes.append("Hilbert order not used on some calls: " +
                     ", ".join(f"{r} ({n})" for r, n in sorted(run.hilbert_not.items())))
    for reason, desc in run.first_seen.items():
        notes.append(f"first '{reason}' call: {desc}")

    readout = {
        "node_id": ov.node_id,
        "prompt_id": _prompt_id(),
        "completed": bool(completed),
        "settings": cfg.describe(),
        "backend": "+".join(backends) if backends else "none",
        "n_steps": run.n_steps,
        "steps_run": len(per_step),
        "forwards": run.forwards,
        "per_step": per_step,
        "per_step_sparsity": sparsities,
        "sparse_calls": tot_sparse,
        "dense_calls": dense_all,
        "dense_calls_total": sum(dense_all.values()),
        "kept_blocks": tot_kept,
        "total_blocks": tot_total,
        "sparsity": (1.0 - tot_kept / tot_total) if tot_total else None,
        "pv_skipped": tot_skipped,
        "pv_skipped_fraction": (tot_skipped / tot_kept) if tot_kept else None,
        "attention_flops": fl_total,
        "attention_flops_computed": fl_computed,
        "flops_saved_fraction": (1.0 - fl_computed / fl_total) if fl_total else None,
        "est_attention_speedup": (fl_total / fl_computed) if fl_computed else None,
        "hilbert": {
            "requested": cfg.hilbert,
            "used_calls": run.hilbert_used,
            "not_used": dict(run.hilbert_not),
            "grid": list(run.grid) if run.grid else None,
            "text_tokens_in_place": run.tail,
        },
        "hilbert_used": run.hilbert_used > 0,
        "layers_seen": run.max_layer + 1,
        "attention_time_ms": attn_ms,
        "sampling_time_s": time.monotonic() - run.t0,
        "notes": notes,
        "layer_step_sparsity": layer_step,
        "map_layer": getattr(run, "map_layer", None),
    }
    extra = getattr(ov, "readout_extra", None)  # error_check, profile, calibration (nodes/error_check.py)
    if extra is not None:
        readout.update(extra(run))
    return readout


def _layer_step(run) -> list:
    """Sparsity per step (rows, sorted like per_step) and transformer block (columns)."""
    n_layers = max(run.max_layer + 1, 0)
    keys = sorted(run.steps)
    parts = [p for key in keys for p in getattr(run.steps[key], "layer_parts", ())]
    if not parts or n_layers == 0:
        return [[None] * n_layers for _ in keys]
    flat = torch.cat([kv.reshape(-1) for _, kv, _ in parts]).cpu().tolist()  # one copy per run
    rows, i = [], 0
    for key in keys:
        kept, total = [0] * n_layers, [0] * n_layers
        for layers, _, totals in getattr(run.steps[key], "layer_parts", ()):
            for layer, t in zip(layers, totals):
                k = flat[i]
                i += 1
                if layer is not None and 0 <= layer < n_layers:
                    kept[layer] += int(k)
                    total[layer] += int(t)
        rows.append([(1.0 - kept[j] / total[j]) if total[j] else None for j in range(n_layers)])
    return rows


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def format_line(r: dict) -> str:
    node = f" [node {r['node_id']}]" if r.get("node_id") is not None else ""
    steps = " ".join("-" if s is None else f"{100 * s:.0f}" for s in r["per_step_sparsity"])
    dense = ", ".join(f"{k} {v}" for k, v in sorted(r["dense_calls"].items())) or "none"
    h = r["hilbert"]
    if not h["requested"]:
        hil = "off"
    elif r["hilbert_used"]:
        hil = "on" + (f" {tuple(h['grid'])}" if h["grid"] else "")
    else:
        hil = "not used (" + ", ".join(h["not_used"]) + ")" if h["not_used"] else "not used"
    speed = "-" if r["est_attention_speedup"] is None else f"{r['est_attention_speedup']:.2f}x"
    t = "" if r["attention_time_ms"] is None else f", sparse attention {r['attention_time_ms']:.1f} ms"
    return (f"Sparge Attention{node}: {r['settings']['preset']}, {r['steps_run']} steps, "
            f"sparsity {_pct(r['sparsity'])} (per step %: {steps}), PV skipped {_pct(r['pv_skipped_fraction'])}, "
            f"sparse calls {r['sparse_calls']}, dense calls: {dense}; est. attention FLOPs saved "
            f"{_pct(r['flops_saved_fraction'])} (~{speed}), backend {r['backend']}, Hilbert {hil}{t}"
            + _extra_line(r) + ("" if r["completed"] else " [run interrupted]"))


def _extra_line(r: dict) -> str:
    from .error_check import format_extra

    return format_extra(r)


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
        from .sparge_node import presets_for_ui

        return web.json_response(presets_for_ui())

    @routes.get("/sparge/readouts")
    async def _all(request):
        pid = request.query.get("prompt_id")
        items = [r for r in _HISTORY if pid is None or r.get("prompt_id") == pid]
        return web.json_response({"readouts": items})

    _ROUTES["done"] = True
    return True
