"""Host (Python) time per sparse attention call, and where it goes (issue 14).

Host time is what the CPU spends queueing one call. A model hides it while the GPU is busier than
the CPU (long sequences); at short sequences the GPU waits on Python. Each call is timed alone
after a synchronize, so the figure is the CPU's own time at any sequence length (a loop without
syncs would measure the GPU once the GPU is the slower side).

Rows marked "GPU busy" are timed while a sleep kernel keeps the GPU busy, as a model's other layers
do (on an idle GPU a launch takes the host longer); the others on an idle GPU. The "queued" row
times the override's calls with no sync between them, a forward's 30 calls queued behind one long
sleep kernel: the host's cost per call in a model whose GPU is the slower side, without the cost
that a synchronize before every call adds to the next one (under cudaMallocAsync: memory given back
at the sync and mapped again). That row is taken from --rounds such sampling runs: the run whose
mean is the median of theirs, each run's mean and SDPA's queued mean timed after it kept beside it
(the host's own speed moves between runs).

Each row: the median wall time and the median CPU time of the calling thread (the CPU time leaves
out what other processes take from this one; on the H200's host the two agree, and one build's
figures still move by up to 4x from one process to the next: compare builds with bench/host_ab.py,
which runs them in one process). Rows: the node's override as ComfyUI calls it ((B, N, H*D)
self-attention inside a forward, the preset's error-target adaptation in its steady state, i.e. an
unmeasured call), the public API `sparge_attention` with and without a CallGraphs (CUDA graphs of
the call, sparge_core/call_graphs.py), and cProfile listings of the override's unmeasured and
measured calls (top functions by own time). The override's calls are also split into those the error target
measured (an exact-attention sample of the call, nodes/adapt.py) and the rest.

    python bench/host_overhead.py [--tokens 7800,32760] [--preset Balanced] [--rounds 3] [--profile [--sort cumulative]] [--trace]
"""
import argparse
import contextlib
import cProfile
import datetime
import gc
import io
import os
import pstats
import time
from types import SimpleNamespace

import torch

from common import card_name, comfy_sdpa, save
from devkit.sampling_run import sampling_run
from sparge_attention.nodes.config import SpargeConfig
from sparge_attention.nodes.override import SpargeOverride
from sparge_attention.sparge_core import sparge_attention
from sparge_attention.sparge_core.call_graphs import CallGraphs
from sparge_attention.sparge_core.presets import PRESETS

GRIDS = {7800: (5, 30, 52), 32760: (21, 30, 52)}  # Wan 480p latents, 17 and 81 frames
H, D, B = 12, 128, 2  # Wan 1.3B


BUSY_CYCLES = 4_000_000  # ~2 ms of GPU clocks: longer than any call's host time here
QUEUE_CYCLES = 100_000_000  # ~57 ms of GPU clocks: longer than a forward's 30 queued calls take the host


def settle(busy: bool) -> None:
    """Before a timed call: an empty GPU queue, and with `busy` a GPU kept busy (a sleep kernel) while
    the call is issued, as inside a model whose other layers keep it busy. On an idle GPU launches
    and copies take the host longer, and the host's own time is what the goal counts."""
    torch.cuda.synchronize()
    if busy:
        torch.cuda._sleep(BUSY_CYCLES)


def host_us(fn, n=100, warmup=5, busy=False):
    """Median time of one call, each started on an empty GPU queue (idle, or busy: `settle`):
    (wall, this thread's CPU time)."""
    for _ in range(warmup):
        fn()
    ts, cs = [], []
    for _ in range(n):
        settle(busy)
        _time_call(fn, ts, cs)
    torch.cuda.synchronize()
    return median(ts) * 1e6, median(cs) * 1e6


def queued_us(fn, rounds=4, calls=30, stat=None):
    """Median (or `stat`) time of one call queued behind the others with no sync (each round of
    `calls` starts behind one long sleep kernel): (wall, this thread's CPU time)."""
    fn()
    ts, cs = [], []
    for _ in range(rounds):
        torch.cuda.synchronize()
        torch.cuda._sleep(QUEUE_CYCLES)
        for _ in range(calls):
            _time_call(fn, ts, cs)
    torch.cuda.synchronize()
    stat = stat or median
    return stat(ts) * 1e6, stat(cs) * 1e6


def mean(xs):
    return sum(xs) / len(xs)


def mean_times(calls) -> tuple:
    """(mean wall, mean CPU time) of override_times' calls."""
    return mean([c[0] for c in calls]), mean([c[1] for c in calls])


def _time_call(fn, ts: list, cs: list) -> None:
    """One call of fn: its wall time into ts, this thread's CPU time into cs (seconds)."""
    c0, t0 = time.thread_time(), time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
    cs.append(time.thread_time() - c0)


def pending_sums(ov) -> list:
    """Identities of the override's observers' pending error sums (read only): they change when the
    error target measures a call."""
    return [{b: id(t) for b, t in (getattr(o, "_pending", None) or {}).items()} for o in ov.observers]


