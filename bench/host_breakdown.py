"""Where the host time of one call through the node goes, piece by piece, on a GPU (issue 14).

host_overhead.py times whole calls; this bench runs the same sampling run (queued calls, the
error target's steady state) with a timer around each piece of the override's path (the bench wraps
them; production code has no such switch) and prints each piece's mean time per call, for the
calls the error target did not measure and for those it did. "the rest of the override" is the
whole call less the pieces listed under it (indented pieces are parts of the one above). Each timer
costs its own time (~0.2 us on a fast CPU, more on a slow host): a piece with timers nested inside
reads high by theirs, and the whole call by all of them (19 on a call that is not measured).

    python bench/host_breakdown.py [--tokens 7800] [--preset Balanced]
"""
import argparse
import datetime
import functools
import time

import torch

import host_overhead as ho
from common import card_name, save
from sparge_attention.nodes import adapt, eligibility, override, sparse_call, stats
from sparge_attention.sparge_core import call_graphs, graphed
from sparge_attention.sparge_core.params import SpargeParams

acc: dict = {}


def timed(owner, name: str, label: str):
    """Wrap owner.name so that each call adds its time to acc[label] (a nested piece counts in its own
    label and in the one above it)."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[label] = acc.get(label, 0.0) + time.perf_counter() - t0
    setattr(owner, name, wrapper)


PIECES = [  # (owner, attribute, label, level): True a decision of the override, False a part beside them, None
    # a part of the piece above it (left out of the sum that gives the rest)
    (eligibility, "read_call", "read_call", True),
    (eligibility, "dense_reason", "dense_reason", True),
    (eligibility, "layer_index", "layer_index", True),
    (eligibility, "grid_for", "grid_for", True),
    (adapt.Adaptation, "choose_params", "adapt.choose_params", True),
    (adapt.Adaptation, "measure_in_graph", "adapt.measure_in_graph", True),
    (stats.ForwardContext, "record_sparse", "record_sparse", True),
    (adapt.Adaptation, "after_sparse", "adapt.after_sparse (the measurement, when due)", False),
    (sparse_call, "replay", "sparse_call.replay", False),
    (sparse_call, "replay_measured", "  replay_measured (a measured call's one replay)", None),
    (call_graphs.CallGraphs, "wants", "  CallGraphs.wants", None),
    (graphed, "replay_key", "  replay_key", None),
    (graphed, "_split_layout", "    _split_layout (3 a call)", None),
    (graphed, "grid_permutations", "    grid_permutations", None),
    (SpargeParams, "device_key", "    SpargeParams.device_key", None),
    (graphed, "_addresses", "  _addresses", None),
    (call_graphs.CallGraphs, "replay", "  CallGraphs.replay", None),
    (call_graphs._Side, "write", "    _Side.write (the ring row)", None),
    (torch.cuda.CUDAGraph, "replay", "    CUDAGraph.replay (the launch)", None),
    (call_graphs._Side, "counts_of", "    _Side.counts_of", None),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=7800)
    ap.add_argument("--preset", default="Balanced")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    n = args.tokens
    grid = ho.GRIDS[n]
    x = [torch.randn(ho.B, n, ho.H * ho.D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    per_call = []
    real_call = override.SpargeOverride.__call__

    def call(self, func, *a, **kw):  # the whole call, and each piece's share of it
        acc.clear()
        t0 = time.perf_counter()
        try:
            return real_call(self, func, *a, **kw)
        finally:
            per_call.append((time.perf_counter() - t0, dict(acc)))
    for owner, name, label, _ in PIECES:
        timed(owner, name, label)
    override.SpargeOverride.__call__ = call
    rows, ov = ho.override_times(args.preset, grid, x, steps=args.steps, queued=True)
    per_call = per_call[-len(rows):]
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
           "tokens": n, "preset": args.preset, "graphs": ov.last_graphs, "kinds": {}}
    print(f"{res['card']}, {n} tokens, {args.preset}: mean us per call (queued, steady state; pieces nest)")
    for measured in (False, True):
        calls = [pc for pc, r in zip(per_call, rows) if r[2] == measured and not r[3]]  # no GC in the call
        if not calls:
            continue
        total = sum(t for t, _ in calls) / len(calls) * 1e6
        labels = [p[2] for p in PIECES]
        means = {lb: sum(d.get(lb, 0.0) for _, d in calls) / len(calls) * 1e6 for lb in labels}
        own = total - sum(means[p[2]] for p in PIECES if p[3] is not None)
        kind = "measured" if measured else "unmeasured"
        res["kinds"][kind] = {"calls": len(calls), "total_us": total, "rest_of_override_us": own, "pieces_us": means}
        print(f"  {kind} calls ({len(calls)}): whole call {total:.1f}")
        print(f"    {'the rest of the override':<46} {own:7.1f}")
        for lb in labels:
            print(f"    {lb:<46} {means[lb]:7.1f}")
    # torch.empty of the output alone, queued as the calls are (host_overhead.queued_us), its mean
    res["torch_empty_output_us"] = ho.queued_us(
        lambda: torch.empty((ho.B, n, ho.H * ho.D), dtype=torch.bfloat16, device="cuda"), stat=ho.mean)[0]
    print(f"  torch.empty of the output alone (queued): {res['torch_empty_output_us']:.1f} us")
    print("saved", save(res, f"{res['date']}-{card_name()}-host_breakdown"))


if __name__ == "__main__":
    main()
