"""Host time of two builds of the pack in one process, call by call (issue 14): the H200 host's own
cost per operation moved by up to 4x between processes (SDPA 39 vs 174 us in back-to-back runs of
bench/host_overhead.py), so a before/after comparison of host time has to share the process.

Loads this checkout as `sparge_attention` and another tree (e.g. `git archive <rev>` unpacked) as
`sparge_before`, then alternates their calls: the public API and the node's override inside a
sampling run (Balanced, as bench/host_overhead.py drives it), each call timed alone after a sync.
"override unmeasured" are the override's calls from each run's third forward on (past the launched
and captured first calls) that the error target did not measure: the steady state of a render;
"override measured" the ones it measured from then on (every 4th step per block).
A build with CUDA graphs (sparge_core/call_graphs.py) also times the API through one CallGraphs
("api graphed"); its override uses them by itself (a fresh CallGraphs per sampling run: each run's
first two steps launch and capture, the rest replay).

With --moving, the calls cycle through three sets of q, k, v, so that each call's tensors lie
elsewhere than the last one's, as a model's do under cudaMallocAsync (a graphed call then passes
new addresses to its graph every time).

With --queued, the override's calls are timed as bench/host_overhead.py's goal row times them: no
sync between them, each forward's 30 calls queued behind one long sleep kernel (a model whose GPU
is the slower side); "override" is then their mean from the third forward on, the goal's figure,
with each build's runs alternating so that both see the host's same moods (its speed moved up to
2x between host_overhead runs a minute apart, bench/NOTES.md v52).

    python bench/host_ab.py --before ../.carry/before [--tokens 7800] [--rounds 4] [--steps 6] [--moving] [--queued]
"""
import argparse
import datetime
import importlib
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from common import card_name, comfy_sdpa, save
from devkit.pack import load_pack
from devkit.sampling_run import sampling_run
from host_overhead import GRIDS, QUEUE_CYCLES, B, D, H, median, pending_sums


def build(pkg: str):
    """(API call, override step) of one build; each returns its calls' wall times in us."""
    api = importlib.import_module(f"{pkg}.sparge_core")
    presets = importlib.import_module(f"{pkg}.sparge_core.presets")
    config = importlib.import_module(f"{pkg}.nodes.config")
    override = importlib.import_module(f"{pkg}.nodes.override")
    return api, presets, config, override


def timed(fn, sync: bool = True):
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="the other tree's root (its __init__.py)")
    ap.add_argument("--tokens", type=int, default=7800)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="sampling steps per round and build")
    ap.add_argument("--moving", action="store_true", help="each call's q, k, v at other addresses than the last's")
    ap.add_argument("--queued", action="store_true", help="the override's calls queued (no sync between them)")
    args = ap.parse_args()
    n, grid = args.tokens, GRIDS[args.tokens]
    load_pack("sparge_before", Path(args.before).resolve())
    builds = {"after": build("sparge_attention"), "before": build("sparge_before")}
    g = torch.Generator(device="cuda").manual_seed(0)
    sets = [[torch.randn(B, n, H * D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
            for _ in range(3 if args.moving else 1)]
    heads = [[t.view(B, n, H, D).transpose(1, 2) for t in x] for x in sets]
    turn = [0]

    def pick(which):  # the next set of tensors (always the same one without --moving)
        turn[0] += 1
        return which[turn[0] % len(which)]
    times = {k: {"api": [], "override": [], "override unmeasured": [], "override measured": []} for k in builds}
    overrides, graphs = {}, {}
    trace = {k: [] for k in builds}  # (forward, call in it, measured, us) of each steady-state override call
    for name, (api, presets, config, override) in builds.items():
        p = presets.PRESETS["Balanced"].params()
        overrides[name] = (api, p, override.SpargeOverride(config.SpargeConfig.from_widgets(preset="Balanced",
                                                                                            min_tokens=1024),
                                                             node_id=f"ab-{name}"))
        try:
            graphs[name] = importlib.import_module(f"{api.__name__}.call_graphs").CallGraphs()
            times[name]["api graphed"] = []
        except ImportError:
            pass

    summaries = {}

    def run(name, record, steps, blocks=30):
        api, p, ov = overrides[name]
        forwards = [0]

        def forward(x_, t, c_concat, c_crossattn, control, to):
            forwards[0] += 1
            if args.queued:
                torch.cuda.synchronize()
                torch.cuda._sleep(QUEUE_CYCLES)
            for _ in range(blocks):
                x = pick(sets)
                before = pending_sums(ov)
                us = timed(lambda: ov(comfy_sdpa, *x, heads=H, transformer_options=to), sync=not args.queued)
                if record and (forwards[0] > 2 or not args.queued):  # queued: the steady state only
                    times[name]["override"].append(us)
                if record and forwards[0] > 2:  # past launch and capture
                    measured = pending_sums(ov) != before
                    times[name]["override measured" if measured else "override unmeasured"].append(us)
                    trace[name].append((forwards[0], len(trace[name]) % blocks, measured, round(us, 1)))
        sampling_run(ov, forward, SimpleNamespace(patch_size=(1, 2, 2)),
                     torch.zeros(B, 16, grid[0], grid[1] * 2, grid[2] * 2, device="cuda"), steps)
        for _ in range(30):
            qh, kh, vh = pick(heads)
            us = timed(lambda: api.sparge_attention(qh, kh, vh, p))
            if record:
                times[name]["api"].append(us)
        if name in graphs:
            for _ in range(30):
                qh, kh, vh = pick(heads)
                us = timed(lambda: api.sparge_attention(qh, kh, vh, p, graphs=graphs[name]))
                if record:
                    times[name]["api graphed"].append(us)
        if record and getattr(ov, "last_graphs", None):
            summaries.setdefault(name, []).append(ov.last_graphs)

    for name in builds:  # compile and warm both
        run(name, False, steps=4)
    for _ in range(args.rounds):
        for name in builds:
            run(name, True, args.steps)
    res = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "tokens": n,
           "preset": "Balanced", "steps": args.steps, "moving": args.moving, "queued": args.queued,
           "median_us": {}, "mean_us": {}, "calls": trace,
           "override_graphs": summaries}
    print(f"host time per call (median wall us, calls alternating by build in one process), {res['card']}, "
          f"{n} tokens, Balanced, {args.steps}-step runs; the override's calls include its measured ones "
          f"(every 4th step per block) and each run's launched and captured first calls"
          + ("; q, k, v at new addresses every call" if args.moving else "")
          + ("; the override's calls queued, from each run's third forward on" if args.queued else ""))
    for name, t in times.items():
        med = res["median_us"][name] = {k: median(v) for k, v in t.items()}
        mean = res["mean_us"][name] = {k: sum(v) / len(v) for k, v in t.items()}
        print(f"  {name:<7} " + "   ".join(f"{k} {med[k]:8.1f} (mean {mean[k]:7.1f})" for k in t)
              + f"   ({len(t['override'])} / {len(t['api'])} calls)")
    for name, runs in summaries.items():
        print(f"  {name} override graphs per run: {runs[-1]}")
    print("saved", save(res, f"{res['date']}-{card_name()}-host_ab-{n}" + ("-queued" if args.queued else "")))


if __name__ == "__main__":
    main()