def median(xs):
    return sorted(xs)[len(xs) // 2]


FORWARD_CALLS = 30  # self-attention calls per forward (Wan 1.3B's blocks)


def override_times(preset, grid, x, steps=12, blocks=FORWARD_CALLS, skip=3, label=False, busy=False, queued=False,
                   stats=None):
    """Host time of each self-attention call of a 30-block model's sampling run, driven through
    the node's wrappers as ComfyUI drives them (devkit/sampling_run.py), from step `skip` on (the
    adaptation's steady state): (wall us, CPU us, measured?) per call, and the override. A call is
    measured when the error target's observer took an error sample of it (its pending sums changed).
    label: each call is a "sparge override call" range in a torch.profiler trace. busy: see `settle`.
    queued: no sync between calls: each forward starts with a sleep kernel that keeps the GPU busy
    while its 30 calls are queued, as in a model whose GPU is the slower side. stats: a dict
    {False: [], True: []} that gets a cProfile.Profile of each unmeasured (False) and measured (True)
    call from step `skip` on."""
    ov = SpargeOverride(SpargeConfig.from_widgets(preset=preset, min_tokens=1024), node_id=f"host-{preset}")
    rows = []
    q, k, v = x
    forwards = [0]
    collections = [0]  # Python's cyclic garbage collections started so far (a call that saw one is flagged)

    def on_gc(phase, info):
        collections[0] += phase == "start"

    def forward(x_, t, c_concat, c_crossattn, control, to):
        forwards[0] += 1
        if queued:
            torch.cuda.synchronize()
            torch.cuda._sleep(QUEUE_CYCLES)
        for _ in range(blocks):
            before = pending_sums(ov)
            if not queued:
                settle(busy)
            gc_before = collections[0]
            pr = cProfile.Profile() if stats is not None and forwards[0] > skip else None
            c0, t0 = time.thread_time(), time.perf_counter()
            if pr is not None:
                pr.enable()
            with torch.profiler.record_function("sparge override call") if label else contextlib.nullcontext():
                ov(comfy_sdpa, q, k, v, heads=H, transformer_options=to)
            if pr is not None:
                pr.disable()
            rows.append(((time.perf_counter() - t0) * 1e6, (time.thread_time() - c0) * 1e6,
                         pending_sums(ov) != before, collections[0] != gc_before))
            if pr is not None:
                stats[rows[-1][2]].append(pr)

    dm = SimpleNamespace(patch_size=(1, 2, 2))
    lat = torch.zeros(B, 16, grid[0], grid[1] * 2, grid[2] * 2, device="cuda")
    gc.callbacks.append(on_gc)
    try:
        sampling_run(ov, forward, dm, lat, steps)
    finally:
        gc.callbacks.remove(on_gc)
    torch.cuda.synchronize()
    return rows[skip * blocks:], ov


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="7800,32760")
    ap.add_argument("--preset", default="Balanced")
    ap.add_argument("--profile", action="store_true", help="cProfile listing of the override's calls")
    ap.add_argument("--sort", default="tottime", help="the listing's order (pstats key: tottime, cumulative)")
    ap.add_argument("--rounds", type=int, default=3, help="queued sampling runs for the goal's row (the median one counts)")
    ap.add_argument("--trace", action="store_true",
                    help="torch.profiler over 5 steps of the override: the CPU ops and CUDA API calls by own time, and "
                         "a Chrome trace (host-trace-<tokens>.json in $OUT) whose 'sparge override call' ranges are "
                         "the calls")
    args = ap.parse_args()
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "preset": args.preset, "host_us": {}}
    print(f"host time per call (median, us), {res['card']}; goal <= 100 us (issue 14)")
    for n in (int(s) for s in args.tokens.split(",")):
        grid = GRIDS[n]
        g = torch.Generator(device="cuda").manual_seed(0)
        x = [torch.randn(B, n, H * D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
        qh, kh, vh = (t.view(B, n, H, D).transpose(1, 2) for t in x)
        p = PRESETS[args.preset].params()
        graphs = CallGraphs()
        rows = {"sparge_attention (API)": lambda: sparge_attention(qh, kh, vh, p),
                "sparge_attention (API, CUDA graph)": lambda: sparge_attention(qh, kh, vh, p, graphs=graphs),
                "SDPA (cuDNN) for scale": lambda: comfy_sdpa(*x, heads=H)}
        out = res["host_us"][str(n)] = {}
        override_times(args.preset, grid, x, steps=4)  # compile and warm every path
        calls, ov = override_times(args.preset, grid, x)
        plain = [c for c in calls if not c[2]]
        measured = [c for c in calls if c[2]]
        out[f"override (node, {args.preset}) median"] = (median([c[0] for c in calls]), median([c[1] for c in calls]))
        out[f"override (node, {args.preset}) mean"] = mean_times(calls)
        if plain:
            out["override, unmeasured calls, median"] = (median([c[0] for c in plain]), median([c[1] for c in plain]))
        if measured:
            out["override, measured calls, median"] = (median([c[0] for c in measured]),
                                                       median([c[1] for c in measured]))
        res.setdefault("measured_share", {})[str(n)] = len(measured) / len(calls)
        res.setdefault("override_graphs", {})[str(n)] = ov.last_graphs
        for name, fn in rows.items():
            out[name] = host_us(fn)
        busy_calls, _ = override_times(args.preset, grid, x, busy=True)
        out["override, unmeasured calls, median, GPU busy"] = (
            median([c[0] for c in busy_calls if not c[2]]), median([c[1] for c in busy_calls if not c[2]]))
        # the goal's row: several queued sampling runs, SDPA's queued mean timed between them; the figure is
        # the run whose mean is the median of the runs' (one run can fall in a slow phase of the host: the
        # same build read 71 and 139 us a minute apart, bench/NOTES.md v52)
        runs = []
        for _ in range(args.rounds):
            calls_r, _ = override_times(args.preset, grid, x, queued=True)
            runs.append((mean_times(calls_r)[0], queued_us(rows["SDPA (cuDNN) for scale"], stat=mean)[0], calls_r))
        res.setdefault("queued_rounds", {})[str(n)] = [{"override_mean_us": m, "sdpa_mean_us": sd} for m, sd, _ in runs]
        queued_calls = sorted(runs, key=lambda r: r[0])[len(runs) // 2][2]
        for what, sel in (("unmeasured calls, median", lambda c: not c[2]), ("measured calls, median", lambda c: c[2])):
            out[f"override, {what}, queued"] = (median([c[0] for c in queued_calls if sel(c)]),
                                                median([c[1] for c in queued_calls if sel(c)]))
        out["override, mean, queued"] = mean_times(queued_calls)
        # a forward's first call comes right after the synchronize that bounds the queue (this bench's,
        # not the model's): measured 3-8x slower than the rest, SDPA's first call too (NOTES, goals
        # re-measured after v44)
        out["override, mean, queued, not a forward's first call"] = mean_times(
            [c for i, c in enumerate(queued_calls) if i % FORWARD_CALLS])
        # the mean's outliers: calls during which Python's garbage collector ran (it walks every object of
        # the process, ComfyUI's too), and the slowest 2% of calls
        no_gc = [c for c in queued_calls if not c[3]]
        out["override, mean, queued, calls without a GC"] = mean_times(no_gc)
        walls = sorted(c[0] for c in queued_calls)
        res.setdefault("queued_outliers", {})[str(n)] = {
            "calls": len(walls), "with_gc": len(queued_calls) - len(no_gc),
            "gc_calls_mean_us": (sum(c[0] for c in queued_calls if c[3]) / max(1, len(queued_calls) - len(no_gc))),
            "p98_us": walls[int(0.98 * (len(walls) - 1))], "max_us": walls[-1],
            "top_2pct_share_of_total": sum(walls[int(0.98 * len(walls)):]) / sum(walls)}
        for name in ("sparge_attention (API, CUDA graph)", "SDPA (cuDNN) for scale"):
            out[name + ", GPU busy"] = host_us(rows[name], busy=True)
            out[name + ", queued"] = queued_us(rows[name])
            out[name + ", queued, mean"] = queued_us(rows[name], stat=mean)
        print(f"  {'':>6}         {'':<36} {'wall':>8}    {'CPU':>8}")
        for name, (us, cpu_us) in out.items():
            print(f"  {n:>6} tokens  {name:<36} {us:8.1f} us {cpu_us:8.1f} us")
        print(f"  {n:>6} tokens  queued calls' outliers: {res['queued_outliers'][str(n)]}")
        print(f"  {n:>6} tokens  queued runs (override mean, SDPA mean between them, us): "
              + ", ".join(f"{r['override_mean_us']:.1f} / {r['sdpa_mean_us']:.1f}" for r in res["queued_rounds"][str(n)]))
        print(f"  {n:>6} tokens  calls the error target measured: {100 * res['measured_share'][str(n)]:.0f}%; "
              f"the override's CUDA graphs: {ov.last_graphs}")
        if args.profile:  # the steady state's calls, unmeasured and measured apart
            profiles = {False: [], True: []}
            override_times(args.preset, grid, x, steps=6, stats=profiles)
            torch.cuda.synchronize()
            for measured, prs in profiles.items():
                if not prs:
                    continue
                s = io.StringIO()
                ps = pstats.Stats(prs[0], stream=s)
                for pr in prs[1:]:
                    ps.add(pr)
                print(f"cProfile of {len(prs)} {'measured' if measured else 'unmeasured'} calls (times are totals "
                      f"over them)")
                ps.sort_stats(args.sort).print_stats(45)
                print("\n".join(s.getvalue().splitlines()[:75]))
        if args.trace:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                override_times(args.preset, grid, x, steps=5, skip=0, label=True)
            path = os.path.join(os.environ.get("OUT") or ".", f"host-trace-{n}.json")
            prof.export_chrome_trace(path)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            print("trace:", path)
    print("saved", save(res, f"{res['date']}-{card_name()}-host"))


if __name__ == "__main__":
    main()
