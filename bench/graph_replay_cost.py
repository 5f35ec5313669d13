"""What a sparse call costs on the GPU and on the host when it runs through a CUDA graph, under each
allocator (issue 14; bench/NOTES.md v27).

Under cudaMallocAsync (ComfyUI's default) what a capture allocates becomes memory nodes of the
graph, which the driver maps when the graph launches; under torch's native allocator a capture
allocates from a private pool and the graph holds plain addresses. This runs the same loop of
calls both ways, each allocator in a process of its own: launched (no graphs), through one graph,
through 6 or 30 graphs in turn (settings, as the error target's per-block thresholds make), and
with an eager matmul between calls that allocates (a model's other layers) and q, k, v taken in
turn from 3 sets of tensors (the graphs' address table is rewritten on every call). Rows: GPU
time per call (CUDA events around the whole loop, no sync inside it) and host time per call (the
loop's wall time while the CPU queues it, i.e. when the CPU is the slower side).

    python bench/graph_replay_cost.py [--tokens 7800] [--calls 90]
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

from common import card_name, save
from host_overhead import GRIDS, B, D, H


def child(tokens: int, calls: int) -> dict:
    from sparge_attention.sparge_core import sparge_attention
    from sparge_attention.sparge_core.call_graphs import CallGraphs
    from sparge_attention.sparge_core.presets import PRESETS

    grid = GRIDS[tokens]
    g = torch.Generator(device="cuda").manual_seed(0)
    sets = [[torch.randn(B, H, tokens, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
            for _ in range(3)]
    x = torch.randn(B * tokens, 1536, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(1536, 1536, device="cuda", dtype=torch.bfloat16, generator=g)
    ps = [PRESETS["Balanced"].params().replace(minshare=2.0 + 0.05 * i) for i in range(30)]
    rows = {}
    for name, n_params, n_sets, graphed, between in [
            ("launched", 1, 1, False, False), ("graph x1", 1, 1, True, False), ("graph x6", 6, 1, True, False),
            ("launched + matmul", 6, 3, False, True), ("graph x6 + matmul", 6, 3, True, True),
            ("graph x30 + matmul", 30, 3, True, True)]:
        graphs = CallGraphs() if graphed else None

        def loop(n):
            for i in range(n):
                sparge_attention(*sets[i % n_sets], ps[i % n_params], grid=grid, graphs=graphs)
                if between:
                    (x @ w).sum()  # allocates and frees, like a model's other layers

        loop(3 * n_params)  # launched, captured, replayed once each
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        t0 = time.perf_counter()
        loop(calls)
        host = time.perf_counter() - t0
        e1.record()
        torch.cuda.synchronize()
        rows[name] = {"gpu_us": e0.elapsed_time(e1) * 1e3 / calls, "host_us": host * 1e6 / calls,
                      "graphs": graphs.summary() if graphs is not None else None}
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=7800, choices=sorted(GRIDS))
    ap.add_argument("--calls", type=int, default=90)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.tokens, args.calls)))
        return
    result = {"card": card_name(), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "tokens": args.tokens, "calls": args.calls, "allocators": {}}
    for backend in ("native", "cudaMallocAsync"):
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=f"backend:{backend}")
        out = subprocess.run([sys.executable, __file__, "--child", "--tokens", str(args.tokens), "--calls",
                              str(args.calls)], env=env, capture_output=True, text=True, check=True).stdout
        result["allocators"][backend] = rows = json.loads(out.strip().splitlines()[-1])
        print(f"{backend}, {args.tokens} tokens, Balanced, {args.calls} calls")
        print(f"  {'':22s} {'GPU us/call':>12s} {'host us/call':>13s}")
        for name, r in rows.items():
            print(f"  {name:22s} {r['gpu_us']:12.1f} {r['host_us']:13.1f}   {r['graphs'] or ''}")
    save(result, "graph_replay_cost")


if __name__ == "__main__":
    main()
