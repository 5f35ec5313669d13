"""The end-of-run readout: what the sparse attention did in one sampling run.

`build_readout` turns a RunStats (device counts, read here once per run) into a JSON-ready
dict, and `format_line` into the one log line; nodes/routes.py publishes them (log, the
"sparge.readout" event, GET /sparge/last_readout).

Readout keys (all JSON types; None where not applicable):
  node_id, prompt_id, completed, settings{preset, mode, simthreshd1, cdfthreshd, topk, minshare, pvthreshd
  (None = off), scoring, start_percent, end_percent, dense_blocks[...], hilbert, min_tokens, verbose},
  backend ("reference", "triton" or "none"), n_steps, steps_run, forwards, forwards_skipped,
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
  target_rel_l1 (the preset's or slider's error target; None = thresholds as set), measured_rel_l1
  (rel-L1 pooled over the run's sampled measurements; None when none), adaptation{target_rel_l1,
  measured_rel_l1, measured_calls, rows_per_call, every_n_steps, per_layer{"<block>": {target, rel_l1[per head],
  calls, threshold[per head minshare in use], adapted}}} (nodes/adapt.py; None without a target),
  error_check{mode, calls, rel_l1, cosine, worst_layer, worst_rel_l1, per_layer{"<block>": {rel_l1, cosine,
  calls}}} (None when off; nodes/error_check.py), profile{name, layers, heads, calibrated_layers,
  layers_used, params{...}, notes[...]} (None without one; nodes/profile_use.py), calibration{...}
  (Sparge Calibrate node only; nodes/calibration.py): keys the override's observers add
Dense-call reasons: "cross attention", "short", "schedule", "dense block", "mask", "dtype",
"head dim", "unsupported call", "kernel error", "profile dense layer", "no triton" (nodes/eligibility.py),
"calibration" (nodes/calibration.py). Steps count within the
sampler's own run (a KSamplerAdvanced that runs steps 10-20 reports steps 0-9, with their sigmas).
steps_run and per_step hold only the steps in which the model ran: a step cache can skip some of
the sampler's n_steps (LazyCache before our wrapper sees the forward; EasyCache inside it, leaving a
forward without attention calls, counted in forwards_skipped and not in forwards).
"""
from __future__ import annotations

import time

import torch

from .config import format_dense_blocks
from .eligibility import R_NO_TRITON, triton_note


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

    dense_all = run.dense_calls()
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
    triton = triton_note(dense_all.get(R_NO_TRITON, 0), "reference" in backends)
    if triton:
        notes.append(triton)
    if run.forwards_skipped:
        notes.append(f"{run.forwards_skipped} model forward(s) ran no attention (a step cache such as EasyCache "
                     "reused an earlier output): not counted as steps")
    for reason, desc in run.first_seen.items():
        notes.append(f"first '{reason}' call: {desc}")
    graphs = getattr(ov, "last_graphs", None)  # the run's CUDA graphs (sparge_core/call_graphs.py)
    if graphs and graphs.get("disabled"):
        notes.append(f"CUDA graphs off ({graphs['disabled']}): the sparse calls launched their kernels one by one")

    readout = {
        "node_id": ov.node_id,
        "prompt_id": _prompt_id(),
        "completed": bool(completed),
        "settings": cfg.describe(),
        "backend": "+".join(backends) if backends else "none",
        "n_steps": run.n_steps,
        "steps_run": len(per_step),
        "forwards": run.forwards,
        "forwards_skipped": run.forwards_skipped,
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
        "cuda_graphs": graphs,
    }
    # present even when no observer fills them
    readout.update(error_check=None, profile=None, target_rel_l1=cfg.target_rel_l1 or None, measured_rel_l1=None,
                   adaptation=None)
    for obs in ov.observers:
        readout.update(obs.readout(run))
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
    skipped = f" ({r['forwards_skipped']} forwards skipped by a step cache)" if r.get("forwards_skipped") else ""
    return (f"Sparge Attention{node}: {r['settings']['preset']}, {r['steps_run']} steps{skipped}, "
            f"sparsity {_pct(r['sparsity'])} (per step %: {steps}), PV skipped {_pct(r['pv_skipped_fraction'])}, "
            f"sparse calls {r['sparse_calls']}, dense calls: {dense}; est. attention FLOPs saved "
            f"{_pct(r['flops_saved_fraction'])} (~{speed}), backend {r['backend']}, Hilbert {hil}{t}"
            + _extra_line(r) + ("" if r["completed"] else " [run interrupted]"))


def _extra_line(r: dict) -> str:
    """What the readout's one log line adds for the error target, the error check, a profile and a
    calibration."""
    parts = []
    if r.get("target_rel_l1") is not None or r.get("measured_rel_l1") is not None:
        a = r.get("adaptation") or {}
        at_max = a.get("blocks_at_sparsest") or 0
        # below the target with every skippable block skipped: the attention allows no more
        note = f"; {at_max} of {a.get('blocks_adapted')} blocks skip all they may" if at_max else ""
        parts.append(f"measured error {_f(r.get('measured_rel_l1'))} (target {_f(r.get('target_rel_l1'))}{note})")
    ec = r.get("error_check")
    if ec:
        if ec["calls"]:
            parts.append(f"error vs dense ({ec['mode']}, {ec['calls']} calls): rel-L1 {_f(ec['rel_l1'])}, "
                         f"cosine {_f(ec['cosine'], 5)}, worst block {ec['worst_layer']} rel-L1 {_f(ec['worst_rel_l1'])}")
        else:
            parts.append(f"error vs dense ({ec['mode']}): no call checked")
    prof = r.get("profile")
    if prof:
        parts.append(f"profile {prof['name']} ({len(prof['layers_used'])}/{prof['layers']} blocks used it"
                     + (", resolution differs" if prof.get("notes") else "") + ")")
    cal = r.get("calibration")
    if cal:
        if cal.get("error"):
            parts.append(f"calibration FAILED: {cal['error']}")
        else:
            parts.append(f"calibration: wrote {cal['file']} ({cal['calls']} calls, {cal['steps_observed']} steps; "
                         f"sampled sparsity {_f(cal['sparsity'])}, rel-L1 {_f(cal['rel_l1_worst_layer'])} worst block, "
                         f"target {cal['target_l1']:g})")
    return "".join("; " + p for p in parts)


def _f(x, digits=4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


