"""The Sparge Attention node's error check (an observer of the override, nodes/observers.py).

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

Readout key (None when the check is off):
  error_check: {mode, calls, rel_l1, cosine, worst_layer, worst_rel_l1,
                per_layer: {"<block>": {rel_l1, cosine, calls}}}   (pooled over the run's checked calls)
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .observers import ObservedCall, Observer

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


class ErrorCheck(Observer):
    """The error_check option as an observer: after each sparse call it picks (wants_check), the
    call runs dense as well and its error sums are added to RunStats.error_sums (no host sync)."""

    def __init__(self, mode: str):
        self.mode = mode

    @torch.compiler.disable
    @torch.no_grad()
    def after_sparse(self, call: ObservedCall, out: torch.Tensor) -> None:
        run, ctx = call.run, call.ctx
        if run is None or ctx is None or not wants_check(self.mode, ctx.step, call.layer):
            return
        ref = call.func(*call.args, **call.kwargs)
        if not isinstance(ref, torch.Tensor) or ref.shape != out.shape:
            return
        sums = call_sums(out, ref)
        key = -1 if call.layer is None else int(call.layer)
        acc = run.error_sums
        if key in acc:
            acc[key][0] = acc[key][0] + sums
            acc[key][1] += 1
        else:
            acc[key] = [sums, 1]

    def readout(self, run) -> dict:
        return {"error_check": error_readout(self.mode, run.error_sums)}


def _metrics(v) -> dict:
    diff, ref_abs, dot, oo, rr = (float(x) for x in v)
    rel = diff / ref_abs if ref_abs > 0 else None
    den = math.sqrt(oo * rr)
    cos = dot / den if den > 0 else None
    return {"rel_l1": rel, "cosine": cos}


def error_readout(mode: str, acc: dict) -> dict:
    """The readout's error_check entry from the run's per-block sums (the one device read)."""
    res = {"mode": mode, "calls": 0, "rel_l1": None, "cosine": None, "worst_layer": None, "worst_rel_l1": None,
           "per_layer": {}}
    if not acc:
        return res
    keys = sorted(acc)
    vals = torch.stack([acc[k][0].reshape(5) for k in keys]).cpu()
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
