"""The Sparge Attention node's error check, and the extra readout keys of an override.

Error check (the node's `error_check` option): for some sparse calls the override also runs
ComfyUI's own dense attention on the same inputs (the undecorated `func`, with the call's own
arguments: mask, layout and all) and measures the sparse output against it:

    rel_l1 = sum |sparse - dense| / sum |dense|
    cosine = <sparse, dense> / (|sparse| |dense|)

"sampled": steps 0, 4, 8, ... (ERROR_CHECK_EVERY), and in those a rotating quarter of the
    transformer blocks (block % 4 == (step / 4) % 4), so every block is checked about once per
    16 steps and the check costs about 1/16 of the run's attention time.
"every call": every sparse call (about 2x attention time; for short test runs).
Per call only device ops run (five sums, stacked into one float64 vector per block); the
vectors are copied to the CPU once, when the readout is built at the end of the run.

Readout keys added by `readout_extra` (always present; None when not applicable):
  error_check: {mode, calls, rel_l1, cosine, worst_layer, worst_rel_l1,
                per_layer: {"<block>": {rel_l1, cosine, calls}}}   (pooled over the run's checked calls)
  profile: see nodes/profiles_nodes.py `profile_readout`
  calibration: the Sparge Calibrate node's summary (nodes/calibrate_node.py)
"""
from __future__ import annotations

import math
from typing import Optional

import torch

ERROR_CHECK_EVERY = 4


def wants_check(mode: str, step: Optional[int], layer: Optional[int]) -> bool:
    if mode == "every call":
        return True
    if mode != "sampled":
        return False
    s = 0 if step is None or step < 0 else int(step)
    if s % ERROR_CHECK_EVERY:
        return False
    b = 0 if layer is None else int(layer)
    return b % ERROR_CHECK_EVERY == (s // ERROR_CHECK_EVERY) % ERROR_CHECK_EVERY


_CHUNK_ELEMS = 1 << 24  # fp32 work buffers of the sums: 64 MB each, whatever the call's size


@torch.no_grad()
def call_sums(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """float64 (5,) on the device: sum|o-r|, sum|r|, <o,r>, <o,o>, <r,r>. Computed over row
    chunks, so a large call (e.g. 2 x 75,600 x 5,120 at Wan 14B 720p) never needs fp32 copies
    of the whole output."""
    o2 = out.reshape(-1, out.shape[-1]) if out.dim() > 1 else out.reshape(1, -1)
    r2 = ref.reshape(-1, ref.shape[-1]) if ref.dim() > 1 else ref.reshape(1, -1)
    rows = max(1, _CHUNK_ELEMS // max(1, o2.shape[1]))
    acc = torch.zeros(5, dtype=torch.float64, device=out.device)
    for i in range(0, o2.shape[0], rows):
        o = o2[i:i + rows].float()
        r = r2[i:i + rows].float()
        part = torch.stack([(o - r).abs().sum(), r.abs().sum(), (o * r).sum(), (o * o).sum(), (r * r).sum()])
        acc += part.double()
    return acc


@torch.no_grad()
def check_call(ov, func, args, kwargs, ctx, layer, out) -> None:
    """Run the call dense as well and add its error sums to the run (no host sync)."""
    run = ov.run
    if run is None or not wants_check(ov.config.error_check, getattr(ctx, "step", None), layer):
        return
    ref = func(*args, **kwargs)
    if not isinstance(ref, torch.Tensor) or ref.shape != out.shape:
        return
    sums = call_sums(out, ref)
    acc = run.__dict__.setdefault("error_acc", {})
    key = -1 if layer is None else int(layer)
    if key in acc:
        acc[key][0] = acc[key][0] + sums
        acc[key][1] += 1
    else:
        acc[key] = [sums, 1]


def _metrics(v) -> dict:
    diff, ref_abs, dot, oo, rr = (float(x) for x in v)
    rel = diff / ref_abs if ref_abs > 0 else None
    den = math.sqrt(oo * rr)
    cos = dot / den if den > 0 else None
    return {"rel_l1": rel, "cosine": cos}


def error_readout(ov, run) -> Optional[dict]:
    mode = getattr(ov.config, "error_check", "off")
    if mode == "off":
        return None
    acc = getattr(run, "error_acc", None) or {}
    res = {"mode": mode, "calls": 0, "rel_l1": None, "cosine": None, "worst_layer": None, "worst_rel_l1": None,
           "per_layer": {}}
    if not acc:
        return res
    keys = sorted(acc)
    vals = torch.stack([acc[k][0].reshape(5) for k in keys]).cpu()  # the one device read of the run
    for key, v in zip(keys, vals):
        m = _metrics(v.tolist())
        m["calls"] = acc[key][1]
        res["per_layer"][str(key)] = m
    tot = _metrics(vals.sum(0).tolist())
    res.update(calls=sum(acc[k][1] for k in keys), rel_l1=tot["rel_l1"], cosine=tot["cosine"])
    worst = max(res["per_layer"].items(), key=lambda kv: -1.0 if kv[1]["rel_l1"] is None else kv[1]["rel_l1"])
    res["worst_layer"] = int(worst[0])
    res["worst_rel_l1"] = worst[1]["rel_l1"]
    return res


def readout_extra(ov, run) -> dict:
    from .profiles_nodes import profile_readout

    extra = {"error_check": error_readout(ov, run), "profile": profile_readout(ov, run)}
    cal = getattr(run, "calibration", None)
    if cal is not None:
        extra["calibration"] = cal
    return extra


def format_extra(r: dict) -> str:
    """What the readout's one log line adds for the error check, a profile and a calibration."""
    parts = []
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
